"""The clustered variant's centroid attention with key padding and dropout, on tensor cores (Triton).

Clustered attention attends once per cluster: ``C`` centroids ``qbar`` against all ``S``
keys. Without key padding and dropout PyTorch's flash kernel does it; fairseq's batches
have both (padded sentences; RoBERTa's attention dropout of 0.1), and until now they
took fp32 cuBLAS products over a ``(C, S)`` matrix in memory, several passes of it, in
both directions. These two kernels take them on the flash path's terms instead: the
centroids and keys in the inputs' half precision on tensor cores, softmax statistics and
accumulation in fp32, no ``(C, S)`` matrix in memory. fp32 inputs, which flash does not
take at all, run the same kernels with each product as six bf16 products: both operands
split into three bf16 parts, the three smallest of the nine part products dropped, close
to fp32's accuracy at tensor-core speed. The kernels split the operands themselves
(``_operand``), so the loop-invariant centroids and their gradients are split once per
program; Triton's own ``bf16x6`` split both operands at every product and took 1.4-1.8x
longer (twentieth session). (Triton's ``tf32x3`` needs more shared memory in the backward
than an SM has.) Since the thirty-fourth session the default is a cheaper split: two
fp16 parts per operand (``LAUNCH`` precision ``"fp16x3"``), each tile scaled by a power of two
into fp16's range, and three products instead of six. It keeps 22 of fp32's 24 bits. At 32 rows
and 16k keys, 64 keys per step, its forward took 232 us and its backward 742 against the
six-product split's 298 and 999, and its largest errors stayed within 1.5x those of
torch's fp32 products, skewed inputs included (key gradients 1.15e-6 against 8.3e-7 of the
largest; benchmarks/NOTES.md, thirty-fourth session). With 32 keys per step its key gradients
erred 2.2x as much as torch's (twenty-first session), past the 2x the tests allow an fp32 kernel.
At D = 128 (32 keys per step) the backward at 16k keys took 1159 us against 2311 and the forward
535 against 651, the key gradients' error 1.6x torch's.

With ``A_j = softmax_l(scale qbar_j . k_l)`` over the unpadded keys and the keep mask
``z_jl = keep_jl / (1 - p)`` of the clustered op (one dropout mask per centroid row, shared
by the cluster's members)::

    forward:   Vbar_j = sum_l A_jl z_jl v_l,       lse_j = log sum_l exp(scale qbar_j . k_l)
    backward:  dv_l = sum_j A_jl z_jl g_j,         ds_jl = A_jl (z_jl g_j . v_l - g_j . Vbar_j)
               dk_l = scale sum_j ds_jl qbar_j,    dqbar_j = scale sum_l ds_jl k_l

for the gradient ``g_j`` of ``Vbar_j`` (``g . Vbar`` is flash attention's ``rowsum(dO * O)``,
which holds with dropout too). A row whose keys are all padded gets ``Vbar = 0`` and
``lse = +inf`` (so that ``exp(logit - lse) = 0``), as in the reference.

Work split. The forward's program holds a tile of one (batch, head)'s centroids (all
``C <= 128`` of them unless ``LAUNCH``'s ``"centroids"`` sets a smaller tile) and streams a range
of the keys (the keys are split so that there are enough programs to fill the GPU); the last
program of a (row, tile) to finish (an atomic ticket per row and tile elects it) merges the
partial outputs by their log-sum-exps in range order, in the same launch. The backward's
program holds the centroids, their gradients and statistics and streams a range of keys,
writing those keys' ``dk``, ``dv`` (each key has one writer) and its partial ``dqbar``,
summed over the ranges afterwards: no atomic sums of values (the forward's one atomic counts
programs), so both directions are bit-reproducible.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._triton import (MIN_TILE, dependent_launch_options, dot_precision, interpreted, let_next_kernel_start, mask_bytes,
                      safe_max, three_parts, tiles_unavailable, tl, triton, two_scaled_parts, wait_for_prior_kernel)

__all__ = ["triton_centroid_unavailable", "centroid_attention_fwd", "forward_tickets", "centroid_attention_bwd",
           "gradient_like"]

MAX_CLUSTERS = 128  # all centroids of a (batch, head) in one tile
LOG2E = 1.4426950408889634
# Launch settings: "keys" per step, warps per program (and pipeline stages where given) and, for
# fp32 operands, how the products are made ("split", "fp16x3", or a tl.dot input precision, see
# _launch).
# "fwd" / "bwd" serve fp16 / bf16 and "fwd_fp32" / "bwd_fp32" fp32, each with "_d128" entries
# for 128-wide heads where those differ. Half precision: 4 warps (earlier
# sessions); at D = 128 the backward is 1-5% faster with 8 (the backward spills registers
# with 4, ~200 bytes per thread at D = 64 and 1.2 KB at 128; ptxas, Triton 3.6; at D = 64 the
# two counts were within 3% either way; benchmarks/NOTES.md, tenth session). fp32: the
# products of parts split in the kernel ("split"; "bf16x6" is Triton's, which splits at every
# product) with 8 warps and the widest key steps whose kernels fit in shared memory without
# spills (kernel_resources.py --dtype fp32). At 32 rows and 16k keys, on the launch grid of
# before TARGET_PROGRAMS' change below, the forward took 429 us with 64 keys and 536 with 32
# (bf16x6: 784 with 16, its only setting that fits), the backward 1324 with 32 keys and 1805 with
# 16 (bf16x6: 1849); with 4 warps the 64-key forward took 624 and the 32-key backward, which
# spills, 1797 (benchmarks/centroid_sweep.py, run 1 of the twentieth session). fp32 at
# D = 128: one or two pipeline stages, for shared memory; the backward spills about 150 bytes per
# thread at 16 keys, yet at 16k keys the forward took 690 us with 32 keys and the backward 2304
# with 16, where the fp32 cuBLAS products they replace made the whole step 8.19 ms against 4.48
# now (run 5, `--dim 128`). Since the thirty-fourth session fp32 up to D = 64 takes "fp16x3" (three
# products of two scaled fp16 parts, module docstring) with 64 keys per step in both directions:
# at 32 rows and 16k keys 232 / 742 us forward / backward against "split"'s 298 / 999 (64 / 32
# keys; "split" at 64 keys needs more shared memory than an SM has in the backward), and 128 / 383
# against 157 / 510 at 8k (centroid_sweep.py, run 1 of that session). fp16x3 with 32 keys was no
# faster in the backward (721 us at 16k) and erred past the tests' bound (module docstring). At
# D = 128 fp16x3 needs half the shared memory of "split", so the backward takes 32 keys per step
# instead of 16: at 16k keys 535 / 1159 us forward / backward against "split"'s 651 / 2311 (32 / 16
# keys), 158 / 318 against 187 / 602 at 4k; key gradients' error 1.58x torch fp32's, 1.34x on skewed
# inputs (centroid_sweep.py --dim 128, runs 3-4 of that session).
#
# The half-precision backward without padding or dropout ("bwd_unmasked", which the clustered
# variant's unmasked backward takes since the twenty-fourth session) is fastest at 128 keys per step
# and 8 warps: at 32 rows and 4k / 16k keys 64.2 / 164.6 us against 68.5 / 188.1 with 64 keys and 4
# warps (bf16; fp16 164.9 against 186.3 at 16k), where with both masks 128 x 8 took 296.6 against
# 245.2, and at D = 128 the 64-key entry stays (271.5 us against 296.9 with 128 keys and two
# stages, the most that fit in shared memory; benchmarks/centroid_sweep.py, twenty-fourth session).
#
# A forward entry may set "centroids": the most centroids one program holds (a power of two in
# 16..128; unset, a row's C <= 128 centroids take one tile). Smaller tiles split a row's centroids
# over more programs with fewer registers each: the bf16 forward at D = 64 holds 255 registers per
# thread with its 128-centroid tile, so 2 programs of 4 warps per SM, issuing every 2.6 cycles per
# scheduler (ncu at 32 rows of 2k keys, thirty-fifth session); with tiles of 64 / 32 / 16 it holds
# 126 / 106 / 72 and 4 / 4 / 6 programs fit on an SM (kernel_resources.py, Triton 3.6, sm_90a; no
# spills). Unset, every centroid kernel compiles to the same SASS as before the setting existed
# (kernel_resources.py's hashes at D = 32 / 64 / 128, bf16 and fp32, with dropout). On the H200 at
# 32 rows, C = 100, D = 64, bf16, tiles of 64 were the fastest forward at every length: 13.5 / 16.5 /
# 24.1 / 68.5 us at 1k / 2k / 4k / 16k keys against 14.7 / 19.3 / 27.2 / 68.3 with one tile of 128,
# and 25.2 / 43.1 / 137.5 against 32.4 / 54.7 / 150.4 at 2k / 4k / 16k with padding and dropout;
# tiles of 32 / 16 were slower (24.6 / 29.1 us at 2k), and so were 8 warps with any tile
# (centroid_sweep.py --centroids, thirty-sixth session). Past 16k one tile gains back a little
# (121.9 / 229.3 us at 32k / 64k against 124.7 / 239.8 with tiles of 64; under 1% of the step).
# At D = 128 (padding and dropout; flash serves the unmasked forward) one tile with 8 warps was
# fastest: 45.7 / 189.5 us at 2k / 16k against 46.8 / 251.0 with tiles of 64 and 4 warps and
# 63.4 / 280.8 with one tile and 4 warps. fp32 keeps one tile (43.9 us at 2k against 74.4 with 64).
LAUNCH = {
    "fwd": {"num_warps": 4, "keys": 64, "centroids": 64},
    "fwd_d128": {"num_warps": 8, "keys": 64},
    "bwd": {"num_warps": 4, "keys": 64},
    "bwd_unmasked": {"num_warps": 8, "keys": 128},
    "bwd_d128": {"num_warps": 8, "keys": 64},
    "fwd_fp32": {"num_warps": 8, "keys": 64, "precision": "fp16x3"},
    "bwd_fp32": {"num_warps": 8, "keys": 64, "precision": "fp16x3"},
    "fwd_fp32_d128": {"num_warps": 8, "keys": 32, "precision": "fp16x3", "num_stages": 1},
    "bwd_fp32_d128": {"num_warps": 8, "keys": 32, "precision": "fp16x3", "num_stages": 1},
}
# The fp32 splits the kernels make themselves: "precision" -> parts per operand (see _operand).
SPLITS = {"split": 3, "fp16x3": 2}
# At most this many programs per launch, two per SM of an H100 / H200 (132), so that a launch
# ends in whole waves (rounding the programs per row up gave 288 for 32 rows, a last wave of 24:
# the fp32 backward at 16k took 1997 us against 1504, the bf16 one 357 against 249, twentieth
# session), and no range of keys shorter than this.
TARGET_PROGRAMS = 264
MIN_KEYS_PER_PROGRAM = 256
# The forward without padding or dropout, where every program's range is whole key steps (keys a
# multiple of the keys per program, which are whole steps): compiled with constant validity (no
# masks, no selection of the logits, no keep products). The results agree within rounding, not bit
# for bit on the GPU (compiled without the selection, the arithmetic around it comes out differently;
# which instructions, not examined). At 32 rows, C = 100, D = 64, bf16 on an H200: 11.4 / 14.3 /
# 20.7 us at 1k / 2k / 4k keys against 12.1 / 15.6 / 22.9 masked (benchmarks/NOTES.md, forty-second
# session). A switch for A/B runs.
UNMASKED_EVEN_STEPS = True


def triton_centroid_unavailable(query: Tensor, value: Tensor, num_clusters: int) -> Optional[str]:
    """Why these kernels cannot serve the centroid attention of these inputs (None if they can)."""
    why = tiles_unavailable(query, value, "the Triton centroid attention kernels", fp32=True)
    if why is None and num_clusters > MAX_CLUSTERS:
        why = f"num_clusters {num_clusters} > {MAX_CLUSTERS}"
    return why


if triton is not None:

    @triton.jit
    def _key_tile(K, V, KEY_PADDING, KEEP, b, h, row, first, stop, clusters, cluster_ok, num_clusters, keys,
                  stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  DIM: tl.constexpr, BLOCK_N: tl.constexpr, PADDED: tl.constexpr, DROPOUT: tl.constexpr,
                  EVEN: tl.constexpr = False):
        """-> (key rows, value rows, key valid (BLOCK_N,), keep (C, BLOCK_N) as 0/1 fp32) of keys
        ``first .. first + BLOCK_N`` before ``stop``. ``EVEN``: every step's keys lie before ``stop``
        (the caller's ranges are whole steps), so validity is a constant the compiler folds away
        with the masks, the logits' selection and the keep's products that use it (the same values
        up to rounding: the arithmetic left may compile differently)."""
        offs = first + tl.arange(0, BLOCK_N)
        if EVEN:
            in_range = tl.full((BLOCK_N,), 1, tl.int1)
        else:
            in_range = offs < stop
        dims = tl.arange(0, DIM)
        k = tl.load(K + b * stride_kb + h * stride_kh + offs[:, None] * stride_ks + dims[None, :],
                    mask=in_range[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs[:, None] * stride_vs + dims[None, :],
                    mask=in_range[:, None], other=0.0)
        valid = in_range
        if PADDED:
            padded = tl.load(KEY_PADDING + b * keys + offs, mask=in_range, other=1)
            valid = valid & (padded == 0)
        keep = valid[None, :].to(tl.float32)
        if DROPOUT:
            kept = tl.load(KEEP + (row * num_clusters + clusters)[:, None] * keys + offs[None, :],
                           mask=cluster_ok[:, None] & in_range[None, :], other=0)
            keep = keep * kept.to(tl.float32)
        return k, v, valid, keep

    @triton.jit
    def _program_row(num_clusters, heads, BLOCK_C: tl.constexpr, DIM: tl.constexpr, TILES: tl.constexpr):
        """-> the program's (batch, head) row, key range index and count, b, h, the centroid
        indices (BLOCK_C,), which of them exist, and the feature indices (DIM,). Axis 0 counts
        (row, centroid tile) pairs, a row's ``TILES`` tiles in a row (a constexpr, so that one
        tile, the backward's and the forward's default, compiles to what it did before the
        tiles: no division, and no spill in the bf16 forward at D = 64)."""
        if TILES == 1:
            row = tl.program_id(0)
            clusters = tl.arange(0, BLOCK_C)
        else:
            row = tl.program_id(0) // TILES
            clusters = (tl.program_id(0) % TILES) * BLOCK_C + tl.arange(0, BLOCK_C)
        return (row, tl.program_id(1), tl.num_programs(1), row // heads, row % heads, clusters,
                clusters < num_clusters, tl.arange(0, DIM))

    @triton.jit
    def _operand(x, SPLIT: tl.constexpr, PARTS: tl.constexpr):
        """``x`` as an operand of :func:`_product`: ``(part, part, part, inverse scale)``. Where ``SPLIT``
        is a dtype (fp32 ``x``): with ``PARTS`` 3 its three parts of that dtype (bf16) and 1; with 2
        its two fp16 parts scaled by a power of two into fp16's range (the third repeats the second,
        unused) and that power's inverse. Else (None) ``x`` itself, three times, and 1 (:func:`_product`
        uses the first). Loop-invariant operands are split once, before the loop over the keys."""
        if SPLIT is not None:
            if PARTS == 3:
                hi, mid, lo = three_parts(x, SPLIT)
                return hi, mid, lo, 1.0
            else:
                hi, lo, inverse = two_scaled_parts(x)
                return hi, lo, lo, inverse
        else:
            return x, x, x, 1.0

    @triton.jit
    def _transposed(parts):
        """The transpose of an operand from :func:`_operand`, part by part."""
        return tl.trans(parts[0]), tl.trans(parts[1]), tl.trans(parts[2]), parts[3]

    @triton.jit
    def _product(a, b, SPLIT: tl.constexpr, PARTS: tl.constexpr, PRECISION: tl.constexpr):
        """``a @ b`` in fp32 for operands from :func:`_operand`. Three parts: the six largest of the
        nine products of the parts on tensor cores, the smallest first (the three dropped are below
        fp32's rounding). Two scaled parts: the three largest of the four, times both inverse scales
        (the dropped ``lo x lo`` is 2^-22 of the product). Else one ``tl.dot`` at ``PRECISION``."""
        if SPLIT is not None:
            if PARTS == 3:
                total = tl.dot(a[2], b[0])
                total = tl.dot(a[0], b[2], total)
                total = tl.dot(a[1], b[1], total)
                total = tl.dot(a[1], b[0], total)
                total = tl.dot(a[0], b[1], total)
                return tl.dot(a[0], b[0], total)
            else:
                total = tl.dot(a[1], b[0])
                total = tl.dot(a[0], b[1], total)
                return tl.dot(a[0], b[0], total) * (a[3] * b[3])
        else:
            return tl.dot(a[0], b[0], input_precision=PRECISION)

    @triton.jit
    def _centroid_fwd_kernel(QBAR, K, V, KEY_PADDING, KEEP, OUT, LSE2, TICKETS, VALUES, LSE,
                             num_clusters, keys, heads, keys_per_program, qk_scale, drop_scale,
                             stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                             DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                             PADDED: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                             SPLIT: tl.constexpr, PARTS: tl.constexpr, TILES: tl.constexpr,
                             DEPENDENT: tl.constexpr, EVEN: tl.constexpr = False):
        """QBAR: (rows, C, DIM) fp32 (rounded to the key dtype here unless the products split it);
        VALUES: (rows, C, DIM) fp32 and LSE: (rows, C) fp32 (natural base, +inf where a row has no
        valid key), the results. Where a row's keys take several programs, each stores its range's
        output (normalised by its own sum) in OUT (rows, programs, C, DIM) fp32 and its log-sum-exp
        in base 2 in LSE2 (rows, programs, C) fp32 (-inf where the range has no valid key), then
        takes a ticket from TICKETS (rows * TILES,) int32, zeros at the launch: the last program of
        the row's centroid tile merges the ranges (:func:`_merge_ranges`). One launch where the
        ranges' merge took six torch launches after it. TILES: each row's centroid tiles of BLOCK_C
        (:func:`_program_row`). DEPENDENT: launched as a programmatic dependent (:func:`wait_for_prior_kernel`);
        the kernel after it may start once the key ranges are done (the merges are a short tail).
        EVEN: every range is whole key steps and there is no padding or dropout (:func:`_key_tile`)."""
        wait_for_prior_kernel(DEPENDENT)
        row, part, parts, b, h, clusters, cluster_ok, dims = _program_row(num_clusters, heads, BLOCK_C, DIM, TILES)
        q = tl.load(QBAR + (row * num_clusters + clusters)[:, None] * DIM + dims[None, :],
                    mask=cluster_ok[:, None], other=0.0)
        if SPLIT is None:
            q = q.to(K.dtype.element_ty)
        q = _operand(q, SPLIT, PARTS)
        running_max = tl.full((BLOCK_C,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_C,), tl.float32)
        acc = tl.zeros((BLOCK_C, DIM), tl.float32)
        start = part * keys_per_program
        stop = tl.minimum(start + keys_per_program, keys)
        for first in range(start, stop, BLOCK_N):
            k, v, valid, keep = _key_tile(K, V, KEY_PADDING, KEEP, b, h, row, first, stop, clusters, cluster_ok,
                                          num_clusters, keys, stride_kb, stride_kh, stride_ks, stride_vb,
                                          stride_vh, stride_vs, DIM, BLOCK_N, PADDED, DROPOUT, EVEN)
            logits = _product(q, _operand(tl.trans(k), SPLIT, PARTS), SPLIT, PARTS,
                              PRECISION) * qk_scale  # log2 domain
            logits = tl.where(valid[None, :], logits, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(logits, 1))
            subtracted = safe_max(new_max)
            probs = tl.exp2(logits - subtracted[:, None])
            rescale = tl.exp2(running_max - subtracted)
            running_sum = running_sum * rescale + tl.sum(probs, 1)
            acc = acc * rescale[:, None] + _product(_operand((probs * keep).to(v.dtype), SPLIT, PARTS),
                                                    _operand(v, SPLIT, PARTS), SPLIT, PARTS, PRECISION)
            running_max = new_max
        let_next_kernel_start(DEPENDENT)
        nonempty = running_sum > 0
        out = acc / tl.where(nonempty, running_sum, 1.0)[:, None] * drop_scale
        lse2 = tl.where(nonempty, running_max + tl.log2(tl.where(nonempty, running_sum, 1.0)), float("-inf"))
        if parts == 1:
            _store_result(VALUES, LSE, row, num_clusters, clusters, cluster_ok, dims, out, lse2, DIM)
        else:
            slot = row * parts + part
            tl.store(OUT + (slot * num_clusters + clusters)[:, None] * DIM + dims[None, :], out,
                     mask=cluster_ok[:, None])
            tl.store(LSE2 + slot * num_clusters + clusters, lse2, mask=cluster_ok)
            # The ticket as a grid-wide semaphore (release: this program's stores, which the barrier
            # orders before the one thread's atomic; acquire: the other programs' stores, read past
            # L1 below). Integer tickets and a fixed order of the ranges in the merge: the result does
            # not depend on which program comes last.
            tl.debug_barrier()
            ticket = tl.atomic_add(TICKETS + tl.program_id(0), 1, sem="acq_rel", scope="gpu")  # (row, tile)
            if ticket == parts - 1:
                _merge_ranges(OUT, LSE2, VALUES, LSE, row, parts, num_clusters, clusters, cluster_ok, dims, BLOCK_C,
                              DIM)

    @triton.jit
    def _store_result(VALUES, LSE, row, num_clusters, clusters, cluster_ok, dims, values, lse2, DIM: tl.constexpr):
        """Stores a row's ``values (BLOCK_C, DIM)`` and its base-2 log-sum-exps ``lse2`` in the natural
        base, +inf where there was no valid key (so that ``exp(logit - lse)`` is 0)."""
        tl.store(VALUES + (row * num_clusters + clusters)[:, None] * DIM + dims[None, :], values,
                 mask=cluster_ok[:, None])
        lse = tl.where(lse2 == float("-inf"), float("inf"), lse2 * 0.6931471805599453)  # ln 2: to the natural base
        tl.store(LSE + row * num_clusters + clusters, lse, mask=cluster_ok)

    @triton.jit
    def _merge_ranges(OUT, LSE2, VALUES, LSE, row, parts, num_clusters, clusters, cluster_ok, dims,
                      BLOCK_C: tl.constexpr, DIM: tl.constexpr):
        """A row's attention over all its keys from the ``parts`` ranges' outputs and base-2
        log-sum-exps in OUT / LSE2 (see the kernel), weighted by ``2^(lse2 - largest)``, in range order.
        The loads bypass L1 (``.cg``): other SMs wrote them."""
        first = row * parts
        largest = tl.full((BLOCK_C,), float("-inf"), tl.float32)
        for p in range(0, parts):
            lse2 = tl.load(LSE2 + (first + p) * num_clusters + clusters, mask=cluster_ok, other=float("-inf"),
                           cache_modifier=".cg")
            largest = tl.maximum(largest, lse2)
        shift = safe_max(largest)
        total = tl.zeros((BLOCK_C,), tl.float32)
        acc = tl.zeros((BLOCK_C, DIM), tl.float32)
        for p in range(0, parts):
            slot = first + p
            lse2 = tl.load(LSE2 + slot * num_clusters + clusters, mask=cluster_ok, other=float("-inf"),
                           cache_modifier=".cg")
            weight = tl.exp2(lse2 - shift)  # 0 for a range without a valid key
            out = tl.load(OUT + (slot * num_clusters + clusters)[:, None] * DIM + dims[None, :],
                          mask=cluster_ok[:, None], other=0.0, cache_modifier=".cg")
            total += weight
            acc += weight[:, None] * out
        nonempty = total > 0
        values = acc / tl.where(nonempty, total, 1.0)[:, None]
        lse2 = tl.where(nonempty, shift + tl.log2(tl.where(nonempty, total, 1.0)), float("-inf"))
        _store_result(VALUES, LSE, row, num_clusters, clusters, cluster_ok, dims, values, lse2, DIM)

    @triton.jit
    def _centroid_bwd_kernel(QBAR, K, V, KEY_PADDING, KEEP, GRAD, VBAR, LSE, LSE_WEIGHT, GRAD_QBAR, GRAD_K, GRAD_V,
                             num_clusters, keys, heads, keys_per_program, log2e, qk_scale, scale, drop_scale,
                             stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                             stride_gkb, stride_gkh, stride_gks, stride_gvb, stride_gvh, stride_gvs,
                             DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                             PADDED: tl.constexpr, DROPOUT: tl.constexpr, WEIGHTED: tl.constexpr, CHUNK: tl.constexpr,
                             PRECISION: tl.constexpr, SPLIT: tl.constexpr, PARTS: tl.constexpr):
        """QBAR, GRAD: (rows, C, DIM) contiguous in the key dtype (GRAD: the gradient of Vbar); VBAR:
        (rows, C, DIM) contiguous, any float dtype; LSE: (rows, C) fp32 log-sum-exps (+inf for rows
        without a valid key), ``log2e`` the factor to base 2; LSE_WEIGHT (WEIGHTED): (rows, C) fp32,
        added to each row's ``GRAD . Vbar`` (flash attention's ``rowsum(dO * O)``, which every
        program works out for itself, in column chunks of CHUNK that keep the tiles small: C x DIM
        products, against four torch launches before). GRAD_QBAR: (rows, programs, C, DIM) fp32
        partial sums; GRAD_K, GRAD_V: (B, H, S, DIM) with the strides given (feature dim contiguous)."""
        row, part, parts, b, h, clusters, cluster_ok, dims = _program_row(num_clusters, heads, BLOCK_C, DIM, 1)
        centroid_rows = (row * num_clusters + clusters)[:, None] * DIM + dims[None, :]
        q = tl.load(QBAR + centroid_rows, mask=cluster_ok[:, None], other=0.0)
        g = tl.load(GRAD + centroid_rows, mask=cluster_ok[:, None], other=0.0)
        delta = tl.zeros((BLOCK_C,), tl.float32)
        for d0 in tl.static_range(0, DIM, CHUNK):
            chunk = (row * num_clusters + clusters)[:, None] * DIM + d0 + tl.arange(0, CHUNK)[None, :]
            g_chunk = tl.load(GRAD + chunk, mask=cluster_ok[:, None], other=0.0).to(tl.float32)
            v_chunk = tl.load(VBAR + chunk, mask=cluster_ok[:, None], other=0.0).to(tl.float32)
            delta += tl.sum(g_chunk * v_chunk, 1)
        if WEIGHTED:
            delta += tl.load(LSE_WEIGHT + row * num_clusters + clusters, mask=cluster_ok, other=0.0)
        q, g = _operand(q, SPLIT, PARTS), _operand(g, SPLIT, PARTS)
        lse2 = tl.load(LSE + row * num_clusters + clusters, mask=cluster_ok, other=float("inf")) * log2e
        grad_q = tl.zeros((BLOCK_C, DIM), tl.float32)
        start = part * keys_per_program
        stop = tl.minimum(start + keys_per_program, keys)
        for first in range(start, stop, BLOCK_N):
            k, v, valid, keep = _key_tile(K, V, KEY_PADDING, KEEP, b, h, row, first, stop, clusters, cluster_ok,
                                          num_clusters, keys, stride_kb, stride_kh, stride_ks, stride_vb,
                                          stride_vh, stride_vs, DIM, BLOCK_N, PADDED, DROPOUT)
            logits = _product(q, _operand(tl.trans(k), SPLIT, PARTS), SPLIT, PARTS, PRECISION) * qk_scale
            probs = tl.where(valid[None, :], tl.exp2(logits - lse2[:, None]), 0.0)  # A, (C, BLOCK_N)
            kept = probs * keep * drop_scale  # A z
            grad_probs = _product(g, _operand(tl.trans(v), SPLIT, PARTS), SPLIT, PARTS,
                                  PRECISION) * keep * drop_scale  # z g . v
            grad_logits = _operand((probs * (grad_probs - delta[:, None])).to(k.dtype), SPLIT, PARTS)
            grad_v = _product(_operand(tl.trans(kept.to(k.dtype)), SPLIT, PARTS), g, SPLIT, PARTS, PRECISION)
            grad_k = _product(_transposed(grad_logits), q, SPLIT, PARTS, PRECISION) * scale
            grad_q += _product(grad_logits, _operand(k, SPLIT, PARTS), SPLIT, PARTS, PRECISION)
            offs = first + tl.arange(0, BLOCK_N)
            in_range = (offs < stop)[:, None]
            tl.store(GRAD_K + b * stride_gkb + h * stride_gkh + offs[:, None] * stride_gks + dims[None, :],
                     grad_k.to(GRAD_K.dtype.element_ty), mask=in_range)
            tl.store(GRAD_V + b * stride_gvb + h * stride_gvh + offs[:, None] * stride_gvs + dims[None, :],
                     grad_v.to(GRAD_V.dtype.element_ty), mask=in_range)
        slot = row * parts + part
        tl.store(GRAD_QBAR + (slot * num_clusters + clusters)[:, None] * DIM + dims[None, :], grad_q * scale,
                 mask=cluster_ok[:, None])


def launch_entry(kernel: str, dtype: torch.dtype, dim: int, masked: bool) -> str:
    """The name of ``LAUNCH``'s entry that ``kernel`` (``"fwd"`` / ``"bwd"``) takes for operands of
    ``dtype``, head dim ``dim``, and key padding or dropout (``masked``) or neither: the first of
    ``{base}_d{dim}``, ``{base}_unmasked`` (unmasked inputs only) and ``{base}`` that exists."""
    base = f"{kernel}_fp32" if dtype == torch.float32 else kernel
    names = (f"{base}_d{dim}",) + (() if masked else (f"{base}_unmasked",)) + (base,)
    return next(name for name in names if name in LAUNCH)


def _launch(kernel: str, dtype: torch.dtype, dim: int, masked: bool) -> dict:
    """Keyword arguments of ``kernel``'s launch (:func:`launch_entry`'s), ``BLOCK_N``, ``PRECISION``
    and ``SPLIT`` among them."""
    entry = launch_entry(kernel, dtype, dim, masked)
    options = dict(LAUNCH[entry])
    options["BLOCK_N"] = options.pop("keys")
    if options.pop("centroids", None) is not None and kernel == "bwd":  # read by _centroid_tile
        raise ValueError(f"centroid_triton.LAUNCH[{entry!r}]: 'centroids' is a forward setting (the backward's "
                         f"program holds all of a row's centroids)")
    precision = options.pop("precision", None)
    split = dtype == torch.float32 and precision in SPLITS
    # "split": three bf16 parts (fp32's exponent range). Triton's interpreter multiplies bf16 tiles
    # wrongly (their raw bits, Triton 3.9), so there they are fp16: the same six products, for
    # the CPU tests of inputs well inside fp16's range. "fp16x3": two fp16 parts, scaled.
    options["PARTS"] = SPLITS.get(precision, 3)
    options["SPLIT"] = (tl.float16 if interpreted() or options["PARTS"] == 2 else tl.bfloat16) if split else None
    options["PRECISION"] = dot_precision(dtype, None if split else precision)
    return options


def _programs_per_row(rows: int, keys: int, block_n: int) -> Tuple[int, int]:
    """(programs per row, keys per program) for ``rows`` (batch, head) rows, or (row, centroid tile)
    pairs in the forward: at most ``TARGET_PROGRAMS`` in all (at least one per row), each over a
    whole number of key steps of ``block_n`` and at least ``MIN_KEYS_PER_PROGRAM`` keys."""
    wanted = max(1, min(TARGET_PROGRAMS // rows, triton.cdiv(keys, MIN_KEYS_PER_PROGRAM)))
    per_program = triton.cdiv(triton.cdiv(keys, wanted), block_n) * block_n
    return triton.cdiv(keys, per_program), per_program


def _key_args(key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor], keep: Optional[Tensor]):
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    padding = None if key_padding_mask is None else mask_bytes(key_padding_mask)
    kept = None if keep is None else mask_bytes(keep)
    strides = (*key.stride()[:3], *value.stride()[:3])
    return key, value, padding, kept, strides


def gradient_like(x: Tensor) -> Tensor:
    """An empty gradient for the keys or values ``x`` as :func:`centroid_attention_bwd` writes it:
    ``torch.empty_like(x)``, or a contiguous tensor where that would not have a contiguous feature dim."""
    like = torch.empty_like(x)
    return like if like.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _written_gradient(given: Optional[Tensor], x: Tensor, name: str) -> Tensor:
    """``given`` where the backward can write ``x``'s gradient into it, a new :func:`gradient_like` if None."""
    if given is None:
        return gradient_like(x)
    if given.shape != x.shape or given.dtype != x.dtype or given.device != x.device or given.stride(-1) != 1:
        raise ValueError(f"centroid_attention_bwd: {name} must be {tuple(x.shape)} {x.dtype} on {x.device} with a "
                         f"contiguous last dim, got {tuple(given.shape)} {given.dtype} on {given.device} with "
                         f"strides {given.stride()}")
    return given


def _tile(num_clusters: int) -> int:
    return max(MIN_TILE, triton.next_power_of_2(num_clusters))


def _centroid_tile(entry: str, num_clusters: int) -> int:
    """The forward's ``BLOCK_C``: the smallest tile that holds ``num_clusters`` (:func:`_tile`), at
    most ``LAUNCH[entry]``'s ``"centroids"`` where that is set (a row's centroids then take
    ``cdiv(num_clusters, BLOCK_C)`` programs per key range)."""
    most = LAUNCH[entry].get("centroids", MAX_CLUSTERS)
    if not MIN_TILE <= most <= MAX_CLUSTERS or most & (most - 1):
        raise ValueError(f"centroid_triton.LAUNCH[{entry!r}]['centroids'] must be a power of two in "
                         f"{MIN_TILE}..{MAX_CLUSTERS}, got {most}")
    return min(_tile(num_clusters), most)


def _forward_grid(rows: int, num_clusters: int, key: Tensor, masked: bool) -> Tuple[dict, int, int, int, int]:
    """The forward's launch for ``rows`` rows of ``num_clusters`` centroids over ``key (B, H, S, D)``,
    with key padding or dropout (``masked``) or neither: ``(launch options, BLOCK_C, tiles per row,
    key ranges per (row, tile), keys per range)``."""
    launch = _launch("fwd", key.dtype, key.shape[-1], masked)
    block_c = _centroid_tile(launch_entry("fwd", key.dtype, key.shape[-1], masked), num_clusters)
    tiles = triton.cdiv(num_clusters, block_c)
    parts, per_program = _programs_per_row(rows * tiles, key.shape[2], launch["BLOCK_N"])
    return launch, block_c, tiles, parts, per_program


def forward_tickets(rows: int, num_clusters: int, key: Tensor, masked: bool) -> int:
    """How many int32 tickets :func:`centroid_attention_fwd` takes for these arguments (``masked``:
    a key padding mask or a keep mask is given): one per (row, centroid tile) where a row's keys
    take several programs, else 0."""
    _, _, tiles, parts, _ = _forward_grid(rows, num_clusters, key, masked)
    return _ticket_count(rows, tiles, parts)


def _ticket_count(rows: int, tiles: int, parts: int) -> int:
    """Tickets of a forward launch of ``rows x tiles`` centroid tiles, ``parts`` key ranges each: one
    per tile where there is a merge to elect a program for."""
    return rows * tiles if parts > 1 else 0


def centroid_attention_fwd(qbar: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                           keep: Optional[Tensor], scale: float, dropout_p: float,
                           tickets: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``Vbar`` and ``lse`` of the centroids.

    Args:
        qbar: ``(B H, C, D)`` fp32 centroids. key, value: ``(B, H, S, D)`` fp16 / bf16 / fp32
            (any strides with a contiguous last dim).
        key_padding_mask: ``(B, S)`` bool (True = padded) or None.
        keep: ``(B, H, C, S)`` bool dropout keep mask or None; dropout_p: its rate.
        tickets: ``(forward_tickets(...),)`` int32 zeros on the keys' device that the kernel may use
            (and leaves changed), e.g. cleared by the segment sum that made ``qbar`` (the extension's
            ``segment_sum(..., zero=tickets)``: a launch less); None to make them here.

    Returns:
        ``Vbar (B H, C, D)`` fp32 and ``lse (B H, C)`` fp32 (+inf for rows without a valid key).
    """
    batch, heads, keys, dim = key.shape
    rows, num_clusters = qbar.shape[:2]
    key, value, padding, kept, strides = _key_args(key, value, key_padding_mask, keep)
    launch, block_c, tiles, parts, per_program = _forward_grid(rows, num_clusters, key,
                                                               padding is not None or kept is not None)
    values = qbar.new_empty(rows, num_clusters, dim, dtype=torch.float32)
    lse = qbar.new_empty(rows, num_clusters, dtype=torch.float32)
    wanted = _ticket_count(rows, tiles, parts)
    if tickets is not None and (tickets.dtype != torch.int32 or tickets.device != key.device
                                or tickets.shape != (wanted,)):
        raise ValueError(f"centroid_attention_fwd: tickets must be ({wanted},) int32 zeros on {key.device} "
                         f"(forward_tickets), got {tuple(tickets.shape)} {tickets.dtype} on {tickets.device}")
    if parts > 1:  # the ranges' outputs, and the tickets that elect each row's merging program
        out = qbar.new_empty(rows, parts, num_clusters, dim, dtype=torch.float32)
        lse2 = qbar.new_empty(rows, parts, num_clusters, dtype=torch.float32)
        if tickets is None:
            tickets = torch.zeros(wanted, dtype=torch.int32, device=qbar.device)
    else:
        out, lse2, tickets = values, lse, lse
    even = padding is None and kept is None and keys % per_program == 0 and UNMASKED_EVEN_STEPS
    _centroid_fwd_kernel[(rows * tiles, parts)](
        qbar.float().contiguous(), key, value, key if padding is None else padding,
        key if kept is None else kept, out, lse2, tickets, values, lse,
        num_clusters, keys, heads, per_program, scale * LOG2E, 1.0 / (1.0 - dropout_p) if kept is not None else 1.0,
        *strides, DIM=dim, BLOCK_C=block_c, PADDED=padding is not None, DROPOUT=kept is not None, TILES=tiles,
        EVEN=even, **launch, **dependent_launch_options(key.device),
    )
    return values, lse


def centroid_attention_bwd(grad_values: Tensor, values: Tensor, qbar: Tensor, key: Tensor, value: Tensor,
                           key_padding_mask: Optional[Tensor], keep: Optional[Tensor], lse: Tensor, scale: float,
                           dropout_p: float, lse_weight: Optional[Tensor] = None,
                           partial_qbar: bool = False, grad_key: Optional[Tensor] = None,
                           grad_value: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`centroid_attention_fwd` for ``grad_values (B H, C, D)`` (fp32 or the key
    dtype), given its ``values`` (``Vbar``, any float dtype) and ``lse``.

    ``lse_weight (B H, C)`` fp32, if given, adds the gradient of ``-sum_j lse_weight_j lse_j``: the
    log-sum-exp's gradient is the softmax, so each centroid's logit gradients lose
    ``lse_weight_j A_jl``, which is ``lse_weight_j`` added to the row's ``GRAD . Vbar`` (the
    improved variant's dense term, in the same pass over the keys).

    ``grad_key``, ``grad_value``: tensors of the keys' / values' shape and dtype with a contiguous
    last dim to write ``dk`` / ``dv`` into (a CUDA graph's "filled" arguments: written where the
    caller wants them, not copied out), or None for new ones (:func:`gradient_like`).

    Returns:
        ``dqbar (B H, C, D)`` fp32 (with ``partial_qbar``, its unsummed parts ``(B H, parts, C, D)``,
        one per range of keys), ``dk``, ``dv`` ``(B, H, S, D)`` in the key dtype: ``grad_key`` /
        ``grad_value`` where given, else laid out as ``torch.empty_like`` of ``key`` / ``value`` (a
        model's views of ``(S, B, H * D)`` projections get gradients that fold back into that shape
        without a copy).
    """
    batch, heads, keys, dim = key.shape
    rows, num_clusters = qbar.shape[:2]
    key, value, padding, kept, strides = _key_args(key, value, key_padding_mask, keep)
    launch = _launch("bwd", key.dtype, dim, masked=padding is not None or kept is not None)
    parts, per_program = _programs_per_row(rows, keys, launch["BLOCK_N"])
    grad_qbar = qbar.new_empty(rows, parts, num_clusters, dim)
    grad_key = _written_gradient(grad_key, key, "grad_key")
    grad_value = _written_gradient(grad_value, value, "grad_value")
    # The log-sum-exps' change of base and flash attention's rowsum(dO * O) happen in the kernel
    # (they took five small launches beside it). The centroids and the gradient are rounded to the
    # key dtype here: loaded in fp32 and rounded in the kernel, they took 32-64 KiB more of its shared
    # memory, two programs per SM became one with dropout at D = 64, and at D = 128 and C > 64 it no
    # longer fitted (benchmarks/kernel_resources.py; twenty-fourth session).
    _centroid_bwd_kernel[(rows, parts)](
        qbar.to(key.dtype).contiguous(), key, value, key if padding is None else padding,
        key if kept is None else kept, grad_values.to(key.dtype).contiguous(), values.contiguous(),
        lse.float().contiguous(),
        lse if lse_weight is None else lse_weight.float().contiguous(), grad_qbar, grad_key, grad_value,
        num_clusters, keys, heads, per_program, LOG2E, scale * LOG2E, scale,
        1.0 / (1.0 - dropout_p) if kept is not None else 1.0,
        *strides, *grad_key.stride()[:3], *grad_value.stride()[:3],
        DIM=dim, BLOCK_C=_tile(num_clusters), PADDED=padding is not None, DROPOUT=kept is not None,
        WEIGHTED=lse_weight is not None, CHUNK=min(dim, 32), **launch,
    )
    return grad_qbar if partial_qbar else grad_qbar.sum(1), grad_key, grad_value
