"""Mixture-of-experts building blocks on top of the shared decoder blocks (runtime/models/layers.py).

Owns the sparse MoE block (router, stacked expert weights, optional shared expert),
the decoder layer that puts it where the dense families have their gated MLP, and
`MoeForCausalLM`: the `CausalLM` skeleton with those layers plus the mapping of Hugging
Face's per-expert weight names onto the stacked tensors. Attention is layers.Attention
(its per-head q/k RMSNorm serves Qwen3-MoE as it serves dense Qwen3). Families
(runtime/models/mixtral.py, qwen3_moe.py) register themselves and say which HF names
they use; `qwen_moe_fields` reads the Qwen-MoE config.json keys they share.

Expert weights are stacked per layer as `mlp.experts.gate_up_proj` [E, 2I, H] (rows
[gate | up], transformers 5.x's in-memory layout) and `mlp.experts.down_proj` [E, H, I],
the operands of `ops.fused_moe`. Routing is HF's: float32 softmax over the router
logits, top-k, renormalised when the config says (`moe_topk`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from fleetserve.kernels import KernelOps
from fleetserve.kernels.moe import moe_topk

from .config import ModelConfig
from .layers import Attention, CausalLM, DecoderLayer, GatedMLP, RMSNorm, _copy
from .registry import UnsupportedModelError


class Experts(nn.Module):
    """The routed experts of one layer, stacked: the weights `ops.fused_moe` reads."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))


class SharedExpertMLP(GatedMLP):
    """Qwen2-MoE's always-on expert: a dense gated MLP of its own width."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, inter: int):
        super().__init__(cfg.with_(intermediate_size=inter), ops)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.ops = ops
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert: SharedExpertMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SharedExpertMLP(cfg, ops, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = moe_topk(self.gate(x), self.top_k, self.renormalize)
        out = self.ops.fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MoeDecoderLayer(DecoderLayer):
    """The dense pre-norm decoder layer (same forward) with the MoE block in place of the gated
    MLP, except on the config's dense layers."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, layer: int):
        nn.Module.__init__(self)  # not DecoderLayer's: it would build a dense MLP only to replace it
        self.self_attn = Attention(cfg, ops, layer)
        self.mlp = SparseMoeBlock(cfg, ops) if cfg.is_moe_layer(layer) else GatedMLP(cfg, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


# Per-expert HF names: <layer>.<block>.experts.<j>.<proj>.weight. Which shard of which stacked tensor
# each projection fills: (parameter, shard) with shard 0 = gate rows, 1 = up rows, None = whole (down).
_EXPERT_NAME = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_SHARED_NAME = re.compile(r"^(model\.layers\.\d+\.mlp\.shared_expert)\.(gate_proj|up_proj)\.weight$")


class MoeForCausalLM(CausalLM):
    """CausalLM with MoE decoder layers. Subclasses set `expert_projections`: the HF per-expert
    projection names as (gate, up, down), and `block_aliases`: HF module names of the MoE
    block other than `mlp`."""

    layer_cls = MoeDecoderLayer
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    block_aliases: tuple[str, ...] = ()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """CausalLM's loading, plus per-expert tensors copied into the stacked ones (HF checkpoints on
        disk hold one tensor per expert and projection; transformers 5.x state dicts already hold
        the stacked `experts.gate_up_proj` / `experts.down_proj`, which load as they are)."""
        params = dict(self.named_parameters())
        cfg = self.config
        gate, up, down = self.expert_projections
        shard_of = {gate: 0, up: 1, down: None}
        # widths from the built modules: tensor parallelism holds one rank's slice of each
        blocks = [m for m in self.modules() if isinstance(m, SparseMoeBlock)]
        inter = blocks[0].experts.down_proj.shape[2] if blocks else cfg.moe_intermediate_size
        shared_mlp = blocks[0].shared_expert if blocks else None
        shared = shared_mlp.down_proj.in_features if shared_mlp is not None else 0
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
                        fill(
                            pname,
                            dst[j].narrow(0, shard * inter, inter),
                            tensor,
                            name,
                            (j, shard),
                            2 * cfg.num_experts,
                        )
                    continue
                m = _SHARED_NAME.match(name)
                if m is not None:  # the shared expert's width is not the dense MLP's: fuse it here
                    pname = f"{m.group(1)}.gate_up_proj.weight"
                    shard = 0 if m.group(2) == "gate_proj" else 1
                    fill(
                        pname,
                        _param(params, pname, name).narrow(0, shard * shared, shared),
                        tensor,
                        name,
                        shard,
                        2,
                    )
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


def qwen_moe_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The MoE part of a Qwen3-MoE / Qwen2-MoE config.json (4.x and 5.x key names): experts,
    top-k, renormalisation and the layers that stay dense (mlp_only_layers, and those off the
    decoder_sparse_step grid)."""
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError(
            f"{cfg.get('model_type') or 'Qwen-MoE'} with use_sliding_window=True is not supported"
        )
    step = cfg.get("decoder_sparse_step", 1) or 1
    only = set(cfg.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(cfg["num_hidden_layers"]) if i in only or (i + 1) % step)
    return dict(
        num_experts=cfg.get("num_experts") or cfg.get("num_local_experts"),
        num_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob")),
        dense_layers=dense,
    )
