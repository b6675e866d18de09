"""SchedulerOutput: what one engine step computes, as plain data (CPU only).

Produced by `Scheduler.schedule()`, read by the ModelRunner (which must not import
the scheduler) and handed back to `Scheduler.update()`. Holds references to the
scheduled Sequences; nothing here mutates them or touches the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .request import Seq


@dataclass
class ScheduledSeq:
    """One sequence's share of a step."""

    seq: Seq
    start: int
    """Position of the first token computed this step (the sequence's computed count before it)."""
    num_new_tokens: int
    """Tokens computed for this sequence this step: positions start .. start + num_new_tokens - 1."""
    sample: bool
    """True when this step reaches the end of the known tokens, so a new token is sampled."""


@dataclass
class SchedulerOutput:
    """One step: the sequences to run, in the order the runner lays their tokens out."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) KV block copies to do before the forward pass (copy-on-write)."""
    num_batched_tokens: int = 0
    """Tokens computed this step, over all scheduled sequences."""
    preempted: list[Seq] = field(default_factory=list)
    """Sequences preempted (blocks freed, back to waiting) while this step was scheduled."""

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
