"""Mixture-of-experts building blocks on top of the Llama decoder (runtime/models/llama.py).

Owns the sparse MoE block (router, stacked expert weights, optional shared expert),
the decoder layer that puts it where Llama has its dense MLP, the per-head q/k RMSNorm
attention of Qwen3(-MoE), and `MoeForCausalLM`: the Llama model with those layers
plus the mapping of Hugging Face's per-expert weight names onto the stacked tensors.
Families (runtime/models/mixtral.py, qwen3_moe.py) only say which HF names they use.

Expert weights are stacked per layer as `mlp.experts.gate_up_proj` [E, 2I, H] (rows
[gate | up], transformers 5.x's in-memory layout) and `mlp.experts.down_proj` [E, H, I],
the operands of `ops.fused_moe`. Routing is HF's: float32 softmax over the router
logits, top-k, renormalised when the config says (`moe_topk`).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

from fleetserve.kernels import KernelOps
from fleetserve.kernels.moe import moe_topk

from .config import ModelConfig
from .llama import MLP, Attention, DecoderLayer, LlamaForCausalLM, RMSNorm, _copy


class Experts(nn.Module):
    """The routed experts of one layer, stacked: the weights `ops.fused_moe` reads."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))


class SharedExpertMLP(MLP):
    """Qwen2-MoE's always-on expert: a dense gated MLP of its own width."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, inter: int):
        nn.Module.__init__(self)
        self.ops = ops
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.ops = ops
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SharedExpertMLP(cfg, ops, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = moe_topk(self.gate(x), self.top_k, self.renormalize)
        out = self.ops.fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class QKNormAttention(Attention):
    """Llama attention with a per-head RMSNorm of q and k before RoPE (Qwen3, Qwen3-MoE).
    TODO(merge): the dense Qwen3 lane adds the same; keep one."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__(cfg, ops)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops)

    def forward(self, positions, x, attn, kv_cache, cos_sin_cache):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(T, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(T, self.num_kv_heads, self.head_dim))
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rotary_embedding(positions, q, k, cos_sin_cache)
        self.ops.write_kv_cache(k, v, kv_cache, attn.slot_mapping)
        o = self.ops.paged_attention(q, kv_cache, attn.query_start_loc, attn.seq_lens, attn.block_tables,
                                     attn.max_query_len, attn.max_seq_len, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))


class MoeDecoderLayer(DecoderLayer):
    """Llama's decoder layer (same forward) with the MoE block in place of the dense MLP,
    except on the config's dense layers."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, layer_idx: int):
        nn.Module.__init__(self)
        self.self_attn = QKNormAttention(cfg, ops) if cfg.qk_norm else Attention(cfg, ops)
        self.mlp = SparseMoeBlock(cfg, ops) if cfg.is_moe_layer(layer_idx) else MLP(cfg, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


# Per-expert HF names: <layer>.<block>.experts.<j>.<proj>.weight. Which shard of which stacked tensor
# each projection fills: (parameter, shard) with shard 0 = gate rows, 1 = up rows, None = whole (down).
_EXPERT_NAME = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_SHARED_NAME = re.compile(r"^(model\.layers\.\d+\.mlp\.shared_expert)\.(gate_proj|up_proj)\.weight$")


class MoeForCausalLM(LlamaForCausalLM):
    """Llama with MoE decoder layers. Subclasses set `expert_projections`: the HF per-expert
    projection names as (gate, up, down), and `block_aliases`: HF module names of the MoE
    block other than `mlp`."""

    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    block_aliases: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__(cfg, ops)  # built on the meta device (build_model): the dense layers cost nothing
        self.model.layers = nn.ModuleList(MoeDecoderLayer(cfg, ops, i) for i in range(cfg.num_layers))

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Llama's loading, plus per-expert tensors copied into the stacked ones (HF checkpoints on
        disk hold one tensor per expert and projection; transformers 5.x state dicts already hold
        the stacked `experts.gate_up_proj` / `experts.down_proj`, which load as they are)."""
        params = dict(self.named_parameters())
        cfg = self.config
        gate, up, down = self.expert_projections
        shard_of = {gate: 0, up: 1, down: None}
        inter, shared = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        seen: dict[str, set] = {}
        need: dict[str, int] = {}

        def fill(pname: str, dst: torch.Tensor, tensor: torch.Tensor, name: str, key, total: int) -> None:
            _copy(dst, tensor, name)
            seen.setdefault(pname, set()).add(key)
            need[pname] = total

        def others() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                for alias in self.block_aliases:
                    name = name.replace(f".{alias}.", ".mlp.")
                m = _EXPERT_NAME.match(name)
                if m is not None and m.group(3) in shard_of:
                    prefix, j, proj = m.group(1), int(m.group(2)), m.group(3)
                    shard = shard_of[proj]
                    if shard is None:
                        pname = f"{prefix}.mlp.experts.down_proj"
                        dst = _param(params, pname, name)
                        _check_expert(dst, j, name)
                        fill(pname, dst[j], tensor, name, j, cfg.num_experts)
                    else:
                        pname = f"{prefix}.mlp.experts.gate_up_proj"
                        dst = _param(params, pname, name)
                        _check_expert(dst, j, name)
                        fill(pname, dst[j].narrow(0, shard * inter, inter), tensor, name, (j, shard),
                             2 * cfg.num_experts)
                    continue
                m = _SHARED_NAME.match(name)
                if m is not None:  # the shared expert's width is not the dense MLP's: fuse it here
                    pname = f"{m.group(1)}.gate_up_proj.weight"
                    shard = 0 if m.group(2) == "gate_proj" else 1
                    fill(pname, _param(params, pname, name).narrow(0, shard * shared, shared), tensor, name,
                         shard, 2)
                    continue
                yield name, tensor

        loaded = super().load_weights(others())
        return loaded | {p for p, keys in seen.items() if len(keys) == need[p]}


def _param(params: dict, pname: str, name: str) -> torch.Tensor:
    if pname not in params:
        raise KeyError(f"unexpected weight {name!r}")
    return params[pname]


def _check_expert(dst: torch.Tensor, j: int, name: str) -> None:
    if j >= dst.shape[0]:
        raise ValueError(f"weight {name!r}: expert {j} out of range (the config has {dst.shape[0]} experts)")
