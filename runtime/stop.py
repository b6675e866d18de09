"""Stopping: the one place that decides whether, and why, a completion finishes.

`StopChecker.check(seq, token)` is called by `Scheduler.update` for every sampled
token, after the token was appended; a decision it returns is applied with
`Scheduler.finish`, the only code that ends a sequence (aborts included). The
rules, in vLLM's order of precedence:

1. EOS (unless `ignore_eos`) or one of `stop_token_ids` ends the completion with
   "stop" (stop_reason: None for EOS, the token id otherwise). Not before
   `min_tokens` tokens were generated: the sampler masks these ids until then
   (`suppressed_token_ids` says which), and this check repeats the rule so that
   a token that got through anyway (logit_bias cannot beat -inf) cannot stop early.
2. A stop string matched in the detokenized text ends it with "stop"
   (stop_reason: the string); text produced by the first `min_tokens` tokens is
   not searched. Matching is `find_stop_string`; the detokenizer applies it to the
   text it owns and cuts the text at the match.
3. Reaching `Seq.max_len` (prompt + max_tokens, or the context length)
   ends it with "length" -- unless rule 2 matched on the same token.

Where the text lives elsewhere -- the engine core runs with `detokenize = False`
and the server's OutputProcessor (runtime/output_processor.py) owns the
detokenizers -- rules 1 and 3 are decided in the core (StopChecker without a
text source) and rule 2 on the text side with the same helpers
(`match_stop_string`, `resolve`), token by token, so both places apply one rule
set.

Nothing here touches the device or mutates a Seq.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from .request import Seq, SeqStatus
from .sampling_params import SamplingParams


@dataclass(frozen=True)
class StopDecision:
    """Why a completion ends: the finished status and the matched stop token id / string."""

    status: SeqStatus
    reason: int | str | None = None


class TextStopper(Protocol):
    """The detokenizer side of rule 2 (runtime/detokenizer.py's IncrementalDetokenizer)."""

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None: ...

    def flush(self) -> str | None: ...


def suppressed_token_ids(
    params: SamplingParams, eos_token_ids: AbstractSet[int], num_output_tokens: int
) -> AbstractSet[int]:
    """Token ids the sampler must not pick for output position `num_output_tokens`
    (EOS and stop token ids before min_tokens); empty once min_tokens is reached."""
    if num_output_tokens >= params.min_tokens:
        return frozenset()
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids |= eos_token_ids
    return ids


def find_stop_string(text: str, scan_from: int, stop: Iterable[str]) -> tuple[int, str] | None:
    """The earliest stop string in `text` that ends after `scan_from` (text before it was
    already searched): (start index, string), or None."""
    best: tuple[int, str] | None = None
    for s in stop:
        # Only new text, plus the tail a match spanning the old/new boundary starts in.
        i = text.find(s, max(0, scan_from - len(s) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def match_stop_string(text: TextStopper, token: int, by_token: bool, ends: bool) -> str | None:
    """Rule 2 for one appended token: feed it to the detokenizer and return the stop string it
    completed, or None. `by_token`: rule 1 ended the completion on this token (its text is left
    out); `ends`: the completion ends on this token whatever the text says (rule 1 or 3, or an
    abort), so the last incomplete character is flushed into the text first."""
    matched = text.update([token], stop_terminated=by_token)
    if matched is None and (by_token or ends):
        matched = text.flush()  # the last, incomplete character still becomes text
    return matched


def resolve(by_token: StopDecision | None, matched: str | None, at_length: bool) -> StopDecision | None:
    """The precedence of the rules for one token: rule 1, else a matched stop string (rule 2,
    which also beats rule 3 on the same token), else rule 3."""
    if by_token is not None:
        return by_token
    if matched is not None:
        return StopDecision(SeqStatus.FINISHED_STOPPED, matched)
    if at_length:
        return StopDecision(SeqStatus.FINISHED_LENGTH, None)
    return None


class StopChecker:
    """Applies the rules above. `text_of(seq)` gives the sequence's detokenizer (None
    without a tokenizer: stop strings then never match)."""

    def __init__(
        self, eos_token_ids: Iterable[int], text_of: Callable[[Seq], TextStopper | None] | None = None
    ):
        self.eos_token_ids = frozenset(eos_token_ids)
        self._text_of = text_of

    def check(self, seq: Seq, token: int) -> StopDecision | None:
        """Decide for `seq`, whose last token (`token`) was just appended. Called for every
        sequence of every step: the common case (no stop, no text) costs no extra calls."""
        p = seq.params
        n = len(seq.token_ids)
        by_token: StopDecision | None = None
        if n - seq.num_prompt_tokens > p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                by_token = _STOP_EOS
            elif p.stop_token_ids and token in p.stop_token_ids:
                by_token = StopDecision(SeqStatus.FINISHED_STOPPED, token)
        at_length = n >= seq.max_len
        text = self._text_of(seq) if self._text_of is not None else None
        if text is None:  # rules 1 and 3 only
            return by_token if by_token is not None else _LENGTH if at_length else None
        # An EOS / stop token ends the completion; its own text is left out (vLLM).
        matched = match_stop_string(text, token, by_token is not None, at_length)
        return resolve(by_token, matched, at_length)


_STOP_EOS = StopDecision(SeqStatus.FINISHED_STOPPED, None)
_LENGTH = StopDecision(SeqStatus.FINISHED_LENGTH, None)
