"""Block pool, KV cache manager and scheduler: pure CPU bookkeeping, no model."""

import pytest

from fleetserve.runtime.kv_cache import KVCacheManager
from fleetserve.runtime.request import Seq, SeqStatus
from fleetserve.runtime.sampling_params import SamplingParams
from fleetserve.runtime.scheduler import Scheduler
from fleetserve.runtime.stop import StopChecker
from fleetserve.runtime.utils import cdiv

_ids = iter(range(10**9))


def make_seq(tokens, max_tokens=8, **kw):
    p = SamplingParams(max_tokens=max_tokens, **kw)
    return Seq(
        next(_ids),
        f"r{len(tokens)}",
        0,
        list(tokens),
        p,
        seed=0,
        max_len=len(tokens) + max_tokens,
        arrival_time=0.0,
    )


def run_step(sched, token=7):
    out = sched.schedule()
    sampled = {s.seq.seq_id: token for s in out.scheduled if s.sample}
    sched.update(out, sampled, StopChecker(eos_token_ids=[0]))
    return out


def test_blocks_allocated_lazily_and_all_returned():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [make_seq(range(1, 1 + n), max_tokens=5) for n in (3, 4, 9)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert [s.num_new_tokens for s in out.scheduled] == [3, 4, 9]
    # waste is at most one partial block per sequence
    for s in seqs:
        assert len(s.block_ids) == cdiv(s.num_computed_tokens, 4)
    while sched.has_unfinished():
        run_step(sched)
    assert all(s.status == SeqStatus.FINISHED_LENGTH and s.num_output_tokens == 5 for s in seqs)
    assert kv.num_free_blocks == 16


def test_chunked_prefill_respects_token_budget():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=8)
    a, b = make_seq(range(1, 21)), make_seq(range(1, 4))
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert [(s.seq is a, s.num_new_tokens, s.sample) for s in out.scheduled] == [(True, 8, False)]
    out = run_step(sched)
    assert [(s.num_new_tokens, s.sample) for s in out.scheduled] == [(8, False)]
    out = run_step(sched)  # a finishes its prompt (4) and b's prompt (3) fits in the rest of the budget
    assert [(s.num_new_tokens, s.sample) for s in out.scheduled] == [(4, True), (3, True)]
    assert out.num_batched_tokens == 7


def test_prefix_cache_hit_shares_blocks():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    a = make_seq(range(1, 14), max_tokens=1)
    sched.add(a)
    run_step(sched)
    assert a.is_finished
    b = make_seq(list(range(1, 13)) + [99, 98], max_tokens=1)
    sched.add(b)
    out = run_step(sched)
    assert b.num_cached_tokens == 12 and out.scheduled[0].num_new_tokens == 2
    assert kv.prefix_cache_hits == 12


def test_prefix_caching_off_computes_everything():
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    for _ in range(2):
        s = make_seq(range(1, 14), max_tokens=1)
        sched.add(s)
        out = run_step(sched)
        assert out.scheduled[0].num_new_tokens == 13


def test_preemption_when_blocks_run_out_and_everything_returns():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [make_seq(range(1, 8), max_tokens=10) for _ in range(2)]  # each needs up to 5 blocks
    for s in seqs:
        sched.add(s)
    preempted = 0
    for _ in range(200):
        if not sched.has_unfinished():
            break
        preempted += len(run_step(sched).preempted)
    assert preempted > 0 and sched.num_preemptions == preempted
    assert all(s.num_output_tokens == 10 for s in seqs)
    assert kv.num_free_blocks == 6


def test_fork_shares_prompt_blocks_and_copies_on_write():
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    leader = make_seq(range(1, 11), max_tokens=3)  # 10 tokens: 2 full blocks + a partial one
    kids = [make_seq(range(1, 11), max_tokens=3) for _ in range(3)]
    leader.pending_forks = kids
    sched.add(leader)
    run_step(sched)
    assert all(k.status == SeqStatus.RUNNING and k.num_computed_tokens == 9 for k in kids)
    assert kv.num_free_blocks == 32 - 3  # children share all three prompt blocks
    out = sched.schedule()
    # every writer of the shared partial block copies it, except the last holder
    assert len(out.block_copies) == 3
    assert {s.num_new_tokens for s in out.scheduled} == {1}
    sched.update(out, {s.seq.seq_id: 5 for s in out.scheduled}, StopChecker([0]))
    shared_full = set(leader.block_ids[:2])
    assert all(set(k.block_ids[:2]) == shared_full for k in kids)
    while sched.has_unfinished():
        run_step(sched)
    assert kv.num_free_blocks == 32


def test_abort_frees_blocks_any_time():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=4)
    s = make_seq(range(1, 12))
    sched.add(s)
    run_step(sched)  # mid-prefill
    sched.abort([s])
    assert s.status == SeqStatus.FINISHED_ABORTED and kv.num_free_blocks == 16
    assert not sched.has_unfinished()


def test_stop_token_and_min_tokens():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    s = make_seq([1, 2, 3], max_tokens=10, stop_token_ids=[7], min_tokens=2)
    sched.add(s)
    run_step(sched, token=7)
    assert not s.is_finished  # min_tokens not reached
    run_step(sched, token=7)
    assert not s.is_finished
    run_step(sched, token=7)
    assert s.status == SeqStatus.FINISHED_STOPPED and s.stop_reason == 7


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_eos(ignore_eos):
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    s = make_seq([1, 2, 3], max_tokens=3, ignore_eos=ignore_eos)
    sched.add(s)
    run_step(sched, token=0)
    assert s.is_finished != ignore_eos
