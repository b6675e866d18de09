"""The CPU int4 matmul of packed weights (kernels/cpu_int4.c) and its torch reference.

`int4_mm(x, packed, scale_zeros, group_size, n)` computes x @ W.T for a matrix in torch's CPU int4
layout (`_weight_int4pack_mm_for_cpu`'s: see runtime/models/quant.py Int4GroupWeight), with
w = (q - 8) * s + z per row and group. torch's kernel widens the codes to bf16 and runs vdpbf16ps
(measured: bound by that instruction's rate at 16 rows); the C kernel splits float32 x per row and
group into two int8 parts (16 bits of the group's range) and runs VNNI integer dot products, exact,
with the codes expanded once per call for all rows; then y += s * c * D + z * sum(x) per group in
float32 (the C file's header has the arithmetic and its error). It is built at install time into
a plain shared library (setup.py, optional; kernels/_native.py loads it); `available()` is False where
it was not built, the CPU lacks AVX-512 VNNI or `FLEETSERVE_CPU_KERNELS=torch`, and callers then use
torch's kernel.

A row's result does not depend on the other rows of the call nor on the thread count (tested).
This module never imports fleetserve.runtime.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _native

BLOCK_N = 64
"""Rows per block of the layout (torch's AVX-512 build): the packed matrix has N padded to it."""


@functools.cache
def _mm():
    I64, PTR = _native.I64, _native.PTR
    return _native.kernel(
        "fs_int4_supported", "fs_int4_mm", PTR, I64, I64, PTR, PTR, I64, I64, PTR, I64, I64, _native.INT
    )


def available() -> bool:
    """Whether the C kernel was built and this CPU can run it (AVX-512 F/BW/VNNI)."""
    return _mm() is not None


def prepare(packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int, n: int) -> tuple:
    """The weight's half of an `int4_mm` call, checked once (a packed format caches it: per call the
    checks cost ~4 us, more than the kernel on a small matrix). packed [N_pad, K / 2] uint8,
    scale_zeros [K / group_size, N_pad, 2] bf16, N_pad = n rounded up to BLOCK_N, group_size a
    multiple of 16. The tensors must stay alive and unmoved while it is used."""
    n_pad, K = packed.shape[0], packed.shape[1] * 2
    if (
        packed.dtype != torch.uint8
        or n_pad % BLOCK_N
        or n > n_pad
        or group_size % 16
        or K % group_size
        or scale_zeros.dtype != torch.bfloat16
        or scale_zeros.shape != (K // group_size, n_pad, 2)
        or not (packed.is_contiguous() and scale_zeros.is_contiguous())
    ):
        raise ValueError(
            f"int4_mm: packed {tuple(packed.shape)} {packed.dtype}, scale_zeros {tuple(scale_zeros.shape)} "
            f"{scale_zeros.dtype}, group {group_size}, n {n}: not one layout"
        )
    return (K, packed.data_ptr(), scale_zeros.data_ptr(), n_pad, group_size, n)


def int4_mm_prepared(x: torch.Tensor, prepared: tuple) -> torch.Tensor:
    """x [M, K] (as float32) @ W.T -> [M, n] float32, W from `prepare`. Only with `available()`."""
    mm = _mm()
    if mm is None:
        raise RuntimeError("the CPU int4 kernel is not available (fleetserve.kernels.cpu_int4.available())")
    K, packed, sz, n_pad, group_size, n = prepared
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"int4_mm: x {tuple(x.shape)} against a weight of {K} inputs: not one layout")
    M = x.shape[0]
    y = torch.empty(M, n, dtype=torch.float32)
    if M:
        mm(x.data_ptr(), M, K, packed, sz, n_pad, group_size, y.data_ptr(), n, n, torch.get_num_threads())
    return y


def int4_mm(
    x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int, n: int
) -> torch.Tensor:
    """x [M, K] (as float32) @ W.T -> [M, n] float32 (`prepare`'s layout). Only with `available()`."""
    return int4_mm_prepared(x, prepare(packed, scale_zeros, group_size, n))


def int4_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The codes [n, K] (uint8) read back from the layout (per block of 64 rows, byte k * 32 + j holds
    row j's code at input k in its low nibble and row 32 + j's in its high one)."""
    n_pad, K = packed.shape[0], packed.shape[1] * 2
    b = packed.reshape(n_pad // BLOCK_N, K, BLOCK_N // 2)
    return torch.cat([b & 15, b >> 4], dim=2).permute(0, 2, 1).reshape(n_pad, K)[:n]  # [block, k, 64] -> rows


def int4_dequantize(packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    """The matrix [n, K] float32 of the layout: w = (q - 8) * s + z."""
    sz = scale_zeros[:, :n].float()  # [K / group_size, n, 2]
    s = sz[..., 0].t().repeat_interleave(group_size, dim=1)
    z = sz[..., 1].t().repeat_interleave(group_size, dim=1)
    return (int4_codes(packed, n).float() - 8.0) * s + z


def int4_mm_ref(
    x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int, n: int
) -> torch.Tensor:
    """What `int4_mm` approximates, in plain torch (float32 result, exact x). The kernel's x carries
    16 bits of each group's range: |x_k - x^_k| <= max_group |x| / 65,024 (`input_error_bound`)."""
    return F.linear(x.float(), int4_dequantize(packed, scale_zeros, group_size, n))


def input_error_bound(x: torch.Tensor, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """A bound [M, N] on |int4_mm - int4_mm_ref|, from x's two-part int8 form:
    sum_k |w_nk| max_{group of k} |x_mk| / 65,024, plus float32 rounding."""
    M, K = x.shape
    amax = x.float().abs().view(M, K // group_size, group_size).amax(-1).repeat_interleave(group_size, 1)
    return (amax / 65024.0 + 2.0**-20 * x.float().abs()) @ w.abs().t()
