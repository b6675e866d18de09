"""Regressions from a hostile-client test (issue #13): lone surrogates, event-loop stalls, the SDK's own
messages in multi-turn chats, unknown fields, shutdown past the drain timeout, admission of a burst."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
import time

import pytest

from fleetserve.runtime.server.protocol import ChatCompletionRequest

from .conftest import wait_for_idle
from .test_errors import AUTH, assert_error, assert_human, call

# ---------------------------------------------------------------- 1. lone surrogates


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": ["fine", "a\udfffb"], "max_tokens": 2}, "prompt[1]"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 2},
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
            "messages[0].content[0].text",
        ),
        ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": ["\ud800"], "max_tokens": 2}, "stop[0]"),
    ],
)
def test_lone_surrogate_is_400_naming_the_field_and_logs_no_traceback(base_url, caplog, path, body, param):
    raw = json.dumps(body).encode()  # json.dumps writes the lone surrogate as the escape \ud800
    assert b"\\ud" in raw
    with caplog.at_level(logging.INFO, logger="fleetserve"):
        err, _ = assert_error(
            call(base_url + path, headers=AUTH, raw=raw),
            400,
            type_="invalid_request_error",
            contains="surrogate",
        )
    assert err["param"] == param
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    # A valid pair (an emoji written as two escapes) is text like any other.
    ok = json.dumps({"prompt": "a\U0001f600b", "max_tokens": 1}).encode()
    assert b"\\ud83d\\ude00" in ok
    assert call(base_url + "/v1/completions", headers=AUTH, raw=ok)[0] == 200


def test_invalid_utf8_body_is_400(base_url):
    assert_error(
        call(base_url + "/v1/completions", headers=AUTH, raw=b'{"prompt": "a\xed\xa0\x80b"}'),
        400,
        contains="UTF-8",
    )


# ---------------------------------------------------------------- 2. no request stalls the event loop


class HealthProbe:
    """GETs /health back to back on one keep-alive connection from a thread; records each latency."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.latencies: list[float] = []
        self.failures: list[object] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                self.conn.request("GET", "/health")
                r = self.conn.getresponse()
                r.read()
            except OSError as e:
                self.failures.append(e)
                return
            if r.status != 200:
                self.failures.append(r.status)
            self.latencies.append(time.perf_counter() - t)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
        self.conn.close()

    @property
    def worst(self) -> float:
        assert not self.failures and self.latencies, self.failures
        return max(self.latencies)


def _post_in_thread(url: str, raw: bytes, headers: dict) -> dict:
    res = {}

    def run():
        t = time.perf_counter()
        res["resp"] = call(url, headers=headers, raw=raw)
        res["secs"] = time.perf_counter() - t

    th = threading.Thread(target=run)
    th.start()
    res["thread"] = th
    return res


@pytest.mark.parametrize("what", ["15 MB prompt", "300k messages"])
def test_huge_request_is_refused_cheaply_while_health_stays_fast(server, what):
    url = server.urls["tight"]  # 16 MiB body limit, no key
    if what == "15 MB prompt":
        path, body, param = (
            "/v1/completions",
            {"prompt": "hello world " * 1_250_000, "max_tokens": 2},
            "prompt",
        )
    else:
        path, body, param = (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}] * 300_000},
            "messages",
        )
    raw = json.dumps(body).encode()
    assert 9_000_000 < len(raw) < 16 * 1024 * 1024
    with HealthProbe(url) as probe:
        time.sleep(0.1)
        pending = _post_in_thread(url + path, raw, {})
        pending["thread"].join(120)
        time.sleep(0.1)
    err, _ = assert_error(pending["resp"], 400, param=param, contains="maximum context length")
    assert err["code"] == "context_length_exceeded"
    assert len(probe.latencies) > 5
    assert probe.worst < 0.1, f"/health took {probe.worst * 1000:.0f} ms while {what} was refused"


def _on_server_loop(server, coro, timeout=120):
    return asyncio.run_coroutine_threadsafe(coro, server.loop).result(timeout)


def test_tokenizing_and_rendering_run_off_the_loop(server):
    """Work that passes the cheap bounds (here forced: the bound is skipped) leaves the loop free."""
    serving = server.serving("tight")
    text = "hello world, this is a test. " * 80_000  # 2.3M characters: about a second of tokenizer work
    messages = [{"role": "user", "content": f"message {i}"} for i in range(40_000)]
    template_controls = ChatCompletionRequest(messages=messages[:1])  # the defaults (add_generation_prompt)
    for label, make in (
        ("tokenize", lambda: serving._encode(text, add_special_tokens=False)),
        ("chat template", lambda: serving._render_chat(messages, template_controls)),
    ):
        with HealthProbe(server.urls["tight"]) as probe:
            time.sleep(0.05)
            t = time.perf_counter()
            ids = _on_server_loop(server, make())
            secs = time.perf_counter() - t
            time.sleep(0.05)
        assert len(ids) > 100_000
        assert secs > 0.3, f"{label} took only {secs:.2f}s: not a meaningful stall test"
        assert probe.worst < 0.1, f"/health took {probe.worst * 1000:.0f} ms during {secs:.1f}s of {label}"


def test_many_messages_are_validated_off_the_loop_with_the_right_param(base_url):
    msgs = [{"role": "user", "content": "hi"}] * 300
    msgs = msgs[:280] + [{"role": "wizard", "content": "x"}] + msgs[281:]
    err, _ = assert_error(call(base_url + "/v1/chat/completions", {"messages": msgs}, AUTH), 400)
    assert err["param"] == "messages[280].role"
    assert_human(err["message"])
    # 300 valid messages take that path too and reach the length check (5 tokens each > 512).
    err, _ = assert_error(
        call(base_url + "/v1/chat/completions", {"messages": [msgs[0]] * 300}, AUTH),
        400,
        param="messages",
        contains="maximum context length",
    )


def test_char_bound_is_safe_for_the_served_tokenizer(tokenizer):
    """A text's characters never exceed its token count times the bound (the bound refuses nothing valid)."""
    import random

    bound = tokenizer.max_chars_per_token()
    assert bound is not None and 10 <= bound <= 200
    rng = random.Random(0)
    alphabet = [
        " ",
        "  ",
        "\n",
        "-",
        "=",
        "a",
        "é",
        "字",
        "\U0001f600",
        "0",
        "ab" * 20,
        " " * 30,
        "<|im_start|>",
    ]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        assert len(text) <= len(tokenizer.encode(text, add_special_tokens=False)) * bound
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    assert max(len(tokenizer.decode([i], skip_special_tokens=False)) for i in vocab.values()) <= bound


def test_char_bound_is_none_where_the_pipeline_drops_text():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers

    from fleetserve.runtime.tokenizer import Tokenizer

    bert = Backend(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    bert.pre_tokenizer = pre_tokenizers.Whitespace()  # drops whitespace: a million spaces are zero tokens
    assert Tokenizer(bert).max_chars_per_token() is None
    stripped = Backend(models.BPE({"a": 0}, []))
    stripped.normalizer = normalizers.Strip()
    assert Tokenizer(stripped).max_chars_per_token() is None
    nfc = Backend(models.BPE({"a": 0, "abc": 1}, []))
    nfc.normalizer = normalizers.NFC()
    assert Tokenizer(nfc).max_chars_per_token() == 3 * 4


# ---------------------------------------------------------------- 3. the SDK's own messages, unknown fields


def test_multi_turn_with_the_sdks_message_object(client, model_name):
    messages = [{"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model=model_name, messages=messages, max_tokens=4, temperature=0)
    msg = r.choices[0].message
    history = messages + [msg, {"role": "user", "content": "Again."}]
    r2 = client.chat.completions.create(model=model_name, messages=history, max_tokens=4, temperature=0)
    assert r2.choices[0].message.content is not None
    # Exactly what the SDK serialises for that object, written out: every key present, mostly null.
    sent = {
        "role": "assistant",
        "content": msg.content,
        "refusal": None,
        "tool_calls": None,
        "annotations": [],
        "audio": None,
        "function_call": None,
    }
    r3 = client.chat.completions.create(
        model=model_name, messages=messages + [sent, history[-1]], max_tokens=4, temperature=0
    )
    assert r3.choices[0].message.content == r2.choices[0].message.content
    # Empty tool fields at the top level are their "off" form, accepted.
    r4 = client.chat.completions.create(
        model=model_name,
        messages=messages,
        max_tokens=2,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        parallel_tool_calls=None,
    )
    assert r4.choices[0].finish_reason


def test_refusal_stands_in_for_missing_content():
    from fleetserve.runtime.server.protocol import ChatCompletionRequest

    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "refusal": "I can't."},
            ]
        }
    )
    assert req.chat_messages()[1]["content"] == "I can't."


def test_unknown_fields_are_ignored_and_logged_once_per_name(client, model_name, caplog, monkeypatch):
    from fleetserve.runtime.server import protocol

    monkeypatch.setattr(protocol, "_ignored_logged", set())  # other tests may have logged these names already
    kw = dict(
        model=model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        temperature=0,
        service_tier="auto",
        reasoning_effort="low",
        prompt_cache_key="k1",
        safety_identifier="u1",
        store=True,
        metadata={"a": "b"},
        extra_body={"some_future_field": {"x": 1}},
    )
    with caplog.at_level(logging.WARNING, logger="fleetserve.server"):
        for _ in range(2):
            assert client.chat.completions.create(**kw).choices[0].finish_reason
        chunks = list(
            client.chat.completions.create(
                **kw, stream=True, stream_options={"include_usage": True, "include_obfuscation": False}
            )
        )
        assert chunks[-1].usage is not None
        client.completions.create(
            model=model_name, prompt="Hi", max_tokens=1, extra_body={"some_future_field": 1}
        )
    logged = [r.getMessage() for r in caplog.records if "ignoring unknown request field" in r.getMessage()]
    expected = {
        f"'{name}' in ChatCompletionRequest"
        for name in (
            "service_tier",
            "reasoning_effort",
            "prompt_cache_key",
            "safety_identifier",
            "some_future_field",
        )
    }
    expected |= {"'include_obfuscation' in StreamOptions", "'some_future_field' in CompletionRequest"}
    found = [e for m in logged for e in expected if e in m]
    assert sorted(found) == sorted(expected), logged  # each once, although sent in several requests


# ---------------------------------------------------------------- 5. shutdown past the drain timeout


def _read_until_eof(sock) -> bytes:
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return got
        got += chunk


def test_shutdown_past_the_drain_timeout_ends_streams_with_an_error_event_and_others_with_503(server, caplog):
    """run_server on the shared engine with a 1 s drain: a long stream and a long plain request are cut.
    (test_engine_process.py runs the same check with the engine core in its own process.)"""
    check_shutdown_cut(server, caplog)


def check_shutdown_cut(server, caplog) -> None:
    import socket

    from fleetserve.runtime.server.app import run_server
    from fleetserve.runtime.server.config import ServerConfig

    wait_for_idle(server)

    async def start():
        loop = asyncio.get_running_loop()
        stop, url = asyncio.Event(), loop.create_future()
        task = asyncio.ensure_future(
            run_server(
                server.engine_config,
                ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=1.0),
                llm=server.llm,
                stop=stop,
                on_ready=url.set_result,
                handle_signals=False,
            )
        )
        return await asyncio.wait_for(url, 60), stop, task

    long = {"prompt": "Count forever:", "max_tokens": 400, "ignore_eos": True}
    with caplog.at_level(logging.INFO, logger="fleetserve.server"):
        url, stop, task = _on_server_loop(server, start())
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({**long, "stream": True}).encode()
        sock = socket.create_connection((host, int(port)), timeout=120)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while b"data: {" not in got:
            got += sock.recv(65536)
        plain = _post_in_thread(url + "/v1/completions", json.dumps(long).encode(), {})
        deadline = time.time() + 60
        while server.llm.num_in_flight < 2 and time.time() < deadline:
            time.sleep(0.02)
        t0 = time.time()
        server.loop.call_soon_threadsafe(stop.set)
        got += _read_until_eof(sock)
        sock.close()
        plain["thread"].join(60)
        _on_server_loop(server, asyncio.wait_for(task, 60))
    assert time.time() - t0 < 30
    events = [line[6:] for line in got.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    err = json.loads(events[-2])["error"]
    assert (
        err["type"] == "service_unavailable" and err["code"] == "shutting_down" and "shut" in err["message"]
    )
    assert len(events) > 3  # some tokens went out before the cut
    err, _ = assert_error(plain["resp"], 503, type_="service_unavailable", contains="shut")
    cut = [r.getMessage() for r in caplog.records if "shutdown timeout" in r.getMessage()]
    assert cut and "cut 2 in-flight requests (1 streams" in cut[0] and "1 answered 503" in cut[0], cut
    wait_for_idle(server)  # the engine freed both requests' KV blocks
    assert server.llm.is_alive  # the shared engine belongs to the caller: still serving
