"""fleetserve.kernels: the compute kernels of the model forward pass.

Each op lives in its own module with a pure-torch reference (`<op>_ref`) and a
Triton implementation (`<op>_triton`) of the same signature beside it; tests
compare the two. `get_ops(backend)` returns the set a model runs with: "torch"
(the references, the tests' oracle), "cpu" (the CPU engine's path: the references
with fused torch forms such as SDPA attention where those measured faster, each
tested against its reference) or "triton" (GPU, or CPU under TRITON_INTERPRET=1).
On CUDA use "triton": each Triton kernel measured faster than its reference on
an H100, and the attention and cache references sync with the host, so they
cannot run inside CUDA graphs (benchmarks/results/kernels-2026-11-24.md).
Triton is optional: without it the references still import and run. The CPU's
hot ops also have C forms (cpu_int4.c, cpu_attention.c, cpu_norm.c: one optional
library, kernels/_native.py), each beside its torch reference and used where it is
built and the CPU has the AVX-512 features it needs.

This package never imports fleetserve.runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelOps:
    """The kernel functions a model forward uses, all of one backend."""

    name: str
    rms_norm: Callable
    rotary_embedding: Callable
    silu_and_mul: Callable
    write_kv_cache: Callable
    paged_attention: Callable
    fused_moe: Callable
    """fused_moe(x[T,H], w13[E,2I,H], w2[E,H,I], topk_weights[T,K], topk_ids[T,K]) -> [T,H] (kernels/moe.py)."""
    gelu_tanh_and_mul: Callable


def get_ops(backend: str = "torch") -> KernelOps:
    from . import activation, attention, cache, moe, norm, rotary

    if backend == "torch":
        return KernelOps(
            "torch",
            norm.rms_norm_ref,
            rotary.rotary_embedding_ref,
            activation.silu_and_mul_ref,
            cache.write_kv_cache_ref,
            attention.paged_attention_ref,
            moe.fused_moe_ref,
            gelu_tanh_and_mul=activation.gelu_tanh_and_mul_ref,
        )
    if backend == "cpu":
        # the references, with the fused torch forms measured faster on CPU (docs/cpu.md)
        return KernelOps(
            "cpu",
            norm.rms_norm_cpu,
            rotary.rotary_embedding_cpu,
            activation.silu_and_mul_ref,
            cache.write_kv_cache_cpu,
            attention.paged_attention_sdpa,
            moe.fused_moe_ref,
            gelu_tanh_and_mul=activation.gelu_tanh_and_mul_ref,
        )
    if backend == "triton":
        return KernelOps(
            "triton",
            norm.rms_norm_triton,
            rotary.rotary_embedding_triton,
            activation.silu_and_mul_triton,
            cache.write_kv_cache_triton,
            attention.paged_attention_triton,
            moe.fused_moe_triton,
            gelu_tanh_and_mul=activation.gelu_tanh_and_mul_triton,
        )
    raise ValueError(f"unknown kernel backend {backend!r} (expected 'torch', 'cpu' or 'triton')")
