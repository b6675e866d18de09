"""Mixtral (8 experts, top-2): Mistral attention (every layer sliding when `sliding_window`
is set) with a sparse MoE block in every layer.

Hugging Face checkpoints name the block `block_sparse_moe` and an expert's projections
w1 (gate), w3 (up), w2 (down); runtime/models/moe.py stacks them per layer.
"""

from __future__ import annotations

from typing import Any

from .llama import every_layer_slides
from .moe import MoeForCausalLM
from .registry import register


def _mixtral(cfg: dict[str, Any]) -> dict[str, Any]:
    # experts are `intermediate_size` wide; top-k probabilities are always renormalised
    return {
        **every_layer_slides(cfg),
        "num_experts": cfg["num_local_experts"],
        "num_experts_per_tok": cfg["num_experts_per_tok"],
        "moe_intermediate_size": cfg["intermediate_size"],
        "norm_topk_prob": True,
    }


@register(
    "mixtral",
    architectures=("MixtralForCausalLM",),
    parse_hf=_mixtral,
    checked_against="transformers MixtralForCausalLM (tiny random fp32: 4 experts top-2, GQA; in-memory "
    "stacked and on-disk per-expert checkpoints; GGUF with stacked and per-expert tensors)",
)
class MixtralForCausalLM(MoeForCausalLM):
    expert_projections = ("w1", "w3", "w2")
    block_aliases = ("block_sparse_moe",)
