"""Qwen3-MoE and Qwen2-MoE: Qwen attention with a sparse MoE block (top-k of many experts).

Qwen3-MoE: per-head q/k RMSNorm, no q/k/v biases, `norm_topk_prob` renormalisation.
Qwen2-MoE: q/k/v biases and a shared expert added to every token's output, gated by
sigmoid(shared_expert_gate(x)). Both may keep dense MLPs on `mlp_only_layers` (and off
the `decoder_sparse_step` grid). Checkpoints name experts mlp.experts.<j>.{gate,up,down}_proj;
the config drives all differences, so both are the shared MoeForCausalLM.
"""
from __future__ import annotations

from .moe import MoeForCausalLM


class Qwen3MoeForCausalLM(MoeForCausalLM):
    pass


class Qwen2MoeForCausalLM(MoeForCausalLM):
    pass
