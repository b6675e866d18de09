"""ModelConfig: our parsed, validated view of a model's architecture.

Built from a Hugging Face config.json (`from_hf_config`), from GGUF metadata
(runtime/loader/gguf_loader.py) or from a named preset (`PRESETS`, dummy-weight
benchmarks). The model code reads only this object, never a transformers config.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

# HF `architectures` entry -> our family name. One model class serves all three.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    # -- mixture of experts (runtime/models/mixtral.py, qwen3_moe.py) --
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral",
                "mixtral": "mixtral", "qwen3_moe": "qwen3_moe", "qwen2_moe": "qwen2_moe"}
MOE_ARCHS = ("mixtral", "qwen3_moe", "qwen2_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The config describes an architecture or feature this engine does not implement."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    """Model family: "llama", "qwen2" or "mistral" (same code; only qkv_bias / defaults differ), or a
    mixture of experts: "mixtral", "qwen3_moe", "qwen2_moe" (runtime/models/moe.py)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    """None for plain RoPE, else {"rope_type": "linear"|"llama3", ...} with HF's keys, or
    {"rope_type": "freq_factors", "factors": [...]} from a GGUF's rope_freqs tensor."""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """Qwen2 has biases on q/k/v projections."""
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: Optional[str] = None
    """The checkpoint's stored dtype ("bfloat16", ...), if the config says."""
    sliding_window: Optional[int] = None
    """Mistral v0.1 / Qwen2 sliding window; attention here is always full, so the
    engine should cap max_model_len at this value when it is set."""
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
    qk_norm: bool = False
    """Per-head RMSNorm of q and k before RoPE (Qwen3, Qwen3-MoE)."""
    name: Optional[str] = None
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

    def num_params(self) -> int:
        H, I, V = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = H * (self.q_size + 2 * self.kv_size) + self.q_size * H
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        layer = attn + 2 * H + (2 * self.head_dim if self.qk_norm else 0)
        total = V * H * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + H
        for i in range(self.num_layers):
            if not self.is_moe_layer(i):
                total += 3 * H * I
            else:  # router + experts (+ shared expert and its gate)
                total += self.num_experts * (H + self.expert_params)
                if self.shared_expert_intermediate_size:
                    total += 3 * H * self.shared_expert_intermediate_size + H
        return total

    def num_active_params(self) -> int:
        """Parameters one token's forward uses: only its top-k experts of each MoE layer."""
        unused = self.num_moe_layers * (self.num_experts - self.num_experts_per_tok) * self.expert_params
        return self.num_params() - unused

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: Optional[str] = None) -> "ModelConfig":
        """Parse a config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and not archs:
            arch = _MODEL_TYPES.get(cfg.get("model_type", ""))
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported model architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {act!r} (only silu)")
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=True is not supported")
        if arch == "qwen2" and cfg.get("use_sliding_window"):
            raise UnsupportedModelError("Qwen2 with use_sliding_window=True is not supported")

        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = rope if rope else cfg.get("rope_scaling")
        scaling = _normalize_rope_scaling(scaling)

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        qkv_bias = arch == "qwen2" or bool(cfg.get("attention_bias", False))
        sliding = cfg.get("sliding_window") if arch in ("mistral", "mixtral") else None
        moe = _moe_fields(arch, cfg) if arch in MOE_ARCHS else {}
        if arch == "qwen2_moe":
            qkv_bias = bool(cfg.get("qkv_bias", True))  # transformers 4.x Qwen2-MoE always has q/k/v biases
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            sliding_window=sliding,
            name=name,
            **moe,
        )

    def validate(self) -> "ModelConfig":
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts ({self.num_experts})")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for RoPE, got {self.head_dim}")
        return self

    def with_(self, **kw) -> "ModelConfig":
        return replace(self, **kw)


def _moe_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The MoE part of a Mixtral / Qwen3-MoE / Qwen2-MoE config.json (4.x and 5.x key names)."""
    if arch == "mixtral":
        return dict(num_experts=cfg["num_local_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"{arch} with use_sliding_window=True is not supported")
    n = cfg.get("num_experts") or cfg.get("num_local_experts")
    step = cfg.get("decoder_sparse_step", 1) or 1
    only = set(cfg.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(cfg["num_hidden_layers"]) if i in only or (i + 1) % step)
    return dict(num_experts=n, num_experts_per_tok=cfg["num_experts_per_tok"],
                moe_intermediate_size=cfg["moe_intermediate_size"], norm_topk_prob=bool(cfg.get("norm_topk_prob")),
                shared_expert_intermediate_size=(cfg.get("shared_expert_intermediate_size") or 0)
                if arch == "qwen2_moe" else 0,
                dense_layers=dense, qk_norm=arch == "qwen3_moe")


def _normalize_rope_scaling(scaling: Optional[dict]) -> Optional[dict]:
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope scaling {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    scaling["rope_type"] = rope_type
    return scaling


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Real shapes of public checkpoints, for dummy-weight benchmarks (see shared/notes/anchors.md).
PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009), torch_dtype="bfloat16",
        name="llama-3.2-1b"),
    "llama-3.1-8b": ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
        torch_dtype="bfloat16", name="llama-3.1-8b"),
    # -- mixture of experts --
    "mixtral-8x7b": ModelConfig(
        arch="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
        torch_dtype="bfloat16", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
        norm_topk_prob=True, name="mixtral-8x7b"),
    "qwen3-30b-a3b": ModelConfig(
        arch="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=40960, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_ids=(151645, 151643), torch_dtype="bfloat16", num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, qk_norm=True, name="qwen3-30b-a3b"),
}
