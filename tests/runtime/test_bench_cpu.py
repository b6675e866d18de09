"""`fleetserve bench throughput --device cpu` (the CPU GGUF suite) in a tiny mode: fleetserve in
its child process on the embedded SmolLM2 (load, first answer, memory, the three workloads), and
llama.cpp beside it when its build is present (skipped with a reason in the record otherwise)."""

from __future__ import annotations

import json

import pytest

from fleetserve.runtime.bench import cpu
from fleetserve.runtime.bench.throughput import main

TINY = ["--device", "cpu", "--num-prompts", "2", "--input-len", "8", "--output-len", "4", "--repeats", "1"]
TINY += ["--threads", "1"]

TABLE = """
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    127 |    1 |    255 |    0.424 |   302.00 |    1.067 |   119.00 |    1.491 |   171.02 |
|   128 |    127 |   16 |   4080 |    6.800 |   301.18 |   9.600 |   211.67 |   16.400 |   248.78 |
"""


def test_parse_batched_bench():
    rows = cpu.parse_batched_bench("llama_batched_bench: n_kv_max = 4096\n" + TABLE)
    assert [r["b"] for r in rows] == [1, 16]
    assert rows[0]["s_pp"] == 302.0 and rows[0]["s_tg"] == 119.0 and rows[1]["t"] == 16.4


def _records(path):
    return {r["what"]: r for r in json.loads(path.read_text())}


def test_cpu_suite_tiny_without_llamacpp(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETSERVE_LLAMACPP_BIN", str(tmp_path / "no-build"))
    out = tmp_path / "cpu.json"
    assert main([*TINY, "--output-json", str(out)]) == 0
    rec = _records(out)
    fs = rec["fleetserve"]
    assert fs["first_answer"].startswith(" Paris")
    assert fs["attention_backend"] == "cpu" and fs["threads"] == 1
    assert 0 < fs["rss_after_load_MiB"] <= fs["rss_peak_MiB"]
    assert 0 < fs["import_s"] < fs["load_to_first_answer_s"]
    for key in ("prompt_tok_s", "decode_tok_s", "concurrent_out_tok_s", "ttft_s"):
        assert fs[key]["min"] > 0, key
    # default KV sizing: 4 sequences of the model's full context (fewer where memory is short)
    assert fs["max_model_len"] <= fs["kv_tokens"] <= 4 * fs["max_model_len"]
    assert "no llama.cpp build" in rec["llama.cpp"]["skipped"]
    assert "ratio" not in rec and rec["cpu"]["gguf"].endswith(".gguf")


def test_cpu_suite_peer_dying_on_a_signal_is_skipped_with_the_reason(smollm2_path, tmp_path, monkeypatch):
    # a native llama.cpp build on a VM that traps an instruction its CPU lists: SIGILL
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "llama-batched-bench"
    exe.write_text("#!/bin/sh\nkill -ILL $$\n")
    exe.chmod(0o755)
    monkeypatch.setenv("FLEETSERVE_LLAMACPP_BIN", str(bin_dir))
    assert "dies with SIGILL" in cpu.llamacpp_unusable(smollm2_path)
    out = tmp_path / "lat.json"
    assert main([*TINY, "--latency", "--output-json", str(out)]) == 0
    rec = _records(out)
    assert "SIGILL" in rec["llama.cpp"]["skipped"] and "ratio" not in rec
    # a build that fails without a signal is an error, not a reason to skip
    exe.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    assert cpu.llamacpp_unusable(smollm2_path) is None
    with pytest.raises(RuntimeError, match="rc 3"):
        main([*TINY, "--latency", "--output-json", str(out)])


def test_cpu_suite_latency_mode_with_llamacpp(smollm2_path, tmp_path):
    reason = cpu.llamacpp_unusable(smollm2_path)
    if reason:
        pytest.skip(reason)
    out = tmp_path / "lat.json"
    assert main([*TINY, "--latency", "--output-json", str(out)]) == 0
    rec = _records(out)
    peer, fs = rec["llama.cpp"], rec["fleetserve"]
    assert "skipped" not in peer and peer["decode_tok_s"]["min"] > 0 and peer["rss_peak_MiB"] > 0
    assert "concurrent_out_tok_s" not in peer and "concurrent_out_tok_s" not in fs  # latency only
    assert rec["ratio"]["fleetserve_over_llamacpp"]["decode_tok_s"] > 0
