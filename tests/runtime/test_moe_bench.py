"""The throughput benchmark on MoE models: roofline counts only the experts a step reads, and
`fleetserve bench throughput --model <moe preset> --baseline hf` runs end to end (on CPU with
a tiny preset of the same architectures: the code path the GPU run takes, minus CUDA)."""

from __future__ import annotations

import json

import pytest

from fleetserve.runtime.bench import throughput
from fleetserve.runtime.models import PRESETS

pytest.importorskip("transformers")


def test_expected_experts_hit():
    assert throughput.expected_experts_hit(8, 2, 1) == pytest.approx(2.0)
    assert throughput.expected_experts_hit(8, 8, 3) == pytest.approx(8.0)
    assert throughput.expected_experts_hit(128, 8, 256) == pytest.approx(128.0, rel=1e-6)
    assert throughput.expected_experts_hit(128, 8, 4) == pytest.approx(128 * (1 - (120 / 128) ** 4))


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_step_weight_bytes(name):
    mc = PRESETS[name]
    # one token reads exactly its active parameters; a big batch reads (almost) all of them
    assert throughput.step_weight_bytes(mc, 1, 2) == pytest.approx(2 * mc.num_active_params())
    assert throughput.step_weight_bytes(mc, 4096, 2) == pytest.approx(2 * mc.num_params())
    dense = PRESETS["llama-3.1-8b"]
    assert throughput.step_weight_bytes(dense, 1, 2) == 2 * dense.num_params()


TINY = {
    "tiny-mixtral": PRESETS["mixtral-8x7b"].with_(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    ),
    "tiny-qwen3-moe": PRESETS["qwen3-30b-a3b"].with_(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        num_experts=16,
        num_experts_per_tok=4,
    ),
}


@pytest.mark.parametrize("name", list(TINY))
def test_bench_throughput_with_hf_baseline_runs_on_cpu(name, monkeypatch, tmp_path, capsys):
    from fleetserve.runtime import cli

    monkeypatch.setitem(PRESETS, name, TINY[name])
    out = tmp_path / "bench.json"
    rc = cli.main(
        [
            "bench",
            "throughput",
            "--model",
            name,
            "--baseline",
            "hf",
            "--num-prompts",
            "3",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--device",
            "cpu",
            "--output-json",
            str(out),
        ]
    )
    assert rc == 0
    records = {r["what"]: r for r in json.loads(out.read_text())}
    fs, hf = records["fleetserve"], records["hf_static"]
    assert fs["generated"] == fs["expected"] == 12 and fs["active_params"] < fs["params"]
    assert hf["generated"] == 12 and hf["hf_class"] == (
        "MixtralForCausalLM" if "mixtral" in name else "Qwen3MoeForCausalLM"
    )
    assert records["ratio"]["fleetserve_over_hf"] > 0
