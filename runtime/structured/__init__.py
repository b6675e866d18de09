"""Structured outputs: constraints (params), grammar compilation and matchers (grammar, on
xgrammar, imported lazily), and the sampler's bitmask step (bitmask)."""

from .bitmask import TokenMask, apply_token_bitmask
from .params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams", "TokenMask", "apply_token_bitmask"]
