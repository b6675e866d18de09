"""IncrementalDetokenizer: one completion's token ids -> text, as tokens arrive.

Owns the per-completion decoding state (token ids, the prefix/read offsets, the
cumulative output text, the stop-string scan position and what was already
streamed). The engine owns one per completion; runtime/stop.py's StopChecker
feeds it each sampled token and decides from its answer whether the completion
ends (the matching rule itself is stop.find_stop_string).

Decoding follows vLLM's prefix_offset/read_offset scheme with only
`tokenizer.decode(ids, skip_special_tokens=...)`: the text of the new tokens is the
decode of a short window [prefix_offset:] minus the decode of [prefix_offset:
read_offset]. Decoding a window, not a single token, keeps context-dependent
decoders right (SentencePiece drops the leading space of a decode's first token),
and a delta that ends in U+FFFD is held back until the next tokens complete the
UTF-8 sequence, so `output_text` never ends in half a character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .sampling_params import SamplingParams
from .stop import find_stop_string

# How many prompt tokens give the first output tokens their decoding context (vLLM's value).
_INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_token_ids: Sequence[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop: list[str] = list(params.stop)
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        # Text a later stop string could still cut is held back from streaming.
        self.stop_buffer_length = (
            max(len(s) for s in self.stop) - 1 if self.stop and not self.include_stop_str_in_output else 0
        )

        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self._num_decodable = len(self.token_ids)  # all but a stop-terminating token left out of the text
        self.prefix_offset = max(self.num_prompt_tokens - _INITIAL_CONTEXT_TOKENS, 0)
        self.read_offset = self.num_prompt_tokens
        self._prefix_text = self._decode(self.prefix_offset, self.read_offset)
        self.output_text = ""
        self.stop_reason: str | None = None
        self._streamed = 0  # chars of output_text already returned by get_next_output_text(delta=True)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _decode_next(self, flush: bool = False) -> str:
        """Text completed by the tokens after read_offset ('' while a character is
        incomplete, unless flush: then whatever the bytes decode to)."""
        new_text = self._decode(self.prefix_offset, self._num_decodable)
        if len(new_text) <= len(self._prefix_text) or (new_text.endswith(_REPLACEMENT) and not flush):
            # Nothing printable yet (a special token that is skipped, or part of a
            # multibyte character): keep the window and try again with more tokens.
            return ""
        delta = new_text[len(self._prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = self._num_decodable
        self._prefix_text = self._decode(self.prefix_offset, self.read_offset)
        return delta

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> str | None:
        """Append sampled tokens; return the stop string that matched, or None.

        On a match `output_text` ends just before the stop string (or just after it
        with include_stop_str_in_output) and the engine finishes the completion.
        `stop_terminated`: the last token is an EOS / stop token id that ended the
        completion; it stays in the token ids but its text is not added (vLLM).
        """
        if self.stop_reason is not None:
            return None
        new_token_ids = list(new_token_ids)
        skipped = None
        if stop_terminated and not self.include_stop_str_in_output and new_token_ids:
            skipped = new_token_ids.pop()
        scan_from = len(self.output_text)
        for t in new_token_ids:
            self.token_ids.append(t)
            self._num_decodable += 1
            self.output_text += self._decode_next()
            # Text made by the first min_tokens tokens cannot end the completion (vLLM).
            if len(self.token_ids) - self.num_prompt_tokens <= self.min_tokens:
                scan_from = len(self.output_text)
        if skipped is not None:
            self.token_ids.append(skipped)
        return self._cut_at_stop_string(scan_from)

    def flush(self) -> str | None:
        """At the end of a completion: add the text of tokens still held back because
        they end in an incomplete UTF-8 sequence (it then contains U+FFFD, as a full
        decode would). Returns a stop string if that text completes one."""
        if self.stop_reason is not None or self.read_offset >= self._num_decodable:
            return None
        scan_from = len(self.output_text)
        self.output_text += self._decode_next(flush=True)
        return self._cut_at_stop_string(scan_from)

    def _cut_at_stop_string(self, scan_from: int) -> str | None:
        if not self.stop or scan_from >= len(self.output_text):
            return None
        text = self.output_text
        best = find_stop_string(text, scan_from, self.stop)
        if best is None:
            return None
        i, s = best
        self.output_text = text[: i + len(s)] if self.include_stop_str_in_output else text[:i]
        self.stop_reason = s
        return s

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to send now: the whole text (delta=False) or what was not sent yet
        (delta=True). Until `finished`, the last len(longest stop)-1 characters are held
        back, since a stop string completed by later tokens would cut them."""
        hold = 0 if finished or self.stop_reason is not None else self.stop_buffer_length
        end = len(self.output_text) - hold
        if not delta:
            return self.output_text[: max(end, 0)]
        if end <= self._streamed:
            return ""
        start, self._streamed = self._streamed, end
        return self.output_text[start:end]
