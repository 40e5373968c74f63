"""Random-hyperplane hashing on tensor cores (Triton).

The CUDA kernel of ``hash_codes`` (``cuda/clustering.cu``) runs the ``(N, D) x (D, bits)``
products as fp32 multiply-adds, one vector per thread; at N = 64k keys per head it takes
about 1 ms on an H100. For fp16 / bf16 inputs the same products run here on tensor cores
with fp32 precision: a half-precision ``x`` is exact in its own dtype, and each fp32
plane is split into three parts of that dtype (``hi + mid + lo``, each the rounded
remainder of the previous ones), so ``x . hi + x . mid + x . lo`` has exact products and
fp32 accumulation. Only the order of the fp32 additions differs from the kernel (and from
the reference), so a bit can differ only where a projection lies within rounding
(~1e-6 relative) of its threshold; the tests check exactly that. Planes that are values of
x's dtype already, as ``draw_hash_planes`` draws them (bf16 values), have zero ``mid`` and ``lo``:
a program whose planes' ``mid`` and ``lo`` parts are all zero skips those two products, which would
only add zeros (the same codes, a third of the tensor-core work). fp32 vectors take one
product with both operands split into three bf16 parts (Triton's ``bf16x6``: six of the
nine part products, the three dropped ones below fp32's rounding), so the same holds.

Used by :class:`fairseq_clustered.ops.cuda_kernels.CudaOps` where
:func:`triton_hash_unavailable` returns None; the CUDA kernel serves the rest.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._triton import (MISSING, dependent_launch_options, dot_precision, interpreted,
                      power_of_two_in, three_parts, tl, triton, wait_for_prior_kernel)

__all__ = ["triton_hash_unavailable", "hash_codes_triton"]

MAX_BITS = 64  # the bit block of the kernel; bits 1..63 are used
# Tiles of 128 vectors, 2 per program (the planes split once for 256 vectors), 4 warps. Tiles of 64,
# 4 per program, were chosen before the kernel took the row from the grid (29.4 / 57.1 us at 32 rows
# of 8k / 16k against 34.7 / 66.8 for one tile of 128; thirtieth session). Since planes of bf16
# values take one product instead of three (forty-second session), 128 x 2 x 4 is the faster at
# every length: 4.1 / 4.9 / 7.8 / 14.2 / 27.4 / 51.4 us at 32 rows of 1k / 2k / 4k / 8k / 16k / 32k
# against 4.7 / 5.4 / 8.4 / 15.5 / 30.4 / 54.8 (H200, benchmarks/memory_kernels.py --hash-launch;
# benchmarks/NOTES.md, forty-second session). fp32 vectors keep 64 x 4 x 4: their tiles of 128 at
# D = 128 spill 1.4 KB of registers per thread (ptxas, Triton 3.6, sm_90a).
LAUNCH = {"half": (128, 2, 4), "fp32": (64, 4, 4)}  # (rows per tile, tiles per program, warps)
MAX_GRID_Y = 65535  # the programs along a row
MAX_FP32_DIM = 128  # wider fp32 tiles spill kilobytes of registers (ptxas, Triton 3.6)


def triton_hash_unavailable(x: Tensor) -> Optional[str]:
    """Why :func:`hash_codes_triton` cannot hash ``x (B, H, N, D)`` (None if it can)."""
    if MISSING is not None:
        return MISSING
    if not x.is_cuda and not interpreted():
        return f"a tensor on {x.device} (the kernel runs on CUDA, or in Triton's interpreter)"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} (tensor-core hashing is for fp16 / bf16 / fp32)"
    dim = x.shape[-1]
    widest = MAX_FP32_DIM if x.dtype == torch.float32 else 256
    if not power_of_two_in(dim, 16, widest):
        return f"dim {dim} is not a power of two in 16..{widest}" + (" (fp32)" if x.dtype == torch.float32 else "")
    if x.stride(-1) != 1:
        return "the feature dim is not contiguous"
    rows, tiles, _ = default_launch(x.dtype)
    if triton.cdiv(x.shape[2], rows * tiles) > MAX_GRID_Y:
        return f"{x.shape[2]} vectors per row (the kernel takes up to {MAX_GRID_Y * rows * tiles})"
    return None


def default_launch(dtype: torch.dtype) -> Tuple[int, int, int]:
    """``LAUNCH``'s setting for vectors of ``dtype``: (rows per tile, tiles per program, warps)."""
    return LAUNCH["fp32" if dtype == torch.float32 else "half"]


if triton is not None:

    @triton.jit
    def _hash_kernel(X, PLANES, OFFSETS, CODES, length, heads, stride_b, stride_h, stride_n, bits,
                     DIM: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr, BITS: tl.constexpr,
                     PRECISION: tl.constexpr, DEPENDENT: tl.constexpr):
        """Program (r, p): the codes of vectors p ROWS TILES .. (p + 1) ROWS TILES of row r of the
        flattened (B H, N), ROWS at a time; the planes are loaded and split once per program.

        PLANES: (bits, DIM) fp32 contiguous, split here into three parts of x's dtype (fp16 /
        bf16 x), or one product in ``PRECISION`` (fp32 x); OFFSETS: (bits,) fp32. Bits >=
        ``bits`` get a zero plane and an infinite threshold.

        The row on the grid and the codes summed as two 32-bit halves: per-vector 64-bit
        divisions and 64-bit sums were most of the kernel's instructions (ncu, thirtieth session)."""
        wait_for_prior_kernel(DEPENDENT)
        bh = tl.program_id(0).to(tl.int64)
        row_x = X + (bh // heads) * stride_b + (bh % heads) * stride_h
        row_codes = CODES + bh * length
        feats = tl.arange(0, DIM)
        planes_t = tl.arange(0, BITS)
        used = planes_t < bits
        rest = tl.load(PLANES + planes_t[None, :] * DIM + feats[:, None], mask=used[None, :], other=0.0)  # (DIM, BITS)
        offsets = tl.load(OFFSETS + planes_t, mask=used, other=float("inf"))
        # bit b of the code: bit b % 32 of the low (b < 32) or the high half; a sum of distinct
        # powers of two is their bitwise or, so the int32 sums wrap into the right bits
        low_half = planes_t < 32
        weights = tl.full((BITS,), 1, tl.int32) << (planes_t % 32)
        if X.dtype.element_ty != tl.float32:  # the rounded remainders, each exact in x's dtype
            hi, mid, lo = three_parts(rest, X.dtype.element_ty)
            # Where mid and lo are all zero (planes exact in x's dtype, as draw_hash_planes' bf16
            # values are), their two products would add zeros: the program skips them (the same codes).
            parts_left = tl.abs(mid.to(tl.float32)) + tl.abs(lo.to(tl.float32))
            exact = tl.max(tl.max(parts_left, axis=1), axis=0) == 0.0
        for tile in tl.static_range(TILES):
            n = (tl.program_id(1) * TILES + tile) * ROWS + tl.arange(0, ROWS)
            ok = n < length
            x = tl.load(row_x + n[:, None].to(tl.int64) * stride_n + feats[None, :], mask=ok[:, None], other=0.0)
            if X.dtype.element_ty == tl.float32:
                projections = tl.dot(x, rest, input_precision=PRECISION)
            else:  # exact products of x with each part, summed in fp32
                projections = tl.dot(x, hi)
                if not exact:
                    projections = tl.dot(x, mid, projections)
                    projections = tl.dot(x, lo, projections)
            bit = tl.where(projections > offsets[None, :], weights[None, :], 0)
            low = tl.sum(tl.where(low_half[None, :], bit, 0), axis=1)
            high = tl.sum(tl.where(low_half[None, :], 0, bit), axis=1)
            codes = (high.to(tl.int64) << 32) | (low.to(tl.int64) & 0xFFFFFFFF)
            tl.store(row_codes + n, codes, mask=ok)


def hash_codes_triton(x: Tensor, planes: Tensor, offsets: Tensor,
                      launch: Optional[Tuple[int, int, int]] = None) -> Tensor:
    """``hash_codes`` (bit ``b`` of the code of ``x_i`` is ``planes[b] . x_i > offsets[b]``)
    on tensor cores.

    Args:
        x: ``(B, H, N, D)`` fp16 / bf16 / fp32, feature dim contiguous, ``D`` a power of two in
            16..256 (fp32: 16..128).
        planes: ``(bits, D)``, ``1 <= bits <= 63``. offsets: ``(bits,)``.
        launch: ``(rows per tile, tiles per program, warps)`` (benchmarks' sweeps); None for
            the module's settings (``LAUNCH`` by x's dtype).

    Returns:
        ``(B, H, N)`` int64 codes.
    """
    batch, heads, length, dim = x.shape
    codes = torch.empty(batch, heads, length, dtype=torch.int64, device=x.device)
    total = batch * heads * length
    if total == 0:
        return codes
    planes, offsets = planes.to(torch.float32).contiguous(), offsets.to(torch.float32).contiguous()
    rows, tiles, warps = launch or default_launch(x.dtype)
    _hash_kernel[(batch * heads, triton.cdiv(length, rows * tiles))](
        x, planes, offsets, codes, length, heads, x.stride(0), x.stride(1), x.stride(2), planes.shape[0],
        DIM=dim, ROWS=rows, TILES=tiles, BITS=MAX_BITS, PRECISION=dot_precision(x.dtype, "bf16x6"), num_warps=warps,
        **dependent_launch_options(x.device),
    )
    return codes
