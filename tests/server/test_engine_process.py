"""The engine core in its own process: same outputs as the in-thread core, and the server's duties
(abort on disconnect, metrics, errors, health, core death, SIGTERM, no orphans) across the split.

Real HTTP on loopback with the official openai client: the session `server` (conftest, engine in a
thread) against a module server whose engine runs in a spawned process, same EngineConfig.
"""

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

import pytest

from .conftest import API_KEY, ENGINE_KW, ServerThread, metric_values, wait_for_idle


@pytest.fixture(scope="module")
def proc_server():
    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.server.config import ServerConfig

    srv = ServerThread(
        EngineConfig(**ENGINE_KW), {"main": ServerConfig(api_key=API_KEY)}, engine_process=True
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def proc_client(proc_server):
    import openai

    return openai.OpenAI(
        base_url=proc_server.urls["main"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120
    )


def test_core_runs_in_another_process(proc_server, server):
    pid = proc_server.llm.core_pid
    assert pid is not None and pid != os.getpid() and _alive(pid)
    assert server.llm.core_pid is None  # the session server's engine is a thread


# ---------------------------------------------------------------- same outputs

# How far two runs' logprobs may drift when their batches differ: the embedded 135M model in fp32
# has been seen 1.7e-4 apart across its 30 layers (CI, 2026-12-02); a wrong logprob (another
# token's, an unscaled or unnormalised one) is off by 1e-2 or more.
LOGPROB_TOL = 1e-3


def _same(a, b, path="") -> None:
    """Equal, except floats (logprobs) within LOGPROB_TOL: fp32 sums differ in the last bits when the
    two servers happen to batch concurrent prompts differently; tokens and text must be identical."""
    if isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= LOGPROB_TOL, f"{path}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), f"{path}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _completion(client, model, **kw):
    r = client.completions.create(model=model, **kw)
    return {
        "choices": [
            (
                c.index,
                c.text,
                c.finish_reason,
                getattr(c, "stop_reason", None),
                None
                if c.logprobs is None
                else (c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs),
            )
            for c in r.choices
        ],
        "usage": r.usage.model_dump(),
    }


def _completion_stream(client, model, **kw):
    """Per choice: joined text, finish reason, logprob tokens and values; the usage chunk."""
    acc: dict = {}
    usage = None
    for ch in client.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, **kw
    ):
        if ch.usage is not None:
            usage = ch.usage.model_dump()
        for c in ch.choices:
            a = acc.setdefault(c.index, {"text": "", "finish": None, "tokens": [], "lps": [], "offsets": []})
            a["text"] += c.text
            a["finish"] = c.finish_reason or a["finish"]
            if c.logprobs is not None:
                a["tokens"] += c.logprobs.tokens
                a["lps"] += c.logprobs.token_logprobs
                a["offsets"] += c.logprobs.text_offset
    return {"choices": acc, "usage": usage}


def _chat(client, model, stream: bool, **kw):
    if not stream:
        r = client.chat.completions.create(model=model, **kw)
        return [
            (
                c.index,
                c.message.content,
                c.finish_reason,
                None
                if c.logprobs is None
                else [(t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in c.logprobs.content],
            )
            for c in r.choices
        ], r.usage.model_dump()
    acc: dict = {}
    for ch in client.chat.completions.create(model=model, stream=True, **kw):
        for c in ch.choices:
            a = acc.setdefault(c.index, ["", None, []])
            a[0] += c.delta.content or ""
            a[1] = c.finish_reason or a[1]
            if c.logprobs is not None and c.logprobs.content:
                a[2] += [(t.token, t.logprob) for t in c.logprobs.content]
    return acc


CASES = [
    dict(prompt="The capital of France is", max_tokens=12, temperature=0),
    dict(prompt=["def fibonacci(n):", "Water boils at"], max_tokens=10, temperature=0, logprobs=3),
    dict(prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[","], extra_body={"ignore_eos": True}),
    dict(prompt="Once upon a time", max_tokens=24, temperature=0, stop=["the", "\n"]),
    dict(prompt="Once upon a time", max_tokens=10, temperature=0.8, seed=1234, n=3),
    dict(prompt="Once upon a time", max_tokens=10, temperature=0.9, seed=7, n=2, stop=[" a"], logprobs=1),
    dict(prompt="Hello", max_tokens=6, temperature=0, echo=True, logprobs=2),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_completions_identical_with_and_without_engine_process(case, client, proc_client, model_name):
    kw = CASES[case]
    _same(_completion(proc_client, model_name, **kw), _completion(client, model_name, **kw))
    if not kw.get("echo"):
        got = _completion_stream(proc_client, model_name, **kw)
        _same(got, _completion_stream(client, model_name, **kw))
        # The stream assembles what the JSON response holds.
        full = _completion(client, model_name, **kw)
        assert [(i, a["text"], a["finish"]) for i, a in sorted(got["choices"].items())] == [
            (c[0], c[1], c[2]) for c in sorted(full["choices"])
        ]


def test_stop_string_ends_the_request_in_the_core(proc_client, proc_server, model_name):
    base = proc_server.urls["main"]
    r = proc_client.completions.create(
        model=model_name,
        prompt="1, 2, 3, 4,",
        max_tokens=200,
        temperature=0,
        stop=[","],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 10
    wait_for_idle(proc_server)  # aborted in the core at once: its blocks are free, nothing runs
    assert metric_values(base)["vllm:kv_cache_usage_perc"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_chat_identical_with_and_without_engine_process(stream, client, proc_client, model_name):
    kw = dict(
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    _same(_chat(proc_client, model_name, stream, **kw), _chat(client, model_name, stream, **kw))
    kw = dict(
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=12,
        temperature=0.7,
        seed=3,
        n=2,
        stop=["."],
    )
    _same(_chat(proc_client, model_name, stream, **kw), _chat(client, model_name, stream, **kw))


def test_offline_llm_matches_the_servers(proc_client, client, model_name):
    """The HTTP-side detokenizer and stop strings give what the offline engine gives in-process."""
    from fleetserve.runtime import LLM, SamplingParams

    llm = LLM(**ENGINE_KW)
    cases = [
        dict(temperature=0.0, max_tokens=12),
        dict(temperature=0.0, max_tokens=24, stop=["the", "\n"]),
        dict(temperature=0.9, seed=11, n=2, max_tokens=16, stop=[" a", "."], logprobs=2),
        dict(temperature=0.0, max_tokens=16, stop=["on"], include_stop_str_in_output=True),
    ]
    # Both servers fill what a request leaves out (top_p here) with the model's defaults, HTTP-side.
    defaults = {k: v for k, v in llm.engine.generation_defaults.items() if k != "max_tokens"}
    assert defaults, "the embedded model has sampling defaults (top_p=0.9): without them this checks less"
    for kw in cases:
        want = llm.generate("Once upon a time", SamplingParams(**{**defaults, **kw}))[0].outputs
        body = {k: v for k, v in kw.items() if k != "include_stop_str_in_output"}
        extra = {"include_stop_str_in_output": True} if "include_stop_str_in_output" in kw else {}
        for c in (proc_client, client):
            got = sorted(
                c.completions.create(
                    model=model_name, prompt="Once upon a time", extra_body=extra, **body
                ).choices,
                key=lambda ch: ch.index,
            )
            assert [(g.text, g.finish_reason) for g in got] == [(w.text, w.finish_reason) for w in want], kw
            if kw.get("logprobs"):
                for g, w in zip(got, want):
                    assert g.logprobs.token_logprobs == pytest.approx(
                        [d[t].logprob for t, d in zip(w.token_ids, w.logprobs)], abs=LOGPROB_TOL
                    )


# ---------------------------------------------------------------- structured outputs

_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_across_the_split(stream, client, proc_client, proc_server, model_name):
    """response_format json_schema with the engine core in its own process: the constraint pickles
    across, the grammar (matchers, bitmasks) runs in the core, and the answer is the thread server's.
    The HTTP side only parses the constraint (no vocabulary tables, no second compile)."""
    pytest.importorskip("xgrammar")
    kw = dict(
        messages=[{"role": "user", "content": "Make up a person. Answer in JSON with name and age."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": _PERSON}},
    )
    got = _chat(proc_client, model_name, stream, **kw)
    _same(got, _chat(client, model_name, stream, **kw))
    text, finish = (got[0][0][1], got[0][0][2]) if not stream else (got[0][0], got[0][1])
    assert finish == "stop", text  # the grammar ended the answer, not max_tokens
    obj = json.loads(text)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int) and 0 <= obj["age"] <= 99, obj
    import openai

    from fleetserve.runtime.structured.grammar import ConstraintChecker

    assert isinstance(proc_server.serving()._grammar_compiler, ConstraintChecker)
    with pytest.raises(openai.BadRequestError) as e:  # checked (parsed) HTTP-side before admission
        proc_client.completions.create(
            model=model_name,
            prompt="hi",
            max_tokens=4,
            extra_body={"structured_outputs": {"regex": "(unclosed"}},
        )
    assert e.value.body["param"].startswith("structured_outputs"), e.value.body


# ---------------------------------------------------------------- errors, abort, metrics


def test_validation_errors_are_400_across_the_split(proc_client, model_name):
    import openai

    with pytest.raises(openai.BadRequestError) as e:  # checked in the HTTP process
        proc_client.completions.create(model=model_name, prompt="hi", max_tokens=10, logprobs=50)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:  # validate() with the limits the core sent at start-up
        proc_client.completions.create(
            model=model_name, prompt="hi", max_tokens=4, extra_body={"stop_token_ids": [10**7]}
        )
    assert e.value.status_code == 400 and e.value.body["param"] == "stop_token_ids"
    for stream in (False, True):  # the server still serves afterwards
        r = proc_client.completions.create(model=model_name, prompt="hi", max_tokens=3, stream=stream)
        assert r is not None


def test_limits_cross_the_split_and_core_refusals_keep_their_param(proc_server, server):
    """AsyncLLM.limits is the core's RequestLimits (sent at start-up); an InvalidRequestError raised by
    add_request inside the core comes back as one, with its param and code (routes answer it as 400)."""
    from fleetserve.runtime.sampling_params import SamplingParams
    from fleetserve.runtime.validation import InvalidRequestError

    llm = proc_server.llm
    assert llm.limits == server.llm.limits and llm.limits.max_model_len == ENGINE_KW["max_model_len"]

    async def refused(ids, params):
        gen = llm.generate({"prompt_token_ids": ids}, params, f"direct-{len(ids)}-{params.max_tokens}")
        try:
            await gen.__anext__()
        except InvalidRequestError as e:
            return e
        finally:
            await gen.aclose()
        raise AssertionError("the core accepted a request it must refuse")

    n = llm.limits.max_model_len
    e = _on_loop(proc_server, refused([1] * n, SamplingParams(max_tokens=1)))
    assert e.param == "prompt" and e.code == "context_length_exceeded"
    e = _on_loop(proc_server, refused([1] * 8, SamplingParams(max_tokens=n)))
    assert e.param == "max_tokens" and e.code == "context_length_exceeded"
    assert llm.num_in_flight == 0 and llm.is_alive


def _on_loop(srv, coro, timeout=120):
    import asyncio

    return asyncio.run_coroutine_threadsafe(coro, srv.loop).result(timeout)


def test_shutdown_past_the_drain_timeout_cuts_across_the_split(proc_server, caplog):
    """#13's cut at the drain timeout with the core in its own process: the stream gets an error event
    and [DONE], the plain request a 503, the core frees both (llm.fail_request aborts there)."""
    from .test_hardening import check_shutdown_cut

    check_shutdown_cut(proc_server, caplog)


def test_stream_disconnect_aborts_the_request_in_the_core(proc_server):
    base = proc_server.urls["main"]
    key = "vllm:request_success_total{finished_reason=abort}"
    before = metric_values(base).get(key, 0.0)
    body = json.dumps(
        {"prompt": "Count forever:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    ).encode()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while b"data: {" not in got:
            got += sock.recv(65536)
        assert proc_server.llm.stats.kv_cache_usage > 0 and proc_server.llm.stats.num_running == 1
    wait_for_idle(proc_server)  # the stats come from the core: it freed the request's blocks
    values = metric_values(base)
    assert values[key] == before + 1 and values["vllm:kv_cache_usage_perc"] == 0


def test_metrics_cross_the_boundary(proc_server, proc_client, model_name):
    base = proc_server.urls["main"]
    before = metric_values(base)
    proc_client.completions.create(
        model=model_name,
        prompt="Tell me a story",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    after = metric_values(base)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total",
    ):
        assert name in after, name
    assert after["vllm:generation_tokens_total"] >= before.get("vllm:generation_tokens_total", 0) + 5
    assert after["vllm:prompt_tokens_total"] > before.get("vllm:prompt_tokens_total", 0)
    for hist in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:request_queue_time_seconds",
    ):
        assert after[hist + "_count"] > before.get(hist + "_count", 0), hist
    assert (
        after["vllm:request_success_total{finished_reason=length}"]
        == before.get("vllm:request_success_total{finished_reason=length}", 0) + 1
    )


# ---------------------------------------------------------------- the process itself (CLI)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
        return "Z" not in state.split()[1]  # a zombie is dead, only not reaped yet
    except (FileNotFoundError, StopIteration):
        return False


def _serve(*extra: str):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
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
            "64",
            "--engine-process",  # the default on CUDA only
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    lines: list[str] = []
    found: dict = {}
    ready = threading.Event()

    def drain():
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
            m = re.search(r"own process \(pid (\d+)\)", line)
            if m:
                found["pid"] = int(m.group(1))
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m and not ready.is_set():
                found["url"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(240) or "url" not in found:
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(lines[-30:]))
    return proc, found["url"], found.get("pid"), lines


def _children(pid: int) -> list[int]:
    """Direct children of pid (the engine core and multiprocessing's resource tracker)."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_core_killed_fails_streams_health_503_and_server_exits_nonzero():
    proc, url, core, lines = _serve()
    try:
        assert core is not None and _alive(core)
        assert urllib.request.urlopen(url + "/health", timeout=10).status == 200
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps(
            {"prompt": "Count:", "max_tokens": 200, "ignore_eos": True, "stream": True}
        ).encode()
        sock = socket.create_connection((host, int(port)), timeout=60)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while b"data: {" not in got:
            got += sock.recv(65536)
        os.kill(core, signal.SIGKILL)
        while b"data: [DONE]" not in got:  # the stream ends with an error event, not a hang
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        sock.close()
        assert b'"error"' in got and b"server_overloaded" in got
        # Until the server is gone, health says 503 (or nobody listens any more).
        try:
            urllib.request.urlopen(url + "/health", timeout=10)
            raise AssertionError("health stayed 200 after the core died")
        except urllib.error.HTTPError as e:
            assert e.code == 503
        except (urllib.error.URLError, ConnectionError):
            pass
        assert proc.wait(timeout=60) == 1
        log = "".join(lines)
        assert f"engine core process (pid {core}) died" in log and "exit code 1" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_stops_the_core_and_server_kill_leaves_no_orphan():
    proc, url, core, _ = _serve()
    try:
        assert core is not None and _alive(core)
        kids = _children(proc.pid)
        assert core in kids
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        for k in kids:
            assert _wait_gone(k, 10), f"child {k} outlived a clean shutdown"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc, url, core, _ = _serve()
    kids = []
    try:
        assert core is not None and _alive(core)
        kids = _children(proc.pid)
        proc.kill()  # SIGKILL: no handler of ours runs
        proc.wait()
        for k in kids:
            assert _wait_gone(k, 30), f"child {k} orphaned after the server was killed"
    finally:
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)


def test_engine_start_failure_exits_1_with_the_cause(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetserve.runtime.cli",
            "serve",
            str(tmp_path / "missing"),
            "--port",
            "0",
            "--engine-process",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert r.returncode == 1
    assert "the engine did not start: ModelLoadError" in r.stderr and "not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_engine_process_default_is_a_process_on_cuda_and_a_thread_on_cpu():
    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.server.app import _engine_in_own_process
    from fleetserve.runtime.server.config import ServerConfig

    assert _engine_in_own_process(ServerConfig(), EngineConfig(device="cuda")) is True
    assert _engine_in_own_process(ServerConfig(), EngineConfig(device="cpu")) is False
    assert _engine_in_own_process(ServerConfig(engine_process=True), EngineConfig(device="cpu")) is True
    assert _engine_in_own_process(ServerConfig(engine_process=False), EngineConfig(device="cuda")) is False
