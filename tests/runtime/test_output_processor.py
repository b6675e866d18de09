"""OutputProcessor (HTTP side of the engine-core split): deltas, stop strings, finishes, aborts.

Driven with the core's wire tuples (runtime/engine_core.py) and a byte-level stand-in tokenizer
(token id = one byte), so that texts and stop strings are easy to read.
"""

from __future__ import annotations

from fleetserve.runtime.async_engine import merge_deltas
from fleetserve.runtime.output_processor import OutputKind, OutputProcessor
from fleetserve.runtime.sampling_params import SamplingParams


class ByteTok:
    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if not (skip_special_tokens and i == 0)).decode(errors="replace")


def ids(text: str) -> list[int]:
    return list(text.encode())


def out(rid, comps, finished=False):
    return (rid, finished, 0, None, comps, None)


def comp(index, text, reason=None, stop_reason=None):
    return (index, ids(text), None, None, reason, stop_reason)


def make(params, kind=OutputKind.DELTA, rid="r"):
    aborted = []
    p = OutputProcessor(ByteTok(), aborted.append)
    p.add(rid, None, ids("prompt: "), params, kind, 0.0)
    return p, aborted


def test_delta_outputs_are_their_own_copies_and_join_to_the_text():
    p, aborted = make(SamplingParams(max_tokens=10))
    ((_, first),) = p.process([out("r", [comp(0, "ab")])], 1.0)[0]
    ((_, second),) = p.process([out("r", [comp(0, "cd")])], 2.0)[0]
    assert first.outputs[0].token_ids == ids("ab") and first.outputs[0].text == "ab"  # not grown by "cd"
    assert second.outputs[0].token_ids == ids("cd") and second.outputs[0].text == "cd"
    ((_, last),) = p.process([out("r", [comp(0, "e", "length")], finished=True)], 3.0)[0]
    assert last.finished and last.outputs[0].finish_reason == "length" and not aborted and not p.requests
    merged = merge_deltas(merge_deltas(first, second), last)
    assert merged.outputs[0].text == "abcde" and merged.outputs[0].token_ids == ids("abcde")
    assert merged.finished and merged.outputs[0].finish_reason == "length"


def test_stop_string_ends_the_completion_at_its_token_and_aborts_the_core_once():
    p, aborted = make(SamplingParams(max_tokens=50, stop=["XY"]))
    delivered, progress = p.process([out("r", [comp(0, "hello X")])], 1.0)
    assert delivered[0][1].outputs[0].text == "hello "  # "X" held back: a stop string could start there
    delivered, progress = p.process([out("r", [comp(0, "Yrest")])], 2.0)
    o = delivered[0][1]
    assert o.finished and o.outputs[0].finish_reason == "stop" and o.outputs[0].stop_reason == "XY"
    assert o.outputs[0].text == "" and o.outputs[0].token_ids == ids("Y")  # tokens after the stop dropped
    assert aborted == ["r"] and progress[0].finished and progress[0].num_output_tokens == len("hello XY")
    # The core's abort output that follows is ignored.
    assert p.process([out("r", [comp(0, "", "abort")], finished=True)], 3.0) == ([], [])


def test_include_stop_str_and_min_tokens():
    p, _ = make(
        SamplingParams(max_tokens=50, stop=["b"], include_stop_str_in_output=True, min_tokens=2),
        kind=OutputKind.FINAL,
    )
    # "b" inside the first min_tokens tokens does not stop; the next one does.
    assert p.process([out("r", [comp(0, "ab")])], 1.0)[0] == []
    ((_, o),) = p.process([out("r", [comp(0, "cbd")])], 2.0)[0]
    assert o.outputs[0].text == "abcb" and o.outputs[0].finish_reason == "stop"


def test_eos_text_left_out_and_length_rewritten_to_stop_when_the_last_token_completes_a_stop_string():
    p, aborted = make(SamplingParams(max_tokens=3), kind=OutputKind.CUMULATIVE)
    ((_, o),) = p.process([out("r", [(0, ids("ok") + [0], None, None, "stop", None)], finished=True)], 1.0)[0]
    assert o.outputs[0].text == "ok" and o.outputs[0].token_ids == ids("ok") + [0] and not aborted
    p, aborted = make(SamplingParams(max_tokens=3, stop=["zz"]), kind=OutputKind.FINAL)
    ((_, o),) = p.process([out("r", [comp(0, "azz", "length")], finished=True)], 1.0)[0]
    assert (o.outputs[0].finish_reason, o.outputs[0].stop_reason, o.outputs[0].text) == ("stop", "zz", "a")
    assert not aborted  # the core had finished it already


def test_n2_one_completion_stopped_here_the_request_ends_with_the_other():
    p, aborted = make(SamplingParams(n=2, max_tokens=50, stop=["!"]), kind=OutputKind.FINAL)
    assert p.process([out("r", [comp(0, "a!"), comp(1, "b")])], 1.0)[0] == []
    assert aborted == []  # completion 1 still runs
    assert p.process([out("r", [comp(0, "ignored"), comp(1, "c")])], 2.0)[0] == []
    ((_, o),) = p.process([out("r", [comp(1, "!x")])], 3.0)[0]
    assert [(c.text, c.finish_reason) for c in o.outputs] == [("a", "stop"), ("bc", "stop")]
    assert aborted == ["r"]


def test_logprobs_rebuilt_with_token_strings():
    p, _ = make(SamplingParams(max_tokens=5, logprobs=1), kind=OutputKind.FINAL)
    packed = [((ord("a"), ord("b")), (-0.1, -2.5), (1, 2))]
    ((_, o),) = p.process([out("r", [(0, ids("a"), packed, -0.1, "length", None)], finished=True)], 1.0)[0]
    lp = o.outputs[0].logprobs[0]
    assert list(lp) == [ord("a"), ord("b")] and lp[ord("b")].rank == 2 and lp[ord("a")].decoded_token == "a"
    assert o.outputs[0].cumulative_logprob == -0.1
