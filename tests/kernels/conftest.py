"""Shared builders for the kernel tests.

Small-shape tests run wherever Triton runs: the GPU when there is one, else the
CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton loads).
Random inputs are drawn fresh per case, never zeros, so unwritten outputs show.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class PagedBatch:
    """A batch of sequences with their new tokens' queries and a shuffled paged KV cache.

    q_lens[b] new tokens of sequence b follow ctx_lens[b] cached ones; all seq_len
    tokens' K/V are in the cache (random), at random distinct block ids. With
    `huge`, the cache holds 2^20+ blocks (allocated lazily: only blocks in use are
    touched) and the ids in use sit past 2^20, so block_id * block_stride > 2^31.
    """

    def __init__(
        self,
        q_lens,
        ctx_lens,
        num_heads,
        num_kv_heads,
        head_dim,
        page=16,
        dtype=torch.float32,
        device=DEVICE,
        extra_blocks=0,
        table_cols=None,
        huge=False,
        seed=0,
    ):
        g = torch.Generator().manual_seed(seed)
        self.q_lens, self.ctx_lens = list(q_lens), list(ctx_lens)
        B = len(self.q_lens)
        seq = [q + c for q, c in zip(self.q_lens, self.ctx_lens)]
        nblk = [-(-s // page) for s in seq]
        used = sum(nblk)
        if huge:
            num_blocks = (1 << 31) // (page * num_kv_heads * head_dim) + used + extra_blocks + 8
            ids = num_blocks - 1 - torch.randperm(used + extra_blocks, generator=g)[:used]
        else:
            num_blocks = used + extra_blocks + 4
            ids = 1 + torch.randperm(num_blocks - 1, generator=g)[:used]  # 0 stays the padding id
        cols = table_cols or max(max(nblk), 1)
        bt = torch.zeros(B, cols, dtype=torch.int32)
        i = 0
        for b in range(B):
            bt[b, : nblk[b]] = ids[i : i + nblk[b]].int()
            i += nblk[b]
        shape = (2, num_blocks, page, num_kv_heads, head_dim)
        self.kv_cache = torch.empty(shape, dtype=dtype, device=device)
        if huge:  # fill only the blocks in use
            sel = ids.long().to(device)
            self.kv_cache[:, sel] = torch.randn(2, used, page, num_kv_heads, head_dim, generator=g).to(
                device, dtype
            )
        else:
            self.kv_cache.copy_(torch.randn(shape, generator=g))
        self.block_tables = bt.to(device)
        self.seq_lens = torch.tensor(seq, dtype=torch.int32, device=device)
        qsl = [0]
        for q in self.q_lens:
            qsl.append(qsl[-1] + q)
        self.query_start_loc = torch.tensor(qsl, dtype=torch.int32, device=device)
        self.T = qsl[-1]
        self.q = torch.randn(self.T, num_heads, head_dim, generator=g).to(device, dtype)
        self.max_query_len = max(self.q_lens)
        self.max_seq_len = max(seq)
        self.scale = head_dim**-0.5

    def args(self, max_seq_len=None):
        return (
            self.q,
            self.kv_cache,
            self.query_start_loc,
            self.seq_lens,
            self.block_tables,
            self.max_query_len,
            max_seq_len or self.max_seq_len,
            self.scale,
        )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere fails."""
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture
def kt():
    """The helpers above, for test modules (conftest isn't importable under importlib mode)."""
    import types

    return types.SimpleNamespace(PagedBatch=PagedBatch, rel_err=rel_err, DEVICE=DEVICE)
