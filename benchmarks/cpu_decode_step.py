"""Single-stream decode step of the embedded model on the CPU: ms per step, and the 4 chat answers.

Times what one decode step of one stream costs with `LLM(gguf_weights=...)` on the CPU:

- "forward": the model's forward pass + LM head for one token at a growing context (the runner's
  KV cache, a hand-built AttentionMetadata), `--steps` steps per round; no scheduler or sampler.
- "engine": `LLM.generate` of one request, `--steps` tokens (ignore_eos): the time per output token
  after the first one (the request's metrics), i.e. what a user of the single stream sees.

Each round reports wall time and the CPU time of the process (both threads' work with
--threads 2; with --threads 1 it is the one thread's time, which other processes on a shared
machine barely disturb). Rounds repeat `--rounds` times: compare minima. `--answers` prints the
greedy answers to four chat prompts (temperature 0, 24 tokens), so a change to the decode path can
be checked for unchanged outputs. `--profile` prints a torch.profiler op table of a few forward
steps (counts per op: divide by the layer count for ops per layer).

    OMP_NUM_THREADS=1 python benchmarks/cpu_decode_step.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

CHATS = [
    "What is the capital of France?",
    "What is the capital of Germany?",
    "Name three colours.",
    "What is 2+2?",
]


def _attn(ctx: int, block_size: int, device):
    from fleetserve.runtime.attention import AttentionMetadata

    nblk = (ctx + block_size - 1) // block_size
    return AttentionMetadata(
        slot_mapping=torch.tensor([ctx - 1], dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([ctx], dtype=torch.int32, device=device),
        block_tables=torch.arange(1, nblk + 1, dtype=torch.int32, device=device)[None],
        max_query_len=1,
        max_seq_len=ctx,
    )


def forward_round(llm, steps: int, start_ctx: int) -> tuple[float, float]:
    """(wall ms, process CPU ms) per forward + logits step over `steps` steps."""
    runner = llm.engine.runner
    model, caches = runner.model, runner.kv_caches
    bs = llm.engine.block_size
    ids = torch.tensor([1000], dtype=torch.int64)
    metas = [_attn(c, bs, "cpu") for c in range(start_ctx, start_ctx + steps)]
    pos = [torch.tensor([c - 1], dtype=torch.int64) for c in range(start_ctx, start_ctx + steps)]
    with torch.inference_mode():
        t, c = time.perf_counter(), time.process_time()
        for p, m in zip(pos, metas):
            hidden = model(ids, p, m, caches)
            model.compute_logits(hidden)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    return 1e3 * wall / steps, 1e3 * cpu / steps


def engine_round(llm, steps: int, prompt_len: int) -> tuple[float, float]:
    """(wall ms per output token after the first, process CPU ms per step of the whole generate)."""
    from fleetserve.runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    # fresh token ids each round: no prefix-cache hits (they would change which blocks are read)
    prompt = {"prompt_token_ids": torch.randint(100, 40000, (prompt_len,)).tolist()}
    c = time.process_time()
    out = llm.generate([prompt], params)[0]
    cpu = time.process_time() - c
    m = out.metrics
    n = len(out.outputs[0].token_ids)
    return 1e3 * (m.last_token_time - m.first_token_time) / (n - 1), 1e3 * cpu / n


def answers(llm) -> list[str]:
    from fleetserve.runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24)
    return [llm.chat([{"role": "user", "content": q}], params)[0].outputs[0].text for q in CHATS]


def profile(llm, steps: int, start_ctx: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    forward_round(llm, 3, start_ctx)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        forward_round(llm, steps, start_ctx)
    return p.key_averages().table(sort_by="cpu_time_total", row_limit=40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gguf-weights", default="packed")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--context", type=int, default=128, help="context length of the first timed step")
    ap.add_argument("--answers", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-engine", action="store_true", help="time only the forward pass")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fleetserve.runtime import LLM

    llm = LLM(device="cpu", gguf_weights=args.gguf_weights, max_model_len=1024, num_kv_blocks=128)
    res: dict = {"threads": torch.get_num_threads(), "loadavg": os.getloadavg()}
    if args.answers:
        res["answers"] = answers(llm)
    if args.profile:
        print(profile(llm, 10, args.context))
    forward_round(llm, 5, args.context)  # warm-up
    fw, en = [], []
    for _ in range(args.rounds):
        fw.append(forward_round(llm, args.steps, args.context))
        if not args.no_engine:
            en.append(engine_round(llm, args.steps, args.context))
    if fw:
        res["forward_wall_ms"] = min(w for w, _ in fw)
        res["forward_cpu_ms"] = min(c for _, c in fw)
    if en:
        res["engine_tpot_ms"] = min(w for w, _ in en)
        res["engine_cpu_ms_per_token"] = min(c for _, c in en)
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
