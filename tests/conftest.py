"""Test tiers: CPU by default; `gpu` tests skip without CUDA, `e2e` tests unless FLEETSERVE_E2E=1.

Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection start.
"""

import contextlib
import gc
import os
import shutil
import sys

import pytest

_HAS_GPU = shutil.which("nvidia-smi") is not None and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    gpu_ok = False
    if _HAS_GPU:
        try:
            import torch

            gpu_ok = torch.cuda.is_available()
        except ImportError:
            gpu_ok = False
    e2e_ok = os.environ.get("FLEETSERVE_E2E") == "1"
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    skip_e2e = pytest.mark.skip(reason="needs a Kubernetes cluster: set FLEETSERVE_E2E=1 with a kube context")
    for item in items:
        if "gpu" in item.keywords and not gpu_ok:
            item.add_marker(skip_gpu)
        if "e2e" in item.keywords and not e2e_ok:
            item.add_marker(skip_e2e)


# Device memory a GPU test may leave allocated (cuBLAS workspaces, the sampler's compiled kernels'
# buffers, Triton's scratch): far below any engine's weights or KV cache, which are GiBs.
CUDA_LEAK_SLACK_BYTES = 256 << 20


def _release_failure_frames() -> None:
    """pytest keeps the last failure's traceback in sys.last_* (for post-mortem debugging); its frames
    hold the failed test's locals (an LLM: all of its GPU memory), which would make every later GPU
    test fail with a KV cache of 0 blocks."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)


def cuda_allocated_after_gc() -> int:
    import torch

    _release_failure_frames()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def assert_cuda_released(baseline: int, what: str) -> None:
    """Fail loudly where device memory leaks (an engine not closed, a reference kept)."""
    held = cuda_allocated_after_gc() - baseline
    assert held < CUDA_LEAK_SLACK_BYTES, (
        f"{what} left {held / (1 << 30):.2f} GiB of CUDA memory allocated: close its LLM / shut its "
        "server down and drop references to the engine"
    )


@contextlib.contextmanager
def _cuda_released(what: str):
    import torch

    if not torch.cuda.is_available():
        yield
        return
    baseline = cuda_allocated_after_gc()
    yield
    assert_cuda_released(baseline, what)


@pytest.fixture(scope="session")
def cuda_released():
    """`with cuda_released("what"):` the block must give back the CUDA memory it allocated (for
    module-scoped fixtures that hold an engine across tests; function-scoped GPU tests are checked
    by _cuda_memory_guard)."""
    return _cuda_released


@pytest.fixture(autouse=True)
def _cuda_memory_guard(request):
    """GPU tests: start from collected garbage, and fail the test whose tensors outlive it.
    Module- and session-scoped fixtures (a server) are set up before the baseline is taken,
    so their engine counts as baseline here; their own teardown checks it with assert_cuda_released."""
    if "gpu" not in request.keywords or not _HAS_GPU:
        yield
        return
    import torch

    if not torch.cuda.is_available():
        yield
        return
    baseline = cuda_allocated_after_gc()
    yield
    _release_failure_frames()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        cuda_allocated_after_gc()  # a failed test already reports its error; free what it held
        return
    assert_cuda_released(baseline, request.node.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # the call phase's report, for _cuda_memory_guard (a failed test is not also blamed for a leak)
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep
