"""Tool calling: tool_choice -> output constraint, and tool-call parsers for model text.

- `forced_constraint`: tool_choice "required" constrains the output to a JSON array of
  {"name", "parameters"} objects of the given tools (maxItems 1 without parallel calls); a
  named tool_choice constrains it to that tool's arguments object.
- Parsers (`--tool-call-parser`), used for tool_choice "auto":
  hermes (Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`),
  llama3_json (`{"name": ..., "parameters": {...}}` as the whole answer, `;`-separated,
  optionally after `<|python_tag|>`), mistral (`[TOOL_CALLS][{"name": ..., "arguments": {...}}]`).
- `scan` finds the calls of the text so far, complete or not; an argument string is the
  arguments' JSON text exactly as the model wrote it, so streamed fragments concatenate
  to the non-streamed `arguments`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..structured.params import StructuredOutputsParams

PARSERS = ("hermes", "llama3_json", "mistral")
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_CLOSE = re.compile(r"\s*\}")
_DEC = json.JSONDecoder()


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class Call:
    name: str
    args_start: int
    args_end: int | None  # None while the arguments are incomplete

    def arguments(self, text: str) -> str:
        return text[self.args_start : len(text) if self.args_end is None else self.args_end]


def scan(text: str, pos: int, sep: re.Pattern[str]) -> list[Call]:
    """Calls in text from pos on: separator, {"name": ..., "arguments": <json>}, separator, ..."""
    calls: list[Call] = []
    while True:
        m = sep.match(text, pos)
        if m is None:  # no separator here: no further call
            return calls
        pos = m.end()
        h = _HEAD.match(text, pos)
        if h is None:
            return calls
        name = json.loads('"' + h.group(1) + '"')
        start = h.end()
        try:
            _, end = _DEC.raw_decode(text, start)
        except ValueError:
            calls.append(Call(name, start, None))
            return calls
        calls.append(Call(name, start, end))
        close = _CLOSE.match(text, end)
        if close is None:
            return calls
        pos = close.end()


class ToolParser:
    """Where calls start in a text, and what separates them."""

    name = ""
    marker = ""
    sep = re.compile(r"\s*")

    def start(self, text: str) -> int | None:
        i = text.find(self.marker)
        return None if i == -1 else i

    def scan_from(self, i: int) -> int:
        return i + len(self.marker)

    def hold(self, text: str, finished: bool) -> int:
        """Characters at the end of text to hold back from content while no call started."""
        if finished:
            return 0
        for k in range(min(len(self.marker) - 1, len(text)), 0, -1):
            if text.endswith(self.marker[:k]):
                return k
        return 0

    def calls(self, text: str) -> tuple[int | None, list[Call]]:
        i = self.start(text)
        if i is None:
            return None, []
        return i, scan(text, self.scan_from(i), self.sep)

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """Final text -> (content, [(name, arguments JSON text)]); text without a complete call is content."""
        i, calls = self.calls(text)
        done = [(c.name, c.arguments(text)) for c in calls if c.args_end is not None]
        if not done:
            return text, []
        content = text[:i].rstrip()
        return content or None, done


class HermesParser(ToolParser):
    name, marker = "hermes", "<tool_call>"
    sep = re.compile(r"(?:\s|</tool_call>|<tool_call>)*")


class MistralParser(ToolParser):
    name, marker = "mistral", "[TOOL_CALLS]"
    sep = re.compile(r"[\s\[,]*")


class Llama3JsonParser(ToolParser):
    name, marker = "llama3_json", "<|python_tag|>"
    sep = re.compile(r"(?:\s|;|<\|python_tag\|>)*")

    def start(self, text: str) -> int | None:
        i = text.find(self.marker)
        if i != -1:
            return i
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("{") else None

    def scan_from(self, i: int) -> int:
        return i  # the separator pattern skips the python tag

    def hold(self, text: str, finished: bool) -> int:
        if finished:
            return 0
        stripped = text.lstrip()
        if not stripped or self.marker.startswith(stripped):
            return len(text)  # a call may still start
        return super().hold(text, finished)


class RequiredParser(ToolParser):
    """tool_choice "required": the constrained output is a JSON array of calls."""

    name = "required"
    sep = re.compile(r"[\s\[,]*")

    def start(self, text: str) -> int | None:
        return 0

    def scan_from(self, i: int) -> int:
        return i

    def hold(self, text: str, finished: bool) -> int:
        return len(text)


def get_parser(name: str) -> ToolParser:
    for cls in (HermesParser, Llama3JsonParser, MistralParser):
        if cls.name == name:
            return cls()
    raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(PARSERS)}")


def forced_constraint(tools: list, tool_choice, parallel_tool_calls: bool | None) -> StructuredOutputsParams:
    """The output constraint of tool_choice "required" or a named function."""

    def params_of(t) -> dict:
        return t.function.parameters or {"type": "object", "properties": {}}

    if tool_choice == "required":
        items = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [t.function.name]},
                        "parameters": params_of(t),
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in tools
            ]
        }
        schema = {"type": "array", "items": items, "minItems": 1}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json_schema=schema)
    tool = next(t for t in tools if t.function.name == tool_choice.function.name)
    return StructuredOutputsParams(json_schema=params_of(tool))


class ToolCallStream:
    """One streamed choice's tool-call state: which calls were announced (id + name) and how
    many characters of each one's arguments were sent. `update` takes the whole answer text so
    far and returns (content delta, tool-call deltas as (index, id or None, name or None, fragment))."""

    def __init__(self, parser: ToolParser, forced_name: str | None = None):
        self.parser = parser
        self.forced_name = forced_name  # named tool_choice: the whole answer is the arguments
        self.content_sent = 0
        self.ids: list[str] = []
        self.args_sent: list[int] = []

    def update(self, text: str, finished: bool) -> tuple[str, list[tuple[int, str | None, str | None, str]]]:
        deltas: list[tuple[int, str | None, str | None, str]] = []
        if self.forced_name is not None:
            if not self.ids:
                self.ids.append(call_id())
                self.args_sent.append(0)
                deltas.append((0, self.ids[0], self.forced_name, ""))
            frag = text[self.args_sent[0] :]
            self.args_sent[0] = len(text)
            if frag:
                deltas.append((0, None, None, frag))
            return "", deltas
        i, calls = self.parser.calls(text)
        if i is None:
            end = len(text) - self.parser.hold(text, finished)
            if not finished:
                end = len(text[:end].rstrip())  # trailing whitespace may precede a call
        else:
            end = len(text[:i].rstrip())
            if finished and not self.ids and not any(c.args_end is not None for c in calls):
                end = len(text)  # a marker but no complete call: all of it was content
        content = text[self.content_sent : end] if end > self.content_sent else ""
        self.content_sent = max(self.content_sent, end)
        for k, c in enumerate(calls):
            if k == len(self.ids):
                self.ids.append(call_id())
                self.args_sent.append(0)
                deltas.append((k, self.ids[k], c.name, ""))
            args = c.arguments(text)
            if len(args) > self.args_sent[k]:
                deltas.append((k, None, None, args[self.args_sent[k] :]))
                self.args_sent[k] = len(args)
        return content, deltas

    @property
    def num_calls(self) -> int:
        return len(self.ids)
