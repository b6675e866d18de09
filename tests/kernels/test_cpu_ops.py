"""The CPU engine's op set (get_ops("cpu")) against the torch references: RMSNorm (with and without
the fused residual), RoPE (q and k as neighbouring views of one fused qkv output, and as separate
tensors), the KV-cache write (and its fallback for padding slots), and a whole tiny model's greedy
tokens through the engine with both sets.

The lean CPU forward's ops (runtime/models/cpu_forward.py) must give the module path's values bit
for bit, so they are compared with torch.equal: in-place RoPE from per-step factors, the one-copy
K|V write, SiLU/GELU-and-mul of a packed matmul's bf16 output, RMSNorm of a bf16 output plus a
float32 residual."""

from __future__ import annotations

import pytest
import torch

from fleetserve.kernels import get_ops
from fleetserve.kernels.activation import (
    gelu_tanh_and_mul_cpu,
    gelu_tanh_and_mul_ref,
    silu_and_mul_cpu,
    silu_and_mul_ref,
)
from fleetserve.kernels.cache import write_kv_cache_cpu, write_kv_cache_fused_cpu, write_kv_cache_ref
from fleetserve.kernels.norm import rms_norm_cpu, rms_norm_ref
from fleetserve.kernels.rotary import (
    rotary_embedding_cpu,
    rotary_embedding_ref,
    rotary_factors_cpu,
    rotary_inplace_cpu,
)


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


@pytest.mark.parametrize("T", [1, 6])
def test_rms_norm_cpu_of_bf16_output_and_float32_residual(T):
    """A packed matmul's bf16 output + the float32 residual: the add upcasts it, exactly as an
    explicit cast first (the module path) and as the reference does."""
    x = torch.randn(T, 96, generator=_g(11)).bfloat16()
    r = torch.randn(T, 96, generator=_g(12))
    w = torch.randn(96, generator=_g(13))
    y, s = rms_norm_cpu(x, w, 1e-5, r)
    y32, s32 = rms_norm_cpu(x.float(), w, 1e-5, r)
    assert s.dtype == y.dtype == torch.float32
    assert torch.equal(y, y32) and torch.equal(s, s32)
    yr, sr = rms_norm_ref(x, w, 1e-5, r)
    assert torch.equal(s, sr)
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("D", [32, 64])
def test_rotary_inplace_equals_reference_bitwise(T, D):
    Hq, Hkv = 9, 3
    table = torch.randn(64, D, generator=_g(14))
    pos = torch.tensor([3, 0, 63, 17, 8][:T])
    # the fused qkv output: q|k rotated in place through a strided view, v left alone
    buf = torch.randn(T, (Hq + 2 * Hkv) * D, generator=_g(15)) * 3
    q = buf.view(T, -1, D)[:, :Hq].clone()
    k = buf.view(T, -1, D)[:, Hq : Hq + Hkv].clone()
    v = buf.view(T, -1, D)[:, Hq + Hkv :].clone()
    qk = buf.view(T, -1, D)[:, : Hq + Hkv]
    assert not qk.is_contiguous() or T == 1
    factors = rotary_factors_cpu(pos, table)
    assert factors[0].shape == factors[1].shape == (T, 1, D)
    rotary_inplace_cpu(qk, factors)
    qr, kr = rotary_embedding_ref(pos, q, k, table)
    assert torch.equal(qk[:, :Hq], qr) and torch.equal(qk[:, Hq:], kr)
    assert torch.equal(buf.view(T, -1, D)[:, Hq + Hkv :], v)  # v untouched
    assert not torch.equal(qr, q)  # the rotation did something


def test_write_kv_cache_fused_equals_reference():
    T, Hkv, D = 3, 2, 8
    buf = torch.randn(T, (4 + 2 * Hkv) * D, generator=_g(16))  # [q (4 heads) | k | v] rows
    kv = buf.view(T, -1, D)[:, 4:].view(T, 2, Hkv, D).transpose(0, 1)  # [2, T, Hkv, D], strided
    slots = torch.tensor([9, 0, 30])
    a, b = torch.zeros(2, 4, 8, Hkv, D), torch.zeros(2, 4, 8, Hkv, D)
    write_kv_cache_fused_cpu(kv, a, slots)
    write_kv_cache_ref(kv[0], kv[1], b, slots)
    assert torch.equal(a, b) and a.abs().sum() > 0
    with pytest.raises((IndexError, RuntimeError)):  # a padding slot is refused, never wrapped around
        write_kv_cache_fused_cpu(kv, a, torch.tensor([9, -1, 30]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "ops",
    [(silu_and_mul_cpu, silu_and_mul_ref), (gelu_tanh_and_mul_cpu, gelu_tanh_and_mul_ref)],
    ids=["silu", "gelu"],
)
def test_gated_activations_cpu_equal_reference_of_float32_input(dtype, ops):
    cpu, ref = ops
    x = (torch.randn(4, 2 * 48, generator=_g(17)) * 4).to(dtype)
    before = x.clone()
    out = cpu(x)
    assert out.dtype == torch.float32 and out.shape == (4, 48)
    assert torch.equal(out, ref(x.float()))
    assert torch.equal(x, before)  # input untouched (the float32 gate is not activated in place)


@pytest.mark.parametrize("H", [576, 40])
def test_rms_norm_rows(H):
    # the C kernel (H a multiple of 16, where it is built) or torch's fused op: torch's values, each row
    # on its own
    from fleetserve.kernels.norm import rms_norm_rows

    x = torch.randn(5, H, generator=_g(7)) * 3
    w = torch.randn(H, generator=_g(8))
    y = rms_norm_rows(x, w, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (H,), w, 1e-5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, rms_norm_ref(x, w, 1e-5), rtol=1e-6, atol=1e-6)
    assert torch.equal(rms_norm_rows(x[2:3], w, 1e-5), y[2:3])
