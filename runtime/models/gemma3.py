"""Gemma 3 (text): Gemma 2's layer with per-head (1 + w) q/k norms, five sliding layers per
global one (`sliding_window_pattern`), sliding layers on plain RoPE at their own base
(`rope_local_base_freq`, 10k) and global layers at rope_theta with its scaling (linear x8
for 4B and up). Soft-caps are off unless the config sets them."""
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


@register("gemma3", architectures=("Gemma3ForCausalLM",), model_types=("gemma3_text",), parse_hf=_gemma3,
          checked_against="transformers Gemma3ForCausalLM (q/k norms, 5:1 sliding/global pattern with a window "
                          "shorter than the prompts, local/global RoPE bases, linear RoPE scaling on global layers)")
class Gemma3ForCausalLM(GemmaCausalLM):
    pass
