"""Tool-call and reasoning parsers on text (no server): final parse, and streaming one character
at a time reassembles to exactly the final parse (content, call names, argument text)."""

from __future__ import annotations

import json

import pytest

from fleetserve.runtime.server.reasoning import ReasoningParser
from fleetserve.runtime.server.tools import RequiredParser, ToolCallStream, forced_constraint, get_parser


def _stream(parser, text, forced=None):
    st = ToolCallStream(parser, forced)
    content, calls = "", {}
    for j in range(1, len(text) + 1):
        c, deltas = st.update(text[:j], j == len(text))
        content += c
        for k, cid, name, frag in deltas:
            e = calls.setdefault(k, {"id": None, "name": None, "args": ""})
            if cid is not None:
                assert e["id"] is None and e["args"] == "" and frag == ""  # id + name come first, once
                e["id"], e["name"] = cid, name
            else:
                assert e["id"] is not None
                e["args"] += frag
    return content, [(v["name"], v["args"]) for _, v in sorted(calls.items())]


CASES = [
    (
        "hermes",
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, 2]}}\n</tool_call>\n'
        '<tool_call>\n{"name": "f2", "arguments": {}}\n</tool_call>',
        "Sure.",
        [("get_weather", '{"city": "Paris", "n": [1, 2]}'), ("f2", "{}")],
    ),
    ("hermes", "No tools here.", "No tools here.", []),
    ("hermes", "a < b and <tool_ca", "a < b and <tool_ca", []),
    (
        "llama3_json",
        '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "}"}}',
        None,
        [("a", '{"x": 1}'), ("b", '{"y": "}"}')],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "a", "parameters": {"x": "\\"q"}}',
        None,
        [("a", '{"x": "\\"q"}')],
    ),
    ("llama3_json", "Hello {there}", "Hello {there}", []),
    ("llama3_json", "  {not a call}", "  {not a call}", []),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"q": "w"}}]',
        None,
        [("a", '{"x": 1}'), ("b", '{"q": "w"}')],
    ),
    ("mistral", 'Let me see. [TOOL_CALLS] [{"name": "a", "arguments": {}}]', "Let me see.", [("a", "{}")]),
]


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_parse_and_stream_agree(name, text, content, calls):
    p = get_parser(name)
    assert p.parse(text) == (content, calls)
    s_content, s_calls = _stream(p, text)
    assert (s_content or None) == content and s_calls == calls


def test_required_output_and_named_stream():
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]'
    assert RequiredParser().parse(text) == (None, [("a", '{"x": 1}'), ("b", "{}")])
    assert _stream(RequiredParser(), text) == ("", [("a", '{"x": 1}'), ("b", "{}")])
    assert _stream(RequiredParser(), '{"city": "Oslo"}', forced="w") == ("", [("w", '{"city": "Oslo"}')])


def test_unknown_parser():
    with pytest.raises(ValueError, match="hermes"):
        get_parser("nope")


def test_forced_constraints():
    from fleetserve.runtime.server.protocol import ChatTool, NamedToolChoice

    tools = [
        ChatTool.model_validate(
            {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}
        ),
        ChatTool.model_validate({"type": "function", "function": {"name": "b"}}),
    ]
    so = forced_constraint(tools, "required", False)
    schema = so.json_schema
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [x["properties"]["name"]["enum"] for x in schema["items"]["anyOf"]] == [["a"], ["b"]]
    assert "maxItems" not in forced_constraint(tools, "required", None).json_schema
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "b"}})
    assert forced_constraint(tools, named, None).json_schema == {"type": "object", "properties": {}}
    json.dumps(schema)


@pytest.mark.parametrize(
    "name, text, reasoning, answer",
    [
        ("deepseek_r1", "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.\n", "The answer is 4."),
        ("deepseek_r1", "<think>hmm</think>ok", "hmm", "ok"),
        ("deepseek_r1", "still thinking </thi", "still thinking </thi", ""),
        ("qwen3", "plain answer", None, "plain answer"),
        ("qwen3", "<think>a</think>\n\nb", "a", "b"),
        ("qwen3", "<thinking is a word", None, "<thinking is a word"),
    ],
)
def test_reasoning_split_and_stream(name, text, reasoning, answer):
    r = ReasoningParser(name)
    assert r.split(text) == (reasoning, answer)
    rs, an = "", ""
    for j in range(1, len(text) + 1):  # every partial view extends the previous one
        a, b = r.split(text[:j], j == len(text))
        a = a or ""
        assert a.startswith(rs) and b.startswith(an), (text[:j], a, b)
        rs, an = a, b
    assert (rs or None, an) == (reasoning, answer)


def test_reasoning_ended_in_prompt():
    assert ReasoningParser("qwen3").reasoning_ended_in_prompt(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert not ReasoningParser("deepseek_r1").reasoning_ended_in_prompt("<｜Assistant｜><think>\n")
    assert not ReasoningParser("deepseek_r1").reasoning_ended_in_prompt("no block")


# -- incremental parsing: same deltas as re-reading the whole text, work bounded per step -----------


def _cuts(rng, text):
    if rng.random() < 0.4:
        return list(text) or [""]
    cuts = (
        sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
        if len(text) > 1
        else []
    )
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])] if text else [""]


def _json_value(rng, depth=0):
    r = rng.random()
    if depth > 2 or r < 0.3:
        return rng.choice(["1", "-2.5", "true", "null", '"s"', '"a\\"}b"', '"{["', "12e3", '"\\\\"'])
    if r < 0.65:
        return (
            "{" + ", ".join(f'"k{i}": {_json_value(rng, depth + 1)}' for i in range(rng.randint(0, 3))) + "}"
        )
    return "[" + ", ".join(_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"


def _tool_text(rng, name):
    """A model answer with calls in the parser's format, spaces varied, sometimes damaged."""
    key = "parameters" if name in ("llama3_json", "required") else rng.choice(["arguments", "parameters"])

    def sp():
        return rng.choice(["", "", " ", "\n"])

    calls = [
        "{"
        + sp()
        + '"name"'
        + sp()
        + ":"
        + sp()
        + '"'
        + rng.choice(["f", "get_w", 'a\\"b'])
        + '"'
        + sp()
        + ","
        + sp()
        + f'"{key}"'
        + sp()
        + ":"
        + sp()
        + _json_value(rng)
        + sp()
        + "}"
        for _ in range(rng.randint(0, 3))
    ]
    pre = rng.choice(["", "Sure. ", "a < b ", "  ", "\n", "Hello {x} "])
    if name == "hermes":
        nl = ["", "\n"]
        body = "".join(
            "<tool_call>" + rng.choice(nl) + c + rng.choice(nl) + "</tool_call>" + rng.choice(nl)
            for c in calls
        )
    elif name == "mistral":
        body = "[TOOL_CALLS]" + rng.choice(["", " "]) + "[" + ", ".join(calls) + "]"
    elif name == "llama3_json":
        body = rng.choice(["", "<|python_tag|>"]) + rng.choice(["; ", "<|python_tag|>", ";"]).join(calls)
        pre = rng.choice(["", "", pre])
    else:
        body, pre = "[" + ", ".join(calls) + "]", ""
    text = pre + body + rng.choice(["", " trailing", "}", "\n"])
    for _ in range(rng.choice([0, 0, 1, 2])):
        if not text:
            break
        k, op = rng.randrange(len(text)), rng.random()
        if op < 0.4:
            text = text[:k] + text[k + 1 :]
        elif op < 0.8:
            text = text[:k] + rng.choice('{}[]",:x \\<') + text[k:]
        else:
            text = text[:k]
    return text


def _tool_deltas(parser, chunks, whole):
    st, text, out = ToolCallStream(parser), "", []
    for i, c in enumerate(chunks):
        text += c
        fin = i == len(chunks) - 1
        try:
            content, deltas = st.update_whole(text, fin) if whole else st.feed(c, fin)
        except ValueError as e:  # a call name with a bad JSON escape: both raise it
            out.append(repr(e))
            break
        out.append((content, [(k, cid is not None, name, frag) for k, cid, name, frag in deltas]))
    return out


def test_incremental_tool_stream_equals_rereading_the_whole_text():
    """feed() gives exactly the deltas of update_whole() (the parser's calls() over the whole text
    at every step) for thousands of generated answers cut at random places, damaged ones included."""
    import random

    rng = random.Random(0)
    for _ in range(3000):
        name = rng.choice(["hermes", "mistral", "llama3_json", "required"])
        text = _tool_text(rng, name)
        chunks = _cuts(rng, text)
        parser = RequiredParser() if name == "required" else get_parser(name)
        assert _tool_deltas(parser, chunks, False) == _tool_deltas(parser, chunks, True), (name, chunks)


def test_incremental_reasoning_equals_split_of_the_whole_text():
    """ReasoningStream gives the new parts of split(text so far) at every step (what slicing each
    split at the lengths already sent gives, late splits of a qwen3 answer included)."""
    import random

    from fleetserve.runtime.server.reasoning import ReasoningStream

    pieces = [
        "<think>",
        "</think>",
        "<",
        "</",
        "<th",
        "</thi",
        "\n",
        "\n\n",
        " ",
        "a",
        "b c",
        "x<y",
        "think>",
        "k>",
    ]
    rng = random.Random(0)
    for _ in range(4000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        chunks = _cuts(rng, text)
        for name in ("deepseek_r1", "qwen3"):
            p, st = ReasoningParser(name), None
            want, so_far, r_sent, a_sent = [], "", 0, 0
            for i, c in enumerate(chunks):
                so_far += c
                r, a = p.split(so_far, i == len(chunks) - 1)
                r = r or ""
                want.append((r[r_sent:], a[a_sent:]))
                r_sent, a_sent = max(r_sent, len(r)), max(a_sent, len(a))
            st = ReasoningStream(p)
            got = [st.feed(c, i == len(chunks) - 1) for i, c in enumerate(chunks)]
            assert got == want, (name, chunks)


def _long_stream(n_tokens):
    """~n_tokens deltas of a qwen3 + hermes answer: a reasoning block, content, one call whose
    arguments hold half of the tokens."""
    q = n_tokens // 4
    return (
        ["<think>"]
        + ["word "] * q
        + ["</think>", "\n\n"]
        + ["Sure "] * q
        + ["<tool_call>", '\n{"name": "f", "arguments": {"text": "']
        + ["abcd"] * (2 * q)
        + ['"}}', "\n</tool_call>"]
    )


def _run_long(tokens, monkeypatch=None):
    import time

    from fleetserve.runtime.server.reasoning import ReasoningStream

    r, t = ReasoningStream(ReasoningParser("qwen3")), ToolCallStream(get_parser("hermes"))
    t0 = time.perf_counter()
    n = len(tokens)
    content = args = ""
    for i, d in enumerate(tokens):
        _, answer = r.feed(d, i == n - 1)
        c, deltas = t.feed(answer, i == n - 1)
        content += c
        args += "".join(f for _, cid, _, f in deltas if cid is None)
    return time.perf_counter() - t0, content, args


def test_streamed_parsing_work_is_linear_in_the_output(monkeypatch):
    """20k tokens in deltas of one token: no step re-reads the whole text (the join that a
    re-read needs never runs), and 4x the tokens take about 4x the time (re-parsing the whole
    text at every step, as before, takes ~16x: generous bound 8x, best of 3)."""
    joins = []
    orig = ToolCallStream._text
    monkeypatch.setattr(ToolCallStream, "_text", lambda self: joins.append(1) or orig(self))
    tokens = _long_stream(20_000)
    _, content, args = _run_long(tokens)
    assert content == ("Sure " * 5000).rstrip() and json.loads(args) == {"text": "abcd" * 10_000}
    assert not joins, "a step re-read the whole text"
    small = min(_run_long(_long_stream(5_000))[0] for _ in range(3))
    large = min(_run_long(tokens)[0] for _ in range(3))
    assert large < 8 * small, f"20k tokens took {large:.3f}s, 5k took {small:.3f}s: not linear"
