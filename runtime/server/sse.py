"""Server-sent events exactly as OpenAI streams them.

Each event is one `data: <json>` line followed by a blank line; the stream ends
with `data: [DONE]`. An error after the headers went out (status already 200)
is sent as a `data: {"error": ...}` event, then [DONE].
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # proxies (nginx) must not buffer the stream
}
DONE = b"data: [DONE]\n\n"


def event(payload: BaseModel | str, **dump_kw) -> bytes:
    data = payload if isinstance(payload, str) else payload.model_dump_json(**dump_kw)
    return b"data: " + data.encode() + b"\n\n"


async def open_stream(request: web.Request, headers: dict | None = None) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={**HEADERS, **(headers or {})})
    await resp.prepare(request)
    return resp
