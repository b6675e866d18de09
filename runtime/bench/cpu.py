"""`fleetserve bench throughput --device cpu` on a GGUF model: fleetserve and llama.cpp side by side.

The people who run the embedded default on a laptop compare it with llama.cpp (and Ollama, built
on it), so both run in one invocation, on the same GGUF file and thread count:

- prompt processing: one prompt of `input_len` tokens (tok/s of the prefill);
- single-stream decode: one request, `input_len` -> `output_len` (decode tok/s after the first token);
- concurrent: `num_prompts` x (`input_len` -> `output_len`), total output tok/s;
- load: process start -> first answer (fleetserve: the real "The capital of France is" greedy
  answer), and resident memory after load (and at the end, peak).

`--latency` runs only the single-stream part (both engines). fleetserve runs in a fresh child
interpreter, so its import, load time and memory are what a user's first `LLM()` pays. llama.cpp
runs `llama-batched-bench` (random token ids, no sampling or detokenization; fleetserve's figures
include both) from the build of ../shared/bench/llamacpp_peer/build.sh, cached in
~/.cache/fleetserve-peers/llama.cpp (or $FLEETSERVE_LLAMACPP_BIN); without it, its record says why
it was skipped. Every figure is repeated `--repeats` times: min and median are reported.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

PROMPT = "The capital of France is"


def llamacpp_bin_dir() -> str:
    return os.environ.get("FLEETSERVE_LLAMACPP_BIN") or os.path.expanduser(
        "~/.cache/fleetserve-peers/llama.cpp/build/bin"
    )


def _stats(xs: list[float]) -> dict[str, float | list[float]]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "all": xs}


def cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        info["model"] = m.group(1).strip() if m else None
        flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        have = set(flags.group(1).split()) if flags else set()
        info["flags"] = sorted(
            have & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}
        )
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------- fleetserve
def _rss_mib() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def child_main(spec: dict) -> dict:
    """Runs in the fresh child: load, answer, then the workloads. spec: model, threads, input_len,
    output_len, num_prompts, repeats, latency, started (the parent's time.time() at spawn)."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    from fleetserve.runtime import LLM, SamplingParams

    t_import = time.time()
    llm = LLM(model=spec["model"], device="cpu", seed=0, gguf_weights=spec.get("gguf_weights", "auto"))
    t_loaded = time.time()
    rss_load = _rss_mib()
    first = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8))
    t_first = time.time()
    res: dict[str, Any] = {
        "what": "fleetserve",
        "gguf_weights": spec.get("gguf_weights", "auto"),
        "import_s": t_import - spec["started"],
        "load_s": t_loaded - t_import,
        "load_to_first_answer_s": t_first - spec["started"],
        "first_answer": first[0].outputs[0].text,
        "rss_after_load_MiB": rss_load.get("VmRSS"),
        "rss_after_load_detail_MiB": rss_load,
        "num_kv_blocks": llm.engine.num_kv_blocks,
        "kv_tokens": llm.engine.num_kv_blocks * llm.engine.block_size,
        "max_model_len": llm.engine.max_model_len,
        "dtype": str(llm.engine.dtype).replace("torch.", ""),
        "attention_backend": getattr(getattr(llm.engine.runner.model, "ops", None), "name", None),
        "threads": torch.get_num_threads(),
    }
    vocab = llm.engine.vocab_size
    rng = np.random.default_rng(0)
    n_in, n_out, reps = spec["input_len"], spec["output_len"], spec["repeats"]

    def prompts(n: int) -> list[dict]:  # fresh ids each time: no prefix-cache hits
        return [{"prompt_token_ids": p} for p in rng.integers(100, vocab, size=(n, n_in)).tolist()]

    greedy = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
    llm.generate(prompts(1), greedy.clone(max_tokens=4))  # warm-up on the real shapes
    if not spec["latency"]:
        pp = []
        for _ in range(reps):
            t = time.perf_counter()
            llm.generate(prompts(1), greedy.clone(max_tokens=1))
            pp.append(n_in / (time.perf_counter() - t))
        res["prompt_tok_s"] = _stats(pp)
    dec, ttft, e2e = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        out = llm.generate(prompts(1), greedy)[0]
        e2e.append(time.perf_counter() - t)
        m = out.metrics
        n = len(out.outputs[0].token_ids)
        if m is not None and m.first_token_time and m.last_token_time and n > 1:
            dec.append((n - 1) / (m.last_token_time - m.first_token_time))
            ttft.append(m.first_token_time - m.arrival_time)
    if dec:
        res["decode_tok_s"] = _stats(dec)
        res["ttft_s"] = _stats(ttft)
        res["tpot_ms"] = _stats([1e3 / r for r in dec])
    res["single_stream_e2e_s"] = _stats(e2e)
    if not spec["latency"]:
        tot = []
        for _ in range(reps):
            t = time.perf_counter()
            outs = llm.generate(prompts(spec["num_prompts"]), greedy)
            generated = sum(len(o.outputs[0].token_ids) for o in outs)
            tot.append(generated / (time.perf_counter() - t))
        res["concurrent_out_tok_s"] = _stats(tot)
    res["rss_end_MiB"] = _rss_mib().get("VmRSS")
    res["rss_peak_MiB"] = _rss_mib().get("VmHWM")
    return res


def run_fleetserve(model: str | None, args) -> dict:
    spec = {
        "model": model,
        "threads": args.threads,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_prompts": args.num_prompts,
        "repeats": args.repeats,
        "latency": args.latency,
        "gguf_weights": getattr(args, "gguf_weights", "auto"),
        "started": time.time(),
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(
        [sys.executable, "-m", "fleetserve.runtime.bench.cpu", "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"fleetserve child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------- llama.cpp
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6)


def parse_batched_bench(text: str) -> list[dict]:
    """Rows of llama-batched-bench's table: PP, TG, B, N_KV, T_PP s, S_PP t/s, T_TG s, S_TG t/s, T s, S t/s."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            pp, tg, b, nkv = (int(x) for x in m.groups()[:4])
            t_pp, s_pp, t_tg, s_tg, t, s = (float(x) for x in m.groups()[4:])
            rows.append(
                dict(pp=pp, tg=tg, b=b, n_kv=nkv, t_pp=t_pp, s_pp=s_pp, t_tg=t_tg, s_tg=s_tg, t=t, s=s)
            )
    return rows


def _run_measured(cmd: list[str]) -> tuple[str, str, float, float]:
    """(stdout, stderr, wall seconds, peak RSS MiB) of one child process (its own rusage, from wait4)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed (rc {proc.returncode}): {err[-2000:]}")
    return out, err, wall, usage.ru_maxrss / 1024  # Linux: KiB


def llamacpp_unusable(gguf: str) -> str | None:
    """Why the llama.cpp build can't be the peer here (None when it can): it is missing, or a tiny
    run of it dies on a signal, as a GGML_NATIVE build does with SIGILL on a VM whose CPU lists
    instructions (AMX, say) the hypervisor traps. Other failures are errors, not reasons to skip."""
    bin_dir = llamacpp_bin_dir()
    exe = os.path.join(bin_dir, "llama-batched-bench")
    if not os.access(exe, os.X_OK):
        return (
            f"no llama.cpp build at {bin_dir}: run bash ../shared/bench/llamacpp_peer/build.sh "
            "(or set FLEETSERVE_LLAMACPP_BIN)"
        )
    cmd = [exe, "-m", gguf, "-t", "1", "-c", "256", "-npp", "8", "-ntg", "2", "-npl", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        return (
            f"the llama.cpp build at {bin_dir} dies with {sig} on this CPU (a native build for "
            "instructions this machine traps?): rebuild it with -DGGML_NATIVE=OFF or point "
            "FLEETSERVE_LLAMACPP_BIN at a build that runs here"
        )
    return None


def run_llamacpp(gguf: str, args) -> dict:
    bin_dir = llamacpp_bin_dir()
    exe = os.path.join(bin_dir, "llama-batched-bench")
    reason = llamacpp_unusable(gguf)
    if reason:
        return {"what": "llama.cpp", "skipped": reason}
    n_in, n_out, t = args.input_len, args.output_len, str(args.threads)
    npl = "1" if args.latency else f"1,{args.num_prompts}"
    ctx = max(4096, (args.num_prompts if not args.latency else 1) * (n_in + n_out) + 64)
    # 1 output token comes out of the prompt pass, as in fleetserve: -ntg output_len - 1
    cmd = [exe, "-m", gguf, "-t", t, "-tb", t, "-c", str(ctx), "-b", "2048", "-ub", "512"]
    cmd += ["-npp", str(n_in), "-ntg", str(max(n_out - 1, 1)), "-npl", npl]
    pp, dec, tot, walls, rss = [], [], [], [], []
    for _ in range(args.repeats):
        out, err, wall, peak = _run_measured(cmd)
        rows = parse_batched_bench(out + "\n" + err)
        if not rows:
            raise RuntimeError(f"no result table in llama-batched-bench output:\n{out[-2000:]}")
        one = next(r for r in rows if r["b"] == 1)
        pp.append(one["s_pp"])
        dec.append(one["s_tg"])
        walls.append(wall - sum(r["t"] for r in rows))  # start-up: load, context, warm-up
        if not args.latency:
            many = next(r for r in rows if r["b"] == args.num_prompts)
            tot.append(args.num_prompts * n_out / many["t"])
        rss.append(peak)
    res: dict[str, Any] = {
        "what": "llama.cpp",
        "command": " ".join(cmd),
        "prompt_tok_s": _stats(pp),
        "decode_tok_s": _stats(dec),
        "tpot_ms": _stats([1e3 / r for r in dec]),
        "startup_s": _stats(walls),
        "rss_peak_MiB": max(rss),
        "threads": args.threads,
        "note": "random token ids, no sampling or detokenization; startup_s = wall time minus the table's T",
    }
    if tot:
        res["concurrent_out_tok_s"] = _stats(tot)
    try:
        res["build"] = os.path.realpath(bin_dir)
    except OSError:
        pass
    return res


def ratios(fs: dict, peer: dict) -> dict:
    out: dict[str, Any] = {"what": "ratio", "fleetserve_over_llamacpp": {}}
    for key in ("prompt_tok_s", "decode_tok_s", "concurrent_out_tok_s"):
        if key in fs and key in peer:
            out["fleetserve_over_llamacpp"][key] = fs[key]["median"] / peer[key]["median"]
    return out


def run(model: str | None, args) -> list[dict]:
    """Both engines on the GGUF `model` (None = the embedded default); the records to write."""
    from fleetserve.runtime.loader.loader import embedded_model_path

    gguf = model or embedded_model_path()
    records: list[dict] = [{"what": "cpu", **cpu_info(), "gguf": os.path.basename(gguf)}]
    fs = run_fleetserve(model, args)
    records.append(fs)
    peer = run_llamacpp(gguf, args)
    records.append(peer)
    if "skipped" not in peer:
        records.append(ratios(fs, peer))
    return records


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child_main(json.loads(sys.argv[2]))), flush=True)
        sys.exit(0)
    sys.exit("usage: fleetserve bench throughput --device cpu (this module's __main__ is its child process)")
