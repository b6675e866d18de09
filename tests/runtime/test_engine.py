"""Engine correctness on CPU: greedy outputs equal Hugging Face transformers token for token,
and do not depend on batching, prefix caching, preemption or chunked prefill.

Every model family runs here (Llama, Qwen2, Mistral, Qwen3, Gemma 2, Gemma 3, Phi-3), with sliding
windows of 8 tokens (shorter than the prompts and outputs), soft-caps and GQA where the family has
them. Tiny random-weight models (saved with save_pretrained, loaded through our safetensors
loader) keep this fast; a larger init std makes logits peaked, so float32 rounding
differences between implementations cannot flip a greedy choice.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetserve.runtime import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "llama-gqa4-d32-tied": (
        "llama",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            tie_word_embeddings=True,
        ),
    ),
    "llama3-mha-d64-untied-rope-scaling": (
        "llama",
        dict(
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=64,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2-gqa2-bias": (
        "qwen2",
        dict(
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        ),
    ),
    "mistral-gqa2-untied": (
        "mistral",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=16,
            tie_word_embeddings=False,
            sliding_window=None,
        ),
    ),
    # sliding windows of 8 tokens: shorter than three of the four prompts and than every output
    "mistral-sliding-window": (
        "mistral",
        dict(
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            sliding_window=8,
        ),
    ),
    "qwen3-gqa2-tied": (
        "qwen3",
        dict(
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3-gqa4-untied-sliding": (
        "qwen3",
        dict(
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        ),
    ),
    "gemma2-softcap-sliding": (
        "gemma2",
        dict(
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=8,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=8.0,
            final_logit_softcapping=15.0,
        ),
    ),
    "gemma3-sliding-local-rope": (
        "gemma3",
        dict(
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=8,
            query_pre_attn_scalar=48,
            sliding_window_pattern=3,
            rope_local_base_freq=100.0,
            rope_theta=50000.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
    ),
    "phi3-longrope-sliding": (
        "phi3",
        dict(
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=8,
            original_max_position_embeddings=128,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.05 * i for i in range(16)],
                "long_factor": [3.0 + i for i in range(16)],
            },
        ),
    ),
}

PROMPTS = [
    [5, 17, 33, 2, 9],
    list(range(40, 77)),
    [101],
    [7, 7, 7, 7, 8, 200, 11, 3, 19, 42, 60, 61, 62, 63, 64, 65, 66],
]
NEW_TOKENS = 32


def build_hf(kind: str, kw: dict, path):
    torch.manual_seed(0)
    common = dict(
        vocab_size=256,
        max_position_embeddings=256,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    names = {
        "llama": "Llama",
        "qwen2": "Qwen2",
        "mistral": "Mistral",
        "qwen3": "Qwen3",
        "gemma2": "Gemma2",
        "gemma3": "Gemma3",
        "phi3": "Phi3",
    }
    cfg_cls = getattr(transformers, "Gemma3TextConfig" if kind == "gemma3" else f"{names[kind]}Config")
    cfg = cfg_cls(**common, **kw)
    model = getattr(transformers, f"{names[kind]}ForCausalLM")(cfg)
    model = model.float().eval()
    if kind == "qwen2":  # random biases so they matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    kind, kw = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = build_hf(kind, kw, path)
    refs = [hf_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    return path, model, refs


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def token_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


ASYNC = pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async-scheduling"])


@ASYNC
def test_greedy_matches_transformers(tiny, pipelined):
    path, _, refs = tiny
    llm = LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        block_size=4,
        num_kv_blocks=256,
        async_scheduling=pipelined,
    )
    outs = llm.generate(token_prompts(PROMPTS), GREEDY)
    for out, ref, prompt in zip(outs, refs, PROMPTS):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"
    assert llm.engine.scheduler.kv.num_free_blocks == 256


@ASYNC
@pytest.mark.parametrize(
    "setting", ["alone", "prefix-cache-off", "preemption", "chunked-prefill", "mixed-traffic"]
)
def test_batching_invariance(tiny, setting, pipelined):
    path, _, refs = tiny
    kw = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, async_scheduling=pipelined)
    if setting == "prefix-cache-off":
        kw["enable_prefix_caching"] = False
    if setting == "preemption":
        kw["num_kv_blocks"] = 24  # 4 sequences of up to 69 tokens cannot all fit
    if setting == "chunked-prefill":
        kw["max_num_batched_tokens"] = 8
    llm = LLM(model=str(path), **kw)
    if setting == "alone":
        outs = [llm.generate(token_prompts([p]), GREEDY)[0] for p in PROMPTS]
    elif setting == "mixed-traffic":
        # other requests (sampled, different lengths, sharing prefixes) run alongside
        noise = [{"prompt_token_ids": p[: max(1, len(p) // 2)] + [3, 4]} for p in PROMPTS]
        params = [GREEDY] * len(PROMPTS) + [
            SamplingParams(temperature=1.0, seed=i, max_tokens=20 + i) for i in range(len(noise))
        ]
        outs = llm.generate(token_prompts(PROMPTS) + noise, params)[: len(PROMPTS)]
    else:
        outs = llm.generate(token_prompts(PROMPTS), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.scheduler.kv.num_free_blocks == llm.engine.num_kv_blocks


def test_prefix_cache_is_used(tiny):
    path, _, refs = tiny
    llm = LLM(model=str(path), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)
    first = llm.generate(token_prompts(PROMPTS[1:2]), GREEDY)[0]
    again = llm.generate(token_prompts(PROMPTS[1:2]), GREEDY)[0]
    assert again.num_cached_tokens >= 32 and first.num_cached_tokens == 0
    assert again.outputs[0].token_ids == refs[1]


def test_logprobs_match_reference_log_softmax(tiny):
    path, model, refs = tiny
    llm = LLM(model=str(path), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)
    prompt = PROMPTS[0]
    out = llm.generate(
        token_prompts([prompt]),
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2),
    )[0]
    toks = out.outputs[0].token_ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt + toks])).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    for i, (tok, lp) in enumerate(zip(toks, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert lp[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert lp[tok].rank == 1  # greedy picks the top token
        top = row.topk(3)
        for j, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            assert lp[t].logprob == pytest.approx(v, abs=1e-4)
            if t != tok:
                assert lp[t].rank == j + 1
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        t = prompt[pos]
        assert entry[t].logprob == pytest.approx(ref[pos - 1, t].item(), abs=1e-4)
        assert entry[t].rank == int((ref[pos - 1] > ref[pos - 1, t]).sum()) + 1
    cum = sum(lp[t].logprob for t, lp in zip(toks, out.outputs[0].logprobs))
    assert out.outputs[0].cumulative_logprob == pytest.approx(cum, abs=1e-4)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_hf("llama", CONFIGS["llama-gqa4-d32-tied"][1], path)
    return str(path)


def sampled(temp=0.9, **kw):
    return SamplingParams(temperature=temp, max_tokens=12, ignore_eos=True, **kw)


@ASYNC
def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama, pipelined):
    llm = LLM(
        model=tiny_llama,
        dtype="float32",
        device="cpu",
        block_size=4,
        num_kv_blocks=256,
        async_scheduling=pipelined,
    )
    target = {"prompt_token_ids": [3, 14, 15, 92, 65]}
    alone = llm.generate([target], sampled(seed=1234))[0].outputs[0].token_ids
    again = llm.generate([target], sampled(seed=1234))[0].outputs[0].token_ids
    others = [{"prompt_token_ids": [i, i + 1, i + 2]} for i in range(20, 26)]
    mixed = llm.generate(
        others[:3] + [target] + others[3:],
        [sampled(seed=i) for i in range(3)] + [sampled(seed=1234)] + [sampled() for _ in range(3)],
    )
    assert alone == again == mixed[3].outputs[0].token_ids
    other_seed = llm.generate([target], sampled(seed=4321))[0].outputs[0].token_ids
    assert other_seed != alone
    # unseeded requests draw their own streams: two identical prompts in one batch differ
    a, b = llm.generate([target, target], sampled(temp=1.5))
    assert a.outputs[0].token_ids != b.outputs[0].token_ids


def test_n_completions_share_prompt_blocks(tiny_llama):
    llm = LLM(
        model=tiny_llama,
        dtype="float32",
        device="cpu",
        block_size=4,
        num_kv_blocks=64,
        enable_prefix_caching=False,
    )
    eng = llm.engine
    prompt = list(range(30, 40))  # 10 tokens: 2 full blocks + 1 partial
    eng.add_request("r", {"prompt_token_ids": prompt}, sampled(temp=1.0, n=4, seed=7))
    eng.step()  # prefill of the first completion; the others fork from it
    used_after_fork = eng.num_kv_blocks - eng.scheduler.kv.num_free_blocks
    assert used_after_fork == 3  # 4 completions, one copy of the prompt
    eng.step()  # each writer of the shared partial block copies it, the last holder writes in place
    assert eng.num_kv_blocks - eng.scheduler.kv.num_free_blocks == 3 + 3
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    final = outs[-1]
    assert final.finished and [c.index for c in final.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 12 for c in final.outputs)
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1
    assert eng.scheduler.kv.num_free_blocks == eng.num_kv_blocks
    # completion 0 of a seeded n=4 request equals the same request with n=1
    single = llm.generate([{"prompt_token_ids": prompt}], sampled(temp=1.0, seed=7))[0]
    assert single.outputs[0].token_ids == final.outputs[0].token_ids


@ASYNC
def test_abort_at_any_moment_frees_blocks(tiny_llama, pipelined):
    llm = LLM(
        model=tiny_llama,
        dtype="float32",
        device="cpu",
        block_size=4,
        num_kv_blocks=64,
        max_num_batched_tokens=16,
        async_scheduling=pipelined,
    )
    eng = llm.engine
    eng.add_request("long", {"prompt_token_ids": list(range(1, 41))}, sampled())
    eng.add_request("short", {"prompt_token_ids": [5, 6]}, sampled())
    eng.add_request("waiting", {"prompt_token_ids": list(range(50, 90))}, sampled())
    eng.step()
    eng.step()
    eng.abort_request(["long", "waiting"])  # one mid-prefill, one still queued
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    by_id = {o.request_id: o for o in outs if o.finished}
    assert by_id["long"].outputs[0].finish_reason == "abort"
    assert by_id["waiting"].outputs[0].finish_reason == "abort"
    assert by_id["short"].outputs[0].finish_reason == "length"
    assert eng.scheduler.kv.num_free_blocks == 64 and eng.get_stats().kv_cache_usage == 0.0


def test_max_tokens_and_min_tokens(tiny_llama):
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=5))[0]
    assert len(out.outputs[0].token_ids) <= 5
    # EOS (id 2) banned until min_tokens: force it to be the argmax with logit_bias
    p = SamplingParams(temperature=0, max_tokens=10, min_tokens=4, logit_bias={2: 100.0})
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], p)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == 2 and 2 not in out.token_ids[:4]
    assert out.finish_reason == "stop" and out.stop_reason is None
    p = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[77], logit_bias={77: 100.0})
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], p)[0].outputs[0]
    assert out.token_ids == [77] and out.finish_reason == "stop" and out.stop_reason == 77


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [5] * 300}, "maximum context length"),
        ({"prompt_token_ids": [1, 99999]}, "outside the vocabulary"),
        ({"nothing": 1}, "prompt"),
    ],
)
def test_bad_prompts_raise_and_engine_stays_usable(tiny_llama, bad, message):
    llm = LLM(
        model=tiny_llama, dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, max_model_len=256
    )
    with pytest.raises(ValueError, match=message):
        llm.generate([{"prompt_token_ids": [4, 5]}, bad], SamplingParams(max_tokens=3))
    assert llm.engine.scheduler.kv.num_free_blocks == 256 and not llm.engine.has_unfinished_requests()
    out = llm.generate(
        [{"prompt_token_ids": [4, 5]}], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1), "temperature"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_sampling_params(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_too_many_logprobs_and_bad_logit_bias(tiny_llama):
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(logprobs=21))
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(logit_bias={100000: 1.0}))


def test_max_model_len_must_fit_the_kv_cache(tiny_llama):
    with pytest.raises(ValueError, match="does not fit in the KV cache"):
        LLM(model=tiny_llama, dtype="float32", device="cpu", block_size=4, num_kv_blocks=8, max_model_len=256)
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", block_size=4, num_kv_blocks=8)
    assert llm.engine.max_model_len == 32  # lowered to what the cache holds, with a warning
    out = llm.generate(
        [{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 29 and out[0].outputs[0].finish_reason == "length"


def test_penalties_and_logprobs_under_async_scheduling(tiny_llama):
    """Penalties read every generated token on the host, so while such a request runs the engine
    steps one at a time; the outputs must equal the synchronous engine's, for all requests."""
    prompts = [
        {"prompt_token_ids": [3, 4, 5, 6]},
        {"prompt_token_ids": [9, 9, 8]},
        {"prompt_token_ids": [40, 41]},
    ]
    params = [
        SamplingParams(
            temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=0.5
        ),
        SamplingParams(temperature=0.8, seed=5, max_tokens=16, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, presence_penalty=1.0),
    ]
    results = []
    for pipelined in (False, True):
        llm = LLM(
            model=tiny_llama,
            dtype="float32",
            device="cpu",
            block_size=4,
            num_kv_blocks=64,
            async_scheduling=pipelined,
        )
        outs = llm.generate(prompts, params)
        results.append(
            [(o.outputs[0].token_ids, [sorted(d) for d in o.outputs[0].logprobs or []]) for o in outs]
        )
        assert llm.engine._num_penalty_requests == 0
    assert results[0] == results[1]


@pytest.mark.parametrize("sizes", [[5, 5, 3], [1, 2, 3, 4, 7], [8, 0, 9]])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32])
def test_staged_arrays_start_16_byte_aligned_whatever_the_step_shape(sizes, dtype):
    """Kernel pointer arguments must not change alignment with the step's token/sequence counts
    (Triton would compile a new variant mid-serving). HostStaging unpinned on the CPU: the same
    packing as the pinned CUDA path (its views then alias the host buffer)."""
    from fleetserve.runtime.staging import HostStaging

    staging = HostStaging("cpu", pin=False, num_slots=2, initial_bytes=64)  # small: forces a regrow
    for step in range(3):
        staging.begin_step()
        arrays = [np.arange(n, dtype=dtype) + 100 * k + step for k, n in enumerate(sizes)]
        mixed = [np.full((2, 3), 7, dtype=np.int32)]
        for a, t in zip(arrays + mixed, staging.stage(arrays) + staging.stage(mixed)):
            assert t.data_ptr() % 16 == 0 and t.shape == a.shape
            np.testing.assert_array_equal(t.numpy(), a)
        staging.end_step()


@pytest.mark.gpu
def test_pinned_staging_ring_survives_pipelined_steps_and_regrowth():
    """CUDA: staged tensors keep their values although later steps refill (and outgrow) the
    pinned ring while earlier copies may still be queued behind a long kernel."""
    import torch

    from fleetserve.runtime.staging import HostStaging

    staging = HostStaging("cuda", pin=True, num_slots=2, initial_bytes=256)
    big = torch.randn(2048, 2048, device="cuda")
    kept = []
    for step in range(6):
        staging.begin_step()
        _ = big @ big  # keeps the stream busy so the copies queue behind it
        arrays = [
            np.arange(40 * (step + 1), dtype=np.int64) + step,
            np.full((3, 5), step, dtype=np.int32),
            np.linspace(0, 1, 7, dtype=np.float32),
        ]
        staged = staging.stage(arrays)
        kept.append([t.clone() for t in staged])  # consumers on the stream read them in order
        assert all(t.is_cuda and t.data_ptr() % 16 == 0 for t in staged)
        staging.end_step()
    torch.cuda.synchronize()
    for step, ts in enumerate(kept):
        np.testing.assert_array_equal(ts[0].cpu().numpy(), np.arange(40 * (step + 1)) + step)
        assert (ts[1].cpu() == step).all() and ts[2].shape == (7,)
