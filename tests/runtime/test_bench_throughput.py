"""`fleetserve bench throughput` on CPU: the HF baseline builds transformers' own class of any
registered family from the preset, and the roofline counts sliding-window layers' KV reads."""

from __future__ import annotations

import json

import pytest

from fleetserve.runtime.bench.throughput import _visible_pairs, main, roofline_seconds
from fleetserve.runtime.models import PRESETS

pytest.importorskip("transformers")


def test_baseline_hf_runs_a_qwen3_shape_on_cpu(monkeypatch, tmp_path):
    # the qwen3-8b preset, shrunk so that both engines run it on this CPU in seconds
    tiny = PRESETS["qwen3-8b"].with_(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        name="qwen3-tiny",
    )
    monkeypatch.setitem(PRESETS, "qwen3-tiny", tiny)
    out = tmp_path / "bench.json"
    rc = main(
        [
            "--model",
            "qwen3-tiny",
            "--baseline",
            "hf",
            "--device",
            "cpu",
            "--num-prompts",
            "3",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--max-num-seqs",
            "4",
            "--hf-num-prompts",
            "2",
            "--output-json",
            str(out),
        ]
    )
    assert rc == 0
    records = {r["what"]: r for r in json.loads(out.read_text())}
    assert records["fleetserve"]["generated"] == records["fleetserve"]["expected"] == 12
    assert records["hf_static"]["hf_class"] == "Qwen3ForCausalLM" and records["hf_static"]["generated"] == 8
    assert records["ratio"]["fleetserve_over_hf"] > 0


def _tiny_mixtral(monkeypatch):
    tiny = PRESETS["mixtral-8x7b"].with_(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        name="mixtral-tiny",
    )
    monkeypatch.setitem(PRESETS, "mixtral-tiny", tiny)
    return ["--model", "mixtral-tiny", "--baseline", "hf", "--device", "cpu", "--num-prompts", "2"]


_SMALL = ["--input-len", "8", "--output-len", "4", "--max-num-seqs", "4"]


def test_baseline_hf_uses_the_asked_experts_implementation(monkeypatch, tmp_path):
    # transformers' default on CPU is grouped_mm: asking for eager must reach the built model
    out = tmp_path / "bench.json"
    args = [*_tiny_mixtral(monkeypatch), *_SMALL, "--hf-experts-impl", "eager", "--output-json", str(out)]
    assert main(args) == 0
    records = {r["what"]: r for r in json.loads(out.read_text())}
    assert records["hf_static"]["hf_class"] == "MixtralForCausalLM"
    assert records["hf_static"]["experts_implementation"] == "eager"


def test_engine_record_survives_a_failing_hf_baseline(monkeypatch, tmp_path):
    from fleetserve.runtime.bench import throughput

    def oom(*a, **k):
        raise MemoryError("HF baseline out of memory")

    monkeypatch.setattr(throughput, "run_hf_static", oom)
    out = tmp_path / "bench.json"
    with pytest.raises(MemoryError):
        main([*_tiny_mixtral(monkeypatch), *_SMALL, "--output-json", str(out)])
    records = {r["what"]: r for r in json.loads(out.read_text())}
    assert records["fleetserve"]["generated"] == 8 and "hf_static" not in records


def test_visible_pairs():
    assert _visible_pairs(5, None) == 15 == sum(i + 1 for i in range(5))
    assert _visible_pairs(5, 2) == 1 + 2 * 4 == sum(min(i + 1, 2) for i in range(5))
    assert _visible_pairs(5, 8) == 15


def test_roofline_of_the_new_shapes():
    q3 = PRESETS["qwen3-8b"]
    r = roofline_seconds(q3, 256, 512, 256, 2, bandwidth=4e12, flops=8e14)
    # anchors.md formulas (W = 2P bytes, every parameter): decode is bandwidth-bound here, each step
    # reads W plus 256 sequences' KV, step j sees 512 + j tokens; prefill 2P FLOPs/token + attention
    P = q3.num_params()
    kv_token = 2 * 36 * 8 * 128 * 2
    want = sum((P * 2 + 256 * (512 + j) * kv_token) / 4e12 for j in range(1, 256))
    assert r["decode_s"] == pytest.approx(want)
    attn = 2 * 2 * 32 * 128 * 36 * (512 * 513 // 2)
    assert r["prefill_s"] == pytest.approx(256 * (2 * P * 512 + attn) / 8e14)
    # half the layers sliding over 64 tokens read less KV and attend over fewer pairs
    slid = q3.with_(sliding_window=64, layer_types=("sliding_attention", "full_attention") * 18)
    r2 = roofline_seconds(slid, 256, 512, 256, 2, bandwidth=4e12, flops=8e14)
    assert r2["decode_s"] < r["decode_s"] and r2["prefill_s"] < r["prefill_s"]
