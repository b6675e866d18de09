"""GPU tier, real weights: the embedded SmolLM2-135M-Instruct served on CUDA (Triton kernels, CUDA
graphs, one batch) against Hugging Face transformers loading the same GGUF on the same GPU, greedy.

- float32 (TF32 off on both sides): token for token on every prompt.
- bfloat16: the two implementations round differently (fused qkv / gate_up GEMMs, Triton attention
  against SDPA), so a long greedy run may part at a near-tie. As vLLM's model tests do, each prompt
  is compared up to its first divergence, and there each side's token must be among the other's
  top-5 candidates (a wrong kernel fails that at once). Both bf16 runs are also compared with the
  float32 reference: ours must stay as close to it as transformers' own bf16 does.
  Measured on an H100 (2026-11-24, 16 prompts x 64 tokens): float32 1024/1024 equal; bf16 ours vs
  transformers 53.9% of tokens before the first divergence, every divergence within both top-5s;
  against the float32 reference ours 55.7%, transformers' own bf16 42.8%. Issue #4's 99% bar is
  not met against transformers' bf16 (53.9%); as transformers' bf16 keeps only 42.8% of its own
  float32 greedy tokens, this test asserts closeness to float32 instead.
"""

from __future__ import annotations

import gc
import os

import pytest

pytestmark = pytest.mark.gpu

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three primary colors.",
    "Explain in one sentence why the sky is blue.",
    "Once upon a time, in a small village,",
    "What is 12 times 7?",
    "Translate to French: Good morning, how are you?",
    "The three laws of thermodynamics are",
    "Give me a recipe for pancakes.",
    "import numpy as np\n\ndef softmax(x):",
    "Who wrote Romeo and Juliet?",
    "In 1969, the first humans",
    "Summarize the plot of Cinderella in two sentences.",
    "The best way to learn a new language is",
    "Why do cats purr?",
]
NEW_TOKENS = 64
TOP = 5


def _ours(dtype: str):
    """Token ids of the prompts (half chat-formatted, half raw text), our greedy tokens and top-5 sets."""

    from fleetserve.runtime import LLM, SamplingParams

    llm = LLM(device="cuda", dtype=dtype, max_model_len=1024, seed=0)
    assert llm.engine.runner._graphs, "decode CUDA graphs were not captured"
    tok = llm.get_tokenizer()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True) if i % 2 else tok.encode(p)
        for i, p in enumerate(PROMPTS)
    ]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP),
    )
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    tops = [
        [
            {t for t, lp in step.items() if lp.rank is not None and lp.rank <= TOP}
            for step in o.outputs[0].logprobs
        ]
        for o in outs
    ]
    llm.close()
    return prompts, tokens, tops


def _hf(path: str, dtype: str, prompts: list[list[int]]):
    import torch

    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(path)
    model = (
        transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
        .cuda()
        .eval()
    )
    tokens, tops = [], []
    with torch.no_grad():
        for ids in prompts:  # one at a time: no padding in the reference
            out = model.generate(
                torch.tensor([ids], device="cuda"),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            tokens.append(out.sequences[0, len(ids) :].tolist())
            tops.append([set(s[0].float().topk(TOP).indices.tolist()) for s in out.scores])
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return tokens, tops


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(b))


def _stats(label: str, got, got_top, want, want_top) -> tuple[float, list]:
    """Share of tokens before the first divergence, and the divergences outside each other's top-5."""
    firsts = [_first_divergence(a, b) for a, b in zip(got, want)]
    bad = [
        (i, k, got[i][k], want[i][k])
        for i, k in enumerate(firsts)
        if k < len(want[i]) and not (got[i][k] in want_top[i][k] and want[i][k] in got_top[i][k])
    ]
    total = sum(len(w) for w in want)
    share = sum(firsts) / total
    print(
        f"[SmolLM2] {label}: {sum(firsts)}/{total} tokens before the first divergence ({share:.1%}); "
        f"per prompt {firsts}; outside the other's top-{TOP}: {bad}"
    )
    return share, bad


@pytest.fixture(scope="module")
def runs(smollm2_path):
    """Greedy tokens and top-5 sets of ours and of transformers, in float32 and bfloat16."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    for dtype in ("float32", "bfloat16"):
        prompts, *out[("ours", dtype)] = _ours(dtype)
        out[("hf", dtype)] = _hf(smollm2_path, dtype, prompts)
    return out


def test_smollm2_fp32_equals_transformers_on_gpu(runs, capsys):
    with capsys.disabled():
        print()
        share, bad = _stats(
            "float32, ours (triton+graphs, batched) vs transformers",
            *runs[("ours", "float32")],
            *runs[("hf", "float32")],
        )
    assert share == 1.0 and not bad


def test_smollm2_bf16_close_to_transformers_on_gpu(runs, capsys):
    """bf16 implementations part at near-ties; ours must part only there, and stay as close to the float32
    reference as transformers' own bf16 does."""
    with capsys.disabled():
        print()
        share, bad = _stats(
            "bfloat16, ours vs transformers", *runs[("ours", "bfloat16")], *runs[("hf", "bfloat16")]
        )
        ours_ref, ours_bad = _stats(
            "bfloat16 ours vs float32 transformers", *runs[("ours", "bfloat16")], *runs[("hf", "float32")]
        )
        hf_ref, _ = _stats(
            "bfloat16 transformers vs float32 transformers",
            *runs[("hf", "bfloat16")],
            *runs[("hf", "float32")],
        )
    assert not bad and not ours_bad, "a divergence outside the other's top-5: a kernel is wrong, not rounding"
    assert share >= 0.3  # measured 0.539 on an H100
    assert ours_ref >= hf_ref - 0.1, (ours_ref, hf_ref)
