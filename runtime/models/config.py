"""ModelConfig: our parsed, validated view of a model's architecture.

Built from a Hugging Face config.json (`from_hf_config`), from GGUF metadata
(runtime/loader/gguf_loader.py) or from a named preset (`PRESETS`, dummy-weight
benchmarks). The model code reads only this object, never a transformers config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from .registry import UnsupportedModelError, family, family_of_hf_config

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")

__all__ = ["ModelConfig", "UnsupportedModelError", "PRESETS", "hf_config_dict"]


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    """Model family (a key of registry.FAMILIES): "llama", "qwen2", "mistral", "qwen3", "gemma2", ...,
    or a mixture of experts: "mixtral", "qwen3_moe", "qwen2_moe" (runtime/models/moe.py)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """None for plain RoPE, else {"rope_type": "linear"|"llama3"|"longrope", ...} with HF's keys
    (longrope also carries its resolved "attention_factor"), or {"rope_type": "freq_factors",
    "factors": [...]} from a GGUF's rope_freqs tensor. Applies to full-attention layers, and to
    sliding ones too unless `local_rope_theta` is set."""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2; `attention_bias` elsewhere)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    """The checkpoint's stored dtype ("bfloat16", ...), if the config says."""
    sliding_window: int | None = None
    """Window of the sliding-attention layers: a query at position p sees keys > p - window.
    None when no layer slides."""
    layer_types: tuple[str, ...] = ()
    """Per layer "full_attention" or "sliding_attention"; empty = every layer full."""
    hidden_act: str = "silu"
    """Gated-MLP activation: "silu" or "gelu_pytorch_tanh" (Gemma)."""
    qk_norm: bool = False
    """Per-head RMSNorm of q and k before RoPE (Qwen3, Qwen3-MoE, Gemma 3)."""
    query_pre_attn_scalar: float | None = None
    """Attention scale is query_pre_attn_scalar ** -0.5 (Gemma); None = head_dim ** -0.5."""
    attn_logit_softcap: float | None = None
    """Attention scores become c * tanh(s / c) (Gemma 2); None = no capping."""
    final_logit_softcap: float | None = None
    """Output logits become c * tanh(l / c) (Gemma 2); None = no capping."""
    local_rope_theta: float | None = None
    """RoPE base of the sliding-attention layers, which then get plain (unscaled) RoPE (Gemma 3);
    None = the same RoPE as full layers."""
    # -- mixture of experts (0 experts = a dense model) --
    num_experts: int = 0
    """Routed experts per MoE layer (Mixtral 8, Qwen3-30B-A3B 128)."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to (top-k)."""
    moe_intermediate_size: int = 0
    """Width of one routed expert's gated MLP (Mixtral: intermediate_size)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing probabilities to sum to 1 (Mixtral always; Qwen-MoE per config)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: width of the always-on shared expert (gated by sigmoid(shared_expert_gate)); 0 = none."""
    dense_layers: tuple[int, ...] = ()
    """Layers that keep a dense MLP of intermediate_size (Qwen-MoE mlp_only_layers / decoder_sparse_step)."""
    name: str | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i not in self.dense_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert of one layer (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None when it attends to the whole context."""
        if self.sliding_window and self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_params(self) -> int:
        """Parameter count of the built model (counted on the meta device: no memory, any family)."""
        import torch

        with torch.device("meta"):
            model = family(self.arch).model_cls(self, _NoOps)
        return sum(p.numel() for p in model.parameters())

    def num_active_params(self) -> int:
        """Parameters one token's forward uses: only its top-k experts of each MoE layer."""
        unused = self.num_moe_layers * (self.num_experts - self.num_experts_per_tok) * self.expert_params
        return self.num_params() - unused

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str | None = None) -> ModelConfig:
        """Parse a config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        fam = family_of_hf_config(cfg)
        if isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg:
            # a multimodal wrapper (Gemma3ForConditionalGeneration): serve its language model; the
            # wrapper's own token ids and dtype, where it sets them, win over the text config's defaults
            top = {
                k: cfg[k]
                for k in ("bos_token_id", "eos_token_id", "torch_dtype", "dtype")
                if cfg.get(k) is not None
            }
            cfg = {**cfg["text_config"], **top, "architectures": cfg.get("architectures")}
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=True is not supported")
        num_heads = cfg["num_attention_heads"]
        num_layers = cfg["num_hidden_layers"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rope = cfg.get("rope_parameters") or {}
        local_theta = None
        if "full_attention" in rope or "sliding_attention" in rope:  # 5.x per-layer-type RoPE (Gemma 3)
            local = dict(rope.get("sliding_attention") or {})
            rope = rope.get("full_attention") or {}
            if local:
                local_theta = float(local.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
                if _normalize_rope_scaling(local, cfg) is not None:
                    raise UnsupportedModelError("RoPE scaling on sliding-attention layers is not supported")
        rope = dict(rope)
        partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise UnsupportedModelError(
                f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported"
            )
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = _normalize_rope_scaling(rope if rope else cfg.get("rope_scaling"), cfg)

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        layer_types = cfg.get("layer_types") or ()
        if layer_types:
            if len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
                raise UnsupportedModelError(
                    f"unsupported layer_types {layer_types!r} (expected {num_layers} of {LAYER_TYPES})"
                )
        kw: dict[str, Any] = dict(
            arch=fam.name,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            sliding_window=cfg.get("sliding_window"),
            layer_types=tuple(layer_types),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            local_rope_theta=local_theta,
            name=name,
        )
        if fam.parse_hf is not None:
            kw.update(fam.parse_hf(cfg))
        if not kw["sliding_window"] or "sliding_attention" not in kw["layer_types"]:
            kw["sliding_window"] = None
            kw["layer_types"] = ()
        return cls(**kw).validate()

    def validate(self) -> ModelConfig:
        family(self.arch)
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts ({self.num_experts})"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: {SUPPORTED_ACTIVATIONS}"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
        return self

    def with_(self, **kw) -> ModelConfig:
        return replace(self, **kw)


class _NoOps:
    """Stands in for KernelOps when a model is only built to count its parameters."""

    name = "none"


def sliding_pattern(num_layers: int, is_sliding) -> tuple[str, ...]:
    """layer_types from a predicate on the layer index (4.x configs that carry no layer_types)."""
    return tuple("sliding_attention" if is_sliding(i) else "full_attention" for i in range(num_layers))


def _normalize_rope_scaling(scaling: dict | None, cfg: dict[str, Any]) -> dict | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "su":  # Phi-3's first name for longrope
        rope_type = "longrope"
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope scaling {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
        )
    scaling["rope_type"] = rope_type
    if rope_type == "longrope":
        # Resolve the defaults the way transformers does: factor = max_pos / original max_pos, and the
        # cos/sin multiplier sqrt(1 + ln(factor) / ln(original max_pos)).
        # (the top-level original_max_position_embeddings wins, as in transformers' Phi-3 config)
        orig = (
            cfg.get("original_max_position_embeddings")
            or scaling.get("original_max_position_embeddings")
            or cfg.get("max_position_embeddings")
        )
        if orig is None:
            raise UnsupportedModelError("longrope scaling needs original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = int(orig)
        factor = scaling.get("factor") or cfg.get("max_position_embeddings", orig) / orig
        if scaling.get("attention_factor") is None:
            scaling["attention_factor"] = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
            )
        scaling["short_factor"] = [float(x) for x in scaling["short_factor"]]
        scaling["long_factor"] = [float(x) for x in scaling["long_factor"]]
    return scaling


def hf_config_dict(mc: ModelConfig) -> dict[str, Any]:
    """The transformers 5.x config.json dict of a ModelConfig (HF baselines of dummy-weight presets;
    `ModelConfig.from_hf_config(hf_config_dict(mc))` gives mc back)."""
    fam = family(mc.arch)
    rope: dict[str, Any] = {"rope_theta": mc.rope_theta, "rope_type": "default"}
    if mc.rope_scaling:
        rope.update(mc.rope_scaling)
    if mc.local_rope_theta is not None:
        rope = {
            "full_attention": rope,
            "sliding_attention": {"rope_theta": mc.local_rope_theta, "rope_type": "default"},
        }
    d: dict[str, Any] = dict(
        architectures=[fam.architectures[0]],
        model_type=fam.model_types[0],
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        rms_norm_eps=mc.rms_norm_eps,
        rope_parameters=rope,
        max_position_embeddings=mc.max_position_embeddings,
        tie_word_embeddings=mc.tie_word_embeddings,
        attention_bias=mc.qkv_bias,
        bos_token_id=mc.bos_token_id,
        eos_token_id=list(mc.eos_token_ids) or None,
        sliding_window=mc.sliding_window,
        hidden_act=mc.hidden_act,
    )
    if mc.arch.startswith("gemma"):  # Gemma-only keys (explicit None: their configs default the caps on)
        d.update(
            hidden_activation=mc.hidden_act,
            query_pre_attn_scalar=mc.query_pre_attn_scalar,
            attn_logit_softcapping=mc.attn_logit_softcap,
            final_logit_softcapping=mc.final_logit_softcap,
        )
    if mc.is_moe:  # each MoE family's own keys (Mixtral's experts are `intermediate_size` wide)
        d["num_experts_per_tok"] = mc.num_experts_per_tok
        if mc.arch == "mixtral":
            d.update(num_local_experts=mc.num_experts, intermediate_size=mc.moe_intermediate_size)
        else:
            d.update(
                num_experts=mc.num_experts,
                moe_intermediate_size=mc.moe_intermediate_size,
                norm_topk_prob=mc.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=list(mc.dense_layers),
            )
        if mc.arch == "qwen2_moe":
            d.update(shared_expert_intermediate_size=mc.shared_expert_intermediate_size, qkv_bias=mc.qkv_bias)
    if mc.layer_types:
        d["layer_types"] = list(mc.layer_types)
        d["use_sliding_window"] = True
        d["max_window_layers"] = 0
    if mc.torch_dtype:
        d["dtype"] = mc.torch_dtype
    if mc.rope_scaling and mc.rope_scaling["rope_type"] == "longrope":
        d["original_max_position_embeddings"] = mc.rope_scaling["original_max_position_embeddings"]
    return d


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Real shapes of public checkpoints, for dummy-weight benchmarks (see shared/notes/anchors.md).
PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        arch="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        torch_dtype="bfloat16",
        name="llama-3.2-1b",
    ),
    "llama-3.1-8b": ModelConfig(
        arch="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        torch_dtype="bfloat16",
        name="llama-3.1-8b",
    ),
    # Qwen/Qwen3-8B config.json: 36 layers, 32 q / 8 kv heads of 128, q/k norms, untied embeddings.
    "qwen3-8b": ModelConfig(
        arch="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        qk_norm=True,
        bos_token_id=151643,
        eos_token_ids=(151645,),
        torch_dtype="bfloat16",
        name="qwen3-8b",
    ),
    # -- mixture of experts --
    "mixtral-8x7b": ModelConfig(
        arch="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
        torch_dtype="bfloat16",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=14336,
        norm_topk_prob=True,
        name="mixtral-8x7b",
    ),
    "qwen3-30b-a3b": ModelConfig(
        arch="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_ids=(151645, 151643),
        torch_dtype="bfloat16",
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        qk_norm=True,
        name="qwen3-30b-a3b",
    ),
}
# meta-llama/Llama-3.1-70B config.json (shared/bench/vllm_peer/config-llama-3.1-70b.json): the 8B's layer with
# 8,192 hidden, 28,672 MLP, 64 query heads (8 KV), 80 layers; 141 GB in bf16, so only tensor-parallel on H200s (#18).
PRESETS["llama-3.1-70b"] = PRESETS["llama-3.1-8b"].with_(
    hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, name="llama-3.1-70b"
)
