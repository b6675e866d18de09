"""Test tiers: CPU by default; `gpu` tests skip without CUDA, `e2e` tests unless FLEETSERVE_E2E=1.

Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection start.
"""

import gc
import os
import shutil

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


@pytest.fixture(autouse=True)
def _free_cuda_between_gpu_tests(request):
    """An engine can sit in a reference cycle (bound methods, suspended generators) until the garbage
    collector runs; a GPU test sizing its KV cache from free memory must not see the last test's engine."""
    if "gpu" not in request.keywords or not _HAS_GPU:
        yield
        return
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()
