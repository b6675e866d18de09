"""HTTP outputs equal offline LLM.generate outputs; 32 concurrent streams really batch."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import pytest

from .conftest import API_KEY, ENGINE_KW, metric_values, wait_for_idle

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def offline():
    from fleetserve.runtime import LLM

    return LLM(**ENGINE_KW)


def test_http_equals_offline_greedy(offline, client, model_name):
    from fleetserve.runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8)
    expected = offline.generate(PROMPTS, params)
    batch = client.completions.create(model=model_name, prompt=PROMPTS, max_tokens=8, temperature=0)
    for i, out in enumerate(expected):
        ch = batch.choices[i]
        assert ch.text == out.outputs[0].text
        assert ch.finish_reason == out.outputs[0].finish_reason
    assert batch.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)
    assert batch.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    # Streaming assembles the same text.
    chunks = client.completions.create(
        model=model_name, prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[1].outputs[0].text


def test_chat_equals_offline_chat(offline, client, model_name):
    from fleetserve.runtime import SamplingParams

    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = offline.chat(messages, SamplingParams(temperature=0.0, max_tokens=8))[0]
    r = client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == expected.outputs[0].text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)


async def _stream_one(session, url, i):
    body = {
        "prompt": f"Request number {i} says",
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    text, finish, usage, done = "", None, None, False
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            line = line.strip()
            if not line:
                continue
            assert line.startswith(b"data: ")
            if line == b"data: [DONE]":
                done = True
                continue
            obj = json.loads(line[6:])
            if obj["choices"]:
                text += obj["choices"][0]["text"]
                finish = obj["choices"][0]["finish_reason"] or finish
            if obj.get("usage"):
                usage = obj["usage"]
    return text, finish, usage, done


def test_32_concurrent_streams_batch(server, base_url, offline):
    from fleetserve.runtime import SamplingParams

    expected = offline.generate(
        [f"Request number {i} says" for i in range(32)],
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
    )
    max_running = 0
    stop = threading.Event()

    def poll():  # scrapes /metrics like Prometheus would, only more often
        nonlocal max_running
        while not stop.is_set():
            max_running = max(max_running, metric_values(base_url)["vllm:num_requests_running"])
            time.sleep(0.02)

    scraped = []

    async def main():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            tasks = [
                asyncio.ensure_future(_stream_one(session, base_url + "/v1/completions", i))
                for i in range(32)
            ]
            await asyncio.sleep(0.5)
            async with session.get(base_url + "/metrics") as r:  # mid-run scrape
                scraped.append(await r.text())
            return await asyncio.gather(*tasks)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        poller.join()
    assert len(results) == 32
    for (text, finish, usage, done), exp in zip(results, expected):
        assert done and finish == "length"
        assert text == exp.outputs[0].text  # batching with 31 others changes nothing for greedy decoding
        assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] == len(exp.prompt_token_ids)
    assert max_running > 1, "the running-requests gauge never exceeded 1: no continuous batching"
    assert "vllm:num_requests_running" in scraped[0]
    wait_for_idle(server)
    m = metric_values(base_url)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
