"""GGUF files of MoE architectures (Mixtral as llama.cpp's `llama` with experts, qwen3moe, qwen2moe).

No such file ships here, so tiny ones are written from transformers models with llama.cpp's
own `gguf` writer, in the layout its convert_hf_to_gguf.py produces: stacked `ffn_*_exps`
expert tensors (or, for old Mixtral files, one `ffn_gate.<j>` tensor per expert), the router
as `ffn_gate_inp`, llama's q/k rows permuted, Qwen2-MoE's shared-expert gate as a vector.
Our GGUF reader must rebuild the model whose logits equal transformers'. For qwen3moe,
transformers' own GGUF loader reading the same file is a second, independent reader.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from fleetserve.kernels import get_ops
from fleetserve.runtime.loader.gguf_loader import GGUFFile
from fleetserve.runtime.models import build_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "_test_moe_models", os.path.join(os.path.dirname(__file__), "test_moe_models.py")
)
_mm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mm)

GGUF_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k row permutation for llama-arch files."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_model, path, per_expert=False):
    c = hf_model.config
    mt = c.model_type
    arch = GGUF_ARCH[mt]
    w = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_exp = getattr(c, "num_local_experts", None) or c.num_experts
    w.add_vocab_size(c.vocab_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_expert_count(n_exp)
    w.add_expert_used_count(c.num_experts_per_tok)
    if mt != "mixtral":
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if mt == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _permute(q, c.num_attention_heads), _permute(k, c.num_key_value_heads)
        names = {
            "attn_norm": "input_layernorm.weight",
            "ffn_norm": "post_attention_layernorm.weight",
            "attn_v": "self_attn.v_proj.weight",
            "attn_output": "self_attn.o_proj.weight",
            "ffn_gate_inp": "mlp.gate.weight",
            "attn_q_norm": "self_attn.q_norm.weight",
            "attn_k_norm": "self_attn.k_norm.weight",
            "attn_q.bias": "self_attn.q_proj.bias",
            "attn_k.bias": "self_attn.k_proj.bias",
            "attn_v.bias": "self_attn.v_proj.bias",
            "ffn_gate_shexp": "mlp.shared_expert.gate_proj.weight",
            "ffn_up_shexp": "mlp.shared_expert.up_proj.weight",
            "ffn_down_shexp": "mlp.shared_expert.down_proj.weight",
        }
        w.add_tensor(b + "attn_q.weight", q)
        w.add_tensor(b + "attn_k.weight", k)
        for g, h in names.items():
            if p + h in sd:
                w.add_tensor(b + g + ("" if g.endswith(".bias") else ".weight"), sd[p + h])
        if p + "mlp.shared_expert_gate.weight" in sd:
            w.add_tensor(b + "ffn_gate_inp_shexp.weight", sd[p + "mlp.shared_expert_gate.weight"][0])
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        inter = down.shape[2]
        stacks = {"gate": gate_up[:, :inter], "up": gate_up[:, inter:], "down": down}
        for kind, arr in stacks.items():
            if per_expert:
                for j in range(n_exp):
                    w.add_tensor(f"{b}ffn_{kind}.{j}.weight", np.ascontiguousarray(arr[j]))
            else:
                w.add_tensor(f"{b}ffn_{kind}_exps.weight", np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CASES = {
    "mixtral": ("mixtral-e4-k2", False),
    "mixtral-per-expert-tensors": ("mixtral-e4-k2", True),
    "qwen3moe": ("qwen3moe-e4-k4-unnormalised", False),
    "qwen2moe": ("qwen2moe-e6-k2-shared", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_moe_logits_match_transformers(case, tmp_path):
    model_case, per_expert = CASES[case]
    hf_model = _mm.make_hf_model(model_case)
    if model_case.startswith("qwen3moe"):  # llama.cpp's qwen3moe always renormalises the top-k weights
        hf_model.config.norm_topk_prob = True
        for layer in hf_model.model.layers:
            layer.mlp.gate.norm_topk_prob = True
    path = tmp_path / "m.gguf"
    write_gguf(hf_model, path, per_expert=per_expert)
    f = GGUFFile(str(path))
    cfg = f.model_config()
    assert cfg.arch == hf_model.config.model_type and cfg.is_moe
    model = build_model(cfg, get_ops("torch"), torch.float32, "cpu")
    assert model.load_weights(f.iter_weights(cfg)) == model.weight_names()
    _mm.compare_steps(model, hf_model)


def test_transformers_reads_our_qwen3moe_gguf_the_same_way(tmp_path):
    """transformers' GGUF loader on the file written above: an independent reading of the layout.
    (transformers 5.24 does not read expert_feed_forward_length and falls back to its default
    moe_intermediate_size, 768: the model here uses that width.)"""
    pytest.importorskip("accelerate")
    cfg = transformers.Qwen3MoeConfig(
        **{
            **_mm.COMMON,
            "intermediate_size": 80,
            "moe_intermediate_size": 768,
            "num_hidden_layers": 2,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
        }
    )
    torch.manual_seed(0)
    hf_model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    write_gguf(hf_model, tmp_path / "m.gguf")
    f = GGUFFile(str(tmp_path / "m.gguf"))
    ours = build_model(f.model_config(), get_ops("torch"), torch.float32, "cpu")
    ours.load_weights(f.iter_weights(ours.config))
    _mm.compare_steps(ours, hf_model)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, hf_model(ids).logits, atol=1e-5, rtol=1e-4)
