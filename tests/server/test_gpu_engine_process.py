"""GPU tier: the engine core in a spawned process on CUDA (CUDA graphs captured there), under load,
and the same outputs as the engine in a thread of the server.

Dummy Llama-3.2-1B weights (token-id prompts: the preset may have no tokenizer). Writes the bench JSON
to $OUT/server-bench-1b-process.json when $OUT is set. Run on the GPU machine with
`PYTHONSAFEPATH=1 python3 -m pytest -q -s -m gpu tests/server/test_gpu_engine_process.py`.
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.gpu

# Two engines share the card (the core process's and the thread server's): each takes its share.
ENGINE = dict(
    model="llama-3.2-1b", load_format="dummy", device="cuda", max_model_len=2048, gpu_memory_utilization=0.4
)


@pytest.fixture(scope="module")
def servers(cuda_released):
    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.server.config import ServerConfig

    from .conftest import ServerThread

    cfg = {"main": ServerConfig(max_waiting_requests=100_000)}
    with cuda_released("the servers fixture"):
        proc = ServerThread(EngineConfig(**ENGINE), cfg, engine_process=True).start(timeout=600)
        try:
            thread = ServerThread(EngineConfig(**ENGINE), cfg).start(timeout=600)
        except BaseException:
            proc.stop()
            raise
        yield proc, thread
        thread.stop()
        proc.stop()
        del proc, thread


def test_engine_process_on_gpu_same_outputs_and_load(servers, tmp_path):
    import openai

    from fleetserve.runtime import cli

    from .conftest import metric_values, wait_for_idle

    proc, thread = servers
    assert proc.llm.core_pid is not None and proc.llm.core_pid != os.getpid()
    prompts = [[(7 * i + j) % 5000 + 100 for j in range(40 + 9 * i)] for i in range(6)]
    got = []
    for srv in (proc, thread):
        c = openai.OpenAI(base_url=srv.urls["main"] + "/v1", api_key="x", max_retries=0, timeout=300)
        model = c.models.list().data[0].id
        got.append(
            [
                c.completions.create(
                    model=model,
                    prompt=p,
                    max_tokens=24,
                    temperature=0,
                    logprobs=1,
                    extra_body={"ignore_eos": True},
                ).choices[0]
                for p in prompts
            ]
        )
    for a, b in zip(*got):
        assert a.logprobs.tokens == b.logprobs.tokens  # same greedy tokens, one by one
        assert a.logprobs.token_logprobs == pytest.approx(b.logprobs.token_logprobs, abs=1e-3)
    url = proc.urls["main"]
    out = os.path.join(os.environ.get("OUT") or str(tmp_path), "server-bench-1b-process.json")
    rc = cli.main(
        [
            "bench",
            "serve",
            "--base-url",
            url,
            "--num-prompts",
            "256",
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
    assert r["completed"] == 256 and r["output_lens"] == [64] * 256
    print(
        f"\nengine process on GPU: {r['output_throughput']:.0f} output tok/s, TTFT p50 {r['median_ttft_ms']:.0f} ms, "
        f"TPOT mean {r['mean_tpot_ms']:.1f} ms, ITL p99 {r['p99_itl_ms']:.1f} ms"
    )
    wait_for_idle(proc)
    m = metric_values(url)
    assert m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:generation_tokens_total"] >= 256 * 64
