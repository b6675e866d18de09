"""FastGGUFReader: the `gguf` package's GGUFReader with a fast path for metadata arrays.

GGUFReader builds two numpy views per element of every metadata array; a GGUF that carries
its tokenizer (49,152 tokens, 48,900 merges and 49,152 token types for SmolLM2) spends ~2.8 s
of CPU there before the first weight is read (measured 2026-12-01). This subclass reads
little-endian arrays in bulk instead: a scalar array is one numpy view, a string array one
memoryview slice per string (lengths decoded with struct). Fields keep GGUFReader's
layout (`parts` / `data` indices), so `ReaderField.contents()` returns the same values, and
tensors are GGUFReader's own. Byte-swapped files take the parent's path.
"""

from __future__ import annotations

import struct
from typing import Any

import gguf
import numpy as np

_STRING = gguf.GGUFValueType.STRING
_ARRAY = gguf.GGUFValueType.ARRAY


class FastGGUFReader(gguf.GGUFReader):
    def __init__(self, path, mode="r"):
        self._mv: memoryview | None = None
        super().__init__(path, mode)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list]:
        if int(raw_type) != _ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        offs = orig_offs
        raw_itype = self._get(offs, np.uint32)
        alen = self._get(offs + 4, np.uint64)
        offs += 12
        itype = gguf.GGUFValueType(int(raw_itype[0]))
        n = int(alen[0])
        parts: list[Any] = [raw_itype, alen]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:  # the whole array as one part: contents() flattens parts in order
            arr = self._get(offs, nptype, n)
            parts.append(arr)
            return offs + int(arr.nbytes) - orig_offs, parts, [2] if n else [], [_ARRAY, itype]
        if itype != _STRING or n == 0:  # nested arrays: rare, keep the general code
            return super()._get_field_parts(orig_offs, raw_type)
        if self._mv is None:
            self._mv = memoryview(np.asarray(self.data)).cast("B")  # type: ignore[arg-type]
        mv, unpack = self._mv, struct.Struct("<Q").unpack_from
        append = parts.append
        for _ in range(n):
            (slen,) = unpack(mv, offs)
            append(mv[offs : offs + 8])
            offs += 8
            append(mv[offs : offs + slen])
            offs += slen
        return offs - orig_offs, parts, list(range(3, 3 + 2 * n, 2)), [_ARRAY, _STRING]
