"""Sampling defaults from the model's generation_config.json (`--generation-config auto`, the default)
for requests that omit them, and none with `--generation-config vllm`; checked on the SamplingParams the
server builds, on real HTTP outputs (greedy defaults reproduce the offline greedy tokens) and in the
start-up log. The model is a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import logging

import openai
import pytest

from fleetserve.runtime import LLM, SamplingParams
from fleetserve.runtime.config import EngineConfig
from fleetserve.runtime.server.config import ServerConfig
from fleetserve.runtime.server.protocol import ChatCompletionRequest, CompletionRequest

from ..runtime.test_loader import tiny_hf_model
from .conftest import ServerThread

GEN = {
    "temperature": 0.0,
    "top_p": 0.8,
    "top_k": 5,
    "repetition_penalty": 1.3,
    "max_new_tokens": 7,
    "do_sample": True,
    "eos_token_id": 2,
}
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
PROMPT = [5, 17, 99, 3, 42]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-gen")
    tiny_hf_model(vocab=tokenizer.vocab_size).save_pretrained(d)
    tokenizer.backend.save(str(d / "tokenizer.json"))
    (d / "generation_config.json").write_text(json.dumps(GEN))
    return d


def _cfg(d, mode):
    return EngineConfig(
        model=str(d),
        device="cpu",
        max_model_len=128,
        num_kv_blocks=32,
        chat_template=TEMPLATE,
        generation_config=mode,
    )


@pytest.fixture(scope="module")
def servers(tiny_dir):
    # These run the engine in a thread; "auto-process" runs it in its own (spawned) core process: the
    # defaults are applied HTTP-side into SamplingParams either way.
    srvs = {m: ServerThread(_cfg(tiny_dir, m), {"main": ServerConfig()}).start() for m in ("auto", "vllm")}
    srvs["auto-process"] = ServerThread(
        _cfg(tiny_dir, "auto"), {"main": ServerConfig()}, engine_process=True
    ).start()
    yield srvs
    for s in srvs.values():
        s.stop()


def test_defaults_fill_only_what_the_request_omits(servers):
    auto, neutral = servers["auto"].serving(), servers["vllm"].serving()
    assert auto.generation_defaults == {
        "temperature": 0.0,
        "top_p": 0.8,
        "top_k": 5,
        "repetition_penalty": 1.3,
        "max_tokens": 7,
    }
    assert neutral.generation_defaults == {}
    assert servers["auto-process"].serving().generation_defaults == auto.generation_defaults
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])
    p = auto._sampling_params(chat, None)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.0, 0.8, 5, 1.3)
    p = auto._sampling_params(
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], temperature=0.7, top_k=-1), None
    )
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.7, 0.8, -1, 1.3)
    p = neutral._sampling_params(chat, None)
    ref = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (
        ref.temperature,
        ref.top_p,
        ref.top_k,
        ref.repetition_penalty,
    )
    assert (
        auto._sampling_params(CompletionRequest(prompt="x"), 16).max_tokens == 16
    )  # completions keep OpenAI's 16


def test_http_outputs_follow_the_defaults(servers, tiny_dir):
    offline = LLM(model=str(tiny_dir), device="cpu", max_model_len=128, num_kv_blocks=32)
    assert offline.get_default_sampling_params().temperature == 0.0
    greedy = (
        offline.generate(
            [PROMPT],
            SamplingParams(
                temperature=0.0, top_k=5, top_p=0.8, repetition_penalty=1.3, max_tokens=6, ignore_eos=True
            ),
        )[0]
        .outputs[0]
        .text
    )
    outs = {}
    for mode, srv in servers.items():
        client = openai.OpenAI(base_url=srv.urls["main"] + "/v1", api_key="x", max_retries=0)
        name = srv.serving().served_model_name
        outs[mode] = (
            client.completions.create(
                model=name, prompt=PROMPT, max_tokens=6, seed=1, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .text
        )
        if mode != "vllm":  # a chat without max_tokens stops at the model's max_new_tokens
            r = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True}
            )
            assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    assert outs["auto"] == outs["auto-process"] == greedy
    assert outs["vllm"] != greedy  # temperature 1 over a 49k vocabulary of a random model


def test_startup_log_states_the_defaults(tiny_dir, caplog):
    with caplog.at_level(logging.INFO, logger="fleetserve.server"):
        for mode in ("auto", "vllm"):
            ServerThread(_cfg(tiny_dir, mode), {"main": ServerConfig()}).start().stop()
    lines = [r.getMessage() for r in caplog.records if "sampling defaults" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "temperature=0.0, top_p=0.8, top_k=5, repetition_penalty=1.3, max_tokens=7 (chat)" in lines[0]
    assert "none from the model (vllm)" in lines[1]
