"""Reasoning parsers (`--reasoning-parser`): split a completion into its reasoning block and the answer.

Models such as DeepSeek-R1 and Qwen3 write their reasoning between `<think>` and `</think>`
before the answer. The split is a pure function of the text so far (`split`), so the
non-streamed message and the concatenated stream deltas always agree; while streaming,
text that may be the start of a tag is held back until the next tokens decide it.
`ReasoningStream` gives the same deltas while reading each new piece of text once (plus
a look-back of one tag's length): splitting the whole text at every step was quadratic
in the length of the output.

- deepseek_r1: the chat template already opens `<think>` in the prompt; text without
  `</think>` (yet) is reasoning.
- qwen3: the model opens `<think>` itself (or the template closed an empty block for
  enable_thinking=false); text that never opened a block is the answer.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
PARSERS = ("deepseek_r1", "qwen3")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    def __init__(self, name: str):
        if name not in PARSERS:
            raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(PARSERS)}")
        self.name = name

    def split(self, text: str, finished: bool = True) -> tuple[str | None, str]:
        """(reasoning, answer) of the text so far; unfinished: both exclude held-back text."""
        body = text
        lead = len(body) - len(body.lstrip())
        opened = body[lead:].startswith(START)
        if opened:
            body = body[lead + len(START) :]
        elif not finished and START.startswith(body[lead:]) and body[lead:]:
            return None, ""  # may still become <think>
        end = body.find(END)
        if end != -1:
            answer = body[end + len(END) :]
            return body[:end], answer.lstrip("\n") if finished or answer.strip("\n") else ""
        if opened or self.name == "deepseek_r1":
            hold = 0 if finished else _partial_suffix(body, END)
            return body[: len(body) - hold], ""
        return None, text  # qwen3 without a block: all answer

    def reasoning_ended_in_prompt(self, prompt_text: str) -> bool:
        """True if the prompt closed the last reasoning block (e.g. enable_thinking=false)."""
        i = prompt_text.rfind(START)
        return i != -1 and prompt_text.find(END, i) != -1 or (self.name == "qwen3" and i == -1)


class ReasoningStream:
    """One streamed choice: `feed(new_text, finished)` -> (reasoning delta, answer delta), exactly
    the new parts of `split(text so far, finished)` (what a consumer slicing each split at the
    lengths it already sent gets, retroactive splits included), at a cost of O(len(new_text))
    per call once the start of the text decided whether a block opened.

    Phases: "start" (the text may still become `<think>`: it is short, split() decides it),
    "reasoning" (inside the block, looking for `</think>` in the held-back tail and the new
    text), "answer" (qwen3 without a block: all text is answer, but a later `</think>` still
    splits it, as split() does), "after" (`</think>` seen: the rest is answer, leading newlines
    dropped)."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.phase = "start"
        self._chunks: list[str] = []  # the whole text ("start", and the rare qwen3 late split)
        self._len = 0
        self._r_sent = 0  # reasoning characters sent (the consumer's offset into split()'s reasoning)
        self._a_sent = 0  # answer characters sent
        self._tail = ""  # "reasoning": held-back body text (a possible tag start); "answer": look-back
        self._r_len = 0  # "reasoning": length of split()'s reasoning so far
        self._a_len = 0  # "after": length of split()'s answer so far
        self._a_started = False  # "after": a character other than a newline came

    def feed(self, new: str, finished: bool) -> tuple[str, str]:
        if self.phase == "start":
            self._chunks.append(new)
            self._len += len(new)
            return self._feed_start(finished)
        if self.phase == "reasoning":
            return self._feed_reasoning(new, finished)
        if self.phase == "answer":
            return self._feed_answer(new)
        return "", self._answer_grows(new)

    def _deltas(self, reasoning: str | None, answer: str) -> tuple[str, str]:
        r = (reasoning or "")[self._r_sent :]
        a = answer[self._a_sent :]
        self._r_sent += len(r)
        self._a_sent += len(a)
        return r, a

    def _feed_start(self, finished: bool) -> tuple[str, str]:
        text = "".join(self._chunks)
        self._chunks = [text]
        reasoning, answer = self.parser.split(text, finished)
        out = self._deltas(reasoning, answer)
        stripped = text.lstrip()
        if not finished and (not stripped or START.startswith(stripped)) and stripped != START:
            return out  # still undecided: the next text may open a block
        body_start = len(text) - len(stripped) + len(START) if stripped.startswith(START) else 0
        body = text[body_start:]
        end = body.find(END)
        if end != -1:
            self.phase = "after"
            raw = body[end + len(END) :]
            self._a_started = bool(raw.strip("\n"))
            self._a_len = len(answer)
        elif body_start or self.parser.name == "deepseek_r1":
            self.phase = "reasoning"
            self._r_len = len(reasoning or "")
            self._tail = body[self._r_len :]  # held back: a possible start of </think>
        else:
            self.phase = "answer"
            self._tail = text[-(len(END) - 1) :]
        return out

    def _feed_reasoning(self, new: str, finished: bool) -> tuple[str, str]:
        # </think> can only start in the held-back tail: a tag prefix at the end is never let out.
        pending = self._tail + new
        end = pending.find(END)
        if end != -1:
            self.phase = "after"
            return self._reasoning_grows(pending[:end]), self._answer_grows(pending[end + len(END) :])
        hold = 0 if finished else _partial_suffix(pending, END)
        out = pending[: len(pending) - hold]
        self._tail = pending[len(out) :]
        return self._reasoning_grows(out), ""

    def _feed_answer(self, new: str) -> tuple[str, str]:
        # qwen3 without a block: everything is answer until a </think>, which split() then
        # makes the end of a reasoning block that started at the very beginning.
        self._chunks.append(new)
        window = self._tail + new
        k = window.find(END)
        if k == -1:
            self._tail = window[-(len(END) - 1) :]
            self._len += len(new)
            self._a_sent += len(new)
            return "", new
        text = "".join(self._chunks)
        self._chunks = []
        end = self._len - len(self._tail) + k  # where </think> starts in the whole text
        self._len += len(new)
        self.phase = "after"
        return self._reasoning_grows(text[:end]), self._answer_grows(text[end + len(END) :])

    def _reasoning_grows(self, piece: str) -> str:
        """split()'s reasoning grew by `piece`: the part of it past what was sent."""
        self._r_len += len(piece)
        if self._r_len <= self._r_sent:
            return ""
        out = piece[len(piece) - (self._r_len - self._r_sent) :]
        self._r_sent = self._r_len
        return out

    def _answer_grows(self, raw: str) -> str:
        """ "after": split()'s answer is the text after </think> without its leading newlines,
        empty while only newlines came; return the part of it past what was sent."""
        if not self._a_started:
            raw = raw.lstrip("\n")
            if not raw:
                return ""
            self._a_started = True
        self._a_len += len(raw)
        if self._a_len <= self._a_sent:
            return ""
        out = raw[len(raw) - (self._a_len - self._a_sent) :]
        self._a_sent = self._a_len
        return out
