"""paged_attention_sdpa (the CPU engine's attention) against paged_attention_ref.

CPU, fp32 (and bf16, the CPU's half type): decode, prefill, chunked and mixed batches, GQA
with a non-power-of-2 group, padding sequences, loose max_seq_len bounds, sliding windows
(decode and prefill) and the soft-cap fallback. Tolerances are relative Frobenius errors
vs the float32 reference. paged_attention_sdpa_decode (the lean CPU forward's decode attention,
its per-step work in an SdpaDecodeStep) must equal paged_attention_sdpa bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from fleetserve.kernels.attention import (
    SdpaDecodeStep,
    paged_attention_ref,
    paged_attention_sdpa,
    paged_attention_sdpa_decode,
)

HEADS = [(4, 4, 32), (8, 2, 64), (9, 3, 64), (6, 2, 48)]  # MHA; GQA 4:1; SmolLM2's 3:1; odd head_dim
CASES = {
    "decode": ([1] * 4, [0, 17, 64, 150]),
    "decode1": ([1], [200]),
    "prefill1": ([37], [0]),
    "prefill": ([37, 5, 64], [0, 0, 0]),
    "chunked": ([20, 33], [40, 7]),
    "mixed": ([1, 19, 1, 0, 40, 1], [30, 0, 99, 12, 25, 3]),  # decodes, a zero-length chunk, prefills
}


def _check(kt, b, tol=1e-5, max_seq_len=None, **kw):
    ref = paged_attention_ref(*b.args(max_seq_len), **kw)
    out = paged_attention_sdpa(*b.args(max_seq_len), **kw)
    assert out.shape == ref.shape == (b.T, *b.q.shape[1:]) and out.dtype == b.q.dtype
    err = kt.rel_err(out, ref)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_matches_reference(kt, heads, case):
    b = kt.PagedBatch(*CASES[case], *heads, page=16, device="cpu", seed=len(case))
    _check(kt, b)


@pytest.mark.parametrize("case", ["decode", "mixed", "prefill1"])
@pytest.mark.parametrize("window", [1, 7, 32])
def test_sdpa_sliding_window(kt, case, window):
    b = kt.PagedBatch(*CASES[case], 9, 3, 64, page=16, device="cpu", seed=window)
    _check(kt, b, sliding_window=window)


def test_sdpa_softcap_takes_the_reference(kt):
    b = kt.PagedBatch(*CASES["mixed"], 8, 2, 32, page=16, device="cpu")
    _check(kt, b, tol=1e-7, sliding_window=16, softcap=20.0)


def test_sdpa_padding_sequences_and_loose_bound(kt):
    # a sequence with nothing scheduled and seq_len 0 (all-zero block table) among decodes,
    # and max_seq_len a loose upper bound of the contexts
    b = kt.PagedBatch([1, 0, 1, 0], [20, 0, 70, 5], 8, 2, 32, page=8, device="cpu", table_cols=32)
    b.seq_lens[1] = 0
    _check(kt, b)
    _check(kt, b, max_seq_len=256)
    d = kt.PagedBatch([1] * 3, [3, 90, 40], 8, 2, 32, page=8, device="cpu", table_cols=32)
    _check(kt, d, max_seq_len=256)


@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_sdpa_bf16(kt, case):
    b = kt.PagedBatch(*CASES[case], 9, 3, 64, page=16, dtype=torch.bfloat16, device="cpu")
    _check(kt, b, tol=1e-2)


@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 32), (8, 2, 48)])
@pytest.mark.parametrize("case", ["one-stream-consecutive", "one-stream-shuffled", "batch"])
@pytest.mark.parametrize("window", [None, 7])
def test_sdpa_decode_step_equals_sdpa_bitwise(kt, heads, case, window):
    Hq, Hkv, D = heads
    ctx = [150] if case.startswith("one") else [0, 17, 64, 150]
    b = kt.PagedBatch([1] * len(ctx), ctx, Hq, Hkv, D, page=16, device="cpu", seed=len(case), table_cols=12)
    if case == "one-stream-consecutive":  # as a fresh engine allocates them: a view of the cache, no copy
        b.block_tables[0] = torch.arange(2, 14, dtype=torch.int32)
    # q as the lean forward passes it: a strided head view of the fused qkv buffer
    buf = torch.randn(b.T, Hq + 2 * Hkv, D, generator=torch.Generator().manual_seed(3))
    q = buf[:, :Hq]
    args = (b.query_start_loc, b.seq_lens, b.block_tables, b.max_query_len, b.max_seq_len, b.scale)
    step = SdpaDecodeStep.decode_step(b.seq_lens, b.block_tables, b.max_seq_len, 16)
    assert isinstance(step.blocks, slice) == (case == "one-stream-consecutive")
    out = paged_attention_sdpa_decode(q, b.kv_cache, step, b.scale, window)
    assert torch.equal(out, paged_attention_sdpa(q.contiguous(), b.kv_cache, *args, sliding_window=window))
    ref = paged_attention_ref(q, b.kv_cache, *args, sliding_window=window)
    assert kt.rel_err(out, ref) < 1e-5
    assert torch.equal(paged_attention_sdpa_decode(q, b.kv_cache, step, b.scale, window), out)  # mask reused
