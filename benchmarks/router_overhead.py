"""Router overhead on loopback: one replica, requests direct vs through the router.

    python benchmarks/router_overhead.py [--requests 2000] [--stream]

The replica is a minimal aiohttp server answering /v1/completions at once (a stand-in: the
router's cost does not depend on the model), so the difference between the two latency
distributions is what the router adds: reading the body, hashing the prompt, choosing, one
more loopback hop with a pooled keep-alive connection, relaying the answer. Requests alternate
between the two paths so background load hits both alike. Prints one JSON line (milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
from aiohttp import web

from fleetserve.operator.router.config import RouterConfig
from fleetserve.operator.router.proxy import Router


async def _replica(stream: bool) -> tuple[web.AppRunner, int]:
    async def complete(request: web.Request) -> web.StreamResponse:
        await request.read()
        chunk = {
            "id": "x",
            "object": "text_completion",
            "choices": [{"index": 0, "text": "hi", "finish_reason": None}],
        }
        if not stream:
            return web.json_response({**chunk, "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


async def main(requests: int, stream: bool) -> dict[str, float]:
    replica, rport = await _replica(stream)
    router = Router(RouterConfig(service="bench"))
    runner = web.AppRunner(router.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    router.set_members({f"127.0.0.1:{rport}": "replica"})
    body = json.dumps({"model": "m", "prompt": "hello " * 100, "max_tokens": 1, "stream": stream}).encode()
    urls = {
        "direct": f"http://127.0.0.1:{rport}/v1/completions",
        "router": f"http://127.0.0.1:{port}/v1/completions",
    }
    lat: dict[str, list[float]] = {"direct": [], "router": []}
    async with aiohttp.ClientSession() as s:

        async def once(url: str) -> float:
            t0 = time.perf_counter()
            async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
            return time.perf_counter() - t0

        for _ in range(50):
            await once(urls["direct"]), await once(urls["router"])
        for i in range(requests):
            for name in ("direct", "router") if i % 2 else ("router", "direct"):
                lat[name].append(await once(urls[name]))
    await runner.cleanup()
    await replica.cleanup()
    out = {"requests": requests, "stream": stream}
    for q, tag in ((0.5, "p50"), (0.99, "p99")):
        d, r = _pct(lat["direct"], q), _pct(lat["router"], q)
        out |= {
            f"direct_{tag}_ms": round(d, 3),
            f"router_{tag}_ms": round(r, 3),
            f"added_{tag}_ms": round(r - d, 3),
        }
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--stream", action="store_true")
    a = p.parse_args()
    print(json.dumps(asyncio.run(main(a.requests, a.stream))))
