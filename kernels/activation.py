"""Gated activations of the dense MLPs: SiLU-and-multiply (Llama, Qwen, Phi-3) and
GELU(tanh)-and-multiply (Gemma 2/3).

Owns the torch references, their CPU forms for bf16 or float32 input (`silu_and_mul_cpu`,
`gelu_tanh_and_mul_cpu`: the packed matmuls return bf16, upcast here inside the first op) and the
Triton kernels: one read of [gate | up], one write of the product (torch's eager version writes
act(gate) out first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import cdiv, jit, tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] holding [gate | up] -> silu(gate) * up, [T, I]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    """`silu_and_mul_ref(x.float())` bit for bit, for x [T, 2*I] float32 or bf16 (a packed matmul's
    output), as a float32 [T, I]; the product goes into SiLU's output instead of a new tensor. The
    upcast copies all of x, not only the gate: torch's vectorised SiLU rounds differently from its
    scalar loop tail, so its input must be laid out as the reference's is."""
    h = x.float()
    d = h.shape[-1] // 2
    return F.silu(h[..., :d]).mul_(h[..., d:])


@jit
def _silu_and_mul_kernel(x_ptr, o_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0)
    # torch rounds silu(gate) to the input dtype before the multiply: match it
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype).to(tl.float32)
    tl.store(o_ptr + row * stride_o + offs, (s * u.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Same contract as `silu_and_mul_ref`: x [..., 2*I] -> [..., I]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    o2 = out.view(-1, d)
    block = 1024
    if x2.shape[0] and d:
        _silu_and_mul_kernel[(x2.shape[0], cdiv(d, block))](
            x2, o2, x2.stride(0), o2.stride(0), d, BLOCK=block, num_warps=4
        )
    return out


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] holding [gate | up] -> gelu_tanh(gate) * up (transformers' `gelu_pytorch_tanh`), [T, I]."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]


def gelu_tanh_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh_and_mul_ref(x.float())` bit for bit, for x [T, 2*I] float32 or bf16, as a float32
    [T, I] (see silu_and_mul_cpu)."""
    h = x.float()
    d = h.shape[-1] // 2
    return F.gelu(h[..., :d], approximate="tanh").mul_(h[..., d:])


@jit
def _gelu_tanh_and_mul_kernel(x_ptr, o_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0)
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) * (g + 0.044715 g^3)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)  # saturates to +-1 without NaN
    a = (0.5 * g * (1.0 + tanh)).to(u.dtype).to(tl.float32)  # rounded like torch's gelu output
    tl.store(o_ptr + row * stride_o + offs, (a * u.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=mask)


def gelu_tanh_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Same contract as `gelu_tanh_and_mul_ref`: x [..., 2*I] -> [..., I]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    o2 = out.view(-1, d)
    block = 1024
    if x2.shape[0] and d:
        _gelu_tanh_and_mul_kernel[(x2.shape[0], cdiv(d, block))](
            x2, o2, x2.stride(0), o2.stride(0), d, BLOCK=block, num_warps=4
        )
    return out
