"""fused_moe_triton against fused_moe_ref; moe_align_block_size_triton equal to its reference,
whose invariants are checked directly.

CPU (interpreter) / any device: fp32 and fp16, small shapes over a grid of routing cases
(random, an expert without tokens, every token on one expert, top-k = number of experts),
default and forced-small tiles (several N tiles, a K loop with a ragged tail). GPU (`gpu`
marker): bf16 at Mixtral-8x7B / Qwen3-30B-A3B expert shapes, decode and prefill batch
sizes, and a CUDA-graph replay with routing that changes between replays.

Tolerances (relative Frobenius error vs the reference, which accumulates the K slots in
float32): fp32 1e-5; fp16 2e-3 and bf16 2e-2, since the kernel rounds each slot's weighted
output to the dtype before the sum, like Hugging Face's expert loop.
"""

from __future__ import annotations

import pytest
import torch

from fleetserve.kernels import get_ops
from fleetserve.kernels.moe import (
    fused_moe_ref,
    fused_moe_triton,
    moe_align_block_size_ref,
    moe_align_block_size_triton,
    moe_topk,
)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHAPES = [  # T, H, I, E, K
    (1, 32, 48, 4, 2),
    (7, 64, 32, 8, 2),
    (13, 48, 40, 6, 3),  # nothing a power of two
    (5, 32, 32, 4, 4),
]
ROUTINGS = ["random", "empty-expert", "all-on-one", "k-equals-e"]
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=2, num_stages=1)
# the tiles moe_launch_config picks for Mixtral-sized experts in decode (larger than every test shape here)
LARGE_TILES = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)


def routed(T, E, K, routing, gen):
    """(topk_weights float32 [T, K], topk_ids [T, K]) with distinct experts per token."""
    if routing == "k-equals-e":
        K = E
    scores = torch.rand(T, E, generator=gen)
    if routing == "empty-expert":
        scores[:, E // 2] = -1.0  # never among the top K < E
    if routing == "all-on-one":
        scores[:, 1] = 2.0  # every token's first choice
    weights, ids = moe_topk(scores * 4, K, renormalize=False)
    return weights, ids


def case(T, H, I, E, K, routing, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device, dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(device, dtype)
    weights, ids = routed(T, E, K, routing, g)
    return x, w13, w2, weights.to(device), ids.to(device)


def check(kt, args, dtype, config=None):
    ref = fused_moe_ref(*args)
    out = fused_moe_triton(*args, config=config)
    assert out.shape == ref.shape and out.dtype == dtype
    err = kt.rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"


def test_get_ops_has_fused_moe():
    assert get_ops("torch").fused_moe is fused_moe_ref
    assert get_ops("triton").fused_moe is fused_moe_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-H{}-I{}-E{}-K{}".format(*s))
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_fused_moe_matches_reference(kt, dtype, shape, routing, tiles):
    T, H, I, E, K = shape
    args = case(T, H, I, E, K, routing, dtype, kt.DEVICE, seed=hash((shape, routing)) % 1000)
    check(kt, args, dtype, SMALL_TILES if tiles == "small" else None)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-H{}-I{}-E{}-K{}".format(*s))
@pytest.mark.parametrize("routing", ROUTINGS)
def test_fused_moe_large_tiles_match_reference(kt, shape, routing):
    """Tiles wider and taller than the whole problem: every row, column and K step masked."""
    T, H, I, E, K = shape
    args = case(T, H, I, E, K, routing, torch.float32, kt.DEVICE, seed=hash((shape, routing, 1)) % 1000)
    check(kt, args, torch.float32, LARGE_TILES)


def test_launch_config_large_experts_in_decode():
    """Mixtral's experts at 256 decode tokens (64 rows each) take the tiles tuned on the H200."""
    from fleetserve.kernels.moe import moe_launch_config

    assert moe_launch_config(256 * 2, 8, 28672, 4096) == LARGE_TILES
    assert moe_launch_config(256 * 2, 8, 4096, 14336) == LARGE_TILES
    assert moe_launch_config(64 * 2, 8, 28672, 4096)["BLOCK_M"] == 32  # 16 rows each: unchanged
    assert moe_launch_config(256 * 8, 128, 1536, 2048)["BLOCK_M"] == 32  # Qwen3-30B-A3B: unchanged


def test_routing_cases_are_what_they_say():
    g = torch.Generator().manual_seed(0)
    _, ids = routed(9, 6, 2, "empty-expert", g)
    assert not (ids == 3).any()
    _, ids = routed(9, 6, 2, "all-on-one", g)
    assert (ids[:, 0] == 1).all()
    _, ids = routed(9, 6, 2, "k-equals-e", g)
    assert ids.shape == (9, 6) and (ids.sort(1).values == torch.arange(6)).all()


@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize(
    "T,E,K", [(1, 8, 2), (10, 4, 2), (33, 16, 4), (6, 3, 3), (70, 20, 3), (40, 128, 8), (300, 128, 8)]
)
def test_align_block_size(kt, T, E, K, block_m):
    g = torch.Generator().manual_seed(T * E + K)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[: T // 2, 0] = 0  # skew towards expert 0 (and, with E > T*K/2, leave experts empty)
    sorted_ids, expert_ids, num_padded = moe_align_block_size_ref(ids, E, block_m)
    got = moe_align_block_size_triton(ids.to(kt.DEVICE), E, block_m)  # T*K > 64: several count programs
    for a, b in zip(got, (sorted_ids, expert_ids, num_padded)):
        assert torch.equal(a.cpu(), b)
    n = T * K
    counts = torch.bincount(ids.flatten(), minlength=E)
    total = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert int(num_padded) == total and sorted_ids.numel() >= total and sorted_ids.numel() % block_m == 0
    used = sorted_ids[:total]
    real = used[used < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair exactly once
    assert (sorted_ids[total:] == n).all()
    flat = ids.flatten()
    for b in range(total // block_m):
        blk = sorted_ids[b * block_m : (b + 1) * block_m]
        blk = blk[blk < n].long()
        assert len(blk) > 0, "a block holds only padding"
        assert (flat[blk] == expert_ids[b]).all()
        assert (blk.diff() > 0).all()  # pairs of one expert keep their order
    assert (expert_ids[: total // block_m].diff() >= 0).all()


def test_empty_batch():
    x = torch.empty(0, 32)
    w13, w2 = torch.randn(4, 64, 32), torch.randn(4, 32, 32)
    ids, w = torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2)
    assert fused_moe_triton(x, w13, w2, w, ids).shape == (0, 32)
    assert fused_moe_ref(x, w13, w2, w, ids).shape == (0, 32)


def test_moe_topk_renormalizes():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w, ids = moe_topk(logits, 2, renormalize=False)
    p = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2]] and torch.allclose(w, p[:, [1, 2]])
    w, _ = moe_topk(logits, 2, renormalize=True)
    assert torch.allclose(w.sum(-1), torch.ones(1))


# ------------------------------------------------------------------------------------------ GPU
GPU_SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(GPU_SHAPES))
@pytest.mark.parametrize("T", [1, 64, 256, 1024])
def test_fused_moe_bf16_real_shapes(kt, model, T):
    H, I, E, K = GPU_SHAPES[model]
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g).cuda().bfloat16()
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
    w, ids = moe_topk(torch.randn(T, E, device="cuda"), K, renormalize=True)
    ref = fused_moe_ref(x.float(), w13.float(), w2.float(), w, ids)
    out = fused_moe_triton(x, w13, w2, w, ids)
    assert kt.rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_fused_moe_cuda_graph_replay_follows_routing(kt):
    H, I, E, K = 256, 128, 16, 4
    T = 32
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
    logits = torch.randn(T, E, device="cuda")
    w, ids = moe_topk(logits, K, renormalize=True)
    fused_moe_triton(x, w13, w2, w, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_triton(x, w13, w2, w, ids)
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        nw, nids = moe_topk(torch.randn(T, E, device="cuda", generator=g) * (seed + 1), K, renormalize=True)
        if seed == 2:
            nids[:] = torch.arange(K, device="cuda")  # everything on experts 0..K-1
        w.copy_(nw)
        ids.copy_(nids)
        x.normal_()
        graph.replay()
        ref = fused_moe_ref(x.float(), w13.float(), w2.float(), w, ids)
        assert kt.rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K", [(8192, 128, 8), (8192, 8, 2), (256, 128, 8), (1, 128, 8)])
@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_align_block_size_triton_equals_reference_at_serving_sizes(T, E, K, block_m):
    _, ids = moe_topk(torch.randn(T, E, device="cuda"), K, renormalize=False)
    got = moe_align_block_size_triton(ids, E, block_m)
    want = moe_align_block_size_ref(ids, E, block_m)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "E,N,K",
    [(8, 28672, 4096), (8, 4096, 14336), (128, 1536, 2048), (128, 2048, 768), (6, 80, 64), (60, 2816, 2048)],
)
def test_precompiled_variants_cover_every_token_count(E, N, K):
    """_precompile_variants compiles _launch_variants: every config any step can pick must be in it,
    or serving compiles mid-run."""
    from fleetserve.kernels.moe import _launch_variants, moe_launch_config

    variants = [tuple(sorted(c.items())) for c in _launch_variants(E, N, K)]
    for n in list(range(1, 4000)) + [2**p for p in range(12, 20)] + [65536 * 8 + 3]:
        assert tuple(sorted(moe_launch_config(n, E, N, K).items())) in variants, n
