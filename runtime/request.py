"""Seq: all per-completion state of a request, on the CPU (named so that it never
shadows typing.Sequence).

The engine creates one Seq per completion (n of them for `n > 1`); only the
scheduler mutates scheduling state (status, num_computed_tokens) -- a sequence
ends only in `Scheduler.finish`, on a decision of runtime/stop.py or an abort --
and only the KV cache manager mutates `block_ids`. Nothing here touches the device.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .structured.grammar import GrammarState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset((SeqStatus.FINISHED_STOPPED, SeqStatus.FINISHED_LENGTH, SeqStatus.FINISHED_ABORTED))


class Seq:
    """One completion stream: prompt + generated tokens, progress and KV blocks."""

    __slots__ = (
        "seq_id",
        "request_id",
        "index",
        "params",
        "seed",
        "token_ids",
        "num_prompt_tokens",
        "num_computed_tokens",
        "num_cached_tokens",
        "block_ids",
        "status",
        "stop_reason",
        "pending_forks",
        "arrival_time",
        "max_len",
        "num_preemptions",
        "block_hashes",
        "num_placeholders",
        "num_registered_blocks",
        "grammar",
    )

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        max_len: int,
        arrival_time: float,
    ):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.params = params
        self.seed = seed
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # includes tokens of steps scheduled but not yet finished on the device
        self.num_placeholders = 0  # tokens being sampled on the device, not yet appended to token_ids
        self.num_registered_blocks = 0  # leading full blocks already offered to the prefix cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks, computed lazily
        self.status = SeqStatus.WAITING
        self.stop_reason: int | str | None = None
        self.pending_forks: list[Seq] = []  # n > 1: siblings that fork from this one after its prefill
        self.arrival_time = arrival_time
        self.max_len = max_len  # hard cap on len(token_ids): prompt + max_tokens, or the model's context
        self.num_preemptions = 0
        # structured outputs: this completion's GrammarState (runtime/structured)
        self.grammar: GrammarState | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens that exist or are being sampled: what the next step may compute up to."""
        return len(self.token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED

    def __repr__(self) -> str:
        return (
            f"Seq({self.request_id}#{self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)}, {self.status.value})"
        )
