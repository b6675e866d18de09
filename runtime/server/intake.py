"""Request intake: raw body bytes -> validated protocol model, without stalling the event loop.

One large request must not freeze the server (seen: a 15 MB prompt blocked /health for
12.6 s, 300k chat messages for 5.7 s). What costs time, and how it is kept off the loop:
- JSON decoding of a large body runs in a worker thread with a Python object hook: the C
  decoder alone holds the GIL for the whole document (145 ms for 300k messages), the hook
  gives the interpreter a point to switch threads every few ms;
- cheap bounds on the decoded dict come before any per-item work: more messages than
  max_model_len cannot fit (every message renders as at least one token), nor can more
  characters than max_model_len x the tokenizer's characters-per-token bound
  (Tokenizer.max_chars_per_token), nor any list or object longer than
  max(max_model_len, vocab size);
- pydantic validation of many messages runs message by message in a worker thread (one
  pydantic call holds the GIL throughout: 1.2 s for 300k messages);
- lone UTF-16 surrogates (`"\\ud800"` in JSON) are refused here with 400 naming the field:
  the tokenizer cannot take them.
Rendering chat templates and tokenizing happen later, in routes.py, also off the loop.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .errors import BadRequest, param_path, to_bad_request
from .protocol import ChatMessage

# Bodies up to this size are decoded and validated inline: a thread hop costs more than the work.
INLINE_BODY_BYTES = 64 * 1024
# Message lists up to this length are validated in one pydantic call.
INLINE_MESSAGES = 256

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs: any code point left here is lone


def _dict_hook(pairs):
    return dict(pairs)


def decode_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    try:
        body = json.loads(text, object_pairs_hook=_dict_hook if len(raw) > INLINE_BODY_BYTES else None)
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    # Substring tests first: a fast scan, where the regex would hold the GIL over megabytes of text.
    if ("\\ud" in text or "\\uD" in text) and _SURROGATE_ESCAPE.search(text):
        where = _lone_surrogate_at(body)
        if where is not None:
            raise BadRequest(
                f"Invalid value for '{param_path(where) or 'body'}': the text contains a lone UTF-16 "
                "surrogate (\\ud800-\\udfff without its pair), which is not a Unicode character",
                param=param_path(where),
                code="invalid_unicode",
            )
    return body


def _lone_surrogate_at(body: Any) -> tuple | None:
    stack: list[tuple[tuple, Any]] = [((), body)]
    while stack:
        loc, node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return loc
        elif isinstance(node, dict):
            for k, v in node.items():
                if _SURROGATE.search(k):
                    return loc + (k.encode("utf-8", "replace").decode(),)
                stack.append((loc + (k,), v))
        elif isinstance(node, list):
            stack.extend((loc + (i,), v) for i, v in enumerate(node))
    return None


def _text_len(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(p.get("text") or "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return 0


class Intake:
    """Bounds derived from the served model; `parse` is what every POST handler calls first."""

    def __init__(self, max_model_len: int, max_chars_per_token: int | None, vocab_size: int | None):
        self.max_model_len = max_model_len
        self.max_chars = None if max_chars_per_token is None else max_model_len * max_chars_per_token
        self.max_chars_per_token = max_chars_per_token
        self.max_items = max(max_model_len, vocab_size or 0)

    async def parse(self, request: web.Request, model: type[BaseModel]):
        raw = await request.read()  # 413 from aiohttp's client_max_size passes through
        if len(raw) <= INLINE_BODY_BYTES:
            body = decode_json(raw)
            self.check_bounds(body)
            return self.validate(model, body)
        body = await asyncio.to_thread(decode_json, raw)
        await asyncio.to_thread(self.check_bounds, body)
        return await asyncio.to_thread(self.validate, model, body)

    def check_bounds(self, body: dict) -> None:
        """Refuses what cannot fit before any per-item work (pydantic, templates, the tokenizer)."""
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > self.max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"request has {len(messages)} messages and every message takes at least one token.",
                param="messages",
                code="context_length_exceeded",
            )
        for name, value in body.items():
            if isinstance(value, (list, dict)) and len(value) > self.max_items:
                raise BadRequest(
                    f"Invalid value for '{name}': at most {self.max_items} items are accepted, "
                    f"got {len(value)}",
                    param=name,
                )
        if self.max_chars is None:
            return
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            self._check_chars(len(prompt), "prompt")
        elif isinstance(prompt, list):
            for p in prompt:
                if isinstance(p, str):
                    self._check_chars(len(p), "prompt")
        if isinstance(messages, list):
            self._check_chars(
                sum(_text_len(m.get("content")) for m in messages if isinstance(m, dict)), "messages"
            )

    def _check_chars(self, n: int, what: str) -> None:
        if self.max_chars is not None and n > self.max_chars:
            raise BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"{what} has {n} characters, more than {self.max_model_len} tokens can hold (one token "
                f"stands for at most {self.max_chars_per_token} characters). Please reduce the length "
                f"of the {what}.",
                param=what,
                code="context_length_exceeded",
            )

    def validate(self, model: type[BaseModel], body: dict):
        fields = model.model_fields
        messages = body.get("messages")
        if "messages" in fields and isinstance(messages, list) and len(messages) > INLINE_MESSAGES:
            # Message by message (each call holds the GIL only briefly); the request itself then takes
            # the validated instances as they are.
            checked = []
            for i, m in enumerate(messages):
                try:
                    checked.append(ChatMessage.model_validate(m))
                except ValidationError as e:
                    err = to_bad_request(e)
                    path = f"messages[{i}]" + (("." + err.param) if err.param else "")
                    raise BadRequest(err.message.replace(f"'{err.param}'", f"'{path}'"), param=path) from None
            body = {**body, "messages": checked}
        try:
            return model.model_validate(body)
        except ValidationError as e:
            raise to_bad_request(e, fields=fields) from None
