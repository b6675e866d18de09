"""The lean CPU forward (runtime/models/cpu_forward.py) against the module forward it replaces:
bit-equal hidden states and logits, step after step through the same KV cache layout, on every
tiny family of test_engine (float32 weights: GQA, MHA, biases, sliding windows, llama3 and
longrope RoPE; Qwen3's q/k norms and Gemma's layers take their module forward), on packed
tiny GGUF models (int4 with padded rows, int8 LM heads, mixed-format qkv) and on the embedded
SmolLM2 Q4_1 with packed weights, the path it was written for.

The schedule covers what an engine step can be: a batched prefill of two sequences, batched
decodes, one stream decoding on consecutive blocks (attention reads a view of the cache) and on
shuffled ones (a gathered copy), a chunked-prefill continuation, and a step whose token's K/V
are dropped (slot -1: that step runs the module forward).
"""

from __future__ import annotations

import importlib.util
import os

import gguf
import pytest
import torch

from fleetserve.runtime.attention import AttentionMetadata
from fleetserve.runtime.config import EngineConfig
from fleetserve.runtime.loader import load_model
from fleetserve.runtime.models.quant import PackedLinear

from .test_engine import CONFIGS, build_hf

pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "_test_quant", os.path.join(os.path.dirname(__file__), "test_quant.py")
)
_tq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tq)

BS = 4  # block size of the test cache
TABLE_A = list(range(2, 14))  # consecutive blocks
TABLE_B = [30, 17, 21, 15, 25, 16, 27, 14, 29]  # shuffled


def _meta(seqs, drop=False):
    """seqs: (start, num_new, block table) per sequence -> AttentionMetadata; drop: the last token's
    slot is -1 (its K/V are not written)."""
    slots, qsl, lens = [], [0], []
    for start, n, table in seqs:
        slots += [table[p // BS] * BS + p % BS for p in range(start, start + n)]
        qsl.append(qsl[-1] + n)
        lens.append(start + n)
    if drop:
        slots[-1] = -1
    nblk = max(-(-s // BS) for s in lens)
    bt = torch.tensor([t[:nblk] + [0] * (nblk - len(t[:nblk])) for _, _, t in seqs], dtype=torch.int32)
    return AttentionMetadata(
        torch.tensor(slots, dtype=torch.int64),
        torch.tensor(qsl, dtype=torch.int32),
        torch.tensor(lens, dtype=torch.int32),
        bt,
        max(n for _, n, _ in seqs),
        max(lens),
    )


def run_schedule(model, fast: bool, vocab: int):
    """Hidden states and logits of every step of the schedule, with model.cpu_fast_forward = fast."""
    cfg = model.config
    model.cpu_fast_forward = fast
    caches = [torch.zeros(2, 32, BS, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    g = torch.Generator().manual_seed(0)
    lens = {"a": 0, "b": 0}
    tables = {"a": TABLE_A, "b": TABLE_B}
    out = []

    def step(news, drop=False):
        seqs, pos = [], []
        for name, n in news:
            seqs.append((lens[name], n, tables[name]))
            pos += range(lens[name], lens[name] + n)
            lens[name] += n
        ids = torch.randint(3, vocab, (len(pos),), generator=g)
        with torch.inference_mode():
            h = model(ids, torch.tensor(pos), _meta(seqs, drop), caches)
            out.append(h.clone())
            out.append(model.compute_logits(h))

    step([("a", 7), ("b", 5)])  # batched prefill
    for _ in range(3):
        step([("a", 1), ("b", 1)])  # batched decode
    for _ in range(3):
        step([("a", 1)])  # one stream, consecutive blocks
    step([("b", 3)])  # chunked-prefill continuation
    for _ in range(2):
        step([("b", 1)])  # one stream, shuffled blocks
    step([("a", 1), ("b", 1)], drop=True)  # slot -1: K/V dropped
    step([("a", 1)])
    model.cpu_fast_forward = True
    return out


def assert_lean_equals_modules(model, vocab, expect_lean=True):
    assert model.ops.name == "cpu"
    plans = model.cpu_layer_plans()
    assert any(p is not None for p in plans) == expect_lean
    modules = run_schedule(model, False, vocab)
    lean = run_schedule(model, True, vocab)
    for i, (a, b) in enumerate(zip(lean, modules)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i} differs: {(a - b).abs().max()}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_forward_equals_module_forward(name, tmp_path):
    kind, kw = CONFIGS[name]
    build_hf(kind, kw, tmp_path)
    model = load_model(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32")).model
    # Qwen3 (q/k norms) and Gemma 2/3 (four norms, soft-caps) run their module forward
    assert_lean_equals_modules(model, 256, expect_lean=kind not in ("qwen3", "gemma2", "gemma3"))


@pytest.mark.parametrize("case", ["q4_1+q8_0-embedding", "q4_k+q6_k"])
def test_lean_forward_equals_module_forward_packed(case, tmp_path):
    spec = dict(_tq.MODELS[case])
    tied = spec.pop("tied")
    k_quant = spec["layer_qtype"] == gguf.GGMLQuantizationType.Q4_K
    hf = _tq._tl.tiny_hf_model(tied=tied, hidden=256 if k_quant else 64, inter=512 if k_quant else 128)
    path = tmp_path / "m.gguf"
    _tq.write_mixed_gguf(path, hf, **spec)
    model = load_model(EngineConfig(model=str(path), device="cpu", gguf_weights="packed")).model
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert_lean_equals_modules(model, 256)


def test_lean_forward_equals_module_forward_embedded_packed():
    model = load_model(EngineConfig(device="cpu", gguf_weights="packed")).model
    assert isinstance(model.model.layers[0].mlp.down_proj, PackedLinear)
    assert all(p is not None for p in model.cpu_layer_plans())
    assert_lean_equals_modules(model, model.config.vocab_size)


def test_plans_are_rebuilt_after_loading_or_moving(tmp_path):
    kind, kw = CONFIGS["llama-gqa4-d32-tied"]
    build_hf(kind, kw, tmp_path)
    model = load_model(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32")).model
    plans = model.cpu_layer_plans()
    assert model.cpu_layer_plans() is plans  # built once
    model.load_weights([])
    assert model.cpu_layer_plans() is not plans
    plans = model.cpu_layer_plans()
    model.to(torch.bfloat16)  # bf16 weights: no lean layers (the module path's bf16 ops differ)
    assert all(p is None for p in model.cpu_layer_plans())
