"""Tensor parallelism on CUDA (NCCL): TP=2 with CUDA graphs (the all_reduces captured inside the
decode graphs) gives the same greedy tokens as TP=2 eager and as TP=1, in fp32 and under
async scheduling (rank 0 broadcasts the sampled tokens on the device). Needs 2 GPUs."""

from __future__ import annotations

import pytest
import torch

from fleetserve.runtime import LLM, SamplingParams

from .test_gpu_engine import _prefix_match
from .test_tensor_parallel import PROMPTS, _prompts, _wait_no_workers, build_hf

pytestmark = pytest.mark.gpu

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-1kv-bias"])
def test_tp2_cuda_graphs_match_eager_and_tp1(two_gpus, tmp_path, name):
    build_hf(name, tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kw = dict(model=str(tmp_path), dtype="float32", block_size=16, num_kv_blocks=128, max_num_seqs=8)
    with LLM(**kw, enforce_eager=True) as one:
        ref = [o.outputs[0].token_ids for o in one.generate(_prompts(PROMPTS), params)]
    for eager in (True, False):
        with LLM(**kw, tensor_parallel_size=2, enforce_eager=eager) as llm:
            assert llm.engine.async_scheduling  # the default on CUDA: placeholders come by broadcast
            assert bool(llm.engine.runner._graphs) is not eager
            got = [o.outputs[0].token_ids for o in llm.generate(_prompts(PROMPTS), params)]
            assert got == ref, f"enforce_eager={eager}"
    assert _wait_no_workers() == []


def test_tp2_bf16_agreement_reported(two_gpus, tmp_path, capsys):
    """bf16: the row-parallel GEMMs sum their halves in another order than one GPU's GEMM, so greedy runs
    part at near-ties (random weights make many); the first tokens must still agree for 3 prompts in 4
    (a wrong shard or collective diverges at once, on every prompt) and the agreement is reported, as the GPU tier does for
    the fused kernels."""
    build_hf("llama-gqa", tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    kw = dict(model=str(tmp_path), dtype="bfloat16", block_size=16, num_kv_blocks=128, max_num_seqs=8)
    with LLM(**kw) as one:
        want = [o.outputs[0].token_ids for o in one.generate(_prompts(PROMPTS), params)]
    with LLM(**kw, tensor_parallel_size=2) as two:
        got = [o.outputs[0].token_ids for o in two.generate(_prompts(PROMPTS), params)]
    matched = sum(_prefix_match(a, b) for a, b in zip(got, want))
    total = sum(len(w) for w in want)
    with capsys.disabled():
        print(
            f"\n[bfloat16] TP=2 vs TP=1: {matched}/{total} tokens match before the first divergence "
            f"({matched / total:.1%}); first divergence per prompt {[_prefix_match(a, b) for a, b in zip(got, want)]}"
        )
    assert 4 * sum(a[0] == b[0] for a, b in zip(got, want)) >= 3 * len(want)
    assert _wait_no_workers() == []


@pytest.mark.parametrize("name", ["mixtral-e8-k2-gqa4", "qwen3moe-e16-k4-gqa2-dense-layer"])
def test_tp2_moe_triton_kernel_matches_tp1(two_gpus, tmp_path, name):
    """The MoE families at TP=2: the Triton fused-MoE kernel on each rank's slice of every expert,
    the MoE block's all_reduce captured in the decode graphs; fp32 greedy tokens equal TP=1's."""
    from .test_moe_engine import CONFIGS
    from .test_moe_engine import build_hf as build_moe

    build_moe(*CONFIGS[name], tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kw = dict(model=str(tmp_path), dtype="float32", block_size=16, num_kv_blocks=128, max_num_seqs=8)
    with LLM(**kw) as one:
        ref = [o.outputs[0].token_ids for o in one.generate(_prompts(PROMPTS), params)]
    with LLM(**kw, tensor_parallel_size=2) as two:
        assert bool(two.engine.runner._graphs)
        assert [o.outputs[0].token_ids for o in two.generate(_prompts(PROMPTS), params)] == ref
    assert _wait_no_workers() == []
