"""GPU tier: the whole HTTP path on CUDA (engine thread, CUDA graphs captured on another thread) under load.

Dummy Llama-3.2-1B weights; `fleetserve bench serve` drives 128 streaming requests through the
server. Writes the bench JSON to $OUT/server-bench-1b.json when $OUT is set (the GPU machine's
result folder), so server overhead can be compared with the offline throughput benchmark.
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_server(cuda_released):
    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.server.config import ServerConfig

    from .conftest import ServerThread

    with cuda_released("the gpu_server fixture"):
        srv = ServerThread(
            EngineConfig(model="llama-3.2-1b", load_format="dummy", device="cuda", max_model_len=2048),
            {"main": ServerConfig(max_waiting_requests=100_000)},
        ).start(timeout=600)
        yield srv
        srv.stop()
        del srv


def test_bench_serve_on_gpu(gpu_server, tmp_path):
    from fleetserve.runtime import cli

    from .conftest import metric_values, wait_for_idle

    url = gpu_server.urls["main"]
    out = os.path.join(os.environ.get("OUT") or str(tmp_path), "server-bench-1b.json")
    rc = cli.main(
        [
            "bench",
            "serve",
            "--base-url",
            url,
            "--num-prompts",
            "128",
            "--input-len",
            "256",
            "--output-len",
            "64",
            "--ignore-eos",
            "--result-file",
            out,
        ]
    )
    assert rc == 0
    r = json.load(open(out))
    assert r["completed"] == 128 and r["output_lens"] == [64] * 128
    assert 0 < r["mean_ttft_ms"] < r["mean_e2el_ms"]
    print(
        f"\nserver on GPU: {r['output_throughput']:.0f} output tok/s, TTFT p50 {r['median_ttft_ms']:.0f} ms, "
        f"TPOT p50 {r['median_tpot_ms']:.1f} ms, ITL p99 {r['p99_itl_ms']:.1f} ms"
    )
    wait_for_idle(gpu_server)
    m = metric_values(url)
    assert m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:generation_tokens_total"] >= 128 * 64
