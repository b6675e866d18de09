"""Fake runtime replicas for router tests: real aiohttp servers on loopback speaking OpenAI's protocol.

A stand-in (named as such) for `fleetserve serve`: the router's behaviour depends on the wire
protocol (JSON bodies, SSE chunks, connection drops, /metrics), not on a model, and the tests
need to kill, stall and saturate replicas on purpose. Each replica answers /v1/chat/completions
and /v1/completions (streamed or not) with `tokens` chunks `delay` seconds apart, serves
/metrics with the gauges in `metrics`, and records every request it saw and whether the client
went away before the end (`aborted`).

Each replica also keeps a toy prefix cache (chained hashes of 64-character blocks of the rendered
prompt, as a paged KV cache keys its blocks) and counts `cache_hits` / `cache_queries` in blocks,
so tests can compare the hit rates that routing policies give.

Modes: "ok"; "drop" (accept, read the request, close the connection without a byte);
"break_after" (stream `break_after` chunks, then cut the connection); "unavailable" (503).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Seen:
    path: str
    body: dict[str, Any]
    started: float
    streamed: int = 0
    """Chunks written (so: whether streaming had started)."""
    finished: bool = False
    aborted: bool = False


@dataclass
class FakeReplica:
    name: str
    tokens: int = 4
    delay: float = 0.0
    mode: str = "ok"
    break_after: int = 1
    metrics: dict[str, float] = field(
        default_factory=lambda: {"vllm:num_requests_waiting": 0.0, "vllm:kv_cache_usage_perc": 0.0}
    )
    seen: list[Seen] = field(default_factory=list)
    cache: set[int] = field(default_factory=set)
    cache_hits: int = 0
    cache_queries: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def in_flight(self) -> int:
        return sum(1 for s in self.seen if not s.finished and not s.aborted)

    async def start(self, port: int = 0) -> FakeReplica:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", lambda _: web.Response(text="ok"))
        # Like the runtime: a client that goes away cancels the handler.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def kill(self) -> None:
        """Like a pod killed: listening stops and open connections are cut (no response is finished)."""
        assert self._runner is not None
        server = self._runner.server
        for site in list(self._runner.sites):
            await site.stop()
        if server is not None:
            for conn in list(server.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        await self._runner.cleanup()
        self._runner = None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "llm", "object": "model"}]})

    async def _metrics(self, _: web.Request) -> web.Response:
        lines = [f'{k}{{model_name="llm"}} {v}' for k, v in self.metrics.items()]
        return web.Response(text="\n".join(lines) + "\n")

    def _chunk(self, chat: bool, i: int, created: int) -> dict[str, Any]:
        text = f"{self.name}-{i} "
        if chat:
            return {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": created,
                "model": "llm",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": created,
            "model": "llm",
            "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}],
        }

    def _lookup_and_fill(self, body: dict[str, Any]) -> None:
        if isinstance(body.get("messages"), list):
            text = "".join(f"<|{m.get('role')}|>{m.get('content')}" for m in body["messages"])
        else:
            text = str(body.get("prompt", ""))
        key, prefix_alive = 0, True
        for i in range(len(text) // 64):
            key = hash((key, text[i * 64 : (i + 1) * 64]))
            self.cache_queries += 1
            if prefix_alive and key in self.cache:
                self.cache_hits += 1
            else:
                prefix_alive = False
            self.cache.add(key)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen = Seen(request.path, body, time.monotonic())
        self.seen.append(seen)
        self._lookup_and_fill(body)
        chat = request.path.endswith("/chat/completions")
        if self.mode == "drop":
            assert request.transport is not None
            request.transport.abort()
            seen.aborted = True
            return web.Response()
        if self.mode == "unavailable":
            seen.finished = True
            return web.json_response({"error": {"message": "draining", "type": "unavailable"}}, status=503)
        created = int(time.time())
        try:
            if not body.get("stream"):
                await asyncio.sleep(self.delay * self.tokens)
                text = "".join(f"{self.name}-{i} " for i in range(self.tokens))
                seen.finished = True
                if chat:
                    choice = {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "length",
                    }
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
                    obj = "text_completion"
                return web.json_response(
                    {
                        "id": "x",
                        "object": obj,
                        "created": created,
                        "model": "llm",
                        "choices": [choice],
                        "usage": {
                            "prompt_tokens": 1,
                            "completion_tokens": self.tokens,
                            "total_tokens": self.tokens + 1,
                        },
                    }
                )
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            for i in range(self.tokens):
                if self.mode == "break_after" and i == self.break_after:
                    assert request.transport is not None
                    request.transport.abort()
                    seen.aborted = True
                    return resp
                await resp.write(f"data: {json.dumps(self._chunk(chat, i, created))}\n\n".encode())
                seen.streamed += 1
                await asyncio.sleep(self.delay)
            await resp.write(b"data: [DONE]\n\n")
            seen.finished = True
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            seen.aborted = True
            raise
