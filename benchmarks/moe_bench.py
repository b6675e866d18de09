"""Micro-benchmark of the fused MoE kernel (kernels/moe.py) on a GPU, with its roofline.

  python benchmarks/moe_bench.py [--sweep] [--models mixtral-8x7b,qwen3-30b-a3b] [--tokens 1,16,64,256,8192]

For each expert shape (from the presets) and token count: random softmax top-k routing,
bf16, the whole `fused_moe_triton` call (alignment, both grouped GEMMs, activation, slot
sum) timed inside a CUDA graph. Bytes = the distinct experts the routing hit x their
weights + activations in and out; FLOPs = 2 x 3 x H x I per (token, slot). Prints the
time, achieved GB/s and TFLOP/s, and the fraction of max(bytes / bandwidth, flops / rate)
with the device's copy bandwidth and matmul rate measured here. `--sweep` also times
launch-parameter variants (BLOCK_M/N/K, warps, stages) and prints the best per case,
the input for tuning `moe_launch_config`.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench_cudagraph

from fleetserve.kernels.moe import fused_moe_triton, moe_launch_config, moe_topk
from fleetserve.runtime.bench.throughput import measure_device
from fleetserve.runtime.models import PRESETS


def case(mc, T: int, gen: torch.Generator):
    H, I, E, K = mc.hidden_size, mc.moe_intermediate_size, mc.num_experts, mc.num_experts_per_tok
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    w, ids = moe_topk(torch.randn(T, E, device="cuda", generator=gen), K, renormalize=True)
    hit = int(torch.unique(ids).numel())
    nbytes = hit * 3 * H * I * 2 + 2 * T * H * 2
    flops = 2 * 3 * H * I * T * K
    return (x, w13, w2, w, ids), nbytes, flops


def time_ms(args, config=None) -> float:
    fn = lambda: fused_moe_triton(*args, config=config)  # noqa: E731
    fn()
    return do_bench_cudagraph(fn, rep=50, return_mode="median")


def sweep_configs():
    for bm, bn, bk, warps, stages in itertools.product(
        [16, 32, 64, 128], [64, 128, 256], [64, 128], [4, 8], [3, 4, 5]
    ):
        if bm * bn >= 128 * 256 and warps == 4:
            continue
        yield dict(
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=8 if bm >= 64 else 16,
            num_warps=warps,
            num_stages=stages,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,16,64,128,256,512,2048,8192")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    dev = measure_device(torch)
    bw, rate = dev["bandwidth_Bps"], dev["matmul_flops"]
    print(
        f"device {torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s"
    )
    print("| model | tokens | experts hit | BLOCK_M | us | GB/s | TFLOP/s | of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.models.split(","):
        mc = PRESETS[name]
        for T in [int(t) for t in args.tokens.split(",")]:
            a, nbytes, flops = case(mc, T, gen)
            hit = int(torch.unique(a[4]).numel())
            roof = max(nbytes / bw, flops / rate)
            ms = time_ms(a)
            bm = moe_launch_config(
                T * mc.num_experts_per_tok, mc.num_experts, 2 * mc.moe_intermediate_size, mc.hidden_size
            )["BLOCK_M"]
            print(
                f"| {name} | {T} | {hit} | {bm} | {ms * 1e3:.1f} | {nbytes / ms / 1e6:.0f} | "
                f"{flops / ms / 1e9:.1f} | {roof / (ms * 1e-3):.2f} |",
                flush=True,
            )
            if args.sweep:
                best = []
                for cfg in sweep_configs():
                    try:
                        best.append((time_ms(a, cfg), cfg))
                    except Exception as e:  # out of shared memory and the like
                        print(f"  skip {cfg}: {type(e).__name__}")
                best.sort(key=lambda r: r[0])
                for t, cfg in best[:3]:
                    print(f"  {t * 1e3:.1f} us ({roof / (t * 1e-3):.2f} of roofline) {cfg}", flush=True)
            del a
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
