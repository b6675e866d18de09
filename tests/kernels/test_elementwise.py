"""rms_norm, rotary_embedding, silu_and_mul, gelu_tanh_and_mul and write_kv_cache: Triton against the torch references.

Small shapes on any device (the CPU interpreter in CI), fp32 and fp16; bf16 at
Llama 1B/8B sizes under the `gpu` marker. Tolerances: fp32 1e-5 (abs and rel);
fp16 2e-3; bf16 2e-2 — one or two ulps of the output dtype, since both sides
round at the same points and differ only in float32 summation order and rsqrt.
write_kv_cache is a copy and must match exactly.
"""

from __future__ import annotations

import pytest
import torch

from fleetserve.kernels import get_ops
from fleetserve.kernels.activation import (
    gelu_tanh_and_mul_ref,
    gelu_tanh_and_mul_triton,
    silu_and_mul_ref,
    silu_and_mul_triton,
)
from fleetserve.kernels.cache import write_kv_cache_ref, write_kv_cache_triton
from fleetserve.kernels.norm import rms_norm_ref, rms_norm_triton
from fleetserve.kernels.rotary import rotary_embedding_ref, rotary_embedding_triton

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
CPU_DTYPES = [torch.float32, torch.float16]


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def _rand(*shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen).to(device, dtype)


def test_get_ops_triton():
    ops = get_ops("triton")
    assert ops.name == "triton" and ops.paged_attention.__name__ == "paged_attention_triton"


# ------------------------------------------------------------------------------------------ rms_norm
def _rms_case(T, H, dtype, device, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _rand(T, H, dtype=dtype, device=device, gen=g)
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(device, dtype)
    r = _rand(T, H, dtype=dtype, device=device, gen=g) if residual else None
    got, want = rms_norm_triton(x, w, 1e-6, r), rms_norm_ref(x, w, 1e-6, r)
    if residual:
        _close(got[0], want[0], dtype)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # the sum rounds the same way
        assert not torch.equal(got[1], x)  # x itself is not modified
    else:
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("T,H", [(1, 64), (5, 100), (3, 576)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(kt, dtype, T, H, residual):
    _rms_case(T, H, dtype, kt.DEVICE, residual, seed=T * H)


def test_rms_norm_3d_and_fp32_weight(kt):
    g = torch.Generator().manual_seed(3)
    x = _rand(2, 3, 64, dtype=torch.float16, device=kt.DEVICE, gen=g)
    w = torch.randn(64, generator=g).to(kt.DEVICE)  # float32 weight promotes the output, as in torch
    got, want = rms_norm_triton(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)
    assert got.dtype == want.dtype == torch.float32 and got.shape == x.shape
    _close(got, want, torch.float16)


# ------------------------------------------------------------------------------------------ rotary
def _cos_sin(max_pos, D, device, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).float().to(device)


def _rope_case(T, Hq, Hkv, D, dtype, device, seed=0, cache=None):
    g = torch.Generator().manual_seed(seed)
    cache = _cos_sin(4096, D, device) if cache is None else cache
    pos = torch.randint(0, cache.shape[0], (T,), generator=g).to(device)
    qkv = _rand(T, (Hq + 2 * Hkv) * D, dtype=dtype, device=device, gen=g)
    q = qkv[:, : Hq * D].view(T, Hq, D)  # strided views of a fused projection, as the model passes them
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    (gq, gk), (wq, wk) = rotary_embedding_triton(pos, q, k, cache), rotary_embedding_ref(pos, q, k, cache)
    _close(gq, wq, dtype)
    _close(gk, wk, dtype)
    iq, ik = rotary_embedding_triton(pos, q.clone(), k.clone(), cache, inplace=True)
    _close(iq, wq, dtype)
    _close(ik, wk, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("T,Hq,Hkv,D", [(4, 4, 4, 32), (7, 9, 3, 64), (3, 6, 2, 48)])
def test_rotary(kt, dtype, T, Hq, Hkv, D):
    _rope_case(T, Hq, Hkv, D, dtype, kt.DEVICE, seed=T)


# ------------------------------------------------------------------------------------------ silu_and_mul
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (5, 2 * 48), (3, 2 * 1100), (2, 3, 2 * 40)])
def test_silu_and_mul(kt, dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = _rand(*shape, dtype=dtype, device=kt.DEVICE, gen=g) * 3
    _close(silu_and_mul_triton(x), silu_and_mul_ref(x), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (5, 2 * 48), (3, 2 * 1100), (2, 3, 2 * 40)])
def test_gelu_tanh_and_mul(kt, dtype, shape):
    g = torch.Generator().manual_seed(shape[-1] + 1)
    x = _rand(*shape, dtype=dtype, device=kt.DEVICE, gen=g) * 4  # far into both tails of the tanh
    want = gelu_tanh_and_mul_ref(x)
    _close(gelu_tanh_and_mul_triton(x), want, dtype)
    assert not torch.allclose(want, silu_and_mul_ref(x), atol=1e-2)  # a different function than SiLU


# ------------------------------------------------------------------------------------------ write_kv_cache
def _kv_case(T, Hkv, D, page, num_blocks, dtype, device, seed=0, huge=False):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_blocks * page if not huge else 4096, generator=g)[:T]
    if huge:  # the last blocks of a 2^31+-element cache: slot * Hkv * D overflows int32
        slots = num_blocks * page - 1 - slots
    slots[::3] = -1  # padding tokens are skipped
    slots = slots.to(device)
    kv = _rand(T, 2 * Hkv, D, dtype=dtype, device=device, gen=g)
    k, v = kv[:, :Hkv], kv[:, Hkv:]  # strided views
    if huge:
        cache = torch.empty(2, num_blocks, page, Hkv, D, dtype=dtype, device=device)
        flat = cache.view(2, -1, Hkv, D)
        touched = slots[slots >= 0].long()
        flat[:, touched] = 0.5
        want = flat[:, touched].clone()
        write_kv_cache_triton(k, v, cache, slots)
        valid = slots >= 0
        want[0], want[1] = k[valid], v[valid]
        torch.testing.assert_close(flat[:, touched], want, rtol=0, atol=0)
        return
    a = _rand(2, num_blocks, page, Hkv, D, dtype=dtype, device=device, gen=g)
    b = a.clone()
    write_kv_cache_ref(k, v, a, slots)
    write_kv_cache_triton(k, v, b, slots)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("T,Hkv,D,page", [(9, 2, 32, 16), (6, 3, 64, 8), (5, 1, 48, 4)])
def test_write_kv_cache(kt, dtype, T, Hkv, D, page):
    _kv_case(T, Hkv, D, page, 12, dtype, kt.DEVICE, seed=T)


def test_write_kv_cache_past_int32_offsets(kt):
    Hkv, D, page = 2, 64, 16
    num_blocks = (1 << 31) // (
        page * Hkv * D
    ) + 64  # block ids > 2^20; cache 2^32+ elements (lazily allocated)
    _kv_case(12, Hkv, D, page, num_blocks, torch.float16, kt.DEVICE, huge=True)


# ------------------------------------------------------------------------------------------ GPU, bf16
@pytest.mark.gpu
@pytest.mark.parametrize("H", [2048, 4096])
@pytest.mark.parametrize("T", [1, 256, 4096])
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_rms_norm(H, T, residual):
    _rms_case(T, H, torch.bfloat16, "cuda", residual, seed=T + H)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [1, 256, 4096])
def test_gpu_rotary(D, T):
    _rope_case(T, 32, 8, D, torch.bfloat16, "cuda", seed=T)


@pytest.mark.gpu
def test_gpu_rotary_llama3_scaled_cache():
    # llama3 scaling only changes the cache contents: scale the low frequencies like the HF rule
    D, base, factor, lo, hi, old_ctx = 128, 500000.0, 32.0, 1.0, 4.0, 8192
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    wavelen = 2 * torch.pi / inv
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    scaled = torch.where(
        wavelen > old_ctx / lo,
        inv / factor,
        torch.where(wavelen < old_ctx / hi, inv, (1 - smooth) * inv / factor + smooth * inv),
    )
    ang = torch.arange(131072, dtype=torch.float64)[:, None] * scaled[None]
    cache = torch.cat([ang.cos(), ang.sin()], dim=-1).float().cuda()
    _rope_case(512, 32, 8, D, torch.bfloat16, "cuda", cache=cache)


@pytest.mark.gpu
@pytest.mark.parametrize("I", [8192, 14336])
@pytest.mark.parametrize("T", [1, 256, 4096])
def test_gpu_silu_and_mul(I, T):
    g = torch.Generator().manual_seed(I + T)
    x = _rand(T, 2 * I, dtype=torch.bfloat16, device="cuda", gen=g) * 3
    _close(silu_and_mul_triton(x), silu_and_mul_ref(x), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [1, 256, 4096])
def test_gpu_write_kv_cache(D, T):
    _kv_case(T, 8, D, 16, 4096, torch.bfloat16, "cuda", seed=T)


@pytest.mark.gpu
def test_gpu_write_kv_cache_past_int32_offsets():
    Hkv, D, page = 8, 128, 16
    _kv_case(256, Hkv, D, page, (1 << 31) // (page * Hkv * D) + 64, torch.bfloat16, "cuda", huge=True)


@pytest.mark.gpu
@pytest.mark.parametrize("I", [9216, 14336])  # Gemma 2 2B / 9B intermediate sizes
@pytest.mark.parametrize("T", [1, 4096])
def test_gpu_gelu_tanh_and_mul(I, T):
    g = torch.Generator().manual_seed(I + T)
    x = (torch.randn(T, 2 * I, generator=g) * 3).to("cuda", torch.bfloat16)
    _close(gelu_tanh_and_mul_triton(x), gelu_tanh_and_mul_ref(x), torch.bfloat16)
