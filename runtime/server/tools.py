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
    sep_tags: tuple[str, ...] = ()  # the separator's tokens longer than one character

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
    sep_tags = ("</tool_call>", "<tool_call>")


class MistralParser(ToolParser):
    name, marker = "mistral", "[TOOL_CALLS]"
    sep = re.compile(r"[\s\[,]*")


class Llama3JsonParser(ToolParser):
    name, marker = "llama3_json", "<|python_tag|>"
    sep = re.compile(r"(?:\s|;|<\|python_tag\|>)*")
    sep_tags = ("<|python_tag|>",)

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


class _JsonValueEnd:
    """Where a JSON value arriving in pieces may end, reading each character once: an object or
    array when its brackets balance, a string at its closing quote (strings and escapes inside
    containers are skipped). Only then is a json.JSONDecoder pass worth it (it fails on every
    incomplete prefix). Scalars (numbers, literals) are short: the caller decodes them every time."""

    _SPECIAL = re.compile(r'["\\{}\[\]]')
    _IN_STRING = re.compile(r'["\\]')

    def __init__(self, first: str):
        self.kind = "container" if first in "{[" else "string" if first == '"' else "scalar"
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.pos = 0  # characters of the value read

    def feed(self, piece: str) -> int | None:
        """Read the value's next characters; the offset in the whole value just past a possible
        end, or None."""
        i, n = 0, len(piece)
        if self.pos == 0 and self.kind == "string":
            self.in_string, i = True, 1
        base = self.pos
        self.pos += n
        while i < n:
            if self.escape:
                self.escape, i = False, i + 1
                continue
            if self.in_string:
                m = self._IN_STRING.search(piece, i)
                if m is None:
                    return None
                i = m.end()
                if m.group() == "\\":
                    self.escape = True
                    continue
                self.in_string = False
                if self.kind == "string":
                    return base + i
                continue
            m = self._SPECIAL.search(piece, i)
            if m is None:
                return None
            c, i = m.group(), m.end()
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    return base + i
        return None


Delta = tuple[int, str | None, str | None, str]


class ToolCallStream:
    """One streamed choice's tool-call state: which calls were announced (id + name) and how
    many characters of each one's arguments were sent.

    `feed(new_text, finished)` takes the answer's next text and returns (content delta, tool-call
    deltas as (index, id or None, name or None, fragment)): the same deltas as `update_whole`,
    which re-reads the whole text with the parser's `calls()` (the definition, and the
    reference of the tests), but each piece of text is read about once: sent content and
    finished calls are not looked at again, and a call's arguments are followed with
    _JsonValueEnd and decoded once they may be complete. Re-reading the whole text at every
    token was quadratic in the length of the answer. `update(text, finished)` takes the whole
    text so far (extending the previous one).

    Phases: "pre" (no call started: content, holding back a possible marker), "calls"
    (separators and the next call's head, from `_wbase`), "args" (inside a call's arguments),
    "close" (after complete arguments, before the closing brace), "done" (the scan ended for
    good), "whole" (llama3_json met <|python_tag|> after a call that began with '{': calls()
    then starts at the tag, which `update_whole` follows from there on)."""

    # A call head longer than this (spaces, name) is not waited for: a bound on what is re-read
    # at each step (calls() would still accept it; function names have at most 64 characters).
    _MAX_HEAD = 4096
    _LONGEST_TAG = "x" * 16

    def __init__(self, parser: ToolParser, forced_name: str | None = None):
        self.parser = parser
        self.forced_name = forced_name  # named tool_choice: the whole answer is the arguments
        self.content_sent = 0
        self.ids: list[str] = []
        self.args_sent: list[int] = []
        self._chunks: list[str] = []  # the whole text; joined only for rare re-reads
        self._len = 0
        required = isinstance(parser, RequiredParser)
        self.phase = "calls" if required else "pre"
        self._w = ""  # text[_wbase:]: what is still undecided
        self._wbase = 0
        self._first: int | None = None  # llama3_json: offset of the first non-space character
        self._may_tag = True  # llama3_json: the text (past spaces) may still be the start of a tag
        self._from_brace = False  # llama3_json: the calls started at that '{', not at a tag
        self._last = ""  # llama3_json: the text's last characters (a tag across two pieces)
        self._num_final = 0  # calls complete and closed: they never change
        self._cur_complete = False  # the current call's arguments are complete
        self._name = ""  # "args": the current call
        self._args_start = 0
        self._args: list[str] = []
        self._value: _JsonValueEnd | None = None
        self._broken = False  # its arguments closed but do not decode: they never complete

    # -- the definition: the whole text, every time --------------------------------
    def update_whole(self, text: str, finished: bool) -> tuple[str, list[Delta]]:
        deltas: list[Delta] = []
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

    def update(self, text: str, finished: bool) -> tuple[str, list[Delta]]:
        return self.feed(text[self._len :], finished)

    @property
    def num_calls(self) -> int:
        return len(self.ids)

    # -- incremental ------------------------------------------------------------------
    def _text(self) -> str:
        text = "".join(self._chunks)
        self._chunks = [text]
        return text

    def _send(self, deltas: list[Delta], k: int, name: str, args_len: int, args_tail: str) -> None:
        """Call k has args_len characters of arguments, the last ones `args_tail`: announce it
        if new, send what was not sent."""
        if k == len(self.ids):
            self.ids.append(call_id())
            self.args_sent.append(0)
            deltas.append((k, self.ids[k], name, ""))
        if args_len > self.args_sent[k]:
            deltas.append((k, None, None, args_tail[len(args_tail) - (args_len - self.args_sent[k]) :]))
            self.args_sent[k] = args_len

    def feed(self, new: str, finished: bool) -> tuple[str, list[Delta]]:
        deltas: list[Delta] = []
        if self.forced_name is not None:
            if not self.ids:
                self.ids.append(call_id())
                self.args_sent.append(0)
                deltas.append((0, self.ids[0], self.forced_name, ""))
            self._len += len(new)
            if new:
                deltas.append((0, None, None, new))
                self.args_sent[0] = self._len
            return "", deltas
        old_len = self._len
        self._chunks.append(new)
        self._len += len(new)
        if self.phase == "whole":
            return self.update_whole(self._text(), finished)
        if self._from_brace:
            mk = self.parser.marker
            look = self._last + new
            self._last = look[-(len(mk) - 1) :]
            if mk in look:
                self.phase = "whole"
                return self.update_whole(self._text(), finished)
        had_ids = bool(self.ids)
        content = ""
        if self.phase == "pre":
            content = self._feed_pre(new, old_len, finished)
        elif self.phase == "args":
            self._feed_args(new, deltas)
        elif self.phase in ("calls", "close"):
            self._w += new
        if self.phase == "close":
            self._close(deltas)
        if self.phase == "calls":
            self._scan(deltas)
        if finished and self.phase != "pre" and not had_ids and not (self._num_final or self._cur_complete):
            # calls() found a start but no complete call: all of the text was content
            rest = self._text()[self.content_sent :]
            content += rest
            self.content_sent = self._len
        return content, deltas

    def _feed_pre(self, new: str, old_len: int, finished: bool) -> str:
        p, mk = self.parser, self.parser.marker
        w = self._w + new
        base = self._wbase
        # A marker starts after the sent content (its prefix was held back): look at the new
        # text and the marker's length before it.
        i = w.find(mk, max(0, old_len - (len(mk) - 1) - base))
        llama = isinstance(p, Llama3JsonParser)
        brace = False
        if llama and self._first is None:
            stripped = new.lstrip()
            if stripped:
                self._first = self._len - len(stripped)
                brace = stripped[0] == "{"  # calls() starts a call at the first '{' (if no tag)
        if i != -1:
            i += base
        elif brace:
            assert self._first is not None
            i = self._first
            self._from_brace = True
            self._last = w[-(len(mk) - 1) :]
        if i != -1:
            end = i
            while end > self.content_sent and w[end - 1 - base].isspace():
                end -= 1
            content = w[self.content_sent - base : end - base] if end > self.content_sent else ""
            self.content_sent = max(self.content_sent, end)
            spos = p.scan_from(i)
            self._w, self._wbase = w[spos - base :], spos
            self.phase = "calls"
            return content
        if finished:
            hold = 0
        elif (
            llama
            and self._may_tag
            and (
                self._first is None
                or (self._len - self._first <= len(mk) and mk.startswith(w[self._first - base :]))
            )
        ):
            hold = self._len - base  # all spaces, or the start of a tag: a call may still start
        else:
            self._may_tag = False  # the text began otherwise: it never begins with the tag again
            hold = 0
            for k in range(min(len(mk) - 1, len(w)), 0, -1):
                if w.endswith(mk[:k]):
                    hold = k
                    break
        end = self._len - hold
        if not finished:  # trailing whitespace may precede a call
            while end > self.content_sent and w[end - 1 - base].isspace():
                end -= 1
        content = w[self.content_sent - base : end - base] if end > self.content_sent else ""
        self.content_sent = max(self.content_sent, end)
        keep = max(base, min(self.content_sent, self._len - (len(mk) - 1)))
        self._w, self._wbase = w[keep - base :], keep
        return content

    def _scan(self, deltas: list[Delta]) -> None:
        """Separators and the next call's head in the window (scan() from where it resumes)."""
        w = self._w
        while True:
            m = self.parser.sep.match(w, 0)
            assert m is not None  # every separator pattern matches the empty string
            pos = m.end()
            h = _HEAD.match(w, pos)
            if h is None:
                rest = w[pos : pos + len(self._LONGEST_TAG)]
                if (
                    rest and rest[0] != "{" and not any(t.startswith(rest) for t in self.parser.sep_tags)
                ) or (len(w) - pos > self._MAX_HEAD):
                    self.phase = "done"  # neither a separator nor a call head can start here
                return  # no call here yet: looked at again with more text
            name = json.loads('"' + h.group(1) + '"')
            k = self._num_final
            start = h.end()
            if start == len(w):  # the head so far; more spaces may still extend it
                self._send(deltas, k, name, 0, "")
                return
            self.phase = "args"
            self._name, self._args_start = name, self._wbase + start
            self._args, self._value, self._broken = [], _JsonValueEnd(w[start]), False
            self._cur_complete = False
            self._w, self._wbase = "", self._len
            self._feed_args(w[start:], deltas)
            if self.phase != "calls":
                return
            w = self._w

    def _feed_args(self, piece: str, deltas: list[Delta]) -> None:
        k, value = self._num_final, self._value
        assert value is not None
        self._args.append(piece)
        n = self._len - self._args_start
        if self._broken:
            self._send(deltas, k, self._name, n, piece)
            return
        if value.kind != "scalar" and value.feed(piece) is None:
            self._send(deltas, k, self._name, n, piece)  # incomplete: all of it is arguments so far
            return
        args = "".join(self._args)
        self._args = [args]
        try:
            _, end = _DEC.raw_decode(args, 0)
        except ValueError:
            # closed but invalid, or no prefix of a number or literal (-Infinity is the longest):
            # calls() never completes it
            self._broken = value.kind != "scalar" or len(args) >= 9
            self._send(deltas, k, self._name, n, args)
            return
        self._cur_complete = True
        self._send(deltas, k, self._name, end, args[:end])
        if value.kind == "scalar" and (len(args) - end < 3 and args[end : end + 1] in ("", ".", "e", "E")):
            return  # a number may still grow ("1" -> "1.5", "1e" -> "1e-3"): decoded again next time
        self._args = []
        self._w, self._wbase = args[end:], self._args_start + end
        self.phase = "close"
        self._close(deltas)

    def _close(self, deltas: list[Delta]) -> None:
        close = _CLOSE.match(self._w, 0)
        if close is None:
            if len(self._w) > self._MAX_HEAD or self._w.strip():
                self.phase = "done"  # something else follows the arguments: scan() stops here
            return
        self._num_final += 1
        self._cur_complete = False
        self._w, self._wbase = self._w[close.end() :], self._wbase + close.end()
        self.phase = "calls"
