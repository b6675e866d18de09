"""Micro-benchmarks of fleetserve.kernels on a GPU: Triton vs torch, with rooflines.

  python benchmarks/kernels_bench.py [--sweep decode,prefill] [--only decode,prefill,small] [--out FILE]

- decode attention (Llama 1B / 8B head shapes, page 16): achieved bandwidth
  (KV bytes read + q/out) vs the 3.0 TB/s roofline of the H100 machine, against torch
  SDPA on contiguous (non-paged) K/V and the paged torch reference;
- prefill attention: causal TFLOP/s (4 * D * Hq per visible (query, key) pair), against
  SDPA (flash, causal) on contiguous K/V;
- rms_norm / rotary / silu_and_mul / write_kv_cache vs their torch references, timed
  both inside a CUDA graph (GPU time) and eagerly (launch overhead included).
`--sweep` also times launch-parameter variants of the attention kernels (block sizes, warps, stages, splits).
Timings are medians of triton.testing.do_bench(_cudagraph).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "kernels"))
from conftest import PagedBatch  # noqa: E402  (the tests' paged-batch builder)

from fleetserve.kernels import activation, attention, cache, norm, rotary  # noqa: E402

BW = 3.0e12  # bytes/s, device copy measured on the H100 machine (read + write)
MODELS = {"1B": (32, 8, 64), "8B": (32, 8, 128)}
LINES: list[str] = []


def emit(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def graph_ms(fn) -> float:
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def eager_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def decode_batch(model: str, B: int, ctx: int) -> PagedBatch:
    return PagedBatch([1] * B, [ctx - 1] * B, *MODELS[model], page=16, dtype=torch.bfloat16, device="cuda")


def decode_bytes(model: str, B: int, ctx: int) -> int:
    Hq, Hkv, D = MODELS[model]
    return B * ctx * Hkv * D * 2 * 2 + 2 * B * Hq * D * 2 + B * (ctx // 16 + 1) * 4


def bench_decode(sweep: bool) -> None:
    emit("## Decode attention (bf16, page 16, all sequences at the same context length)")
    emit()
    emit(
        "| model | batch | ctx | splits | triton us | GB/s | % of 3.0 TB/s | SDPA contiguous us "
        "| torch ref us (eager) |"
    )
    emit("|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for B, ctx in [(256, 768), (256, 4096), (64, 2048), (16, 4096), (1, 4096), (1, 32768)]:
            b = decode_batch(model, B, ctx)
            args = b.args()
            splits = attention._decode_num_splits(B, MODELS[model][1], ctx, 64, b.q.device)
            t = graph_ms(lambda: attention.paged_attention_triton(*args)) * 1e3
            gbs = decode_bytes(model, B, ctx) / (t * 1e-6) / 1e9
            Hq, Hkv, D = MODELS[model]
            kc = torch.randn(B, Hkv, ctx, D, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            qc = b.q.view(B, Hq, 1, D)
            ts = (
                graph_ms(lambda: F.scaled_dot_product_attention(qc, kc, vc, scale=b.scale, enable_gqa=True))
                * 1e3
            )
            # the reference syncs (boolean-mask indexing): eager timing only
            tr = (
                eager_ms(lambda: attention.paged_attention_ref(*args)) * 1e3
                if B * ctx <= 256 * 768
                else float("nan")
            )
            emit(
                f"| {model} | {B} | {ctx} | {splits} | {t:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / BW:.0f}% "
                f"| {ts:.1f} | {tr:.1f} |"
            )
    if sweep:
        emit()
        emit("Decode launch-parameter sweep at batch 256 x ctx 768 (us, CUDA graph):")
        emit()
        emit("| model | block_n | warps | stages | us | % of 3.0 TB/s |")
        emit("|---|---|---|---|---|---|")
        for model in MODELS:
            b = decode_batch(model, 256, 768)
            for bn in (32, 64, 128):
                for w in (2, 4, 8):
                    for st in (1, 2, 3):
                        try:
                            t = (
                                graph_ms(
                                    lambda: attention.paged_attention_triton(
                                        *b.args(), block_n=bn, num_warps=w, num_stages=st
                                    )
                                )
                                * 1e3
                            )
                        except Exception as e:  # noqa: BLE001  (a config that does not compile)
                            emit(f"| {model} | {bn} | {w} | {st} | failed: {type(e).__name__} | |")
                            continue
                        emit(
                            f"| {model} | {bn} | {w} | {st} | {t:.1f} | "
                            f"{100 * decode_bytes(model, 256, 768) / (t * 1e-6) / BW:.0f}% |"
                        )
        emit()
        emit("Decode split sweep (block_n 64, 4 warps, 2 stages; us):")
        emit()
        emit("| model | batch | ctx | splits | us | % of 3.0 TB/s |")
        emit("|---|---|---|---|---|---|")
        for model in MODELS:
            for B, ctx in [(256, 768), (16, 4096), (1, 4096)]:
                b = decode_batch(model, B, ctx)
                for splits in (1, 2, 4, 8, 16, 32, 64):
                    if B * splits > 1024:
                        continue
                    t = graph_ms(lambda: attention.paged_attention_triton(*b.args(), num_splits=splits)) * 1e3
                    emit(
                        f"| {model} | {B} | {ctx} | {splits} | {t:.1f} | "
                        f"{100 * decode_bytes(model, B, ctx) / (t * 1e-6) / BW:.0f}% |"
                    )
    emit()


def prefill_flops(q_lens, ctx_lens, Hq, D) -> float:
    pairs = sum(q * c + q * (q + 1) // 2 for q, c in zip(q_lens, ctx_lens))
    return 4.0 * D * Hq * pairs


def bench_prefill(sweep: bool) -> None:
    emit("## Prefill attention (bf16, causal, page 16)")
    emit()
    emit(
        "| model | batch | new tokens | cached prefix | triton ms | TFLOP/s | SDPA contiguous ms | SDPA TFLOP/s |"
    )
    emit("|---|---|---|---|---|---|---|---|")
    cases = [(4, 2048, 0), (16, 512, 0), (4, 512, 1536), (1, 8192, 0)]
    for model in MODELS:
        Hq, Hkv, D = MODELS[model]
        for B, ql, cl in cases:
            b = PagedBatch([ql] * B, [cl] * B, Hq, Hkv, D, page=16, dtype=torch.bfloat16, device="cuda")
            fl = prefill_flops(b.q_lens, b.ctx_lens, Hq, D)
            t = graph_ms(lambda: attention.paged_attention_triton(*b.args()))
            if cl == 0:
                qc = b.q.view(B, ql, Hq, D).transpose(1, 2)
                kc = torch.randn(B, Hkv, ql, D, device="cuda", dtype=torch.bfloat16)
                vc = torch.randn_like(kc)
                ts = graph_ms(
                    lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True)
                )
                sd = f"{ts:.3f} | {fl / (ts * 1e-3) / 1e12:.0f}"
            else:
                sd = "- | -"
            emit(f"| {model} | {B} | {ql} | {cl} | {t:.3f} | {fl / (t * 1e-3) / 1e12:.0f} | {sd} |")
    if sweep:
        emit()
        emit("Prefill launch-parameter sweep, 4 x 2048 new tokens (TFLOP/s):")
        emit()
        emit("| model | block_m | block_n | warps | stages | ms | TFLOP/s |")
        emit("|---|---|---|---|---|---|---|")
        for model in MODELS:
            Hq, Hkv, D = MODELS[model]
            b = PagedBatch([2048] * 4, [0] * 4, Hq, Hkv, D, page=16, dtype=torch.bfloat16, device="cuda")
            fl = prefill_flops(b.q_lens, b.ctx_lens, Hq, D)
            for bm in (64, 128):
                for bn in (32, 64):
                    for w in (4, 8):
                        for st in (2, 3):
                            try:
                                t = graph_ms(
                                    lambda: attention.paged_attention_triton(
                                        *b.args(), block_m=bm, block_n=bn, num_warps=w, num_stages=st
                                    )
                                )
                            except Exception as e:  # noqa: BLE001
                                emit(f"| {model} | {bm} | {bn} | {w} | {st} | failed: {type(e).__name__} | |")
                                continue
                            emit(
                                f"| {model} | {bm} | {bn} | {w} | {st} | {t:.3f} | {fl / (t * 1e-3) / 1e12:.0f} |"
                            )
    emit()


def bench_small_ops() -> None:
    emit("## Elementwise ops (bf16): Triton vs torch reference")
    emit()
    emit("GPU time in a CUDA graph, and eager time per call (includes Python launch overhead).")
    emit()
    emit(
        "| op | tokens | bytes moved | triton graph us | torch graph us | triton GB/s | triton eager us "
        "| torch eager us |"
    )
    emit("|---|---|---|---|---|---|---|---|")
    dt = torch.bfloat16
    for T in (256, 8192):
        H, I, Hq, Hkv, D = 4096, 14336, 32, 8, 128
        x = torch.randn(T, H, device="cuda", dtype=dt)
        r = torch.randn_like(x)
        w = torch.randn(H, device="cuda", dtype=dt)
        g = torch.randn(T, 2 * I, device="cuda", dtype=dt)
        qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device="cuda", dtype=dt)
        q = qkv[:, : Hq * D].view(T, Hq, D)
        k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
        v = qkv[:, (Hq + Hkv) * D :].view(T, Hkv, D)
        pos = torch.randint(0, 8192, (T,), device="cuda")
        cs = torch.randn(8192, D, device="cuda")
        kvc = torch.randn(2, 4096, 16, Hkv, D, device="cuda", dtype=dt)
        slots = torch.randperm(4096 * 16, device="cuda")[:T]
        ops = [
            (
                "rms_norm+residual",
                2 * 2 * T * H * 2,
                lambda: norm.rms_norm_triton(x, w, 1e-5, r),
                lambda: norm.rms_norm_ref(x, w, 1e-5, r),
            ),
            (
                "rms_norm",
                2 * T * H * 2,
                lambda: norm.rms_norm_triton(x, w, 1e-5),
                lambda: norm.rms_norm_ref(x, w, 1e-5),
            ),
            (
                "rotary",
                2 * T * (Hq + Hkv) * D * 2 + T * D * 4,
                lambda: rotary.rotary_embedding_triton(pos, q, k, cs),
                lambda: rotary.rotary_embedding_ref(pos, q, k, cs),
            ),
            (
                "silu_and_mul",
                3 * T * I * 2,
                lambda: activation.silu_and_mul_triton(g),
                lambda: activation.silu_and_mul_ref(g),
            ),
            (
                "write_kv_cache",
                2 * 2 * T * Hkv * D * 2,
                lambda: cache.write_kv_cache_triton(k, v, kvc, slots),
                lambda: cache.write_kv_cache_ref(k, v, kvc, slots),
            ),
        ]
        for name, nbytes, tri, ref in ops:
            tg = graph_ms(tri) * 1e3
            rg = (
                float("nan") if name == "write_kv_cache" else graph_ms(ref) * 1e3
            )  # its ref syncs (mask indexing)
            te, re_ = eager_ms(tri) * 1e3, eager_ms(ref) * 1e3
            emit(
                f"| {name} | {T} | {nbytes / 1e6:.1f} MB | {tg:.1f} | {rg:.1f} | {nbytes / (tg * 1e-6) / 1e9:.0f} "
                f"| {te:.1f} | {re_:.1f} |"
            )
    emit()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--sweep", default="", help="comma list of decode,prefill: also time launch-parameter variants"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="decode,prefill,small")
    a = ap.parse_args()
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    emit(f"# fleetserve kernels benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    emit()
    emit(
        f"device: {smi}; torch {torch.__version__}; triton {triton.__version__}; "
        f"SMs {torch.cuda.get_device_properties(0).multi_processor_count}"
    )
    emit()
    torch.manual_seed(0)
    only = a.only.split(",")
    if "decode" in only:
        bench_decode("decode" in a.sweep)
    if "prefill" in only:
        bench_prefill("prefill" in a.sweep)
    if "small" in only:
        bench_small_ops()
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
