"""Writing new keys and values into the paged KV cache.

Cache layout (one tensor per layer): kv_cache[2, num_blocks, block_size, num_kv_heads, head_dim],
index 0 keys, 1 values. A token's slot is block_id * block_size + offset; slot -1
marks a padding token (CUDA-graph padding) whose K/V are dropped.

Owns the torch reference, its CPU forms (`write_kv_cache_cpu`, two index copies;
`write_kv_cache_fused_cpu`, one copy of K and V side by side) and the
Triton kernel (one program per token, all of its
heads; 64-bit slot arithmetic, since block_id * block_size * Hkv * D passes 2^31
in caches of a few GB).
"""

from __future__ import annotations

import torch

from ._triton import jit, next_pow2, tl


def write_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v: [T, Hkv, D]; slot_mapping: [T] int. Writes in place."""
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    flat[0, slots] = k[valid].to(kv_cache.dtype)
    flat[1, slots] = v[valid].to(kv_cache.dtype)


def write_kv_cache_cpu(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """`write_kv_cache_ref` as two index_copy_ calls (the CPU engine's path): CPU steps carry no
    padding slots; a step with any -1 slot takes the reference."""
    if kv_cache.device.type != "cpu" or bool((slot_mapping < 0).any()):
        return write_kv_cache_ref(k, v, kv_cache, slot_mapping)
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    slots = slot_mapping.long()
    flat[0].index_copy_(0, slots, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, v.to(kv_cache.dtype))


def write_kv_cache_fused_cpu(kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """`write_kv_cache_ref` of k = kv[0] and v = kv[1], kv [2, T, Hkv, D] (e.g. a strided view of the
    fused qkv output's K|V tail), in one index_copy_. The lean CPU forward checks once per step
    that no slot is -1 (a -1 here raises: index_copy_ bounds-checks)."""
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    flat.index_copy_(1, slot_mapping, kv if kv.dtype == kv_cache.dtype else kv.to(kv_cache.dtype))


@jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    kv_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kv,
    stride_blk,
    stride_pos,
    stride_head,
    H,
    D,
    PAGE: tl.constexpr,
    HP: tl.constexpr,
    DP: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    dst = kv_ptr + (slot // PAGE) * stride_blk + (slot % PAGE) * stride_pos
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, DP)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    dst = dst + offs_h[:, None] * stride_head + offs_d[None, :]
    kk = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    vv = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(dst, kk.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, vv.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv_cache_triton(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Same contract as `write_kv_cache_ref`; k and v may be strided views (e.g. slices of a fused qkv)."""
    T, H, D = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("write_kv_cache_triton needs k, v and kv_cache contiguous in head_dim")
    if T:
        _write_kv_kernel[(T,)](
            k,
            v,
            kv_cache,
            slot_mapping,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            kv_cache.stride(0),
            kv_cache.stride(1),
            kv_cache.stride(2),
            kv_cache.stride(3),
            H,
            D,
            PAGE=kv_cache.shape[2],
            HP=next_pow2(H),
            DP=next_pow2(D),
            num_warps=4,
        )
