"""The offline API on the embedded default model (SmolLM2-135M-Instruct from GGUF, CPU):
text in, text out — tokenizer, chat template, stop strings, detokenization."""

import pytest

from fleetserve.runtime import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=1024, num_kv_blocks=256)


def greedy(**kw):
    return SamplingParams(temperature=0.0, **{"max_tokens": 16, **kw})


def test_default_model_knows_paris(llm):
    out = llm.generate("The capital of France is", greedy(max_tokens=8))[0]
    assert "Paris" in out.outputs[0].text
    assert out.prompt == "The capital of France is"
    assert out.prompt_token_ids == llm.get_tokenizer().encode("The capital of France is")


def test_text_equals_decode_of_tokens(llm):
    out = llm.generate(["Write a haiku about the sea:"], greedy(max_tokens=24, ignore_eos=True))[0].outputs[0]
    assert out.text == llm.get_tokenizer().decode(out.token_ids)


def test_stop_string_not_emitted(llm):
    base = llm.generate("The capital of France is", greedy(max_tokens=12, ignore_eos=True))[0].outputs[0].text
    assert "Paris" in base
    stop_at = base.index("Paris") + 2  # a stop string inside a word: "ri" may span tokens
    stop = base[stop_at : stop_at + 2]
    out = llm.generate("The capital of France is", greedy(max_tokens=12, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base[: base.index(stop)]
    out = llm.generate(
        "The capital of France is", greedy(max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert out.text == base[: base.index(stop) + len(stop)]


def test_stop_string_completed_by_the_last_allowed_token_is_stop_not_length(llm):
    """runtime/stop.py precedence through the whole engine: a stop string matched on the token that
    also reaches max_tokens finishes with "stop" (and the string), not "length"."""
    prompt = "The capital of France is"
    full = llm.generate(prompt, greedy(max_tokens=8, ignore_eos=True))[0].outputs[0]
    tok = llm.get_tokenizer()
    before_last = tok.decode(full.token_ids[:-1])
    assert full.text.startswith(before_last) and len(full.text) > len(before_last)
    stop = full.text[len(before_last) - 1 :]  # ends in the last token's text, starts one char earlier
    out = llm.generate(prompt, greedy(max_tokens=8, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.token_ids == full.token_ids
    assert out.text == full.text[: full.text.index(stop)]
    assert (
        llm.generate(prompt, greedy(max_tokens=7, ignore_eos=True, stop=[stop]))[0].outputs[0].finish_reason
        == "length"
    )


def test_chat_uses_the_models_template(llm):
    messages = [
        {"role": "system", "content": "You are a geography expert."},
        {"role": "user", "content": "What is the capital of France? Answer in one word."},
    ]
    out = llm.chat(messages, greedy(max_tokens=16))[0]
    assert "<|im_start|>assistant" in out.prompt  # ChatML from the GGUF metadata
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # the model ends its turn with <|im_end|>
    assert "<|im_end|>" not in out.outputs[0].text


def test_n_samples_and_logprobs_text(llm):
    out = llm.generate(
        "Once upon a time", SamplingParams(temperature=1.0, n=3, seed=3, max_tokens=10, logprobs=2)
    )[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert tok in lp and lp[tok].decoded_token == llm.get_tokenizer().decode(
                [tok], skip_special_tokens=False
            )


def test_async_scheduling_gives_the_same_text(llm):
    """Pipelined steps (the CUDA default) read tokens back one step late; stop strings and EOS
    that end a completion while the next step is in flight must not change the output."""
    pipelined = LLM(max_model_len=1024, num_kv_blocks=256, async_scheduling=True)
    prompts = ["The capital of France is", "Write a haiku about the sea:"]
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    for p in [
        greedy(max_tokens=20, stop=["."]),
        greedy(max_tokens=20),
        greedy(max_tokens=12, ignore_eos=True),
    ]:
        want = [o.outputs[0] for o in llm.generate(prompts, p)]
        got = [o.outputs[0] for o in pipelined.generate(prompts, p)]
        assert [(c.text, c.token_ids, c.finish_reason) for c in got] == [
            (c.text, c.token_ids, c.finish_reason) for c in want
        ]
    want = llm.chat(messages, greedy(max_tokens=16))[0].outputs[0]
    got = pipelined.chat(messages, greedy(max_tokens=16))[0].outputs[0]
    assert (got.text, got.finish_reason) == (want.text, want.finish_reason) and got.finish_reason == "stop"
    assert pipelined.engine.scheduler.kv.num_free_blocks == pipelined.engine.num_kv_blocks


README_CHATS = [  # the README's chat example, and the three questions benchmarks/cpu_decode_step.py checks
    "What is the capital of France?",
    "What is the capital of Germany?",
    "What is 2+2?",
]


def test_packed_default_answers_as_float32(llm):
    """The default on CPU keeps the GGUF weights packed (int4/int8 kernels, bf16 activations); its
    greedy answers to the README's questions are the float32 dequantize-at-load path's, word for
    word (the bf16 LM head alone answered "L'Étoile, la Marseillaise, ..." to the first one)."""
    from fleetserve.runtime.models.quant import PackedEmbedding, PackedLinear

    model = llm.engine.runner.model
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, PackedLinear)
    assert isinstance(model.model.embed_tokens, PackedEmbedding)
    ref = LLM(max_model_len=1024, num_kv_blocks=64, gguf_weights="dequantize")
    p = greedy(max_tokens=24)
    for q in README_CHATS:
        ours = llm.chat([{"role": "user", "content": q}], p)[0].outputs[0].text
        theirs = ref.chat([{"role": "user", "content": q}], p)[0].outputs[0].text
        assert ours == theirs, (q, ours, theirs)
    assert "Paris" in llm.chat([{"role": "user", "content": README_CHATS[0]}], p)[0].outputs[0].text
    prompt = "The capital of France is"
    assert (
        llm.generate(prompt, greedy(max_tokens=8))[0].outputs[0].text
        == ref.generate(prompt, greedy(max_tokens=8))[0].outputs[0].text
    )
