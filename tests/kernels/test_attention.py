"""paged_attention_triton against paged_attention_ref.

CPU (interpreter) / any device: fp32 and fp16, small shapes, both paths, GQA,
splits, padding sequences, loose max_seq_len bounds, a cache past 2^31 elements, and
per-layer sliding windows and attention-logit soft-capping over a grid of windows,
caps, head shapes and batch kinds (the reference itself checked against the dense
definitions). GPU (`gpu` marker): bf16, Llama 1B/8B head shapes, long contexts,
batch 256, and CUDA-graph capture with upper-bound max_seq_len.

Tolerances (relative Frobenius error vs the float32 reference): fp32 1e-5 (the
interpreter's dot is exact; on GPU fp32 takes the IEEE dot), fp16 2e-3, bf16 1e-2
(p is rounded to the KV dtype before the PV dot, as in FlashAttention).
"""

from __future__ import annotations

import pytest
import torch

from fleetserve.kernels.attention import paged_attention_ref, paged_attention_triton

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
HEADS = [(4, 4, 32), (8, 2, 64), (6, 2, 48)]  # MHA; GQA 4:1; GQA 3:1 with a non-power-of-2 head_dim


def _check(kt, batch, tol, **kw):
    ref = paged_attention_ref(*batch.args())
    out = paged_attention_triton(*batch.args(kw.pop("max_seq_len", None)), **kw)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    err = kt.rel_err(out[: batch.T], ref)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode(kt, dtype, heads, num_splits):
    b = kt.PagedBatch(
        [1] * 4, [0, 17, 64, 150], *heads, page=16, dtype=dtype, seed=hash((heads, num_splits)) % 1000
    )
    _check(kt, b, TOL[dtype], num_splits=num_splits, block_n=32)


@pytest.mark.parametrize("page", [8, 32])
def test_decode_pages_and_loose_max_seq_len(kt, page):
    # graph capture passes max_model_len as max_seq_len: splits are then shares of each sequence's own length
    b = kt.PagedBatch([1] * 3, [3, 90, 40], 8, 2, 32, page=page, dtype=torch.float16, table_cols=1024 // page)
    _check(kt, b, TOL[torch.float16], max_seq_len=1024)


def test_decode_padding_sequences(kt):
    # CUDA-graph padding: sequences with no scheduled token, seq_len 0 and all-zero block tables
    b = kt.PagedBatch([1, 0, 1, 0], [20, 0, 70, 5], 8, 2, 32, dtype=torch.float16)
    b.seq_lens[1] = 0
    for splits in (1, 4):
        _check(kt, b, TOL[torch.float16], num_splits=splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("case", ["prefill", "chunked", "mixed"])
def test_prefill(kt, dtype, heads, case):
    q_lens, ctx_lens = {
        "prefill": ([37, 5, 64], [0, 0, 0]),
        "chunked": ([20, 33], [40, 7]),
        "mixed": ([1, 19, 1, 0, 40, 1], [30, 0, 99, 12, 25, 3]),  # decodes, a zero-length chunk, prefills
    }[case]
    b = kt.PagedBatch(q_lens, ctx_lens, *heads, page=16, dtype=dtype, seed=len(case))
    # block_m=32 gives several query blocks per sequence (exercises the block -> sequence search)
    _check(kt, b, TOL[dtype], block_m=32, block_n=16)


def test_prefill_single_sequence_default_blocks(kt):
    b = kt.PagedBatch([130], [70], 8, 2, 64, page=16, dtype=torch.float16)
    _check(kt, b, TOL[torch.float16])


def test_prefill_path_with_loose_bounds_and_out_buffer(kt):
    # max_query_len / max_seq_len as upper bounds (a padded or graphed mixed step) on a decode-only batch,
    # written into a caller's buffer whose padding rows (past query_start_loc[-1]) stay untouched
    b = kt.PagedBatch([1, 1, 1], [10, 0, 33], 8, 2, 32, dtype=torch.float16, table_cols=16)
    out = torch.full((b.T + 2, 8, 32), 7.0, dtype=b.q.dtype, device=b.q.device)
    q = torch.cat([b.q, torch.randn(2, 8, 32).to(b.q)])
    got = paged_attention_triton(
        q, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_tables, 8, 256, b.scale, out=out
    )
    assert got is out and bool((out[b.T :] == 7.0).all())
    assert kt.rel_err(out[: b.T], paged_attention_ref(*b.args())) < TOL[torch.float16]


def test_decode_split_heuristic():
    from fleetserve.kernels.attention import _decode_num_splits

    cuda_like = torch.device("cpu")  # the CPU stand-in counts 4 SMs: the grid should reach 2 x 4 programs
    assert _decode_num_splits(256, 8, 768, 64, cuda_like) == 1
    assert _decode_num_splits(1, 2, 4096, 64, cuda_like) == 4
    assert _decode_num_splits(1, 1, 100, 64, cuda_like) == 2  # never more splits than 64-token tiles
    assert _decode_num_splits(1, 1, 10**6, 64, cuda_like) == 8


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [9, 1, 30]])
def test_block_ids_past_int32_offsets(kt, q_lens):
    # cache of 2^31+ elements per K/V half; ids in use > 2^20, so id * block stride overflows int32
    b = kt.PagedBatch(q_lens, [40, 100, 16], 4, 2, 64, page=16, dtype=torch.float16, huge=True)
    in_use = b.block_tables[b.block_tables > 0]  # 0 is table padding
    assert int(in_use.min()) > 2**16
    assert int(in_use.min()) * b.kv_cache.stride(1) > 2**31
    _check(kt, b, TOL[torch.float16], num_splits=2 if b.max_query_len == 1 else None)


# ---------------------------------------------------------------- GPU, bf16, realistic shapes
LLAMA = {"1B": (32, 8, 64), "8B": (32, 8, 128)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(LLAMA))
@pytest.mark.parametrize("batch,max_ctx", [(1, 4000), (37, 3000), (256, 2048)])
def test_gpu_decode(kt, model, batch, max_ctx):
    g = torch.Generator().manual_seed(batch)
    ctx = torch.randint(1, max_ctx, (batch,), generator=g).tolist()
    ctx[0] = max_ctx - 1
    b = kt.PagedBatch([1] * batch, ctx, *LLAMA[model], page=16, dtype=torch.bfloat16, device="cuda")
    _check(kt, b, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(LLAMA))
@pytest.mark.parametrize("case", ["prefill", "chunked", "mixed"])
def test_gpu_prefill(kt, model, case):
    q_lens, ctx_lens = {
        "prefill": ([2048, 512, 77], [0, 0, 0]),
        "chunked": ([512, 1000], [1536, 24]),
        "mixed": ([1] * 40 + [300, 1, 700], list(range(100, 4100, 100)) + [0, 2500, 1200]),
    }[case]
    b = kt.PagedBatch(q_lens, ctx_lens, *LLAMA[model], page=16, dtype=torch.bfloat16, device="cuda")
    _check(kt, b, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("decode", [True, False])
def test_gpu_cuda_graph_replay(kt, decode):
    """Capture once with max_seq_len = a max_model_len bound, replay with new lengths and tables."""
    B, max_model_len = 64, 4096
    g = torch.Generator().manual_seed(1)

    def lengths():
        q = [1] * B if decode else torch.randint(1, 9, (B,), generator=g).tolist()
        return q, torch.randint(0, 3000, (B,), generator=g).tolist()

    q_lens, ctx = lengths()
    b = kt.PagedBatch(
        q_lens,
        ctx,
        32,
        8,
        128,
        dtype=torch.bfloat16,
        device="cuda",
        table_cols=max_model_len // 16,
        extra_blocks=B * 256,
    )
    T = 8 * B  # fixed token count of the graph; rows past query_start_loc[-1] are padding
    q = torch.randn(T, 32, 128, device="cuda", dtype=torch.bfloat16)
    qsl, sl, bt = b.query_start_loc.clone(), b.seq_lens.clone(), b.block_tables.clone()
    mq = 1 if decode else 8
    out = torch.empty_like(q)

    def step():
        paged_attention_triton(q, b.kv_cache, qsl, sl, bt, mq, max_model_len, b.scale, out=out)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(2):
        q_lens, ctx = lengths()
        nb = kt.PagedBatch(
            q_lens,
            ctx,
            32,
            8,
            128,
            dtype=torch.bfloat16,
            device="cuda",
            table_cols=max_model_len // 16,
            seed=seed + 10,
        )
        # same cache tensor: copy the new contents in, as a runner reuses its buffers
        b.kv_cache[:, : nb.kv_cache.shape[1]].copy_(nb.kv_cache)
        q[: nb.T].copy_(nb.q)
        qsl.copy_(nb.query_start_loc)
        sl.copy_(nb.seq_lens)
        bt.copy_(nb.block_tables)
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_attention_ref(*nb.args())
        assert kt.rel_err(out[: nb.T], ref) < TOL[torch.bfloat16]


def _compiled_variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if not caches:
        pytest.skip("this Triton keeps no per-device kernel cache to count")
    return sum(len(entry[0]) for entry in caches.values())


@pytest.mark.gpu
@pytest.mark.parametrize("decode", [True, False])
def test_gpu_batch_size_and_table_width_do_not_recompile(kt, decode):
    """The number of sequences and the block-table width change every engine step; Triton would
    compile a new variant whenever one of them becomes 1, a multiple of 16, or neither (a 0.9 s stall
    measured mid-benchmark). After the first launch, none of these changes compiles anything."""
    from fleetserve.kernels.attention import _decode_kernel, _prefill_kernel

    kernel = _decode_kernel if decode else _prefill_kernel
    seen = None
    for batch, cols in [(16, 32), (17, 33), (1, 2), (143, 47), (32, 48)]:
        q_lens = [1] * batch if decode else [3] * batch
        b = kt.PagedBatch(
            q_lens, [20] * batch, 32, 8, 64, page=16, dtype=torch.bfloat16, device="cuda", table_cols=cols
        )
        _check(kt, b, TOL[torch.bfloat16], num_splits=1 if decode else None)
        n = _compiled_variants(kernel)
        seen = n if seen is None else seen
        assert n == seen, f"batch {batch}, table width {cols}: {n} compiled variants (was {seen})"


# ---------------------------------------------------------------- sliding window and soft-capping
def _naive_attention(b, sliding_window=None, softcap=None):
    """Per token, dense math straight from the definitions (HF: key j visible to query i iff
    j <= i and j > i - window; scores capped as c * tanh(s / c)): the oracle of the reference."""
    page = b.kv_cache.shape[2]
    out = torch.zeros(b.T, *b.q.shape[1:], dtype=torch.float64)
    G = b.q.shape[1] // b.kv_cache.shape[3]
    t = 0
    for s, (ql, cl) in enumerate(zip(b.q_lens, b.ctx_lens)):
        n = ql + cl
        slots = [int(b.block_tables[s, p // page]) * page + p % page for p in range(n)]
        keys = b.kv_cache[0].reshape(-1, *b.kv_cache.shape[3:])[slots].double().cpu()
        vals = b.kv_cache[1].reshape(-1, *b.kv_cache.shape[3:])[slots].double().cpu()
        for i in range(ql):
            qpos = cl + i
            vis = [j for j in range(n) if j <= qpos and (not sliding_window or j > qpos - sliding_window)]
            qi = b.q[t + i].double().cpu()
            for h in range(qi.shape[0]):
                sc = keys[vis, h // G] @ qi[h] * b.scale
                if softcap:
                    sc = torch.tanh(sc / softcap) * softcap
                out[t + i, h] = torch.softmax(sc, 0) @ vals[vis, h // G]
        t += ql
    return out


@pytest.mark.parametrize("window,softcap", [(5, None), (1, None), (16, 20.0), (None, 3.0), (40, 50.0)])
def test_reference_window_and_softcap_follow_the_definitions(kt, window, softcap):
    b = kt.PagedBatch([1, 9, 3], [30, 0, 14], 4, 2, 16, page=4, seed=3)
    b.q.mul_(3.0)  # large scores, so the cap matters
    ref = paged_attention_ref(*b.args(), sliding_window=window, softcap=softcap)
    assert kt.rel_err(ref, _naive_attention(b, window, softcap)) < 1e-6
    plain = paged_attention_ref(*b.args())
    assert kt.rel_err(ref, plain) > 1e-3  # the option changed something: this case exercises it


WINDOW_CASES = {
    # id: (q_lens, ctx_lens) -- decodes before/inside/past the window, prefills longer than it,
    # chunks whose context the window has partly left, and a zero-length chunk
    "decode": ([1] * 5, [0, 6, 40, 100, 170]),
    "prefill": ([37, 5, 70], [0, 0, 0]),
    "chunked": ([20, 33, 8], [45, 7, 130]),
    "mixed": ([1, 19, 1, 0, 40, 1], [30, 0, 99, 12, 25, 3]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(WINDOW_CASES))
@pytest.mark.parametrize("window,softcap", [(7, None), (32, None), (50, 30.0), (None, 5.0)])
@pytest.mark.parametrize("heads", [(4, 4, 32), (6, 2, 48)])
def test_sliding_window_and_softcap_kernels(kt, dtype, case, window, softcap, heads):
    q_lens, ctx_lens = WINDOW_CASES[case]
    b = kt.PagedBatch(q_lens, ctx_lens, *heads, page=8, dtype=dtype, seed=len(case) + (window or 0))
    b.q.mul_(2.0)
    kw = dict(sliding_window=window, softcap=softcap)
    ref = paged_attention_ref(*b.args(), **kw)
    # small tiles: several tiles per window, window edges inside tiles, several query blocks
    launch = dict(block_n=16, num_splits=3) if case == "decode" else dict(block_m=16, block_n=16)
    out = paged_attention_triton(*b.args(), **kw, **launch)
    err = kt.rel_err(out[: b.T], ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_sliding_window_decode_splits_and_loose_bound(kt, num_splits):
    # graph capture passes max_model_len as max_seq_len; splits share only the window's tiles
    b = kt.PagedBatch([1] * 4, [3, 64, 200, 31], 8, 2, 32, page=16, dtype=torch.float16, table_cols=32)
    kw = dict(sliding_window=24, softcap=None)
    out = paged_attention_triton(*b.args(512), **kw, num_splits=num_splits)
    assert kt.rel_err(out[: b.T], paged_attention_ref(*b.args(), **kw)) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["decode", "prefill"])
def test_gpu_sliding_window_softcap_bf16(kt, case):
    q_lens, ctx = ([1] * 64, list(range(100, 6500, 100))) if case == "decode" else ([2048, 300], [0, 3000])
    b = kt.PagedBatch(
        q_lens, ctx, 16, 8, 256, page=16, dtype=torch.bfloat16, device="cuda"
    )  # Gemma 2 9B heads
    kw = dict(sliding_window=4096 if case == "decode" else 1024, softcap=50.0)
    out = paged_attention_triton(*b.args(), **kw)
    assert kt.rel_err(out[: b.T], paged_attention_ref(*b.args(), **kw)) < TOL[torch.bfloat16]
