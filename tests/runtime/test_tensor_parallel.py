"""Tensor parallelism on CPU (gloo): TP=2 and TP=4 give the same greedy tokens as TP=1 and as
transformers (fp32), with and without preemption, with and without async scheduling; a killed
worker ends the engine within seconds, naming its rank, and leaves no process behind; bad
sizes are refused before any weight is read.

Models: a tiny random Llama with GQA (4 query heads, 2 KV heads: at TP=4 each KV head is
replicated on two ranks) and a Qwen2 with q/k/v biases, a single KV head and tied
embeddings (the vocabulary, 97, does not divide 2 or 4: the last rank's shard is padded).
Each engine start spawns N-1 workers (a few seconds each here), so every engine serves
several checks.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from fleetserve.runtime import LLM, SamplingParams
from fleetserve.runtime.config import EngineConfig

from .test_engine import hf_greedy

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 33, 2, 9], list(range(40, 57)), [61], [7, 7, 7, 8, 20, 11, 3, 19, 42, 60]]
NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
# Seeded sampling of n=2 forks (copy-on-write block copies on every rank) with logprobs and
# prompt logprobs (their logits gathered on rank 0 too).
EXTRAS = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6, logprobs=2, prompt_logprobs=2)
# 4 sequences of up to 33 tokens need 36 blocks of 4: with 16 they cannot all stay resident.
SMALL_KV = 16

MODELS = {
    # name: (config class, model class, heads, kv heads, tied, biases)
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", 4, 2, False, False),
    "qwen2-1kv-bias": ("Qwen2Config", "Qwen2ForCausalLM", 4, 1, True, True),
}


def build_hf(name: str, path, **over) -> torch.nn.Module:
    cfg_cls, cls, heads, kv, tied, bias = MODELS[name]
    torch.manual_seed(0)
    kw = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=16,
        max_position_embeddings=128,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg = getattr(transformers, cfg_cls)(**{**kw, **over})
    model = getattr(transformers, cls)(cfg).float().eval()
    if bias:  # random biases so that a wrongly split bias changes tokens
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request, tmp_path_factory):
    """(model dir, transformers' greedy tokens, TP=1 engine's tokens) per model."""
    path = tmp_path_factory.mktemp(request.param)
    hf = build_hf(request.param, path)
    refs = [hf_greedy(hf, p, NEW) for p in PROMPTS]
    one = LLM(model=str(path), device="cpu", block_size=4, num_kv_blocks=256)
    tp1 = [o.outputs[0].token_ids for o in one.generate(_prompts(PROMPTS), GREEDY)]
    extras = one.generate(_prompts(PROMPTS[:2]), EXTRAS)
    return request.param, str(path), refs, tp1, extras


def _prompts(ps):
    return [{"prompt_token_ids": p} for p in ps]


def _children() -> list:
    import psutil

    return [c for c in psutil.Process().children(recursive=True) if c.is_running() and c.status() != "zombie"]


def _workers() -> list:
    return [c for c in _children() if "resource_tracker" not in " ".join(c.cmdline())]


def _wait_no_workers(timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while (left := _workers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# One engine per (model, N), small KV cache: a prompt alone (no preemption), then all four at
# once (preempted and recomputed). Sync and async scheduling (rank 0 broadcasts the sampled
# tokens that the next step's placeholders need) alternate over the cases.
@pytest.mark.parametrize("n,pipelined", [(2, False), (4, True)], ids=["tp2-sync", "tp4-async"])
def test_greedy_matches_tp1_and_transformers_with_and_without_preemption(tiny, n, pipelined):
    name, path, refs, tp1, extras = tiny
    assert tp1 == refs  # the TP=1 engine agrees with transformers
    pipelined = pipelined if name == "llama-gqa" else not pipelined
    with LLM(
        model=path,
        device="cpu",
        block_size=4,
        num_kv_blocks=SMALL_KV,
        tensor_parallel_size=n,
        async_scheduling=pipelined,
    ) as llm:
        assert len(_workers()) == n - 1
        assert llm.engine.runner.kv_caches[0].shape[3] == max(1, MODELS[name][3] // n)  # its KV heads
        alone = llm.generate(_prompts(PROMPTS[1:2]), GREEDY)[0].outputs[0].token_ids
        assert alone == refs[1]
        assert llm.engine.scheduler.num_preemptions == 0
        outs = [o.outputs[0].token_ids for o in llm.generate(_prompts(PROMPTS), GREEDY)]
        assert outs == refs
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.scheduler.kv.num_free_blocks == SMALL_KV
        _same_extras(llm.generate(_prompts(PROMPTS[:2]), EXTRAS), extras)
    assert _wait_no_workers() == []


def _same_extras(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
        for gc, wc in zip(g.outputs, w.outputs):
            for gp, wp in zip(gc.logprobs, wc.logprobs, strict=True):
                assert gp.keys() == wp.keys()
                for t in gp:
                    assert gp[t].logprob == pytest.approx(wp[t].logprob, abs=1e-4)
        for gp, wp in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:], strict=True):
            assert gp.keys() == wp.keys()
            assert [x.logprob for x in gp.values()] == pytest.approx(
                [x.logprob for x in wp.values()], abs=1e-4
            )


def test_killed_worker_ends_the_engine_naming_its_rank_and_leaves_no_process(tmp_path):
    build_hf("llama-gqa", tmp_path)
    llm = LLM(model=str(tmp_path), device="cpu", block_size=4, num_kv_blocks=256, tensor_parallel_size=2)
    victim = llm.engine.workers.procs[0]  # rank 1
    assert victim.is_alive() and len(_workers()) == 1
    killed_at: list[float] = []

    def kill_when_running():
        while llm.engine.generation_tokens_total < 10:
            time.sleep(0.005)
        killed_at.append(time.monotonic())
        os.kill(victim.pid, signal.SIGKILL)

    threading.Thread(target=kill_when_running, daemon=True).start()
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    from fleetserve.runtime.tp_worker import WorkerDiedError

    with pytest.raises(WorkerDiedError) as err:
        llm.generate(_prompts(PROMPTS), long)
    took = time.monotonic() - killed_at[0]
    assert took < 5.0, took
    assert f"rank 1 (pid {victim.pid}) died: killed by SIGKILL" in str(err.value)
    assert _wait_no_workers(5.0) == []
    with pytest.raises(WorkerDiedError):  # the engine stays failed
        llm.engine.step()
    llm.shutdown()
    assert _wait_no_workers() == []


# ---------------------------------------------------------------- refused before any weight is read
def _config_dir(tmp_path, **over):
    cfg = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=97,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )
    cfg.update(over)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


@pytest.mark.parametrize(
    "over,n,message",
    [
        ({}, 3, "tensor_parallel_size=3 does not divide num_attention_heads=4"),
        (
            dict(num_attention_heads=6, num_key_value_heads=3),
            2,
            "tensor_parallel_size=2 and num_key_value_heads=3",
        ),
        (dict(intermediate_size=42), 4, "does not divide intermediate_size=42"),
        (
            dict(
                architectures=["MixtralForCausalLM"],
                model_type="mixtral",
                num_local_experts=4,
                num_experts_per_tok=2,
                intermediate_size=42,
            ),
            4,
            "does not divide moe_intermediate_size=42",
        ),
        (
            dict(
                architectures=["Qwen2MoeForCausalLM"],
                model_type="qwen2_moe",
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=18,
                intermediate_size=42,  # no layer is dense: not a width to split
            ),
            4,
            "does not divide shared_expert_intermediate_size=18",
        ),
    ],
    ids=["heads", "kv-heads", "intermediate", "mixtral-experts", "qwen2moe-shared-expert"],
)
def test_bad_tensor_parallel_size_is_refused_before_loading(tmp_path, monkeypatch, over, n, message):
    import fleetserve.runtime.loader as loader

    def no_load(*a, **k):
        raise AssertionError("weights were loaded before the size was checked")

    monkeypatch.setattr(loader, "load_model", no_load)
    # config.json only: reading any weight would fail with a missing-safetensors error instead
    with pytest.raises(ValueError, match=message):
        LLM(model=_config_dir(tmp_path, **over), device="cpu", tensor_parallel_size=n)
    assert _workers() == []  # nothing was spawned


def test_packed_gguf_weights_are_refused_with_tensor_parallelism(tmp_path, monkeypatch):
    import fleetserve.runtime.loader as loader

    def no_load(*a, **k):
        raise AssertionError("weights were loaded before the setting was checked")

    monkeypatch.setattr(loader, "load_model", no_load)
    with pytest.raises(ValueError, match="gguf_weights='packed'"):
        LLM(model=_config_dir(tmp_path), device="cpu", tensor_parallel_size=2, gguf_weights="packed")
    assert _workers() == []


def test_config_field_cli_flag_and_gpu_count():
    from pydantic import ValidationError

    from fleetserve.runtime.cli import build_parser
    from fleetserve.runtime.parallel import TensorParallelError, check_devices

    assert EngineConfig().tensor_parallel_size == 1
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    for argv in (["serve", "-tp", "2"], ["serve", "--tensor-parallel-size", "2"]):
        assert build_parser().parse_args(argv).tensor_parallel_size == 2
    check_devices(4, "cpu", 0)  # CPU ranks share the host
    check_devices(2, "cuda", 2)
    with pytest.raises(TensorParallelError, match="needs 4 GPUs, but 1 is visible"):
        check_devices(4, "cuda", 1)


def test_each_rank_reads_only_its_slices(tmp_path):
    """The safetensors path hands shard_weights lazy slices: no rank materialises a whole
    sharded tensor (checked by counting the elements read)."""
    from fleetserve.runtime.loader.safetensors_loader import iter_safetensors, safetensors_files
    from fleetserve.runtime.models import ModelConfig
    from fleetserve.runtime.parallel import LazySlice, ShardLayout, shard_weights

    hf = build_hf("qwen2-1kv-bias", tmp_path)
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    full = sum(p.numel() for n, p in hf.state_dict().items() if "norm" not in n)
    read = {r: 0 for r in range(4)}
    for rank in range(4):
        lay = ShardLayout.of(cfg, rank, 4)
        for name, t in shard_weights(iter_safetensors(safetensors_files(str(tmp_path)), lazy=True), lay):
            assert not isinstance(t, LazySlice)
            if "norm" not in name:
                read[rank] += t.numel()
    # a quarter of every split tensor per rank, plus the single KV head's k/v copied on every rank
    kv = 2 * 2 * (16 * 48 + 16)  # 2 layers x (k, v) x (weight + bias)
    for rank in range(4):
        assert read[rank] < full / 4 + kv + 97 * 48  # + at most one padded vocabulary shard


# ---------------------------------------------------------------- the sharded model alone, ranks as threads
def _run_ranks(n: int, fn):
    """fn(ctx) on n ranks at once, as threads of this process joined by gloo; returns rank 0's result."""
    import datetime

    import torch.distributed as dist

    from fleetserve.runtime.parallel import ParallelContext

    master = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def rank_main(r):
        try:
            store = master if r == 0 else dist.TCPStore("127.0.0.1", master.port, None, False)
            ctx = ParallelContext(r, n, torch.device("cpu"), store=store)
            results[r] = fn(ctx)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(datetime.timedelta(minutes=2).total_seconds())
    if errors:
        raise errors[0]
    return results[0]


def test_every_registered_family_splits_and_an_unknown_one_is_refused_by_name(tmp_path):
    from fleetserve.runtime.models import ModelConfig
    from fleetserve.runtime.models.registry import FAMILIES, UnsupportedModelError
    from fleetserve.runtime.parallel import TP_FAMILIES, check_tensor_parallel

    assert set(FAMILIES) == set(TP_FAMILIES)  # a new family must say how it splits
    _config_dir(tmp_path)
    cfg = ModelConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    check_tensor_parallel(cfg, 2)
    with pytest.raises(
        UnsupportedModelError, match="the future family .* cannot be split yet; .* supports llama"
    ):
        check_tensor_parallel(cfg.with_(arch="future"), 2)


# Dense families beyond the engine tests' two: Qwen3 q/k norms, Mistral's sliding window, llama3 RoPE
# with tied embeddings; Gemma 2 (soft-caps, sliding/global layers, scaled embeddings, 1 + w norms),
# Gemma 3 (q/k norms, local/global RoPE), Phi-3 (fused qkv_proj and gate_up_proj tensors, longrope).
DENSE_CASES = [
    "qwen3-gqa2-d32-tied",
    "mistral-gqa2-d32-sliding",
    "llama-gqa2-d64-tied-llama3",
    "gemma2-gqa2-d32-softcap-sliding",
    "gemma3-gqa2-d32-sliding-local-rope",
    "phi3-gqa2-d32-longrope-sliding",
]
# MoE: Mixtral (w1/w3/w2 experts), Qwen3-MoE with a dense layer (two MLP widths), Qwen2-MoE's
# shared expert and its gate; transformers 5.x state dicts hold the experts stacked [E, 2I, H].
MOE_CASES = ["mixtral-e4-k2", "qwen3moe-e8-k3-dense-layer-tied", "qwen2moe-e6-k2-shared"]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("case", DENSE_CASES + MOE_CASES)
def test_sharded_model_matches_transformers(case, n):
    """Every rank's shard in one forward (ranks as threads), rank 0's logits vs transformers."""
    from fleetserve.kernels import get_ops
    from fleetserve.runtime.attention import AttentionMetadata
    from fleetserve.runtime.models import ModelConfig, build_model
    from fleetserve.runtime.parallel import shard_weights

    if case in MOE_CASES:
        from .test_moe_models import make_hf_model as make_moe

        hf = make_moe(case)
    else:
        from .test_models import CASES, make_hf_model

        hf = make_hf_model(*CASES[case])
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    ids = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]

    def rank(ctx):
        ctx.set_model(cfg)
        model = build_model(cfg, get_ops("torch"), torch.float32, "cpu", tp=ctx)
        assert model.load_weights(shard_weights(hf.state_dict().items(), ctx.layout)) == model.weight_names()
        ctx.connect("127.0.0.1", 0)
        bs, T = 4, len(ids)
        kv = [torch.zeros(2, 8, bs, ctx.layout.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
        attn = AttentionMetadata(
            slot_mapping=torch.arange(T),
            query_start_loc=torch.tensor([0, T], dtype=torch.int32),
            seq_lens=torch.tensor([T], dtype=torch.int32),
            block_tables=torch.arange(8, dtype=torch.int32)[None],
            max_query_len=T,
            max_seq_len=T,
        )
        with torch.no_grad():
            hidden = model(torch.tensor(ids), torch.arange(T), attn, kv)
            return model.compute_logits(hidden)

    logits = _run_ranks(n, rank)
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_gguf_matches_transformers(tmp_path, n):
    """GGUF with tensor parallelism: each tensor dequantized, llama.cpp's q/k row permutation undone,
    then cut to the rank's slice (ranks as threads, rank 0's logits vs transformers)."""
    pytest.importorskip("gguf")
    from fleetserve.runtime.attention import AttentionMetadata
    from fleetserve.runtime.loader import load_model

    from .test_loader import write_gguf

    hf = build_hf("llama-gqa", tmp_path / "hf", hidden_size=64)  # GGUF: head_dim = hidden / heads
    path = tmp_path / "m.gguf"
    write_gguf(path, hf)
    ids = [5, 17, 33, 2, 9, 61, 7]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]

    def rank(ctx):
        loaded = load_model(EngineConfig(model=str(path), device="cpu"), "cpu", torch.float32, tp=ctx)
        ctx.connect("127.0.0.1", 0)
        cfg, T = loaded.model_config, len(ids)
        kv = [torch.zeros(2, 4, 4, ctx.layout.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
        attn = AttentionMetadata(
            slot_mapping=torch.arange(T),
            query_start_loc=torch.tensor([0, T], dtype=torch.int32),
            seq_lens=torch.tensor([T], dtype=torch.int32),
            block_tables=torch.arange(4, dtype=torch.int32)[None],
            max_query_len=T,
            max_seq_len=T,
        )
        with torch.no_grad():
            return loaded.model.compute_logits(loaded.model(torch.tensor(ids), torch.arange(T), attn, kv))

    torch.testing.assert_close(_run_ranks(n, rank), ref, atol=2e-5, rtol=1e-4)
