"""Reasoning parsers (`--reasoning-parser`): split a completion into its reasoning block and the answer.

Models such as DeepSeek-R1 and Qwen3 write their reasoning between `<think>` and `</think>`
before the answer. The split is a pure function of the text so far (`split`), so the
non-streamed message and the concatenated stream deltas always agree; while streaming,
text that may be the start of a tag is held back until the next tokens decide it.

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
