"""The router in front of the real runtime server (the embedded SmolLM2 on CPU, real HTTP on loopback):
what passes through is exactly what the replica says, streamed or not, and a client that goes away
through the router frees the engine's request. The official openai client on the client side.

And issue 14's prefix-cache acceptance workload (tests/e2e/chat_workload.py, the script the e2e test
runs in the cluster) over three real replicas, without Kubernetes: random spreading per request (what a
plain Service does) vs the router, each replica's own prefix-cache counters giving the hit rates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web

from fleetserve.operator.router.config import RouterConfig
from fleetserve.operator.router.proxy import BACKEND_HEADER, Router

from .conftest import API_KEY, ServerThread, wait_for_idle

WORKLOAD = Path(__file__).resolve().parents[1] / "e2e" / "chat_workload.py"


@contextlib.asynccontextmanager
async def router_for(*base_urls: str, cfg: RouterConfig | None = None):
    router = Router(cfg or RouterConfig(service="llm"))
    runner = web.AppRunner(router.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    router.set_members({u.removeprefix("http://"): f"runtime-{i}" for i, u in enumerate(base_urls)})
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


# --- issue 14's prefix-cache acceptance workload over three real replicas ---------------------------------

# The e2e test's shape (tests/e2e/test_router.py HIT_RATE_WORKLOAD) with half its conversations, to keep this
# CI test at a few minutes; FLEETSERVE_HITRATE_* override it (CONVERSATIONS=48 REPEATS=3 FLOOR=0 measures).
#
# Measured with 48 conversations (the e2e size) on the shared 2-core machine, 2026-12-01, each run one
# random phase then one router phase, fresh prompts each (k = conversations whose second turn the random
# spreading happened to send to their first turn's replica, expected 16 of 48):
#   before the workload's shared prefix was cut to the system prompt: 2.11x (0.518 vs 0.245, k=15),
#   2.15x (0.513 vs 0.239, k=17);
#   this workload: 2.32x (0.512 vs 0.220, k=19), 3.12x (0.514 vs 0.165, k=13), 2.65x (0.513 vs 0.193, k=16).
# The router's rate is the same every run (0.51: all of each second turn's history, the system prompt's
# block of each first turn); the random rate follows k: about 0.046 + 0.0092 k here, so the ratio is about
# 2.65x at k=16, below 2.0x from k=23 (P(k >= 23) ~ 2% for binomial(48, 1/3)) and below 1.8x from k=27
# (~0.1%). With 24 conversations (the default here) the 1.6x floor fails from k=15 of 24 (~0.3%).
HIT_RATE = {
    "conversations": int(os.environ.get("FLEETSERVE_HITRATE_CONVERSATIONS", "24")),
    "turns": int(os.environ.get("FLEETSERVE_HITRATE_TURNS", "2")),
    "workers": int(os.environ.get("FLEETSERVE_HITRATE_WORKERS", "3")),
    "opening_words": int(os.environ.get("FLEETSERVE_HITRATE_OPENING_WORDS", "250")),
}
HIT_RATE_FLOOR = float(os.environ.get("FLEETSERVE_HITRATE_FLOOR", "1.6"))


@pytest.fixture(scope="module")
def three_replicas():
    """Three engines of the embedded model, each behind its own server (no API key), like 3 pods. Each KV
    cache holds the whole workload (as the e2e pods' 1 GiB does): no eviction on either side."""
    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.server.config import ServerConfig

    servers = []
    try:
        for _ in range(3):
            cfg = EngineConfig(max_model_len=1024, num_kv_blocks=1536, max_num_seqs=8, seed=0)
            servers.append(ServerThread(cfg, {"main": ServerConfig()}).start())
        yield servers
    finally:
        for s in servers:
            s.stop()


async def _chat_workload(urls: list[str], metric_urls: list[str], model: str, tag: str) -> dict:
    w = HIT_RATE
    args = [",".join(urls), model, ",".join(metric_urls), str(w["conversations"]), str(w["turns"])]
    args += [str(w["workers"]), tag, str(w["opening_words"])]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKLOAD), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.slow
async def test_prefix_cache_hit_rate_router_vs_random_spreading_over_three_real_replicas(three_replicas):
    """Issue 14, acceptance point 1, on loopback: the same workload and counters as the e2e test. Every
    conversation stays on one replica through the router (bounded load with its slack keeps them at this
    concurrency), and the router's aggregated prefix-cache hit rate is a multiple of random spreading's.
    FLEETSERVE_HITRATE_REPEATS runs the pair of phases several times (fresh prompts each time)."""
    urls = [s.urls["main"] for s in three_replicas]
    metric_urls = [f"{u}/metrics" for u in urls]
    model = three_replicas[0].serving().served_model_name
    ratios = []
    for run in range(int(os.environ.get("FLEETSERVE_HITRATE_REPEATS", "1"))):
        results = {}
        t0 = time.monotonic()
        # Short fresh tags (in the system prompts): each phase's prompts are new, and the shared system
        # prompt stays about one KV block, as in the e2e test.
        results["random"] = await _chat_workload(urls, metric_urls, model, f"random-{os.urandom(2).hex()}")
        t1 = time.monotonic()
        async with router_for(*urls) as url:
            results["router"] = await _chat_workload(
                [url], metric_urls, model, f"router-{run}-{time.time():.0f}"
            )
        t2 = time.monotonic()
        plain, routed = results["random"]["hit_rate"], results["router"]["hit_rate"]
        same = sum(n == 1 for n in results["random"]["backends_per_conversation"])
        print(f"\nrun {run}, workload {HIT_RATE}: random {json.dumps(results['random'])} ({t1 - t0:.0f}s)")
        print(f"router {json.dumps(results['router'])} ({t2 - t1:.0f}s)")
        print(
            f"prefix-cache hit rate: random {plain:.3f} ({same}/{len(results['random']['backends_per_conversation'])}"
            f" conversations on one replica by chance), router {routed:.3f} ({routed / max(plain, 1e-9):.2f}x)"
        )
        assert results["random"]["errors"] == 0 and results["router"]["errors"] == 0, results
        assert all(n == 1 for n in results["router"]["backends_per_conversation"]), results["router"]
        ratios.append(routed / max(plain, 1e-9))
    print(f"ratios: {[round(r, 2) for r in ratios]}")
    # Without prefix affinity both sides would be ~1x; see the measurements above HIT_RATE for the floor.
    assert min(ratios) >= HIT_RATE_FLOOR, ratios
