"""ModelRunner: the device side of the engine.

Owns the model weights, the KV cache tensors (one [2, num_blocks, block_size,
Hkv, D] tensor per layer) and the sampler. `execute` turns one SchedulerOutput
into per-sequence results: it builds the step's input tensors on the host with
numpy (a handful of host->device copies per step), applies copy-on-write block
copies, runs the forward pass, and samples only the rows that end their known
tokens. One host sync per step (reading the sampled tokens).

On CUDA, pure decode steps replay CUDA graphs captured once per padded batch
size (1, 2, 4, 8, then multiples of 16 up to max_num_seqs): the step's inputs are
copied into static buffers, padding rows get slot -1 (their K/V are dropped) and
a context of one token, and attention is captured with max_seq_len =
max_model_len so one graph serves every context length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .attention import AttentionMetadata
from .sampler import Sampler, SamplingRow, SamplingTensors, compute_prompt_logprobs
from .scheduler import SchedulerOutput

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


def kv_bytes_per_block(model_config, block_size: int, dtype: torch.dtype) -> int:
    elt = torch.empty((), dtype=dtype).element_size()
    return 2 * model_config.num_layers * block_size * model_config.num_kv_heads * model_config.head_dim * elt


class ModelRunner:
    def __init__(self, model, model_config, device: torch.device, dtype: torch.dtype, num_blocks: int,
                 block_size: int, eos_token_ids: set[int]):
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = model_config.vocab_size
        self.kv_caches = [
            torch.zeros(2, num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim,
                        dtype=dtype, device=device)
            for _ in range(model_config.num_layers)
        ]
        self.sampler = Sampler()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_sizes: list[int] = []

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(arr).to(self.device)

    # -- CUDA graphs ------------------------------------------------------------
    @torch.inference_mode()
    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> float:
        """Capture the decode forward for padded batch sizes up to max_batch; returns seconds spent."""
        import time

        t0 = time.perf_counter()
        sizes = sorted({b for b in [1, 2, 4, 8] + list(range(16, max_batch + 16, 16)) if b <= max_batch} | {max_batch})
        B, dev = sizes[-1], self.device
        max_blocks = -(-max_model_len // self.block_size)
        self._static = dict(
            input_ids=torch.zeros(B, dtype=torch.int64, device=dev),
            positions=torch.zeros(B, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((B,), -1, dtype=torch.int64, device=dev),
            query_start_loc=torch.arange(B + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(B, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(B, max_blocks, dtype=torch.int32, device=dev),
        )
        self._graph_max_seq_len = max_model_len
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(sizes):  # largest first, so smaller graphs reuse its memory
            args = self._static_args(b)
            for _ in range(2):  # warm up (Triton autotuning / compilation happens outside the capture)
                self.model(*args)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self.model(*args)
            self._graphs[b] = (g, out)
        torch.cuda.synchronize()
        self._graph_sizes = sizes
        return time.perf_counter() - t0

    def _static_args(self, b: int):
        st = self._static
        attn = AttentionMetadata(st["slot_mapping"][:b], st["query_start_loc"][: b + 1], st["seq_lens"][:b],
                                 st["block_tables"][:b], 1, self._graph_max_seq_len)
        return st["input_ids"][:b], st["positions"][:b], attn, self.kv_caches

    def _graph_size(self, batch: int, max_query_len: int) -> Optional[int]:
        if max_query_len != 1 or not self._graph_sizes or batch > self._graph_sizes[-1]:
            return None
        return next(s for s in self._graph_sizes if s >= batch)

    def _run_graph(self, b: int, padded: int, tokens, positions, slots, seq_lens, block_tables) -> torch.Tensor:
        st = self._static
        st["input_ids"][:b].copy_(torch.from_numpy(np.asarray(tokens, dtype=np.int64)))
        st["positions"][:b].copy_(torch.from_numpy(positions))
        st["slot_mapping"][:b].copy_(torch.from_numpy(slots))
        st["seq_lens"][:b].copy_(torch.from_numpy(seq_lens.astype(np.int32)))
        st["block_tables"][:b, : block_tables.shape[1]].copy_(torch.from_numpy(block_tables))
        if padded > b:
            st["slot_mapping"][b:padded].fill_(-1)
            st["seq_lens"][b:padded].fill_(1)
        graph, out = self._graphs[padded]
        graph.replay()
        return out

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        if sched.block_copies:
            src = torch.tensor([s for s, _ in sched.block_copies], device=self.device)
            dst = torch.tensor([d for _, d in sched.block_copies], device=self.device)
            for cache in self.kv_caches:
                cache[:, dst] = cache[:, src]

        items = sched.scheduled
        B, bs = len(items), self.block_size
        q_lens = np.fromiter((s.num_new_tokens for s in items), dtype=np.int64, count=B)
        starts = np.fromiter((s.seq.num_computed_tokens for s in items), dtype=np.int64, count=B)
        qsl = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        T = int(qsl[-1])
        seq_lens = starts + q_lens
        max_blocks = int((seq_lens.max() + bs - 1) // bs)
        block_tables = np.zeros((B, max_blocks), dtype=np.int32)
        tokens = []
        for i, s in enumerate(items):
            seq = s.seq
            bids = seq.block_ids
            block_tables[i, : len(bids)] = bids[:max_blocks]
            tokens.extend(seq.token_ids[starts[i]: starts[i] + q_lens[i]])
        seq_of_token = np.repeat(np.arange(B), q_lens)
        positions = np.arange(T, dtype=np.int64) - np.repeat(qsl[:-1] - starts, q_lens)
        slots = block_tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs

        max_query_len = int(q_lens.max())
        padded = self._graph_size(B, max_query_len)
        if padded is not None:
            hidden = self._run_graph(B, padded, tokens, positions, slots, seq_lens, block_tables)
        else:
            attn = AttentionMetadata(
                slot_mapping=self._to_device(slots),
                query_start_loc=self._to_device(qsl.astype(np.int32)),
                seq_lens=self._to_device(seq_lens.astype(np.int32)),
                block_tables=self._to_device(block_tables),
                max_query_len=max_query_len,
                max_seq_len=int(seq_lens.max()),
            )
            hidden = self.model(self._to_device(np.asarray(tokens, dtype=np.int64)), self._to_device(positions),
                                attn, self.kv_caches)

        out = RunnerOutput()
        self._prompt_logprobs(items, qsl, starts, hidden, out)
        sample_idx = [i for i, s in enumerate(items) if s.sample]
        if not sample_idx:
            return out
        rows = []
        for i in sample_idx:
            seq = items[i].seq
            p = seq.params
            rows.append(SamplingRow(
                params=p, seed=seq.seed, output_token_ids=seq.output_token_ids,
                prompt_token_ids=seq.prompt_token_ids if p.repetition_penalty != 1.0 else (),
                eos_token_ids=self.eos_token_ids))
        if len(sample_idx) == T:  # pure decode: every token is sampled
            logits = self.model.compute_logits(hidden[:T])
        else:
            last = torch.from_numpy(qsl[1:][sample_idx] - 1).to(self.device)
            logits = self.model.compute_logits(hidden[last])
        st = SamplingTensors.build(rows, self.vocab_size, self.device)
        res = self.sampler(logits, st)
        token_list = res.token_ids.tolist()
        seq_ids = [items[i].seq.seq_id for i in sample_idx]
        out.sampled = dict(zip(seq_ids, token_list))
        if res.logprobs is not None:
            ids, lps, ranks = (t.tolist() for t in res.logprobs)
            for r, (sid, n) in enumerate(zip(seq_ids, st.num_logprobs)):
                if n is not None:
                    out.logprobs[sid] = (ids[r][: n + 1], lps[r][: n + 1], ranks[r])
        return out

    def _prompt_logprobs(self, items, qsl, starts, hidden, out: RunnerOutput) -> None:
        for i, s in enumerate(items):
            seq = s.seq
            k = seq.params.prompt_logprobs
            if k is None or seq.num_output_tokens > 0:
                continue
            first = int(starts[i])
            last = min(first + s.num_new_tokens, seq.num_prompt_tokens - 1)  # positions with a next prompt token
            if last <= first:
                continue
            rows = torch.arange(int(qsl[i]), int(qsl[i]) + last - first, device=self.device)
            logits = self.model.compute_logits(hidden[rows])
            targets = torch.tensor(seq.token_ids[first + 1: last + 1], device=self.device)
            ids, lps, ranks = (t.tolist() for t in compute_prompt_logprobs(logits, targets, k))
            out.prompt_logprobs[seq.seq_id] = (first, [(a[: k + 1], b[: k + 1], r) for a, b, r in zip(ids, lps, ranks)])
