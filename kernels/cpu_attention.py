"""Paged decode attention on the CPU in C (kernels/cpu_attention.c), reading K/V in place in the block
cache; its reference is `paged_attention_ref` (kernels/attention.py), and the SDPA path it replaces
on decode steps is tested against the same reference.

`paged_decode(q, kv_cache, block_tables, seq_lens, scale, window)`: one query token per sequence
(decode), float32 q and cache, no soft-cap. `usable(q, kv_cache)` says whether a call qualifies:
the library is built (kernels/_native.py), the CPU has AVX-512F, head size a multiple of 16 up to
256, at most 16 query heads per KV head.
"""

from __future__ import annotations

import functools

import torch

from . import _native


@functools.cache
def _decode():
    I64, PTR = _native.I64, _native.PTR
    return _native.kernel(
        "fs_attention_supported", "fs_paged_decode",
        PTR, I64, I64, I64, I64, PTR, I64, I64, I64, I64, PTR, I64, PTR, I64, I64, _native.FLOAT, PTR, _native.INT,
    )  # fmt: skip


def available() -> bool:
    """Whether the C kernel is built and this CPU runs it (AVX-512F)."""
    return _decode() is not None


def usable(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether `paged_decode` takes this decode step (else the caller runs SDPA)."""
    if _decode() is None or q.device.type != "cpu" or kv_cache.device.type != "cpu":
        return False
    D, Hq, Hkv = q.shape[-1], q.shape[-2], kv_cache.shape[3]
    return (
        q.dtype == torch.float32
        and kv_cache.dtype == torch.float32
        and kv_cache.stride(-1) == 1
        and D % 16 == 0
        and D <= 256
        and Hq % Hkv == 0
        and Hq // Hkv <= 16
    )


def paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] (each sequence's one query, at position seq_lens - 1), kv_cache [2, blocks, bs,
    Hkv, D], block_tables [B, >= ceil(max seq_len / bs)], seq_lens [B] -> [B, Hq, D] float32: the
    softmax over the keys in the sliding window (None: all). Only where `usable` (the callers check it)."""
    decode = _decode()
    if decode is None:
        raise RuntimeError("the CPU decode attention kernel is not available (cpu_attention.usable())")
    q = q.contiguous()
    B, Hq, D = q.shape
    _, _, bs, Hkv, _ = kv_cache.shape
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    if bt.stride(-1) != 1:
        bt = bt.contiguous()
    sl = (
        seq_lens
        if seq_lens.dtype == torch.int64 and seq_lens.is_contiguous()
        else seq_lens.long().contiguous()
    )
    out = torch.empty(B, Hq, D, dtype=torch.float32)
    s_kv, s_blk, s_tok, s_head = kv_cache.stride()[:4]
    base = kv_cache.data_ptr()  # data_ptr includes the storage offset
    decode(
        q.data_ptr(), B, Hq, Hkv, D, base, s_kv, s_blk, s_tok, s_head,
        bt.data_ptr(), bt.stride(0), sl.data_ptr(), bs, window or 0, scale, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out
