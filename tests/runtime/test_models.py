"""Every model family vs transformers' own modeling classes, float32, tiny random configs.

Covers prefill, chunked prefill and decode through the paged KV cache (shuffled
block tables), GQA ratios 1/2/4, head dims 32/64, tied and untied embeddings,
llama3 rope scaling, Qwen2 q/k/v biases, Mistral, and the newer families with every
feature on: Qwen3 q/k norms; Gemma 2 soft-caps, query_pre_attn_scalar, sandwich norms
and alternating sliding/global layers; Gemma 3 q/k norms, local/global RoPE bases and
linear scaling on global layers; Phi-3 fused checkpoint tensors and longrope; sliding
windows (5-6 tokens) shorter than the prompts (up to 19 tokens) wherever a family has them.
"""

from __future__ import annotations

import math

import pytest
import torch

from fleetserve.kernels import get_ops
from fleetserve.runtime.attention import AttentionMetadata
from fleetserve.runtime.models import PRESETS, ModelConfig, UnsupportedModelError, build_model
from fleetserve.runtime.models.layers import rope_inv_freq

transformers = pytest.importorskip("transformers")

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.1 * i for i in range(16)],
    "long_factor": [2.0 + 0.5 * i for i in range(16)],
    "original_max_position_embeddings": 64,
}
GEMMA2 = dict(
    sliding_window=5, query_pre_attn_scalar=20, attn_logit_softcapping=4.0, final_logit_softcapping=2.5
)
GEMMA3 = dict(
    sliding_window=6,
    query_pre_attn_scalar=40,
    num_hidden_layers=3,
    sliding_window_pattern=3,
    rope_local_base_freq=100.0,
)

CASES = {
    # id: (HF class name, head_dim, heads, kv_heads, tied, rope scaling[, extra config keys])
    "llama-mha-d32-untied": ("LlamaForCausalLM", 32, 4, 4, False, None),
    "llama-gqa2-d64-tied-llama3": ("LlamaForCausalLM", 64, 4, 2, True, LLAMA3),
    "qwen2-gqa4-d32-bias": ("Qwen2ForCausalLM", 32, 8, 2, False, None),
    "qwen2-gqa2-d32-sliding": (
        "Qwen2ForCausalLM",
        32,
        4,
        2,
        True,
        None,
        dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
    "mistral-gqa2-d64-tied": ("MistralForCausalLM", 64, 4, 2, True, None),
    "mistral-gqa2-d32-sliding": ("MistralForCausalLM", 32, 4, 2, False, None, dict(sliding_window=5)),
    "qwen3-gqa2-d32-tied": ("Qwen3ForCausalLM", 32, 4, 2, True, None),
    "qwen3-gqa4-d64-untied-sliding": (
        "Qwen3ForCausalLM",
        64,
        8,
        2,
        False,
        None,
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
    "gemma2-gqa2-d32-softcap-sliding": ("Gemma2ForCausalLM", 32, 4, 2, True, None, GEMMA2),
    "gemma3-gqa2-d32-sliding-local-rope": (
        "Gemma3ForCausalLM",
        32,
        4,
        2,
        True,
        {"rope_type": "linear", "factor": 4.0},
        GEMMA3,
    ),
    # Phi-3 sizes RoPE factors by hidden_size // heads: keep head_dim equal to it
    "phi3-gqa2-d32-longrope-sliding": (
        "Phi3ForCausalLM",
        32,
        4,
        2,
        False,
        LONGROPE,
        dict(
            sliding_window=5,
            hidden_size=128,
            pad_token_id=0,
            eos_token_id=2,
            original_max_position_embeddings=64,
        ),
    ),
}


def make_hf_model(cls_name, head_dim, heads, kv_heads, tied, rope_scaling, extra=None, seed=0):
    cls = getattr(transformers, cls_name)
    cfg_cls = getattr(
        transformers, cls_name.replace("ForCausalLM", "Config").replace("Gemma3Config", "Gemma3TextConfig")
    )
    kw = dict(
        vocab_size=97,
        hidden_size=heads * head_dim // 2 + 16,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
    )
    kw.update(extra or {})
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # perturb everything (norms and biases included) so no weight is trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ours_from_hf(hf_model):
    cfg = ModelConfig.from_hf_config(hf_model.config.to_dict())
    model = build_model(cfg, get_ops("torch"), torch.float32, "cpu")
    loaded = model.load_weights(hf_model.state_dict().items())
    assert loaded == model.weight_names()
    return model


class PagedRunner:
    """Minimal stand-in for the model runner: allocates shuffled blocks and builds AttentionMetadata."""

    def __init__(self, model, block_size=4, num_blocks=64, seed=0):
        cfg = model.config
        self.model, self.bs = model, block_size
        self.kv = [
            torch.zeros(2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
            for _ in range(cfg.num_layers)
        ]
        self.free = (
            torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)).add(1).tolist()
        )
        self.blocks: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> torch.Tensor:
        """chunks: seq id -> new token ids; returns logits [T, V] for every scheduled token."""
        ids, pos, slots, qsl, seq_lens, tables = [], [], [], [0], [], []
        for sid, toks in chunks.items():
            start = self.lens.get(sid, 0)
            blocks = self.blocks.setdefault(sid, [])
            for i, t in enumerate(toks):
                p = start + i
                if p // self.bs >= len(blocks):
                    blocks.append(self.free.pop())
                ids.append(t)
                pos.append(p)
                slots.append(blocks[p // self.bs] * self.bs + p % self.bs)
            self.lens[sid] = start + len(toks)
            qsl.append(qsl[-1] + len(toks))
            seq_lens.append(self.lens[sid])
            tables.append(blocks)
        width = max(len(t) for t in tables)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            max_query_len=max(len(t) for t in chunks.values()),
            max_seq_len=max(seq_lens),
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), attn, self.kv)
        return self.model.compute_logits(hidden)


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_chunked_prefill_and_decode_match_transformers(case):
    hf = make_hf_model(*CASES[case])
    ours = ours_from_hf(hf)
    g = torch.Generator().manual_seed(1)
    seqs = {
        0: torch.randint(0, 97, (7,), generator=g).tolist(),
        1: torch.randint(0, 97, (13,), generator=g).tolist(),
        2: torch.randint(0, 97, (1,), generator=g).tolist(),
    }
    runner = PagedRunner(ours)
    with torch.no_grad():
        # step 1: full prefill of seq 0 and 2, first chunk of seq 1
        out = runner.step({0: seqs[0], 1: seqs[1][:6], 2: seqs[2]})
        torch.testing.assert_close(out[:7], hf_logits(hf, seqs[0]), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[7:13], hf_logits(hf, seqs[1][:6]), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[13:], hf_logits(hf, seqs[2]), atol=2e-5, rtol=1e-4)
        # step 2: rest of seq 1's prompt next to decodes of seq 0 and 2 (mixed batch)
        nxt = {0: out[6].argmax().item(), 2: out[13].argmax().item()}
        out = runner.step({0: [nxt[0]], 1: seqs[1][6:], 2: [nxt[2]]})
        seqs[0].append(nxt[0])
        seqs[2].append(nxt[2])
        torch.testing.assert_close(out[0], hf_logits(hf, seqs[0])[-1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[1:8], hf_logits(hf, seqs[1])[6:], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[8], hf_logits(hf, seqs[2])[-1], atol=2e-5, rtol=1e-4)
        # a few pure decode steps
        last = {0: out[0], 1: out[7], 2: out[8]}
        for _ in range(4):
            step = {sid: [last[sid].argmax().item()] for sid in seqs}
            for sid, t in step.items():
                seqs[sid] += t
            out = runner.step(step)
            for i, sid in enumerate(seqs):
                torch.testing.assert_close(out[i], hf_logits(hf, seqs[sid])[-1], atol=2e-5, rtol=1e-4)
                last[sid] = out[i]


def test_rope_llama3_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(
        head_dim=128,
        hidden_size=4096,
        num_attention_heads=32,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(ModelConfig.from_hf_config(hf_cfg.to_dict())), ref)


def test_dtype_cast_keeps_rope_cache_float32():
    model = build_model(
        PRESETS["llama-3.2-1b"].with_(num_layers=1, vocab_size=64, max_position_embeddings=128),
        get_ops("torch"),
        torch.bfloat16,
    )
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.cos_sin_cache.dtype == torch.float32
    model.half()
    assert model.cos_sin_cache.dtype == torch.float32 and model.lm_head is None


def test_config_parsing_and_errors():
    cfg = ModelConfig.from_hf_config(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "eos_token_id": [3, 4],
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "torch_dtype": "bfloat16",
        }
    )
    assert (cfg.arch, cfg.qkv_bias, cfg.head_dim, cfg.eos_token_ids) == ("qwen2", True, 4, (3, 4))
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0} and cfg.torch_dtype == "bfloat16"
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf_config(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
            }
        )


@pytest.mark.parametrize(
    "name,params",
    [("llama-3.2-1b", 1.236e9), ("llama-3.1-8b", 8.03e9), ("qwen3-8b", 8.19e9), ("llama-3.1-70b", 70.55e9)],
)
def test_presets_have_real_sizes(name, params):
    assert PRESETS[name].num_params() == pytest.approx(params, rel=0.01)


def test_unsupported_architecture_error_lists_every_supported_one():
    from fleetserve.runtime.models import supported_architectures

    with pytest.raises(UnsupportedModelError) as e:
        ModelConfig.from_hf_config({"architectures": ["FalconForCausalLM"]})
    for arch in (
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "MistralForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
    ):
        assert arch in supported_architectures() and arch in str(e.value)


def _cfg(arch, **kw):
    return {
        "architectures": [arch],
        "vocab_size": 10,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_hidden_layers": 6,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        **kw,
    }


def test_transformers_4x_configs_give_the_same_layer_patterns():
    """Checkpoints on the Hub carry 4.x config.json files (no layer_types, rope_scaling, rope_local_base_freq)."""
    g2 = ModelConfig.from_hf_config(
        _cfg(
            "Gemma2ForCausalLM",
            sliding_window=4096,
            query_pre_attn_scalar=144,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            hidden_activation="gelu_pytorch_tanh",
        )
    )
    assert [g2.layer_window(i) for i in range(6)] == [4096, None] * 3
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.attn_scale) == (50.0, 30.0, 144**-0.5)
    assert g2.hidden_act == "gelu_pytorch_tanh" and g2.tie_word_embeddings
    g3 = ModelConfig.from_hf_config(
        _cfg(
            "Gemma3ForCausalLM",
            sliding_window=512,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            sliding_window_pattern=6,
        )
    )
    assert [g3.layer_window(i) for i in range(6)] == [512] * 5 + [None]
    assert (g3.rope_theta, g3.local_rope_theta, g3.rope_scaling) == (
        1e6,
        1e4,
        {"rope_type": "linear", "factor": 8.0},
    )
    assert g3.qk_norm and g3.attn_logit_softcap is None
    q2 = ModelConfig.from_hf_config(
        _cfg("Qwen2ForCausalLM", use_sliding_window=False, sliding_window=131072, max_window_layers=28)
    )
    assert q2.sliding_window is None and q2.layer_types == ()
    q3 = ModelConfig.from_hf_config(
        _cfg("Qwen3ForCausalLM", use_sliding_window=True, sliding_window=8, max_window_layers=4)
    )
    assert [q3.layer_window(i) for i in range(6)] == [None] * 4 + [8, 8] and q3.qk_norm and not q3.qkv_bias
    phi = ModelConfig.from_hf_config(
        _cfg(
            "Phi3ForCausalLM",
            sliding_window=2047,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            rope_scaling={"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
        )
    )
    assert [phi.layer_window(i) for i in range(6)] == [2047] * 6
    assert phi.rope_scaling["rope_type"] == "longrope"
    assert phi.rope_scaling["attention_factor"] == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        ModelConfig.from_hf_config(_cfg("Phi3ForCausalLM", partial_rotary_factor=0.75))
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        ModelConfig.from_hf_config(_cfg("LlamaForCausalLM", hidden_act="relu"))


def test_longrope_table_uses_short_then_long_factors_like_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = make_hf_model(*CASES["phi3-gqa2-d32-longrope-sliding"])
    ours = ours_from_hf(hf)
    short, mscale = ROPE_INIT_FUNCTIONS["longrope"](hf.config, "cpu")
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf.config, "cpu", seq_len=65)
    assert mscale == pytest.approx(ours.config.rope_scaling["attention_factor"]) and mscale > 1.1
    pos = torch.arange(256, dtype=torch.float32)[:, None]
    want = torch.where(pos < 64, pos * short[None], pos * long[None])
    torch.testing.assert_close(ours.cos_sin_cache, torch.cat([want.cos(), want.sin()], -1) * mscale)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_config_dict_round_trips_through_transformers(case):
    """hf_config_dict (the HF baseline's config for a preset) means the same model to transformers as to us."""
    from fleetserve.runtime.models import hf_config_dict

    mc = ours_from_hf(make_hf_model(*CASES[case])).config
    d = hf_config_dict(mc)
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    assert ModelConfig.from_hf_config(hf_cfg.to_dict()) == mc


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_transformers_configs(name):
    from fleetserve.runtime.models import hf_config_dict

    d = hf_config_dict(PRESETS[name])
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    assert ModelConfig.from_hf_config(hf_cfg.to_dict(), name=name) == PRESETS[name]


# ---- the embedded SmolLM2 GGUF vs transformers' own GGUF loading of the same file -----------------


def greedy(model, prompt_ids, max_new_tokens, block_size=16):
    """Prefill once, then decode one token per step through the paged cache (a shuffled block table)."""
    runner = PagedRunner(
        model, block_size=block_size, num_blocks=1 + (len(prompt_ids) + max_new_tokens) // block_size + 2
    )
    out = []
    with torch.no_grad():
        logits = runner.step({0: list(prompt_ids)})[-1]
        for _ in range(max_new_tokens):
            out.append(int(logits.argmax()))
            logits = runner.step({0: [out[-1]]})[-1]
    return out


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
]


def test_smollm2_gguf_weights_and_logits_match_transformers(smollm2_model, hf_smollm2):
    tok, model = smollm2_model.tokenizer, smollm2_model.model
    # Same dequantized values and q/k row order as transformers' GGUF loader, bit for bit.
    mine = type(model)(model.config, model.ops)  # a fresh float32 copy, filled from transformers' weights
    mine.load_weights(hf_smollm2.state_dict().items())
    for (name, a), b in zip(model.named_parameters(), mine.parameters()):
        assert torch.equal(a, b), name
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        runner = PagedRunner(model, block_size=16, num_blocks=4)
        with torch.no_grad():
            ours = runner.step({0: ids})
        torch.testing.assert_close(ours, hf_logits(hf_smollm2, ids), atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_greedy_tokens_match_transformers(smollm2_model, hf_smollm2, prompt):
    tok = smollm2_model.tokenizer
    ids = tok.encode(prompt)
    ours = greedy(smollm2_model.model, ids, 10)
    with torch.no_grad():
        ref = hf_smollm2.generate(
            torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    assert ours == ref, (tok.decode(ours), tok.decode(ref))


def test_smollm2_knows_the_capital_of_france(smollm2_model):
    tok = smollm2_model.tokenizer
    assert "Paris" in tok.decode(greedy(smollm2_model.model, tok.encode("The capital of France is"), 4))


def _triton_prefill_vs_transformers(case, dev, dtype):
    """Prefill of 30 tokens (past every window) through the Triton ops; max error relative to the logit range."""
    hf = make_hf_model(*CASES[case])
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    model = build_model(cfg, get_ops("triton"), dtype, dev)
    model.load_weights(hf.state_dict().items())
    runner = PagedRunner(model, block_size=16, num_blocks=8)
    runner.kv = [t.to(dev, dtype) for t in runner.kv]
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    i32 = dict(dtype=torch.int32, device=dev)
    with torch.no_grad():
        ref = hf_logits(hf, ids)
        blocks = [runner.free[-1], runner.free[-2]]
        slots = torch.tensor([blocks[p // 16] * 16 + p % 16 for p in range(30)], device=dev)
        attn = AttentionMetadata(
            slots,
            torch.tensor([0, 30], **i32),
            torch.tensor([30], **i32),
            torch.tensor([blocks], **i32),
            30,
            30,
        )
        out = model.compute_logits(
            model(torch.tensor(ids, device=dev), torch.arange(30, device=dev), attn, runner.kv)
        ).cpu()
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize(
    "case",
    [
        "qwen3-gqa4-d64-untied-sliding",
        "gemma2-gqa2-d32-softcap-sliding",
        "gemma3-gqa2-d32-sliding-local-rope",
        "phi3-gqa2-d32-longrope-sliding",
    ],
)
def test_triton_kernels_run_the_families_like_transformers(case):
    """The whole forward on the Triton ops (the interpreter on CPU): windows, soft-caps, GELU, q/k norms."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert _triton_prefill_vs_transformers(case, torch.device(dev), torch.float32) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("llama")])
def test_gpu_triton_bf16_families_match_transformers(case):
    """Each family on the GPU: bf16 weights, Triton kernels (windows, soft-caps, GELU), vs transformers fp32."""
    assert _triton_prefill_vs_transformers(case, torch.device("cuda"), torch.bfloat16) < 3e-2


@pytest.mark.gpu
def test_triton_bf16_prefill_and_cuda_graph_decode_match_transformers():
    """On the GPU: bf16 weights + Triton ops, a decode step captured in a CUDA graph and replayed."""
    dev = torch.device("cuda")
    hf = make_hf_model(*CASES["llama-gqa2-d64-tied-llama3"])
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    model = build_model(cfg, get_ops("triton"), torch.bfloat16, dev)
    model.load_weights(hf.state_dict().items())
    hf = hf.to(dev)
    bs, L = 16, 40
    blocks = [9, 3, 7, 1]
    kv = [
        torch.zeros(2, 12, bs, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16, device=dev)
        for _ in range(cfg.num_layers)
    ]
    i32 = dict(dtype=torch.int32, device=dev)
    slot = lambda p: blocks[p // bs] * bs + p % bs  # noqa: E731
    ids = torch.randint(0, 97, (L,), device=dev)

    def rel(a, b):
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    with torch.no_grad():
        attn = AttentionMetadata(
            torch.tensor([slot(p) for p in range(L)], device=dev),
            torch.tensor([0, L], **i32),
            torch.tensor([L], **i32),
            torch.tensor([blocks], **i32),
            L,
            L,
        )
        out = model.compute_logits(model(ids, torch.arange(L, device=dev), attn, kv))
        assert rel(out, hf(ids[None]).logits[0].float()) < 3e-2
        # static buffers for one decode token, captured once
        s_ids, s_pos = (
            torch.zeros(1, dtype=torch.long, device=dev),
            torch.zeros(1, dtype=torch.long, device=dev),
        )
        s_attn = AttentionMetadata(
            torch.full((1,), -1, device=dev),
            torch.tensor([0, 1], **i32),
            torch.ones(1, **i32),
            torch.tensor([blocks], **i32),
            1,
            len(blocks) * bs,
        )
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(s_ids, s_pos, s_attn, kv)  # warm-up outside the graph (slot -1: writes nothing)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s_out = model.compute_logits(model(s_ids, s_pos, s_attn, kv))
        seq, nxt = ids.tolist(), int(out[-1].argmax())
        for _ in range(3):
            p = len(seq)
            seq.append(nxt)
            s_ids.fill_(nxt)
            s_pos.fill_(p)
            s_attn.slot_mapping.fill_(slot(p))
            s_attn.seq_lens.fill_(p + 1)
            graph.replay()
            assert rel(s_out[0], hf(torch.tensor([seq], device=dev)).logits[0, -1].float()) < 3e-2
            nxt = int(s_out[0].argmax())


def test_docs_list_every_registered_architecture():
    import pathlib

    from fleetserve.runtime.models import FAMILIES

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "models.md").read_text()
    for fam in FAMILIES.values():
        assert fam.checked_against, fam.name
        for arch in fam.architectures:
            assert f"`{arch}`" in doc, f"docs/models.md does not list {arch}"


@pytest.mark.parametrize("naming", ["transformers-5", "transformers-4"])
def test_gemma3_multimodal_checkpoint_serves_its_language_model(naming):
    """Gemma 3 4B+ ship as Gemma3ForConditionalGeneration: text config nested, vision weights beside the LM's."""
    tc = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=5,
        query_pre_attn_scalar=16,
        sliding_window_pattern=3,
        max_position_embeddings=256,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    vc = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = transformers.Gemma3Config(
        text_config=tc,
        vision_config=vc,
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mc = ModelConfig.from_hf_config(hf.config.to_dict())
    assert (mc.arch, mc.num_layers, mc.sliding_window, mc.rope_scaling) == (
        "gemma3",
        3,
        5,
        tc["rope_scaling"],
    )
    ours = build_model(mc, get_ops("torch"), torch.float32, "cpu")
    weights = hf.state_dict().items()
    if naming == "transformers-4":
        weights = [
            (
                n.replace("model.language_model.", "language_model.model.")
                .replace("model.vision_tower.", "vision_tower.")
                .replace("model.multi_modal_projector.", "multi_modal_projector."),
                t,
            )
            for n, t in weights
        ]
    assert ours.load_weights(weights) == ours.weight_names()
    ids = torch.randint(0, 296, (18,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        out = PagedRunner(ours).step({0: ids})
    torch.testing.assert_close(out, hf_logits(hf, ids), atol=2e-5, rtol=1e-4)
