"""Qwen3-MoE and Qwen2-MoE: Qwen attention with a sparse MoE block (top-k of many experts).

Qwen3-MoE: per-head q/k RMSNorm (layers.Attention, as dense Qwen3), no q/k/v biases,
`norm_topk_prob` renormalisation. Qwen2-MoE: q/k/v biases and a shared expert added to
every token's output, gated by sigmoid(shared_expert_gate(x)). Both may keep dense MLPs on
`mlp_only_layers` (and off the `decoder_sparse_step` grid). Checkpoints name experts
mlp.experts.<j>.{gate,up,down}_proj; the config drives all differences, so both are the
shared MoeForCausalLM.
"""

from __future__ import annotations

from typing import Any

from .moe import MoeForCausalLM, qwen_moe_fields
from .registry import register


def _qwen3_moe(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**qwen_moe_fields(cfg), "qk_norm": True}


def _qwen2_moe(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        **qwen_moe_fields(cfg),
        "qkv_bias": bool(cfg.get("qkv_bias", True)),  # transformers 4.x Qwen2-MoE always has q/k/v biases
        "shared_expert_intermediate_size": cfg.get("shared_expert_intermediate_size") or 0,
    }


@register(
    "qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    parse_hf=_qwen3_moe,
    checked_against="transformers Qwen3MoeForCausalLM (tiny random fp32: q/k norms, top-k renormalised or "
    "not, a dense layer, tied embeddings); GGUF vs transformers' GGUF loading",
)
class Qwen3MoeForCausalLM(MoeForCausalLM):
    pass


@register(
    "qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    parse_hf=_qwen2_moe,
    checked_against="transformers Qwen2MoeForCausalLM (tiny random fp32: shared expert with sigmoid gate, "
    "q/k/v biases); GGUF",
)
class Qwen2MoeForCausalLM(MoeForCausalLM):
    pass
