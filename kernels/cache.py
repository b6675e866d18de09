"""Writing new keys and values into the paged KV cache.

Cache layout (one tensor per layer): kv_cache[2, num_blocks, block_size, num_kv_heads, head_dim],
index 0 keys, 1 values. A token's slot is block_id * block_size + offset; slot -1
marks a padding token (CUDA-graph padding) whose K/V are dropped.
"""
from __future__ import annotations

import torch


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D]; slot_mapping: [T] int. Writes in place."""
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    flat[0, slots] = k[valid].to(kv_cache.dtype)
    flat[1, slots] = v[valid].to(kv_cache.dtype)


def write_kv_cache_triton(k, v, kv_cache, slot_mapping):  # replaced by the Triton kernel
    raise NotImplementedError("Triton write_kv_cache not written yet")
