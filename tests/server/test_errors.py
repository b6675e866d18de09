"""Every error answers in OpenAI's shape with the right status; aborted requests free their KV blocks."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import aiohttp
import pytest

from .conftest import API_KEY, ENGINE_KW, metric_values, wait_for_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def call(url: str, body=None, headers=None, method=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url,
        data=data,
        method=method or ("POST" if data is not None else "GET"),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def assert_error(
    resp, status: int, *, type_: str | None = None, param: str | None = None, contains: str = ""
):
    code, headers, body = resp
    assert code == status, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if type_:
        assert err["type"] == type_
    if param:
        assert err["param"] == param
    assert contains.lower() in err["message"].lower()
    return err, headers


def test_health_version_metrics_need_no_key(base_url):
    assert call(base_url + "/health")[0] == 200
    code, _, body = call(base_url + "/version")
    assert code == 200 and json.loads(body)["version"]
    assert call(base_url + "/metrics")[0] == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
    ],
)
def test_401_bad_or_missing_key(base_url, headers):
    assert_error(call(base_url + "/v1/models", headers=headers), 401, type_="authentication_error")
    assert_error(call(base_url + "/v1/completions", {"prompt": "x"}, headers), 401)


def test_404_unknown_model_and_route(base_url):
    err, _ = assert_error(
        call(base_url + "/v1/completions", {"model": "nope", "prompt": "x"}, AUTH),
        404,
        param="model",
        contains="nope",
    )
    assert err["code"] == "model_not_found"
    assert_error(
        call(
            base_url + "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            AUTH,
        ),
        404,
    )
    assert_error(call(base_url + "/v1/models/nope", headers=AUTH), 404)
    assert_error(call(base_url + "/v1/nothing-here", headers=AUTH), 404)
    assert_error(call(base_url + "/v1/completions", headers=AUTH, method="GET"), 405)


@pytest.mark.parametrize(
    "body, param, contains",
    [
        ({}, "prompt", "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature", ""),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", ""),
        ({"prompt": "x", "max_tokens": 600}, "max_tokens", "maximum context length"),
        ({"prompt": "hello " * 600}, "prompt", "maximum context length"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [10**9]}, "prompt", "token ids"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ({"prompt": "x", "logprobs": 50}, "logprobs", "logprobs"),
        ({"prompt": "x", "n": 1000}, "n", ""),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", ""),
        ({"prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias", "vocabulary"),
        ({"prompt": "x", "stop_token_ids": [99999999]}, "stop_token_ids", "vocabulary"),
        ({"prompt": "x", "suffix": "y"}, "suffix", "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of", "best_of"),
        ({"prompt": "x", "stop": [""]}, "stop", "stop"),
        ({"prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens", "min_tokens"),
        ({"prompt": "x", "repetition_penalty": 11}, "repetition_penalty", "less than or equal to 10"),
        ({"prompt": 5}, "prompt", "valid string"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "valid number"),
    ],
)
def test_400_completions(base_url, body, param, contains):
    err, _ = assert_error(
        call(base_url + "/v1/completions", body, AUTH), 400, type_="invalid_request_error", contains=contains
    )
    assert err["param"] and err["param"].startswith(param), err
    assert_human(err["message"])


def assert_human(message: str) -> None:
    """One sentence for a person: no pydantic prefixes, dumps or documentation links."""
    for leak in ("Value error", "validation error", "errors.pydantic.dev", "type=", "input_value", "\n"):
        assert leak not in message, message
    assert "\n" not in message and len(message) < 400, message


_USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    "body, param, contains",
    [
        ({"messages": []}, "messages", "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
            "text",
        ),
        ({"messages": _USER, "tools": [{"type": "function"}]}, "tools[0].function", "function"),
        ({"messages": _USER, "tool_choice": "required"}, "tool_choice", "tools"),
        (
            {"messages": _USER, "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "json_schema",
        ),
        ({"messages": _USER, "functions": [{"name": "f"}]}, "functions", "functions"),
        ({"messages": _USER, "function_call": "auto"}, "function_call", "function_call"),
        ({"messages": _USER, "top_logprobs": 2}, "top_logprobs", "logprobs"),
        ({"messages": _USER, "max_completion_tokens": 10_000}, "max_tokens", "maximum context length"),
        (
            {"messages": _USER, "stream": False, "stream_options": {"include_usage": True}},
            "stream_options",
            "stream",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}
                ]
            },
            "messages[0].tool_calls[0].function",
            "function",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "audio": {"id": "a"}}]},
            "messages[0].audio",
            "audio",
        ),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id", "tool_call_id"),
        ({"messages": _USER, "repetition_penalty": 11}, "repetition_penalty", "10"),
    ],
)
def test_400_chat(base_url, body, param, contains):
    err, _ = assert_error(call(base_url + "/v1/chat/completions", body, AUTH), 400, contains=contains)
    assert err["param"] == param, err
    assert_human(err["message"])


def test_400_chat_context_length_names_messages(base_url):
    """runtime/validation.validate refuses it; the server maps the prompt onto chat's field."""
    body = {"messages": [{"role": "user", "content": "hello " * 600}]}
    err, _ = assert_error(
        call(base_url + "/v1/chat/completions", body, AUTH),
        400,
        param="messages",
        contains="maximum context length",
    )
    assert err["code"] == "context_length_exceeded"


def test_400_bad_json(base_url):
    assert_error(call(base_url + "/v1/completions", headers=AUTH, raw=b"{not json"), 400, contains="json")
    assert_error(call(base_url + "/v1/completions", headers=AUTH, raw=b"[1, 2]"), 400, contains="object")


def test_413_body_too_large(base_url):
    big = {"prompt": "x" * (2 << 20)}
    assert_error(call(base_url + "/v1/completions", big, AUTH), 413)


def test_500_leaks_nothing(server, base_url):
    serving = server.serving()

    async def broken(request):
        raise RuntimeError("secret internal detail /etc/passwd")

    serving.list_models = broken  # instance attribute shadows the method for this test only
    try:
        code, _, body = call(base_url + "/v1/models", headers=AUTH)
    finally:
        del serving.list_models
    err, _ = assert_error((code, {}, body), 500, type_="internal_server_error")
    assert "secret" not in body.decode() and "Traceback" not in body.decode()
    assert call(base_url + "/v1/models", headers=AUTH)[0] == 200


def _burst(url: str, n: int, body: dict) -> list:
    async def main():
        async with aiohttp.ClientSession() as s:

            async def one(i):
                async with s.post(url, json={**body, "prompt": f"Burst {i}"}) as r:
                    return r.status, dict(r.headers), await r.read()

            return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(main())


def test_503_when_more_wait_than_the_bound(server):
    """'tight' allows 2 requests beyond the free batch slots: a burst well past max_num_seqs + 2 gets 503s."""
    max_seqs = ENGINE_KW["max_num_seqs"]
    results = _burst(
        server.urls["tight"] + "/v1/completions", max_seqs + 2 + 30, {"max_tokens": 24, "ignore_eos": True}
    )
    codes = [r[0] for r in results]
    assert codes.count(200) >= max_seqs and 503 in codes, codes
    for r in results:
        if r[0] == 503:
            _, headers = assert_error(r, 503, contains="overloaded")
            assert int(headers["Retry-After"]) >= 0
    wait_for_idle(server)


def test_burst_that_fits_the_batch_is_admitted_whole(server):
    """A burst of max_num_seqs requests with a waiting bound of 2: all of them get a batch slot, none a 503
    (before #13 they counted as waiting until the next engine step and all but 2 were refused)."""
    assert server.serving("tight").config.max_waiting_requests == 2
    results = _burst(server.urls["tight"] + "/v1/completions", ENGINE_KW["max_num_seqs"], {"max_tokens": 2})
    assert [r[0] for r in results] == [200] * ENGINE_KW["max_num_seqs"], [
        r[2][:200] for r in results if r[0] != 200
    ]
    wait_for_idle(server)


def _abort_count(base_url) -> float:
    return metric_values(base_url).get("vllm:request_success_total{finished_reason=abort}", 0.0)


def test_stream_disconnect_aborts_and_frees_blocks(server, base_url):
    before = _abort_count(base_url)
    body = json.dumps(
        {"prompt": "Count forever:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    ).encode()
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while b"data: {" not in got:
            got += sock.recv(65536)
        assert b" 200 " in got.split(b"\r\n")[0]
        assert server.llm.stats.kv_cache_usage > 0
    wait_for_idle(server)
    assert _abort_count(base_url) == before + 1
    assert metric_values(base_url)["vllm:kv_cache_usage_perc"] == 0


def test_non_stream_disconnect_aborts_and_frees_blocks(server, base_url):
    before = _abort_count(base_url)

    async def main():
        async with aiohttp.ClientSession(headers=AUTH) as s:
            with pytest.raises(asyncio.TimeoutError):
                async with s.post(
                    base_url + "/v1/completions",
                    json={"prompt": "Count forever:", "max_tokens": 400, "ignore_eos": True},
                    timeout=aiohttp.ClientTimeout(total=1.5),
                ) as r:
                    await r.read()

    asyncio.run(main())
    wait_for_idle(server)
    assert _abort_count(base_url) == before + 1
    assert metric_values(base_url)["vllm:kv_cache_usage_perc"] == 0


def test_many_disconnects_at_every_stage_leave_nothing_behind(server, base_url):
    """16 streams: some leave before their first token, some mid-stream, some finish; nothing leaks."""
    host, port = base_url.removeprefix("http://").split(":")

    def start(i: int) -> socket.socket:
        body = json.dumps(
            {
                "prompt": f"Story {i}:",
                "max_tokens": 24 if i % 4 else 3,
                "ignore_eos": True,
                "stream": i % 2 == 0,
            }
        ).encode()
        sock = socket.create_connection((host, int(port)), timeout=120)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        return sock

    socks = [start(i) for i in range(16)]
    for i, s in enumerate(socks):
        if i % 4 == 1:
            s.close()  # before any output
    for i, s in enumerate(socks):
        if i % 4 == 2 and i % 2 == 0:
            got = b""
            while b"data: {" not in got:
                got += s.recv(65536)
            s.close()  # mid-stream
    for i, s in enumerate(socks):
        if i % 4 in (0, 3):  # these run to the end (i % 4 == 0 are the short ones)
            got = b""
            while not (
                got.endswith(b"data: [DONE]\n\n") or got.endswith(b"}") or got.endswith(b"\r\n0\r\n\r\n")
            ):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            assert b" 200 " in got.split(b"\r\n")[0]
            s.close()
        elif i % 4 == 2 and i % 2 == 1:
            s.close()
    wait_for_idle(server, timeout=120)
    m = metric_values(base_url)
    assert m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0
    assert m["vllm:num_requests_waiting"] == 0
