"""Where an engine step's time goes under online load, without the HTTP server (issue #15).

Replays `fleetserve bench serve`'s workload straight into one LLMEngine in this process:
Poisson arrivals at --rate requests/s (wall clock), each --input-len random token ids ->
exactly --output-len tokens, delta outputs as the server asks for them. Every schedule()
is stamped, so each step's wall time is known together with its shape (sequences,
batched tokens, decode-only or mixed). The summary bins steps by kind and size and gives
the per-request latencies (TTFT, TPOT) the server would have reported, so the engine's own
share of an online TPOT can be told apart from the server's (IPC, detokenization, SSE).

With --profile-steps N, torch.profiler records N steps in the middle of the run: the GPU's
busy fraction over that window and the kernels that take the time.

    python benchmarks/online_steps.py --model llama-3.1-8b --rate 40 --out steps.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def _bins(values, edges):
    out = {}
    for lo, hi in zip([0, *edges], [*edges, float("inf")]):
        sel = [ms for key, ms in values if lo < key <= hi]
        if sel:
            label = f"{lo + 1}-{hi}" if hi != float("inf") else f">{lo}"
            out[label] = {
                "steps": len(sel),
                "mean_ms": statistics.fmean(sel),
                "p90_ms": float(np.percentile(sel, 90)),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rate", type=float, default=40.0, help="requests/s; inf = all at once")
    ap.add_argument("--num-prompts", type=int, default=400)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from fleetserve.runtime import LLM, SamplingParams

    llm = LLM(
        model=None if args.model == "embedded" else args.model,
        load_format="dummy",
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
    )
    eng = llm.engine
    rng = np.random.default_rng(args.seed)
    vocab = eng.vocab_size
    prompts = rng.integers(100, vocab, size=(args.num_prompts, args.input_len)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    warm = rng.integers(100, vocab, size=(32, args.input_len)).tolist()
    llm.generate([{"prompt_token_ids": p} for p in warm], params.clone(max_tokens=8))
    gaps = (
        rng.exponential(1.0 / args.rate, size=args.num_prompts)
        if args.rate != float("inf")
        else np.zeros(args.num_prompts)
    )
    arrivals = np.cumsum(gaps)

    marks: list[tuple[float, int, int, int, int]] = []
    events: list = []
    cuda = torch.cuda.is_available() and args.device == "cuda"
    original = eng.scheduler.schedule

    def timed():
        out = original()
        if not out.is_empty:
            decodes = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
            ctx = sum(s.start + s.num_new_tokens for s in out.scheduled)
            marks.append((time.perf_counter(), len(out.scheduled), out.num_batched_tokens, decodes, ctx))
            if cuda:  # queued before this step's kernels: consecutive events bound one step's GPU time
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                events.append(ev)
        return out

    eng.scheduler.schedule = timed
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    ntok: dict[str, int] = {}
    sent = 0
    prof = None
    prof_window: list[float] = []
    t0 = time.perf_counter()
    while sent < args.num_prompts or eng.has_unfinished_requests():
        now = time.perf_counter() - t0
        while sent < args.num_prompts and arrivals[sent] <= now:
            eng.add_request(str(sent), {"prompt_token_ids": prompts[sent]}, params, delta=True)
            sent += 1
        if not eng.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[sent] - now))
            continue
        if args.profile_steps and prof is None and len(marks) >= 300:
            prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            prof.__enter__()
            prof_window = [time.perf_counter(), float(len(marks))]
        outs = eng.step()
        t = time.perf_counter()
        for o in outs:
            n = sum(len(c.token_ids) for c in o.outputs)
            if n:
                first.setdefault(o.request_id, t)
                last[o.request_id] = t
                ntok[o.request_id] = ntok.get(o.request_id, 0) + n
        if prof is not None and len(prof_window) == 2 and len(marks) >= prof_window[1] + args.profile_steps:
            torch.cuda.synchronize()
            prof_window.append(time.perf_counter())
            prof.__exit__(None, None, None)
    if cuda:
        end_ev = torch.cuda.Event(enable_timing=True)
        end_ev.record()
        torch.cuda.synchronize()
        events.append(end_ev)
    elapsed = time.perf_counter() - t0
    del eng.scheduler.schedule

    steps = []
    for i, ((ta, seqs, toks, dec, ctx), tb) in enumerate(
        zip(marks, [m[0] for m in marks[1:]] + [t0 + elapsed])
    ):
        st = {"ms": 1e3 * (tb - ta), "seqs": seqs, "tokens": toks, "decodes": dec, "ctx": ctx}
        if cuda:
            st["gpu_ms"] = events[i].elapsed_time(events[i + 1])
        steps.append(st)
    if cuda:  # with async scheduling a wall interval mostly waits for the previous step: use GPU time
        for st in steps:
            st["ms"] = st["gpu_ms"]
    decode = [(s["seqs"], s["ms"]) for s in steps if s["tokens"] == s["seqs"]]
    mixed = [(s["tokens"], s["ms"]) for s in steps if s["tokens"] != s["seqs"]]
    ttft = [1e3 * (first[str(i)] - (t0 + arrivals[i])) for i in range(args.num_prompts)]
    tpot = [1e3 * (last[r] - first[r]) / (ntok[r] - 1) for r in first if ntok[r] > 1]
    res = {
        "model": args.model,
        "rate": args.rate,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seconds": elapsed,
        "out_tok_s": sum(ntok.values()) / elapsed,
        "ttft_ms_p50": float(np.percentile(ttft, 50)),
        "ttft_ms_p99": float(np.percentile(ttft, 99)),
        "tpot_ms_mean": statistics.fmean(tpot),
        "steps": len(steps),
        "decode_steps": len(decode),
        "decode_ms_mean": statistics.fmean([m for _, m in decode]) if decode else None,
        "mixed_steps": len(mixed),
        "mixed_ms_mean": statistics.fmean([m for _, m in mixed]) if mixed else None,
        "mixed_mean_seqs": statistics.fmean([s["seqs"] for s in steps if s["tokens"] != s["seqs"]])
        if mixed
        else None,
        "decode_by_batch": _bins(decode, [32, 64, 128, 192, 256]),
        "mixed_by_tokens": _bins(mixed, [256, 512, 1024, 2048, 4096]),
        "share_of_time_in_mixed": sum(m for _, m in mixed) / max(1e-9, sum(s["ms"] for s in steps)),
        "async_scheduling": eng.async_scheduling,
        "enforce_eager": args.enforce_eager,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    # least squares: GPU ms per step = fixed + per prefill token + per decode sequence + per context token
    if len(steps) > 8:
        A = np.array([[1.0, s["tokens"] - s["decodes"], s["decodes"], s["ctx"]] for s in steps])
        y = np.array([s["ms"] for s in steps])
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        res["step_cost_fit"] = {
            "fixed_ms": coef[0],
            "us_per_prefill_token": 1e3 * coef[1],
            "us_per_decode_seq": 1e3 * coef[2],
            "ns_per_context_token": 1e6 * coef[3],
            "rms_residual_ms": float(np.sqrt(np.mean((A @ coef - y) ** 2))),
        }
    res["step_log"] = [[round(s["ms"], 3), s["seqs"], s["tokens"], s["decodes"], s["ctx"]] for s in steps]
    if prof is not None and len(prof_window) == 3:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        spans = sorted((e.time_range.start, e.time_range.end) for e in events)
        busy, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            busy += cur_e - cur_s
        window_us = 1e6 * (prof_window[2] - prof_window[0])
        w_steps = steps[int(prof_window[1]) : int(prof_window[1]) + args.profile_steps]
        res["profile"] = {
            "steps": args.profile_steps,
            "window_ms": window_us / 1e3,
            "gpu_busy_ms": busy / 1e3,
            "gpu_busy_fraction": busy / window_us,
            "mixed_in_window": sum(1 for s in w_steps if s["tokens"] != s["seqs"]),
            "top_kernels": [
                {"name": k.key[:80], "cuda_ms": k.device_time_total / 1e3, "count": k.count}
                for k in sorted(prof.key_averages(), key=lambda k: -k.device_time_total)[:15]
            ],
            "top_cpu": [
                {"name": k.key[:80], "cpu_ms": k.self_cpu_time_total / 1e3, "count": k.count}
                for k in sorted(prof.key_averages(), key=lambda k: -k.self_cpu_time_total)[:15]
            ],
        }
    shown = {k: v for k, v in res.items() if k not in ("step_log", "profile")}
    print(json.dumps(shown, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    llm.close()


if __name__ == "__main__":
    main()
