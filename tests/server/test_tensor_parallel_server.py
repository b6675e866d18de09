"""`fleetserve serve -tp 2` on CPU: the HTTP process, the engine core (rank 0) and one worker
process. The same greedy tokens as the offline TP=1 engine through the official openai client;
a worker killed with SIGKILL makes health answer 503 and the server exit 1 naming the rank;
SIGTERM stops the core and the worker; no process is left behind either way.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from .test_engine_process import _serve

psutil = pytest.importorskip("psutil")
transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 33, 2, 9]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("tp-llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(cfg).float().eval().save_pretrained(path)
    return str(path)


def _tree(pid: int) -> list:
    """Every live descendant of pid but multiprocessing's resource tracker."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if k.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(k.cmdline()):
                out.append(k)
        except psutil.NoSuchProcess:
            pass
    return out


def _gone(procs: list, timeout: float) -> list:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def _start(tiny_dir):
    proc, url, core, lines = _serve(tiny_dir, "--device", "cpu", "-tp", "2")
    deadline = time.monotonic() + 30
    while len(kids := _tree(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert core is not None and {k.pid for k in kids} >= {core}
    workers = [k for k in kids if k.pid != core]
    assert len(workers) == 1 and workers[0].ppid() == core  # the worker is the core's child
    return proc, url, core, workers[0], kids, lines


def test_tp2_server_generates_like_tp1_and_a_killed_worker_means_503_and_exit_1(tiny_dir):
    import openai

    from fleetserve.runtime import LLM, SamplingParams

    ref = (
        LLM(model=tiny_dir, device="cpu", num_kv_blocks=64)
        .generate(
            [{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        )[0]
        .outputs[0]
        .token_ids
    )
    proc, url, core, worker, kids, lines = _start(tiny_dir)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        out = client.completions.create(
            model=tiny_dir,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0.0,
            logprobs=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        assert out.usage.completion_tokens == 12
        got = getattr(out.choices[0], "token_ids", None)
        if got is None:  # token ids as the server reports them
            got = [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]
        assert got == ref
        killed = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        # New requests fail (503 while the server drains, or refused once it is gone), never hang.
        answer = None
        while answer is None and time.monotonic() - killed < 10:
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                time.sleep(0.05)
            except urllib.error.HTTPError as e:
                answer = e.code
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                answer = "gone"
        assert answer in (503, "gone"), "health stayed 200 after a worker died"
        assert proc.wait(timeout=30) == 1
        assert time.monotonic() - killed < 15
        log = "".join(lines)
        assert f"tensor-parallel worker rank 1 (pid {worker.pid}) died: killed by SIGKILL" in log
        assert _gone(kids, 10) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for k in _tree(proc.pid):
            k.kill()


def test_sigterm_stops_the_core_and_every_worker(tiny_dir):
    proc, url, core, worker, kids, _ = _start(tiny_dir)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert _gone(kids, 10) == [], "a process outlived SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for k in kids:
            if k.is_running():
                k.kill()
