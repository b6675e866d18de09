"""Property-based fuzzing of the HTTP API (hypothesis), loopback only, bounded in count and time.

Bodies are built from the request models' own field names with values that are sometimes plausible and
often hostile (wrong types, NaN / Infinity, huge numbers, lone surrogates, nesting, unknown fields), plus
raw garbage bytes. Whatever comes in: never a 500, every error in OpenAI's shape, every success a
well-formed body, and afterwards the server is healthy with no request running and no KV block held.
Examples are derandomized so CI runs are reproducible; FLEETSERVE_FUZZ_EXAMPLES raises the count.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetserve.runtime.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

from .conftest import ENGINE_KW, wait_for_idle
from .test_errors import AUTH, call

EXAMPLES = int(os.environ.get("FLEETSERVE_FUZZ_EXAMPLES", "150"))
RANDOM = os.environ.get("FLEETSERVE_FUZZ_RANDOM") == "1"  # new examples each run (local bug hunting)

hostile_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            " ",
            "\ud800",
            "a\udfffb",
            "\x00",
            "<|im_start|>",
            "<|endoftext|>",
            "{{ 7*7 }}",
            "\U0001f600",
            "\\u0000",
        ]
    ),
)
numbers = st.one_of(
    st.integers(-3, 5),
    st.integers(-(2**70), 2**70),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 1e-320, 2.5]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_text)
json_values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(hostile_text, kids, max_size=4)),
    max_leaves=12,
)
token_ids = st.lists(st.one_of(st.integers(0, 49151), st.integers(-5, 2**40)), min_size=0, max_size=8)
content_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "x"]), "text": hostile_text}
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "wizard"])},
    optional={
        "content": st.one_of(hostile_text, st.none(), st.lists(content_part, max_size=2), json_values),
        "name": hostile_text,
        "refusal": st.one_of(st.none(), hostile_text),
        "tool_calls": st.one_of(st.none(), st.just([]), json_values),
        "annotations": st.just([]),
        "audio": st.none(),
        "function_call": st.none(),
        "extra": json_values,
    },
)

# Plausible values per field name; every other field gets json_values. Always a small max_tokens when
# plausible: a chat without one would generate until the 512-token context is full.
PLAUSIBLE = {
    "prompt": st.one_of(
        hostile_text, token_ids, st.lists(hostile_text, max_size=3), st.lists(token_ids, max_size=3)
    ),
    "messages": st.lists(message, max_size=3),
    "max_tokens": st.integers(-1, 3),
    "max_completion_tokens": st.integers(-1, 3),
    "n": st.integers(-1, 20),
    "temperature": numbers,
    "top_p": numbers,
    "top_k": numbers,
    "min_p": numbers,
    "seed": numbers,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries(
        {},
        optional={
            "include_usage": st.booleans(),
            "continuous_usage_stats": st.booleans(),
            "include_obfuscation": st.booleans(),
        },
    ),
    "stop": st.one_of(hostile_text, st.lists(hostile_text, max_size=3)),
    "stop_token_ids": token_ids,
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 25)),
    "top_logprobs": st.integers(-1, 25),
    "logit_bias": st.dictionaries(
        st.one_of(st.integers(-2, 60000).map(str), hostile_text), numbers, max_size=3
    ),
    "echo": st.booleans(),
    "min_tokens": st.integers(-1, 6),
    "tokens": token_ids,
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "repetition_penalty": numbers,
}
ENDPOINTS = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


plain_text = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "Zs"]), min_size=1, max_size=16)
VALID = {
    "/v1/completions": {
        "prompt": st.one_of(
            plain_text,
            st.lists(st.integers(0, 49151), min_size=1, max_size=6),
            st.lists(plain_text, min_size=1, max_size=2),
        ),
        "logprobs": st.integers(0, 3),
        "echo": st.booleans(),
        "n": st.integers(1, 3),
    },
    "/v1/chat/completions": {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system"]), "content": plain_text}
            ),
            min_size=1,
            max_size=3,
        ),
        "logprobs": st.booleans(),
        "n": st.integers(1, 3),
    },
    "/tokenize": {"prompt": plain_text},
    "/detokenize": {"tokens": st.lists(st.integers(0, 49151), max_size=6)},
}
VALID_SAMPLING = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(0, 2**31),
    "stream": st.booleans(),
    "stop": st.lists(plain_text, max_size=2),
    "min_tokens": st.integers(0, 2),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "logit_bias": st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=2),
}


@st.composite
def requests(draw):
    """Half of the bodies valid requests (then maybe one field made hostile), half hostile throughout."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    if draw(st.integers(0, 19)) == 0:  # raw bytes: not JSON, not an object, invalid UTF-8, ...
        return path, draw(st.one_of(st.binary(max_size=40), st.sampled_from([b"[]", b"null", b"{", b'"x"'])))
    fields = sorted(set(ENDPOINTS[path].model_fields) | {"bogus_field", "service_tier"})
    body = {}
    if draw(st.booleans()):
        for name, strat in VALID[path].items():
            if name in ("prompt", "messages", "tokens") or draw(st.booleans()):
                body[name] = draw(strat)
        if path in ("/v1/completions", "/v1/chat/completions"):
            for name in draw(st.lists(st.sampled_from(sorted(VALID_SAMPLING)), unique=True, max_size=3)):
                body[name] = draw(VALID_SAMPLING[name])
            if body.get("logprobs") is True and draw(st.booleans()):
                body["top_logprobs"] = draw(st.integers(0, 3))
        if draw(st.integers(0, 2)) == 0:
            body[draw(st.sampled_from(fields))] = draw(json_values)
    else:
        for name in draw(st.lists(st.sampled_from(fields), unique=True, max_size=6)):
            plausible = PLAUSIBLE.get(name)
            body[name] = draw(plausible if plausible is not None and draw(st.integers(0, 4)) else json_values)
        if path in ("/v1/completions", "/v1/chat/completions"):
            key = "prompt" if path == "/v1/completions" else "messages"
            body.setdefault(key, draw(PLAUSIBLE[key]))
    if path in ("/v1/completions", "/v1/chat/completions"):
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 3:
            body["max_tokens"] = draw(st.integers(1, 3))
        body.pop("max_completion_tokens", None)
    return path, json.dumps(body, allow_nan=True).encode()  # NaN / Infinity: Python's decoder takes them


def check_response(path: str, resp) -> None:
    status, headers, body = resp
    assert status != 500 and status < 600, (status, body[:500])
    if status >= 400:
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert err["param"] is None or isinstance(err["param"], str)
        if status == 400 and not err["message"].startswith("request body"):
            assert err["param"], err  # every 400 about a field names it
        assert "Traceback" not in err["message"] and "Value error" not in err["message"]
        return
    assert status == 200, status
    if headers.get("Content-Type", "").startswith("text/event-stream"):
        events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", events[-2:]
        for e in events[:-1]:
            parsed = json.loads(e)
            if "error" in parsed:
                assert set(parsed["error"]) == {"message", "type", "param", "code"}
                assert parsed["error"]["type"] != "internal_server_error", parsed
    else:
        json.loads(body)


@pytest.mark.timeout(240)
def test_fuzz_http_api_never_500_and_leaves_nothing_behind(server, base_url):
    started = time.monotonic()
    statuses: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=datetime.timedelta(seconds=20),
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )
    @given(requests())
    def one(req):
        path, raw = req
        resp = call(base_url + path, headers=AUTH, raw=raw)
        statuses[resp[0]] = statuses.get(resp[0], 0) + 1
        check_response(path, resp)

    one()
    assert call(base_url + "/health")[0] == 200
    wait_for_idle(server)
    stats = server.llm.stats
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0
    assert server.serving().num_in_flight == 0
    assert ENGINE_KW["max_model_len"] == server.llm.max_model_len  # the fuzzed server is the configured one
    print(
        f"fuzz: {EXAMPLES} examples in {time.monotonic() - started:.1f}s, statuses {sorted(statuses.items())}"
    )
    assert statuses.get(200, 0) >= EXAMPLES // 5  # enough of them get through to the engine
