"""MoE models in the engine on CPU: greedy outputs equal transformers token for token (float32),
alone, batched, with preemption forced (steps synchronous or pipelined) and with chunked prefill.

Same method as test_engine.py: tiny random checkpoints (save_pretrained, one tensor per
expert as on the Hub) loaded through our safetensors loader, a large init std so logits
are peaked. The routers are random too, so tokens spread over all experts and batches
mix tokens of different sequences in one expert's rows.
"""

from __future__ import annotations

import pytest
import torch

from fleetserve.runtime import LLM, SamplingParams

from .test_engine import hf_greedy

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=256,
    max_position_embeddings=256,
    initializer_range=0.3,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    "mixtral-e8-k2-gqa4": (
        "MixtralConfig",
        dict(
            hidden_size=128,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3moe-e16-k4-gqa2-dense-layer": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=96,
            intermediate_size=128,
            moe_intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            tie_word_embeddings=True,
        ),
    ),
    "qwen2moe-e6-k2-shared": (
        "Qwen2MoeConfig",
        dict(
            hidden_size=96,
            intermediate_size=128,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
    ),
}

PROMPTS = [
    [5, 17, 33, 2, 9],
    list(range(40, 77)),
    [101],
    [7, 7, 7, 7, 8, 200, 11, 3, 19, 42, 60, 61, 62, 63, 64, 65, 66],
]
NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def build_hf(cfg_name, kw, path):
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**COMMON, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    if cfg_name == "Qwen2MoeConfig":  # random q/k/v biases so they matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    cfg_name, kw = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = build_hf(cfg_name, kw, path)
    refs = [hf_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    return path, refs


def prompts(ps):
    return [{"prompt_token_ids": p} for p in ps]


@pytest.mark.parametrize(
    "setting", ["batched", "alone", "preemption", "preemption-async-scheduling", "chunked-prefill"]
)
def test_greedy_matches_transformers(tiny, setting):
    path, refs = tiny
    kw = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)
    if setting.startswith("preemption"):
        kw["num_kv_blocks"] = 22  # 4 sequences of up to 61 tokens cannot all fit
        kw["async_scheduling"] = setting.endswith("async-scheduling")
    if setting == "chunked-prefill":
        kw["max_num_batched_tokens"] = 8
    llm = LLM(model=str(path), **kw)
    if setting == "alone":
        outs = [llm.generate(prompts([p]), GREEDY)[0] for p in PROMPTS]
    else:
        outs = llm.generate(prompts(PROMPTS), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs
    if setting.startswith("preemption"):
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.scheduler.kv.num_free_blocks == llm.engine.num_kv_blocks


def test_triton_fused_moe_in_the_engine(tiny):
    """The Triton kernels (interpreter on CPU: slow, so 8 tokens) in the engine, batched."""
    path, refs = tiny
    llm = LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        block_size=4,
        num_kv_blocks=64,
        attention_backend="triton",
    )
    outs = llm.generate(prompts(PROMPTS), GREEDY.clone(max_tokens=8))
    assert [o.outputs[0].token_ids for o in outs] == [r[:8] for r in refs]


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async-scheduling"])
def test_tensor_parallel_greedy_matches_transformers(tiny, request, pipelined):
    """TP=2 (gloo, one worker process): each rank reads its slice of every per-expert tensor of the
    on-disk checkpoint; the same tokens as transformers, batched with preemption forced."""
    path, refs = tiny
    if "qwen2moe" in request.node.callspec.id:
        pytest.skip("3 KV heads do not split over 2 ranks (its shared expert: test_tensor_parallel.py)")
    with LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        block_size=4,
        num_kv_blocks=22,
        tensor_parallel_size=2,
        async_scheduling=pipelined,
    ) as llm:
        outs = llm.generate(prompts(PROMPTS), GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == refs
        assert llm.engine.scheduler.num_preemptions > 0
