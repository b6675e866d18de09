"""Per-op times of the packed GGUF matmuls on the CPU (#19): SmolLM2-135M's real weights, each
projection as fp32 F.linear, bf16 F.linear and its packed format (models/quant.py), at 1 and 16
rows. Prints the fastest and the median of repeated calls in microseconds (the fastest is the
one to compare on a shared machine).

    OMP_NUM_THREADS=1 python benchmarks/cpu_packed_matmul.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fleetserve.runtime.loader.gguf_loader import GGUFFile
from fleetserve.runtime.loader.loader import embedded_model_path
from fleetserve.runtime.models.quant import Int8ChannelWeight, concat_rows


def bench(fn, *args, seconds=0.5):
    for _ in range(3):
        fn(*args)
    ts = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(ts) < 10:
        t = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t)
    ts.sort()
    return round(ts[0] * 1e6), round(ts[len(ts) // 2] * 1e6)


def main():
    f = GGUFFile(embedded_model_path())
    q = f._quantized
    ops = {
        "qkv 960x576": ["blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.3.attn_v.weight"],
        "o 576x576": ["blk.3.attn_output.weight"],
        "gate_up 3072x576": ["blk.3.ffn_gate.weight", "blk.3.ffn_up.weight"],
        "down 576x1536": ["blk.3.ffn_down.weight"],
        "lm_head 49152x576": ["token_embd.weight"],
    }
    for name, tensors in ops.items():
        parts = [q(t) for t in tensors]
        w = torch.cat([p.dequantize() for p in parts])
        wb = w.bfloat16()
        fmt = concat_rows([p.pack() for p in parts])
        row = {}
        for m in (1, 16):
            x = torch.randn(m, w.shape[1])
            xb = x.bfloat16()
            row[f"fp32 M={m}"] = bench(F.linear, x, w)
            row[f"bf16 M={m}"] = bench(F.linear, xb, wb)
            row[f"{parts[0].qtype}->{type(fmt).__name__} M={m}"] = bench(fmt.linear, x)
            if name.startswith("lm_head"):
                ch = Int8ChannelWeight.quantize(w)
                row[f"int8 per row M={m}"] = bench(ch.linear, x)
        print(name, row, flush=True)


if __name__ == "__main__":
    main()
