"""/tokenize, /detokenize, raw SSE framing and the vLLM streaming extras."""

from __future__ import annotations

import json

from .test_errors import AUTH, assert_error, call


def test_tokenize_detokenize_roundtrip(base_url, tokenizer, model_name):
    code, _, body = call(base_url + "/tokenize", {"model": model_name, "prompt": "Hello world"}, AUTH)
    r = json.loads(body)
    assert code == 200 and r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512
    code, _, body = call(base_url + "/detokenize", {"model": model_name, "tokens": r["tokens"]}, AUTH)
    assert code == 200 and json.loads(body)["prompt"] == "Hello world"
    msgs = [{"role": "user", "content": "Hi"}]
    code, _, body = call(base_url + "/tokenize", {"messages": msgs}, AUTH)
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert json.loads(body)["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert_error(call(base_url + "/tokenize", {"prompt": "x", "messages": msgs}, AUTH), 400)
    assert_error(call(base_url + "/detokenize", {"tokens": [10**9]}, AUTH), 400)
    assert_error(call(base_url + "/tokenize", {"prompt": "x"}), 401)


def _events(raw: bytes) -> list:
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    return [json.loads(f[6:]) for f in frames[:-1]]


def test_raw_sse_framing_chat_n2_with_usage(base_url):
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "n": 2,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    code, headers, raw = call(base_url + "/v1/chat/completions", body, AUTH)
    assert code == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = _events(raw)
    assert headers["X-Request-Id"] == events[0]["id"]  # for matching client reports with server logs
    assert all(e["object"] == "chat.completion.chunk" and "usage" in e for e in events)
    per_choice: dict[int, list] = {0: [], 1: []}
    for e in events[:-1]:
        assert e["usage"] is None and len(e["choices"]) == 1
        per_choice[e["choices"][0]["index"]].append(e["choices"][0])
    for chunks in per_choice.values():
        assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["delta"] == {} and chunks[-1]["finish_reason"] in ("stop", "length")
        assert all(c["finish_reason"] is None for c in chunks[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] <= 6


def test_stream_without_usage_has_no_usage_field(base_url):
    code, _, raw = call(base_url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True}, AUTH)
    assert code == 200 and all("usage" not in e for e in _events(raw))


def test_continuous_usage_stats(base_url):
    body = {
        "prompt": "Hi",
        "max_tokens": 3,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    events = _events(call(base_url + "/v1/completions", body, AUTH)[2])
    counts = [e["usage"]["completion_tokens"] for e in events[:-1]]
    assert counts == sorted(counts) and counts[-1] == 3
