"""Where a decode step's milliseconds go, kernel by kernel, against each part's own roofline (issue #15).

The offline workload's decode phase, reproduced in one engine: --batch requests of --input-len
random token ids, decoding together; once they are --ctx-offset tokens into their outputs (the
workload's mean context), three windows of --steps steps each:

1. timed: wall time per step, CUDA graphs on, no profiler (what the benchmark sees);
2. profiled with graphs on: kernels inside graph replays, the GPU's busy span per step and the
   gaps between steps (host time the GPU waits for);
3. profiled with graphs off (eager): the same kernels launched one by one, for their names and
   as a check that the graph changes nothing but launch cost.

Kernels are grouped (GEMM, paged attention, norms, rotary, activation, KV write, sampling,
other) and each group is set against what the roofline lets it take at this batch: the GEMMs
max(weight bytes / bandwidth, FLOPs / matmul rate) summed over the step's matrix products,
attention the KV bytes / bandwidth, the rest their activation bytes. An isolated cuBLAS timing of
each distinct GEMM shape at M = batch says how close the library gets on its own.

    python benchmarks/decode_profile.py --model llama-3.1-8b --out decode-profile-8b.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np

GROUPS = (  # first match wins (lower-case substrings of kernel names)
    ("attention", ("_decode_kernel", "_decode_reduce", "_prefill_kernel", "attn", "flash")),
    ("rms_norm", ("rms_norm",)),
    ("rotary", ("rotary",)),
    ("activation", ("silu", "gelu")),
    ("kv_write", ("write_kv",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas", "matmul")),
    ("sampling", ("argmax", "softmax", "topk", "sort", "multinomial", "exponential", "max_kernel", "reduce")),
    ("copy", ("memcpy", "memset", "copy", "fill")),
)


def _group(name: str) -> str:
    n = name.lower()
    for g, keys in GROUPS:
        if any(k in n for k in keys):
            return g
    return "other"


def _gemm_shapes(mc, tp: int = 1) -> list[tuple[str, int, int, int]]:
    """(name, N, K, count per step) of the decode step's matrix products."""
    H, hd = mc.hidden_size, mc.head_dim
    q, kv = mc.num_heads * hd, mc.num_kv_heads * hd
    L = mc.num_layers
    shapes = [("qkv_proj", q + 2 * kv, H, L), ("o_proj", H, q, L)]
    if not getattr(mc, "is_moe", False):
        shapes += [
            ("gate_up_proj", 2 * mc.intermediate_size, H, L),
            ("down_proj", H, mc.intermediate_size, L),
        ]
    shapes.append(("lm_head", mc.vocab_size, H, 1))
    return shapes


def _kernel_table(prof, steps: int, cuda: bool) -> tuple[dict, float, float]:
    import torch

    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    evs = [e for e in prof.events() if e.device_type == kind]
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    spans = []
    for e in evs:
        d = e.time_range.end - e.time_range.start
        by_name[e.name][0] += d
        by_name[e.name][1] += 1
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
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
    span = (spans[-1][1] - spans[0][0]) if spans else 0.0
    table = {
        name: {"us_per_step": tot / steps, "calls_per_step": cnt / steps, "group": _group(name)}
        for name, (tot, cnt) in by_name.items()
    }
    return table, busy / steps / 1e3, span / steps / 1e3


def _groups(table: dict) -> dict:
    out: dict[str, float] = defaultdict(float)
    for row in table.values():
        out[row["group"]] += row["us_per_step"] / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _bench_gemms(torch, shapes, M: int, dtype, bw: float, flops: float) -> list[dict]:
    rows = []
    for name, N, K, count in shapes:
        w = torch.randn(N, K, dtype=dtype, device="cuda") * 0.01
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        for _ in range(5):
            torch.nn.functional.linear(x, w)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        reps = 50
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        b.record()
        torch.cuda.synchronize()
        us = 1e3 * a.elapsed_time(b) / reps
        byts = (N * K + M * K + M * N) * w.element_size()
        ideal = 1e6 * max(byts / bw, 2 * M * N * K / flops)
        rows.append(
            {
                "gemm": name,
                "M": M,
                "N": N,
                "K": K,
                "per_step": count,
                "us": us,
                "roofline_us": ideal,
                "fraction": ideal / us,
                "TB_s": byts / us / 1e6,
                "TFLOP_s": 2 * M * N * K / us / 1e6,
            }
        )
        del w, x
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--ctx-offset", type=int, default=128, help="decode steps before the windows")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from fleetserve.runtime import LLM, SamplingParams
    from fleetserve.runtime.bench.throughput import measure_device, step_weight_bytes

    cuda = args.device == "cuda"
    dev = measure_device(torch) if cuda else {"bandwidth_Bps": 1e11, "matmul_flops": 1e12}
    bw, fl = dev["bandwidth_Bps"], dev["matmul_flops"]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    llm = LLM(
        model=args.model,
        load_format="dummy",
        device=args.device,
        dtype="bfloat16" if cuda else "float32",
        max_model_len=args.input_len + args.output_len + 16,
        max_num_seqs=args.batch,
    )
    eng = llm.engine
    mc, runner = eng.model_config, eng.runner
    rng = np.random.default_rng(0)
    vocab = eng.vocab_size
    prompts = rng.integers(100, vocab, size=(args.batch, args.input_len)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), {"prompt_token_ids": p}, params)
    produced: dict[str, int] = defaultdict(int)

    def step() -> None:
        for o in eng.step():
            produced[o.request_id] = len(o.outputs[0].token_ids)

    while len(produced) < args.batch or min(produced.values()) < args.ctx_offset:
        step()
    ctx = args.input_len + min(produced.values())
    sync()

    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall_graph = 1e3 * (time.perf_counter() - t) / args.steps

    def profiled():
        act = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[act]) as prof:
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
        return prof, 1e3 * (time.perf_counter() - t) / args.steps

    prof_g, wall_g_prof = profiled()
    table_g, busy_g, span_g = _kernel_table(prof_g, args.steps, cuda)
    sizes = runner._graph_sizes
    runner._graph_sizes = []  # eager decode for the next window (the graphs stay captured)
    prof_e, wall_e = profiled()
    runner._graph_sizes = sizes
    table_e, busy_e, span_e = _kernel_table(prof_e, args.steps, cuda)
    assert min(produced.values()) < args.output_len, "the windows ran past the outputs: lower --ctx-offset"
    llm.close()
    del llm

    B, L = args.batch, mc.num_layers
    bpp = 2
    shapes = _gemm_shapes(mc)
    gemm_roof = sum(
        count * max((N * K + B * (N + K)) * bpp / bw, 2 * B * N * K / fl) for _, N, K, count in shapes
    )
    ctx_mid = ctx + args.steps  # mean context over the three windows
    kv_bytes = B * ctx_mid * L * 2 * mc.num_kv_heads * mc.head_dim * bpp
    weights = step_weight_bytes(mc, B, bpp)
    step_roof = max((weights + kv_bytes) / bw, 2 * mc.num_active_params() * B / fl)
    act = B * mc.hidden_size * bpp
    roof_ms = {
        "gemm": 1e3 * gemm_roof,
        "attention": 1e3 * kv_bytes / bw,
        "rms_norm": 1e3 * (2 * L + 1) * 3 * act / bw,  # read x + residual, write both
        "rotary": 1e3 * L * 2 * B * (mc.num_heads + mc.num_kv_heads) * mc.head_dim * bpp / bw,
        "activation": 1e3 * L * 3 * B * mc.intermediate_size * bpp / bw,
        "kv_write": 1e3 * L * 2 * B * 2 * mc.num_kv_heads * mc.head_dim * bpp / bw,
        "sampling": 1e3 * B * mc.vocab_size * 4 / bw,
    }
    gemms = _bench_gemms(torch, shapes, B, torch.bfloat16, bw, fl) if cuda else []
    iso_ms = sum(g["us"] * g["per_step"] for g in gemms) / 1e3
    groups_g, groups_e = _groups(table_g), _groups(table_e)
    res = {
        "model": args.model,
        "batch": B,
        "context_tokens": ctx_mid,
        "steps_per_window": args.steps,
        "device": {**dev, "gpu": torch.cuda.get_device_name() if cuda else "cpu"},
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "step_ms": {
            "wall_graphs": wall_graph,
            "wall_graphs_profiled": wall_g_prof,
            "wall_eager_profiled": wall_e,
            "gpu_busy_graphs": busy_g,
            "gpu_span_graphs": span_g,
            "gpu_busy_eager": busy_e,
            "roofline": 1e3 * step_roof,
            "roofline_weights_ms": 1e3 * weights / bw,
            "roofline_kv_ms": 1e3 * kv_bytes / bw,
        },
        "groups_ms_graphs": groups_g,
        "groups_ms_eager": groups_e,
        "groups_roofline_ms": roof_ms,
        "gemm_isolated": gemms,
        "gemm_isolated_ms_per_step": iso_ms,
        "kernels_graphs": dict(sorted(table_g.items(), key=lambda kv: -kv[1]["us_per_step"])[:40]),
        "kernels_eager": dict(sorted(table_e.items(), key=lambda kv: -kv[1]["us_per_step"])[:40]),
    }
    print(
        json.dumps(
            {k: res[k] for k in ("step_ms", "groups_ms_graphs", "groups_ms_eager", "groups_roofline_ms")},
            indent=1,
        )
    )
    print("GEMMs alone at M=batch:")
    for g in gemms:
        print(
            f"  {g['gemm']:13s} N={g['N']:6d} K={g['K']:6d} x{g['per_step']:3d}: {g['us']:7.1f} us "
            f"(roofline {g['roofline_us']:6.1f}, {g['fraction']:.2f}; {g['TB_s']:.2f} TB/s, {g['TFLOP_s']:.0f} TFLOP/s)"
        )
    print(
        f"  per step {iso_ms:.2f} ms isolated vs {groups_g.get('gemm', 0):.2f} ms in the graph, roofline {1e3 * gemm_roof:.2f}"
    )
    for name, row in list(res["kernels_graphs"].items())[:20]:
        print(f"  {row['us_per_step']:9.1f} us x{row['calls_per_step']:5.1f} [{row['group']}] {name[:90]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
