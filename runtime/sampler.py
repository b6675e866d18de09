"""Sampler: turns one step's logits [B, V] into one token per sequence.

Owns the per-step batch tensors (`SamplingTensors`, built on the host from the
scheduled sequences' `SamplingRow`s and copied to the device once per step) and
the vectorised logits pipeline. Nothing here keeps state between steps: the
engine owns tokens and seeds and hands them in again every step.

Pipeline (the order vLLM uses):
  1. logprobs of the raw model output (log_softmax), if any row asked for them
  2. logit_bias, min_tokens suppression of EOS / stop ids
  3. repetition (prompt + output), frequency and presence (output) penalties
  3b. structured outputs: per-row token bitmasks (runtime/structured/bitmask.py)
  4. temperature, min_p, top_k, top_p
  5. greedy rows: argmax; random rows: Gumbel-max with counter-based noise

Randomness: the noise for (seed, output position, vocab id) is a pure integer
hash, so a request's tokens depend only on its own seed and logits, not on which
other requests share the batch, their order, or the device (CPU and CUDA compute
the same integers). It also makes recomputation after preemption replay the same
tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from .sampling_params import SamplingParams
from .stop import suppressed_token_ids
from .structured.bitmask import TokenMask, apply_token_bitmask

_M32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
# top_p is computed on torch.topk(max_top_k) instead of a full sort when every top_p row
# also has a top_k up to this (topk beats a vocab-wide sort only for small k).
_TOPK_INSTEAD_OF_SORT = 1024

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Per-sequence inputs and per-step tensors
# ----------------------------------------------------------------------------


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence (one completion) this step."""

    params: SamplingParams
    seed: int
    """The completion's random stream; the engine draws one for unseeded requests and
    derives one per completion for n > 1 (see `completion_seed`)."""
    output_token_ids: Sequence[int] = ()
    """Tokens generated so far; its length is the position of the token being sampled.
    Read in full only when the row has a penalty (a list or a numpy int array)."""
    prompt_token_ids: Sequence[int] = ()
    """Only read when the row has a repetition penalty."""
    position: int | None = None
    """Index of the token being sampled within the output, when it differs from
    len(output_token_ids) (pipelined steps: earlier tokens are still on the device)."""
    eos_token_ids: AbstractSet[int] = frozenset()
    """The model's EOS ids; suppressed (unless ignore_eos) with params.stop_token_ids while
    fewer than params.min_tokens tokens were generated."""


def completion_seed(seed: int, index: int) -> int:
    """Seed of completion `index` of an n > 1 request: vLLM's `seed + index`, so that
    completion 0 of a seeded request matches the same request with n = 1."""
    return seed + index


@dataclass
class SamplingTensors:
    """One step's sampling inputs on the device, plus host-side flags that let
    `Sampler` skip whole stages. Per-row parameters of greedy rows are neutral
    (temperature 1, no top-k/p, min-p 0): filters never change an argmax."""

    batch_size: int
    vocab_size: int
    temperature: torch.Tensor  # float32 [B]
    top_p: torch.Tensor  # float32 [B]
    min_p: torch.Tensor  # float32 [B]
    presence_penalty: torch.Tensor  # float32 [B]
    frequency_penalty: torch.Tensor  # float32 [B]
    repetition_penalty: torch.Tensor  # float32 [B]
    top_k: torch.Tensor  # int64 [B], 0 = off
    seed_lo: torch.Tensor  # int64 [B], low 32 bits of the seed
    seed_hi: torch.Tensor  # int64 [B], high 32 bits
    position: torch.Tensor  # int64 [B], index of the token being sampled within the output
    random_rows: torch.Tensor | None = None  # int64 [R], only for mixed batches
    # Flat indices into logits.view(-1) (row * V + token).
    output_token_index: torch.Tensor | None = None  # counts for presence/frequency/repetition
    prompt_token_index: torch.Tensor | None = None  # seen-mask for repetition
    bias_index: torch.Tensor | None = None
    bias_value: torch.Tensor | None = None  # float32, same length as bias_index
    suppress_index: torch.Tensor | None = None  # min_tokens: EOS / stop ids set to -inf
    # Host-side flags.
    all_greedy: bool = False
    all_random: bool = False
    do_penalties: bool = False
    do_repetition: bool = False
    do_temperature: bool = False
    do_min_p: bool = False
    do_top_p: bool = False
    max_top_k: int = 0  # 0 = no row uses top-k
    top_p_within_top_k: bool = False  # every top_p row has 0 < top_k <= _TOPK_INSTEAD_OF_SORT
    max_num_logprobs: int | None = None  # None = no row wants logprobs
    num_logprobs: list[int | None] = field(default_factory=list)  # per row, for the engine

    @property
    def fast_path(self) -> bool:
        """All greedy, no bias, penalties, min_tokens or logprobs: the answer is an argmax."""
        return (
            self.all_greedy
            and not self.do_penalties
            and self.bias_index is None
            and self.suppress_index is None
            and self.max_num_logprobs is None
        )

    @classmethod
    def build(
        cls,
        rows: Sequence[SamplingRow],
        vocab_size: int,
        device: torch.device | str,
        stage: Stager | None = None,
    ) -> SamplingTensors:
        """Walk the rows once on the host (`_HostRows.collect`), pack them into one int and one
        float buffer (`_HostRows.pack`), stage both to the device in one go and view the tensors
        out of them (`_from_device`). `stage`: the runner's staging (persistent pinned buffers
        on CUDA); by default a plain copy (pinned per call on CUDA)."""
        host = _HostRows.collect(rows, vocab_size)
        int_buf, float_buf = host.pack()
        int_t, float_t = (stage or _default_stager(torch.device(device)))([int_buf, float_buf])
        return cls._from_device(host, int_t, float_t)

    @classmethod
    def _from_device(cls, host: _HostRows, int_buf: torch.Tensor, float_buf: torch.Tensor) -> SamplingTensors:
        B = host.batch_size
        table_i = int_buf[: 4 * B].view(B, 4)
        table_f = float_buf[: 6 * B].view(B, 6)
        pieces: list[torch.Tensor | None] = []
        off = 4 * B
        for n in host.segment_lengths():
            pieces.append(int_buf[off : off + n] if n else None)
            off += n
        out_t, prompt_t, bias_t, suppress_t, random_t = pieces
        return cls(
            batch_size=B,
            vocab_size=host.vocab_size,
            temperature=table_f[:, 0],
            top_p=table_f[:, 1],
            min_p=table_f[:, 2],
            presence_penalty=table_f[:, 3],
            frequency_penalty=table_f[:, 4],
            repetition_penalty=table_f[:, 5],
            top_k=table_i[:, 0],
            seed_lo=table_i[:, 1],
            seed_hi=table_i[:, 2],
            position=table_i[:, 3],
            random_rows=random_t,
            output_token_index=out_t,
            prompt_token_index=prompt_t,
            bias_index=bias_t,
            bias_value=float_buf[6 * B :] if host.bias_val else None,
            suppress_index=suppress_t,
            all_greedy=host.all_greedy,
            all_random=host.all_random,
            do_penalties=bool(host.out_rows),
            do_repetition=bool(host.prompt_rows),
            do_temperature=host.do_temp,
            do_min_p=host.do_min_p,
            do_top_p=host.do_top_p,
            max_top_k=host.max_top_k,
            top_p_within_top_k=host.do_top_p and host.top_p_within_top_k,
            max_num_logprobs=host.max_lp,
            num_logprobs=host.num_logprobs,
        )


Stager = Callable[[list[np.ndarray]], list[torch.Tensor]]
"""Host arrays -> device tensors of the same dtypes and shapes (ModelRunner._stage)."""


def _default_stager(device: torch.device) -> Stager:
    def stage(arrays: list[np.ndarray]) -> list[torch.Tensor]:
        if device.type == "cuda":
            return [torch.from_numpy(a).pin_memory().to(device, non_blocking=True) for a in arrays]
        return [torch.from_numpy(a).to(device) for a in arrays]

    return stage


@dataclass
class _HostRows:
    """The rows of one step gathered on the host: per-row tables and the flat index segments."""

    batch_size: int
    vocab_size: int
    floats: list[float] = field(default_factory=list)  # [B, 6] table
    ints: list[int] = field(default_factory=list)  # [B, 4] table
    greedy_flags: list[bool] = field(default_factory=list)
    out_rows: list[int] = field(default_factory=list)  # penalty rows: their output tokens are counted
    out_seqs: list[Sequence[int]] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)  # repetition-penalty rows: prompt tokens marked seen
    prompt_seqs: list[Sequence[int]] = field(default_factory=list)
    bias_idx: list[int] = field(default_factory=list)
    bias_val: list[float] = field(default_factory=list)
    suppress_idx: list[int] = field(default_factory=list)
    num_logprobs: list[int | None] = field(default_factory=list)
    do_temp: bool = False
    do_min_p: bool = False
    do_top_p: bool = False
    top_p_within_top_k: bool = True
    max_top_k: int = 0
    max_lp: int | None = None
    all_greedy: bool = False
    all_random: bool = False
    _segments: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def collect(cls, rows: Sequence[SamplingRow], vocab_size: int) -> _HostRows:
        V = vocab_size
        h = cls(batch_size=len(rows), vocab_size=V)
        floats, ints = h.floats, h.ints
        for i, row in enumerate(rows):
            p = row.params
            n_out = len(row.output_token_ids) if row.position is None else row.position
            greedy = p.greedy
            h.greedy_flags.append(greedy)
            if greedy:
                temp, top_p, min_p, top_k = 1.0, 1.0, 0.0, 0
            else:
                temp, top_p, min_p = p.temperature, p.top_p, p.min_p
                top_k = p.top_k if 0 < p.top_k < V else 0
                h.do_temp |= temp != 1.0
                h.do_min_p |= min_p > 0.0
                h.max_top_k = max(h.max_top_k, top_k)
                if top_p < 1.0:
                    h.do_top_p = True
                    h.top_p_within_top_k &= 0 < top_k <= _TOPK_INSTEAD_OF_SORT
            pres, freq, rep = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
            floats += (temp, top_p, min_p, pres, freq, rep)
            seed = row.seed & _U64
            ints += (top_k, seed & _M32, seed >> 32, n_out)

            if pres != 0.0 or freq != 0.0 or rep != 1.0:
                h.out_rows.append(i)
                h.out_seqs.append(row.output_token_ids)
                if rep != 1.0:
                    h.prompt_rows.append(i)
                    h.prompt_seqs.append(row.prompt_token_ids)
            if p.logit_bias:  # ids were checked against the vocabulary by runtime/validation.py
                for t, b in p.logit_bias.items():
                    h.bias_idx.append(i * V + t)
                    h.bias_val.append(b)
            if n_out < p.min_tokens:
                h.suppress_idx += [
                    i * V + t for t in suppressed_token_ids(p, row.eos_token_ids, n_out) if 0 <= t < V
                ]
            h.num_logprobs.append(p.logprobs)
            if p.logprobs is not None:
                h.max_lp = p.logprobs if h.max_lp is None else max(h.max_lp, p.logprobs)
        h.all_greedy = all(h.greedy_flags)
        h.all_random = not any(h.greedy_flags)
        return h

    def pack(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 buffer: [B, 4] table, then the index segments; float32: [B, 6] table, then bias values."""
        V = self.vocab_size
        random_rows = (
            []
            if (self.all_greedy or self.all_random)
            else [i for i, g in enumerate(self.greedy_flags) if not g]
        )
        self._segments = [
            _flat_token_index(self.out_rows, self.out_seqs, V),
            _flat_token_index(self.prompt_rows, self.prompt_seqs, V),
            np.asarray(self.bias_idx, dtype=np.int64),
            np.asarray(self.suppress_idx, dtype=np.int64),
            np.asarray(random_rows, dtype=np.int64),
        ]
        ints = np.concatenate([np.asarray(self.ints, dtype=np.int64)] + self._segments)
        floats = np.asarray(self.floats + self.bias_val, dtype=np.float32)
        return ints, floats

    def segment_lengths(self) -> list[int]:
        """Lengths of out / prompt / bias / suppress / random-row segments (after pack)."""
        return [len(seg) for seg in self._segments]


def _flat_token_index(row_ids: list[int], seqs: list[Sequence[int]], vocab_size: int) -> np.ndarray:
    """row * V + token for every token of the given rows' sequences, in C-speed numpy
    (this is the only part of a step's host work that grows with sequence length)."""
    lengths = [len(x) for x in seqs]
    total = sum(lengths)
    if total == 0:
        return np.empty(0, dtype=np.int64)
    tokens = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=total)
    return tokens + np.repeat(np.asarray(row_ids, dtype=np.int64) * vocab_size, lengths)


# ----------------------------------------------------------------------------
# Counter-based random numbers
# ----------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64, without ever overflowing
    int64 (signed overflow is not something to rely on across devices)."""
    if c < (1 << 31):
        return (x * c) & _M32
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """`lowbias32` (C. Wellons): a bijective 32-bit integer hash with strong avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_vocab_hash_cache: dict[tuple[int, torch.device], torch.Tensor] = {}


def _vocab_hash(vocab_size: int, device: torch.device) -> torch.Tensor:
    key = (vocab_size, device)
    h = _vocab_hash_cache.get(key)
    if h is None:
        v = torch.arange(vocab_size, dtype=torch.int64, device=device)
        h = _mix32(_mix32(v ^ 0x5BD1E995) ^ 0x27D4EB2F)
        _vocab_hash_cache[key] = h
    return h


def _row_key(seed_lo: torch.Tensor, seed_hi: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    # Three chained rounds over the row's counters (cheap: one element per row).
    k = _mix32(seed_lo ^ 0x9E3779B9)
    k = _mix32(k ^ seed_hi ^ 0x85EBCA6B)
    return _mix32(k ^ (position & _M32) ^ 0xC2B2AE35)


def _bits(key: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    # The vocab id is pre-hashed (cached), so one round on [R, V] suffices.
    return _mix32(key[:, None] ^ vocab_hash[None, :])


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    # 23 bits, so that (k + 0.5) / 2**23 is exact in float32 and never rounds to 0 or 1.
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def random_bits(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, position: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Uniform 32-bit integers (int64 [R, V]) that depend only on (seed, position, vocab id)."""
    return _bits(_row_key(seed_lo, seed_hi, position), _vocab_hash(vocab_size, seed_lo.device))


def uniform_noise(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, position: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """float32 [R, V] uniforms in the open interval (0, 1)."""
    return _uniform(random_bits(seed_lo, seed_hi, position, vocab_size))


def gumbel_argmax(
    logits: torch.Tensor,
    seed_lo: torch.Tensor,
    seed_hi: torch.Tensor,
    position: torch.Tensor,
    vocab_hash: torch.Tensor,
) -> torch.Tensor:
    """argmax(logits + Gumbel noise): one sample per row from softmax(logits); the noise is
    -log(-log(u)) of the counter-based uniforms u.
    Written as one function so that torch.compile fuses it into a single pass over
    [R, V] (eager it is ~25 passes over int64 temporaries)."""
    bits = _bits(_row_key(seed_lo, seed_hi, position), vocab_hash)
    return (logits - torch.log(-torch.log(_uniform(bits)))).argmax(dim=-1)


# ----------------------------------------------------------------------------
# Logits processing (each function works on the whole batch)
# ----------------------------------------------------------------------------


def apply_penalties(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """OpenAI presence/frequency penalties over output tokens and HF/vLLM repetition
    penalty over prompt + output tokens, in place."""
    B, V = logits.shape
    counts = torch.zeros(B * V, dtype=torch.int32, device=logits.device)
    if st.output_token_index is not None:
        counts.index_put_(
            (st.output_token_index,),
            torch.ones_like(st.output_token_index, dtype=torch.int32),
            accumulate=True,
        )
    counts = counts.view(B, V)
    if st.do_repetition:
        seen = counts > 0
        if st.prompt_token_index is not None:
            seen.view(-1)[st.prompt_token_index] = True
        rep = st.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    logits -= st.frequency_penalty[:, None] * counts
    logits -= st.presence_penalty[:, None] * (counts > 0)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < min_p * p_max; in log space, so no softmax is needed."""
    max_logit = logits.amax(dim=-1, keepdim=True)
    threshold = max_logit + torch.log(min_p)[:, None]  # log(0) = -inf: row unaffected
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    max_top_k: int,
    top_p_within_top_k: bool = False,
) -> torch.Tensor:
    """top_k (0 = off), then top_p over the distribution renormalised to the top k (vLLM).

    Each row's filter ends up as a value threshold on its logits, so tokens tied with
    the last kept one are kept, whatever order a sort puts ties in: the kept set
    depends only on the row, not on the batch (which decides max_top_k and whether a
    full sort is needed).
    """
    neg_inf = float("-inf")
    if top_p is None or top_p_within_top_k:
        # Rows with top_p < 1 all have top_k > 0 here: their kept set lies in the top max_top_k.
        values = logits.topk(max_top_k, dim=-1).values
    else:
        values = logits.sort(dim=-1, descending=True).values
    if top_k is not None:
        kth = values.gather(1, (top_k - 1).clamp(min=0)[:, None])
        kth = kth.masked_fill((top_k == 0)[:, None], neg_inf)
        if top_p is None:
            return logits.masked_fill(logits < kth, neg_inf)
        values = values.masked_fill(values < kth, neg_inf)
    if top_p is None:  # neither filter is on
        return logits
    probs = values.softmax(dim=-1)
    exclusive_cumsum = probs.cumsum(dim=-1) - probs
    # Keep the smallest prefix whose mass reaches top_p; rows with top_p = 1 are left
    # alone (rounding in the cumsum would otherwise drop tail tokens), and the first
    # token is always kept. The kept entries form a prefix of `values`.
    keep = ((exclusive_cumsum < top_p[:, None]) | (top_p >= 1.0)[:, None]) & (values > neg_inf)
    keep[:, 0] = True
    threshold = values.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
    if top_p_within_top_k and top_k is not None:
        threshold = threshold.masked_fill((top_k == 0)[:, None], neg_inf)  # these rows have top_p = 1
    return logits.masked_fill(logits < threshold, neg_inf)


# ----------------------------------------------------------------------------
# Logprobs
# ----------------------------------------------------------------------------


class LogprobsTensors(NamedTuple):
    """Column 0 is the sampled (or prompt) token; columns 1..K the top-K tokens, best
    first, whose ranks are their column numbers. `ranks` is column 0's rank:
    1 + the number of tokens with a strictly greater logprob."""

    token_ids: torch.Tensor  # int64 [N, K+1]
    logprobs: torch.Tensor  # float32 [N, K+1]
    ranks: torch.Tensor  # int64 [N]


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """`logprobs` is a log_softmax [N, V]; `token_ids` [N] the tokens to report."""
    token_ids = token_ids.to(torch.int64)
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        ids = torch.cat([token_ids[:, None], top_ids], dim=1)
        lps = torch.cat([chosen, top_lp], dim=1)
    else:
        ids, lps = token_ids[:, None], chosen
    return LogprobsTensors(ids, lps, ranks)


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """Prompt logprobs: logits [N, V] of positions whose next (prompt) token is target_ids [N]."""
    return gather_logprobs(torch.log_softmax(logits.float(), dim=-1), target_ids, k)


# ----------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor  # int64 [B]
    logprobs: LogprobsTensors | None = None


class Sampler:
    """Stateless apart from compiled kernels; `__call__` may modify `logits` in place.

    compile: fuse the Gumbel-max pass with torch.compile (None = on CUDA only). The
    compiled and eager versions compute the same integers; if compilation fails the
    sampler logs it once and stays eager.
    """

    def __init__(self, compile: bool | None = None):
        self._compile = compile
        self._compiled_gumbel_argmax: Callable[..., torch.Tensor] | None = None

    def __call__(
        self, logits: torch.Tensor, st: SamplingTensors, token_mask: TokenMask | None = None
    ) -> SamplerOutput:
        """token_mask: structured-output bitmasks for some rows (runtime/structured), applied
        after bias and penalties, before temperature and the filters; logprobs stay raw."""
        if st.fast_path:
            if token_mask is not None:  # --- structured outputs (separate step) ---
                logits = apply_token_bitmask(logits.float().contiguous(), token_mask)
            return SamplerOutput(logits.argmax(dim=-1))

        raw_logprobs = None
        if st.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        logits = logits.float().contiguous()

        flat = logits.view(-1)
        if st.bias_index is not None and st.bias_value is not None:
            flat.index_put_((st.bias_index,), st.bias_value, accumulate=True)
        if st.suppress_index is not None:
            flat[st.suppress_index] = float("-inf")
        if st.do_penalties:
            logits = apply_penalties(logits, st)
        if token_mask is not None:  # --- structured outputs (separate step) ---
            logits = apply_token_bitmask(logits, token_mask)

        if st.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample(logits, st)

        lp = None
        if raw_logprobs is not None and st.max_num_logprobs is not None:
            lp = gather_logprobs(raw_logprobs, token_ids, st.max_num_logprobs)
        return SamplerOutput(token_ids, lp)

    def _sample(self, logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        rows = st.random_rows  # None when every row samples
        greedy_ids = None if st.all_random else logits.argmax(dim=-1)
        if rows is not None:
            logits = logits.index_select(0, rows)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t.index_select(0, rows)

        if st.do_temperature:
            logits = logits / pick(st.temperature)[:, None]
        if st.do_min_p:
            logits = apply_min_p(logits, pick(st.min_p))
        if st.max_top_k > 0 or st.do_top_p:
            logits = apply_top_k_top_p(
                logits,
                pick(st.top_k) if st.max_top_k > 0 else None,
                pick(st.top_p) if st.do_top_p else None,
                st.max_top_k,
                st.top_p_within_top_k,
            )
        sampled = self._gumbel_argmax(
            logits,
            pick(st.seed_lo),
            pick(st.seed_hi),
            pick(st.position),
            _vocab_hash(st.vocab_size, logits.device),
        )
        if rows is None:
            return sampled
        assert greedy_ids is not None  # rows is set only when some rows are greedy
        return greedy_ids.index_copy(0, rows, sampled)

    def _gumbel_argmax(self, logits, seed_lo, seed_hi, position, vocab_hash) -> torch.Tensor:
        use = self._compile if self._compile is not None else logits.device.type == "cuda"
        if use:
            try:
                if self._compiled_gumbel_argmax is None:
                    self._compiled_gumbel_argmax = torch.compile(gumbel_argmax, dynamic=True)
                return self._compiled_gumbel_argmax(logits, seed_lo, seed_hi, position, vocab_hash)
            except Exception as e:  # a missing or broken compiler must not take sampling down
                logger.warning(
                    "torch.compile of the sampler failed (%s: %s); sampling eagerly", type(e).__name__, e
                )
                self._compile = False
        return gumbel_argmax(logits, seed_lo, seed_hi, position, vocab_hash)
