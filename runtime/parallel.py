"""Tensor parallelism: how one model is split over N ranks, and the collectives that join it.

This module owns the shard layout and the parallel context; the model code in
runtime/models/ stays single-device (as in gpt-fast): `apply_tensor_parallel` takes a
model built on the meta device and, for one rank, shrinks its projections to that
rank's share and swaps in subclasses whose forward adds the collective:

  qkv_proj      column-parallel by heads: this rank's query heads and the KV heads they
                read (when there are fewer KV heads than ranks, each rank keeps the one
                KV head its query heads need: replicated across N / Hkv ranks); biases too
  o_proj        row-parallel (its input columns are this rank's heads), then all_reduce
  gate_up_proj  column-parallel ([gate | up] rows of this rank's intermediate slice)
  down_proj     row-parallel, then all_reduce
  embed_tokens  vocabulary-parallel: ceil(V / N) rows per rank (zero rows past V); ids
                outside the rank's range embed to 0, then all_reduce
  LM head       vocabulary-parallel (the same rows: tied embeddings just work); each rank
                computes its slice of the logits, gathered on rank 0 only (others get None)
  norms, RoPE   replicated

`shard_weights` maps a checkpoint's (name, tensor) stream to this rank's slices. A
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models.config import ModelConfig
from .models.registry import UnsupportedModelError
from .utils import cdiv

TP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Model families whose layers apply_tensor_parallel knows how to split."""
NOT_YET_SPLIT = ("gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe", "qwen2_moe")
"""Registered families that only run with tensor_parallel_size=1 (named in the error)."""


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
            f"tensor parallelism supports {', '.join(TP_FAMILIES)} "
            f"(not yet: {', '.join(NOT_YET_SPLIT)})"
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
    if cfg.intermediate_size % n:
        raise TensorParallelError(
            f"tensor_parallel_size={n} does not divide intermediate_size={cfg.intermediate_size} of {name}"
        )


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
    intermediate: int
    """This rank's slice of the MLP width."""
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
            intermediate=cfg.intermediate_size // n,
            vocab_per_rank=cdiv(cfg.vocab_size, n),
            vocab_size=cfg.vocab_size,
        )

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def row_range(self, proj: str) -> tuple[int, int]:
        """[start, end) of the checkpoint rows (column-parallel) or columns (row-parallel) of proj."""
        d = self.head_dim
        if proj in ("q_proj", "o_proj"):
            a = self.rank * self.num_heads * d
            return a, a + self.num_heads * d
        if proj in ("k_proj", "v_proj"):
            a = self.kv_head_start * d
            return a, a + self.num_kv_heads * d
        if proj in ("gate_proj", "up_proj", "down_proj"):
            a = self.rank * self.intermediate
            return a, a + self.intermediate
        raise KeyError(proj)


_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split rows (and biases)
_ROW = ("o_proj", "down_proj")  # split input columns
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


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


def apply_tensor_parallel(model: Any, tp: ParallelContext) -> Any:
    """Shrink a (meta-device) model of a TP_FAMILIES family to rank tp.rank's share, in place."""
    from .models.layers import Attention, GatedMLP

    lay = tp.layout
    d = lay.head_dim
    for m in list(model.modules()):
        if isinstance(m, Attention):
            m.num_heads, m.num_kv_heads = lay.num_heads, lay.num_kv_heads
            m.q_size, m.kv_size = lay.num_heads * d, lay.num_kv_heads * d
            m.qkv_proj = _resize_linear(m.qkv_proj, m.q_size + 2 * m.kv_size, m.qkv_proj.in_features)
            m.o_proj = _row_parallel(m.o_proj, m.q_size, tp)
        elif isinstance(m, GatedMLP):
            hidden = m.gate_up_proj.in_features
            m.gate_up_proj = _resize_linear(m.gate_up_proj, 2 * lay.intermediate, hidden)
            m.down_proj = _row_parallel(m.down_proj, lay.intermediate, tp)
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
    weights: Iterable[tuple[str, Any]], layout: ShardLayout | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor or LazySlice) -> (name, this rank's part as a tensor); layout None = whole."""
    for name, t in weights:
        if layout is None:
            yield name, _read(t)
            continue
        parts = name.split(".")
        proj = parts[-2] if len(parts) >= 2 else ""
        if name in _VOCAB:
            a = layout.vocab_start
            b = min(a + layout.vocab_per_rank, layout.vocab_size)
            rows = _read(t, slice(a, b)) if a < b else None
            pad = layout.vocab_per_rank - (b - a if a < b else 0)
            hidden = t.shape[1]
            if rows is None:
                rows = torch.zeros(pad, hidden)
            elif pad:
                rows = torch.cat([rows, rows.new_zeros(pad, hidden)])
            yield name, rows
        elif proj in _COLUMN:
            a, b = layout.row_range(proj)
            yield name, _read(t, slice(a, b))
        elif proj in _ROW and parts[-1] == "weight":
            a, b = layout.row_range(proj)
            yield name, _read(t, (slice(None), slice(a, b)))
        else:
            yield name, _read(t)
