"""Tensor parallelism: how one model is split over N ranks, and the collectives that join it.

This module owns the shard layout and the parallel context; the model code in
runtime/models/ stays single-device (as in gpt-fast): `apply_tensor_parallel` takes a
model built on the meta device and, for one rank, shrinks its projections to that
rank's share and swaps in subclasses whose forward adds the collective:

  qkv_proj      column-parallel by heads: this rank's query heads and the KV heads they
                read (when there are fewer KV heads than ranks, each rank keeps the one
                KV head its query heads need: replicated across N / Hkv ranks); biases too
  o_proj        row-parallel (its input columns are this rank's heads), then all_reduce
  gate_up_proj  column-parallel ([gate | up] rows of this rank's slice of the MLP width)
  down_proj     row-parallel, then all_reduce
  experts       every routed expert split the same way (a slice of each expert's width, all
                experts on every rank: no expert parallelism); the router is replicated and
                the MoE block all_reduces once, after the routed experts and the shared
                expert (Qwen2-MoE, split like a dense MLP) have added their partial sums
  embed_tokens  vocabulary-parallel: ceil(V / N) rows per rank (zero rows past V); ids
                outside the rank's range embed to 0, then all_reduce
  LM head       vocabulary-parallel (the same rows: tied embeddings just work); each rank
                computes its slice of the logits, gathered on rank 0 only (others get None)
  norms, RoPE   replicated (Gemma's embedding scale and soft-caps are elementwise: unchanged)

`shard_weights` maps a checkpoint's (name, tensor) stream to this rank's slices: per
projection (q/k/v, gate/up, down; Mixtral's w1/w3/w2), fused ones as checkpoints store them
(Phi-3's qkv_proj and gate_up_proj, transformers 5.x's stacked experts), MLP widths read
from each tensor's own shape (a shared expert and a dense layer differ from the experts). A
safetensors tensor arrives as a lazy slice (safe_open().get_slice), so a rank reads only
its rows or columns from the file, never the whole model. GGUF tensors are dequantized
one at a time and then sliced (quantized blocks are not cut).

`ParallelContext` holds rank, world size and the process group (a torch.distributed
ProcessGroupGloo on CPU, ProcessGroupNCCL on CUDA, built on a private TCPStore: no
global default group, so several engines can live in one process one after another).
Validation of a requested size (`check_tensor_parallel`, `check_devices`) runs on the
model's config before any weight is read.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models.config import ModelConfig
from .models.moe import SparseMoeBlock
from .models.registry import UnsupportedModelError
from .utils import cdiv

TP_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "mixtral",
    "qwen3_moe",
    "qwen2_moe",
)
"""Model families whose layers apply_tensor_parallel knows how to split; any other is refused by
name (a test checks that every registered family is listed, so a new one must decide)."""


class TensorParallelError(ValueError):
    """A tensor_parallel_size this model or machine cannot run (raised before weights load)."""


# ------------------------------------------------------------------------------ validation
def check_tensor_parallel(cfg: ModelConfig, n: int) -> None:
    """Refuse a tensor_parallel_size the model cannot be split into, naming the reason."""
    if n == 1:
        return
    name = cfg.name or cfg.arch
    if cfg.arch not in TP_FAMILIES:
        raise UnsupportedModelError(
            f"tensor_parallel_size={n}: the {cfg.arch} family ({name}) cannot be split yet; "
            f"tensor parallelism supports {', '.join(TP_FAMILIES)}"
        )
    if cfg.num_heads % n:
        raise TensorParallelError(
            f"tensor_parallel_size={n} does not divide num_attention_heads={cfg.num_heads} of {name}"
        )
    if cfg.num_kv_heads % n and n % cfg.num_kv_heads:
        raise TensorParallelError(
            f"tensor_parallel_size={n} and num_key_value_heads={cfg.num_kv_heads} of {name}: one must "
            "divide the other (KV heads are split, or replicated when there are fewer than ranks)"
        )
    for field_name, width in mlp_widths(cfg).items():
        if width % n:
            raise TensorParallelError(
                f"tensor_parallel_size={n} does not divide {field_name}={width} of {name}"
            )


def mlp_widths(cfg: ModelConfig) -> dict[str, int]:
    """The MLP widths a split cuts, by config field: the dense MLP's (when some layer has one), the
    routed experts' and the shared expert's."""
    widths = {}
    if not cfg.is_moe or cfg.dense_layers:
        widths["intermediate_size"] = cfg.intermediate_size
    if cfg.is_moe:
        widths["moe_intermediate_size"] = cfg.moe_intermediate_size
    if cfg.shared_expert_intermediate_size:
        widths["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    return widths


def check_devices(n: int, device_type: str, visible: int) -> None:
    """One GPU per rank: refuse N larger than the visible CUDA devices (CPU ranks share the host)."""
    if device_type == "cuda" and n > visible:
        raise TensorParallelError(
            f"tensor_parallel_size={n} needs {n} GPUs, but {visible} "
            f"{'is' if visible == 1 else 'are'} visible (check CUDA_VISIBLE_DEVICES)"
        )


# ------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class ShardLayout:
    """Which heads, intermediate columns and vocabulary rows one rank holds."""

    rank: int
    world_size: int
    num_heads: int
    """Query heads on this rank."""
    kv_head_start: int
    num_kv_heads: int
    """KV heads on this rank (1 when replicated)."""
    head_dim: int
    total_heads: int
    total_kv_heads: int
    """The model's query and KV heads (the rows of a fused qkv_proj are [q | k | v] of all of them)."""
    vocab_per_rank: int
    """ceil(V / N): rows of the embedding / LM head per rank (zero-padded past V)."""
    vocab_size: int

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int, n: int) -> ShardLayout:
        check_tensor_parallel(cfg, n)
        hkv = cfg.num_kv_heads
        if hkv >= n:
            kv_loc, kv_start = hkv // n, rank * (hkv // n)
        else:  # fewer KV heads than ranks: N / Hkv consecutive ranks share (a copy of) one KV head
            kv_loc, kv_start = 1, rank * hkv // n
        return cls(
            rank=rank,
            world_size=n,
            num_heads=cfg.num_heads // n,
            kv_head_start=kv_start,
            num_kv_heads=kv_loc,
            head_dim=cfg.head_dim,
            total_heads=cfg.num_heads,
            total_kv_heads=hkv,
            vocab_per_rank=cdiv(cfg.vocab_size, n),
            vocab_size=cfg.vocab_size,
        )

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def row_range(self, proj: str) -> tuple[int, int]:
        """[start, end) of the checkpoint rows (q/k/v_proj) or columns (o_proj) of proj."""
        d = self.head_dim
        if proj in ("q_proj", "o_proj"):
            a = self.rank * self.num_heads * d
            return a, a + self.num_heads * d
        if proj in ("k_proj", "v_proj"):
            a = self.kv_head_start * d
            return a, a + self.num_kv_heads * d
        raise KeyError(proj)

    def qkv_rows(self) -> list[tuple[int, int]]:
        """This rank's [start, end) row ranges of a fused [q | k | v] checkpoint tensor (Phi-3)."""
        q, kv = self.total_heads * self.head_dim, self.total_kv_heads * self.head_dim
        (qa, qb), (ka, kb) = self.row_range("q_proj"), self.row_range("k_proj")
        return [(qa, qb), (q + ka, q + kb), (q + kv + ka, q + kv + kb)]

    def width_range(self, width: int, name: str) -> tuple[int, int]:
        """[start, end) of this rank's even share of an MLP width (of a dense MLP, an expert or a
        shared expert: each tensor says its own)."""
        if width % self.world_size:
            raise ValueError(f"weight {name!r}: width {width} does not split over {self.world_size} ranks")
        per = width // self.world_size
        return self.rank * per, (self.rank + 1) * per


_QKV = ("q_proj", "k_proj", "v_proj")  # split rows by heads (and biases)
_MLP_COLUMN = ("gate_proj", "up_proj", "w1", "w3")  # split rows: a slice of the width
_MLP_ROW = ("down_proj", "w2")  # split input columns
_VOCAB = ("embed_tokens.weight", "lm_head.weight")  # name endings (multimodal checkpoints add prefixes)


def kv_heads_per_rank(cfg: ModelConfig, n: int) -> int:
    return cfg.num_kv_heads if n == 1 else ShardLayout.of(cfg, 0, n).num_kv_heads


# ------------------------------------------------------------------------------ context
@dataclass
class ParallelContext:
    """One rank's view: its layout (set by the loader once the model's config is read) and the
    process group joining the ranks (set by `connect`)."""

    rank: int
    world_size: int
    device: torch.device
    layout: ShardLayout = field(default=None, repr=False)  # type: ignore[assignment]
    group: Any = field(default=None, repr=False)
    """torch.distributed ProcessGroupGloo / ProcessGroupNCCL; None until `connect`."""
    store: Any = field(default=None, repr=False)
    on_error: Any = field(default=None, repr=False)
    """exception -> the exception to raise instead when a collective fails (rank 0: names the dead rank)."""

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def set_model(self, cfg: ModelConfig) -> ShardLayout:
        self.layout = ShardLayout.of(cfg, self.rank, self.world_size)
        return self.layout

    def connect(self, host: str, port: int, timeout_s: float = 600.0) -> None:
        """Join the group through rank 0's TCPStore (rank 0 created it, with port 0 = any free port)."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        if self.store is None:
            self.store = dist.TCPStore(host, port, None, False, timeout=timeout)
        store = dist.PrefixStore("fleetserve-tp", self.store)
        if self.device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)
        else:
            self.group = dist.ProcessGroupGloo(store, self.rank, self.world_size, timeout)

    def _wait(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as e:  # gloo: a peer's connection closed (it died)
            if self.on_error is None:
                raise
            raise self.on_error(e) from e

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._wait(self.group.allreduce([x]))
        return x

    def gather_to_driver(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's x along the last dim on rank 0; None elsewhere."""
        import torch.distributed as dist

        x = x.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.is_driver:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            self._wait(self.group.gather([parts], [x], opts))
            return torch.cat(parts, dim=-1)
        self._wait(self.group.gather([], [x], opts))
        return None

    def broadcast_from_driver(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._wait(self.group.broadcast([x], opts))
        return x


# ------------------------------------------------------------------------------ layers
class RowParallelLinear(nn.Linear):
    """Linear over this rank's input columns; the partial sums are all-reduced."""

    tp: ParallelContext

    def forward(self, x):
        return self.tp.all_reduce(F.linear(x, self.weight, self.bias))


class VocabParallelEmbedding(nn.Embedding):
    """This rank's ceil(V/N) embedding rows; other ranks' ids embed to zero, then all_reduce."""

    tp: ParallelContext

    def forward(self, ids):
        start = self.tp.layout.vocab_start
        local = ids - start
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return self.tp.all_reduce(out * inside.unsqueeze(-1).to(out.dtype))


class ParallelSparseMoeBlock(SparseMoeBlock):
    """The MoE block over this rank's slice of every expert (and of the shared expert): the
    partial sums of both, then one all_reduce."""

    tp: ParallelContext

    def forward(self, x):
        return self.tp.all_reduce(super().forward(x))


def _resize_linear(lin: nn.Linear, out_f: int, in_f: int) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)


def _row_parallel(lin: nn.Linear, in_f: int, tp: ParallelContext) -> RowParallelLinear:
    if lin.bias is not None:  # would be added once per rank by the all_reduce
        raise UnsupportedModelError("row-parallel projections with a bias are not supported")
    new = RowParallelLinear(
        in_f, lin.out_features, bias=False, device=lin.weight.device, dtype=lin.weight.dtype
    )
    new.tp = tp
    return new


def _split_mlp(m: Any, tp: ParallelContext, reduce: bool) -> None:
    """A gated MLP down to this rank's slice of its own width; reduce=False leaves the all_reduce
    to the block around it (a shared expert)."""
    inter = m.down_proj.in_features // tp.world_size
    m.gate_up_proj = _resize_linear(m.gate_up_proj, 2 * inter, m.gate_up_proj.in_features)
    m.down_proj = (
        _row_parallel(m.down_proj, inter, tp)
        if reduce
        else _resize_linear(m.down_proj, m.down_proj.out_features, inter)
    )


def _new_param(old: torch.Tensor, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=old.device, dtype=old.dtype), requires_grad=False)


def apply_tensor_parallel(model: Any, tp: ParallelContext) -> Any:
    """Shrink a (meta-device) model of a TP_FAMILIES family to rank tp.rank's share, in place."""
    from .models.layers import Attention, GatedMLP

    lay = tp.layout
    d = lay.head_dim
    inside_moe: set[int] = set()  # shared experts: their block reduces once for them
    for m in list(model.modules()):
        if isinstance(m, Attention):
            m.num_heads, m.num_kv_heads = lay.num_heads, lay.num_kv_heads
            m.q_size, m.kv_size = lay.num_heads * d, lay.num_kv_heads * d
            m.qkv_proj = _resize_linear(m.qkv_proj, m.q_size + 2 * m.kv_size, m.qkv_proj.in_features)
            m.o_proj = _row_parallel(m.o_proj, m.q_size, tp)
        elif isinstance(m, SparseMoeBlock):
            m.__class__ = ParallelSparseMoeBlock
            assert isinstance(m, ParallelSparseMoeBlock)
            m.tp = tp
            e = m.experts
            num_experts, two_inter, hidden = e.gate_up_proj.shape
            inter = two_inter // 2 // tp.world_size
            e.gate_up_proj = _new_param(e.gate_up_proj, num_experts, 2 * inter, hidden)
            e.down_proj = _new_param(e.down_proj, num_experts, hidden, inter)
            if m.shared_expert is not None:
                _split_mlp(m.shared_expert, tp, reduce=False)
                inside_moe.add(id(m.shared_expert))
        elif isinstance(m, GatedMLP) and id(m) not in inside_moe:
            _split_mlp(m, tp, reduce=True)
    backbone = model.model
    old = backbone.embed_tokens
    # _weight: no random init (see Backbone)
    rows = torch.empty(
        lay.vocab_per_rank, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype
    )
    emb = VocabParallelEmbedding(lay.vocab_per_rank, old.embedding_dim, _weight=rows)
    emb.tp = tp
    backbone.embed_tokens = emb
    if model.lm_head is not None:
        model.lm_head = _resize_linear(model.lm_head, lay.vocab_per_rank, model.lm_head.in_features)
    vocab = lay.vocab_size

    def gather_logits(local: torch.Tensor) -> torch.Tensor | None:
        full = tp.gather_to_driver(local)
        return None if full is None else full[:, :vocab]

    model.gather_logits = gather_logits
    return model


# ------------------------------------------------------------------------------ weights
class LazySlice:
    """A checkpoint tensor not read yet: .shape, and [index] reads only that part (safetensors)."""

    def __init__(self, sl, name: str, path: str):
        self._sl, self.name, self.path = sl, name, path
        self.shape = tuple(sl.get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        return self._sl[index]

    def full(self) -> torch.Tensor:
        return self._sl[:]


def _read(t, index=None) -> torch.Tensor:
    if isinstance(t, LazySlice):
        return t.full() if index is None else t[index]
    return t if index is None else t[index]


def shard_weights(
    weights: Iterable[tuple[str, Any]],
    layout: ShardLayout | None,
    rename: Callable[[str], str | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor or LazySlice) -> (name, this rank's part as a tensor); layout None =
    whole. rename: the model's checkpoint_name (a stored name -> its HF causal-LM name, None = not
    the model's: skipped unread, e.g. a multimodal checkpoint's vision tower); the name yielded is
    the stored one."""
    for name, t in weights:
        key = name if rename is None else rename(name)
        if key is None:
            continue
        if layout is None:
            yield name, _read(t)
        else:
            yield name, _shard(key, t, layout)


def _shard(name: str, t: Any, layout: ShardLayout) -> torch.Tensor:
    parts = name.split(".")
    leaf = parts[-1]
    proj = parts[-2] if len(parts) >= 2 else ""
    if name.endswith(_VOCAB):
        a = layout.vocab_start
        b = min(a + layout.vocab_per_rank, layout.vocab_size)
        rows = _read(t, slice(a, b)) if a < b else None
        pad = layout.vocab_per_rank - (b - a if a < b else 0)
        hidden = t.shape[1]
        if rows is None:
            return torch.zeros(pad, hidden)
        return torch.cat([rows, rows.new_zeros(pad, hidden)]) if pad else rows
    if proj in _QKV:
        return _read(t, slice(*layout.row_range(proj)))
    if proj == "qkv_proj":  # fused [q | k | v] rows (Phi-3), weight or bias
        return torch.cat([_read(t, slice(a, b)) for a, b in layout.qkv_rows()])
    if proj == "o_proj" and leaf == "weight":
        return _read(t, (slice(None), slice(*layout.row_range(proj))))
    if proj == "gate_up_proj" or (proj == "experts" and leaf == "gate_up_proj"):
        # fused [gate | up] rows: [2I, H] (Phi-3), or [E, 2I, H] stacked experts (transformers 5.x)
        dim = len(t.shape) - 2
        inter = t.shape[dim] // 2
        a, b = layout.width_range(inter, name)
        lead = (slice(None),) * dim
        return torch.cat(
            [_read(t, (*lead, slice(a, b))), _read(t, (*lead, slice(inter + a, inter + b)))], dim
        )
    if proj == "experts" and leaf == "down_proj":  # stacked [E, H, I]
        return _read(t, (slice(None), slice(None), slice(*layout.width_range(t.shape[2], name))))
    if proj in _MLP_COLUMN:
        return _read(t, slice(*layout.width_range(t.shape[0], name)))
    if proj in _MLP_ROW and leaf == "weight":
        return _read(t, (slice(None), slice(*layout.width_range(t.shape[1], name))))
    return _read(t)
