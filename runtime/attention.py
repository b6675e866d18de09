"""AttentionMetadata: where each token of one engine step reads and writes the paged KV cache.

Built by the model runner (CPU lists -> one set of device tensors per step), read
by every attention layer of the model; the kernels in fleetserve.kernels take its
fields as plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] int64: cache slot (block_id * block_size + offset) of each scheduled token; -1 = padding."""
    query_start_loc: torch.Tensor
    """[B+1] int32: cumulative number of scheduled tokens per sequence (tokens are laid out sequence by sequence)."""
    seq_lens: torch.Tensor
    """[B] int32: context length of each sequence after this step (cached + scheduled tokens)."""
    block_tables: torch.Tensor
    """[B, max_blocks] int32: KV block ids of each sequence, padded with 0."""
    max_query_len: int
    """Largest number of scheduled tokens of one sequence (1 in a pure decode step)."""
    max_seq_len: int
    """Largest seq_lens entry (an upper bound is allowed, e.g. for CUDA graphs)."""
