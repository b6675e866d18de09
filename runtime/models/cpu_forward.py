"""The CPU engine's forward pass through plain decoder layers: the math of DecoderLayer, Attention
and GatedMLP (layers.py) with the CPU op set, in fewer torch ops and Python calls.

A decode step of a small model on the CPU is bound by dispatch, not by arithmetic (docs/cpu.md:
SmolLM2-135M's packed matmuls are ~100 us per layer, the ~80 other torch ops around them cost more).
So, once per step, what every layer would derive again: the RoPE factors of the positions, which
KV blocks attention reads and its key masks, whether any slot is padding. Per layer: the fused
qkv output stays one float32 buffer that RoPE rotates in place and whose K|V tail is written into
the cache in one copy; a packed matmul's bf16 output is upcast by the next op (the residual add,
the activation) instead of by a cast of its own; no nn.Module is called.

The values are the module path's: the same ops on the same numbers, or ops that round alike
(each kernel is tested against its reference; tests/runtime/test_cpu_forward.py compares whole
models bitwise with `CausalLM.cpu_fast_forward` off). Layers this does not know (Gemma's four
norms, MoE blocks, q/k norms, tensor-parallel linears, non-float32 weights) run their own forward.
Owns no state between steps; the per-layer plan (which modules and parameters a layer uses) is
built once per model and dropped when its weights or modules change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fleetserve.kernels.activation import gelu_tanh_and_mul_cpu, silu_and_mul_cpu
from fleetserve.kernels.attention import SdpaDecodeStep, paged_attention_sdpa_decode
from fleetserve.kernels.cache import write_kv_cache_fused_cpu
from fleetserve.kernels.norm import rms_norm_rows
from fleetserve.kernels.rotary import rotary_factors_cpu, rotary_inplace_cpu

from ..attention import AttentionMetadata
from .layers import Attention, DecoderLayer, GatedMLP, RMSNorm
from .quant import PackedLinear

if TYPE_CHECKING:
    from .layers import CausalLM

_F32 = torch.float32


class _Linear(NamedTuple):
    fmt: object  # a WeightFormat (packed) or None (an nn.Linear: weight holds the matrix)
    weight: torch.Tensor | None
    bias: torch.Tensor | None


class _LayerPlan(NamedTuple):
    """What one plain decoder layer's lean forward reads, resolved from its modules once."""

    ln1: torch.Tensor
    eps1: float
    ln2: torch.Tensor
    eps2: float
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    window: int | None
    rope_index: int
    gelu: bool


def _linear_plan(m: nn.Module) -> _Linear | None:
    if type(m) is PackedLinear:
        bias = m.bias
        return _Linear(m.fmt, None, bias) if bias is None or bias.dtype == _F32 else None
    if type(m) is nn.Linear and isinstance(m, nn.Linear):
        w, b = m.weight, m.bias
        if w.dtype == _F32 and (b is None or b.dtype == _F32):
            return _Linear(None, w, b)
    return None


def layer_plan(layer: nn.Module) -> _LayerPlan | None:
    """The plan of a plain float32 decoder layer; None for a layer that must run its own forward."""
    if type(layer) is not DecoderLayer or not isinstance(layer, DecoderLayer):
        return None
    a, mlp = layer.self_attn, layer.mlp
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    if type(a) is not Attention or not isinstance(a, Attention) or a.q_norm is not None or a.softcap:
        return None
    if type(mlp) is not GatedMLP or not isinstance(mlp, GatedMLP):
        return None
    if (
        type(n1) is not RMSNorm
        or type(n2) is not RMSNorm
        or not isinstance(n1, RMSNorm)
        or not isinstance(n2, RMSNorm)
    ):
        return None
    if n1.weight.dtype != _F32 or n2.weight.dtype != _F32:
        return None
    linears = [_linear_plan(m) for m in (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(p is None for p in linears):
        return None
    qkv, o, gate_up, down = linears
    assert qkv is not None and o is not None and gate_up is not None and down is not None
    return _LayerPlan(
        n1.weight, float(n1.eps), n2.weight, float(n2.eps), qkv, o, gate_up, down,
        int(a.num_heads), int(a.num_kv_heads), int(a.head_dim), float(a.scale), a.sliding_window,
        int(a.rope_index), bool(mlp.gelu),
    )  # fmt: skip


def _linear(p: _Linear, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] float32 -> [T, out]: a packed kernel's output as it comes (bf16: the values
    PackedLinear returns after its cast to float32), or an nn.Linear's float32 output."""
    if p.fmt is None:
        return F.linear(x, p.weight, p.bias)  # type: ignore[arg-type]
    y = p.fmt.linear_uncast(x)  # type: ignore[attr-defined]
    return y if p.bias is None else y + p.bias  # (+ upcasts as PackedLinear's cast would)


class _Step:
    """Per-step values every layer shares, derived on first use."""

    __slots__ = ("positions", "attn", "rope_tables", "factors", "slots_ok", "decode")

    def __init__(
        self, positions: torch.Tensor, attn: AttentionMetadata, rope_tables, num_tokens: int, bs: int
    ):
        self.positions, self.attn, self.rope_tables = positions, attn, rope_tables
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        sm = attn.slot_mapping
        # CPU steps carry no padding slots (-1: K/V dropped); a step with one runs the modules
        self.slots_ok = sm.dtype == torch.int64 and not bool((sm < 0).any())
        self.decode = None
        if attn.max_query_len == 1 and num_tokens == attn.seq_lens.shape[0]:
            self.decode = SdpaDecodeStep.decode_step(attn.seq_lens, attn.block_tables, attn.max_seq_len, bs)

    def rope(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.factors.get(index)
        if f is None:
            f = self.factors[index] = rotary_factors_cpu(self.positions, self.rope_tables[index])
        return f


def _layer(
    p: _LayerPlan, ops, step: _Step, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    T, H = x.shape
    # input norm, with the residual add (x may be the previous layer's bf16 output: + upcasts it)
    if residual is None:
        residual = x
    else:
        residual = x + residual
    h = rms_norm_rows(residual, p.ln1, p.eps1)
    # qkv -> one float32 buffer [T, (Hq + 2 Hkv) * D]: q|k rotated in place, k|v copied into the
    # cache; its head views are made with one as_strided each (a view and a slice would be two ops)
    Hq, Hkv, D = p.heads, p.kv_heads, p.head_dim
    qkv = _linear(p.qkv, h)
    buf = qkv.float()
    if not buf.is_contiguous():  # (an nn.Linear's output and every upcast copy are)
        buf = buf.contiguous()
    W, off = buf.shape[1], buf.storage_offset()
    rotary_inplace_cpu(buf.as_strided((T, Hq + Hkv, D), (W, D, 1), off), step.rope(p.rope_index))
    kv = buf.as_strided((2, T, Hkv, D), (Hkv * D, W, D, 1), off + Hq * D)  # k and v of every token
    write_kv_cache_fused_cpu(kv, kv_cache, step.attn.slot_mapping)
    q = buf.as_strided((T, Hq, D), (W, D, 1), off)
    if step.decode is not None:
        o = paged_attention_sdpa_decode(q, kv_cache, step.decode, p.scale, p.window)
    else:
        a = step.attn
        o = ops.paged_attention(
            q, kv_cache, a.query_start_loc, a.seq_lens, a.block_tables, a.max_query_len, a.max_seq_len,
            p.scale, p.window, None,
        )  # fmt: skip
    y = _linear(p.o, o.reshape(T, Hq * D))
    # post-attention norm with its residual add, then the MLP
    residual = y + residual
    h = rms_norm_rows(residual, p.ln2, p.eps2)
    gu = _linear(p.gate_up, h)
    act = gelu_tanh_and_mul_cpu(gu) if p.gelu else silu_and_mul_cpu(gu)
    return _linear(p.down, act), residual


def run_layers(
    model: CausalLM,
    positions: torch.Tensor,
    x: torch.Tensor,
    attn: AttentionMetadata,
    kv_caches: list[torch.Tensor],
    rope_tables: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoder layers of `model` on x [T, H] float32 (the embeddings): (x, residual) as the
    module loop returns them, except that x may be a packed matmul's bf16 output (the final norm's
    residual add upcasts it)."""
    plans = model.cpu_layer_plans()
    ops = model.ops
    step = _Step(positions, attn, rope_tables, x.shape[0], kv_caches[0].shape[2] if kv_caches else 1)
    if not step.slots_ok:
        plans = [None] * len(plans)
    residual = None
    for layer, plan, kv_cache in zip(model.model.layers, plans, kv_caches):
        if plan is not None:
            x, residual = _layer(plan, ops, step, x, residual, kv_cache)
        else:
            if x.dtype != _F32:
                x = x.float()
            x, residual = layer(positions, x, residual, attn, kv_cache, rope_tables)
    return x, residual
