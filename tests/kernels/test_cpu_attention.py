"""The C paged decode attention (kernels/cpu_attention.c) against `paged_attention_ref`, on caches
whose blocks are shuffled: head sizes, grouped-query ratios, sliding windows; a sequence's result
does not depend on the other sequences of the step nor on the thread count."""

from __future__ import annotations

import pytest
import torch

from fleetserve.kernels import cpu_attention
from fleetserve.kernels.attention import paged_attention_ref

pytestmark = pytest.mark.skipif(
    not cpu_attention.available(),
    reason="the C kernels are not built here, this CPU lacks AVX-512F, or FLEETSERVE_CPU_KERNELS=torch",
)


def _case(B, Hq, Hkv, D, bs=16, seed=0, max_len=90):
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, max_len, (B,), generator=g)
    nb = int((seq_lens.max() + bs - 1) // bs)
    blocks = torch.randperm(B * nb + 5, generator=g)[: B * nb].view(B, nb).to(torch.int32)
    kv = torch.randn(2, B * nb + 5, bs, Hkv, D, generator=g)
    q = torch.randn(B, Hq, D, generator=g)
    return q, kv, blocks, seq_lens


def _ref(q, kv, blocks, seq_lens, scale, window=None):
    B = q.shape[0]
    qsl = torch.arange(B + 1, dtype=torch.int32)
    return paged_attention_ref(q, kv, qsl, seq_lens, blocks, 1, int(seq_lens.max()), scale, window)


@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (4, 4, 16), (8, 1, 128), (16, 2, 256)])
@pytest.mark.parametrize("window", [None, 7])
def test_matches_reference(Hq, Hkv, D, window):
    q, kv, blocks, seq_lens = _case(5, Hq, Hkv, D)
    assert cpu_attention.usable(q, kv)
    scale = D**-0.5
    out = cpu_attention.paged_decode(q, kv, blocks, seq_lens, scale, window)
    torch.testing.assert_close(out, _ref(q, kv, blocks, seq_lens, scale, window), rtol=2e-5, atol=2e-6)


def test_large_scores_and_one_key():
    # scores far from 0 (the max is subtracted before exp), and a sequence with a single key
    q, kv, blocks, seq_lens = _case(3, 6, 2, 32, seed=1)
    q = q * 40
    seq_lens[1] = 1
    out = cpu_attention.paged_decode(q, kv, blocks, seq_lens, 0.5)
    torch.testing.assert_close(out, _ref(q, kv, blocks, seq_lens, 0.5), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out[1], kv[1, blocks[1, 0], 0].repeat_interleave(3, 0))


def test_sequences_and_threads_do_not_change_a_result():
    q, kv, blocks, seq_lens = _case(7, 9, 3, 64, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.paged_decode(q, kv, blocks, seq_lens, 0.125)
        torch.set_num_threads(3)
        three = cpu_attention.paged_decode(q, kv, blocks, seq_lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    for b in range(7):
        alone = cpu_attention.paged_decode(q[b : b + 1], kv, blocks[b : b + 1], seq_lens[b : b + 1], 0.125)
        assert torch.equal(alone, one[b : b + 1])


def test_usable_only_for_what_it_computes():
    q, kv, _, _ = _case(2, 4, 2, 64)
    assert not cpu_attention.usable(q.bfloat16(), kv)
    assert not cpu_attention.usable(q[..., :40], kv[..., :40])  # head size not a multiple of 16
    assert not cpu_attention.usable(
        torch.randn(2, 34, 64), torch.randn(2, 4, 16, 2, 64)
    )  # 17 heads per group


def test_a_decode_in_a_mixed_step_is_the_pure_decode_result():
    # the engine may put a sequence's decode beside another's prefill or not: the same attention either way
    from fleetserve.kernels.attention import paged_attention_sdpa

    _, kv, blocks, _ = _case(3, 9, 3, 64, seed=4)
    seq_lens = torch.tensor([40, 23, 57])
    qlen = torch.tensor([1, 5, 1])  # decode, a 5-token prefill chunk, decode
    q = torch.randn(int(qlen.sum()), 9, 64, generator=torch.Generator().manual_seed(5))
    qsl = torch.tensor([0, 1, 6, 7], dtype=torch.int32)
    mixed = paged_attention_sdpa(q, kv, qsl, seq_lens, blocks, 5, 57, 0.125)
    for b, row in ((0, 0), (2, 6)):
        alone = cpu_attention.paged_decode(
            q[row : row + 1], kv, blocks[b : b + 1], seq_lens[b : b + 1], 0.125
        )
        assert torch.equal(mixed[row : row + 1], alone)
    chunk = paged_attention_sdpa(
        q[1:6], kv, torch.tensor([0, 5], dtype=torch.int32), seq_lens[1:2], blocks[1:2], 5, 23, 0.125
    )
    assert torch.equal(mixed[1:6], chunk)
    ref = paged_attention_ref(q, kv, qsl, seq_lens, blocks, 5, 57, 0.125)
    torch.testing.assert_close(mixed, ref, rtol=2e-5, atol=2e-6)
