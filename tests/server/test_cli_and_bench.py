"""CLI flags are generated from the configs; --help stays light; the bench client measures sanely."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from fleetserve.runtime.cli import build_parser, parse_bytes
from fleetserve.runtime.config import EngineConfig
from fleetserve.runtime.server.config import ServerConfig

from .conftest import API_KEY


def test_every_config_field_is_a_flag():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    options = {s for a in serve._actions for s in a.option_strings}
    for model in (EngineConfig, ServerConfig):
        for name in model.model_fields:
            assert "--" + name.replace("_", "-") in options, name
    for flag in (
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--dtype",
        "--device",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--block-size",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "--kv-cache-memory",
        "--gpu-memory-utilization",
        "--shutdown-timeout",
        "--max-waiting-requests",
    ):
        assert flag in options, flag


def test_serve_flags_parse_into_configs(monkeypatch):
    from fleetserve.runtime import cli

    seen = {}

    def fake_run(coro):
        seen["frame"] = coro.cr_frame.f_locals
        coro.close()

    monkeypatch.setattr("asyncio.run", fake_run)
    monkeypatch.setenv("FLEETSERVE_API_KEY", "from-env")
    rc = cli.main(
        [
            "serve",
            "my-model",
            "--port",
            "9001",
            "--no-enable-prefix-caching",
            "--kv-cache-memory",
            "2GiB",
            "--dtype",
            "float32",
            "--max-num-seqs",
            "8",
            "--shutdown-timeout",
            "5",
            "--max-request-body-bytes",
            "4MiB",
        ]
    )
    assert rc == 0
    ec, sc = seen["frame"]["engine_config"], seen["frame"]["server_config"]
    assert ec.model == "my-model" and ec.enable_prefix_caching is False and ec.kv_cache_memory == 2 << 30
    assert ec.dtype == "float32" and ec.max_num_seqs == 8 and ec.block_size == EngineConfig().block_size
    assert sc.port == 9001 and sc.api_key == "from-env" and sc.shutdown_timeout == 5
    assert sc.max_request_body_bytes == 4 << 20


def test_invalid_flag_values_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--dtype", "int3"])
    assert e.value.code == 2
    from fleetserve.runtime import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--gpu-memory-utilization", "1.5"])


def test_parse_bytes():
    assert parse_bytes("1024") == 1024
    assert parse_bytes("4GiB") == 4 << 30
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("1e9") == 10**9
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")


def test_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from fleetserve.runtime import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: cli.main(['serve', '--help'])\n"
        "    except SystemExit: pass\n"
        "assert '--enable-prefix-caching' in out.getvalue()\n"
        "assert 'torch' not in sys.modules and 'aiohttp' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bench_serve_against_test_server(base_url, tmp_path, model_name):
    from fleetserve.runtime import cli

    out = tmp_path / "bench.json"
    rc = cli.main(
        [
            "bench",
            "serve",
            "--base-url",
            base_url,
            "--num-prompts",
            "6",
            "--input-len",
            "24",
            "--output-len",
            "5",
            "--request-rate",
            "inf",
            "--max-concurrency",
            "4",
            "--ignore-eos",
            "--api-key",
            API_KEY,
            "--result-file",
            str(out),
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["completed"] == 6 and r["failed"] == 0 and r["model"] == model_name
    assert r["output_lens"] == [5] * 6 and r["total_output_tokens"] == 30
    assert r["input_lens"] == [24] * 6  # exact: the server has /tokenize
    for t, e in zip(r["ttfts"], r["e2els"]):
        assert 0 < t < e
    assert 0 < r["mean_ttft_ms"] < r["mean_e2el_ms"]
    assert r["mean_tpot_ms"] > 0 and r["p99_itl_ms"] >= r["median_itl_ms"] > 0
    assert r["request_throughput"] > 0 and r["output_throughput"] > 0
    assert r["total_token_throughput"] > r["output_throughput"]
    # The chat endpoint, with Poisson arrivals.
    rc = cli.main(
        [
            "bench",
            "serve",
            "--base-url",
            base_url,
            "--endpoint-type",
            "chat",
            "--num-prompts",
            "3",
            "--input-len",
            "8",
            "--output-len",
            "3",
            "--request-rate",
            "20",
            "--ignore-eos",
            "--api-key",
            API_KEY,
            "--result-file",
            str(out),
        ]
    )
    assert rc == 0 and json.loads(out.read_text())["output_lens"] == [3] * 3


def test_bench_throughput_is_delegated_with_all_its_arguments(monkeypatch):
    import types

    from fleetserve.runtime import cli

    seen = []
    fake = types.ModuleType("fleetserve.runtime.bench.throughput")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fleetserve.runtime.bench.throughput", fake)
    import fleetserve.runtime.bench as bench_pkg

    monkeypatch.setattr(bench_pkg, "throughput", fake, raising=False)
    assert cli.main(["bench", "throughput", "--help", "--num-prompts", "3"]) == 0
    assert seen == [["--help", "--num-prompts", "3"]]
