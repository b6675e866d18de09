"""The Llama-family decoder (Llama 2/3, Qwen2, Mistral): weights and forward pass.

Owns the model's parameters (fused `qkv_proj` / `gate_up_proj`), the float32 RoPE
table and the mapping of Hugging Face weight names onto the fused layout. It owns
no state between steps: the paged KV cache tensors and the AttentionMetadata of a
step come from the model runner. All math goes through a `KernelOps` set, so the
same code runs the torch references (CPU) and the Triton kernels (GPU).

The forward pass has no host syncs and no per-token Python loops, so it can be
captured in a CUDA graph. Tokens of all sequences of a step are packed: [T, ...].
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fleetserve.kernels import KernelOps

from ..attention import AttentionMetadata
from .config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim/2], with linear or llama3 scaling (as in HF)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    if s["rope_type"] == "freq_factors":  # llama.cpp stores llama3 scaling as per-pair divisors (rope_freqs)
        return inv_freq / torch.tensor(s["factors"], dtype=torch.float32, device=device)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin_cache(cfg: ModelConfig, device=None) -> torch.Tensor:
    """[max_position_embeddings, head_dim] float32 rows of [cos | sin]; kept float32 whatever the model dtype."""
    inv_freq = rope_inv_freq(cfg, device)
    t = torch.arange(cfg.max_position_embeddings, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: KernelOps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x, residual=None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, positions, x, attn: AttentionMetadata, kv_cache, cos_sin_cache):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rotary_embedding(positions, q, k, cos_sin_cache)
        self.ops.write_kv_cache(k, v, kv_cache, attn.slot_mapping)
        o = self.ops.paged_attention(q, kv_cache, attn.query_start_loc, attn.seq_lens, attn.block_tables,
                                     attn.max_query_len, attn.max_seq_len, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.self_attn = Attention(cfg, ops)
        self.mlp = MLP(cfg, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, positions, x, residual, attn, kv_cache, cos_sin_cache):
        # The residual add is fused into the norms: each returns (normed, running sum).
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, attn, kv_cache, cos_sin_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


# HF per-projection weights -> (our fused parameter, shard index). Shard order = layout order.
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.config = cfg
        self.ops = ops
        self.model = LlamaBackbone(cfg, ops)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(cfg), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: one [2, N, block_size, Hkv, D] per layer -> hidden [T, H]."""
        x, residual = self.model.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(positions, x, residual, attn, kv_cache, self.cos_sin_cache)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (only the rows to sample) -> float32 logits [N, V]."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half() must not round the RoPE table: rebuild it in float32 where it landed.
        super()._apply(fn, recurse)
        cache = self.cos_sin_cache
        if cache.dtype != torch.float32 and cache.device.type != "meta":
            self.cos_sin_cache = rope_cos_sin_cache(self.config, cache.device)
        return self

    def reset_rope_cache(self) -> None:
        """Recompute the RoPE table in place (after `to_empty`, which leaves buffers uninitialised)."""
        self.cos_sin_cache = rope_cos_sin_cache(self.config, self.cos_sin_cache.device)

    def weight_names(self) -> set[str]:
        """The parameter names load_weights must fill."""
        return {n for n, _ in self.named_parameters()}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face-named tensors into our (fused) parameters.

        Returns the names of parameters that were completely filled (a fused one only when
        all its shards came); raises KeyError on a name this model has no place for.
        """
        params = dict(self.named_parameters())
        cfg = self.config
        qkv_sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        gate_up_sizes = [cfg.intermediate_size] * 2
        shards_seen: dict[str, set[int]] = {}
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints sometimes store a copy of the embedding
            parts = name.split(".")
            fused = _FUSED.get(parts[-2]) if len(parts) >= 2 else None
            if fused is None:
                if name not in params:
                    raise KeyError(f"unexpected weight {name!r}")
                _copy(params[name], tensor, name)
                loaded.add(name)
                continue
            target, shard = fused
            pname = ".".join(parts[:-2] + [target, parts[-1]])
            if pname not in params:
                raise KeyError(f"unexpected weight {name!r}")
            sizes = qkv_sizes if target == "qkv_proj" else gate_up_sizes
            offset = sum(sizes[:shard])
            _copy(params[pname].narrow(0, offset, sizes[shard]), tensor, name)
            seen = shards_seen.setdefault(pname, set())
            seen.add(shard)
            if len(seen) == len(sizes):
                loaded.add(pname)
        return loaded


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def build_model(model_config: ModelConfig, ops: KernelOps, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", cls: type = None) -> LlamaForCausalLM:
    """An uninitialised model (weights empty) in `dtype` on `device`; fill it with load_weights
    or runtime.loader's dummy initialiser. The RoPE table is ready, in float32. `cls`: the
    family's class (runtime/models/__init__.py picks it), LlamaForCausalLM by default."""
    model_config.validate()
    with torch.device("meta"):  # no host allocation or init kernels for weights about to be overwritten
        model = (cls or LlamaForCausalLM)(model_config, ops).to(dtype)
    model = model.to_empty(device=device)
    model.reset_rope_cache()
    return model.eval().requires_grad_(False)
