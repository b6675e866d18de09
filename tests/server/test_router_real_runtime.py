"""The router in front of the real runtime server (the embedded SmolLM2 on CPU, real HTTP on loopback):
what passes through is exactly what the replica says, streamed or not, and a client that goes away
through the router frees the engine's request. The official openai client on the client side."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import openai
from aiohttp import web

from fleetserve.operator.router.config import RouterConfig
from fleetserve.operator.router.proxy import BACKEND_HEADER, Router

from .conftest import API_KEY, wait_for_idle


@contextlib.asynccontextmanager
async def router_for(base_url: str):
    router = Router(RouterConfig(service="llm"))
    runner = web.AppRunner(router.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    router.set_members({base_url.removeprefix("http://"): "runtime-0"})
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_answers_through_the_router_are_the_replicas_own(server, base_url, model_name):
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    async with router_for(base_url) as url:
        direct = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        routed = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        want = await direct.chat.completions.create(
            model=model_name, messages=messages, max_tokens=12, temperature=0
        )
        raw = await routed.chat.completions.with_raw_response.create(
            model=model_name, messages=messages, max_tokens=12, temperature=0
        )
        got = raw.parse()
        assert raw.headers[BACKEND_HEADER] == "runtime-0"
        assert got.choices[0].message.content == want.choices[0].message.content
        assert "paris" in got.choices[0].message.content.lower()
        stream = await routed.chat.completions.create(
            model=model_name, messages=messages, max_tokens=12, temperature=0, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == want.choices[0].message.content
        # The replica's own errors pass through in the OpenAI shape (the API key is checked by the replica).
        bad = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        try:
            await bad.chat.completions.create(model=model_name, messages=messages, max_tokens=2)
        except openai.AuthenticationError as exc:
            assert exc.status_code == 401
        else:
            raise AssertionError("the replica's 401 did not come through")
        try:
            await routed.chat.completions.create(model=model_name, messages=messages, max_tokens=-1)
        except openai.BadRequestError as exc:
            assert exc.status_code == 400 and exc.body.get("param") == "max_tokens", exc.body
        else:
            raise AssertionError("the replica's 400 did not come through")
        for c in (direct, routed, bad):
            await c.close()


async def test_client_gone_mid_stream_through_the_router_frees_the_engine(server, base_url, model_name, auth):
    async with router_for(base_url) as url:
        body = {
            "model": model_name,
            "stream": True,
            "max_tokens": 400,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to a thousand."}],
        }
        async with aiohttp.ClientSession() as s:
            resp = await s.post(f"{url}/v1/chat/completions", json=body, headers=auth)
            assert resp.status == 200
            for _ in range(3):
                assert (await resp.content.readline()) is not None
            t0 = time.monotonic()
            resp.close()
        # Without the abort the engine would go on for ~400 tokens.
        await asyncio.to_thread(wait_for_idle, server, 15)
        print(f"\nengine idle {time.monotonic() - t0:.2f}s after the client went away through the router")
