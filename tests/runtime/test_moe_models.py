"""Mixtral / Qwen3-MoE / Qwen2-MoE vs transformers' own modeling classes, float32, tiny random configs.

Logits of prefill, chunked prefill and decode through the paged KV cache (the
PagedRunner of test_models.py) with the torch reference and with the Triton fused-MoE
kernel (the interpreter on CPU); weights from transformers' in-memory state dict
(stacked experts) and from a saved checkpoint (one tensor per expert, loaded through
our safetensors loader). Config parsing, presets and loader errors.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from fleetserve.kernels import get_ops
from fleetserve.runtime.models import PRESETS, ModelConfig, UnsupportedModelError, build_model

transformers = pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "_test_models", os.path.join(os.path.dirname(__file__), "test_models.py")
)
_tm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tm)  # PagedRunner, hf_logits (tests modules are not importable by name)
PagedRunner, hf_logits = _tm.PagedRunner, _tm.hf_logits

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
CASES = {
    # 4 experts top-2, GQA 2:1, untied
    "mixtral-e4-k2": (
        "MixtralConfig",
        dict(intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    ),
    # every layer sliding over 4 tokens (shorter than both prompts): the dense side's windowed attention
    "mixtral-e4-k2-sliding": (
        "MixtralConfig",
        dict(
            intermediate_size=48,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
        ),
    ),
    # 8 experts top-3 renormalised, q/k norm, a dense layer in the middle, tied embeddings
    "qwen3moe-e8-k3-dense-layer-tied": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=80,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            tie_word_embeddings=True,
        ),
    ),
    # top-k = number of experts, no renormalisation
    "qwen3moe-e4-k4-unnormalised": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=80,
            moe_intermediate_size=24,
            num_hidden_layers=2,
            num_experts=4,
            num_experts_per_tok=4,
            norm_topk_prob=False,
        ),
    ),
    # shared expert with a sigmoid gate, q/k/v biases
    "qwen2moe-e6-k2-shared": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=80,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=40,
            num_hidden_layers=2,
            num_experts=6,
            num_experts_per_tok=2,
        ),
    ),
}


def make_hf_model(case, seed=0):
    cfg_name, kw = CASES[case]
    cfg = getattr(transformers, cfg_name)(**COMMON, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # perturb everything (norms, biases, routers) so no weight is trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def hf(request):
    return request.param, make_hf_model(request.param)


def ours_from_state_dict(hf_model, backend):
    cfg = ModelConfig.from_hf_config(hf_model.config.to_dict())
    model = build_model(cfg, get_ops(backend), torch.float32, "cpu")
    assert model.load_weights(hf_model.state_dict().items()) == model.weight_names()
    return model


def compare_steps(ours, hf_model, atol=2e-5):
    g = torch.Generator().manual_seed(1)
    seqs = {
        0: torch.randint(0, 97, (7,), generator=g).tolist(),
        1: torch.randint(0, 97, (13,), generator=g).tolist(),
    }
    runner = PagedRunner(ours)
    with torch.no_grad():
        out = runner.step({0: seqs[0], 1: seqs[1][:6]})
        torch.testing.assert_close(out[:7], hf_logits(hf_model, seqs[0]), atol=atol, rtol=1e-4)
        torch.testing.assert_close(out[7:], hf_logits(hf_model, seqs[1][:6]), atol=atol, rtol=1e-4)
        nxt = out[6].argmax().item()
        out = runner.step({0: [nxt], 1: seqs[1][6:]})  # a decode next to the rest of a chunked prompt
        seqs[0].append(nxt)
        torch.testing.assert_close(out[0], hf_logits(hf_model, seqs[0])[-1], atol=atol, rtol=1e-4)
        torch.testing.assert_close(out[1:], hf_logits(hf_model, seqs[1])[6:], atol=atol, rtol=1e-4)
        for _ in range(3):
            step = {0: [out[0].argmax().item()], 1: [out[-1].argmax().item()]}
            for sid, t in step.items():
                seqs[sid] += t
            out = runner.step(step)
            for i, sid in enumerate(seqs):
                torch.testing.assert_close(out[i], hf_logits(hf_model, seqs[sid])[-1], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_match_transformers(hf, backend):
    _, hf_model = hf
    compare_steps(ours_from_state_dict(hf_model, backend), hf_model)


def test_checkpoint_with_per_expert_tensors_loads(hf, tmp_path):
    from safetensors import safe_open

    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.loader import load_model

    case, hf_model = hf
    hf_model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    expert = (
        "block_sparse_moe.experts.3.w1.weight"
        if case.startswith("mixtral")
        else "mlp.experts.3.gate_proj.weight"
    )
    assert f"model.layers.0.{expert}" in names  # what checkpoints on the Hub hold
    loaded = load_model(
        EngineConfig(model=str(tmp_path), device="cpu", dtype="float32"), "cpu", torch.float32
    )
    assert type(loaded.model).__name__ == type(hf_model).__name__
    compare_steps(loaded.model, hf_model)


def test_missing_or_extra_expert_is_a_load_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.loader import ModelLoadError, load_model

    hf_model = make_hf_model("mixtral-e4-k2")
    hf_model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    w = tensors.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight")
    save_file(tensors, path, metadata={"format": "pt"})
    cfg = EngineConfig(model=str(tmp_path), device="cpu", dtype="float32")
    with pytest.raises(
        ModelLoadError, match=r"missing weights: model\.layers\.1\.mlp\.experts\.gate_up_proj"
    ):
        load_model(cfg, "cpu", torch.float32)
    tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"] = w
    tensors["model.layers.1.block_sparse_moe.experts.4.w3.weight"] = w.clone()  # the config has 4 experts
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="expert 4 out of range"):
        load_model(cfg, "cpu", torch.float32)


def test_config_parsing():
    # a Qwen3-30B-A3B-style config.json (transformers 4.x keys)
    qwen = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
    }
    cfg = ModelConfig.from_hf_config(qwen)
    assert (cfg.arch, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (
        "qwen3_moe",
        128,
        8,
        768,
    )
    assert cfg.qk_norm and cfg.norm_topk_prob and not cfg.qkv_bias and cfg.dense_layers == ()
    assert cfg.num_params() == PRESETS["qwen3-30b-a3b"].num_params()
    sparse = ModelConfig.from_hf_config(
        {**qwen, "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    )
    assert sparse.dense_layers == (0, 2, 3, 4)
    with pytest.raises(UnsupportedModelError, match="sliding"):
        ModelConfig.from_hf_config({**qwen, "use_sliding_window": True})
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok"):
        build_model(
            ModelConfig.from_hf_config({**qwen, "num_hidden_layers": 1, "num_experts_per_tok": 200}),
            get_ops("torch"),
            device="meta",
        )
    mixtral = {
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rope_theta": 1e6,
        "max_position_embeddings": 32768,
        "sliding_window": None,
    }
    cfg = ModelConfig.from_hf_config(mixtral)
    assert (cfg.arch, cfg.num_experts, cfg.moe_intermediate_size, cfg.norm_topk_prob) == (
        "mixtral",
        8,
        14336,
        True,
    )
    assert cfg.num_params() == PRESETS["mixtral-8x7b"].num_params()


def test_moe_families_are_registered_on_the_shared_blocks():
    from fleetserve.runtime.models import FAMILIES, supported_architectures
    from fleetserve.runtime.models.layers import Attention, CausalLM

    for name, arch in [
        ("mixtral", "MixtralForCausalLM"),
        ("qwen3_moe", "Qwen3MoeForCausalLM"),
        ("qwen2_moe", "Qwen2MoeForCausalLM"),
    ]:
        assert FAMILIES[name].model_cls.__name__ == arch and issubclass(FAMILIES[name].model_cls, CausalLM)
        assert arch in supported_architectures()
    # Qwen3-MoE's q/k norms are the dense Qwen3 attention's (one implementation)
    model = build_model(
        PRESETS["qwen3-30b-a3b"].with_(num_layers=1), get_ops("torch"), torch.bfloat16, "meta"
    )
    attn = model.model.layers[0].self_attn
    assert type(attn) is Attention and attn.q_norm is not None and attn.k_norm is not None
    cfg = ModelConfig.from_hf_config(
        {
            "architectures": ["MixtralForCausalLM"],
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 4,
        }
    )
    assert cfg.layer_window(0) == cfg.layer_window(1) == 4


@pytest.mark.parametrize(
    "name,total,active", [("mixtral-8x7b", 46.70e9, 12.88e9), ("qwen3-30b-a3b", 30.53e9, 3.35e9)]
)
def test_moe_presets_have_real_sizes(name, total, active):
    assert PRESETS[name].num_params() == pytest.approx(total, rel=0.005)
    assert PRESETS[name].num_active_params() == pytest.approx(active, rel=0.005)


def test_preset_builds_on_meta_with_stacked_experts():
    model = build_model(PRESETS["mixtral-8x7b"], get_ops("torch"), torch.bfloat16, "meta")
    w = model.model.layers[0].mlp.experts.gate_up_proj
    assert w.shape == (8, 2 * 14336, 4096) and w.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == PRESETS["mixtral-8x7b"].num_params()


def test_num_params_matches_transformers(hf):
    _, hf_model = hf
    cfg = ModelConfig.from_hf_config(json.loads(hf_model.config.to_json_string()))
    assert cfg.num_params() == sum(p.numel() for p in hf_model.parameters())
