"""Scheduler: decides, each engine step, which sequences run and how many tokens each computes.

There are no prefill and decode phases: every step lets each running sequence's
computed tokens catch up with its known tokens, within a token budget
(`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`). That gives
continuous batching, chunked prefill (a long prompt is spread over several
steps) and prefix caching (cached blocks count as computed) from one rule.
When KV blocks run out, the most recently admitted running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of
the waiting queue; seeds make its resumed output identical.

The scheduler owns the waiting and running queues and every Seq's
scheduling state; it returns a plain `SchedulerOutput` (runtime/scheduler_output.py)
and never touches device tensors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .kv_cache import KVCacheManager
from .request import Seq, SeqStatus
from .scheduler_output import ScheduledSeq, SchedulerOutput
from .stop import StopChecker


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------
    def add(self, seq: Seq) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Seq, status: SeqStatus, reason: int | str | None = None) -> None:
        """End seq (stop, length or abort): the only place a sequence finishes. Frees its
        blocks and drops it from the queues; a no-op when it already finished."""
        if seq.is_finished:
            return
        seq.status = status
        seq.stop_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.kv.free(seq)

    # -- one step ---------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            known = seq.num_known_tokens
            if known >= seq.max_len or known <= seq.num_computed_tokens:
                i += 1  # its last token is still being sampled and ends it (pipelined steps)
                continue
            n = min(known - seq.num_computed_tokens, budget)
            copies = self.kv.allocate_slots(seq, n)
            while copies is None:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
                copies = self.kv.allocate_slots(seq, n)
            if copies is None:  # seq itself was preempted (it was the last one)
                break
            out.block_copies += copies
            self._commit(out, seq, n)
            budget -= n
            i += 1

        # Admit waiting sequences only when nothing was preempted this step (it would thrash).
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.kv.find_cached_prefix(seq)
            computed = seq.num_computed_tokens + len(cached) * self.kv.block_size
            n = min(seq.num_known_tokens - computed, budget)
            copies = self.kv.allocate_slots(seq, n, cached)
            if copies is None:
                break
            self.waiting.popleft()
            if cached:
                seq.num_computed_tokens = computed
                if seq.num_output_tokens == 0:
                    seq.num_cached_tokens = computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.block_copies += copies
            self._commit(out, seq, n)
            budget -= n

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _commit(self, out: SchedulerOutput, seq: Seq, n: int) -> None:
        """Count the step's tokens as computed now, so the next step can be scheduled before
        this one finishes on the device; a sampled token is a placeholder until update()."""
        start = seq.num_computed_tokens
        sample = start + n == seq.num_known_tokens
        out.scheduled.append(ScheduledSeq(seq, start, n, sample))
        seq.num_computed_tokens = start + n
        if sample:
            seq.num_placeholders += 1

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput, sampled: dict[int, int], stop: StopChecker) -> list[Seq]:
        """Turn the step's placeholders into sampled tokens, fork n>1 siblings, and finish the
        sequences that `stop` (runtime/stop.py) says are done.

        `sampled` maps seq_id -> new token for the sequences that sampled. Returns the
        sequences that got a new token (finished ones included).
        """
        progressed = []
        for s in out.scheduled:
            seq = s.seq
            if s.sample:
                seq.num_placeholders -= 1
            if seq.is_finished:  # stopped, aborted or finished while this step was on the device
                continue
            if not s.sample:
                if seq.block_ids:
                    self.kv.cache_full_blocks(seq)
                continue
            token = sampled[seq.seq_id]
            if seq.pending_forks:
                self._fork_siblings(seq)
            seq.token_ids.append(token)  # also for a sequence preempted meanwhile: the token is valid
            if seq.block_ids:
                self.kv.cache_full_blocks(seq)
            progressed.append(seq)
            decision = stop.check(seq, token)
            if decision is not None:
                self.finish(seq, decision.status, decision.reason)
        return progressed

    def _fork_siblings(self, leader: Seq) -> None:
        """n > 1: siblings share the leader's prompt KV and recompute only its last prompt token."""
        share = leader.num_prompt_tokens - 1
        for child in leader.pending_forks:
            if child.is_finished:
                continue
            if share > 0 and leader.block_ids and len(self.running) < self.max_num_seqs:
                self.kv.fork(leader, child, share)
                child.num_computed_tokens = share
                child.num_cached_tokens = share
                child.status = SeqStatus.RUNNING
                self.running.append(child)
            else:
                self.waiting.appendleft(child)
        leader.pending_forks = []

    def abort(self, seqs: Iterable[Seq]) -> None:
        """Abort seqs and the siblings still waiting to fork from them."""
        for seq in seqs:
            forks, seq.pending_forks = seq.pending_forks, []
            for child in forks:
                self.finish(child, SeqStatus.FINISHED_ABORTED)
            self.finish(seq, SeqStatus.FINISHED_ABORTED)
