"""The sampler's structured-output step: apply per-row token bitmasks to logits.

A bitmask row is int32 [ceil(V / 32)], bit j of word w allowing token 32 * w + j
(xgrammar's layout). `apply_token_bitmask` runs on the logits' device (CPU or
CUDA) with a handful of vectorised ops; `apply_token_bitmask_ref` is the plain
per-token loop it is tested against. The engine fills the masks on the host
while the device runs the forward pass and hands them over as `TokenMask`.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}


class TokenMask(NamedTuple):
    """Masks for some rows of one step's logits."""

    bitmask: torch.Tensor  # int32 [R, W], on the logits' device
    rows: torch.Tensor | None  # int64 [R] row indices into the logits; None = every row, in order


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return s


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [R, W] -> bool [R, vocab_size] (True = allowed); ids past 32 * W are disallowed.

    Works on the words' bytes: on little-endian machines (x86, CUDA) byte k of word w holds the
    bits of tokens 32w + 8k ... 32w + 8k + 7, so the temporaries are one byte per token (a
    256 x 128k-token batch: 33 MB, not the 131 MB of int32 shifts)."""
    assert sys.byteorder == "little"
    R = bitmask.shape[0]
    octets = bitmask.contiguous().view(torch.uint8)  # [R, 4W]
    bits = ((octets.unsqueeze(-1) >> _shifts(bitmask.device)) & 1).view(R, -1).bool()
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    pad = torch.zeros(bits.shape[0], vocab_size - bits.shape[1], dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=1)


def apply_token_bitmask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """Set disallowed tokens of the masked rows to -inf, in place; returns logits."""
    allowed = unpack_bitmask(mask.bitmask, logits.shape[1])
    if mask.rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        sub = logits.index_select(0, mask.rows).masked_fill_(~allowed, float("-inf"))
        logits.index_copy_(0, mask.rows, sub)
    return logits


def apply_token_bitmask_ref(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None
) -> torch.Tensor:
    """Reference: one token at a time, with Python integers (slow; tests only)."""
    out = logits.clone()
    words = bitmask.cpu().tolist()
    rows = list(range(len(words))) if rows is None else rows
    for r, ws in zip(rows, words):
        for t in range(out.shape[1]):
            w = t // 32
            if w >= len(ws) or not ((ws[w] & 0xFFFFFFFF) >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


_BATCH_FILL_MIN_ROWS = 8
# Threads for xgrammar's batch fill; with one it was no faster than row by row (64 rows, 2-core machine).
_BATCH_THREADS = min(8, (os.cpu_count() or 2) // 2)
_BATCH_MATCHER = None


def _batch_matcher():
    global _BATCH_MATCHER
    if _BATCH_MATCHER is None:
        import xgrammar

        _BATCH_MATCHER = xgrammar.BatchGrammarMatcher(max_threads=_BATCH_THREADS)
    return _BATCH_MATCHER


def fill_token_mask(states: list, device: torch.device, num_rows: int) -> TokenMask | None:
    """Host side: fill the bitmasks of (row, GrammarState) pairs and queue their copy to the device.
    num_rows: rows of the step's logits (rows=None when every row is masked). None if no state constrains."""
    states = [(r, g) for r, g in states if g.constrains]
    if not states:
        return None
    width = (states[0][1].vocab_size + 31) // 32  # the grammar vocabulary's (>= the tokenizer's)
    cuda = device.type == "cuda"
    host = torch.empty((len(states), width), dtype=torch.int32, pin_memory=cuda)
    batch = [k for k, (_, g) in enumerate(states) if not g.terminated]
    if len(batch) >= _BATCH_FILL_MIN_ROWS and _BATCH_THREADS >= 2:  # xgrammar fills them on its threads
        _batch_matcher().batch_fill_next_token_bitmask([states[k][1].matcher for k in batch], host, batch)
        batch_set = set(batch)
        for k, (_, g) in enumerate(states):
            if k not in batch_set:
                g.fill(host, k)
    else:
        for k, (_, g) in enumerate(states):
            g.fill(host, k)
    bitmask = host.to(device, non_blocking=cuda)
    rows = None
    if len(states) != num_rows:
        rows = (
            torch.tensor([r for r, _ in states], dtype=torch.int64).pin_memory()
            if cuda
            else torch.tensor([r for r, _ in states], dtype=torch.int64)
        )
        rows = rows.to(device, non_blocking=cuda)
    return TokenMask(bitmask, rows)
