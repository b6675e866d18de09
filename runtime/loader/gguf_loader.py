"""Reading a single GGUF file (llama.cpp's format) with the `gguf` package.

Owns the translation of llama.cpp's conventions back to Hugging Face's: metadata
keys -> ModelConfig, tensor names -> HF names, quantized blocks -> float tensors
(dequantized once, at load), and the inverse of llama.cpp's q/k row permutation
(it reorders rotary pairs to interleaved layout; our RoPE is NeoX/rotate_half).

Architectures: llama, mistral, qwen2, qwen3, gemma2, gemma3 (text), phi3, and the
mixture-of-experts ones: llama with experts (Mixtral), qwen3moe, qwen2moe (stacked
`ffn_*_exps` or old per-expert tensors, split into HF per-expert names). Where
llama.cpp's metadata has no key, its own fixed rules are followed: Gemma 2 slides
on even layers and Gemma 3 on five of every six, Gemma 3's sliding layers use RoPE
base 10000 unless `rope.freq_base_swa` says otherwise, and Gemma's attention scale
is head_dim ** -0.5 except for the 27B models (hidden / heads). llama.cpp stores
Gemma norm weights as 1 + w: they are yielded as w, Hugging Face's convention.
Phi-3's longrope factors come from its rope_factors_long/short tensors.

With packed=True, quantized matrices of the dense projections and the embedding / LM head stay
quantized: they are yielded as GGUFTensor (raw blocks, q/k rows un-permuted block-row-wise) and
repacked for the kernels by `GGUFTensor.pack()`: Q4_0, Q4_1 and Q4_K exactly into group-32 int4
codes with a scale and offset per group (models/quant.py Int4GroupWeight; the scales are rounded
to bf16), Q8_0 exactly as two 4-bit halves (Int8GroupWeight), every other quantized type (Q5_*,
Q6_K, Q2_K, Q3_K) rounded to int8 with one scale per row (Int8ChannelWeight: their per-block or
per-16 scales have no place in torch's int8 kernel).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.config import ModelConfig
from ..models.quant import Int4GroupWeight, Int8ChannelWeight, Int8GroupWeight, QuantizedTensor, WeightFormat
from .errors import ModelLoadError

_ARCHS = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
    "qwen3moe": "qwen3_moe",
    "qwen2moe": "qwen2_moe",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # -- mixture of experts (llama = Mixtral, qwen3moe, qwen2moe); *_exps are split in _expert_slices --
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# stacked [E, rows, cols] expert tensors and old per-expert ones (blk.N.ffn_gate.J.weight)
_EXPS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_HF_EXPERT_PROJ = {
    "mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
    "qwen": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
}
# Where an architecture names a layer tensor differently (Gemma's sandwich norms; Phi-3's fused gate+up).
_ARCH_LAYER_NAMES = {
    "gemma2": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"ffn_up": "mlp.gate_up_proj"},
}
_ARCH_LAYER_NAMES["gemma3"] = _ARCH_LAYER_NAMES["gemma2"]
_CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFFile:
    """An opened GGUF file: metadata as plain Python values and its tensor records."""

    def __init__(self, path: str):
        from .gguf_fast import FastGGUFReader

        self.path = path
        try:
            self.reader = FastGGUFReader(path, "r")
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
            raise ModelLoadError(
                f"unsupported GGUF architecture {arch!r} in {path} (supported: {sorted(_ARCHS)})"
            )

        def get(key, default=None):
            v = m.get(f"{arch}.{key}", default)
            if v is None:
                raise ModelLoadError(f"GGUF file {path} lacks metadata {arch}.{key}")
            return v

        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(m.get(f"{arch}.attention.key_length", hidden // heads))
        rot = m.get(f"{arch}.rope.dimension_count", head_dim)
        if rot != head_dim:
            raise ModelLoadError(
                f"partial rotary embeddings (rope dims {rot} != head_dim {head_dim}) in {path}"
            )
        if "token_embd.weight" not in self.tensors:
            raise ModelLoadError(f"GGUF file {path} has no token_embd.weight tensor")
        vocab = (
            m.get(f"{arch}.vocab_size")
            or len(m.get("tokenizer.ggml.tokens") or [])
            or int(self.tensors["token_embd.weight"].shape[1])
        )
        scaling = None
        if "rope_freqs.weight" in self.tensors:
            scaling = {"rope_type": "freq_factors", "factors": self._array("rope_freqs.weight").tolist()}
        elif "rope_factors_long.weight" in self.tensors:  # Phi-3 longrope
            orig = int(m.get(f"{arch}.rope.scaling.original_context_length") or get("context_length"))
            ctx = int(get("context_length", orig))
            attn_factor = m.get(f"{arch}.rope.scaling.attn_factor")
            if attn_factor is None:
                attn_factor = 1.0 if ctx <= orig else math.sqrt(1 + math.log(ctx / orig) / math.log(orig))
            scaling = {
                "rope_type": "longrope",
                "original_max_position_embeddings": orig,
                "attention_factor": float(attn_factor),
                "short_factor": self._array("rope_factors_short.weight").reshape(-1).tolist(),
                "long_factor": self._array("rope_factors_long.weight").reshape(-1).tolist(),
            }
        elif m.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(m[f"{arch}.rope.scaling.factor"])}
        elif m.get(f"{arch}.rope.scaling.type") not in (None, "none"):
            raise ModelLoadError(f"unsupported rope scaling {m[f'{arch}.rope.scaling.type']!r} in {path}")
        eos = [
            m[k]
            for k in (
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id",
            )
            if m.get(k) is not None
        ]
        heads_kv = get("attention.head_count_kv", heads)
        layers = int(get("block_count"))
        window = m.get(f"{arch}.attention.sliding_window")
        kw: dict[str, Any] = {}
        if arch in ("gemma2", "gemma3"):
            big = layers == (46 if arch == "gemma2" else 62)  # the 27B models scale by hidden / heads
            kw.update(
                hidden_act="gelu_pytorch_tanh",
                query_pre_attn_scalar=float(hidden // heads if big else head_dim),
                attn_logit_softcap=m.get(f"{arch}.attn_logit_softcapping"),
                final_logit_softcap=m.get(f"{arch}.final_logit_softcapping"),
            )
        if window:
            pattern = m.get(f"{arch}.attention.sliding_window_pattern")
            if isinstance(pattern, list):  # per layer: True = sliding
                slides = [bool(x) for x in pattern]
            else:
                period = {"gemma2": 2, "gemma3": 6}.get(arch, 1) if pattern is None else int(pattern)
                slides = [period == 1 or (i + 1) % period != 0 for i in range(layers)]
            if arch in ("phi3", "gemma2", "gemma3") and any(slides):
                kw.update(
                    sliding_window=int(window),
                    layer_types=tuple("sliding_attention" if x else "full_attention" for x in slides),
                )
        if arch == "gemma3":
            kw["local_rope_theta"] = float(m.get(f"{arch}.rope.freq_base_swa", 10000.0))
        return ModelConfig(
            **_moe_fields(m, arch),
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(heads_kv),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in self.tensors,
            qkv_bias="blk.0.attn_q.bias" in self.tensors or "blk.0.attn_qkv.bias" in self.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in self.tensors,
            bos_token_id=m.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            name=name or m.get("general.name"),
            **kw,
        ).validate()

    def _array(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32, in PyTorch's [rows, cols] orientation."""
        import gguf

        t = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype.name not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"unsupported GGUF tensor type {qtype.name} for {name} in {self.path} "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        try:
            arr = gguf.quants.dequantize(t.data, qtype)
            return np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        except Exception as e:  # truncated data: memmap too short, reshape fails
            raise ModelLoadError(f"corrupt GGUF file {self.path}: tensor {name!r}: {e}") from e

    def _quantized(self, name: str) -> GGUFTensor | None:
        """The tensor as raw blocks when it is a quantized matrix, else None."""
        import gguf

        t = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype.name in _FLOAT_TYPES or qtype.name not in SUPPORTED_TYPES or len(t.shape) != 2:
            return None
        rows, cols = int(t.shape[1]), int(t.shape[0])
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            raw = np.asarray(t.data).reshape(rows, cols // block * size)
        except Exception as e:  # truncated data
            raise ModelLoadError(f"corrupt GGUF file {self.path}: tensor {name!r}: {e}") from e
        return GGUFTensor(qtype.name, raw, (rows, cols))

    def iter_weights(
        self, cfg: ModelConfig, packed: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | GGUFTensor]]:
        """(HF name, float32 CPU tensor) of every weight, in Hugging Face's conventions: q/k rows
        un-permuted for llama.cpp's llama arch, Gemma norm weights back from 1 + w to w.
        packed=True: quantized matrices of the dense projections, the embedding and the LM head
        come as GGUFTensor instead (still quantized; see the module docstring)."""
        arch = self.meta.get("general.architecture")
        permute = arch in ("llama", "mistral")
        gemma = arch in ("gemma2", "gemma3")
        names = [n for n in self.tensors if n not in _CONFIG_TENSORS]
        for gname in tqdm(names, desc=f"Loading {os.path.basename(self.path)}", unit="tensor"):
            if _EXPS.match(gname) or _PER_EXPERT.match(gname):
                yield from _expert_slices(gname, self._array(gname), cfg)
                continue
            hf_name = _hf_name(gname, arch)
            if hf_name is None:
                raise ModelLoadError(f"unexpected tensor {gname!r} in GGUF file {self.path}")
            q = self._quantized(gname) if packed and _PACKABLE.match(hf_name) else None
            if q is not None:
                if permute and ".attn_q." in gname:
                    q.raw = _unpermute(q.raw, cfg.num_heads)  # whole rows: the blocks move with them
                elif permute and ".attn_k." in gname:
                    q.raw = _unpermute(q.raw, cfg.num_kv_heads)
                yield hf_name, q
                continue
            arr = self._array(gname)
            if gname.endswith("ffn_gate_inp_shexp.weight") and arr.ndim == 1:
                arr = arr[None, :]  # llama.cpp stores the shared-expert gate [1, H] as a vector
            if permute and ".attn_q." in gname:
                arr = _unpermute(arr, cfg.num_heads)
            elif permute and ".attn_k." in gname:
                arr = _unpermute(arr, cfg.num_kv_heads)
            elif gemma and hf_name.endswith("norm.weight"):
                arr = arr - 1.0
            yield hf_name, torch.from_numpy(np.array(arr, dtype=np.float32))  # own, writable copy


SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)


_FLOAT_TYPES = ("F32", "F16", "BF16")
# HF names of the matrices that may stay packed: nn.Linear / nn.Embedding weights of the dense
# model (experts, shared experts and routers are dequantized: their layers take float tensors).
_PACKABLE = re.compile(
    r"^(model\.embed_tokens|lm_head|model\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.(gate|up|down|gate_up)_proj))\.weight$"
)


class GGUFTensor(QuantizedTensor):
    """A quantized GGUF matrix [rows, cols] as its raw blocks: `raw` is [rows, bytes per row]."""

    def __init__(self, qtype: str, raw: np.ndarray, shape: tuple[int, int]):
        self.qtype, self.raw, self.shape = qtype, raw, shape

    def dequantize(self) -> torch.Tensor:
        import gguf

        arr = gguf.quants.dequantize(np.ascontiguousarray(self.raw), gguf.GGMLQuantizationType[self.qtype])
        return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(self.shape))

    def pack(self, exact_rows: bool = False) -> WeightFormat:
        if self.qtype in (
            "Q4_0",
            "Q4_1",
        ):  # d (, m): fp16, 16 bytes of nibbles; w = d q + m = d (q - 8) + (m + 8 d)
            size = 18 if self.qtype == "Q4_0" else 20
            b = _blocks(self.raw, self.shape, 32, size)
            d = torch.from_numpy(_f16(b[..., :2]))
            z = torch.zeros(d.shape) if size == 18 else torch.from_numpy(_f16(b[..., 2:4])) + 8.0 * d
            qs = torch.from_numpy(np.ascontiguousarray(b[..., size - 16 :]))
            return Int4GroupWeight.from_nibbles(qs, d, z, exact_rows=exact_rows)
        if self.qtype in _INT4_TYPES:
            codes, scales, zeros = _INT4_TYPES[self.qtype](self.raw, self.shape)
            return Int4GroupWeight.from_codes(codes, scales, zeros, 32, exact_rows=exact_rows)
        if self.qtype == "Q8_0":  # d: fp16, 32 int8 codes; w = d * q
            b = _blocks(self.raw, self.shape, 32, 34)
            q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(self.shape)
            d = torch.from_numpy(_f16(b[..., :2]))
            return Int8GroupWeight.from_codes(torch.from_numpy(q), d, 32, exact_rows=exact_rows)
        return Int8ChannelWeight.quantize(self.dequantize(), exact_rows=exact_rows)


def _blocks(raw: np.ndarray, shape: tuple[int, int], block: int, size: int) -> np.ndarray:
    return raw.reshape(shape[0], shape[1] // block, size)


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 fields (last axis 2 bytes) -> float32 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n] codes: the n low nibbles first, then the n high ones (the order
    of Q4_0 / Q4_1 blocks and of each 32-byte chunk of a Q4_K block)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _int4_q4_0(raw, shape):
    b = _blocks(raw, shape, 32, 18)  # d: fp16, 16 bytes of codes; w = d * (q - 8)
    d = _f16(b[..., :2])
    return _codes(_nibbles(b[..., 2:]), shape), torch.from_numpy(d), torch.zeros(d.shape)


def _int4_q4_1(raw, shape):
    b = _blocks(raw, shape, 32, 20)  # d, m: fp16, 16 bytes of codes; w = d * q + m = d * (q - 8) + (m + 8d)
    d, m = _f16(b[..., :2]), _f16(b[..., 2:4])
    return _codes(_nibbles(b[..., 4:]), shape), torch.from_numpy(d), torch.from_numpy(m + 8.0 * d)


def _int4_q4_k(raw, shape):
    import gguf

    # super-blocks of 256: d, dmin (fp16), 12 bytes of 6-bit sub-scales and sub-mins for its 8
    # groups of 32, 128 bytes of codes; w = d * sc * q - dmin * mn = s * (q - 8) + (8 s - dmin * mn)
    b = _blocks(raw, shape, 256, 144)
    rows, n_sb = b.shape[:2]
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
    s = d * sc.reshape(rows, n_sb, 8).astype(np.float32)
    z = 8.0 * s - dmin * mn.reshape(rows, n_sb, 8).astype(np.float32)
    codes = _nibbles(b[..., 16:].reshape(rows, n_sb, 4, 32))  # chunk j: groups 2j (low), 2j+1 (high)
    return _codes(codes, shape), torch.from_numpy(s.reshape(rows, -1)), torch.from_numpy(z.reshape(rows, -1))


def _codes(codes: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(codes).reshape(shape))


_INT4_TYPES = {"Q4_0": _int4_q4_0, "Q4_1": _int4_q4_1, "Q4_K": _int4_q4_k}


def _hf_name(gguf_name: str, arch: str | None = None) -> str | None:
    m = _BLOCK.match(gguf_name)
    if m:
        part = _ARCH_LAYER_NAMES.get(arch or "", {}).get(m.group(2)) or _LAYER_NAMES.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def _moe_fields(m: dict, arch: str) -> dict:
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
    return {
        **fields,
        "arch": _ARCHS[arch],
        "norm_topk_prob": bool(norm),
        "moe_intermediate_size": int(m[f"{arch}.expert_feed_forward_length"]),
        "shared_expert_intermediate_size": shared if arch == "qwen2moe" else 0,
    }


def _expert_slices(gname: str, arr: np.ndarray, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF per-expert (name, tensor) pairs of a stacked [E, rows, cols] (or one per-expert) GGUF tensor."""
    proj = _HF_EXPERT_PROJ["mixtral" if cfg.arch == "mixtral" else "qwen"]
    block = "block_sparse_moe" if cfg.arch == "mixtral" else "mlp"
    experts: Iterable[tuple[int, np.ndarray]]
    m = _EXPS.match(gname)
    if m is None:
        m = _PER_EXPERT.match(gname)
        if m is None:
            raise ValueError(f"{gname} is not an expert tensor")
        layer, kind, experts = m.group(1), m.group(2), [(int(m.group(3)), arr)]
    else:
        layer, kind, experts = m.group(1), m.group(2), enumerate(arr)
    for j, w in experts:
        yield (
            f"model.layers.{layer}.{block}.experts.{j}.{proj[kind]}.weight",
            torch.from_numpy(np.array(w, dtype=np.float32)),
        )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's `permute` (same as transformers' GGUF loader)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
