"""Optional Triton import shared by the kernel modules.

The torch references (the CPU engine's path) must import without Triton, so each
module decorates its kernels with `jit` from here: with Triton missing (or not
usable: a CPU-only torch outside the interpreter), a kernel becomes a stub that
raises on launch instead of failing at import.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING


def _wanted() -> bool:
    """Triton runs only on a CUDA build of torch, or anywhere under TRITON_INTERPRET=1. A CPU-only
    torch without the interpreter can launch no Triton kernel, so Triton is not imported there:
    that saves ~0.35 s and ~85 MiB resident at start-up of the CPU engine (measured 2026-12-01)."""
    import torch

    return (
        torch.version.cuda is not None
        or torch.version.hip is not None
        or (os.environ.get("TRITON_INTERPRET") == "1")
    )


if TYPE_CHECKING:
    import triton
    import triton.language as tl
else:
    triton = tl = None
    if _wanted():
        try:
            import triton
            import triton.language as tl
        except ImportError:  # torch-only install: references still work
            triton = tl = None

HAS_TRITON = triton is not None


def _patch_interpreter_scalar_index() -> None:
    """Let `range()` take loaded scalars in Triton's CPU interpreter with numpy >= 2.

    The interpreter holds scalars as shape-(1,) arrays and converts them for range()
    through `int(array)`, which numpy 2 refuses for arrays of ndim > 0 ("only
    0-dimensional arrays can be converted"). Seen with triton 3.6.0, numpy 2.4.6.
    """
    import triton.runtime.interpreter as interp

    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_fleetserve_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.__dict__["_fleetserve_patched"] = True  # marks the interpreter as patched once
    interp._patch_lang_tensor = patched


if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_scalar_index()


class _MissingKernel:
    def __init__(self, fn):
        self.__name__ = fn.__name__

    def __getitem__(self, grid):
        raise ImportError(
            f"Triton is not available: kernel {self.__name__} needs triton and a CUDA build of torch "
            "(or TRITON_INTERPRET=1 set before the first import)"
        )


def jit(fn=None, *, do_not_specialize: tuple[str, ...] = ()):
    """`triton.jit`, or a stub without Triton. `do_not_specialize` names integer arguments that change
    from launch to launch (batch sizes, padded widths): Triton otherwise compiles a variant for each
    of value == 1, value % 16 == 0 and neither, and a variant first met mid-serving stalls that step
    for the compile (measured: 0.9 s on an H100 in the first step with 143 sequences)."""
    if fn is None:
        return functools.partial(jit, do_not_specialize=do_not_specialize)
    if not HAS_TRITON:
        return _MissingKernel(fn)
    return triton.jit(fn, do_not_specialize=list(do_not_specialize))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def num_sms(device_index: int | None) -> int:
    """Multiprocessor count of a CUDA device; a small stand-in on CPU (interpreter)."""
    import torch

    if device_index is None or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count
