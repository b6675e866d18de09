"""RMSNorm, optionally fused with the residual add that precedes it.

Owns the torch reference (`rms_norm_ref`), its two-op CPU form (`rms_norm_cpu`) and the Triton kernel
(`rms_norm_triton`): one program per row, one read of x (and residual) and one
write of y (and x + residual), where torch's eager version makes ~6 passes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _native
from ._triton import jit, next_pow2, tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """y = weight * x / rms(x), computed in float32 like Hugging Face's LlamaRMSNorm.

    With `residual`, first x = x + residual (in x's dtype) and return (y, x): the sum
    is the next layer's residual.
    """
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * y.to(x.dtype)
    return y if residual is None else (y, residual)


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`rms_norm_ref` in two ops for float32 (the add, torch's fused rms_norm): the CPU engine's path.
    x may also be bf16 with a float32 residual (a packed matmul's output: the add upcasts it exactly,
    as the reference's does). Other dtypes take the reference (it rounds the normalised value before
    the weight multiply)."""
    xdt = (
        x.dtype
        if residual is None or x.dtype == residual.dtype
        else torch.promote_types(x.dtype, residual.dtype)
    )
    if xdt != torch.float32 or weight.dtype != torch.float32:
        return rms_norm_ref(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
        return rms_norm_rows(x, weight, eps), x
    return rms_norm_rows(x, weight, eps)


@functools.cache
def _norm_rows():
    I64, PTR = _native.I64, _native.PTR
    return _native.kernel("fs_norm_supported", "fs_rms_norm", PTR, PTR, _native.FLOAT, PTR, I64, I64)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (H,), weight, eps): in C (kernels/cpu_norm.c) for contiguous float32 CPU rows
    with H a multiple of 16 where the library is built (one call instead of torch's ~8 ops: ~4 vs
    ~20 us per SmolLM2 row), else torch's."""
    H = x.shape[-1]
    norm = _norm_rows()
    if (
        norm is None
        or H % 16
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or not weight.is_contiguous()
    ):
        return F.rms_norm(x, (H,), weight, eps)
    y = torch.empty_like(x)
    norm(x.data_ptr(), weight.data_ptr(), eps, y.data_ptr(), x.numel() // H, H)
    return y


@jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    sum_ptr,
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    H,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        # round the sum to x's dtype before normalising, as the reference (and HF) does
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    # HF rounds the normalised value to x's dtype before the weight multiply
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (y * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Same contract as `rms_norm_ref`; x (and residual) [..., H], rows may be strided."""
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    y2 = y.view(-1, H)
    if residual is not None:
        r2 = residual.reshape(-1, H)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        s2 = s.view(-1, H)
    else:
        r2, s2 = x2, x2  # unused: HAS_RES=False compiles their accesses away
    block = next_pow2(H)
    if rows:
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight,
            y2,
            s2,
            x2.stride(0),
            r2.stride(0),
            y2.stride(0),
            s2.stride(0),
            H,
            float(eps),
            HAS_RES=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return y if residual is None else (y, s)
