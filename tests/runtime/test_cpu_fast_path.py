"""The CPU engine's op set ("cpu": SDPA attention, fused norm, one-pass RoPE, index-copy KV
writes) against the pure torch references ("torch") end to end: greedy tokens of every tiny
family of test_engine (GQA, MHA, biases, sliding windows, soft-capping, q/k norms) are the same
with both sets and equal Hugging Face's, under prefill, chunked prefill and batched decode."""

from __future__ import annotations

import pytest

from fleetserve.runtime import LLM, SamplingParams

from .test_engine import CONFIGS, PROMPTS, build_hf, hf_greedy

pytest.importorskip("transformers")

NEW = 12


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_ops_greedy_equal_reference_ops(name, tmp_path):
    kind, kw = CONFIGS[name]
    model = build_hf(kind, kw, tmp_path)
    refs = [hf_greedy(model, p, NEW) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    got = {}
    for backend in ("torch", "cpu"):
        for budget in (None, 8):  # whole prompts at once; chunked prefill mixed with decodes
            llm = LLM(
                model=str(tmp_path),
                device="cpu",
                dtype="float32",
                block_size=4,
                num_kv_blocks=128,
                attention_backend=backend,
                max_num_batched_tokens=budget,
            )
            assert llm.engine.runner.model.ops.name == backend
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
            got[backend, budget] = [o.outputs[0].token_ids for o in outs]
    for key, tokens in got.items():
        assert tokens == refs, key
