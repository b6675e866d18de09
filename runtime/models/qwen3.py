"""Qwen3 (dense): the Llama layer with per-head RMSNorm of q and k before RoPE, no biases."""

from __future__ import annotations

from typing import Any

from .layers import CausalLM
from .llama import qwen_layer_types
from .registry import register


def _qwen3(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"qk_norm": True, **qwen_layer_types(cfg)}


@register(
    "qwen3",
    architectures=("Qwen3ForCausalLM",),
    parse_hf=_qwen3,
    checked_against="transformers Qwen3ForCausalLM (q/k norms, GQA, tied and untied, sliding-window layers)",
)
class Qwen3ForCausalLM(CausalLM):
    pass
