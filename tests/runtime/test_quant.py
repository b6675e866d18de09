"""Packed GGUF weights on CPU (runtime/models/quant.py, GGUFTensor.pack in the GGUF loader).

Per format: the CPU kernel equals the format's torch reference (`dequantize()` then F.linear on
bf16-rounded inputs), the reference equals gguf-py's dequantizer up to the bf16 rounding of the
scales, and embedding rows read from the packed data equal the reference's rows (with exact_rows:
the file's own values). The LM head's refined logits pick float32 math's greedy token where the
kernel alone does not. Then whole tiny GGUF models: the packed path's greedy tokens equal the
dequantize-at-load path's.
"""

from __future__ import annotations

import importlib.util
import os

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fleetserve.kernels import cpu_int4
from fleetserve.runtime.config import EngineConfig
from fleetserve.runtime.llm import LLM
from fleetserve.runtime.loader import ModelLoadError, load_model
from fleetserve.runtime.loader.gguf_loader import GGUFTensor
from fleetserve.runtime.models.quant import (
    COMPUTE_DTYPE,
    ConcatWeight,
    Int4GroupWeight,
    Int8ChannelWeight,
    Int8GroupWeight,
    PackedEmbedding,
    PackedLinear,
    concat_rows,
    pack_int4_cpu,
    refined_linear,
)
from fleetserve.runtime.sampling_params import SamplingParams

Q = gguf.GGMLQuantizationType
_spec = importlib.util.spec_from_file_location(
    "_test_loader", os.path.join(os.path.dirname(__file__), "test_loader.py")
)
_tl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tl)


def random_blocks(qtype, rows, cols, seed=0):
    """Raw GGUF blocks [rows, bytes per row]: quantized by gguf-py where it can, else (K-quants)
    random bytes with sane fp16 super-block scales (every byte pattern is a valid K-quant block)."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1):
        w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
        w[:, :7] += 0.3  # rows whose blocks have different scales (per-row int8 would round them)
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    f16 = rng.uniform(0.001, 0.01, size=(data.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        data[:, 0:4] = f16
    else:  # Q6_K: d is the last field
        data[:, -2:] = f16[:, :2]
    return data.reshape(rows, cols // block * size)


FORMATS = {Q.Q4_0: Int4GroupWeight, Q.Q4_1: Int4GroupWeight, Q.Q4_K: Int4GroupWeight}
FORMATS.update({Q.Q8_0: Int8GroupWeight, Q.Q6_K: Int8ChannelWeight, Q.Q5_1: Int8ChannelWeight})


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [128, 80], ids=["rows128", "rows80-padded"])
def test_packed_matmul_equals_reference_and_gguf(qtype, rows):
    cols = 512
    raw = random_blocks(qtype, rows, cols)
    t = GGUFTensor(qtype.name, raw, (rows, cols))
    exact = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(rows, cols))
    torch.testing.assert_close(t.dequantize(), exact, rtol=0, atol=0)
    fmt = t.pack()
    assert isinstance(fmt, FORMATS[qtype]) and fmt.shape == (rows, cols)

    # the format holds GGUF's values up to the bf16 rounding of its scales (2^-9 relative);
    # the per-row int8 fallback adds up to half its row step
    w = fmt.dequantize()
    err = (w - exact).abs()
    if isinstance(fmt, Int8ChannelWeight):
        bound = exact.abs().amax(1, keepdim=True) / 127 * (0.5 + 2**-8)
    else:
        bound = exact.abs().amax(1, keepdim=True) * 2**-8
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.norm() / exact.norm()) < 4e-3 if not isinstance(fmt, Int8ChannelWeight) else True

    # the kernel computes the reference: x rounded to bf16, fp32 accumulation, a bf16 result
    torch.manual_seed(0)
    for m in (1, 5, 130):
        x = torch.randn(m, cols)
        y = fmt.linear(x)
        ref = F.linear(x.to(COMPUTE_DTYPE).float(), w)
        assert y.dtype == torch.float32 and y.shape == (m, rows)
        torch.testing.assert_close(y, ref, rtol=2**-7, atol=2**-7 * float(ref.abs().max()))
        torch.testing.assert_close(fmt.reference_linear(x), ref)
    # ... and not only to within a sloppy tolerance: a wrong zero convention is far off
    wrong = F.linear(x.to(COMPUTE_DTYPE).float(), w + w.abs().mean())
    assert not torch.allclose(fmt.linear(x), wrong, rtol=2**-7, atol=2**-7 * float(ref.abs().max()))

    ids = torch.tensor([[0, rows - 1, 33], [64 % rows, 5, 5]])
    torch.testing.assert_close(fmt.rows(ids), w[ids], rtol=0, atol=0)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q6_K], ids=lambda q: q.name)
def test_rows_do_not_depend_on_the_batch(qtype):
    """A row's result is the same whatever else is in the call (batched = single request)."""
    fmt = GGUFTensor(qtype.name, random_blocks(qtype, 192, 256), (192, 256)).pack()
    x = torch.randn(300, 256)
    one = fmt.linear(x[:1])
    for m in (2, 7, 16, 64, 97, 128, 300):
        assert torch.equal(fmt.linear(x[:m])[:1], one), m


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0, Q.Q6_K], ids=lambda q: q.name)
def test_exact_rows_are_the_files_values(qtype):
    """exact_rows (the embedding / LM head): rows() return gguf-py's dequantized values (to float32
    rounding where the offset is folded as (q - 8) s + z), not the bf16-scale ones, and row_norm_max
    bounds every row's norm; the kernel is unchanged. Q6_K has no exact form (per-row int8)."""
    rows, cols = 192, 256
    raw = random_blocks(qtype, rows, cols, seed=3)
    t = GGUFTensor(qtype.name, raw, (rows, cols))
    exact, plain = t.pack(exact_rows=True), t.pack()
    ref = t.dequantize()
    ids = torch.tensor([[0, rows - 1, 33, 64], [100, 5, 5, 127]])
    got = exact.rows(ids)
    if qtype == Q.Q6_K:
        assert torch.equal(got, plain.rows(ids))
    elif qtype in (Q.Q4_0, Q.Q8_0):
        assert torch.equal(got, ref[ids])
    else:
        torch.testing.assert_close(got, ref[ids], rtol=2**-20, atol=2**-20 * float(ref.abs().max()))
    if qtype != Q.Q6_K:  # ... where the bf16-scale rows are off
        assert not torch.equal(plain.rows(ids), ref[ids])
    true_norms = exact.rows(torch.arange(rows)).norm(dim=1)
    assert bool((exact.row_norms >= true_norms).all()) and exact.row_norm_max >= float(true_norms.max())
    assert plain.row_norm_max is None
    x = torch.randn(3, cols)
    assert torch.equal(exact.linear(x), plain.linear(x))


def near_tie_q8_head(rows=256, cols=256, seed=0):
    """A Q8_0 matrix of row pairs that differ in one code by 1: their logits differ by ~x_k d, far
    below the kernel's bf16 error, so its argmax often picks the wrong one of a pair."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-100, 100, size=(rows, cols)).astype(np.int8)
    q[1::2] = q[0::2]
    k = rng.integers(0, cols, size=rows // 2)
    q[1::2][np.arange(rows // 2), k] += 1
    d = rng.uniform(0.002, 0.004, size=(rows, cols // 32)).astype(np.float16)
    d[1::2] = d[0::2]
    blocks = np.concatenate(
        [d.reshape(rows, -1, 1).view(np.uint8), q.reshape(rows, -1, 32).view(np.uint8)], -1
    )
    return GGUFTensor("Q8_0", blocks.reshape(rows, -1), (rows, cols))


def test_refined_head_logits_pick_float32_greedy():
    t = near_tie_q8_head()
    fmt, w = t.pack(exact_rows=True), t.dequantize()
    x = torch.randn(400, 256, generator=torch.Generator().manual_seed(0))
    exact = x @ w.T
    plain = fmt.linear(x).float()
    refined = refined_linear(fmt, x)
    # the kernel alone does pick wrong (torch's bf16 kernel on >20 of these rows, the C kernel on a few)
    assert int((plain.argmax(-1) != exact.argmax(-1)).sum()) > 0
    assert torch.equal(refined.argmax(-1), exact.argmax(-1))
    # the recomputed logits are float32's; the others are the kernel's
    top = refined.argmax(-1, keepdim=True)
    torch.testing.assert_close(refined.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-5)
    changed = refined != plain
    assert (
        1 <= changed.sum(-1).float().mean() < 8
    )  # the second stage's own bounds keep few (~4 on this near-tie head)
    # a row's logits do not depend on the other rows of the call
    for m in (1, 3, 17):
        assert torch.equal(refined_linear(fmt, x[:m]), refined[:m])
    # and without exact rows the head is the kernel's
    assert torch.equal(refined_linear(t.pack(), x), plain)


def test_int4_layout_is_torchs_and_is_read_back():
    """Our packing writes what torch's own converter writes, and codes() inverts it (the layout
    dequantize() and rows() rely on)."""
    g = torch.Generator().manual_seed(1)
    for n, k in ((64, 64), (192, 96), (16, 32)):
        codes = torch.randint(0, 16, (n, k), generator=g)
        if n % 64 == 0:
            theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
            assert torch.equal(pack_int4_cpu(codes.to(torch.uint8)), theirs)
        fmt = Int4GroupWeight.from_codes(codes, torch.ones(n, k // 32), torch.zeros(n, k // 32), 32)
        assert torch.equal(fmt.codes().long(), codes)


def test_int8_group_is_exact_with_bf16_scales():
    """Q8_0 as two int4 halves loses nothing but the scales' bf16 rounding: none when they are
    powers of two."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-128, 128, (64, 96), generator=g, dtype=torch.int8)
    s = 2.0 ** torch.randint(-12, -4, (64, 3), generator=g).float()
    fmt = Int8GroupWeight.from_codes(q, s, 32)
    exact = q.float() * s.repeat_interleave(32, 1)
    assert torch.equal(fmt.dequantize(), exact)
    x = torch.randn(3, 96, generator=g)
    if cpu_int4.available():  # float32 x in two int8 parts (kernels/cpu_int4.c), within its bound
        atol = 1e-4 + float(cpu_int4.input_error_bound(x, exact, 32).max())
        torch.testing.assert_close(fmt.linear(x), F.linear(x, exact), rtol=2**-7, atol=atol)
    else:  # torch's kernel: x rounded to bf16
        torch.testing.assert_close(
            fmt.linear(x), F.linear(x.bfloat16().float(), exact), rtol=2**-7, atol=1e-4
        )


def test_int8_halves_fast_route_is_the_general_layout():
    """Int8GroupWeight builds [H | L] straight from the int8 bytes when rows fill whole int4 blocks;
    that layout equals the one of the general route (H and L codes through Int4GroupWeight)."""
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-128, 128, (128, 64), generator=g, dtype=torch.int8)
    s = torch.rand(128, 2, generator=g) * 0.01
    fast = Int8GroupWeight.from_codes(q, s, 32).inner
    general = Int4GroupWeight.from_codes(
        torch.cat([((q >> 4) + 8).to(torch.uint8), (q & 15).to(torch.uint8)], dim=1),
        torch.cat([16.0 * s, s], dim=1),
        torch.cat([torch.zeros_like(s), 8.0 * s], dim=1),
        32,
    )
    assert torch.equal(fast.packed, general.packed) and torch.equal(fast.scale_zeros, general.scale_zeros)
    padded = Int8GroupWeight.from_codes(q[:80], s[:80], 32)  # 80 rows: the general route
    assert torch.equal(padded.dequantize(), Int8GroupWeight.from_codes(q, s, 32).dequantize()[:80])


def test_int4_from_nibbles_is_the_codes_layout():
    """Q4_0 / Q4_1 bytes repacked directly equal the codes' route (low nibbles: codes 0..15 of a
    group, high nibbles: 16..31)."""
    g = torch.Generator().manual_seed(5)
    qs = torch.randint(0, 256, (128, 3, 16), generator=g, dtype=torch.uint8)
    s, z = torch.rand(128, 3, generator=g), torch.rand(128, 3, generator=g)
    fast = Int4GroupWeight.from_nibbles(qs, s, z)
    general = Int4GroupWeight.from_codes(torch.cat([qs & 15, qs >> 4], -1).reshape(128, 96), s, z, 32)
    assert torch.equal(fast.packed, general.packed) and torch.equal(fast.scale_zeros, general.scale_zeros)


def test_int8_channel_rounding_bound():
    w = torch.randn(40, 64)
    fmt = Int8ChannelWeight.quantize(w)
    step = fmt.scales.float()[:, None]
    assert bool(((fmt.dequantize() - w).abs() <= step * 0.5 + 1e-7).all())


def test_concat_rows_merges_same_formats_and_stacks_mixed_ones():
    def int4(n):
        return GGUFTensor("Q4_0", random_blocks(Q.Q4_0, n, 64, seed=n), (n, 64)).pack()

    a, b = int4(64), int4(128)
    merged = concat_rows([a, b])
    assert isinstance(merged, Int4GroupWeight) and merged.shape == (192, 64)
    torch.testing.assert_close(
        merged.dequantize(), torch.cat([a.dequantize(), b.dequantize()]), rtol=0, atol=0
    )
    c = Int8ChannelWeight.quantize(torch.randn(32, 64))
    mixed = concat_rows([a, c])
    assert isinstance(mixed, ConcatWeight) and mixed.shape == (96, 64)
    x = torch.randn(2, 64)
    torch.testing.assert_close(mixed.linear(x), torch.cat([a.linear(x), c.linear(x)], -1))


def test_packed_modules_keep_their_dtypes_and_bias():
    fmt = Int8ChannelWeight.quantize(torch.randn(32, 64))
    bias = torch.nn.Parameter(torch.randn(32))
    lin = PackedLinear(fmt, bias)
    lin.to(torch.float64)  # model.to(dtype) must not cast codes or scales
    assert fmt.codes.dtype == torch.int8 and fmt.scales.dtype == COMPUTE_DTYPE
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), fmt.linear(x) + lin.bias.float(), check_dtype=False)
    emb = PackedEmbedding(fmt)
    torch.testing.assert_close(emb(torch.tensor([3, 1])), fmt.dequantize()[[3, 1]])


# ---- whole tiny GGUF models: packed vs dequantize-at-load ---------------------------------------
def write_mixed_gguf(path, hf, layer_qtype, embed_qtype, v_qtype=None, sharpen=4.0):
    """An HF model as a GGUF whose layer matrices are `layer_qtype` (attn_v: `v_qtype`, as Q4_K_M
    files do) and whose embedding is `embed_qtype`; K-quants as random blocks (gguf-py cannot
    quantize them), so the model is rebuilt from the file on both paths. The embedding and LM
    head are scaled by `sharpen`: a random model's next-token distribution is nearly flat, and
    greedy decoding of a near-tie flips with any rounding (bf16 activations here); trained
    models are peaked like this."""
    c = hf.config
    w = _tl.gguf_writer(path, c)
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([chr(0x100 + i) if i > 2 else f"<|t{i}|>" for i in range(c.vocab_size)])
    w.add_token_types([3 if i <= 2 else 1 for i in range(c.vocab_size)])
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for i, (name, t) in enumerate(hf.state_dict().items()):
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        if a.ndim == 1:
            w.add_tensor(_tl.write_name(name), a)
            continue
        qtype = layer_qtype
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            qtype, a = embed_qtype, a * sharpen
        if v_qtype is not None and "v_proj" in name:
            qtype = v_qtype
        if qtype in (Q.Q4_K, Q.Q6_K):
            data = random_blocks(qtype, *a.shape, seed=i)
        else:
            data = gguf.quants.quantize(a, qtype)
        w.add_tensor(_tl.write_name(name), data, raw_dtype=qtype)
    _tl.finish(w)


def greedy_tokens(path, mode, prompts, n=12):
    llm = LLM(str(path), device="cpu", gguf_weights=mode, num_kv_blocks=16, block_size=16, seed=0)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
    )
    return llm, [list(o.outputs[0].token_ids) for o in outs]


MODELS = {
    "q4_0": dict(layer_qtype=Q.Q4_0, embed_qtype=Q.Q4_0, tied=True),
    "q4_1+q8_0-embedding": dict(layer_qtype=Q.Q4_1, embed_qtype=Q.Q8_0, tied=True),  # SmolLM2's layout
    "q8_0-untied": dict(layer_qtype=Q.Q8_0, embed_qtype=Q.Q8_0, tied=False),
    "q4_k+q6_k": dict(layer_qtype=Q.Q4_K, embed_qtype=Q.Q6_K, v_qtype=Q.Q6_K, tied=False),
}


NEAR_TIE = 0.02  # of the largest |logit|: ~3x the packed path's largest logit error on these models
# layouts whose greedy tokens are all equal (measured: 22 of 22 prompts)
EXACT = ("q4_0", "q4_1+q8_0-embedding")


@pytest.mark.parametrize("case", list(MODELS))
def test_packed_model_greedy_equals_dequantized(tmp_path, case):
    """Engine greedy tokens of the packed path equal the dequantize-at-load path's; where they
    differ, the first difference is at a step where the reference itself is a near-tie (random
    tiny models have some: there the bf16 activations may pick the other token). Teacher-forced
    on the reference's tokens, the two paths' top-1 tokens agree at every position that is not a
    near-tie."""
    spec = dict(MODELS[case])
    tied = spec.pop("tied")
    k_quant = spec["layer_qtype"] == Q.Q4_K
    hf = _tl.tiny_hf_model(tied=tied, hidden=256 if k_quant else 64, inter=512 if k_quant else 128)
    path = tmp_path / "m.gguf"
    write_mixed_gguf(path, hf, **spec)
    prompts = [[3, 17, 42, 99, 5], [250, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    llm, packed = greedy_tokens(path, "packed", prompts)
    model = llm.engine.runner.model  # the packed path really ran on packed modules
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(model.model.embed_tokens, PackedEmbedding)
    ref_llm, ref = greedy_tokens(path, "dequantize", prompts)
    ref_model = ref_llm.engine.runner.model
    compared = total = 0
    for prompt, ours, theirs in zip(prompts, packed, ref):
        seq = prompt + theirs
        ref_logits = _tl.prefill_logits(ref_model, seq)
        top2 = ref_logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > NEAR_TIE * float(ref_logits.abs().max())
        gen_clear = clear[len(prompt) - 1 : -1].tolist()  # the steps that chose `theirs`
        cut = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(theirs))
        assert cut == len(theirs) or not gen_clear[cut], (cut, ours, theirs)  # diverged at a near-tie only
        compared, total = compared + cut, total + len(theirs)
        agree = _tl.prefill_logits(model, seq).argmax(-1) == ref_logits.argmax(-1)
        assert bool(agree[clear].all()), (agree.tolist(), clear.tolist())
    assert compared >= total // 2, f"only {compared} of {total} greedy tokens equal before a near-tie"
    if case in EXACT:  # SmolLM2's layout: float32 greedy everywhere (the head's top logits are exact)
        assert packed == ref


def test_packed_is_the_cpu_default_and_refused_on_cuda(tmp_path):
    hf = _tl.tiny_hf_model(tied=True)
    path = tmp_path / "m.gguf"
    write_mixed_gguf(path, hf, Q.Q4_0, Q.Q8_0)
    model = load_model(EngineConfig(model=str(path), device="cpu", gguf_weights="dequantize")).model
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, torch.nn.Linear)
    model = load_model(EngineConfig(model=str(path), device="cpu")).model
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, PackedLinear)
    assert isinstance(model.model.embed_tokens.fmt, Int8GroupWeight)
    assert model.model.embed_tokens.fmt.row_norm_max is not None  # exact rows for lookups and the head
    assert model.model.layers[1].mlp.gate_up_proj.fmt.row_norm_max is None  # (not for the layers)
    with pytest.raises(ModelLoadError, match="gguf_weights='packed' needs device cpu"):
        load_model(EngineConfig(model=str(path), gguf_weights="packed"), device="cuda")
