"""Llama 2/3, Qwen2 and Mistral: the plain pre-norm decoder of runtime/models/layers.py.

They differ only in config: Qwen2 has q/k/v biases and (optionally) sliding-window layers
past `max_window_layers`; Mistral v0.1 slides every layer over `sliding_window`.
"""

from __future__ import annotations

from typing import Any

from .config import sliding_pattern
from .layers import CausalLM
from .registry import register


@register(
    "llama",
    architectures=("LlamaForCausalLM",),
    checked_against="transformers LlamaForCausalLM (tiny random fp32 configs: MHA/GQA, tied/untied, llama3 "
    "RoPE scaling); the SmolLM2-135M GGUF vs transformers' GGUF loading",
)
class LlamaForCausalLM(CausalLM):
    pass


def qwen_layer_types(cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen2/Qwen3: layers from `max_window_layers` on slide, and only with use_sliding_window."""
    if not cfg.get("use_sliding_window"):
        return {"sliding_window": None, "layer_types": ()}
    if cfg.get("layer_types"):
        return {}
    start = cfg.get("max_window_layers", 0)
    return {"layer_types": sliding_pattern(cfg["num_hidden_layers"], lambda i: i >= start)}


def _qwen2(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"qkv_bias": True, **qwen_layer_types(cfg)}


@register(
    "qwen2",
    architectures=("Qwen2ForCausalLM",),
    parse_hf=_qwen2,
    checked_against="transformers Qwen2ForCausalLM (q/k/v biases, GQA, sliding-window layers)",
)
class Qwen2ForCausalLM(CausalLM):
    pass


def every_layer_slides(cfg: dict[str, Any]) -> dict[str, Any]:
    """Mistral, Phi-3: one window for every layer when `sliding_window` is set."""
    if cfg.get("layer_types") or not cfg.get("sliding_window"):
        return {}
    return {"layer_types": sliding_pattern(cfg["num_hidden_layers"], lambda i: True)}


@register(
    "mistral",
    architectures=("MistralForCausalLM",),
    parse_hf=every_layer_slides,
    checked_against="transformers MistralForCausalLM (GQA, sliding window shorter than the prompts)",
)
class MistralForCausalLM(CausalLM):
    pass
