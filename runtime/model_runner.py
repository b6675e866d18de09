"""ModelRunner: the device side of the engine.

Owns the model weights, the KV cache tensors (one [2, num_blocks, block_size,
Hkv, D] tensor per layer), the sampler and the host staging buffers. Its API is
`launch(SchedulerOutput)` -> a queued step, then `collect(step)` -> RunnerOutput
(the step's one host sync). `launch` runs in named stages:

  prepare_inputs(sched) -> StepInputs   host numpy -> one staged copy per step
  forward(StepInputs)   -> hidden       eager, or a CUDA graph replay
  prepare_sampling(...) -> logits, SamplingTensors   only the rows that sample
  sampler(logits, SamplingTensors) -> tokens (+ logprobs)

It reads scheduled sequences from a plain SchedulerOutput (runtime/scheduler_output.py)
and never imports the scheduler. Copy-on-write block copies run before the forward.

On CUDA, pure decode steps replay CUDA graphs captured once per padded batch
size (1, 2, 4, 8, then multiples of 16 up to max_num_seqs): the step's inputs are
copied into static buffers, padding rows get slot -1 (their K/V are dropped) and
a context of one token, and attention is captured with max_seq_len =
max_model_len so one graph serves every context length.

Steps with prefill work of up to cuda_graph_max_tokens tokens replay "mixed" graphs,
captured once per padded token count (multiples of 64 to 1024, of 128 beyond) over
max_num_seqs sequence slots: padding tokens get slot -1 and belong to no sequence,
padding sequences get no tokens (query_start_loc repeats the step's token count), so
the attention kernel's grid, which depends only on the shapes, is the same for every
step of that size. Eagerly, such a step is bound by launching its ~10 kernels per
layer from Python (~20 ms for the 8B shape on the H200, for ~10 ms of GPU work).
"""

from __future__ import annotations

import itertools
import mmap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .attention import AttentionMetadata
from .sampler import Sampler, SamplingRow, SamplingTensors, compute_prompt_logprobs
from .scheduler_output import ScheduledSeq, SchedulerOutput
from .staging import HostStaging
from .structured.bitmask import TokenMask, fill_token_mask
from .utils import cdiv

if TYPE_CHECKING:
    from .models import ModelConfig
    from .parallel import ParallelContext
    from .protocols import CausalLM
    from .tp_worker import WorkerGroup

# (token ids [K+1], logprobs [K+1], rank of column 0) for one position; column 0 is the
# sampled (or, for prompts, the actual next) token.
PositionTopLogprobs = tuple[list[int], list[float], int]


@dataclass
class RunnerOutput:
    sampled: dict[int, int] = field(default_factory=dict)
    """seq_id -> sampled token, for the sequences that reached the end of their known tokens."""
    logprobs: dict[int, PositionTopLogprobs] = field(default_factory=dict)
    """seq_id -> top logprobs of the sampled token (only rows that asked)."""
    prompt_logprobs: dict[int, tuple[int, list[PositionTopLogprobs]]] = field(default_factory=dict)
    """seq_id -> (first prompt position covered, entries for the next prompt tokens)."""


def kv_bytes_per_block(
    model_config: ModelConfig, block_size: int, dtype: torch.dtype, tensor_parallel_size: int = 1
) -> int:
    """Bytes of one KV block on one rank (a rank holds only its KV heads)."""
    from .parallel import kv_heads_per_rank

    elt = torch.empty((), dtype=dtype).element_size()
    heads = kv_heads_per_rank(model_config, tensor_parallel_size)
    return 2 * model_config.num_layers * block_size * heads * model_config.head_dim * elt


def _allocate_kv_caches(
    model_config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    num_kv_heads: int,
) -> list[torch.Tensor]:
    """One zeroed [2, num_blocks, block_size, Hkv, D] tensor per layer (Hkv: this rank's KV heads).

    On the CPU all layers are views of one anonymous mapping: the kernel hands out zero pages lazily, so a block's memory becomes resident only once a sequence first writes it,
    and the resident size after load is the weights', not the KV cache's (torch.zeros would write
    every page at start-up)."""
    shape = (2, num_blocks, block_size, num_kv_heads, model_config.head_dim)
    L = model_config.num_layers
    if device.type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
    per_layer = 2 * num_blocks * block_size * num_kv_heads * model_config.head_dim
    elt = torch.empty((), dtype=dtype).element_size()
    nbytes = L * per_layer * elt
    try:
        buf = mmap.mmap(-1, nbytes)  # anonymous: zero pages, committed on first write
        # 4 KiB pages: with transparent huge pages, the first token of each layer's K and V would
        # commit 2 MiB each (measured: +120 MiB on the first request of the embedded model)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            buf.madvise(mmap.MADV_NOHUGEPAGE)
        raw = torch.frombuffer(buf, dtype=torch.uint8)
    except (OSError, ValueError):
        raw = torch.from_numpy(np.zeros(nbytes, dtype=np.uint8))  # calloc: lazily zeroed as well
    flat = raw.view(dtype)
    return [flat[i * per_layer : (i + 1) * per_layer].view(shape) for i in range(L)]


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Padded token counts of the mixed-step graphs: multiples of 64 to 1024, of 128 beyond."""
    sizes = [t for t in range(64, min(max_tokens, 1024) + 1, 64)]
    sizes += [t for t in range(1024 + 128, max_tokens + 1, 128)]
    if max_tokens >= 64 and sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sizes


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        model_config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        eos_token_ids: set[int],
        tp: ParallelContext | None = None,
        workers: WorkerGroup | None = None,
    ):
        self.model = model
        # Tensor parallelism: this rank's context; on rank 0 (the driver) also the worker group that
        # gets every step's StepPlan before the forward pass (whose collectives need every rank).
        self.tp = tp
        self.workers = workers
        # Async scheduling: rank 0 broadcasts each step's sampled tokens so every rank can fill the
        # next step's placeholders on its own device (set by the engine).
        self.share_samples = False
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = model_config.vocab_size
        kv_heads = model_config.num_kv_heads if tp is None else tp.layout.num_kv_heads
        self.kv_caches = _allocate_kv_caches(model_config, num_blocks, block_size, dtype, device, kv_heads)
        self.sampler = Sampler()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_sizes: list[int] = []
        self._static: dict[str, torch.Tensor] = {}
        # mixed (prefill + decode) steps: padded token count -> graph; its own static buffers
        self._mixed_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mixed_sizes: list[int] = []
        self._mixed_static: dict[str, torch.Tensor] = {}
        self._mixed_seqs = 0
        self._prev_sampled: torch.Tensor | None = None  # last launch's sampled tokens (device)
        self._prev_rows: dict[int, int] = {}  # seq_id -> row in _prev_sampled
        # CUDA: reused pinned buffers for every host->device copy. CPU: arrays are used in place.
        self._staging = HostStaging(device, pin=True) if device.type == "cuda" else None

    def close(self) -> None:
        """Drop every device tensor the runner holds: CUDA graphs (their private memory pool is
        released with the last graph and its output tensors), the graphs' static inputs, the KV
        cache, the weights, the staging buffers and the last step's sampled tokens. The runner is
        unusable afterwards."""
        self._graphs.clear()
        self._graph_sizes = []
        self._static = {}
        self._mixed_graphs.clear()
        self._mixed_sizes = []
        self._mixed_static = {}
        self.kv_caches = []
        self._prev_sampled = None
        self._prev_rows = {}
        self._staging = None
        self.sampler = Sampler()  # the old one may hold compiled functions with cached buffers
        del self.model

    # -- CUDA graphs ------------------------------------------------------------
    @torch.inference_mode()
    def capture_graphs(self, max_batch: int, max_model_len: int, max_mixed_tokens: int = 0) -> float:
        """Capture the decode forward for padded batch sizes up to max_batch and the mixed forward
        for padded token counts up to max_mixed_tokens (over max_batch sequence slots); returns
        seconds spent."""
        import time

        if self.workers is not None:  # every rank captures the same graphs: their all_reduces pair up
            self.workers.send(("capture", max_batch, max_model_len, max_mixed_tokens))
        t0 = time.perf_counter()
        sizes = sorted(
            {b for b in [1, 2, 4, 8] + list(range(16, max_batch + 16, 16)) if b <= max_batch} | {max_batch}
        )
        B, dev = sizes[-1], self.device
        max_blocks = cdiv(max_model_len, self.block_size)
        # decode graphs: one token per sequence, replays write only tokens, slots, lengths and tables
        self._static = self._graph_buffers(B, B, max_blocks)
        self._static["query_start_loc"].copy_(torch.arange(B + 1, dtype=torch.int32, device=dev))
        self._static["seq_lens"].fill_(1)
        self._graph_max_seq_len = max_model_len
        pool = torch.cuda.graph_pool_handle()
        mixed = mixed_graph_sizes(max_mixed_tokens)
        if mixed:
            self._mixed_static = self._graph_buffers(mixed[-1], max_batch, max_blocks)
            self._mixed_seqs = max_batch
        # largest first, so smaller graphs reuse its memory
        for kind, size in [("mixed", t) for t in reversed(mixed)] + [("decode", b) for b in reversed(sizes)]:
            args = self._mixed_args(size) if kind == "mixed" else self._decode_args(size)
            for _ in range(2):  # warm up (Triton autotuning / compilation happens outside the capture)
                self.model(*args)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            # With tensor parallelism the layers' all_reduces (ProcessGroupNCCL) are captured too: NCCL
            # kernels recorded on the capture stream, replayed in lockstep by every rank; the warm-up
            # above ran them eagerly first, so the communicator exists before capture.
            with torch.cuda.graph(g, pool=pool):
                out = self.model(*args)
            (self._mixed_graphs if kind == "mixed" else self._graphs)[size] = (g, out)
        torch.cuda.synchronize()
        self._graph_sizes = sizes
        self._mixed_sizes = mixed
        return time.perf_counter() - t0

    def _graph_buffers(self, max_tokens: int, max_seqs: int, max_blocks: int) -> dict[str, torch.Tensor]:
        """Static inputs of a set of graphs: every token slot padding, every sequence empty."""
        dev = self.device
        return dict(
            input_ids=torch.zeros(max_tokens, dtype=torch.int64, device=dev),
            positions=torch.zeros(max_tokens, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((max_tokens,), -1, dtype=torch.int64, device=dev),
            query_start_loc=torch.zeros(max_seqs + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.zeros(max_seqs, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(max_seqs, max_blocks, dtype=torch.int32, device=dev),
        )

    def _graph_args(
        self, st: dict[str, torch.Tensor], tokens: int, seqs: int, max_query_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[torch.Tensor]]:
        """The model's arguments as views of static buffers: `tokens` token rows, `seqs` sequences."""
        attn = AttentionMetadata(
            st["slot_mapping"][:tokens],
            st["query_start_loc"][: seqs + 1],
            st["seq_lens"][:seqs],
            st["block_tables"][:seqs],
            max_query_len,
            self._graph_max_seq_len,
        )
        return st["input_ids"][:tokens], st["positions"][:tokens], attn, self.kv_caches

    def _decode_args(self, b: int):
        return self._graph_args(self._static, b, b, 1)

    def _mixed_args(self, tokens: int):
        # max_query_len: any value > 1 takes the prefill kernel, whose grid needs only the shapes
        return self._graph_args(self._mixed_static, tokens, self._mixed_seqs, 2)

    def fill_mixed_static(self, inputs: StepInputs) -> None:
        """Copy a mixed step into the mixed graphs' static buffers, padded to inputs.graph_tokens
        tokens and to every sequence slot (tokens past the step's own: slot -1, no sequence;
        sequences past its own: no tokens, so their attention programs return at once)."""
        st, attn = self._mixed_static, inputs.attn
        b, t, padded = inputs.num_seqs, inputs.num_tokens, inputs.graph_tokens
        assert padded is not None
        st["input_ids"][:t].copy_(inputs.input_ids)
        st["positions"][:t].copy_(inputs.positions)
        st["slot_mapping"][:t].copy_(attn.slot_mapping)
        st["slot_mapping"][t:padded].fill_(-1)
        st["query_start_loc"][: b + 1].copy_(attn.query_start_loc)
        st["query_start_loc"][b + 1 :].fill_(t)
        st["seq_lens"][:b].copy_(attn.seq_lens)
        st["seq_lens"][b:].fill_(0)
        bt = attn.block_tables
        st["block_tables"][:b, : bt.shape[1]].copy_(bt)

    def _run_mixed_graph(self, inputs: StepInputs) -> torch.Tensor:
        self.fill_mixed_static(inputs)
        assert inputs.graph_tokens is not None
        graph, out = self._mixed_graphs[inputs.graph_tokens]
        graph.replay()
        return out

    def _mixed_graph_size(self, batch: int, num_tokens: int, max_query_len: int) -> int | None:
        if max_query_len == 1 or not self._mixed_sizes or num_tokens > self._mixed_sizes[-1]:
            return None
        if batch > self._mixed_seqs:
            return None
        return next(s for s in self._mixed_sizes if s >= num_tokens)

    def _graph_size(self, batch: int, max_query_len: int) -> int | None:
        if max_query_len != 1 or not self._graph_sizes or batch > self._graph_sizes[-1]:
            return None
        return next(s for s in self._graph_sizes if s >= batch)

    def _run_graph(self, inputs: StepInputs) -> torch.Tensor:
        """Copy the step's inputs into the static buffers and replay the graph of its padded size."""
        st, attn = self._static, inputs.attn
        b, padded = inputs.num_seqs, inputs.graph_batch
        assert padded is not None
        st["input_ids"][:b].copy_(inputs.input_ids)
        st["positions"][:b].copy_(inputs.positions)
        st["slot_mapping"][:b].copy_(attn.slot_mapping)
        st["seq_lens"][:b].copy_(attn.seq_lens)
        bt = attn.block_tables
        st["block_tables"][:b, : bt.shape[1]].copy_(bt)
        if padded > b:
            st["slot_mapping"][b:padded].fill_(-1)
            st["seq_lens"][b:padded].fill_(1)
        graph, out = self._graphs[padded]
        graph.replay()
        return out

    def _stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Host arrays -> device tensors (see HostStaging); on the CPU they are used in place."""
        if self._staging is None:
            return [torch.from_numpy(a) for a in arrays]
        return self._staging.stage(arrays)

    # -- one step: prepare inputs -> forward -> prepare sampling -> sample ----------
    @torch.inference_mode()
    def launch(
        self, sched: SchedulerOutput, defer_sample: bool = False, structured: bool = True
    ) -> _LaunchedStep:
        """Queue one step on the device and return without waiting for it.

        structured: some scheduled sequence may have a grammar (False: the per-row search for
        grammar masks is skipped; the engine knows whether any structured request runs).

        defer_sample: queue only the forward pass and the logits; `finish_launch` queues the
        sampling. Structured outputs use this: the engine reads back the previous step and
        advances the grammars while the device runs this step's forward pass, and the bitmasks
        are filled afterwards from the grammars' up-to-date state.
        """
        if self._staging is not None:
            self._staging.begin_step()
        plan = self.plan_step(sched)
        if self.workers is not None:  # before the forward pass: its collectives need every rank
            self.workers.send(("step", plan))
        self._copy_blocks(plan.block_copies)
        inputs = self.stage_inputs(plan)
        hidden = self.forward(inputs)
        step = _LaunchedStep(sched, structured=structured)
        self._launch_prompt_logprobs(sched.scheduled, plan, hidden, step)
        sample_idx = plan.sample_idx
        if sample_idx:
            step.seq_ids = [sched.scheduled[i].seq.seq_id for i in sample_idx]
            self._prev_rows = {sid: r for r, sid in enumerate(step.seq_ids)}
            step._pending = (sample_idx, self._logits(hidden, plan.logit_rows[-1], inputs.num_tokens))
        if not defer_sample:
            self.finish_launch(step)
        return step

    @torch.inference_mode()
    def execute_plan(self, plan: StepPlan) -> None:
        """Tensor-parallel ranks other than 0: the same step on this rank's shard. The logits are
        gathered on rank 0 and sampled there; with share_samples the sampled tokens come back by
        broadcast (for the placeholders of the next step)."""
        if self._staging is not None:
            self._staging.begin_step()
        self._copy_blocks(plan.block_copies)
        inputs = self.stage_inputs(plan)
        hidden = self.forward(inputs)
        for rows in plan.logit_rows:
            self._logits(hidden, rows, inputs.num_tokens)
        if plan.sample_idx and plan.share_samples:
            assert self.tp is not None
            buf = torch.empty(len(plan.sample_idx), dtype=torch.int64, device=self.device)
            self._prev_sampled = self.tp.broadcast_from_driver(buf)
        if self._staging is not None:
            self._staging.end_step()

    def _logits(self, hidden: torch.Tensor, rows: np.ndarray | None, num_tokens: int) -> torch.Tensor:
        """compute_logits of hidden's rows (None: the first num_tokens rows)."""
        if rows is None:
            return self.model.compute_logits(hidden[:num_tokens])
        return self.model.compute_logits(hidden[self._stage([rows])[0]])

    @torch.inference_mode()
    def finish_launch(self, step: _LaunchedStep) -> None:
        """Queue the sampling of a step launched with defer_sample=True (a no-op once done),
        close its staging slot and queue the readback."""
        if step._finished:
            return
        step._finished = True
        if step._pending is not None:
            sample_idx, logits = step._pending
            step._pending = None
            st = self.prepare_sampling(step.sched, sample_idx)
            mask = self.prepare_token_mask(step.sched, sample_idx) if step.structured else None
            res = self.sampler(logits, st, mask)
            if self.tp is not None and self.share_samples:
                self.tp.broadcast_from_driver(res.token_ids)
            step.sampled = res.token_ids
            step.logprobs = res.logprobs
            step.num_logprobs = st.num_logprobs
            self._prev_sampled = res.token_ids
        if self._staging is not None:
            self._staging.end_step()
        step.start_readback()

    def _copy_blocks(self, copies: np.ndarray | None) -> None:
        """Copy-on-write KV block copies ([2, C]: src, dst), before the forward pass writes into them."""
        if copies is None:
            return
        src, dst = self._stage([copies])[0]
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    def prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        """Build the step's token ids, positions and attention metadata on the host with numpy
        and stage them to the device in one copy per dtype.

        Tokens of the previous launch that are still on the device (placeholders: a sequence's
        last token was sampled there but not yet appended on the host) are gathered on the
        device from that launch's sampled-token tensor.
        """
        return self.stage_inputs(self.plan_step(sched))

    def plan_step(self, sched: SchedulerOutput) -> StepPlan:
        """The step's inputs as host arrays (the part of prepare_inputs that needs no device),
        plus which rows need logits: what tensor parallelism sends to every rank."""
        items = sched.scheduled
        B, bs = len(items), self.block_size
        q_lens = np.fromiter((s.num_new_tokens for s in items), dtype=np.int64, count=B)
        starts = np.fromiter((s.start for s in items), dtype=np.int64, count=B)
        qsl = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        T = int(qsl[-1])
        seq_lens = starts + q_lens
        n_blocks = np.fromiter((len(s.seq.block_ids) for s in items), dtype=np.int64, count=B)
        max_blocks = cdiv(int(seq_lens.max()), bs)
        # Block tables from one flat pass over all block ids (rows are ragged).
        flat_ids = np.fromiter(
            itertools.chain.from_iterable(s.seq.block_ids for s in items),
            dtype=np.int32,
            count=int(n_blocks.sum()),
        )
        cols = np.arange(int(n_blocks.max()))
        block_tables = np.zeros((B, cols.size), dtype=np.int32)
        block_tables[cols[None, :] < n_blocks[:, None]] = flat_ids
        block_tables = block_tables[:, :max_blocks]
        token_list: list[int] = []
        placeholder_dst, placeholder_src = [], []
        prev_rows = self._prev_rows
        for s in items:
            seq, a = s.seq, s.start
            ids = seq.token_ids
            end = a + s.num_new_tokens
            if end <= len(ids):
                if end == a + 1:
                    token_list.append(ids[a])
                else:
                    token_list += ids[a:end]
            else:  # the last input token is still on the device: a 0 here, gathered below
                token_list += ids[a : end - 1]
                placeholder_dst.append(len(token_list))
                placeholder_src.append(prev_rows[seq.seq_id])
                token_list.append(0)
        tokens = np.array(token_list, dtype=np.int64)
        seq_of_token = np.repeat(np.arange(B), q_lens)
        positions = np.arange(T, dtype=np.int64) - np.repeat(qsl[:-1] - starts, q_lens)
        slots = block_tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs

        max_query_len = int(q_lens.max())
        arrays = [tokens, positions, slots, qsl.astype(np.int32), seq_lens.astype(np.int32), block_tables]
        if placeholder_dst:
            arrays.append(np.array([placeholder_dst, placeholder_src], dtype=np.int64))
        sample_idx = [i for i, s in enumerate(items) if s.sample]
        prompt_rows = self._prompt_logprob_rows(items, qsl)
        # Rows of each compute_logits call of the step, in order: prompt logprobs, then the sampled
        # rows (None: every token, a pure decode step).
        logit_rows: list[np.ndarray | None] = [r[3] for r in prompt_rows]
        if sample_idx:
            logit_rows.append(None if len(sample_idx) == T else qsl[1:][sample_idx] - 1)
        copies = sched.block_copies
        return StepPlan(
            arrays=arrays,
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()),
            num_seqs=B,
            num_tokens=T,
            graph_batch=self._graph_size(B, max_query_len),
            graph_tokens=self._mixed_graph_size(B, T, max_query_len),
            query_start_loc=qsl,
            block_copies=np.array(copies, dtype=np.int64).T.copy() if copies else None,
            sample_idx=sample_idx,
            prompt_rows=prompt_rows,
            logit_rows=logit_rows,
            share_samples=self.share_samples,
        )

    def stage_inputs(self, plan: StepPlan) -> StepInputs:
        """A plan's arrays on the device (one staged copy per dtype), placeholders gathered."""
        dev = self._stage(plan.arrays)
        input_ids = dev[0]
        if len(dev) > 6:
            dst, src = dev[6]
            assert self._prev_sampled is not None
            input_ids.index_copy_(0, dst, self._prev_sampled.index_select(0, src))
        attn = AttentionMetadata(
            slot_mapping=dev[2],
            query_start_loc=dev[3],
            seq_lens=dev[4],
            block_tables=dev[5],
            max_query_len=plan.max_query_len,
            max_seq_len=plan.max_seq_len,
        )
        return StepInputs(
            input_ids=input_ids,
            positions=dev[1],
            attn=attn,
            num_seqs=plan.num_seqs,
            num_tokens=plan.num_tokens,
            graph_batch=plan.graph_batch,
            graph_tokens=plan.graph_tokens,
            query_start_loc=plan.query_start_loc,
        )

    @staticmethod
    def _prompt_logprob_rows(items: list[ScheduledSeq], qsl: np.ndarray) -> list[tuple]:
        """(item index, first prompt position, k, token rows) of each sequence asking for prompt logprobs."""
        out = []
        for i, s in enumerate(items):
            seq = s.seq
            k = seq.params.prompt_logprobs
            if k is None or s.start >= seq.num_prompt_tokens:
                continue
            first = s.start
            last = min(
                first + s.num_new_tokens, seq.num_prompt_tokens - 1
            )  # positions with a next prompt token
            if last <= first:
                continue
            out.append((i, first, k, np.arange(int(qsl[i]), int(qsl[i]) + last - first, dtype=np.int64)))
        return out

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [T, H] (or more rows: a CUDA graph's padded batch) of the step's tokens."""
        if inputs.graph_batch is not None:
            return self._run_graph(inputs)
        if inputs.graph_tokens is not None:
            return self._run_mixed_graph(inputs)
        return self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches)

    def prepare_sampling(self, sched: SchedulerOutput, sample_idx: list[int]) -> SamplingTensors:
        """SamplingTensors of the rows that sample."""
        items = sched.scheduled
        rows = []
        for i in sample_idx:
            seq = items[i].seq
            p = seq.params
            rows.append(
                SamplingRow(
                    params=p,
                    seed=seq.seed,
                    output_token_ids=seq.output_token_ids if p.has_penalties else (),
                    prompt_token_ids=seq.prompt_token_ids if p.repetition_penalty != 1.0 else (),
                    eos_token_ids=self.eos_token_ids,
                    position=seq.num_known_tokens - 1 - seq.num_prompt_tokens,
                )
            )
        return SamplingTensors.build(rows, self.vocab_size, self.device, stage=self._stage)

    def prepare_token_mask(self, sched: SchedulerOutput, sample_idx: list[int]) -> TokenMask | None:
        """Structured outputs: the grammar bitmasks of the rows that have a grammar (None if none),
        filled on the host while the device runs the forward pass."""
        items = sched.scheduled
        grammars = [(r, g) for r, i in enumerate(sample_idx) if (g := items[i].seq.grammar) is not None]
        if not grammars:
            return None
        for r, g in grammars:
            seq = items[sample_idx[r]].seq
            position = seq.num_known_tokens - 1 - seq.num_prompt_tokens
            if g.num_tokens != position:  # a mask for the wrong position would be silently wrong
                raise RuntimeError(
                    f"grammar of row {r} saw {g.num_tokens} tokens, sampling position {position}"
                )
        return fill_token_mask(grammars, self.device, len(sample_idx))

    def collect(self, step: _LaunchedStep) -> RunnerOutput:
        """Wait for a launched step's results (the step's one sync) and convert them to lists."""
        step.wait()
        out = RunnerOutput()
        if step.sampled is not None:
            out.sampled = dict(zip(step.seq_ids, step.sampled.tolist()))
            if step.logprobs is not None:
                ids, lps, ranks = (t.tolist() for t in step.logprobs)
                for r, (sid, n) in enumerate(zip(step.seq_ids, step.num_logprobs)):
                    if n is not None:
                        out.logprobs[sid] = (ids[r][: n + 1], lps[r][: n + 1], ranks[r])
        for seq_id, first, k, lp in step.prompt_logprobs:
            ids, lps, ranks = (t.tolist() for t in lp)
            out.prompt_logprobs[seq_id] = (
                first,
                [(a[: k + 1], b[: k + 1], r) for a, b, r in zip(ids, lps, ranks)],
            )
        return out

    def _launch_prompt_logprobs(
        self, items: list[ScheduledSeq], plan: StepPlan, hidden: torch.Tensor, step: _LaunchedStep
    ) -> None:
        for i, first, k, rows in plan.prompt_rows:
            seq = items[i].seq
            logits = self.model.compute_logits(hidden[self._stage([rows])[0]])
            last = first + len(rows)
            targets = torch.tensor(seq.token_ids[first + 1 : last + 1], device=self.device)
            step.prompt_logprobs.append((seq.seq_id, first, k, compute_prompt_logprobs(logits, targets, k)))


@dataclass
class StepPlan:
    """One step's model inputs as host arrays (plan_step): what rank 0 stages and, with tensor
    parallelism, pickles once per step to every other rank (a few KB: no Seq objects)."""

    arrays: list[np.ndarray]
    """tokens, positions, slots (int64), query_start_loc, seq_lens (int32), block tables (int32)
    [, placeholders [2, P] int64: (token index, row of the previous step's sampled tokens)]."""
    max_query_len: int
    max_seq_len: int
    num_seqs: int
    num_tokens: int
    graph_batch: int | None
    graph_tokens: int | None
    query_start_loc: np.ndarray
    """[B+1] int64."""
    block_copies: np.ndarray | None
    """[2, C] int64 (src, dst) copy-on-write copies, or None."""
    sample_idx: list[int]
    """Indices (into the scheduled sequences) of the rows that sample."""
    prompt_rows: list[tuple]
    """(item index, first position, k, token rows) per sequence asking for prompt logprobs."""
    logit_rows: list[np.ndarray | None]
    """Token rows of each compute_logits call, in order (prompt logprobs, then sampling)."""
    share_samples: bool = False
    """Rank 0 broadcasts the sampled tokens after sampling (async scheduling)."""


@dataclass
class StepInputs:
    """One step's model inputs on the device (built by `prepare_inputs`), plus the host
    arrays that the sampling stage reads. Tokens are laid out sequence by sequence in
    SchedulerOutput.scheduled order."""

    input_ids: torch.Tensor
    """[T] int64 token ids (placeholders already gathered from the previous step's samples)."""
    positions: torch.Tensor
    """[T] int64 position of each token in its sequence."""
    attn: AttentionMetadata
    """Where each token reads and writes the paged KV cache."""
    num_seqs: int
    """B: sequences in the step."""
    num_tokens: int
    """T: tokens in the step."""
    graph_batch: int | None
    """Padded batch size of the decode CUDA graph that runs this step; None = no decode graph."""
    graph_tokens: int | None
    """Padded token count of the mixed CUDA graph that runs this step; None = no mixed graph."""
    query_start_loc: np.ndarray
    """Host copy of attn.query_start_loc ([B+1] int64)."""


@dataclass
class _LaunchedStep:
    """A step queued on the device: what collect() needs to read its results."""

    sched: SchedulerOutput
    structured: bool = True  # a scheduled sequence may have a grammar: masks are looked for
    seq_ids: list[int] = field(default_factory=list)
    sampled: torch.Tensor | None = None
    logprobs: tuple[torch.Tensor, ...] | None = None
    """(token ids, logprobs, ranks) of the sampled rows (see LogprobsTensors)."""
    num_logprobs: list[int | None] = field(default_factory=list)
    prompt_logprobs: list[tuple[int, int, int, tuple[torch.Tensor, ...]]] = field(default_factory=list)
    """(seq_id, first prompt position, k, (token ids, logprobs, ranks)) per sequence that asked."""
    _done: torch.cuda.Event | None = None
    _pending: tuple | None = None  # (sample rows, logits) until finish_launch
    _finished: bool = False  # finish_launch ran (sampling queued, staging slot closed)

    def start_readback(self) -> None:
        """Queue the copies of the results into pinned host memory and mark the point in the
        stream. A plain .tolist() would wait for the whole stream, i.e. also for the next
        step, which async scheduling has already queued behind this one."""
        first = (
            self.sampled
            if self.sampled is not None
            else (self.prompt_logprobs[0][3][0] if self.prompt_logprobs else None)
        )
        if first is None or not first.is_cuda:
            return
        host = lambda t: t.to("cpu", non_blocking=True)  # noqa: E731  (pinned destination)
        if self.sampled is not None:
            self.sampled = host(self.sampled)
        if self.logprobs is not None:
            self.logprobs = tuple(host(t) for t in self.logprobs)
        self.prompt_logprobs = [
            (sid, first, k, tuple(host(t) for t in lp)) for sid, first, k, lp in self.prompt_logprobs
        ]
        self._done = torch.cuda.Event()
        self._done.record()

    def wait(self) -> None:
        if self._done is not None:
            self._done.synchronize()
