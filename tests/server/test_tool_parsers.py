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
