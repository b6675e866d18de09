"""GPU tier for the MoE families: the engine on CUDA (Triton fused MoE, CUDA graphs) equals the
torch-reference path on the same dummy weights, no Triton compile after start-up, and the real
Mixtral-8x7B / Qwen3-30B-A3B presets build directly on the device.

Shapes: the presets' real hidden sizes, expert counts and top-k with fewer layers (and a
smaller vocabulary), registered as extra presets for the test.
"""

import gc

import pytest

pytestmark = pytest.mark.gpu

SMALL = {
    "mixtral-8x7b": dict(num_layers=2, vocab_size=32000),
    "qwen3-30b-a3b": dict(num_layers=4, vocab_size=32000),
}


@pytest.fixture(params=list(SMALL))
def small_preset(request, monkeypatch):
    from fleetserve.runtime.models import PRESETS

    name = f"{request.param}-small"
    monkeypatch.setitem(PRESETS, name, PRESETS[request.param].with_(**SMALL[request.param], name=name))
    return name


def _engine(name, backend, dtype, eager, **kw):
    import torch

    from fleetserve.runtime import LLM

    llm = LLM(
        model=name,
        load_format="dummy",
        device="cuda",
        dtype=dtype,
        max_model_len=1024,
        attention_backend=backend,
        enforce_eager=eager,
        seed=0,
        **kw,
    )
    with torch.no_grad():  # larger logits: fewer near-ties between the top tokens of random weights
        llm.engine.runner.model.model.embed_tokens.weight.mul_(8.0)
    return llm


def _greedy(llm, prompts, n=32):
    from fleetserve.runtime import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def _prompts(n=8, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [
        {"prompt_token_ids": rng.integers(100, 30000, size=int(k)).tolist()}
        for k in rng.integers(5, 300, size=n)
    ]


def test_triton_graphs_match_torch_reference_fp32(small_preset, capsys):

    prompts = _prompts()
    tri = _engine(small_preset, "triton", "float32", eager=False)
    assert tri.engine.runner._graphs
    got = _greedy(tri, prompts)
    tri.close()
    ref = _engine(small_preset, "torch", "float32", eager=True)
    want = _greedy(ref, prompts)
    ref.close()
    equal = sum(a == b for a, b in zip(got, want))
    with capsys.disabled():
        print(f"\n[{small_preset} fp32] triton+graphs vs torch reference: {equal}/{len(want)} prompts equal")
    assert equal >= len(want) - 1  # one late near-tie allowed


def _compiled_kernels() -> dict:
    import importlib

    counts = {}
    for mod in ("attention", "cache", "norm", "rotary", "activation", "moe"):
        m = importlib.import_module(f"fleetserve.kernels.{mod}")
        for name, obj in vars(m).items():
            caches = getattr(obj, "device_caches", None)
            if caches is not None:
                counts[name] = sum(len(entry[0]) for entry in caches.values())
    return counts


def test_no_triton_compile_after_startup(small_preset):
    """Every fused-MoE launch-config class (it follows the step's token count) is compiled on first
    use; a varied workload afterwards compiles nothing."""
    import numpy as np

    from fleetserve.runtime import SamplingParams

    llm = _engine(small_preset, "triton", "bfloat16", eager=False, max_num_batched_tokens=4096)
    before = _compiled_kernels()
    assert before.get("_fused_moe_kernel"), "the MoE kernel was not compiled at start-up"
    rng = np.random.default_rng(1)
    for n in (1, 7, 33, 130):
        prompts = [
            {"prompt_token_ids": rng.integers(100, 30000, size=int(k)).tolist()}
            for k in rng.integers(3, 900, size=n)
        ]
        params = [
            SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True)
            for m in rng.integers(1, 40, size=n)
        ]
        llm.generate(prompts, params)
    after = _compiled_kernels()
    llm.close()
    assert after == before, f"compiled after start-up: { {k: after[k] - before.get(k, 0) for k in after} }"


@pytest.mark.parametrize("name,gib", [("mixtral-8x7b", 87.0), ("qwen3-30b-a3b", 56.9)])
def test_full_preset_dummy_weights_allocate_on_the_device(name, gib):
    """bf16 Mixtral-8x7B (~93 GB) does not fit host-side staging twice: weights are created on the GPU."""
    import torch

    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.loader import load_model

    gc.collect()

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    loaded = load_model(EngineConfig(model=name, load_format="dummy", device="cuda", dtype="bfloat16"))
    used = (torch.cuda.memory_allocated() - before) / 2**30
    w = loaded.model.model.layers[0].mlp.experts.gate_up_proj
    assert w.is_cuda and w.dtype == torch.bfloat16 and float(w.float().std()) == pytest.approx(0.02, rel=0.05)
    assert used == pytest.approx(gib, rel=0.02)
    del loaded, w
    gc.collect()
    torch.cuda.empty_cache()
