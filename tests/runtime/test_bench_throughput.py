"""`fleetserve bench throughput` on CPU: the HF baseline builds transformers' own class of any
registered family from the preset, and the roofline counts sliding-window layers' KV reads."""

from __future__ import annotations

import json

import pytest

from fleetserve.runtime.bench.throughput import _visible_pairs, main, roofline_seconds
from fleetserve.runtime.models import PRESETS

pytest.importorskip("transformers")


def _shrunk(preset: str, **kw):
    """A preset's architecture at a size both engines run on this CPU in seconds."""
    dims = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)
    return PRESETS[preset].with_(**dims, num_kv_heads=2, head_dim=16, max_position_embeddings=128, **kw)


def test_baseline_hf_runs_a_qwen3_shape_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setitem(PRESETS, "qwen3-tiny", _shrunk("qwen3-8b", name="qwen3-tiny"))
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
    monkeypatch.setitem(PRESETS, "mixtral-tiny", _shrunk("mixtral-8x7b", name="mixtral-tiny"))
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
    assert records["hf_static"]["experts_implementation_in_generate"] == ["eager"]


@pytest.mark.parametrize("asked", [None, "grouped_mm"])
def test_baseline_hf_keeps_the_asked_experts_implementation_through_decode(monkeypatch, tmp_path, asked):
    """On GPU, transformers' generate() swaps grouped_mm for batched_mm in its decode steps
    (`_optimize_model_for_decode`), which runs Mixtral-8x7B out of memory. That swap only happens
    off the CPU, so here it is stood in for by a fake of the same shape (a mock, named as one):
    an implementation asked for must still be what the experts run; without one, the swap shows."""
    import contextlib

    from transformers.generation.utils import GenerationMixin

    @contextlib.contextmanager
    def gpu_like_switch(self):
        before = self.get_experts_implementation()
        self.set_experts_implementation(
            {k: "batched_mm" if v == "grouped_mm" else v for k, v in before.items()}
        )
        try:
            yield
        finally:
            self.set_experts_implementation(before)

    monkeypatch.setattr(GenerationMixin, "_optimize_model_for_decode", gpu_like_switch)
    out = tmp_path / "bench.json"
    args = [*_tiny_mixtral(monkeypatch), *_SMALL, "--output-json", str(out)]
    if asked:
        args += ["--hf-experts-impl", asked]
    assert main(args) == 0
    records = {r["what"]: r for r in json.loads(out.read_text())}
    swapped = ["batched_mm", "grouped_mm"]  # prefill grouped, decode batched
    assert records["hf_static"]["experts_implementation_in_generate"] == ([asked] if asked else swapped)


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


def test_roofline_on_several_gpus():
    m = PRESETS["llama-3.1-8b"]
    one = roofline_seconds(m, 256, 512, 256, 2, bandwidth=4e12, flops=8e14)
    # a link of unbounded speed: weights, KV and FLOPs split evenly over 2 GPUs halve every term
    ideal = roofline_seconds(
        m, 256, 512, 256, 2, bandwidth=4e12, flops=8e14, tp=2, link_bandwidth=float("inf")
    )
    assert ideal["decode_s"] == pytest.approx(one["decode_s"] / 2)
    assert ideal["prefill_s"] == pytest.approx(one["prefill_s"] / 2)
    assert ideal["collectives_s"] == 0 and ideal["gpus"] == 2
    # a real link adds each forward's collectives: (2 layers + 1) all-reduces of T x hidden bf16 values,
    # a ring moving 2 (N - 1) / N of each per GPU, and GPU 0 gathering the other half of the logits
    r = roofline_seconds(m, 256, 512, 256, 2, bandwidth=4e12, flops=8e14, tp=2, link_bandwidth=4e11)

    def comm(tokens):
        return ((2 * 32 + 1) * tokens * 4096 * 2 * 2 * 0.5 + 256 * 128256 * 2 * 0.5) / 4e11

    assert r["collectives_s"] == pytest.approx(comm(256 * 512) + 255 * comm(256))
    assert r["total_s"] == pytest.approx(ideal["total_s"] + r["collectives_s"])
    with pytest.raises(ValueError, match="link bandwidth"):
        roofline_seconds(m, 256, 512, 256, 2, bandwidth=4e12, flops=8e14, tp=2)
    # more GPUs than KV heads: each keeps (reads) one KV head, replicated, so KV reads stop shrinking
    kv16 = roofline_seconds(m, 256, 512, 256, 2, 4e12, 8e14, tp=16, link_bandwidth=float("inf"))
    kv8 = roofline_seconds(m, 256, 512, 256, 2, 4e12, 8e14, tp=8, link_bandwidth=float("inf"))
    kv_8 = 255 * 256 * 2 * 32 * 128 * 2 * (512 + 128) / 4e12  # one KV head per GPU, mean context 640
    assert kv16["decode_s"] - kv_8 == pytest.approx((kv8["decode_s"] - kv_8) / 2, rel=1e-2)


def test_several_tensor_parallel_sizes_in_one_call(tmp_path):
    # -tp 1 2: both engines run one after the other (gloo ranks on CPU), with a tp_scaling record;
    # the worker processes read the model from a directory (a monkeypatched preset stays in this one)
    from fleetserve.runtime.models import hf_config_dict

    tiny = _shrunk("llama-3.1-8b")
    model_dir = tmp_path / "llama-tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(hf_config_dict(tiny)))
    out = tmp_path / "bench.json"
    args = ["--model", str(model_dir), "--device", "cpu", "--num-prompts", "2", *_SMALL, "-tp", "1", "2"]
    assert main([*args, "--output-json", str(out)]) == 0
    records = json.loads(out.read_text())
    runs = [r for r in records if r["what"] == "fleetserve"]
    assert [r["tensor_parallel_size"] for r in runs] == [1, 2]
    assert all(r["generated"] == r["expected"] == 8 for r in runs)
    scaling = next(r for r in records if r["what"] == "tp_scaling")
    assert scaling["tensor_parallel_sizes"] == [1, 2] and scaling["speedup_over_first"][0] == 1.0
