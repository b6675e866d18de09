"""Rotary position embedding (NeoX / Hugging Face `rotate_half` layout).

`cos_sin_cache` is [max_position, head_dim]: the first half of each row holds cos,
the second half sin, of the per-pair frequencies (llama3 or other scaling is
applied by whoever builds the cache).
"""
from __future__ import annotations

import torch


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor):
    """q: [T, Hq, D], k: [T, Hkv, D], positions: [T] -> rotated (q, k), new tensors."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rot(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def rotary_embedding_triton(positions, q, k, cos_sin_cache):  # replaced by the Triton kernel
    raise NotImplementedError("Triton rotary embedding not written yet")
