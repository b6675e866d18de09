"""Fused mixture-of-experts MLP: routed tokens through their experts' gated MLPs.

Contract (both implementations): `fused_moe(x[T, H], w13[E, 2I, H], w2[E, H, I],
topk_weights[T, K], topk_ids[T, K]) -> [T, H]` in x's dtype, where expert e's MLP is
down(silu(gate(x)) * up(x)) with w13[e] = [gate | up] rows (Hugging Face's stacked
`experts.gate_up_proj` layout) and w2[e] = down; token t's output is
sum_k topk_weights[t, k] * MLP_{topk_ids[t, k]}(x[t]). Routing (softmax, top-k,
renormalisation) is the model's business: `moe_topk` below does the common kind.

Owns the torch reference (`fused_moe_ref`: a loop over the experts that got tokens,
the CPU path and the tests' oracle) and the Triton implementation (`fused_moe_triton`):
1. `moe_align_block_size_triton` (reference: `moe_align_block_size_ref`) sorts the T*K (token, slot) pairs by expert and pads each
   expert's run to a multiple of BLOCK_M with a sentinel pair id (T*K), so every
   BLOCK_M-row block of the sorted list belongs to one expert (`expert_ids[block]`);
2. a grouped GEMM (`_fused_moe_kernel`) over those blocks computes x[pair // K] @ w13[e].T
   into a [T*K, 2I] buffer (rows gathered on load, scattered on store);
3. silu_and_mul to [T*K, I];
4. the same grouped GEMM with w2, each row scaled by its pair's routing weight in the
   float32 accumulator, into [T*K, H]; summing the K slots gives [T, H].
An expert without tokens owns no block and its weights are never read.

CUDA graphs: no host syncs. The number of padded rows is data dependent, so the grid
covers the worst case (T*K + E*(BLOCK_M-1) rows, fewer when T*K < E) and programs
past the real total (read on the device) return at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import cdiv, jit, next_pow2, tl


def moe_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing as in Hugging Face's Mixtral / Qwen-MoE routers: float32 softmax over the
    experts, the top_k largest probabilities (torch.topk's order and tie-breaking), optionally
    renormalised to sum to 1. Returns (float32 weights [T, K], int64 expert ids [T, K])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights / topk_ids [T, K] -> [T, H] in x's dtype.

    Per expert that got tokens: gather its rows, gated MLP in x's dtype (like HF's expert loop),
    weight each row in float32 and accumulate in float32. Syncs with the host (which experts).
    """
    T, H = x.shape
    E = w13.shape[0]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    ids = topk_ids.long()
    hit = torch.zeros(E, dtype=torch.bool, device=x.device)
    hit[ids.reshape(-1)] = True
    for e in hit.nonzero().flatten().tolist():
        tok, slot = torch.where(ids == e)
        gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)


def moe_align_block_size_ref(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flattened (token, slot) pairs by expert, each expert's run padded to block_m rows.

    Returns (sorted_ids [R] int32: pair ids, T*K where padding; expert_ids [R // block_m] int32:
    the expert of each block; num_padded [1] int32: rows in use), R the worst-case row count.
    Pairs of one expert keep their original order (a stable sort). No host syncs.
    """
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    rows = _max_padded_rows(n, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.sort(flat, stable=True).indices
    e_sorted = flat[order]
    dest = pad_start[e_sorted] + torch.arange(n, device=dev) - cnt_start[e_sorted]
    sorted_ids = torch.full((rows,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, rows, block_m, device=dev)
    # blocks past the last expert's run get num_experts - 1; the kernel skips them (num_padded)
    expert_ids = (
        torch.searchsorted(pad_end, block_start, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    )
    return sorted_ids, expert_ids, pad_end[-1:].to(torch.int32)


_ALIGN_CHUNK = 64  # pairs per program of the alignment kernels (a [chunk, experts] one-hot in registers)


@jit(do_not_specialize=("n",))
def _align_count_kernel(ids_ptr, table_ptr, n, E: tl.constexpr, EP: tl.constexpr, CHUNK: tl.constexpr):
    """table[pid, e] = how many of this program's CHUNK pairs go to expert e."""
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    bins = tl.arange(0, EP)
    onehot = ((e[:, None] == bins[None, :]) & mask[:, None]).to(tl.int32)
    tl.store(table_ptr + pid * EP + bins, tl.sum(onehot, axis=0))


@jit(do_not_specialize=("num_programs", "num_blocks"))
def _align_offsets_kernel(
    table_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_programs,
    num_blocks,
    E: tl.constexpr,
    EP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PB: tl.constexpr,
):
    """One program: per-expert totals, padded run starts, each count-program's first row per expert
    (written back over its counts), the expert of every BLOCK_M block and the padded total."""
    bins = tl.arange(0, EP)
    counts = tl.zeros([EP], dtype=tl.int32)
    for p0 in range(0, num_programs, PB):
        rows = p0 + tl.arange(0, PB)
        t = tl.load(
            table_ptr + rows[:, None] * EP + bins[None, :], mask=rows[:, None] < num_programs, other=0
        )
        counts += tl.sum(t, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    running = pad_end - padded  # where each expert's run starts
    for p0 in range(0, num_programs, PB):
        rows = p0 + tl.arange(0, PB)
        m = rows[:, None] < num_programs
        ptrs = table_ptr + rows[:, None] * EP + bins[None, :]
        t = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, running[None, :] + tl.cumsum(t, axis=0) - t, mask=m)  # exclusive over programs
        running += tl.sum(t, axis=0)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    for b0 in range(0, num_blocks, PB):
        blk = b0 + tl.arange(0, PB)
        # the expert of block b: how many runs end at or before its first row (past the last run: E - 1)
        ended = (pad_end[None, :] <= (blk * BLOCK_M)[:, None]) & (bins[None, :] < E)
        expert = tl.minimum(tl.sum(ended.to(tl.int32), axis=1), E - 1)
        tl.store(expert_ids_ptr + blk, expert, mask=blk < num_blocks)


@jit(do_not_specialize=("n",))
def _align_scatter_kernel(ids_ptr, table_ptr, sorted_ids_ptr, n, EP: tl.constexpr, CHUNK: tl.constexpr):
    """Each pair to its row: its expert's first row for this program + its rank among this
    program's pairs of that expert (programs and pairs in order: a stable sort)."""
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    bins = tl.arange(0, EP)
    onehot = ((e[:, None] == bins[None, :]) & mask[:, None]).to(tl.int32)
    base = tl.load(table_ptr + pid * EP + bins)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    dest = tl.sum(onehot * base[None, :], axis=1) + rank
    tl.store(sorted_ids_ptr + dest, offs.to(tl.int32), mask=mask)


def moe_align_block_size_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract and result as `moe_align_block_size_ref`, in four launches (the reference
    takes ~25 small torch ops, a visible cost per MoE layer in a decode step)."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    rows = _max_padded_rows(n, num_experts, block_m)
    EP = max(16, next_pow2(num_experts))
    programs = max(1, cdiv(n, _ALIGN_CHUNK))
    table = torch.empty(programs, EP, dtype=torch.int32, device=dev)
    sorted_ids = torch.full((rows,), n, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(rows // block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    _align_count_kernel[(programs,)](flat, table, n, E=num_experts, EP=EP, CHUNK=_ALIGN_CHUNK, num_warps=4)
    _align_offsets_kernel[(1,)](
        table,
        expert_ids,
        num_padded,
        programs,
        rows // block_m,
        E=num_experts,
        EP=EP,
        BLOCK_M=block_m,
        PB=max(1, min(64, 4096 // EP)),
        num_warps=4,
    )
    _align_scatter_kernel[(programs,)](flat, table, sorted_ids, n, EP=EP, CHUNK=_ALIGN_CHUNK, num_warps=4)
    return sorted_ids, expert_ids, num_padded


def _max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    # every non-empty expert adds at most block_m - 1 padding rows; at most num_pairs experts are non-empty
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return cdiv(max(rows, 1), block_m) * block_m


@jit(do_not_specialize=("num_valid", "EM"))
def _fused_moe_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    w_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    N,
    K,
    EM,
    num_valid,
    stride_am,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    A_DIV: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """C[pair, :] = (A[pair // A_DIV, :] @ B[e].T) (* w[pair]) for the BLOCK_M pairs of one block."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M consecutive row blocks (mostly one or a few experts) sweep the N tiles
    # together, so an expert's weight tile read by several of its blocks is served from L2
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    mask_m = pair < num_valid
    row = (pair // A_DIV).to(tl.int64)
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = offs_k < K - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(w_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def moe_launch_config(num_pairs: int, num_experts: int, N: int, K: int) -> dict:
    """Tile sizes for one grouped GEMM: BLOCK_M from the mean rows per expert (decode batches put
    few rows on each expert: a small BLOCK_M wastes less of the tensor core than padding to 64,
    and an expert's rows should mostly fit one block so its weights stream from DRAM once)."""
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 8:
        bm = 16
    elif per_expert <= 24:
        bm = 32
    elif per_expert <= 96:
        bm = 64
    else:
        bm = 128
    bn = 128 if N >= 128 else max(16, next_pow2(N))
    # few tokens hit few experts: narrower N tiles give the GPU enough programs (~2 waves of 132 SMs)
    if bn == 128 and min(num_experts, max(num_pairs, 1)) * cdiv(N, 128) < 264:
        bn = 64
    bk = 64 if K >= 64 else max(16, next_pow2(K))
    if bm == 64 and per_expert > 48 and N >= 4096 and K >= 4096:
        # large experts (Mixtral's 4096 x 14336) at 49-96 rows each, i.e. decode at batch 196-384: 128 x 256
        # tiles with 8 warps took 780 us for the whole fused call at 256 tokens against 876 us for the 64 x 128
        # tiles below (benchmarks/moe_bench.py --sweep on one H200, 2026-12-02: 0.86 vs 0.76 of its roofline)
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if bm >= 128:
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk if bm > 16 else min(bk * 2, max(16, next_pow2(K))),
        GROUP_M=8 if bm >= 64 else 16,
        num_warps=4,
        num_stages=4,
    )


def _grouped_gemm(a, b, out, weights, sorted_ids, expert_ids, num_padded, a_div, cfg):
    N, K = b.shape[1], b.shape[2]
    EM = sorted_ids.shape[0]
    grid = (cdiv(EM, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    _fused_moe_kernel[grid](
        a,
        b,
        out,
        weights if weights is not None else a,
        sorted_ids,
        expert_ids,
        num_padded,
        N,
        K,
        EM,
        out.shape[0],
        a.stride(0),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        out.stride(0),
        A_DIV=a_div,
        MUL_WEIGHT=weights is not None,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        IEEE=a.dtype == torch.float32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


# (device, dtype, E, 2I, H, top_k) of the expert shapes whose launch-config variants are compiled
_PRECOMPILED: set = set()


def _launch_variants(num_experts: int, N: int, K: int) -> list[dict]:
    """Every distinct moe_launch_config of a GEMM shape, over all token counts: the config is a step
    function of the pair count that is constant past 96 rows per expert (and past 264 pairs for N)."""
    seen: dict[tuple[tuple[str, int], ...], dict[str, int]] = {}
    for n in range(1, 96 * num_experts + 266):
        cfg = moe_launch_config(n, num_experts, N, K)
        seen.setdefault(tuple(sorted(cfg.items())), cfg)
    return list(seen.values())


def _precompile_variants(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> None:
    """Compile the alignment and both GEMMs' kernels for every launch config on first use of an expert shape.

    The config follows the step's token count, so serving would otherwise first meet some variant
    mid-run and stall that step for the compile (~1 s measured for the attention kernels). Each
    GEMM launch is one program over an empty block list (num_padded = 0): it returns at once.
    """
    E, two_i, H = w13.shape
    key = (str(x.device), x.dtype, E, two_i, H, top_k)
    if key in _PRECOMPILED:
        return
    _PRECOMPILED.add(key)
    dev = x.device
    none = torch.zeros(1, dtype=torch.int32, device=dev)
    ids = torch.arange(top_k, device=dev).view(1, top_k) % E
    act = torch.empty(1, two_i // 2, dtype=x.dtype, device=dev)
    gemms = ((x, w13, None, top_k, two_i), (act, w2, torch.ones(1, dtype=torch.float32, device=dev), 1, H))
    block_ms = set()
    for a, b, w, a_div, n_out in gemms:
        for cfg in _launch_variants(E, b.shape[1], b.shape[2]):
            block_ms.add(cfg["BLOCK_M"])
            out = torch.empty(1, n_out, dtype=x.dtype, device=dev)
            _grouped_gemm(
                a,
                b,
                out,
                w,
                torch.zeros(cfg["BLOCK_M"], dtype=torch.int32, device=dev),
                none,
                none,
                a_div,
                cfg,
            )
    for bm in sorted(block_ms):
        moe_align_block_size_triton(ids, E, bm)


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Same contract as `fused_moe_ref`. `config` overrides the launch parameters of both GEMMs
    (keys of `moe_launch_config`: tests, tuning)."""
    from .activation import silu_and_mul_triton

    T, H = x.shape
    E, two_i, _ = w13.shape
    K = topk_ids.shape[1]
    if T == 0:
        return torch.empty_like(x)
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("fused_moe_triton needs x, w13 and w2 contiguous in their last dimension")
    n = T * K
    if config is None:
        _precompile_variants(x, w13, w2, K)
    cfg1 = config or moe_launch_config(n, E, two_i, H)
    cfg2 = config or moe_launch_config(n, E, H, two_i // 2)
    # one alignment serves both GEMMs when they agree on BLOCK_M (always, unless overridden differently)
    sorted_ids, expert_ids, num_padded = moe_align_block_size_triton(topk_ids, E, cfg1["BLOCK_M"])
    gate_up = torch.empty(n, two_i, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, None, sorted_ids, expert_ids, num_padded, K, cfg1)
    act = silu_and_mul_triton(gate_up)
    if cfg2["BLOCK_M"] != cfg1["BLOCK_M"]:
        sorted_ids, expert_ids, num_padded = moe_align_block_size_triton(topk_ids, E, cfg2["BLOCK_M"])
    down = torch.empty(n, H, dtype=x.dtype, device=x.device)
    w = topk_weights.reshape(-1)
    if w.dtype != torch.float32:
        w = w.float()
    _grouped_gemm(act, w2, down, w.contiguous(), sorted_ids, expert_ids, num_padded, 1, cfg2)
    return down.view(T, K, H).sum(dim=1)
