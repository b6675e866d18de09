"""The C kernels' shared library (kernels/cpu_int4.c, kernels/cpu_attention.c), built at install
time by setup.py (optional: no compiler, no library) and loaded with ctypes once.

`lib()` is None where it was not built, on another architecture, or with
`FLEETSERVE_CPU_KERNELS=torch` (torch's kernels and SDPA run instead); each kernel module checks
its own CPU features on top (`fs_*_supported`). torch is imported first: the library's libgomp.so.1
is then the one torch loaded, so the kernels share torch's OpenMP threads.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from collections.abc import Callable

import torch  # noqa: F401  (loads torch's libgomp.so.1 before the library asks for it)


@functools.cache
def lib() -> ctypes.CDLL | None:
    if os.environ.get("FLEETSERVE_CPU_KERNELS", "").lower() == "torch":
        return None
    spec = importlib.util.find_spec("fleetserve.kernels._cpu_native")
    if spec is None or not spec.origin:
        return None
    return ctypes.CDLL(spec.origin)


I64, PTR, INT, FLOAT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
"""The argument types of the kernels' signatures (`kernel`)."""


def kernel(supported: str, name: str, *argtypes) -> Callable[..., None] | None:
    """The library's function `name` (returning void) with its argument types, where the library is
    loaded and its feature check `supported()` passes on this CPU; else None. Look it up once (the
    kernel modules cache it): this is not for the per-call path."""
    so = lib()
    if so is None or not getattr(so, supported)():
        return None
    fn = getattr(so, name)
    fn.argtypes, fn.restype = list(argtypes), None
    return fn
