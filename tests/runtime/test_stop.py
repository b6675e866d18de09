"""runtime/stop.py: every finish reason, decided in one place, applied through Scheduler.finish.

The stop-string cases use a real IncrementalDetokenizer over a byte-level BPE trained here."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fleetserve.runtime.detokenizer import IncrementalDetokenizer
from fleetserve.runtime.kv_cache import KVCacheManager
from fleetserve.runtime.request import Seq, SeqStatus
from fleetserve.runtime.sampling_params import SamplingParams
from fleetserve.runtime.scheduler import Scheduler
from fleetserve.runtime.stop import StopChecker, StopDecision, find_stop_string, resolve, suppressed_token_ids

EOS = 0
_ids = iter(range(10**9))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t.train_from_iterator(["Hello world, the END is near. STOP here and there."] * 20, trainer)
    assert t.token_to_id("<eos>") == EOS
    return t


def make_seq(params: SamplingParams, prompt=(5, 6, 7)) -> Seq:
    max_len = len(prompt) + (params.max_tokens or 100)
    return Seq(next(_ids), "r", 0, list(prompt), params, seed=0, max_len=max_len, arrival_time=0.0)


def feed(seq: Seq, tokens, checker: StopChecker) -> tuple[int, StopDecision | None]:
    """Append tokens one at a time like Scheduler.update; stop at the first decision."""
    for i, t in enumerate(tokens):
        seq.token_ids.append(t)
        d = checker.check(seq, t)
        if d is not None:
            return i + 1, d
    return len(tokens), None


def text_checker(tok, seq: Seq) -> tuple[StopChecker, IncrementalDetokenizer]:
    det = IncrementalDetokenizer(tok, seq.prompt_token_ids, seq.params)
    return StopChecker([EOS], lambda s: det), det


def test_eos_stops_with_no_reason_and_ignore_eos_keeps_going():
    s = make_seq(SamplingParams(max_tokens=10))
    assert feed(s, [9, EOS, 9], StopChecker([EOS])) == (2, StopDecision(SeqStatus.FINISHED_STOPPED, None))
    s = make_seq(SamplingParams(max_tokens=3, ignore_eos=True))
    assert feed(s, [EOS, EOS, EOS], StopChecker([EOS])) == (3, StopDecision(SeqStatus.FINISHED_LENGTH, None))


def test_stop_token_id_is_the_reason():
    s = make_seq(SamplingParams(max_tokens=10, stop_token_ids=[42]))
    assert feed(s, [9, 42], StopChecker([EOS])) == (2, StopDecision(SeqStatus.FINISHED_STOPPED, 42))
    # ignore_eos leaves stop_token_ids in force
    s = make_seq(SamplingParams(max_tokens=10, stop_token_ids=[42], ignore_eos=True))
    assert feed(s, [EOS, 42], StopChecker([EOS])) == (2, StopDecision(SeqStatus.FINISHED_STOPPED, 42))


def test_max_tokens_is_length():
    s = make_seq(SamplingParams(max_tokens=4))
    assert feed(s, [9] * 10, StopChecker([EOS])) == (4, StopDecision(SeqStatus.FINISHED_LENGTH, None))


def test_min_tokens_beats_eos_and_stop_ids():
    p = SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=[42])
    s = make_seq(p)
    # EOS / stop ids in the first min_tokens outputs do not stop (the sampler masks them; if one
    # gets through anyway it still does not end the completion); the 4th token can.
    assert feed(s, [EOS, 42, EOS, EOS], StopChecker([EOS])) == (
        4,
        StopDecision(SeqStatus.FINISHED_STOPPED, None),
    )
    # what the sampler masks, per output position
    assert suppressed_token_ids(p, {EOS}, 0) == {EOS, 42}
    assert suppressed_token_ids(p, {EOS}, 2) == {EOS, 42}
    assert suppressed_token_ids(p, {EOS}, 3) == set()
    assert suppressed_token_ids(p.clone(ignore_eos=True), {EOS}, 0) == {42}


def test_stop_string(tok):
    s = make_seq(SamplingParams(max_tokens=50, stop=["END"]))
    checker, det = text_checker(tok, s)
    ids = tok.encode("Hello world, the END is near.").ids
    n, d = feed(s, ids, checker)
    assert d == StopDecision(SeqStatus.FINISHED_STOPPED, "END") and n < len(ids)
    assert det.output_text == "Hello world, the "


def test_stop_string_on_the_last_token_wins_over_length(tok):
    ids = tok.encode("Hello world, the END").ids
    s = make_seq(SamplingParams(max_tokens=len(ids), stop=["END"]))
    checker, det = text_checker(tok, s)
    assert feed(s, ids, checker) == (len(ids), StopDecision(SeqStatus.FINISHED_STOPPED, "END"))
    assert det.output_text == "Hello world, the "


def test_stop_string_not_matched_in_min_tokens_text(tok):
    ids = tok.encode("STOP here and STOP there").ids
    first = len(tok.encode("STOP here").ids)
    s = make_seq(SamplingParams(max_tokens=50, stop=["STOP"], min_tokens=first))
    checker, det = text_checker(tok, s)
    n, d = feed(s, ids, checker)
    assert d == StopDecision(SeqStatus.FINISHED_STOPPED, "STOP") and det.output_text == "STOP here and "


def test_eos_text_left_out_and_eos_wins_over_stop_string(tok):
    s = make_seq(SamplingParams(max_tokens=50, stop=["<eos>"], skip_special_tokens=False))
    checker, det = text_checker(tok, s)
    ids = tok.encode("Hello").ids + [EOS]
    assert feed(s, ids, checker) == (len(ids), StopDecision(SeqStatus.FINISHED_STOPPED, None))
    assert det.output_text == "Hello"


def test_find_stop_string():
    assert find_stop_string("abc STOP def END", 0, ["END", "STOP"]) == (4, "STOP")
    assert find_stop_string("abc STOP", 6, ["STOP"]) == (4, "STOP")  # spans the old/new boundary
    assert find_stop_string("abc STOP", 8, ["STOP"]) is None  # all of it searched already


def test_every_finish_goes_through_scheduler_finish(monkeypatch):
    """Stops, lengths and aborts (incl. n>1 siblings that never forked) all call Scheduler.finish."""
    kv = KVCacheManager(num_blocks=32, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    calls: list[tuple[int, SeqStatus]] = []
    real = sched.finish
    monkeypatch.setattr(
        sched,
        "finish",
        lambda seq, status, reason=None: (calls.append((seq.seq_id, status)), real(seq, status, reason)),
    )
    checker = StopChecker([EOS])
    stopped = make_seq(SamplingParams(max_tokens=5))
    lengthy = make_seq(SamplingParams(max_tokens=2, ignore_eos=True))
    for s in (stopped, lengthy):
        sched.add(s)
    for token in (9, EOS):
        out = sched.schedule()
        sched.update(out, {x.seq.seq_id: token for x in out.scheduled if x.sample}, checker)
    assert stopped.status == SeqStatus.FINISHED_STOPPED and lengthy.status == SeqStatus.FINISHED_LENGTH
    # an n=3 request aborted before its prefill: the two siblings never forked
    leader = make_seq(SamplingParams(n=3, max_tokens=5))
    kids = [
        Seq(next(_ids), "k", i, leader.prompt_token_ids, leader.params, 0, leader.max_len, 0.0)
        for i in (1, 2)
    ]
    leader.pending_forks = kids
    sched.add(leader)
    sched.abort([leader])
    assert all(s.status == SeqStatus.FINISHED_ABORTED for s in [leader, *kids])
    assert [sid for sid, _ in calls] == [
        stopped.seq_id,
        lengthy.seq_id,
        kids[0].seq_id,
        kids[1].seq_id,
        leader.seq_id,
    ]
    assert not sched.has_unfinished() and kv.num_free_blocks == 32


def test_resolve_precedence_shared_by_the_engine_and_the_output_processor():
    """The order both StopChecker (engine detokenizes) and the OutputProcessor (server) apply per token."""
    eos = StopDecision(SeqStatus.FINISHED_STOPPED, None)
    assert resolve(eos, "STOP", at_length=True) == eos  # rule 1 first
    assert resolve(None, "STOP", at_length=True) == StopDecision(
        SeqStatus.FINISHED_STOPPED, "STOP"
    )  # 2 beats 3
    assert resolve(None, None, at_length=True) == StopDecision(SeqStatus.FINISHED_LENGTH, None)
    assert resolve(None, None, at_length=False) is None
