"""Reading a single GGUF file (llama.cpp's format) with the `gguf` package.

Owns the translation of llama.cpp's conventions back to Hugging Face's: metadata
keys -> ModelConfig, tensor names -> HF names, quantized blocks -> float tensors
(dequantized once, at load), and the inverse of llama.cpp's q/k row permutation
(it reorders rotary pairs to interleaved layout; our RoPE is NeoX/rotate_half).
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.config import ModelConfig
from .errors import ModelLoadError

_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    # -- mixture of experts (llama = Mixtral, qwen3moe, qwen2moe); *_exps are split in _expert_slices --
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# stacked [E, rows, cols] expert tensors and old per-expert ones (blk.N.ffn_gate.J.weight)
_EXPS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_HF_EXPERT_PROJ = {"mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
                   "qwen": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFFile:
    """An opened GGUF file: metadata as plain Python values and its tensor records."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path, "r")
        except Exception as e:  # bad magic, truncated header, out-of-range offsets...
            raise ModelLoadError(f"corrupt or unreadable GGUF file {path}: {e}") from e
        self.meta: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            try:
                self.meta[key] = field.contents()
            except Exception as e:
                raise ModelLoadError(f"corrupt GGUF file {path}: metadata key {key!r}: {e}") from e
        self.tensors = {t.name: t for t in self.reader.tensors}

    def model_config(self, name: str | None = None) -> ModelConfig:
        m, path = self.meta, self.path
        arch = m.get("general.architecture")
        if arch not in _ARCHS:
            raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {path} (supported: {sorted(_ARCHS)})")

        def get(key, default=None):
            v = m.get(f"{arch}.{key}", default)
            if v is None:
                raise ModelLoadError(f"GGUF file {path} lacks metadata {arch}.{key}")
            return v

        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(m.get(f"{arch}.attention.key_length", hidden // heads))
        rot = m.get(f"{arch}.rope.dimension_count", head_dim)
        if rot != head_dim:
            raise ModelLoadError(f"partial rotary embeddings (rope dims {rot} != head_dim {head_dim}) in {path}")
        if "token_embd.weight" not in self.tensors:
            raise ModelLoadError(f"GGUF file {path} has no token_embd.weight tensor")
        vocab = m.get(f"{arch}.vocab_size") or len(m.get("tokenizer.ggml.tokens") or []) \
            or int(self.tensors["token_embd.weight"].shape[1])
        scaling = None
        if "rope_freqs.weight" in self.tensors:
            scaling = {"rope_type": "freq_factors", "factors": self._array("rope_freqs.weight").tolist()}
        elif m.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(m[f"{arch}.rope.scaling.factor"])}
        elif m.get(f"{arch}.rope.scaling.type") not in (None, "none"):
            raise ModelLoadError(f"unsupported rope scaling {m[f'{arch}.rope.scaling.type']!r} in {path}")
        eos = [m[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                              "tokenizer.ggml.eom_token_id") if m.get(k) is not None]
        heads_kv = get("attention.head_count_kv", heads)
        return ModelConfig(
            **_moe_fields(m, arch, "blk.0.attn_q_norm.weight" in self.tensors),
            vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
            num_heads=heads, num_kv_heads=int(heads_kv), head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in self.tensors,
            qkv_bias="blk.0.attn_q.bias" in self.tensors,
            bos_token_id=m.get("tokenizer.ggml.bos_token_id"), eos_token_ids=tuple(dict.fromkeys(eos)),
            name=name or m.get("general.name"),
        )

    def _array(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32, in PyTorch's [rows, cols] orientation."""
        import gguf

        t = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype.name not in SUPPORTED_TYPES:
            raise ModelLoadError(f"unsupported GGUF tensor type {qtype.name} for {name} in {self.path} "
                                 f"(supported: {', '.join(SUPPORTED_TYPES)})")
        try:
            arr = gguf.quants.dequantize(t.data, qtype)
            return np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        except Exception as e:  # truncated data: memmap too short, reshape fails
            raise ModelLoadError(f"corrupt GGUF file {self.path}: tensor {name!r}: {e}") from e

    def iter_weights(self, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 CPU tensor) of every weight, q/k rows un-permuted for llama.cpp's llama arch."""
        permute = self.meta.get("general.architecture") in ("llama", "mistral")
        names = [n for n in self.tensors if n != "rope_freqs.weight"]
        for gname in tqdm(names, desc=f"Loading {os.path.basename(self.path)}", unit="tensor"):
            if _EXPS.match(gname) or _PER_EXPERT.match(gname):
                yield from _expert_slices(gname, self._array(gname), cfg)
                continue
            hf_name = _hf_name(gname)
            if hf_name is None:
                raise ModelLoadError(f"unexpected tensor {gname!r} in GGUF file {self.path}")
            arr = self._array(gname)
            if gname.endswith("ffn_gate_inp_shexp.weight") and arr.ndim == 1:
                arr = arr[None, :]  # llama.cpp stores the shared-expert gate [1, H] as a vector
            if permute and ".attn_q." in gname:
                arr = _unpermute(arr, cfg.num_heads)
            elif permute and ".attn_k." in gname:
                arr = _unpermute(arr, cfg.num_kv_heads)
            yield hf_name, torch.from_numpy(np.array(arr, dtype=np.float32))  # own, writable copy


SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _hf_name(gguf_name: str) -> str | None:
    m = _BLOCK.match(gguf_name)
    if m:
        part = _LAYER_NAMES.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def _moe_fields(m: dict, arch: str, qk_norm: bool) -> dict:
    """arch (llama with experts = Mixtral) and the MoE fields of ModelConfig from GGUF metadata."""
    experts = int(m.get(f"{arch}.expert_count") or 0)
    if not experts:
        return {"arch": _ARCHS[arch]}
    fields = dict(num_experts=experts, num_experts_per_tok=int(m[f"{arch}.expert_used_count"]))
    if arch in ("llama", "mistral"):
        return {**fields, "arch": "mixtral", "moe_intermediate_size": int(m[f"{arch}.feed_forward_length"])}
    shared = int(m.get(f"{arch}.expert_shared_feed_forward_length") or 0)
    # llama.cpp renormalises qwen3moe's top-k weights and not qwen2moe's unless the file says
    norm = m.get(f"{arch}.expert_weights_norm", arch == "qwen3moe")
    return {**fields, "arch": _ARCHS[arch], "qk_norm": qk_norm, "norm_topk_prob": bool(norm),
            "moe_intermediate_size": int(m[f"{arch}.expert_feed_forward_length"]),
            "shared_expert_intermediate_size": shared if arch == "qwen2moe" else 0}


def _expert_slices(gname: str, arr: np.ndarray, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF per-expert (name, tensor) pairs of a stacked [E, rows, cols] (or one per-expert) GGUF tensor."""
    proj = _HF_EXPERT_PROJ["mixtral" if cfg.arch == "mixtral" else "qwen"]
    block = "block_sparse_moe" if cfg.arch == "mixtral" else "mlp"
    m = _EXPS.match(gname)
    if m is None:
        m = _PER_EXPERT.match(gname)
        layer, kind, experts = m.group(1), m.group(2), [(int(m.group(3)), arr)]
    else:
        layer, kind, experts = m.group(1), m.group(2), enumerate(arr)
    for j, w in experts:
        yield (f"model.layers.{layer}.{block}.experts.{j}.{proj[kind]}.weight",
               torch.from_numpy(np.array(w, dtype=np.float32)))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's `permute` (same as transformers' GGUF loader)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
