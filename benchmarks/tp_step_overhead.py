"""What tensor parallelism adds to one engine step on the host (CPU, gloo), with a tiny model.

For TP=1 and TP=2 (and more with --sizes), decode batches of B sequences: the median engine
step time, and for TP>1 the time rank 0 spends getting the step's StepPlan to the workers
(pickle once + one pipe write per worker, `WorkerGroup.send`) and the message size. The
model is tiny on purpose (dummy weights of a 2-layer Llama), so the step time is mostly
host work and collectives; on a GPU the send overlaps nothing else of rank 0's but costs
the same host microseconds.

    python benchmarks/tp_step_overhead.py [--sizes 1 2] [--batches 1 32] [--steps 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile
import time

CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
)


def run(path: str, n: int, batch: int, steps: int) -> dict:
    from fleetserve.runtime import LLM, SamplingParams

    llm = LLM(
        model=path,
        load_format="dummy",
        device="cpu",
        block_size=16,
        num_kv_blocks=1024,
        tensor_parallel_size=n,
        max_num_seqs=max(batch, 1),
    )
    engine = llm.engine
    sends: list[float] = []
    sizes: list[int] = []
    workers = engine.workers
    if workers is not None:
        orig = workers.send

        def timed(msg):
            t0 = time.perf_counter()
            orig(msg)
            sends.append(time.perf_counter() - t0)
            if msg[0] == "step":
                sizes.append(len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)))

        workers.send = timed
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": [1 + i, 2, 3, 4]}, params)
    engine.step()  # the prefill
    sends.clear()
    sizes.clear()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    llm.shutdown()
    out = {"tp": n, "batch": batch, "step_ms_median": statistics.median(times) * 1e3}
    if sends:
        out["send_us_median"] = statistics.median(sends) * 1e6
        out["send_us_p90"] = sorted(sends)[int(0.9 * len(sends))] * 1e6
        out["message_bytes_median"] = statistics.median(sizes)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(CONFIG, f)
        rows = [run(d, n, b, args.steps) for b in args.batches for n in args.sizes]
    result = {
        "what": "tensor-parallel per-step host overhead, CPU gloo, tiny 2-layer Llama (dummy weights)",
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "steps": args.steps,
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
