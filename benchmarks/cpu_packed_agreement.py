"""Greedy agreement of the packed CPU path with the float32 dequantize path, embedded SmolLM2.

20 prompts (10 chat questions through the model's template, 10 plain completions), `--tokens`
greedy tokens each (EOS ignored), generated together on `LLM(gguf_weights="dequantize")` (the
reference) and on `LLM(gguf_weights=--mode)`. Reports how many sequences are equal, how many tokens
come before each first difference, and at each first difference the reference's own top-2 logit gap
(teacher-forced on its tokens): a small gap is a near-tie of float32 math that any rounding may flip.

    python benchmarks/cpu_packed_agreement.py --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os

import torch

CHATS = [
    "What is the capital of France?",
    "What is the capital of Germany?",
    "Name three colours.",
    "What is 2+2?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How many days are in a week?",
    "What is photosynthesis?",
    "Translate 'hello' into French.",
    "Give me a tip for learning Python.",
]
COMPLETIONS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "1, 2, 3, 4,",
    "Once upon a time",
    "The best way to learn a language is",
    "import numpy as np\n",
    "The sun rises in the",
    "My favourite food is",
    "In 1492, Columbus",
]


def prompt_ids(llm) -> list[list[int]]:
    from fleetserve.runtime import SamplingParams

    one = SamplingParams(temperature=0.0, max_tokens=1)
    chats = [llm.chat([{"role": "user", "content": q}], one)[0].prompt_token_ids for q in CHATS]
    tok = llm.get_tokenizer()
    return chats + [tok.encode(c) for c in COMPLETIONS]


def greedy(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    from fleetserve.runtime import SamplingParams

    p = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": q} for q in prompts], p)]


def top2_gaps(llm, ids: list[int]) -> torch.Tensor:
    """The model's top-1 minus top-2 logit at every position of ids (one prefill in a fresh cache)."""
    from fleetserve.runtime.attention import AttentionMetadata

    model = llm.engine.runner.model
    cfg, n = model.config, len(ids)
    bs = llm.engine.block_size
    nb = (n + bs - 1) // bs
    kv = [torch.zeros(2, nb, bs, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    i32 = torch.int32
    attn = AttentionMetadata(
        torch.arange(n), torch.tensor([0, n], dtype=i32), torch.tensor([n], dtype=i32),
        torch.arange(nb, dtype=i32)[None], n, n,
    )  # fmt: skip
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(ids), torch.arange(n), attn, kv))
    t2 = logits.topk(2, dim=-1).values
    return t2[:, 0] - t2[:, 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="packed", help="gguf_weights of the path compared with dequantize")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fleetserve.runtime import LLM

    kw = dict(device="cpu", max_model_len=1024, num_kv_blocks=256)
    ref_llm = LLM(gguf_weights="dequantize", **kw)
    prompts = prompt_ids(ref_llm)
    ref = greedy(ref_llm, prompts, args.tokens)
    ours = greedy(LLM(gguf_weights=args.mode, **kw), prompts, args.tokens)
    tok = ref_llm.get_tokenizer()
    cuts, diffs = [], []
    for p, a, b in zip(prompts, ours, ref):
        cut = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        cuts.append(cut)
        if cut < len(b):
            gap = float(top2_gaps(ref_llm, p + b)[len(p) - 1 + cut])
            diffs.append({"at": cut, "reference_top2_gap": round(gap, 4), "reference": tok.decode(b[cut : cut + 1]),
                          "ours": tok.decode(a[cut : cut + 1])})  # fmt: skip
    res = {
        "mode": args.mode,
        "sequences_equal": sum(c == args.tokens for c in cuts),
        "sequences": len(cuts),
        "tokens_before_first_difference": sum(cuts),
        "tokens": args.tokens * len(cuts),
        "first_difference_per_prompt": cuts,
        "differences": diffs,
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
