"""Gemma 3 (text): Gemma 2's layer with per-head (1 + w) q/k norms, five sliding layers per
global one (`sliding_window_pattern`), sliding layers on plain RoPE at their own base
(`rope_local_base_freq`, 10k) and global layers at rope_theta with its scaling (linear x8
for 4B and up). Soft-caps are off unless the config sets them.

The 4B/12B/27B checkpoints are multimodal (Gemma3ForConditionalGeneration): their language
model is served text-only (config from `text_config`, vision tower and projector skipped)."""

from __future__ import annotations

from typing import Any

from .config import sliding_pattern
from .gemma2 import GemmaCausalLM, gemma_common
from .registry import register


def _gemma3(cfg: dict[str, Any]) -> dict[str, Any]:
    kw = gemma_common(cfg)
    kw["qk_norm"] = True
    if not cfg.get("layer_types"):
        pattern = cfg.get("sliding_window_pattern", 6)
        kw["layer_types"] = sliding_pattern(cfg["num_hidden_layers"], lambda i: (i + 1) % pattern != 0)
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" not in rope:  # 4.x keys; transformers' defaults when absent
        kw["local_rope_theta"] = float(cfg.get("rope_local_base_freq", 10000.0))
        kw["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 1000000.0)))
    return kw


# Language-model prefixes of the multimodal checkpoints: transformers 5.x saves model.language_model.*,
# 4.x language_model.model.* and language_model.lm_head.
_LM_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_NOT_TEXT = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


@register(
    "gemma3",
    architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    model_types=("gemma3_text", "gemma3"),
    parse_hf=_gemma3,
    checked_against="transformers Gemma3ForCausalLM (q/k norms, 5:1 sliding/global pattern with a window "
    "shorter than the prompts, local/global RoPE bases, linear RoPE scaling on global layers); "
    "Gemma3ForConditionalGeneration text-only",
)
class Gemma3ForCausalLM(GemmaCausalLM):
    def checkpoint_name(self, name: str) -> str | None:
        if name.startswith(_NOT_TEXT):
            return None
        for old, new in _LM_PREFIXES:
            if name.startswith(old):
                return new + name[len(old) :]
        return name
