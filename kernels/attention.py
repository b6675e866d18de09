"""Causal attention of a batch of variable-length query chunks over the paged KV cache.

One call serves prefill, chunked prefill and decode: sequence b contributes
q_len_b = query_start_loc[b+1] - query_start_loc[b] new tokens (already written
into the cache) at positions seq_lens[b] - q_len_b .. seq_lens[b] - 1, and
attends causally to all of its seq_lens[b] cached tokens, found through
block_tables[b]. Grouped-query attention: query head h reads KV head
h // (Hq // Hkv).

Per-layer options (Python numbers, fixed per layer, so CUDA graphs keep them):
- `sliding_window` W: a query at position p sees keys at positions > p - W only
  (Hugging Face's `kv_idx > q_idx - sliding_window`); None = full causal attention.
- `softcap` c: scores s = scale * q.k become c * tanh(s / c) before the softmax
  (Gemma 2's attention-logit soft-capping); None = no capping.

Owns the torch reference (`paged_attention_ref`, the CPU path and the tests' oracle), its SDPA
forms for the CPU (`paged_attention_sdpa`; for decode steps of the lean CPU forward,
`SdpaDecodeStep` once per step + `paged_attention_sdpa_decode` per layer) and the Triton kernels
behind `paged_attention_triton`:
- decode (max_query_len == 1): flash-decoding. One program per (sequence, KV head,
  split) loads each KV tile once for all G query heads of its group (G rows padded
  to 16 for tl.dot); with few programs for the GPU, each sequence's context is cut
  into `num_splits` equal parts whose partial softmax states a second kernel merges.
- prefill / chunked prefill / mixed batches: one program per (query block, KV head);
  its rows are BLOCK_Q tokens x G heads, so here too a KV tile is loaded once per
  group. Tiles wholly before the block's first query position (and, with a
  window, wholly inside every row's window) skip the masks.
With a sliding window, both kernels start at the first tile any of their rows can
see, so a layer's work and KV reads are bounded by the window, not the context.
Both read K/V straight from the paged cache through the block tables.

CUDA graphs: no host syncs; grids depend only on shapes and the Python ints
max_query_len / max_seq_len (upper bounds are fine); everything else is read on
the device. Output rows of tokens past query_start_loc[-1] are left unwritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_attention
from ._triton import cdiv, jit, next_pow2, num_sms, tl


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D]; kv_cache: [2, N, block_size, Hkv, D]; query_start_loc: [B+1];
    seq_lens: [B]; block_tables: [B, max_blocks] -> out [T, Hq, D] in q's dtype.
    sliding_window / softcap: see the module docstring.

    Vectorised over the batch (pads to the longest query and context); float32 math.
    """
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    _, _, bs, Hkv, _ = kv_cache.shape
    G = Hq // Hkv
    dev = q.device
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    seq_lens = seq_lens.long()
    ctx_lens = seq_lens - q_lens
    nblk = (max_seq_len + bs - 1) // bs
    bt = block_tables[:, :nblk].long()
    keys = kv_cache[0][bt].reshape(B, nblk * bs, Hkv, D)[:, :max_seq_len].float()
    vals = kv_cache[1][bt].reshape(B, nblk * bs, Hkv, D)[:, :max_seq_len].float()

    ar_q = torch.arange(max_query_len, device=dev)
    qmask = ar_q[None, :] < q_lens[:, None]  # [B, Mq]
    tok = (qsl[:-1, None] + ar_q[None, :]).clamp(max=max(T - 1, 0))
    qq = q[tok].float().view(B, max_query_len, Hkv, G, D)

    qpos = ctx_lens[:, None] + ar_q[None, :]  # [B, Mq]
    kpos = torch.arange(max_seq_len, device=dev)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < seq_lens[:, None, None])
    mask &= qmask[:, :, None]
    if sliding_window:
        mask &= kpos[None, None, :] > qpos[:, :, None] - sliding_window

    scores = torch.einsum("bqhgd,bkhd->bhgqk", qq, keys) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, vals).reshape(B, max_query_len, Hq, D)
    return out[qmask].to(q.dtype)


def paged_attention_sdpa(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same contract as `paged_attention_ref`, through torch's fused
    `scaled_dot_product_attention` (the CPU engine's fast path; tests compare it to the reference).

    Each sequence's K/V are gathered from the cache with one index_select per step, not copied
    per KV head: the G query heads of a group are folded into SDPA's query-length axis
    ([B, Hkv, Mq*G, D] against [B, Hkv, S, D]), so nothing repeats K/V for grouped-query attention.
    Soft-capped scores (Gemma 2) have no SDPA form: they take the reference.
    """
    if softcap:
        return paged_attention_ref(
            q, kv_cache, query_start_loc, seq_lens, block_tables, max_query_len, max_seq_len, scale,
            sliding_window, softcap,
        )  # fmt: skip
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    if cpu_attention.usable(q, kv_cache):
        if max_query_len == 1 and T == B:
            # decode on the CPU: K/V read in place (kernels/cpu_attention.c), no gathered copy
            out = cpu_attention.paged_decode(q, kv_cache, block_tables, seq_lens, scale, sliding_window)
            return out if out.dtype == q.dtype else out.to(q.dtype)
        if B > 1:
            qlen = query_start_loc[1:] - query_start_loc[:-1]
            one = qlen == 1
            if bool(one.any()):
                return _split_single_queries(
                    q, kv_cache, query_start_loc, seq_lens, block_tables, max_query_len, scale, sliding_window,
                    qlen, one,
                )  # fmt: skip
    _, _, bs, Hkv, _ = kv_cache.shape
    G = Hq // Hkv
    dev = q.device
    nblk = (max_seq_len + bs - 1) // bs
    ids = block_tables[:, :nblk].reshape(-1)
    # [2, B*nblk, bs, Hkv, D] -> K, V as [B, Hkv, S, D] (strided views of one gathered copy)
    kv = kv_cache.index_select(1, ids).view(2, B, nblk * bs, Hkv, D)[:, :, :max_seq_len]
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
    kpos = torch.arange(max_seq_len, device=dev)
    seq_lens = seq_lens.long()
    if max_query_len == 1 and T == B:
        # decode: every sequence has its one query at seq_len - 1
        qq = q.view(B, Hkv, G, D).to(kv.dtype)
        full = B == 1 and not sliding_window and dev.type == "cpu" and int(seq_lens[0]) == max_seq_len
        mask = None
        if not full:  # (one stream sees all S keys: no mask; SDPA converts a mask at some cost)
            mask = kpos[None, :] < seq_lens[:, None]  # [B, S]
            if sliding_window:
                mask &= kpos[None, :] > seq_lens[:, None] - 1 - sliding_window
            mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=scale)
        return out.reshape(T, Hq, D).to(q.dtype)
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    ctx_lens = seq_lens - q_lens
    Mq = max_query_len
    ar_q = torch.arange(Mq, device=dev)
    qmask = ar_q[None, :] < q_lens[:, None]  # [B, Mq]
    if B == 1:
        qq = q[:Mq]
    else:
        qq = q[(qsl[:-1, None] + ar_q[None, :]).clamp(max=max(T - 1, 0))]  # [B, Mq, Hq, D] padded
    # [B, Mq, Hkv, G, D] -> [B, Hkv, Mq*G, D]: row m*G + g is query token m, head g of the group
    qq = qq.reshape(B, Mq, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Mq * G, D).to(kv.dtype)
    qpos = ctx_lens[:, None] + ar_q[None, :]  # [B, Mq]
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < seq_lens[:, None, None])
    if sliding_window:
        mask &= kpos[None, None, :] > qpos[:, :, None] - sliding_window
    # padding query rows see key 0, so no row is all -inf (their outputs are dropped below)
    mask[:, :, 0] |= ~qmask
    mask = mask.repeat_interleave(G, dim=1)[:, None]  # [B, 1, Mq*G, S]
    out = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=scale)
    out = out.view(B, Hkv, Mq, G, D).permute(0, 2, 1, 3, 4).reshape(B, Mq, Hq, D)
    out = out[0] if B == 1 else out[qmask]
    return out.to(q.dtype)


def _split_single_queries(
    q, kv_cache, query_start_loc, seq_lens, block_tables, max_query_len, scale, sliding_window, qlen, one
) -> torch.Tensor:
    """A mixed step on the CPU: its one-query sequences (decodes) through the C decode kernel, as in a
    pure decode step, the others through SDPA: a decode token's attention does not depend on whether
    a prefill shared its step (the engine batches differently from run to run)."""
    rows = query_start_loc[:-1].long()[one]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    out[rows] = cpu_attention.paged_decode(
        q[rows], kv_cache, block_tables[one], seq_lens[one], scale, sliding_window
    )
    many = qlen > 1  # (sequences with nothing scheduled have no tokens)
    if not bool(many.any()):
        return out if out.dtype == q.dtype else out.to(q.dtype)
    tokens = torch.repeat_interleave(many, qlen.long())
    lens = qlen[many]
    qsl = torch.zeros(lens.shape[0] + 1, dtype=query_start_loc.dtype, device=q.device)
    torch.cumsum(lens, 0, out=qsl[1:])
    sl = seq_lens[many]
    out[tokens] = paged_attention_sdpa(
        q[tokens], kv_cache, qsl, sl, block_tables[many], max_query_len, int(sl.max()), scale, sliding_window
    ).float()
    return out if out.dtype == q.dtype else out.to(q.dtype)


@dataclass
class SdpaDecodeStep:
    """What `paged_attention_sdpa` derives from a decode step's metadata (every sequence has one
    query token), derived once per step for all layers: which cache blocks hold the sequences'
    K/V, and the key masks per sliding window. Build it with `decode_step`."""

    num_seqs: int
    max_seq_len: int
    num_blocks: int
    """Blocks per sequence read (ceil(max_seq_len / block_size))."""
    blocks: slice | torch.Tensor
    """One stream whose blocks are consecutive: their range (attention reads a view of the cache,
    no copy); otherwise the block ids of all sequences, [B * num_blocks] (one index_select per layer)."""
    seq_lens: torch.Tensor
    """[B] int64."""
    block_tables: torch.Tensor | None = None
    """[B, num_blocks] int32, contiguous, where the C decode kernel reads the cache in place
    (kernels/cpu_attention.py); None otherwise."""
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @classmethod
    def decode_step(
        cls, seq_lens: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int, block_size: int
    ) -> SdpaDecodeStep:
        B = seq_lens.shape[0]
        nblk = (max_seq_len + block_size - 1) // block_size
        ids = block_tables[:, :nblk]
        blocks: slice | torch.Tensor = ids.reshape(-1)
        if B == 1 and ids.device.type == "cpu":  # a host tensor: reading it costs no sync
            first = int(ids[0, 0])
            if nblk == 1 or torch.equal(ids[0], torch.arange(first, first + nblk, dtype=ids.dtype)):
                blocks = slice(first, first + nblk)
        tables = None
        if ids.device.type == "cpu" and cpu_attention.available():
            tables = ids.to(torch.int32).contiguous()
        return cls(B, max_seq_len, nblk, blocks, seq_lens.long().contiguous(), tables)

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """The [B, 1, 1, S] key mask of `paged_attention_sdpa`'s decode path (None: one stream that
        sees all S keys)."""
        if sliding_window in self._masks:
            return self._masks[sliding_window]
        seq_lens, S = self.seq_lens, self.max_seq_len
        mask = None
        if not (self.num_seqs == 1 and not sliding_window and int(seq_lens[0]) == S):
            kpos = torch.arange(S, device=seq_lens.device)
            mask = kpos[None, :] < seq_lens[:, None]
            if sliding_window:
                mask &= kpos[None, :] > seq_lens[:, None] - 1 - sliding_window
            mask = mask[:, None, None, :]
        self._masks[sliding_window] = mask
        return mask


def paged_attention_sdpa_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    step: SdpaDecodeStep,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`paged_attention_sdpa` of a decode step (q [B, Hq, D], one token per sequence; no soft-cap)
    with the per-step work in `step`; the same SDPA call on the same values. One stream on
    consecutive blocks reads K/V as a view of the cache instead of a gathered copy (at context
    1,000 the copy is 1.5 MB per layer for SmolLM2)."""
    if step.block_tables is not None and cpu_attention.usable(q, kv_cache):
        # K/V read in place (kernels/cpu_attention.c): the same kernel as paged_attention_sdpa's decode
        out = cpu_attention.paged_decode(q, kv_cache, step.block_tables, step.seq_lens, scale, sliding_window)
        return out if out.dtype == q.dtype else out.to(q.dtype)
    T, Hq, D = q.shape
    _, _, bs, Hkv, _ = kv_cache.shape
    B, S, nblk = step.num_seqs, step.max_seq_len, step.num_blocks
    blocks = step.blocks
    if isinstance(blocks, slice) and kv_cache.is_contiguous():
        # K and V [1, Hkv, S, D] straight from the cache (tokens of consecutive blocks are evenly
        # strided): two views in two ops, where slicing, selecting and transposing take eight
        s_kv, s_blk, s_tok, s_head = kv_cache.stride()[:4]
        base = kv_cache.storage_offset() + blocks.start * s_blk
        size, stride = (1, Hkv, S, D), (S * s_tok, s_head, s_tok, 1)
        k = kv_cache.as_strided(size, stride, base)
        v = kv_cache.as_strided(size, stride, base + s_kv)
    else:
        kv = kv_cache[:, blocks] if isinstance(blocks, slice) else kv_cache.index_select(1, blocks)
        kv = kv.view(2, B, nblk * bs, Hkv, D)[:, :, :S]
        k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
    qq = q.view(B, Hkv, Hq // Hkv, D)
    if qq.dtype != kv_cache.dtype:
        qq = qq.to(kv_cache.dtype)
    out = F.scaled_dot_product_attention(qq, k, v, attn_mask=step.mask(sliding_window), scale=scale)
    out = out.reshape(T, Hq, D)
    return out if out.dtype == q.dtype else out.to(q.dtype)


_LOG2E = 1.4426950408889634


@jit
def _kv_offsets(bt_row_ptr, offs_n, mask_n, kvh, stride_blk, stride_pos, stride_kvh, PAGE: tl.constexpr):
    """Element offsets of tokens offs_n of one sequence (through its block-table row) for KV head kvh."""
    if mask_n is None:
        blk = tl.load(bt_row_ptr + offs_n // PAGE)
    else:
        blk = tl.load(bt_row_ptr + offs_n // PAGE, mask=mask_n, other=0)
    blk = blk.to(tl.int64)  # int64: block id * block stride passes 2^31 in caches of a few GB
    return blk * stride_blk + (offs_n % PAGE) * stride_pos + kvh * stride_kvh


@jit
def _tanh(x):
    # tanh from exp2 (the interpreter and every backend have it); saturates to +-1 without NaN
    e = tl.exp2(x * (2.0 * 1.4426950408889634))
    return 1.0 - 2.0 / (e + 1.0)


@jit
def _attend(
    acc,
    m_i,
    l_i,
    q,
    k_ptr,
    v_ptr,
    bt_row_ptr,
    kvh,
    qpos,
    start,
    end,
    qk_scale,
    win_lo,
    window,
    cap_in,
    cap_out,
    stride_blk,
    stride_pos,
    stride_kvh,
    offs_d,
    mask_d,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    EVEN_D: tl.constexpr,
    IEEE: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Online-softmax accumulation of q's rows over KV tokens [start, end), scores in log2 units.

    MASK: 0 = every token of every tile is valid for every row (whole tiles below the causal
    frontier and inside every row's window: no masks, no selects), 1 = bounds only (end may cut
    the last tile; with WINDOW also tokens < win_lo, the decode window's first token), 2 = bounds,
    causal (key position <= the row's query position) and, with WINDOW, key > qpos - window.
    SOFTCAP: scores become cap_out * tanh(cap_in * q.k) (cap_in = scale / cap, cap_out = cap * log2 e),
    already scaled, so the scale multiply is skipped.
    """
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASK == 0:
            off = _kv_offsets(bt_row_ptr, offs_n, None, kvh, stride_blk, stride_pos, stride_kvh, PAGE)
            kv_ptrs = off[:, None] + offs_d[None, :]
            if EVEN_D:
                k = tl.load(k_ptr + kv_ptrs)
            else:
                k = tl.load(k_ptr + kv_ptrs, mask=mask_d[None, :], other=0.0)
        else:
            mask_n = offs_n < end
            if MASK == 1:
                if WINDOW:
                    mask_n = mask_n & (offs_n >= win_lo)
            off = _kv_offsets(bt_row_ptr, offs_n, mask_n, kvh, stride_blk, stride_pos, stride_kvh, PAGE)
            kv_ptrs = off[:, None] + offs_d[None, :]
            k = tl.load(k_ptr + kv_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            s = _tanh(s * cap_in) * cap_out
        if MASK == 1:
            # decode: scale first. Folding the scale into the exponent as below measured 5-7% slower
            # here for D=64 (H100, 2026-11-24), though it helps prefill (+5-7% at D=64).
            if SOFTCAP:
                s = tl.where(mask_n[None, :], s, float("-inf"))
            else:
                s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
        else:
            if MASK == 2:
                valid = mask_n[None, :] & (offs_n[None, :] <= qpos[:, None])
                if WINDOW:
                    valid = valid & (offs_n[None, :] > qpos[:, None] - window)
                s = tl.where(valid, s, float("-inf"))
            if SOFTCAP:
                m_new = tl.maximum(m_i, tl.max(s, 1))
            else:
                # scale folded into the exponent (one FMA per score); qk_scale > 0 keeps -inf and the max
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = m_new
            if WINDOW:
                # a row may see no key of a tile before its window starts: keep exp2 away from -inf - -inf
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            if SOFTCAP:
                p = tl.exp2(s - m_use[:, None])
            else:
                p = tl.exp2(s * qk_scale - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK == 0:
            if EVEN_D:
                v = tl.load(v_ptr + kv_ptrs)
            else:
                v = tl.load(v_ptr + kv_ptrs, mask=mask_d[None, :], other=0.0)
        else:
            v = tl.load(v_ptr + kv_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@jit(do_not_specialize=("stride_bt",))  # block-table width follows the longest sequence of each step
def _decode_kernel(
    q_ptr,
    kv_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    qsl_ptr,
    seq_lens_ptr,
    bt_ptr,
    qk_scale,
    window,
    cap_in,
    cap_out,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_blk,
    stride_pos,
    stride_kvh,
    stride_bt,
    HQ,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == tok:  # a sequence with nothing scheduled (padding)
        return
    seq_len = tl.load(seq_lens_ptr + b)
    # the one query sits at seq_len - 1: a window lets it see keys from seq_len - window on
    win_lo = 0
    if WINDOW:
        win_lo = tl.maximum(seq_len - window, 0)
    first = win_lo // BLOCK_N * BLOCK_N
    # equal shares of the tiles this sequence's query sees (not of max_seq_len, which may be a loose bound)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - first, BLOCK_N), NUM_SPLITS)
    start = first + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = kvh * G + offs_g
    q_mask = mask_g[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + tok.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    acc = tl.zeros([GP, DP], dtype=tl.float32)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc, m_i, l_i = _attend(
        acc,
        m_i,
        l_i,
        q,
        kv_ptr,
        kv_ptr + stride_kv,
        bt_ptr + b.to(tl.int64) * stride_bt,
        kvh,
        offs_g,
        start,
        end,
        qk_scale,
        win_lo,
        window,
        cap_in,
        cap_out,
        stride_blk,
        stride_pos,
        stride_kvh,
        offs_d,
        mask_d,
        PAGE,
        BLOCK_N,
        1,
        D == DP,
        IEEE,
        WINDOW,
        SOFTCAP,
    )
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + tok.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )
    else:
        # partial state of (b, head, split): acc [DP] unnormalised, then m and l
        row = (b.to(tl.int64) * HQ + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + row[:, None] * DP + offs_d[None, :], acc, mask=mask_g[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=mask_g)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=mask_g)


@jit
def _decode_reduce_kernel(
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    qsl_ptr,
    stride_ot,
    stride_oh,
    HQ,
    D: tl.constexpr,
    DP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SP: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tok = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == tok:
        return
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, DP)
    mask_s = offs_s < NUM_SPLITS
    row = (b.to(tl.int64) * HQ + h) * NUM_SPLITS + offs_s
    m = tl.load(part_ml_ptr + row * 2, mask=mask_s, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=mask_s, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty (seq_len 0): output zeros
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l, 0)
    acc = tl.load(part_acc_ptr + row[:, None] * DP + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + tok.to(tl.int64) * stride_ot + h * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < D,
    )


@jit(do_not_specialize=("num_seqs", "stride_bt"))  # both change every step
def _prefill_kernel(
    q_ptr,
    kv_ptr,
    out_ptr,
    qsl_ptr,
    seq_lens_ptr,
    bt_ptr,
    qk_scale,
    num_seqs: tl.int32,
    window,
    cap_in,
    cap_out,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_blk,
    stride_pos,
    stride_kvh,
    stride_bt,
    G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BM: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # Highest block index first: later query blocks of a sequence see more keys (causal), and
    # starting the long programs first leaves short ones for the tail.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    # Query block pid belongs to the last sequence b with qsl[b] // BLOCK_Q + b <= pid: that index
    # counts blocks monotonically and leaves each sequence room for its cdiv(q_len, BLOCK_Q) blocks,
    # so the grid (T // BLOCK_Q + B) needs only shapes, never the device's query lengths.
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    b = lo - 1
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    qblk = pid - (q_start // BLOCK_Q + b)
    if qblk * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len

    offs_r = tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    mask_d = offs_d < D
    t_local = qblk * BLOCK_Q + offs_r // G
    heads = kvh * G + offs_r % G
    mask_r = (offs_r < BLOCK_Q * G) & (t_local < q_len)
    qpos = ctx_len + t_local
    tok = (q_start + t_local).to(tl.int64)
    q_mask = mask_r[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )

    acc = tl.zeros([BM, DP], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    v_ptr = kv_ptr + stride_kv
    # every row sees all tokens before the block's first query position: no causal mask there
    min_qpos = ctx_len + qblk * BLOCK_Q
    end = tl.minimum(seq_len, min_qpos + BLOCK_Q)
    full_hi = min_qpos // BLOCK_N * BLOCK_N
    if WINDOW:
        # [lo, mid): tiles the earliest rows see but later rows' windows have left (masked);
        # [mid, full_hi): inside every row's window and below every row's position (unmasked);
        # [full_hi, end): the causal frontier (masked).
        lo = tl.maximum(min_qpos - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(end - window, 0), BLOCK_N) * BLOCK_N
        mid = tl.maximum(lo, tl.minimum(full_lo, full_hi))
        full_hi = tl.maximum(mid, full_hi)
        acc, m_i, l_i = _attend(
            acc,
            m_i,
            l_i,
            q,
            kv_ptr,
            v_ptr,
            bt_row,
            kvh,
            qpos,
            lo,
            mid,
            qk_scale,
            0,
            window,
            cap_in,
            cap_out,
            stride_blk,
            stride_pos,
            stride_kvh,
            offs_d,
            mask_d,
            PAGE,
            BLOCK_N,
            2,
            D == DP,
            IEEE,
            WINDOW,
            SOFTCAP,
        )
    else:
        mid = 0
    acc, m_i, l_i = _attend(
        acc,
        m_i,
        l_i,
        q,
        kv_ptr,
        v_ptr,
        bt_row,
        kvh,
        qpos,
        mid,
        full_hi,
        qk_scale,
        0,
        window,
        cap_in,
        cap_out,
        stride_blk,
        stride_pos,
        stride_kvh,
        offs_d,
        mask_d,
        PAGE,
        BLOCK_N,
        0,
        D == DP,
        IEEE,
        WINDOW,
        SOFTCAP,
    )
    acc, m_i, l_i = _attend(
        acc,
        m_i,
        l_i,
        q,
        kv_ptr,
        v_ptr,
        bt_row,
        kvh,
        qpos,
        full_hi,
        end,
        qk_scale,
        0,
        window,
        cap_in,
        cap_out,
        stride_blk,
        stride_pos,
        stride_kvh,
        offs_d,
        mask_d,
        PAGE,
        BLOCK_N,
        2,
        D == DP,
        IEEE,
        WINDOW,
        SOFTCAP,
    )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


def _decode_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, block_n: int, device: torch.device
) -> int:
    """Split the context until the grid fills the GPU about twice over (no more splits than tiles)."""
    sms = num_sms(device.index if device.type == "cuda" else None)
    if device.type == "cuda" and device.index is None:
        sms = num_sms(torch.cuda.current_device())
    splits, max_splits = 1, min(64, max(1, cdiv(max_seq_len, block_n)))
    while batch * num_kv_heads * splits < 2 * sms and splits * 2 <= max_splits:
        splits *= 2
    return splits


def paged_attention_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Same contract as `paged_attention_ref`, but returns all T rows (rows of tokens outside
    every sequence stay unwritten). max_query_len == 1 takes the decode path; max_seq_len
    (an upper bound is fine) only sizes the decode split. The keyword arguments override
    the tuned launch parameters (tests, benchmarks); `out` is an optional [T, Hq, D] buffer.
    """
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    _, _, page, Hkv, _ = kv_cache.shape
    G = Hq // Hkv
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("paged_attention_triton needs q and kv_cache contiguous in head_dim")
    if out is None:
        out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    DP = max(16, next_pow2(D))
    ieee = q.dtype == torch.float32
    qk_scale = float(scale) * _LOG2E
    window = int(sliding_window or 0)
    cap = float(softcap or 0.0)
    cap_in, cap_out = (float(scale) / cap, cap * _LOG2E) if cap else (0.0, 0.0)
    opts = dict(WINDOW=window > 0, SOFTCAP=cap > 0)
    kv_strides = (kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3))
    if max_query_len == 1:
        bn = block_n or 64
        # a window bounds what each query reads: size the split by that, not by the context
        span = min(max_seq_len, window) if window else max_seq_len
        splits = num_splits or _decode_num_splits(B, Hkv, span, bn, q.device)
        if splits > 1:
            part_acc = torch.empty(B * Hq * splits, DP, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(B * Hq * splits, 2, dtype=torch.float32, device=q.device)
        else:
            part_acc = part_ml = out  # unused
        _decode_kernel[(B, Hkv, splits)](
            q,
            kv_cache,
            out,
            part_acc,
            part_ml,
            query_start_loc,
            seq_lens,
            block_tables,
            qk_scale,
            window,
            cap_in,
            cap_out,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            *kv_strides,
            block_tables.stride(0),
            Hq,
            G=G,
            GP=max(16, next_pow2(G)),
            D=D,
            DP=DP,
            PAGE=page,
            BLOCK_N=bn,
            NUM_SPLITS=splits,
            IEEE=ieee,
            **opts,
            num_warps=num_warps or 4,
            num_stages=num_stages or 2,
        )
        if splits > 1:
            _decode_reduce_kernel[(B, Hq)](
                out,
                part_acc,
                part_ml,
                query_start_loc,
                out.stride(0),
                out.stride(1),
                Hq,
                D=D,
                DP=DP,
                NUM_SPLITS=splits,
                SP=next_pow2(splits),
                num_warps=4,
            )
        return out
    # Tuned on H100 (benchmarks/results/kernels-2026-11-24.md): D=128 prefers 64-row tiles on one
    # warpgroup, D<=64 128-row tiles on two.
    big_d = DP >= 128
    bm = block_m or (64 if big_d else 128)
    block_q = max(1, bm // G)
    BM = next_pow2(block_q * G)
    bn = block_n or 64
    _prefill_kernel[(T // block_q + B, Hkv)](
        q,
        kv_cache,
        out,
        query_start_loc,
        seq_lens,
        block_tables,
        qk_scale,
        B,
        window,
        cap_in,
        cap_out,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *kv_strides,
        block_tables.stride(0),
        G=G,
        BLOCK_Q=block_q,
        BM=BM,
        D=D,
        DP=DP,
        PAGE=page,
        BLOCK_N=bn,
        IEEE=ieee,
        **opts,
        num_warps=num_warps or (4 if big_d else 8),
        num_stages=num_stages or 2,
    )
    return out
