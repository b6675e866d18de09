"""Where the prefill/mixed phase of the throughput workload spends its time (GPU machine).

Runs the anchor workload's prompts (256 x 512 random tokens, dummy weights) three times in one
process and prints each step's wall time (a one-off slow step = something compiled or allocated
mid-run), cProfile of the first run, then torch.profiler of 128 prompts with few output tokens:
device busy time against wall time (host- or device-bound?) and the kernels that take it.
Usage (GPU machine): python3 benchmarks/profile_prefill.py [preset] [output_len]
With TRITON_CACHE_DIR set to an empty folder it shows what a fresh machine would compile.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from fleetserve.runtime import LLM, SamplingParams


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "llama-3.2-1b"
    output_len = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    llm = LLM(model=preset, load_format="dummy", dtype="bfloat16", max_model_len=512 + 256 + 16, seed=0)
    rng = np.random.default_rng(0)
    vocab = llm.engine.vocab_size
    prompts = [{"prompt_token_ids": p} for p in rng.integers(100, vocab, size=(256, 512)).tolist()]
    warm = [{"prompt_token_ids": p} for p in rng.integers(100, vocab, size=(64, 512)).tolist()]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(warm, params)
    torch.cuda.synchronize()

    t = time.perf_counter()
    llm.generate(prompts[:128], params)  # unprofiled reference wall time (prefix-cache-free prompts)
    torch.cuda.synchronize()
    plain = time.perf_counter() - t

    import cProfile
    import pstats

    from fleetserve.runtime.bench.throughput import _StepTimeline

    for i, (n, out_len) in enumerate(((256, output_len), (256, 256), (256, 256))):
        fresh = [{"prompt_token_ids": p} for p in rng.integers(100, vocab, size=(n, 512)).tolist()]
        steps = _StepTimeline(llm.engine)
        prof = cProfile.Profile() if i == 0 else None
        if prof:
            prof.enable()
        t = time.perf_counter()
        llm.generate(fresh, params.clone(max_tokens=out_len))
        torch.cuda.synchronize()
        end = time.perf_counter()
        if prof:
            prof.disable()
            st = pstats.Stats(prof, stream=sys.stdout)
            st.sort_stats("tottime").print_stats(12)
            st.sort_stats("cumulative").print_stats(25)
        del llm.engine.scheduler.schedule  # drop the timeline's wrapper (an instance attribute)
        marks = steps.marks + [(end, 0, 0)]
        per = [(round((b[0] - a[0]) * 1e3, 1), a[1], a[2]) for a, b in zip(marks, marks[1:])][:24]
        print(f"{n} x 512 -> {out_len}: {end - t:.3f} s; {steps.summary(end)}")
        print("  first steps (ms, seqs, tokens):", per)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        llm.generate(prompts[128:], params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    averages = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in averages)
    print(
        f"{preset}: 128 prompts x 512 -> {output_len} tokens: wall {plain * 1e3:.0f} ms unprofiled, "
        f"{wall * 1e3:.0f} ms profiled; device busy {device_us / 1e3:.0f} ms ({device_us / 1e6 / wall:.0%} of wall)"
    )
    table = averages.table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=60)
    print(table)
    cpu = averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    print(cpu)


if __name__ == "__main__":
    main()
