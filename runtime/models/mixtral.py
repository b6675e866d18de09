"""Mixtral (8 experts, top-2): Mistral attention with a sparse MoE block in every layer.

Hugging Face checkpoints name the block `block_sparse_moe` and an expert's projections
w1 (gate), w3 (up), w2 (down); runtime/models/moe.py stacks them per layer.
"""
from __future__ import annotations

from .moe import MoeForCausalLM


class MixtralForCausalLM(MoeForCausalLM):
    expert_projections = ("w1", "w3", "w2")
    block_aliases = ("block_sparse_moe",)
