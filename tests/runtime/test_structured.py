"""Structured outputs below the server: the bitmask step against a reference, the grammar
compiler (cache, errors, time limit) and constrained generation in the real engine with the
embedded SmolLM2 on CPU (n > 1, logprobs, stop strings, preemption, prefix caching)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

pytest.importorskip("xgrammar")

from fleetserve.runtime.sampler import Sampler, SamplingRow, SamplingTensors  # noqa: E402
from fleetserve.runtime.sampling_params import SamplingParams  # noqa: E402
from fleetserve.runtime.structured import StructuredOutputsParams, TokenMask  # noqa: E402
from fleetserve.runtime.structured.bitmask import apply_token_bitmask, apply_token_bitmask_ref, unpack_bitmask  # noqa: E402
from fleetserve.runtime.structured.grammar import GrammarCompiler, GrammarError  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


# ----------------------------------------------------------------- bitmask step


@pytest.mark.parametrize("V", [32, 77, 200])
@pytest.mark.parametrize("rows", [None, [1], [0, 2]])
def test_apply_token_bitmask_matches_reference(V, rows):
    g = torch.Generator().manual_seed(V)
    B = 3
    logits = torch.randn(B, V, generator=g)
    R = B if rows is None else len(rows)
    words = (V + 31) // 32
    bitmask = torch.randint(-(1 << 31), (1 << 31) - 1, (R, words), generator=g, dtype=torch.int64).to(
        torch.int32
    )
    bitmask[0, 0] = -1  # all 32 bits (sign bit included)
    want = apply_token_bitmask_ref(logits, bitmask, rows)
    got = apply_token_bitmask(
        logits.clone(), TokenMask(bitmask, None if rows is None else torch.tensor(rows))
    )
    assert torch.equal(got, want)
    # and against xgrammar's own CPU kernel
    import xgrammar as xgr

    theirs = logits.clone()
    full = torch.full((B, words), -1, dtype=torch.int32)  # xgrammar indexes mask rows like logits rows
    full[list(range(B)) if rows is None else rows] = bitmask
    xgr.apply_token_bitmask_inplace(theirs, full, indices=rows, vocab_size=V)
    assert torch.equal(theirs, want)


def test_unpack_bitmask_pads_ids_past_the_mask():
    allowed = unpack_bitmask(torch.tensor([[-1]], dtype=torch.int32), 40)
    assert allowed[0, :32].all() and not allowed[0, 32:].any()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_only_samples_allowed_tokens(temperature):
    V = 64
    logits = torch.randn(4, V)
    allowed = [[5], [7, 8, 63], [], [0]]  # row 2 unconstrained
    rows = [0, 1, 3]
    bm = torch.zeros(3, 2, dtype=torch.int32)
    for k, r in enumerate(rows):
        for t in allowed[r]:
            bm[k, t // 32] |= -(1 << 31) if t % 32 == 31 else 1 << (t % 32)
    for seed in range(20):
        rs = [
            SamplingRow(SamplingParams(temperature=temperature, logprobs=1 if seed % 2 else None), seed=seed)
            for _ in range(4)
        ]
        st = SamplingTensors.build(rs, V, "cpu")
        out = Sampler(compile=False)(logits.clone(), st, TokenMask(bm, torch.tensor(rows)))
        toks = out.token_ids.tolist()
        for r in rows:
            assert toks[r] in allowed[r]
        if temperature == 0.0:
            assert toks[2] == int(logits[2].argmax())
        if out.logprobs is not None:  # logprobs are of the raw model output
            raw = torch.log_softmax(logits, -1)
            assert torch.allclose(out.logprobs.logprobs[:, 0], raw.gather(1, out.token_ids[:, None])[:, 0])


# ----------------------------------------------------------------- compiler


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer):
    c = GrammarCompiler(smollm2_tokenizer, 49152, sorted(smollm2_tokenizer.eos_token_ids), compile_timeout=30)
    yield c
    c.shutdown()


def test_grammar_cache_hit(compiler):
    a = StructuredOutputsParams(json=SCHEMA)
    b = StructuredOutputsParams(
        json=json.dumps(dict(reversed(list(SCHEMA.items()))))
    )  # same schema, other text
    hits, misses = compiler.hits, compiler.misses
    g1 = compiler.compile(a)
    assert (compiler.hits, compiler.misses) == (hits, misses + 1)
    t0 = time.perf_counter()
    g2 = compiler.compile(b)
    assert time.perf_counter() - t0 < 0.01
    assert g2 is g1 and (compiler.hits, compiler.misses) == (hits + 1, misses + 1)
    compiler.compile(StructuredOutputsParams(regex="[0-9]+"))
    assert compiler.misses == misses + 2


@pytest.mark.parametrize(
    "so, param, words",
    [
        (
            dict(json={"type": "object", "properties": {"a": {"type": "no-such-type"}}}),
            "json_schema",
            "schema",
        ),
        (dict(regex="[0-9"), "regex", "regex"),
        (dict(grammar='root ::= "a" | undefined_rule'), "grammar", "grammar"),
    ],
)
def test_compile_errors_name_the_problem(compiler, so, param, words):
    with pytest.raises(GrammarError) as ei:
        compiler.compile(StructuredOutputsParams(**so))
    assert ei.value.param == param and words in str(ei.value)


def test_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")


def test_compile_time_and_size_are_bounded(compiler, monkeypatch):
    with pytest.raises(GrammarError, match="bytes"):
        compiler.compile(StructuredOutputsParams(regex="a" * (compiler.max_spec_bytes + 1)))
    # Stand-in for a pathological grammar: a compile step that sleeps (mock, named as such).
    real = compiler._compile
    monkeypatch.setattr(compiler, "_compile", lambda so: (time.sleep(1.0), real(so))[1])
    t0 = time.perf_counter()
    with pytest.raises(GrammarError, match="did not compile within"):
        compiler.compile(StructuredOutputsParams(regex="slow[a-z]+"), timeout=0.2)
    assert time.perf_counter() - t0 < 0.9


# A moderate JSON schema (~1 KB: nested object, arrays, enums, patterns, bounds).
MODERATE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 64},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9.]+\\.[a-z]{2,}$"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["US", "FR", "DE", "JP"]},
            },
            "required": ["street", "country"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "status": {"enum": ["new", "paid", "shipped"]}},
                "required": ["id", "status"],
                "additionalProperties": False,
            },
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "active"],
    "additionalProperties": False,
}

BAD_CONSTRAINTS = [
    dict(json={"type": "object", "properties": {"a": {"type": "no-such-type"}}}),
    dict(json={"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}),
    dict(json={"type": "string", "minLength": 5, "maxLength": 2}),
    dict(json={"$ref": "#/defs/missing"}),
    dict(regex="[0-9"),
    dict(regex="(?<=a)b"),
    dict(grammar='root ::= "a" | undefined_rule'),
    dict(grammar='root ::= "a" | '),
]


@pytest.mark.parametrize("so", BAD_CONSTRAINTS)
def test_parse_only_check_refuses_what_the_compile_refuses(compiler, so):
    """The HTTP side of a split server checks constraints without a vocabulary (check_constraint):
    the same error (message and field) as the compile the core would run."""
    from fleetserve.runtime.structured.grammar import check_constraint

    params = StructuredOutputsParams(**so)
    with pytest.raises(GrammarError) as compiled:
        compiler.compile(params)
    with pytest.raises(GrammarError) as checked:
        check_constraint(params, compiler.max_spec_bytes)
    assert (str(checked.value), checked.value.param) == (str(compiled.value), compiled.value.param)


def test_parse_only_check_accepts_and_is_cheap(compiler):
    """Good constraints pass; a moderate schema checks >= 20x faster than it compiles (measured
    here on SmolLM2's vocabulary: ~0.3 ms against ~110 ms), which is why the core alone compiles."""
    from fleetserve.runtime.structured.grammar import ConstraintChecker, check_constraint

    good = [
        StructuredOutputsParams(json=MODERATE),
        StructuredOutputsParams(regex="[a-z]+@[a-z]+"),
        StructuredOutputsParams(choice=["yes", "no"]),
        StructuredOutputsParams(grammar='root ::= "a" | "b"'),
        StructuredOutputsParams(json_object=True),
    ]
    for so in good:
        check_constraint(so, compiler.max_spec_bytes)
    with pytest.raises(GrammarError, match="bytes"):
        check_constraint(StructuredOutputsParams(regex="a" * 2000), 1024)
    so = StructuredOutputsParams(json=MODERATE, disable_any_whitespace=True)
    t0 = time.perf_counter()
    check_constraint(so, compiler.max_spec_bytes)
    check_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile(so)
    compile_s = time.perf_counter() - t0
    assert check_s * 20 < compile_s, f"check {check_s * 1e3:.1f} ms vs compile {compile_s * 1e3:.1f} ms"
    checker = ConstraintChecker(max_spec_bytes=compiler.max_spec_bytes)
    try:
        assert checker.submit(so).result(5) is None
        assert checker.submit(so).done()  # remembered: no second parse
        with pytest.raises(GrammarError):
            checker.submit(StructuredOutputsParams(regex="[0-9")).result(5)
    finally:
        checker.shutdown()


# ----------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.engine import LLMEngine

    return LLMEngine(EngineConfig(device="cpu", max_model_len=256, num_kv_blocks=64, max_num_seqs=8, seed=0))


def _run(engine, reqs):
    for rid, prompt, params in reqs:
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _chat(engine, text):
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)


def _valid(obj) -> bool:
    return (
        isinstance(obj, dict)
        and set(obj) == {"name", "age"}
        and isinstance(obj["name"], str)
        and len(obj["name"]) <= 12
        and isinstance(obj["age"], int)
        and 0 <= obj["age"] <= 120
    )


def test_engine_json_schema_n2_logprobs_seeds(engine):
    so = StructuredOutputsParams(json=SCHEMA)
    prompt = _chat(engine, "Describe a person as JSON with name and age.")
    reqs = [
        (
            f"j{s}",
            prompt,
            SamplingParams(temperature=1.0, seed=s, n=2, max_tokens=40, logprobs=1, structured_outputs=so),
        )
        for s in range(3)
    ]
    done = _run(engine, reqs)
    for out in done.values():
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            assert _valid(json.loads(c.text)), c.text
            assert len(c.logprobs) == len(c.token_ids)


def test_engine_regex_choice_and_stop_string(engine):
    prompt = _chat(engine, "Give me a date.")
    done = _run(
        engine,
        [
            (
                "re",
                prompt,
                SamplingParams(
                    temperature=1.0,
                    seed=1,
                    max_tokens=20,
                    structured_outputs=StructuredOutputsParams(regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"),
                ),
            ),
            (
                "ch",
                prompt,
                SamplingParams(
                    temperature=1.0,
                    seed=2,
                    max_tokens=10,
                    structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe so"]),
                ),
            ),
            (
                "st",
                prompt,
                SamplingParams(
                    temperature=0.0,
                    max_tokens=20,
                    stop=["-"],
                    structured_outputs=StructuredOutputsParams(regex=r"20[0-9]{2}-[01][0-9]"),
                ),
            ),
        ],
    )
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", done["re"].outputs[0].text)
    assert done["ch"].outputs[0].text in ("yes", "no", "maybe so")
    st = done["st"].outputs[0]
    assert re.fullmatch(r"20[0-9]{2}", st.text) and st.stop_reason == "-"


def test_engine_structured_survives_preemption_and_prefix_cache(smollm2_path):
    """Tight KV cache (preemptions) and a shared prompt (prefix hits): same tokens as a roomy run."""
    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.engine import LLMEngine

    so = StructuredOutputsParams(json=SCHEMA)
    results = []
    for blocks in (64, 8):
        eng = LLMEngine(
            EngineConfig(
                device="cpu", max_model_len=128, num_kv_blocks=blocks, block_size=16, max_num_seqs=4, seed=0
            )
        )
        reqs = [
            (
                f"p{s}",
                _chat(eng, f"Describe person number {s} as JSON with name and age."),
                SamplingParams(temperature=1.0, seed=s, max_tokens=30, structured_outputs=so),
            )
            for s in range(4)
        ]
        done = _run(eng, reqs[:1])  # first alone: the others then hit its prompt blocks in the prefix cache
        done.update(_run(eng, reqs[1:]))
        results.append({k: v.outputs[0].token_ids for k, v in done.items()})
        if blocks == 8:
            assert eng.scheduler.num_preemptions > 0
        assert eng.scheduler.kv.prefix_cache_hits > 0
        for v in done.values():
            if v.outputs[0].finish_reason == "stop":
                assert _valid(json.loads(v.outputs[0].text))
    assert results[0] == results[1]


def test_engine_compiles_off_thread_and_fails_cleanly(engine):
    """A grammar not in the cache: add_request returns at once, the request waits for the compile;
    a grammar that fails compiling ends its request (abort, reason given) without touching others."""
    so = StructuredOutputsParams(regex=r"(ab){2,4}")
    prompt = _chat(engine, "hi")
    t0 = time.perf_counter()
    engine.add_request("late", prompt, SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=so))
    assert time.perf_counter() - t0 < 0.5
    bad = StructuredOutputsParams(grammar="root ::= nothing_defined")
    try:
        engine.add_request("bad", prompt, SamplingParams(max_tokens=5, structured_outputs=bad))
        raised = False
    except ValueError:
        raised = True  # the compile was fast enough to be seen at once: also fine
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert re.fullmatch(r"(ab){2,4}", done["late"].outputs[0].text)
    if not raised:
        assert (
            done["bad"].outputs[0].finish_reason == "abort"
            and "grammar" in done["bad"].outputs[0].stop_reason
        )


def test_engine_constraint_starts_after_given_tokens(engine):
    """start_after_token_ids (the end of a reasoning block): tokens up to and including them are
    free, what follows is constrained. The 'end' here is what greedy SmolLM2 writes first anyway."""
    prompt = _chat(engine, "Describe a person as JSON with name and age.")
    free = _run(engine, [("free", prompt, SamplingParams(temperature=0.0, max_tokens=3))])["free"].outputs[0]
    so = StructuredOutputsParams(json=SCHEMA, start_after_token_ids=tuple(free.token_ids[1:3]))
    out = _run(
        engine, [("after", prompt, SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=so))]
    )
    c = out["after"].outputs[0]
    assert c.token_ids[:3] == free.token_ids
    rest = engine.tokenizer.decode(c.token_ids[3:])
    assert _valid(json.loads(rest)), rest


def test_engine_pipelined_steps_give_the_same_tokens(smollm2_path):
    """Async scheduling with grammars: the next step's forward pass is queued before the previous
    step's tokens reach the grammars, its masks are filled after; same tokens as stepping one at a time."""
    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.engine import LLMEngine

    so = StructuredOutputsParams(json=SCHEMA)
    results = []
    for async_scheduling in (False, True):
        eng = LLMEngine(
            EngineConfig(
                device="cpu",
                max_model_len=256,
                num_kv_blocks=64,
                max_num_seqs=8,
                seed=0,
                async_scheduling=async_scheduling,
            )
        )
        prompt = _chat(eng, "Describe a person as JSON with name and age.")
        reqs = [
            (f"g{s}", prompt, SamplingParams(temperature=1.0, seed=s, max_tokens=30, structured_outputs=so))
            for s in range(3)
        ]
        reqs.append(("plain", prompt, SamplingParams(temperature=1.0, seed=9, max_tokens=12)))
        reqs.append(
            (
                "choice",
                prompt,
                SamplingParams(
                    temperature=0.0,
                    max_tokens=8,
                    n=2,
                    structured_outputs=StructuredOutputsParams(choice=["ab", "cd"]),
                ),
            )
        )
        done = _run(eng, reqs)
        results.append({k: [c.token_ids for c in v.outputs] for k, v in done.items()})
        for k in ("g0", "g1", "g2"):
            c = done[k].outputs[0]
            if c.finish_reason == "stop":
                assert _valid(json.loads(c.text)), c.text
    assert results[0] == results[1]


def test_engine_abort_while_compiling(engine, monkeypatch):
    """A request aborted while its grammar compiles is gone (no blocks, no output but the abort);
    the compile still lands in the cache. The slow compile is a stand-in (mock): a sleep before
    the real one."""
    c = engine.structured
    real = c._compile
    monkeypatch.setattr(c, "_compile", lambda so: (time.sleep(0.5), real(so))[1])
    so = StructuredOutputsParams(regex=r"slowly[0-9]{3}")
    engine.add_request("slow", _chat(engine, "hi"), SamplingParams(max_tokens=8, structured_outputs=so))
    assert engine.step() == []  # waiting for its grammar: nothing scheduled
    engine.abort_request("slow")
    outs = engine.step()
    assert [o.outputs[0].finish_reason for o in outs if o.request_id == "slow"] == ["abort"]
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.kv.usage == 0 and engine._num_grammar_requests == 0
    time.sleep(0.6)
    hits = c.hits
    c.compile(so)
    assert c.hits == hits + 1


def test_engine_refuses_a_grammar_past_the_compile_time_limit(engine, monkeypatch):
    """The core enforces grammar_compile_timeout itself (with the engine core in its own process the
    server only parses the constraint): a compile that takes longer ends the request (abort, with the
    reason), the engine does not wait for it, and other requests run. The slow compile is a stand-in
    (mock): a sleep before the real one, long enough that even a loaded machine's engine checks the
    limit before that compile ends (a compile done by the time of the check is used, late or not)."""
    c = engine.structured
    real = c._compile
    monkeypatch.setattr(c, "_compile", lambda so: (time.sleep(4.0), real(so))[1])
    monkeypatch.setattr(engine.config, "grammar_compile_timeout", 0.3)
    so = StructuredOutputsParams(regex=r"too slow[0-9]{4}")
    t0 = time.perf_counter()
    done = _run(
        engine,
        [
            ("slow", _chat(engine, "hi"), SamplingParams(max_tokens=4, structured_outputs=so)),
            ("plain", _chat(engine, "hi"), SamplingParams(max_tokens=4, temperature=0.0)),
        ],
    )
    took = time.perf_counter() - t0
    slow = done["slow"].outputs[0]
    assert slow.finish_reason == "abort" and "did not compile within 0.3s" in str(slow.stop_reason)
    assert done["plain"].outputs[0].finish_reason == "length"
    assert took < 3.5, f"the engine waited {took:.2f}s for a compile past its limit"
    assert engine.scheduler.kv.usage == 0 and engine._num_grammar_requests == 0
    time.sleep(4.0 - took + 0.3)  # the compile finishes in its worker and is cached


@pytest.mark.parametrize("choices", [["café", "naïve 😀"], ['say "hi"', "back\\slash", "new\nline"], ["a"]])
def test_choice_literals_accept_exactly_their_tokens(compiler, smollm2_tokenizer, choices):
    so = StructuredOutputsParams(choice=choices)
    compiled = compiler.compile(so)
    for text in choices:
        g = compiler.new_state(compiled, so)
        assert all(g.accept(t) for t in smollm2_tokenizer.encode(text, add_special_tokens=False)), text
        assert g.accept(2) and g.terminated  # then only EOS
    g = compiler.new_state(compiled, so)
    assert not g.accept(smollm2_tokenizer.encode("zzz", add_special_tokens=False)[0])


def test_compile_error_messages_are_clean(compiler):
    with pytest.raises(GrammarError) as ei:
        compiler.compile(StructuredOutputsParams(regex="(?<=a)b"))
    assert (
        str(ei.value) == "invalid regex: Regex parsing error at position 3: Lookbehind is not supported yet."
    )


def test_vocab_metadata_fallback_guesses_byte_level(smollm2_tokenizer, monkeypatch):
    import xgrammar as xgr

    from fleetserve.runtime.structured.grammar import _vocab_metadata

    vocab = [""] * smollm2_tokenizer.vocab_size
    for t, i in smollm2_tokenizer.backend.get_vocab(with_added_tokens=True).items():
        vocab[i] = t
    want = _vocab_metadata(xgr, smollm2_tokenizer.backend, vocab)
    assert want["vocab_type"] == xgr.VocabType.BYTE_LEVEL

    def broken(_):
        raise AttributeError("gone")

    monkeypatch.setattr(xgr.TokenizerInfo, "_detect_metadata_from_hf", staticmethod(broken))
    assert _vocab_metadata(xgr, smollm2_tokenizer.backend, vocab) == want


def test_batched_mask_fill_equals_per_row_fill(compiler, smollm2_tokenizer, monkeypatch):
    """Eight or more rows are filled by xgrammar's batch matcher (threads): same masks as one by one,
    including a row whose grammar ended (EOS only) and rows at different positions."""
    import fleetserve.runtime.structured.bitmask as bitmask
    from fleetserve.runtime.structured.bitmask import _BATCH_FILL_MIN_ROWS, fill_token_mask

    monkeypatch.setattr(bitmask, "_BATCH_THREADS", 2)
    monkeypatch.setattr(bitmask, "_BATCH_MATCHER", None)
    calls = []
    real = bitmask._batch_matcher
    monkeypatch.setattr(bitmask, "_batch_matcher", lambda: calls.append(1) or real())

    so = StructuredOutputsParams(json=SCHEMA)
    compiled = compiler.compile(so)
    text = '{"name": "Ann", "age": 42}'
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False) + [2]
    states = []
    for k in range(_BATCH_FILL_MIN_ROWS + 2):
        g = compiler.new_state(compiled, so)
        for t in ids[: k % len(ids) if k < _BATCH_FILL_MIN_ROWS + 1 else len(ids)]:
            assert g.accept(t)
        states.append(g)
    assert states[-1].terminated
    batched = fill_token_mask(list(enumerate(states)), torch.device("cpu"), len(states)).bitmask
    assert calls  # the batch path ran
    for k, g in enumerate(states):
        one = fill_token_mask([(0, g)], torch.device("cpu"), 1).bitmask
        assert torch.equal(batched[k], one[0]), k
