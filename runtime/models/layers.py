"""Shared building blocks of the decoder models: RoPE tables, RMSNorm, attention over the
paged KV cache, the gated dense MLP, the pre-norm decoder layer and the `CausalLM` skeleton
every family file (llama.py, qwen3.py, gemma2.py, ...) specialises.

A family changes only what differs: its layer class, its norm flavour, its embedding
scale, how checkpoint tensors map onto our parameters. Everything here owns parameters
(fused `qkv_proj` [q | k | v] rows, fused `gate_up_proj` [gate | up] rows) and float32
RoPE tables, and no state between steps: the paged KV cache tensors and a step's
AttentionMetadata come from the model runner. All math goes through a `KernelOps` set,
so the same code runs the torch references (CPU) and the Triton kernels (GPU).

Forward passes have no host syncs and no per-token Python loops, so they can be captured
in a CUDA graph; per-layer options (sliding window, soft-cap, scale) are Python numbers
fixed at build time. Tokens of all sequences of a step are packed: [T, ...].
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fleetserve.kernels import KernelOps

from ..attention import AttentionMetadata
from .config import ModelConfig
from .quant import PackedEmbedding, PackedLinear, QuantizedTensor, WeightFormat, concat_rows, head_linear


# ---------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig, device=None, *, local: bool = False, long: bool = False) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim/2] as in HF: linear, llama3, longrope (short factors,
    or long ones with long=True) or GGUF freq-factor scaling. local=True: the sliding layers'
    table when the config gives them their own base (Gemma 3): plain RoPE at local_rope_theta."""
    d = cfg.head_dim
    theta, s = cfg.rope_theta, cfg.rope_scaling
    if local and cfg.local_rope_theta is not None:
        theta, s = cfg.local_rope_theta, None
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    if s["rope_type"] == "freq_factors":  # llama.cpp stores llama3 scaling as per-pair divisors (rope_freqs)
        return inv_freq / torch.tensor(s["factors"], dtype=torch.float32, device=device)
    if s["rope_type"] == "longrope":
        factors = s["long_factor"] if long else s["short_factor"]
        return inv_freq / torch.tensor(factors, dtype=torch.float32, device=device)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin_cache(cfg: ModelConfig, device=None, *, local: bool = False) -> torch.Tensor:
    """[max_position_embeddings, head_dim] float32 rows of [cos | sin]; kept float32 whatever the model dtype.

    longrope: positions below original_max_position_embeddings use the short factors, later ones
    the long factors (chosen per position, as vLLM does, so a token's rotation never depends on how
    long its sequence has grown; transformers instead switches every position of a forward pass to
    the long factors once the sequence passes that length). Both are scaled by attention_factor."""
    t = torch.arange(cfg.max_position_embeddings, device=device, dtype=torch.float32)
    freqs = torch.outer(t, rope_inv_freq(cfg, device, local=local))
    s = None if (local and cfg.local_rope_theta is not None) else cfg.rope_scaling
    mscale = 1.0
    if s is not None and s["rope_type"] == "longrope":
        orig = s["original_max_position_embeddings"]
        if cfg.max_position_embeddings > orig:
            freqs[orig:] = torch.outer(t[orig:], rope_inv_freq(cfg, device, long=True))
        mscale = s["attention_factor"]
    return torch.cat((freqs.cos() * mscale, freqs.sin() * mscale), dim=-1)


def _rope_table(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """The RoPE table on the default device; under build_model's meta device only its shape (meta
    arange/outer run through torch's Python references, whose first call imports torch._dynamo:
    ~1 s at start-up), which reset_rope_cache fills once the model is on its device."""
    if torch.empty(0).device.type == "meta":
        return torch.empty(cfg.max_position_embeddings, cfg.head_dim, dtype=torch.float32)
    return rope_cos_sin_cache(cfg, local=local)


# ---------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """y = weight * x / rms(x), optionally fused with the residual add before it. Gemma's (1 + w)
    norms use this class too: their loader stores 1 + w in `weight`."""

    def __init__(self, dim: int, eps: float, ops: KernelOps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x, residual=None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """Fused qkv projection (optional biases), optional per-head q/k RMSNorm, RoPE, paged KV cache
    write + attention (this layer's sliding window and soft-cap), o projection."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, layer: int):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.attn_scale
        self.sliding_window = cfg.layer_window(layer)
        self.softcap = cfg.attn_logit_softcap
        sliding = bool(cfg.layer_types) and cfg.layer_types[layer] == "sliding_attention"
        self.rope_index = 1 if sliding and cfg.local_rope_theta is not None else 0
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm: RMSNorm | None
        self.k_norm: RMSNorm | None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, positions, x, attn: AttentionMetadata, kv_cache, rope_tables):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.rotary_embedding(positions, q, k, rope_tables[self.rope_index])
        self.ops.write_kv_cache(k, v, kv_cache, attn.slot_mapping)
        o = self.ops.paged_attention(
            q,
            kv_cache,
            attn.query_start_loc,
            attn.seq_lens,
            attn.block_tables,
            attn.max_query_len,
            attn.max_seq_len,
            self.scale,
            self.sliding_window,
            self.softcap,
        )
        return self.o_proj(o.reshape(T, self.q_size))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused; act = SiLU or GELU (tanh approximation)."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.ops = ops
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        h = self.gate_up_proj(x)
        return self.down_proj(self.ops.gelu_tanh_and_mul(h) if self.gelu else self.ops.silu_and_mul(h))


class DecoderLayer(nn.Module):
    """Pre-norm layer: x + attn(norm(x)), then + mlp(norm(.)) (Llama, Qwen, Mistral, Phi-3)."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, ops, layer)
        self.mlp: nn.Module = GatedMLP(cfg, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, positions, x, residual, attn, kv_cache, rope_tables):
        # The residual add is fused into the norms: each returns (normed, running sum).
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, attn, kv_cache, rope_tables)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, layer_cls):
        super().__init__()
        # _weight: skip nn.Embedding's random init, which on the meta device imports torch._dynamo
        # (seconds per process: every tensor-parallel worker paid it); weights are filled later anyway.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(layer_cls(cfg, ops, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


# HF per-projection weights -> (our fused parameter, shard index). Shard order = layout order.
FUSED_SHARDS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class CausalLM(nn.Module):
    """Embedding -> decoder layers -> final norm -> (tied) LM head; the surface the runner uses.

    Family hooks: `layer_cls`, `embed()` (Gemma scales it), `transform_weight()` (a checkpoint
    tensor -> our value, e.g. Gemma's 1 + w norms). `cos_sin_cache` (and, for families with a
    separate sliding-layer base, `cos_sin_cache_local`) are float32 buffers.
    """

    layer_cls: type[nn.Module] = DecoderLayer
    cpu_fast_forward: bool = True
    """With the "cpu" op set, plain float32 layers run runtime/models/cpu_forward.py (the same
    values in fewer ops); False: every layer runs its module forward (tests compare the two)."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.config = cfg
        self.ops = ops
        self._cpu_plans: list | None = None  # cpu_forward's per-layer plans; None = (re)build
        self.model = Backbone(cfg, ops, self.layer_cls)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        # Tensor parallelism (runtime/parallel.py) sets this: the LM head then holds a slice of the
        # vocabulary and this gathers the logits on rank 0 (None on the other ranks).
        self.gather_logits: Callable[[torch.Tensor], torch.Tensor | None] | None = None
        self.register_buffer("cos_sin_cache", _rope_table(cfg), persistent=False)
        if cfg.local_rope_theta is not None:
            self.register_buffer("cos_sin_cache_local", _rope_table(cfg, local=True), persistent=False)

    def _rope_buffers(self) -> list[str]:
        return ["cos_sin_cache"] + (
            ["cos_sin_cache_local"] if self.config.local_rope_theta is not None else []
        )

    def rope_tables(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self._rope_buffers())

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: one [2, N, block_size, Hkv, D] per layer -> hidden [T, H]."""
        x, residual = self.embed(input_ids), None
        rope = self.rope_tables()
        if (
            self.ops.name == "cpu"
            and self.cpu_fast_forward
            and x.dtype == torch.float32
            and x.device.type == "cpu"
        ):
            from .cpu_forward import run_layers

            x, residual = run_layers(self, positions, x, attn, kv_caches, rope)
        else:
            for layer, kv_cache in zip(self.model.layers, kv_caches):
                x, residual = layer(positions, x, residual, attn, kv_cache, rope)
        x, _ = self.model.norm(x, residual)
        return x

    def cpu_layer_plans(self) -> list:
        """cpu_forward's plan of each layer (None: the layer runs its module forward), built on
        first use and again after load_weights or a move (they may replace modules or tensors)."""
        if self._cpu_plans is None:
            from .cpu_forward import layer_plan

            self._cpu_plans = [layer_plan(layer) for layer in self.model.layers]
        return self._cpu_plans

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (only the rows to sample) -> float32 logits [N, V] (soft-capped if configured);
        with tensor parallelism None on every rank but 0."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        logits = head_linear(head, hidden)
        if self.gather_logits is not None:
            gathered = self.gather_logits(logits)
            if gathered is None:
                return None  # type: ignore[return-value]
            logits = gathered
        logits = logits.float()
        cap = self.config.final_logit_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half() must not round the RoPE tables: rebuild them in float32 where they landed.
        super()._apply(fn, recurse)
        self._cpu_plans = None
        for name in self._rope_buffers():
            cache = getattr(self, name)
            if cache.dtype != torch.float32 and cache.device.type != "meta":
                setattr(
                    self, name, rope_cos_sin_cache(self.config, cache.device, local=name.endswith("_local"))
                )
        return self

    def reset_rope_cache(self) -> None:
        """Recompute the RoPE tables in place (after `to_empty`, which leaves buffers uninitialised)."""
        for name in self._rope_buffers():
            setattr(
                self,
                name,
                rope_cos_sin_cache(self.config, getattr(self, name).device, local=name.endswith("_local")),
            )

    def weight_names(self) -> set[str]:
        """The parameter names load_weights must fill."""
        return {n for n, _ in self.named_parameters()}

    def checkpoint_name(self, name: str) -> str | None:
        """A checkpoint tensor name -> the HF causal-LM name load_weights maps; None = not ours (skip)."""
        return name

    def transform_weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor (HF name) -> the value our parameter stores. Identity here."""
        return tensor

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face-named tensors into our (fused) parameters.

        Returns the names of parameters that were completely filled (a fused one only when
        all its shards came); raises KeyError on a name this model has no place for.
        Checkpoints that store qkv_proj / gate_up_proj already fused (Phi-3) load as is.
        A QuantizedTensor (a loader's packed weight) for an nn.Linear or nn.Embedding replaces that
        module by a PackedLinear / PackedEmbedding once all its shards came (models/quant.py);
        anywhere else it is dequantized and copied like a float tensor.
        """
        self._cpu_plans = None
        params = dict(self.named_parameters())
        cfg = self.config
        # Sizes from the built modules: tensor parallelism shrinks them to one rank's share.
        attn = getattr(self.model.layers[0], "self_attn", None)
        q, kv = (cfg.q_size, cfg.kv_size) if attn is None else (int(attn.q_size), int(attn.kv_size))
        mlps = [m for layer in self.model.layers if isinstance(m := getattr(layer, "mlp", None), GatedMLP)]
        inter = mlps[0].gate_up_proj.out_features // 2 if mlps else cfg.intermediate_size
        sizes_of = {"qkv_proj": [q, kv, kv], "gate_up_proj": [inter] * 2}
        shards_seen: dict[str, set[int]] = {}
        loaded: set[str] = set()
        packed: dict[str, dict[int, WeightFormat]] = {}  # fused module path -> its packed shards so far
        for stored_name, tensor in weights:
            name = self.checkpoint_name(stored_name)
            if name is None or "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints sometimes store a copy of the embedding
            if isinstance(tensor, QuantizedTensor):
                done = self._load_packed(name, tensor, packed, sizes_of)
                if done is not None:
                    loaded.update(done)
                    continue
                tensor = tensor.dequantize()
            tensor = self.transform_weight(name, tensor)
            parts = name.split(".")
            fused = FUSED_SHARDS.get(parts[-2]) if len(parts) >= 2 else None
            if fused is None:
                if name not in params:
                    raise KeyError(f"unexpected weight {name!r}")
                _copy(params[name], tensor, name)
                loaded.add(name)
                continue
            target, shard = fused
            pname = ".".join(parts[:-2] + [target, parts[-1]])
            if pname not in params:
                raise KeyError(f"unexpected weight {name!r}")
            sizes = sizes_of[target]
            _copy(params[pname].narrow(0, sum(sizes[:shard]), sizes[shard]), tensor, name)
            seen = shards_seen.setdefault(pname, set())
            seen.add(shard)
            if len(seen) == len(sizes):
                loaded.add(pname)
        for path, shards in packed.items():  # fused modules whose other shards came as floats
            pname, sizes = f"{path}.weight", sizes_of[path.rpartition(".")[2]]
            for shard, fmt in shards.items():
                _copy(params[pname].narrow(0, sum(sizes[:shard]), sizes[shard]), fmt.dequantize(), pname)
                shards_seen.setdefault(pname, set()).add(shard)
            if len(shards_seen[pname]) == len(sizes):
                loaded.add(pname)
        return loaded

    def _load_packed(
        self, name: str, tensor: QuantizedTensor, pending: dict[str, dict[int, WeightFormat]], sizes_of: dict
    ) -> set[str] | None:
        """Put a quantized weight in place as a packed module: the names of the parameters it
        completed (empty while a fused module still waits for shards), or None when its target is
        not an nn.Linear / nn.Embedding (the caller dequantizes it)."""
        parts = name.split(".")
        if len(parts) < 2 or parts[-1] != "weight":
            return None
        fused = FUSED_SHARDS.get(parts[-2])
        path = ".".join(parts[:-2] + [fused[0]]) if fused else ".".join(parts[:-1])
        try:
            module = self.get_submodule(path)
        except AttributeError:
            raise KeyError(f"unexpected weight {name!r}") from None
        # exactly these classes (a subclass may use its weight differently); isinstance narrows for mypy
        if type(module) not in (nn.Linear, nn.Embedding) or not isinstance(module, (nn.Linear, nn.Embedding)):
            return None
        shape = tuple(module.weight.shape)
        expected = shape if fused is None else (sizes_of[fused[0]][fused[1]], shape[1])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        if fused is None:
            # the embedding and LM head keep their exact rows (lookups, the head's refined top logits)
            shards = {0: tensor.pack(exact_rows=isinstance(module, nn.Embedding) or path == "lm_head")}
        else:
            shards = pending.setdefault(path, {})
            shards[fused[1]] = tensor.pack()
            if len(shards) < len(sizes_of[fused[0]]):
                return set()
            del pending[path]
        fmt = concat_rows([shards[i] for i in sorted(shards)])
        parent, _, leaf = path.rpartition(".")
        if isinstance(module, nn.Embedding):
            new: nn.Module = PackedEmbedding(fmt, module.weight.dtype)
        else:
            new = PackedLinear(fmt, module.bias)
        setattr(self.get_submodule(parent) if parent else self, leaf, new)
        return {f"{path}.weight"}


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")  # fmt: skip


@contextlib.contextmanager
def _no_param_init():
    """Modules' reset_parameters() become no-ops (as transformers' no_init_weights does). On meta
    tensors torch runs init ops through its Python references, whose first call imports
    torch._dynamo, sympy and triton: ~900 modules, ~1 s and ~85 MiB at start-up (measured
    2026-12-01, CPU torch 2.13), for values that load_weights overwrites anyway."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(
    model_config: ModelConfig,
    ops: KernelOps,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    model_cls: type | None = None,
    tp=None,
) -> CausalLM:
    """An uninitialised model of the config's family (weights empty) in `dtype` on `device`; fill it
    with load_weights or runtime.loader's dummy initialiser. The RoPE tables are ready, in float32.
    tp: a runtime.parallel.ParallelContext: only that rank's share is allocated."""
    from .registry import family

    model_config.validate()
    cls = model_cls or family(model_config.arch).model_cls
    # meta: no host allocation or init kernels for weights about to be overwritten
    with torch.device("meta"), _no_param_init():
        model = cls(model_config, ops).to(dtype)
        if tp is not None:
            from ..parallel import apply_tensor_parallel

            apply_tensor_parallel(model, tp)
    # = to_empty(device), without its empty_like of meta tensors, whose Python reference imports
    # torch._dynamo and sympy (seconds in every process: each tensor-parallel worker paid it).
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.reset_rope_cache()
    return model.eval().requires_grad_(False)
