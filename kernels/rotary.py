"""Rotary position embedding (NeoX / Hugging Face `rotate_half` layout).

`cos_sin_cache` is [max_position, head_dim]: the first half of each row holds cos,
the second half sin, of the per-pair frequencies (llama3 or other scaling is
applied by whoever builds the cache).

Owns the torch reference, its CPU forms with fewer ops (`rotary_embedding_cpu`; and for the lean
CPU forward, `rotary_factors_cpu` once per step + `rotary_inplace_cpu` per layer) and the Triton
kernel: one program per token rotates all of its q and k heads, reading the token's cos/sin row once.
"""

from __future__ import annotations

import torch

from ._triton import jit, next_pow2, tl


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
):
    """q: [T, Hq, D], k: [T, Hkv, D], positions: [T] -> rotated (q, k), new tensors."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rot(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def rotary_embedding_cpu(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
):
    """`rotary_embedding_ref` with fewer ops (the CPU engine's path): when q and k are neighbouring
    head views of one buffer (the fused qkv projection's output), both rotate in one pass."""
    T, Hq, D = q.shape
    Hkv, h = k.shape[1], D // 2
    cs = cos_sin_cache.index_select(0, positions)
    cos, sin = cs[:, None, :h], cs[:, None, h:]
    x = q
    joint = (
        q.dtype == k.dtype
        and q.stride()[1:] == k.stride()[1:] == (D, 1)
        and (T == 1 or q.stride(0) == k.stride(0))
        and k.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
        and k.data_ptr() == q.data_ptr() + Hq * D * q.element_size()
    )
    if joint:  # [T, Hq + Hkv, D] over the same memory
        x = q.as_strided((T, Hq + Hkv, D), q.stride())
    xf = x.float()
    x1, x2 = xf[..., :h], xf[..., h:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(q.dtype)
    if joint:
        return out[:, :Hq], out[:, Hq:]
    kf = k.float()
    k1, k2 = kf[..., :h], kf[..., h:]
    return out, torch.cat((k1 * cos - k2 * sin, k2 * cos + k1 * sin), dim=-1).to(k.dtype)


def rotary_factors_cpu(
    positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step input of `rotary_inplace_cpu`, shared by every layer of a step: C = [cos | cos]
    and S = [-sin | sin] of the tokens' positions, [T, 1, D] float32."""
    cs = cos_sin_cache.index_select(0, positions)
    cos, sin = cs.chunk(2, dim=-1)
    return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]


def rotary_inplace_cpu(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Rotate x [T, H, D] float32 in place (q and k heads side by side, e.g. a view of the fused qkv
    output; rows may be strided) with `rotary_factors_cpu`'s (C, S): the values `rotary_embedding_ref`
    returns, in four ops. x * C + roll(x, D/2) * S is [x1 cos + x2 (-sin) | x2 cos + x1 sin], and
    a + b * (-c) rounds exactly as a - b * c, so the result is the reference's bit for bit."""
    c, s = factors
    r = x.roll(x.shape[-1] // 2, -1)  # [x2 | x1]
    r.mul_(s)
    x.mul_(c).add_(r)


@jit
def _rotate_heads(
    x_ptr,
    o_ptr,
    t,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    cos,
    sin,
    H,
    HALF: tl.constexpr,
    HP: tl.constexpr,
    HALFP: tl.constexpr,
):
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, HALFP)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < HALF)
    src = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    dst = o_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(dst + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cs_ptr,
    qo_ptr,
    ko_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cs,
    HQ,
    HKV,
    HALF: tl.constexpr,
    HALFP: tl.constexpr,
    HQP: tl.constexpr,
    HKVP: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, HALFP)
    cos = tl.load(cs_ptr + pos * stride_cs + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[
        None, :
    ]
    _rotate_heads(
        q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin, HQ, HALF, HQP, HALFP
    )
    _rotate_heads(
        k_ptr, ko_ptr, t, stride_kt, stride_kh, stride_kot, stride_koh, cos, sin, HKV, HALF, HKVP, HALFP
    )


def rotary_embedding_triton(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    inplace: bool = False,
):
    """Same contract as `rotary_embedding_ref`; with inplace=True, q and k are rotated in place and returned."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_embedding_triton needs q and k contiguous in head_dim")
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    qo = q if inplace else torch.empty_like(q)
    ko = k if inplace else torch.empty_like(k)
    half = D // 2
    if T:
        _rotary_kernel[(T,)](
            positions,
            q,
            k,
            cos_sin_cache,
            qo,
            ko,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            qo.stride(0),
            qo.stride(1),
            ko.stride(0),
            ko.stride(1),
            cos_sin_cache.stride(0),
            Hq,
            Hkv,
            HALF=half,
            HALFP=next_pow2(half),
            HQP=next_pow2(Hq),
            HKVP=next_pow2(Hkv),
            num_warps=4,
        )
    return qo, ko
