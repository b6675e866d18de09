"""Lifecycle: SIGTERM drains in-flight streams and exits 0; /health follows the engine loop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fleetserve.runtime.async_engine import AsyncLLM
from fleetserve.runtime.config import EngineConfig
from fleetserve.runtime.server.app import create_app
from fleetserve.runtime.server.config import ServerConfig
from fleetserve.runtime.validation import RequestLimits


def _start_server(*extra: str):
    env = dict(os.environ, FLEETSERVE_API_KEY="sigterm-key", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetserve.runtime.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-model-len",
            "256",
            "--num-kv-blocks",
            "128",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    lines: list[str] = []
    url = {}
    ready = threading.Event()

    def drain():  # keep the pipe empty (progress bars) and find the URL line
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m and not ready.is_set():
                url["url"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(240) or "url" not in url:
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(lines[-30:]))
    return proc, url["url"], lines


def test_sigterm_drains_streams_refuses_new_and_exits_0():
    proc, url, lines = _start_server("--shutdown-timeout", "120")
    try:
        startup = "".join(lines)
        for word in ("dtype=", "device=", "KV blocks=", "max concurrency", url):
            assert word in startup, word
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps(
            {
                "prompt": "Count slowly:",
                "max_tokens": 12,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
            }
        ).encode()
        sock = socket.create_connection((host, int(port)), timeout=120)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sigterm-key\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        got = b""
        while b"data: {" not in got:
            got += sock.recv(65536)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        # New connections are refused once the listener closed.
        with pytest.raises((ConnectionRefusedError, urllib.error.URLError)):
            urllib.request.urlopen(url + "/health", timeout=10)
        while b"data: [DONE]" not in got:
            chunk = sock.recv(65536)
            assert chunk, "stream cut before [DONE]"
            got += chunk
        sock.close()
        events = [json.loads(ln[6:]) for ln in got.decode().split("\n") if ln.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=120) == 0
        assert any("draining" in ln for ln in lines) and any("server stopped" in ln for ln in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- engine death, with a stand-in engine


class _Tok:
    vocab_size = 256
    eos_token_ids = {0}

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "".join(m["content"] for m in messages)


class _CrashingEngine:
    """Accepts requests; its first step raises, as a broken device would."""

    def __init__(self):
        self.tokenizer = _Tok()
        self.model_name = "stand-in"
        self.max_model_len = 128
        self.limits = RequestLimits(max_model_len=128, vocab_size=256, max_logprobs=20)
        self.config = EngineConfig()
        self.requests = []

    def get_stats(self):
        return SimpleNamespace(
            num_running=0,
            num_waiting=len(self.requests),
            kv_cache_usage=0.0,
            num_preemptions_total=0,
            prefix_cache_queries_total=0,
            prefix_cache_hits_total=0,
            prompt_tokens_total=0,
            generation_tokens_total=0,
        )

    def add_request(self, request_id, prompt, params, arrival_time=None, delta=False):
        self.requests.append(request_id)

    def abort_request(self, request_id):
        pass

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        raise RuntimeError("device lost")


async def test_health_turns_503_when_the_engine_loop_dies():
    llm = AsyncLLM(_CrashingEngine())
    app = create_app(EngineConfig(), ServerConfig(), llm=llm)
    async with TestClient(TestServer(app)) as c:
        assert (await c.get("/health")).status == 200
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status == 503
        err = (await r.json())["error"]
        assert "device lost" not in err["message"] and err["type"] == "server_overloaded"
        r = await c.get("/health")
        assert r.status == 503 and "error" in await r.json()
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status == 503 and "Retry-After" in r.headers
    llm.shutdown()
