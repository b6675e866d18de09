"""Packed (quantized) weight matrices and the modules that run matmuls on them.

Owns three things:
- weight formats: how one quantized [out_features, in_features] matrix is held in memory. Each
  format has a pure-torch reference, `dequantize()`, and a fast `linear(x)` per backend (today the
  CPU int4 kernel of kernels/cpu_int4.c where it is built and the CPU has AVX-512 VNNI, else
  torch's `_weight_int4pack_mm_for_cpu`; torch's `_weight_int8pack_mm`); a backend a
  format has no kernel for runs the reference. GPTQ/AWQ (group-wise int4 with scale and zero,
  the same shape of data as Int4GroupWeight) and GPU kernels slot in as a constructor and a
  `_linear_<device type>` method.
- `QuantizedTensor`: what a loader yields instead of a float tensor for a weight it leaves
  packed (runtime/loader/gguf_loader.py's GGUFTensor). `CausalLM.load_weights` turns it into a
  format (`pack()`), or into floats (`dequantize()`) where a parameter has no packed form.
- `PackedLinear` / `PackedEmbedding`: the nn.Linear / nn.Embedding stand-ins holding a format.

Why bf16 activations: the CPU int4/int8 kernels are fast only for bf16 inputs (measured on
SmolLM2's shapes: fp32 and fp16 inputs are 30-50x slower than bf16), so the packed path casts x
to bf16, accumulates in fp32 inside the kernel, and casts the result back to x's dtype. Scales
and zeros are stored in bf16 for the same reason (the kernels take them in the input's dtype).

Why the LM head's top logits are recomputed (`head_linear`): the bf16 rounding of the head's input
and output moves a logit by up to ~0.1-0.2 on SmolLM2 (logits ~40: a bf16 step is 0.125 there), which
flips greedy choices between near-equal tokens (the README's "What is the capital of France?" chat
answered "L'Étoile, ..." instead of "The capital of France is Paris."). The embedding / LM head
formats are packed with `exact_rows=True`: they keep the checkpoint's scales in float32 beside the
kernel's bf16 ones and the largest row norm. From the kernel's logits and a bound on their error,
`head_linear` finds every token that can still be the largest and recomputes those logits in float32
from the exact rows (a few per row, ~6 on average on SmolLM2): the greedy token is the one of float32
math on the file's values, whatever the roundings of the kernel. The embedding lookup reads the exact
rows too.

Everything here lives on the weights' device; nothing is kept between steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fleetserve.kernels import cpu_int4

COMPUTE_DTYPE = torch.bfloat16
"""Activation dtype of the packed CPU kernels (see the module docstring)."""
_INT4_BLOCK_N = 64  # rows per block of torch's CPU int4 layout (AVX-512 build); N is padded to it


class WeightFormat(ABC):
    """A packed [out_features, in_features] matrix: `dequantize()` is the reference, `linear()`
    the fast path, `rows()` the embedding lookup."""

    shape: tuple[int, int]
    row_norms: torch.Tensor | None = None
    """||w_n||_2 of the exact rows [N] (float32, rounded up), where the format was packed with
    exact_rows=True (the error bounds of `head_linear`); None otherwise."""
    row_norm_max: float | None = None
    """max of row_norms (None without them)."""

    def _set_row_norms(self, norms: torch.Tensor | None) -> None:
        self.row_norms = None if norms is None else (norms.float() * _ROUND_UP).contiguous()
        self.row_norm_max = None if self.row_norms is None else float(self.row_norms.max())

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix [out, in] as floats, computed with plain torch ops (the reference of the kernel:
        bf16-rounded scales)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that hold the matrix (moved by `map_tensors`, counted by `nbytes`)."""

    @abstractmethod
    def map_tensors(self, fn) -> None:
        """Replace each held tensor t by fn(t) (device moves)."""

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W.T -> [..., out] in x's dtype, on the backend of x's device."""
        lead = x.shape[:-1]
        y = self.linear_uncast(x.reshape(-1, x.shape[-1]))
        return y.to(x.dtype).reshape(*lead, self.shape[0])

    def linear_uncast(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ W.T -> [M, out] in the dtype the backend computes in (float32 for the C kernel
        and the reference, COMPUTE_DTYPE for torch's CPU kernels): `linear` without the cast back, for a caller whose
        next op upcasts the result anyway (the lean CPU forward, runtime/models/cpu_forward.py)."""
        kernel = getattr(self, f"_linear_{x.device.type}", None)
        return kernel(x) if kernel is not None else self.reference_linear(x)

    def reference_linear(self, x: torch.Tensor) -> torch.Tensor:
        """What the kernels compute, in plain torch: x rounded to COMPUTE_DTYPE, then fp32 math."""
        return F.linear(x.to(COMPUTE_DTYPE).float(), self.dequantize(torch.float32))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the matrix as float32 (an embedding lookup): the checkpoint's exact values
        where the format was packed with exact_rows=True, else `dequantize()`'s. Formats with random
        access to rows override this so the whole matrix is never expanded."""
        return self.dequantize(torch.float32)[ids]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class Int4GroupWeight(WeightFormat):
    """4-bit codes q in [0, 15] and, per row and group of `group_size` inputs, a bf16 scale s and
    offset z: w = (q - 8) * s + z, torch's `_weight_int4pack_mm_for_cpu` convention (checked
    against this class's reference in tests/runtime/test_quant.py).

    `packed` is torch's CPU int4 layout ([N_pad, K/2] uint8; per block of 64 rows, byte
    k * 32 + j holds row j's code at input k in the low nibble and row 32 + j's in the high
    one); `scale_zeros` is [K / group_size, N_pad, 2]. Rows are padded to a multiple of 64 with
    zero codes and scales. `exact` (exact_rows=True only) is the unrounded float32 scales and zeros
    [N, K / group_size, 2], read by `rows()`."""

    def __init__(
        self,
        packed: torch.Tensor,
        scale_zeros: torch.Tensor,
        shape: tuple[int, int],
        group_size: int,
        exact: torch.Tensor | None = None,
        row_norms: torch.Tensor | None = None,
    ):
        self.packed, self.scale_zeros, self.exact = packed, scale_zeros, exact
        self.shape, self.group_size = (int(shape[0]), int(shape[1])), int(group_size)
        self._c_args: tuple | None = None  # the C kernel's checked weight arguments (cpu_int4.prepare)
        self._set_row_norms(row_norms)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        exact_rows: bool = False,
    ) -> Int4GroupWeight:
        """codes [N, K] integers in [0, 15]; scales, zeros [N, K / group_size] (w = (q - 8) * s + z).
        exact_rows: also keep scales and zeros unrounded (8 bytes per group) for `rows()`."""
        N, K = codes.shape
        if K % group_size or scales.shape != (N, K // group_size) or zeros.shape != scales.shape:
            raise ValueError(f"int4 weight {N}x{K}: scales/zeros must be [N, K/{group_size}]")
        pad = -N % _INT4_BLOCK_N
        packed = pack_int4_cpu(F.pad(codes.to(torch.uint8), (0, 0, 0, pad)))
        sz = torch.stack([F.pad(scales.float(), (0, 0, 0, pad)), F.pad(zeros.float(), (0, 0, 0, pad))], -1)
        exact = norm = None
        if exact_rows:
            exact = torch.stack([scales.float(), zeros.float()], -1).contiguous()
            # of |s| |q - 8| + |z| >= |w|: it also bounds the bf16 scales' error, 2^-8 of it
            norm = _row_norms(
                lambda a, b: (
                    (codes[a:b].float() - 8.0).abs() * exact[a:b, :, 0].abs().repeat_interleave(group_size, 1)
                    + exact[a:b, :, 1].abs().repeat_interleave(group_size, 1)
                ),
                N,
            )
        return cls(packed, sz.transpose(0, 1).contiguous().to(COMPUTE_DTYPE), (N, K), group_size, exact, norm)

    @classmethod
    def from_nibbles(
        cls, qs: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, exact_rows: bool = False
    ) -> Int4GroupWeight:
        """Group-32 codes in GGUF's Q4_0 / Q4_1 byte order, qs [N, K / 32, 16] uint8 (byte i of a
        group holds code i in its low nibble and code 16 + i in its high one), N a multiple of 64:
        repacked without the [N, K] codes as an intermediate (1.5 -> 0.5 ms per SmolLM2 matrix).
        Rows j and 32 + j of a block share the layout's bytes: their low nibbles make the bytes of
        codes 0..15 of a group, their high nibbles those of codes 16..31."""
        N, G, _ = qs.shape
        if N % _INT4_BLOCK_N or exact_rows:
            return cls.from_codes(
                torch.cat([qs & 15, qs >> 4], dim=-1).reshape(N, G * 32), scales, zeros, 32, exact_rows
            )
        half = _INT4_BLOCK_N // 2
        u = qs.view(N // _INT4_BLOCK_N, 2, half, G, 16)
        a, b = u[:, 0], u[:, 1]
        packed = torch.empty(N // _INT4_BLOCK_N, G, 2, 16, half, dtype=torch.uint8)  # [block, k, j]
        packed[:, :, 0].copy_(((a & 15) | (b << 4)).permute(0, 2, 3, 1))
        packed[:, :, 1].copy_(((a >> 4) | (b & 0xF0)).permute(0, 2, 3, 1))
        sz = torch.empty(G, N, 2, dtype=COMPUTE_DTYPE)
        sz[..., 0], sz[..., 1] = scales.t(), zeros.t()
        return cls(packed.view(N, G * 16), sz, (N, G * 32), 32)

    def codes(self) -> torch.Tensor:
        """The codes [N, K] (uint8) read back from the packed layout."""
        return cpu_int4.int4_codes(self.packed, self.shape[0])

    def dequantize(self, dtype=torch.float32):
        return cpu_int4.int4_dequantize(self.packed, self.scale_zeros, self.group_size, self.shape[0]).to(
            dtype
        )

    def row_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """The codes [n, K] (uint8) of rows `flat` [n], read from the packed layout."""
        K, half = self.shape[1], _INT4_BLOCK_N // 2
        # byte (block, k, j) of the [blocks, K, 32] layout, gathered with one take
        start = (flat // _INT4_BLOCK_N) * (K * half) + flat % half
        byte = torch.take(
            self.packed, start.unsqueeze(1) + torch.arange(0, K * half, half, device=flat.device)
        )
        shift = (flat % _INT4_BLOCK_N >= half).to(torch.uint8) * 4  # rows 32..63 of a block: high nibbles
        return (byte >> shift.unsqueeze(1)) & 15

    def rows(self, ids):
        K, g = self.shape[1], self.group_size
        flat = ids.reshape(-1)
        q = self.row_codes(flat)
        if self.exact is not None:
            sz = self.exact[flat]  # [n, K/g, 2]
            w = (q.float() - 8.0).view(-1, K // g, g) * sz[..., :1] + sz[..., 1:]
            return w.reshape(*ids.shape, K)
        sz = self.scale_zeros[:, flat].float()  # [K/g, n, 2]
        s = sz[..., 0].t().repeat_interleave(g, dim=1)
        z = sz[..., 1].t().repeat_interleave(g, dim=1)
        return ((q.float() - 8.0) * s + z).reshape(*ids.shape, K)

    def _linear_cpu(self, x):
        # The kernel's rows do not depend on how many rows a call has (checked in tests): batched
        # and single requests get the same tokens. A bf16 expansion + dense matmul for large calls
        # was 7x faster at 512 rows, but switching kernels by row count broke that.
        if cpu_int4.available():  # ours (kernels/cpu_int4.c): VNNI, the codes expanded once for all rows
            if self._c_args is None:
                self._c_args = cpu_int4.prepare(self.packed, self.scale_zeros, self.group_size, self.shape[0])
            return cpu_int4.int4_mm_prepared(x, self._c_args)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(COMPUTE_DTYPE), self.packed, self.group_size, self.scale_zeros
        )
        return y if y.shape[-1] == self.shape[0] else y[:, : self.shape[0]]

    def tensors(self):
        held = {"packed": self.packed, "scale_zeros": self.scale_zeros}
        return held if self.exact is None else {**held, "exact": self.exact, "row_norms": self.row_norms}

    def map_tensors(self, fn):
        self._c_args = None  # the tensors may move
        self.packed, self.scale_zeros = fn(self.packed), fn(self.scale_zeros)
        if self.exact is not None:
            self.exact, self.row_norms = fn(self.exact), fn(self.row_norms)


def _row_norms(rows_of, n: int, chunk: int = 4096) -> torch.Tensor:
    """||w_n||_2 of every row, with rows_of(a, b) the float32 rows a..b (in chunks: the whole float
    matrix of an LM head is ~110 MB)."""
    return torch.cat([rows_of(a, min(a + chunk, n)).norm(dim=1) for a in range(0, n, chunk)])


_ROUND_UP = 1 + 2.0**-16  # a float32 norm may come out an ulp or two low: the bound must not


def _int8_halves(q: torch.Tensor, s: torch.Tensor, group_size: int) -> Int4GroupWeight:
    """Int8GroupWeight's [H | L] int4 matrix built straight from the int8 codes [N, K] (N a multiple
    of 64), without the codes of H and L as intermediates: 4x faster on SmolLM2's LM head (180 ->
    40 ms of load time). Rows j and 32 + j of a block share a byte (low and high nibble); with a, b
    their code bytes, H's byte is the two high nibbles with the sign bit flipped (hi + 8 = nibble ^ 8)
    and L's the two low ones. Equal to the general route's layout (tested)."""
    N, K = q.shape
    G, half = K // group_size, _INT4_BLOCK_N // 2
    u = q.view(torch.uint8).view(N // _INT4_BLOCK_N, 2, half, K)
    a, b = u[:, 0], u[:, 1]
    packed = torch.empty(N // _INT4_BLOCK_N, 2 * K, half, dtype=torch.uint8)
    packed[:, :K].copy_((((a >> 4) | (b & 0xF0)) ^ 0x88).transpose(1, 2))
    packed[:, K:].copy_(((a & 15) | (b << 4)).transpose(1, 2))
    sz = torch.empty(2 * G, N, 2, dtype=COMPUTE_DTYPE)
    st = s.t()
    sz[:G, :, 0], sz[:G, :, 1] = st * 16.0, 0.0
    sz[G:, :, 0], sz[G:, :, 1] = st, st * 8.0
    return Int4GroupWeight(packed.view(N, K), sz, (N, 2 * K), group_size)


def pack_int4_cpu(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] uint8 in [0, 15], N a multiple of 64 -> torch's CPU int4 layout [N, K/2], as
    `_convert_weight_to_int4pack_for_cpu` writes it (checked in tests), without its int32 input
    (4 bytes per weight: 226 MB for SmolLM2's LM head)."""
    N, K = codes.shape
    c = codes.reshape(N // _INT4_BLOCK_N, 2, _INT4_BLOCK_N // 2, K)  # [block, half, j, k]
    return (c[:, 0] | (c[:, 1] << 4)).transpose(1, 2).reshape(N, K // 2).contiguous()


class Int8GroupWeight(WeightFormat):
    """Signed 8-bit codes with one scale per row and group of 32 inputs (GGUF Q8_0), exactly, as
    4-bit halves: q = 16 h + l with h in [-8, 7], l in [0, 15], so w = s q = 16 s h + s l, and
    x @ W.T is one int4 matmul of [x | x] against [H | L] (an Int4GroupWeight [N, 2K]: H with
    scale 16 s, zero 0; L with scale s, zero 8 s). torch's int8 kernel takes one scale per row
    only: rounding Q8_0 to it cost 1.4% relative error on SmolLM2's LM head, this 0.2% (the bf16
    scales), for a kernel twice as wide (measured: 1.9 ms vs 1.6 ms on one core). `scales`
    (exact_rows=True only) are the unrounded float32 scales [N, K / group_size], read by `rows()`."""

    def __init__(
        self,
        inner: Int4GroupWeight,
        scales: torch.Tensor | None = None,
        row_norms: torch.Tensor | None = None,
    ):
        self.inner, self.scales = inner, scales
        self.shape = (inner.shape[0], inner.shape[1] // 2)
        self._set_row_norms(row_norms)

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, group_size: int = 32, exact_rows: bool = False
    ) -> Int8GroupWeight:
        """codes [N, K] int8; scales [N, K / group_size]: w = q * s. exact_rows: also keep the
        scales unrounded (4 bytes per group) for `rows()`."""
        q = codes.to(torch.int8)
        s = scales.float()
        N, K = q.shape
        if N % _INT4_BLOCK_N == 0 and K % group_size == 0 and s.shape == (N, K // group_size):
            inner = _int8_halves(q, s, group_size)
        else:  # the general route (rows padded to the int4 layout's blocks)
            # arithmetic shift: q = 16 (hi - 8) + lo
            hi, lo = ((q >> 4) + 8).to(torch.uint8), (q & 15).to(torch.uint8)
            inner = Int4GroupWeight.from_codes(
                torch.cat([hi, lo], dim=1),
                torch.cat([16.0 * s, s], dim=1),
                torch.cat([torch.zeros_like(s), 8.0 * s], dim=1),
                group_size,
            )
        if not exact_rows:
            return cls(inner)
        exact = s.contiguous()
        G = K // group_size
        # ||w_n||^2 = sum over groups of s^2 ||q_group||^2, in chunks of rows
        norms = [
            (
                torch.linalg.vector_norm(q[a : a + 4096].float().view(-1, G, group_size), dim=-1)
                * exact[a : a + 4096]
            )
            .square()
            .sum(-1)
            .sqrt()
            for a in range(0, N, 4096)
        ]
        return cls(inner, exact, torch.cat(norms))

    def dequantize(self, dtype=torch.float32):
        w = self.inner.dequantize(torch.float32)
        K = self.shape[1]
        return (w[:, :K] + w[:, K:]).to(dtype)

    def rows(self, ids):
        K = self.shape[1]
        if self.scales is None:
            w = self.inner.rows(ids)
            return w[..., :K] + w[..., K:]
        flat = ids.reshape(-1)
        c = self.inner.row_codes(flat).float()  # [n, 2K]: hi + 8, lo
        q = torch.addcmul(c[:, K:], c[:, :K] - 8.0, torch.tensor(16.0))  # exact: small integers
        G = self.scales.shape[1]
        return (q.view(-1, G, K // G) * self.scales[flat].unsqueeze(-1)).reshape(*ids.shape, K)

    def _linear_cpu(self, x):
        return self.inner._linear_cpu(torch.cat([x, x], dim=-1))

    def tensors(self):
        held = self.inner.tensors()
        return held if self.scales is None else {**held, "scales": self.scales, "row_norms": self.row_norms}

    def map_tensors(self, fn):
        self.inner.map_tensors(fn)
        if self.scales is not None:
            self.scales, self.row_norms = fn(self.scales), fn(self.row_norms)


class Int8ChannelWeight(WeightFormat):
    """int8 codes [N, K] and one bf16 scale per row: w = q * s (torch's `_weight_int8pack_mm`).
    Rows are plain, so an embedding lookup reads only the rows it needs."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes, self.scales = codes, scales
        self.shape = (int(codes.shape[0]), int(codes.shape[1]))

    @classmethod
    def quantize(cls, w: torch.Tensor, exact_rows: bool = False) -> Int8ChannelWeight:
        """Round a float matrix [N, K] to int8 per row (scale = the row's max |w| / 127, in bf16).
        The error per element is at most half the row's scale (plus the bf16 rounding of the scale).
        exact_rows: nothing more is exact, but `row_norms` let `head_linear` recompute the top
        logits of these rows in float32."""
        w = w.float()
        s = (w.abs().amax(dim=1) / 127.0).to(COMPUTE_DTYPE)
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round(w / s.float()[:, None]).clamp_(-128, 127).to(torch.int8)
        fmt = cls(q, s)
        if exact_rows:
            fmt._set_row_norms(_row_norms(lambda a, b: fmt.rows(torch.arange(a, b)), q.shape[0]))
        return fmt

    def dequantize(self, dtype=torch.float32):
        return (self.codes.float() * self.scales.float()[:, None]).to(dtype)

    def rows(self, ids):
        return self.codes[ids].float() * self.scales[ids].float().unsqueeze(-1)

    def _linear_cpu(self, x):
        return torch.ops.aten._weight_int8pack_mm(x.to(COMPUTE_DTYPE), self.codes, self.scales)

    def tensors(self):
        held = {"codes": self.codes, "scales": self.scales}
        return held if self.row_norms is None else {**held, "row_norms": self.row_norms}

    def map_tensors(self, fn):
        self.codes, self.scales = fn(self.codes), fn(self.scales)
        if self.row_norms is not None:
            self.row_norms = fn(self.row_norms)


class ConcatWeight(WeightFormat):
    """Row blocks of different formats stacked along the output dimension (a fused q|k|v or
    gate|up projection whose parts were quantized differently, as in Q4_K_M files)."""

    def __init__(self, parts: Sequence[WeightFormat]):
        self.parts = list(parts)
        k = {p.shape[1] for p in self.parts}
        if len(k) != 1:
            raise ValueError(f"row blocks with different input sizes: {sorted(k)}")
        self.shape = (sum(p.shape[0] for p in self.parts), k.pop())

    def dequantize(self, dtype=torch.float32):
        return torch.cat([p.dequantize(dtype) for p in self.parts], dim=0)

    def linear(self, x):
        return torch.cat([p.linear(x) for p in self.parts], dim=-1)

    def linear_uncast(self, x):
        return self.linear(x)  # the parts may compute in different dtypes: each casts back to x's

    def rows(self, ids):
        return self.dequantize()[ids]

    def tensors(self):
        return {f"{i}.{k}": t for i, p in enumerate(self.parts) for k, t in p.tensors().items()}

    def map_tensors(self, fn):
        for p in self.parts:
            p.map_tensors(fn)


def concat_rows(parts: Sequence[WeightFormat]) -> WeightFormat:
    """One format for row blocks stacked in order: merged into a single matrix of the same format
    where they share it (one kernel call), else a ConcatWeight."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, Int8ChannelWeight) for p in parts):
        codes = torch.cat([p.codes for p in parts])  # type: ignore[attr-defined]
        return Int8ChannelWeight(codes, torch.cat([p.scales for p in parts]))  # type: ignore[attr-defined]
    same_int4 = all(isinstance(p, Int4GroupWeight) and p.exact is None for p in parts)
    if same_int4 and len({p.group_size for p in parts}) == 1:  # type: ignore[attr-defined]
        if all(p.shape[0] % _INT4_BLOCK_N == 0 for p in parts):  # no padding inside: the layout stacks
            return Int4GroupWeight(
                torch.cat([p.packed for p in parts]),  # type: ignore[attr-defined]
                torch.cat([p.scale_zeros for p in parts], dim=1),  # type: ignore[attr-defined]
                (sum(p.shape[0] for p in parts), parts[0].shape[1]),
                parts[0].group_size,  # type: ignore[attr-defined]
            )
    return ConcatWeight(parts)


class QuantizedTensor(ABC):
    """A checkpoint tensor a loader left quantized: a [rows, cols] matrix in its file's encoding."""

    shape: tuple[int, int]

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The tensor as float32 (the dequantize-at-load path; also the reference)."""

    @abstractmethod
    def pack(self, exact_rows: bool = False) -> WeightFormat:
        """The tensor repacked into the WeightFormat the kernels want; exact_rows (the embedding and
        LM head): the format's `rows()` return the file's values exactly where it can (see the
        module docstring)."""


class _PackedModule(nn.Module):
    """Holds a WeightFormat outside the parameter/buffer registry, so that `model.to(dtype)`
    never casts codes or scales; device moves still apply to it."""

    def __init__(self, fmt: WeightFormat):
        super().__init__()
        self.fmt = fmt

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)

        def move(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return t.to(moved.device) if moved.dtype != t.dtype else moved

        self.fmt.map_tensors(move)
        return self


class PackedLinear(_PackedModule):
    """y = x @ W.T (+ bias) with W a packed WeightFormat; the bias stays a float parameter."""

    def __init__(self, fmt: WeightFormat, bias: torch.Tensor | None = None):
        super().__init__(fmt)
        self.in_features, self.out_features = fmt.shape[1], fmt.shape[0]
        # the nn.Linear's own bias Parameter is kept, so a loader holding it still fills this one
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)

    def forward(self, x):
        y = self.fmt.linear(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, format={type(self.fmt).__name__}"


class PackedEmbedding(_PackedModule):
    """Embedding rows gathered from a packed matrix (only the looked-up rows are expanded); with
    tied word embeddings it is also the LM head (`linear`)."""

    def __init__(self, fmt: WeightFormat, dtype: torch.dtype = torch.float32):
        super().__init__(fmt)
        self.num_embeddings, self.embedding_dim = fmt.shape
        self.dtype = dtype

    def forward(self, ids):
        return self.fmt.rows(ids).to(self.dtype)

    def linear(self, x):
        return self.fmt.linear(x)


def head_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T for an LM head that is an nn.Linear, an nn.Embedding (tied) or a packed one (float32,
    its top logits recomputed exactly: `refined_linear`)."""
    if isinstance(module, (PackedLinear, PackedEmbedding)):
        return refined_linear(module.fmt, x)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return F.linear(x, weight)


# |kernel - exact| per logit, relative to ||x|| max_n ||w_n|| (Cauchy-Schwarz bounds sum_k |x_k w_nk|):
# bf16's unit roundoff is 2^-8 (8 significant bits): 2^-8 for x's bf16 rounding (torch's kernel; the
# C kernel's two-part int8 x is within sqrt(K) / 65,024 <= 2^-8 for K <= 4,000), 2^-8 for the bf16
# scales (|w^ - w| <= 2^-8 (|s| |q - 8| + |z|)), 1/16 of that for the float32 accumulation and the
# rounding of the bound itself; and 2^-8 |y| for the bf16 result. (Until 2026-12-02 these were
# half as large, which holds only for values just under a power of two.)
_INPUT_ERR = 2.0**-7 * (1 + 2.0**-4)
_OUTPUT_ERR = 2.0**-8 * (1 + 2.0**-4)


def refined_linear(fmt: WeightFormat, x: torch.Tensor) -> torch.Tensor:
    """Logits x [M, K] @ W.T -> [M, N] float32 from the packed kernel, with every logit that can be
    its row's largest recomputed in float32 from the exact rows (formats with `row_norms`; the
    others return the kernel's logits). With e_n a bound on the kernel's error of logit n and t the
    row's largest kernel logit, the exact largest logit is >= y_t - e_t, so a token with
    y_n + e_n < y_t - e_t cannot be the greedy one. Two stages: one bound for the whole row (from
    the largest row norm: two passes over the logits), then each survivor's own (~6 -> ~1.6
    candidates per row on SmolLM2). Rows are refined independently: a row's result does not depend
    on the others in the call."""
    y = fmt.linear(x).float()
    norms, norm_max = fmt.row_norms, fmt.row_norm_max
    if norms is None or norm_max is None or y.numel() == 0:
        return y
    x32 = x.reshape(-1, x.shape[-1]).float()
    flat = y.reshape(-1, y.shape[-1])
    top, t = flat.max(dim=1)
    xn = x32.norm(dim=1)
    e_top = _INPUT_ERR * xn * norms[t] + _OUTPUT_ERR * top.abs()
    # stage 1: any e_n <= _INPUT_ERR ||x|| max ||w|| + _OUTPUT_ERR max |y|
    e_any = _INPUT_ERR * xn * norm_max + _OUTPUT_ERR * torch.maximum(top, -flat.amin(dim=1))
    r, c = torch.nonzero(flat >= (top - e_top - e_any).unsqueeze(1), as_tuple=True)
    # stage 2: the survivors' own bounds
    yc = flat[r, c]
    keep = yc + _INPUT_ERR * xn[r] * norms[c] + _OUTPUT_ERR * yc.abs() >= top[r] - e_top[r]
    r, c = r[keep], c[keep]
    flat[r, c] = (fmt.rows(c) * x32[r]).sum(dim=1)
    return y
