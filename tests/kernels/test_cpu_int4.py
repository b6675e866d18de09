"""The C int4 matmul (kernels/cpu_int4.c) against its torch reference and torch's own int4 kernel,
on the layout Int4GroupWeight packs: values, a row's independence of the other rows and of the
thread count, padded row counts and each group size."""

from __future__ import annotations

import pytest
import torch

from fleetserve.kernels import cpu_int4
from fleetserve.runtime.models.quant import Int4GroupWeight

pytestmark = pytest.mark.skipif(
    not cpu_int4.available(),
    reason="the C int4 kernel is not built here, this CPU lacks AVX-512 VNNI, or FLEETSERVE_CPU_KERNELS=torch (torch's kernel runs instead)",
)


def _weight(n: int, k: int, group: int, seed: int = 0) -> Int4GroupWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    zeros = torch.randn(n, k // group, generator=g) * 0.01
    return Int4GroupWeight.from_codes(codes, scales, zeros, group)


def _mm(w: Int4GroupWeight, x: torch.Tensor) -> torch.Tensor:
    return cpu_int4.int4_mm(x, w.packed, w.scale_zeros, w.group_size, w.shape[0])


def _ref(w: Int4GroupWeight, x: torch.Tensor) -> torch.Tensor:
    return cpu_int4.int4_mm_ref(x, w.packed, w.scale_zeros, w.group_size, w.shape[0])


@pytest.mark.parametrize(
    "n,k,group", [(128, 64, 32), (100, 96, 32), (960, 576, 32), (64, 256, 64), (200, 512, 128)]
)
@pytest.mark.parametrize("m", [1, 3, 4, 7, 16])
def test_matches_reference(n, k, group, m):
    w = _weight(n, k, group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    y = _mm(w, x)
    ref = _ref(w, x)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # the reference's weights are the Int4GroupWeight's own
    torch.testing.assert_close(ref, torch.nn.functional.linear(x, w.dequantize()))
    # x's two int8 parts (the result is float32)
    bound = cpu_int4.input_error_bound(x, w.dequantize(), group)
    err = (y - ref).abs()
    assert (err <= bound).all(), (err - bound).max()
    # closer than torch's own kernel of the same layout (which rounds x and its result to bf16)
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), w.packed, group, w.scale_zeros)[:, :n]
    assert err.mean() <= (theirs.float() - ref).abs().mean()


def test_the_bound_is_not_vacuous():
    # the kernel's error comes close to its bound somewhere: a bound 100x too loose would hide a bug
    w = _weight(256, 576, 32)
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(3))
    y, ref = _mm(w, x), _ref(w, x)
    bound = cpu_int4.input_error_bound(x, w.dequantize(), 32)
    assert ((y - ref).abs() / bound).max() > 0.1


def test_rows_do_not_depend_on_the_call_or_the_threads():
    w = _weight(960, 576, 32)
    x = torch.randn(17, 576, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _mm(w, x)
        singles = torch.cat([_mm(w, x[i : i + 1]) for i in range(17)])
        torch.set_num_threads(3)  # more workers than cores: blocks split three ways
        three = _mm(w, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, singles)
    assert torch.equal(one, three)
    assert torch.equal(_mm(w, x[5:9]), one[5:9])


def test_linear_of_the_packed_formats_uses_it():
    w = _weight(128, 64, 32)
    x = torch.randn(2, 64)
    assert torch.equal(w.linear_uncast(x), _mm(w, x))


def test_rejects_a_layout_it_does_not_hold():
    w = _weight(128, 64, 32)
    with pytest.raises(ValueError, match="not one layout"):
        cpu_int4.int4_mm(torch.randn(2, 32), w.packed, w.scale_zeros, 32, 128)
    with pytest.raises(ValueError, match="not one layout"):
        cpu_int4.int4_mm(torch.randn(2, 64), w.packed, w.scale_zeros.float(), 32, 128)
    assert cpu_int4.int4_mm(torch.randn(0, 64), w.packed, w.scale_zeros, 32, 128).shape == (0, 128)
