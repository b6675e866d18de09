"""Phi-3 / Phi-3.5 (dense): the Llama layer; checkpoints already store `qkv_proj` and
`gate_up_proj` fused (in our row order), RoPE may be longrope ("su") scaled, and a
`sliding_window` applies to every layer."""

from __future__ import annotations

from .layers import CausalLM
from .llama import every_layer_slides
from .registry import register


@register(
    "phi3",
    architectures=("Phi3ForCausalLM",),
    parse_hf=every_layer_slides,
    checked_against="transformers Phi3ForCausalLM (fused checkpoint tensors, longrope scaling, "
    "sliding window shorter than the prompts)",
)
class Phi3ForCausalLM(CausalLM):
    pass
