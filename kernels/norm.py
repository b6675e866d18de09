"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

import torch


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


def rms_norm_triton(x, weight, eps, residual=None):  # replaced by the Triton kernel
    raise NotImplementedError("Triton RMSNorm not written yet")
