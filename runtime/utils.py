"""Small helpers shared across the runtime (no state, no device)."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints: the blocks of size b that hold a items."""
    return -(-a // b)
