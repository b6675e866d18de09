"""AsyncLLM against a tiny deterministic stand-in engine: delivery, abort on early exit, errors, idle, shutdown."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from fleetserve.runtime.async_engine import AsyncLLM, EngineDeadError
from fleetserve.runtime.outputs import CompletionOutput, RequestOutput
from fleetserve.runtime.sampling_params import SamplingParams
from fleetserve.runtime.validation import RequestLimits


class StandInEngine:
    """One token per step per request (delta outputs, as LLMEngine's with delta=True); a prompt of [0]
    is invalid. Counts its calls."""

    def __init__(self, step_s: float = 0.0):
        self.tokenizer = None
        self.model_name = "stand-in"
        self.max_model_len = 64
        self.limits = RequestLimits(max_model_len=64, vocab_size=256, max_logprobs=20)
        self.step_s = step_s
        self.reqs: dict[str, list] = {}
        self.aborted: list[str] = []
        self.pending: list[RequestOutput] = []
        self.calls = 0

    def get_stats(self):
        return SimpleNamespace(
            num_running=len(self.reqs),
            num_waiting=0,
            kv_cache_usage=len(self.reqs) / 10,
            num_preemptions_total=0,
            prefix_cache_queries_total=0,
            prefix_cache_hits_total=0,
            prompt_tokens_total=0,
            generation_tokens_total=0,
        )

    def add_request(self, rid, prompt, params, arrival_time=None, delta=False):
        ids = prompt["prompt_token_ids"]
        if ids == [0]:
            raise ValueError("prompt [0] is not allowed")
        self.reqs[rid] = [ids, [], params.max_tokens]

    def abort_request(self, rid):
        for r in [rid] if isinstance(rid, str) else rid:
            if self.reqs.pop(r, None) is not None:
                self.aborted.append(r)
                self.pending.append(
                    RequestOutput(
                        r, None, [], [CompletionOutput(0, "", [], finish_reason="abort")], finished=True
                    )
                )

    def has_unfinished_requests(self):
        self.calls += 1
        return bool(self.reqs) or bool(self.pending)

    def step(self):
        time.sleep(self.step_s)
        outs, self.pending = self.pending, []
        for rid, (ids, toks, mx) in list(self.reqs.items()):
            toks.append(len(toks) + 1)
            done = len(toks) >= mx
            outs.append(
                RequestOutput(
                    rid,
                    None,
                    ids,
                    [CompletionOutput(0, "", toks[-1:], finish_reason="length" if done else None)],
                    finished=done,
                )
            )
            if done:
                del self.reqs[rid]
        return outs


async def _collect(llm, rid, max_tokens, prompt=(5,)):
    return [
        o
        async for o in llm.generate(
            {"prompt_token_ids": list(prompt)}, SamplingParams(max_tokens=max_tokens), rid
        )
    ]


async def test_outputs_are_cumulative_and_end_finished():
    llm = AsyncLLM(StandInEngine(step_s=0.001))
    llm.start()
    try:
        outs = await _collect(llm, "a", 4)
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == [1, 2, 3, 4]
        lens = [len(o.outputs[0].token_ids) for o in outs]
        assert lens == sorted(lens)
        many = await asyncio.gather(*(_collect(llm, f"r{i}", 3) for i in range(10)))
        assert all(m[-1].outputs[0].token_ids == [1, 2, 3] for m in many)
    finally:
        llm.shutdown()


async def test_early_exit_aborts_the_request():
    engine = StandInEngine(step_s=0.005)
    llm = AsyncLLM(engine)
    llm.start()
    try:
        gen = llm.generate({"prompt_token_ids": [5]}, SamplingParams(max_tokens=50), "leaver")
        async for _ in gen:
            break
        await gen.aclose()
        task = asyncio.ensure_future(_collect(llm, "cancelled", 50))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not engine.reqs:
                break
            await asyncio.sleep(0.01)
        assert engine.aborted == ["leaver", "cancelled"] and not engine.reqs and llm.num_in_flight == 0
    finally:
        llm.shutdown()


async def test_invalid_input_raises_value_error_and_duplicate_ids_are_refused():
    llm = AsyncLLM(StandInEngine())
    llm.start()
    try:
        with pytest.raises(ValueError, match="not allowed"):
            await _collect(llm, "bad", 2, prompt=(0,))
        assert llm.num_waiting == 0
        gen = llm.generate({"prompt_token_ids": [5]}, SamplingParams(max_tokens=3), "dup")
        first = await gen.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await _collect(llm, "dup", 2)
        assert first.request_id == "dup"
        await gen.aclose()
    finally:
        llm.shutdown()


async def test_idle_loop_sleeps():
    engine = StandInEngine()
    llm = AsyncLLM(engine)
    llm.start()
    try:
        await _collect(llm, "warm", 2)
        await asyncio.sleep(0.05)
        calls = engine.calls
        await asyncio.sleep(0.3)
        assert engine.calls == calls, "the engine thread polls while idle"
    finally:
        llm.shutdown()


async def test_shutdown_fails_waiting_consumers_and_refuses_new_ones():
    llm = AsyncLLM(StandInEngine(step_s=0.01))
    llm.start()
    task = asyncio.ensure_future(_collect(llm, "long", 10_000))
    await asyncio.sleep(0.05)
    await asyncio.to_thread(llm.shutdown)
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(task, 5)
    assert not llm.is_alive
    with pytest.raises(EngineDeadError):
        await _collect(llm, "after", 1)


async def test_server_without_tokenizer_takes_token_ids_only():
    from aiohttp.test_utils import TestClient, TestServer

    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.server.app import create_app
    from fleetserve.runtime.server.config import ServerConfig

    engine = StandInEngine()
    engine.vocab_size = 100
    llm = AsyncLLM(engine)
    app = create_app(EngineConfig(), ServerConfig(), llm=llm)
    try:
        async with TestClient(TestServer(app)) as c:
            r = await c.post("/v1/completions", json={"prompt": "text", "max_tokens": 2})
            assert r.status == 400 and (await r.json())["error"]["code"] == "no_tokenizer"
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert r.status == 400 and (await r.json())["error"]["code"] == "no_tokenizer"
            assert (await c.post("/detokenize", json={"tokens": [1]})).status == 400
            r = await c.post(
                "/v1/completions", json={"prompt": [5, 6], "max_tokens": 3, "logprobs": None, "echo": True}
            )
            body = await r.json()
            # No tokenizer, no text (as LLMEngine without one); the tokens are counted.
            assert (
                r.status == 200
                and body["choices"][0]["text"] == ""
                and body["usage"]["completion_tokens"] == 3
            )
            r = await c.post("/v1/completions", json={"prompt": [500], "max_tokens": 3})
            assert r.status == 400  # past the model's vocabulary
            r = await c.post("/v1/completions", json={"prompt": [5], "max_tokens": 3, "stream": True})
            chunks = [json.loads(ln[6:]) for ln in (await r.text()).split("\n\n") if ln.startswith("data: {")]
            # Deltas of steps the stream fell behind on are merged: up to one chunk per token.
            assert (
                r.status == 200
                and 1 <= len(chunks) <= 3
                and "".join(ch["choices"][0]["text"] for ch in chunks) == ""
            )
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        llm.shutdown()
