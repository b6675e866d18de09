"""Gemma 2: embeddings scaled by sqrt(hidden), (1 + w) RMSNorms, norms before *and after*
attention and MLP, GELU(tanh)-gated MLP, attention scale query_pre_attn_scalar ** -0.5,
attention-logit and final-logit soft-capping, sliding and global layers alternating.

Our RMSNorm multiplies by its weight, so checkpoint norm weights w are stored as 1 + w
(`transform_weight`); the GGUF reader hands llama.cpp's 1 + w back as w first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fleetserve.kernels import KernelOps

from .config import ModelConfig, sliding_pattern
from .layers import Attention, CausalLM, GatedMLP, RMSNorm
from .registry import UnsupportedModelError, register


class GemmaDecoderLayer(nn.Module):
    """h = x + post_attn_norm(attn(input_norm(x))); out = h + post_ffw_norm(mlp(pre_ffw_norm(h)))."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, layer: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, ops, layer)
        self.mlp = GatedMLP(cfg, ops)
        self.input_layernorm = RMSNorm(H, eps, ops)
        self.post_attention_layernorm = RMSNorm(H, eps, ops)
        self.pre_feedforward_layernorm = RMSNorm(H, eps, ops)
        self.post_feedforward_layernorm = RMSNorm(H, eps, ops)

    def forward(self, positions, x, residual, attn, kv_cache, rope_tables):
        # (x, residual) carry the hidden state as x + residual; the fused norms do the adds.
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, attn, kv_cache, rope_tables))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaCausalLM(CausalLM):
    """Shared by Gemma 2 and 3: the layer, the embedding scale and the (1 + w) norm weights."""

    layer_cls = GemmaDecoderLayer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        # transformers rounds sqrt(hidden) to the model dtype before the multiply: so do we
        return x * float(torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype))

    def transform_weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return tensor.float() + 1.0
        return tensor


def gemma_common(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError("Gemma with use_bidirectional_attention=True is not supported")
    return {
        "hidden_act": cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
        "query_pre_attn_scalar": cfg.get("query_pre_attn_scalar"),
        "attn_logit_softcap": cfg.get("attn_logit_softcapping"),
        "final_logit_softcap": cfg.get("final_logit_softcapping"),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
    }


def _gemma2(cfg: dict[str, Any]) -> dict[str, Any]:
    kw = gemma_common(cfg)
    if not cfg.get("layer_types"):  # 4.x configs: even layers slide
        kw["layer_types"] = sliding_pattern(cfg["num_hidden_layers"], lambda i: i % 2 == 0)
    return kw


@register(
    "gemma2",
    architectures=("Gemma2ForCausalLM",),
    parse_hf=_gemma2,
    checked_against="transformers Gemma2ForCausalLM (soft-caps, query_pre_attn_scalar, alternating "
    "sliding/global layers with a window shorter than the prompts, GQA)",
)
class Gemma2ForCausalLM(GemmaCausalLM):
    pass
