"""Causal attention of a batch of variable-length query chunks over the paged KV cache.

One call serves prefill, chunked prefill and decode: sequence b contributes
q_len_b = query_start_loc[b+1] - query_start_loc[b] new tokens (already written
into the cache) at positions seq_lens[b] - q_len_b .. seq_lens[b] - 1, and
attends causally to all of its seq_lens[b] cached tokens, found through
block_tables[b]. Grouped-query attention: query head h reads KV head
h // (Hq // Hkv).
"""
from __future__ import annotations

import torch


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int,
                        max_seq_len: int, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; kv_cache: [2, N, block_size, Hkv, D]; query_start_loc: [B+1];
    seq_lens: [B]; block_tables: [B, max_blocks] -> out [T, Hq, D] in q's dtype.

    Vectorised over the batch (pads to the longest query and context); float32 math.
    """
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    _, _, bs, Hkv, _ = kv_cache.shape
    G = Hq // Hkv
    dev = q.device
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    seq_lens = seq_lens.long()
    ctx_lens = seq_lens - q_lens
    nblk = (max_seq_len + bs - 1) // bs
    bt = block_tables[:, :nblk].long()
    keys = kv_cache[0][bt].reshape(B, nblk * bs, Hkv, D)[:, :max_seq_len].float()
    vals = kv_cache[1][bt].reshape(B, nblk * bs, Hkv, D)[:, :max_seq_len].float()

    ar_q = torch.arange(max_query_len, device=dev)
    qmask = ar_q[None, :] < q_lens[:, None]  # [B, Mq]
    tok = (qsl[:-1, None] + ar_q[None, :]).clamp(max=max(T - 1, 0))
    qq = q[tok].float().view(B, max_query_len, Hkv, G, D)

    qpos = ctx_lens[:, None] + ar_q[None, :]  # [B, Mq]
    kpos = torch.arange(max_seq_len, device=dev)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < seq_lens[:, None, None])
    mask &= qmask[:, :, None]

    scores = torch.einsum("bqhgd,bkhd->bhgqk", qq, keys) * scale
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, vals).reshape(B, max_query_len, Hq, D)
    return out[qmask].to(q.dtype)


def paged_attention_triton(q, kv_cache, query_start_loc, seq_lens, block_tables, max_query_len, max_seq_len, scale):
    raise NotImplementedError("Triton paged attention not written yet")  # replaced by the Triton kernels
