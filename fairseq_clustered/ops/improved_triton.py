"""The improved variant's fp16 / bf16 path on tensor cores (Triton): top keys, exact
top-key products, gradient sums.

Improved clustered attention gives query ``i`` of cluster ``j``

    out_i = mass_j * exact_i + rest_j,    exact_i = softmax_t(scale q_i . k_t) v_t  over t in T_j,

where ``T_j`` are the cluster's ``top_k`` keys. All members of a cluster share ``T_j``,
so with the queries sorted by cluster (``order``, ``seg_start``) the exact part is a
small dense attention per cluster: a block of up to ``BLOCK_M`` consecutive members
against the cluster's ``top_k`` key and value rows, two tile products on tensor cores.
Up to ``ONE_TILE_TOP_K`` top keys are one tile, the softmax in registers; more are taken in
tiles of ``KEY_TILE``: with an online softmax in the forward, and in the backward a pass for
each query's log-sum-exp over its top keys, then one for the gradients. The CUDA kernels of
``cuda/attention.cu`` compute it one query per warp with fp32 multiply-adds and a
shared-memory cache of the cluster's rows; they stay the path for fp32.

Key padding and dropout. Padded keys have the logit -inf everywhere here: they take no part
in a centroid's log-sum-exp, and they are among its top keys only where it has fewer valid
keys than ``top_k``, in slots that every kernel reading ``top`` skips (a centroid without a
valid key gets the log-sum-exp +inf and zeros). Dropout is the clustered op's keep mask
``(B, H, C, S)`` on the centroid rows, shared by a cluster's members: at the top keys its
factors ``z_t = keep / (1 - p)`` weigh the exact part, ``sum_t p_t z_t v_t``, and the
remainder, while the mass ``sum_t A_jt`` has none (as in the reference).

The forward's top-k selection needs the centroids' fp32 logits over all keys and their
log-sum-exp. :func:`centroid_top_keys` gets them without the ``(C, S)`` fp32 matrix, in two
launches: one pass on tensor cores (the fp32 centroids split into three half-precision
parts, so products stay exact) gives the largest logit of every sub-block of 4-16 keys and
each block's softmax sum; then one program per centroid takes the log-sum-exp from the
block sums, ranks the sub-blocks (the top keys lie in the ``top_k`` sub-blocks with the
largest maxima), recomputes those sub-blocks' logits and ranks them. A ranking orders int64
keys that order the values and carry their indices: a bitonic top-k where the candidates
are few (``SELECTION["BITONIC_CANDIDATES"]``) or the picks many (``SELECTION["BITONIC_TOP_K"]``),
else ``top_k`` max-reductions in turn.
It replaces an fp32 copy of the keys, an fp32 matrix product, three passes of
``torch.logsumexp`` and ``torch.topk`` over all keys.

Work items. Cluster ``j`` of row ``r`` has ``ceil(n_j / BLOCK_M)`` member blocks, and the
queries in no cluster (padded; zeros out, no gradient) one more run; the count of blocks
over a row is at most ``ceil(N / BLOCK_M) + C + 1``, so that is the grid's first dim and
each program finds its (cluster, block) from the prefix sum of the per-cluster block
counts (``C`` values, one vector in registers); programs past the row's last block
return at once. No host synchronisation.

Forward (:func:`exact_top_keys_fwd`): ``out_i`` above, or, given ``grad_out``, the
per-query ``grad_out_i . exact_i`` the backward needs for the gradient of the mass.
Backward (:func:`exact_top_keys_bwd`): with ``p`` the top-key softmax and
``dp_t = mass_j grad_out_i . v_t``: ``ds = p (dp - sum_t p dp)``,
``dq_i = scale ds K_T + dq_bar_j`` (written, one writer per query),
``dK_T += scale ds^T Q``, ``dV_T += mass_j p^T grad_out`` (atomically added to fp32
buffers: clusters can share keys; the backward is therefore not bit-reproducible, as
with the CUDA kernel). :func:`sum_gradients` adds those buffers to flash attention's
half-precision key and value gradients and rounds once, in one pass.

Top-key summaries, one program per centroid: :func:`top_key_summary` gives each centroid's
attention mass on its top keys and its output over the other keys (``rest``), and
:func:`top_key_gradients` the top keys' part of the backward, both reading the top key and
value rows where they lie instead of gathering them into ``(rows, C, top_k, D)`` fp32 copies
(26 MB each at B H = 32, C = 100, top-k 32, D = 64, whatever N) for torch's products.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._triton import MIN_TILE, mask_bytes, safe_max, three_parts, tiles_unavailable, tl, triton

__all__ = ["triton_exact_unavailable", "selection_unavailable", "sub_block_keys", "centroid_block_stats",
           "centroid_top_keys", "exact_top_keys_fwd", "exact_top_keys_bwd", "top_key_summary", "top_key_gradients",
           "centroid_gradients", "sum_gradients"]

# Up to ONE_TILE_TOP_K top keys are one tile of the exact products (BLOCK_M x top-k fp32 logits in
# registers, the softmax in one pass); more are taken in tiles of KEY_TILE with an online softmax
# (at 128 keys per tile the tiled backward spills: kernel_resources.py --topk 256).
ONE_TILE_TOP_K = 128
KEY_TILE = 64
LOG2E = 1.4426950408889634
# Members per program and warps (fwd / bwd), keys and centroids per program of the block
# statistics (logits); chosen by sweeps of the improved step on an H100 at N = 32k, D = 64,
# k = 32 (benchmarks/NOTES.md; the logits sweep was within run-to-run noise of 1-2 ms).
LAUNCH = {"fwd": {"BLOCK_M": 64, "num_warps": 4}, "bwd": {"BLOCK_M": 64, "num_warps": 4},
          "logits": {"BLOCK_N": 64, "BLOCK_C": 128, "num_warps": 4}}
# The top keys' selection (centroid_top_keys, one program per centroid): sub-blocks of 4 to 16
# keys (sub_block_keys: aiming at SUB_BLOCKS of them) are its candidates, at most TILE key
# values of them (64 KB in bf16) per program, and up to MAX_SUB_BLOCKS sub-blocks (N = 64k at
# 16 keys) are ranked in registers. Each of its two rankings is one bitonic top-k (tl.topk) where
# the candidate keys number at most BITONIC_CANDIDATES, else top_k max-reductions in turn: on
# the H200 (32 rows, C = 100, D = 64, k = 32) the bitonic one took the selection from 131 / 193 /
# 395 us to 66 / 142 / 350 us at 1k / 4k / 16k (128 to 256 candidates), and was slower at 32k and
# 64k (512): 710 / 1228 us against 635 / 996 (benchmarks/NOTES.md, sixteenth session). Rankings
# that pick at least BITONIC_TOP_K are bitonic whatever the count: at top-k 128 / 256 (512 candidate
# keys) the bitonic ones took the selection from 1.32 / 2.64 ms to 0.52 / 0.69 ms at 4k, and from
# 1.92 / 2.04 ms to 1.19 / 1.06 ms at 16k (twenty-second session).
SELECTION = {"SUB_BLOCKS": 2048, "TILE": 32768, "MAX_SUB_BLOCKS": 4096, "num_warps": 4, "BITONIC_CANDIDATES": 256,
             "BITONIC_TOP_K": 128}


def triton_exact_unavailable(query: Tensor, value: Tensor) -> Optional[str]:
    """Why the Triton exact products (and the top keys' summaries) cannot serve these inputs
    (None if they can), for any top-k."""
    return tiles_unavailable(query, value, "the Triton exact products")


def selection_unavailable(top_k: int, dim: int) -> Optional[str]:
    """Why :func:`centroid_top_keys` cannot rank ``top_k`` keys of ``dim`` features (None if it
    can): its candidates, at least two keys per slot, must fit ``SELECTION["TILE"]`` values."""
    if 2 * dim * triton.next_power_of_2(top_k) > SELECTION["TILE"]:
        return (f"top-k {top_k} at head dim {dim}: the selection kernel's candidates exceed "
                f"{SELECTION['TILE']} values")
    return None


if triton is not None:

    @triton.jit
    def _work_item(SEG_START, row, num_clusters, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """-> (cluster, first sorted position, end of the run, active) of this program's
        member block. Cluster -1: a block of the queries in no cluster (padded), which
        sort first, before ``SEG_START[row, 0]``, and get zeros; ``active`` is False past
        the row's last block."""
        clusters = tl.arange(0, BLOCK_C)
        in_range = clusters < num_clusters
        starts = tl.load(SEG_START + row * (num_clusters + 1) + clusters, mask=in_range, other=0)
        ends = tl.load(SEG_START + row * (num_clusters + 1) + clusters + 1, mask=in_range, other=0)
        blocks = (ends - starts + BLOCK_M - 1) // BLOCK_M
        through = tl.cumsum(blocks, 0)  # blocks of clusters 0 .. c
        item = tl.program_id(0)
        cluster = tl.sum((through <= item).to(tl.int32), 0)
        mine = clusters == cluster
        block = item - tl.sum(tl.where(mine, through - blocks, 0), 0)
        start = tl.sum(tl.where(mine, starts, 0), 0) + block * BLOCK_M
        end = tl.sum(tl.where(mine, ends, 0), 0)
        if cluster >= num_clusters:  # past the clusters' blocks: the unclustered run, if any
            unclustered = tl.load(SEG_START + row * (num_clusters + 1))
            start = (item - tl.sum(blocks, 0)) * BLOCK_M
            end = unclustered
            cluster = -1
        return cluster, start, end, start < end

    @triton.jit
    def _unpadded(PAD, row, heads, keys, index, ok, PADDED: tl.constexpr):
        """``ok (n,)`` and, with ``PADDED``, not marked as padding at the keys ``index (n,)`` in
        ``PAD (B, S)`` of the (batch, head) ``row``."""
        if PADDED:
            ok = ok & (tl.load(PAD + (row // heads) * keys + index, mask=ok, other=1) == 0)
        return ok

    @triton.jit
    def _top_softmax(q, k_top, top_ok, qk_scale):
        """Softmax over the top keys of ``q (M, D) @ k_top (K, D)^T`` -> fp32 ``(M, K)``; zeros
        where no slot is valid (a cluster whose keys are all padded)."""
        logits = _top_logits(q, k_top, top_ok, qk_scale)
        row_max = tl.max(logits, 1)
        probs = tl.exp2(logits - safe_max(row_max)[:, None])
        total = tl.sum(probs, 1)
        return probs / tl.where(total > 0, total, 1.0)[:, None]

    @triton.jit
    def _member_rows(ORDER, row, length, start, end, DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """-> (member mask, query indices, offsets of their (BLOCK_M, DIM) rows) of the sorted
        positions ``start .. start + BLOCK_M`` before ``end`` (no member when ``start >= end``)."""
        positions = start + tl.arange(0, BLOCK_M)
        member = positions < end
        queries = tl.load(ORDER + row * length + positions, mask=member, other=0)
        return member, queries, (row * length + queries)[:, None] * DIM + tl.arange(0, DIM)[None, :]

    @triton.jit
    def _top_slots(TOP, PAD, row, cluster, num_clusters, keys, heads, top_k, first, DIM: tl.constexpr,
                   BLOCK_K: tl.constexpr, PADDED: tl.constexpr):
        """-> (slot mask, key indices, row offsets ``(BLOCK_K, DIM)``) of the cluster's top-key slots
        ``first .. first + BLOCK_K``. A slot is valid below ``top_k`` and (``PADDED``) on a key that
        ``PAD (B, S)`` does not mark as padding: the top keys of a centroid with fewer valid keys
        than slots fill the rest with padded ones."""
        slots = first + tl.arange(0, BLOCK_K)
        in_top = slots < top_k
        top_keys = tl.load(TOP + (row * num_clusters + cluster) * top_k + slots, mask=in_top, other=0)
        top_ok = _unpadded(PAD, row, heads, keys, top_keys, in_top, PADDED)
        return top_ok, top_keys, (row * keys + top_keys)[:, None] * DIM + tl.arange(0, DIM)[None, :]

    @triton.jit
    def _cluster_top_rows(TOP, K, V, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, first, drop_scale,
                          DIM: tl.constexpr, BLOCK_K: tl.constexpr, PADDED: tl.constexpr, DROPOUT: tl.constexpr):
        """-> (slot mask, row offsets, key rows, value rows ``(BLOCK_K, DIM)``, dropout factors
        ``(BLOCK_K,)`` fp32) of the cluster's top-key slots ``first .. first + BLOCK_K``
        (:func:`_top_slots`). The factors are ``KEEP (rows, C, S)`` at the top keys times
        ``drop_scale`` (``DROPOUT``), else 1."""
        top_ok, top_keys, top_rows = _top_slots(TOP, PAD, row, cluster, num_clusters, keys, heads, top_k, first, DIM,
                                                BLOCK_K, PADDED)
        drop = tl.full((BLOCK_K,), 1.0, tl.float32)
        if DROPOUT:
            kept = tl.load(KEEP + (row * num_clusters + cluster) * keys + top_keys, mask=top_ok, other=0)
            drop = kept.to(tl.float32) * drop_scale
        k_top = tl.load(K + top_rows, mask=top_ok[:, None], other=0.0)
        v_top = tl.load(V + top_rows, mask=top_ok[:, None], other=0.0)
        return top_ok, top_rows, k_top, v_top, drop

    @triton.jit
    def _top_logits(q, k_top, top_ok, qk_scale):
        """``q (M, D) @ k_top (K, D)^T`` in the log2 domain, fp32 ``(M, K)``; -inf at invalid slots."""
        return tl.where(top_ok[None, :], tl.dot(q, tl.trans(k_top)) * qk_scale, float("-inf"))

    @triton.jit
    def _online_softmax(running_max, total, logits):
        """One tile of an online softmax over ``logits (M, K)`` (log2 domain, -inf at invalid slots),
        given the maximum and the sum ``(M,)`` of the tiles before: -> (the maximum so far, the factor
        that rescales what was summed against the old maximum, the tile's ``2^(logit - maximum)``,
        the sum so far)."""
        new_max = tl.maximum(running_max, tl.max(logits, 1))
        shift = safe_max(new_max)
        rescale = tl.exp2(running_max - shift)
        probs = tl.exp2(logits - shift[:, None])
        return new_max, rescale, probs, total * rescale + tl.sum(probs, 1)

    @triton.jit
    def _exact_part(q, TOP, K, V, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, qk_scale, drop_scale,
                    DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
                    PADDED: tl.constexpr, DROPOUT: tl.constexpr):
        """``exact (BLOCK_M, DIM)`` fp32, ``sum_t softmax_t(scale q . k_t) z_t v_t`` over the cluster's
        top keys: in one tile (``ONE_TILE``: ``top_k <= BLOCK_K``), else over tiles of ``BLOCK_K``
        keys with an online softmax (a running maximum and sum, the partial output rescaled as the
        maximum grows), so that ``top_k`` is not bounded by the registers."""
        if ONE_TILE:
            top_ok, _, k_top, v_top, drop = _cluster_top_rows(
                TOP, K, V, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, 0, drop_scale, DIM, BLOCK_K,
                PADDED, DROPOUT)
            probs = _top_softmax(q, k_top, top_ok, qk_scale)
            if DROPOUT:
                probs = probs * drop[None, :]
            exact = tl.dot(probs.to(v_top.dtype), v_top)
        else:
            running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            total = tl.zeros((BLOCK_M,), tl.float32)
            exact = tl.zeros((BLOCK_M, DIM), tl.float32)
            for first in range(0, top_k, BLOCK_K):
                top_ok, _, k_top, v_top, drop = _cluster_top_rows(
                    TOP, K, V, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, first, drop_scale, DIM,
                    BLOCK_K, PADDED, DROPOUT)
                running_max, rescale, probs, total = _online_softmax(
                    running_max, total, _top_logits(q, k_top, top_ok, qk_scale))
                if DROPOUT:
                    probs = probs * drop[None, :]
                exact = exact * rescale[:, None] + tl.dot(probs.to(v_top.dtype), v_top)
            exact = exact / tl.where(total > 0, total, 1.0)[:, None]
        return exact

    @triton.jit
    def _top_log2_normalizer(q, TOP, K, PAD, row, cluster, num_clusters, keys, heads, top_k, qk_scale,
                             DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PADDED: tl.constexpr):
        """``log2 sum_t 2^logit_t`` over the cluster's top keys, ``(BLOCK_M,)`` fp32, in tiles of
        ``BLOCK_K`` keys (+inf where no slot is valid, so that every probability is 0)."""
        running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        for first in range(0, top_k, BLOCK_K):
            top_ok, _, top_rows = _top_slots(TOP, PAD, row, cluster, num_clusters, keys, heads, top_k, first, DIM,
                                             BLOCK_K, PADDED)
            running_max, _, _, total = _online_softmax(
                running_max, total, _top_logits(q, tl.load(K + top_rows, mask=top_ok[:, None], other=0.0), top_ok,
                                                qk_scale))
        return tl.where(total > 0, running_max + tl.log2(tl.where(total > 0, total, 1.0)), float("inf"))

    @triton.jit
    def _top_tile_grads(q, grad_exact, probs, grad_probs, delta, member, k_top, top_ok, top_rows, drop, GRAD_K,
                        GRAD_V, scale, DROPOUT: tl.constexpr):
        """One tile of top keys in the exact part's backward, given its probabilities ``probs`` and
        ``grad_probs`` (``(M, K)`` fp32, the latter with the dropout factors) and each query's
        ``delta = sum_t p_t dp_t`` over all its top keys: adds the tile's key and value gradients
        into ``GRAD_K``, ``GRAD_V`` atomically and returns the query gradient's share
        ``ds @ k_top`` ``(M, DIM)`` fp32, before the scale."""
        weights = probs
        if DROPOUT:
            weights = probs * drop[None, :]
        grad_logits = probs * (grad_probs - delta[:, None])
        grad_logits = tl.where(member[:, None], grad_logits, 0.0).to(q.dtype)
        # Rows of non-members are zero in grad_logits and grad_exact: they add nothing.
        grad_k = tl.dot(tl.trans(grad_logits), q) * scale
        grad_v = tl.dot(tl.trans(weights.to(q.dtype)), grad_exact)
        tl.atomic_add(GRAD_K + top_rows, grad_k, mask=top_ok[:, None])
        tl.atomic_add(GRAD_V + top_rows, grad_v, mask=top_ok[:, None])
        return tl.dot(grad_logits, k_top)

    @triton.jit
    def _exact_fwd_kernel(Q, K, V, GRAD_OUT, ORDER, SEG_START, TOP, MASS, REST, OUT, GRAD_DOT, PAD, KEEP,
                          length, keys, num_clusters, heads, top_k, qk_scale, drop_scale,
                          DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_C: tl.constexpr, ONE_TILE: tl.constexpr, GRAD_MODE: tl.constexpr,
                          PADDED: tl.constexpr, DROPOUT: tl.constexpr):
        """Q, GRAD_OUT, OUT: (rows, N, DIM); K, V: (rows, S, DIM); ORDER: (rows, N) int64;
        SEG_START: (rows, C + 1) int64; TOP: (rows, C, top_k) int64; MASS: (rows, C) fp32;
        REST: (rows, C, DIM) fp32; GRAD_DOT: (rows, N) fp32; PAD, KEEP: as _cluster_top_rows.
        All contiguous."""
        row = tl.program_id(1).to(tl.int64)
        cluster, start, end, active = _work_item(SEG_START, row, num_clusters, BLOCK_M, BLOCK_C)
        member, queries, query_rows = _member_rows(ORDER, row, length, start, end, DIM, BLOCK_M)
        if active and cluster < 0:  # queries in no cluster: zeros
            if GRAD_MODE:
                tl.store(GRAD_DOT + row * length + queries, tl.zeros((BLOCK_M,), tl.float32), mask=member)
            else:
                tl.store(OUT + query_rows, tl.zeros((BLOCK_M, DIM), OUT.dtype.element_ty), mask=member[:, None])
        elif active:
            q = tl.load(Q + query_rows, mask=member[:, None], other=0.0)
            exact = _exact_part(q, TOP, K, V, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, qk_scale,
                                drop_scale, DIM, BLOCK_M, BLOCK_K, ONE_TILE, PADDED, DROPOUT)  # (BLOCK_M, DIM) fp32
            if GRAD_MODE:
                grad_out = tl.load(GRAD_OUT + query_rows, mask=member[:, None], other=0.0)
                tl.store(GRAD_DOT + row * length + queries, tl.sum(grad_out.to(tl.float32) * exact, 1), mask=member)
            else:
                mass = tl.load(MASS + row * num_clusters + cluster)
                rest = tl.load(REST + (row * num_clusters + cluster) * DIM + tl.arange(0, DIM))
                out = mass * exact + rest[None, :]
                tl.store(OUT + query_rows, out.to(OUT.dtype.element_ty), mask=member[:, None])

    @triton.jit
    def _exact_bwd_kernel(GRAD_OUT, Q, K, V, ORDER, SEG_START, TOP, MASS, GRAD_CENTROIDS, GRAD_DOT, GRAD_Q, GRAD_K,
                          GRAD_V, PAD, KEEP, length, keys, num_clusters, heads, top_k, qk_scale, scale, drop_scale,
                          DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_C: tl.constexpr, ONE_TILE: tl.constexpr, PADDED: tl.constexpr,
                          DROPOUT: tl.constexpr):
        """GRAD_CENTROIDS: (rows, C, DIM) fp32, added to every member's query gradient;
        GRAD_DOT: (rows, N) fp32, the forward's ``grad_out_i . exact_i`` (read without
        ``ONE_TILE``); GRAD_Q: (rows, N, DIM) in the input dtype; GRAD_K, GRAD_V: (rows, S, DIM)
        fp32, added to. With dropout factors ``z_t`` the exact part is ``sum_t p_t z_t v_t``: its
        gradient reaches ``p_t`` times ``z_t``, and ``v_t`` through ``p_t z_t``.

        In one tile (``ONE_TILE``) the softmax and ``delta_i = sum_t p_t dp_t`` come from the
        tile itself. Over tiles, a first pass takes each query's log-sum-exp over its top keys,
        and ``delta_i`` is ``mass_j grad_out_i . exact_i`` (``dp_t = mass_j z_t grad_out_i . v_t``),
        which the forward has given; a second pass takes the gradients tile by tile."""
        row = tl.program_id(1).to(tl.int64)
        cluster, start, end, active = _work_item(SEG_START, row, num_clusters, BLOCK_M, BLOCK_C)
        member, queries, query_rows = _member_rows(ORDER, row, length, start, end, DIM, BLOCK_M)
        if active and cluster < 0:  # queries in no cluster: no gradient
            tl.store(GRAD_Q + query_rows, tl.zeros((BLOCK_M, DIM), GRAD_Q.dtype.element_ty), mask=member[:, None])
        elif active:
            q = tl.load(Q + query_rows, mask=member[:, None], other=0.0)
            mass = tl.load(MASS + row * num_clusters + cluster)
            # The exact part enters the output scaled by the mass.
            grad_exact = (tl.load(GRAD_OUT + query_rows, mask=member[:, None], other=0.0).to(tl.float32)
                          * mass).to(q.dtype)
            if ONE_TILE:
                top_ok, top_rows, k_top, v_top, drop = _cluster_top_rows(
                    TOP, K, V, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, 0, drop_scale, DIM,
                    BLOCK_K, PADDED, DROPOUT)
                probs = _top_softmax(q, k_top, top_ok, qk_scale)
                grad_probs = tl.dot(grad_exact, tl.trans(v_top))
                if DROPOUT:
                    grad_probs = grad_probs * drop[None, :]
                grad_q = _top_tile_grads(q, grad_exact, probs, grad_probs, tl.sum(probs * grad_probs, 1), member,
                                         k_top, top_ok, top_rows, drop, GRAD_K, GRAD_V, scale, DROPOUT)
            else:
                normalizer = _top_log2_normalizer(q, TOP, K, PAD, row, cluster, num_clusters, keys, heads, top_k,
                                                  qk_scale, DIM, BLOCK_M, BLOCK_K, PADDED)
                delta = mass * tl.load(GRAD_DOT + row * length + queries, mask=member, other=0.0)
                grad_q = tl.zeros((BLOCK_M, DIM), tl.float32)
                for first in range(0, top_k, BLOCK_K):
                    top_ok, top_rows, k_top, v_top, drop = _cluster_top_rows(
                        TOP, K, V, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, first, drop_scale,
                        DIM, BLOCK_K, PADDED, DROPOUT)
                    probs = tl.exp2(_top_logits(q, k_top, top_ok, qk_scale) - normalizer[:, None])
                    grad_probs = tl.dot(grad_exact, tl.trans(v_top))
                    if DROPOUT:
                        grad_probs = grad_probs * drop[None, :]
                    grad_q += _top_tile_grads(q, grad_exact, probs, grad_probs, delta, member, k_top, top_ok,
                                              top_rows, drop, GRAD_K, GRAD_V, scale, DROPOUT)
            grad_centroid = tl.load(GRAD_CENTROIDS + (row * num_clusters + cluster) * DIM + tl.arange(0, DIM))
            grad_q = grad_q * scale + grad_centroid[None, :]
            tl.store(GRAD_Q + query_rows, grad_q.to(GRAD_Q.dtype.element_ty), mask=member[:, None])


    # Rankings for the top-k selections: one int64 per entry whose order is the value's, ties
    # by the smaller index, so that each pick is one max-reduction (not an argmax and a gather).
    _TAKEN = tl.constexpr(-9223372036854775807)  # below every ranked finite value or infinity

    @triton.jit
    def _ranked(values, index):
        """int64 ``monotonic(values) * 2**32 + (2**32 - 1 - index)`` for fp32 ``values`` and
        ``0 <= index < 2**31``: the float's bits made monotonic as a signed int32 (negative
        floats have their magnitude bits flipped), the index reversed below them."""
        bits = values.to(tl.int32, bitcast=True)
        monotonic = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        return monotonic.to(tl.int64) * 4294967296 + (4294967295 - index.to(tl.int64))

    @triton.jit
    def _ranked_index(ranked):
        """The index a :func:`_ranked` value was made with."""
        return 4294967295 - (ranked & 4294967295)

    @triton.jit
    def _centroid_block_stats_kernel(QBAR, K, PAD, SUB_MAX, BLOCK_MAX, BLOCK_SUM, num_clusters, keys, heads,
                                     key_blocks, sub_blocks, scale, DIM: tl.constexpr, BLOCK_C: tl.constexpr,
                                     BLOCK_N: tl.constexpr, SUB: tl.constexpr, PADDED: tl.constexpr):
        """Program (key block, row, centroid block): the statistics of the block's logits
        ``scale qbar . k``: the largest logit of each ``SUB`` keys, ``SUB_MAX (rows, C,
        sub_blocks)``, and per block of ``BLOCK_N`` keys ``BLOCK_MAX``, ``BLOCK_SUM`` ``(rows,
        C, key_blocks)`` (max, sum of exp(logit - max)); the logits themselves are not stored.
        Padded keys (``PADDED``: ``PAD (B, S)`` non-zero) have the logit -inf; a block without a
        valid key has the maximum -inf and the sum 0.

        QBAR (rows, C, DIM) fp32 is split into three parts of K's dtype (hi + mid + lo),
        so each product is exact and only the fp32 summation order differs from an fp32
        matrix product."""
        block = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        centroids = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        key_index = block * BLOCK_N + tl.arange(0, BLOCK_N)
        feats = tl.arange(0, DIM)
        c_ok = centroids < num_clusters
        k_ok = key_index < keys
        qbar = tl.load(QBAR + (row * num_clusters + centroids)[:, None] * DIM + feats[None, :], mask=c_ok[:, None],
                       other=0.0)
        k = tl.load(K + (row * keys + key_index)[:, None] * DIM + feats[None, :], mask=k_ok[:, None], other=0.0)
        k_t = tl.trans(k)
        hi, mid, lo = three_parts(qbar, k.dtype)
        logits = (tl.dot(hi, k_t) + tl.dot(mid, k_t) + tl.dot(lo, k_t)) * scale
        valid = _unpadded(PAD, row, heads, keys, key_index, k_ok, PADDED)
        logits = tl.where(valid[None, :], logits, float("-inf"))
        sub_max = tl.max(tl.reshape(logits, (BLOCK_C, BLOCK_N // SUB, SUB)), 2)
        sub_index = block * (BLOCK_N // SUB) + tl.arange(0, BLOCK_N // SUB)
        tl.store(SUB_MAX + (row * num_clusters + centroids)[:, None] * sub_blocks + sub_index[None, :], sub_max,
                 mask=c_ok[:, None] & (sub_index < sub_blocks)[None, :])
        block_max = tl.max(sub_max, 1)
        block_sum = tl.sum(tl.exp(logits - safe_max(block_max)[:, None]), 1)
        stats = (row * num_clusters + centroids) * key_blocks + block
        tl.store(BLOCK_MAX + stats, block_max, mask=c_ok)
        tl.store(BLOCK_SUM + stats, block_sum, mask=c_ok)

    @triton.jit
    def _centroid_top_keys_kernel(QBAR, K, PAD, SUB_MAX, BLOCK_MAX, BLOCK_SUM, BLOCKS, LSE, TOP, num_clusters, keys,
                                  heads, key_blocks, sub_blocks, slots, top_k, scale, DIM: tl.constexpr,
                                  SUB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
                                  STATS_CHUNK: tl.constexpr, BLOCKS_FROM: tl.constexpr,
                                  SORT_BLOCKS: tl.constexpr, SORT_KEYS: tl.constexpr, TOP_K_POW2: tl.constexpr,
                                  PADDED: tl.constexpr):
        """Program (centroid, row): the centroid's log-sum-exp over all keys ``LSE (rows, C)``
        from the block statistics, and its ``top_k`` keys by logit ``TOP (rows, C, top_k)``
        int64, largest first.

        The top keys lie in the ``slots`` sub-blocks of ``SUB`` keys with the largest maxima
        (``BLOCKS_FROM``: 0, every sub-block, there being at most ``top_k``; 1, chosen here
        from ``SUB_MAX``, up to ``BLOCK_B`` of them; 2, given in ``BLOCKS (rows, C, slots)``).
        Their ``slots x SUB`` logits are recomputed (``BLOCK_S`` >= ``slots`` rows of
        sub-blocks, at least 16 candidates for the tensor cores), and the keys taken largest
        first (ties: the smaller index first, as for the sub-blocks).

        Each ranking is either ``k`` max-reductions one after the other, or (``SORT_BLOCKS``,
        ``SORT_KEYS``) one bitonic top-k (``tl.topk``) of the power of two above ``k``: the
        ranked values are distinct, so both give the same keys in the same order.

        Padded keys (``PADDED``) rank by the logit -inf, so they are taken only where the
        centroid has fewer valid keys than ``top_k`` (slots the later kernels skip), and a
        centroid without a valid key gets the log-sum-exp +inf (its probabilities are 0)."""
        centroid = tl.program_id(0).to(tl.int64) + tl.program_id(1).to(tl.int64) * num_clusters  # row * C + c
        row = tl.program_id(1).to(tl.int64)

        # log-sum-exp of the blocks' (max, sum of exp(logit - max)), in one online pass
        chunk = tl.arange(0, STATS_CHUNK)
        running_max = tl.max(tl.full((STATS_CHUNK,), float("-inf"), tl.float32), 0)
        running_sum = tl.sum(tl.zeros((STATS_CHUNK,), tl.float32), 0)
        for start in range(0, key_blocks, STATS_CHUNK):
            here = start + chunk < key_blocks
            maxima = tl.load(BLOCK_MAX + centroid * key_blocks + start + chunk, mask=here, other=float("-inf"))
            sums = tl.load(BLOCK_SUM + centroid * key_blocks + start + chunk, mask=here, other=0.0)
            new_max = tl.maximum(running_max, tl.max(maxima, 0))
            subtracted = safe_max(new_max)
            running_sum = running_sum * tl.exp(running_max - subtracted) + tl.sum(sums * tl.exp(maxima - subtracted), 0)
            running_max = new_max
        nonempty = running_sum > 0
        tl.store(LSE + centroid, tl.where(nonempty, running_max + tl.log(tl.where(nonempty, running_sum, 1.0)),
                                          float("inf")))

        slot = tl.arange(0, BLOCK_S)
        if BLOCKS_FROM == 0:
            blocks = slot
        elif BLOCKS_FROM == 1:
            sub = tl.arange(0, BLOCK_B)
            ranked = _ranked(tl.load(SUB_MAX + centroid * sub_blocks + sub, mask=sub < sub_blocks,
                                     other=float("-inf")), sub)
            if SORT_BLOCKS:
                # the BLOCK_S (>= slots) best; those past `slots` are masked out below
                blocks = _ranked_index(tl.topk(ranked, BLOCK_S)).to(tl.int32)
            else:
                blocks = tl.zeros((BLOCK_S,), tl.int32)
                for t in range(slots):
                    best = tl.max(ranked, 0)
                    blocks = tl.where(slot == t, _ranked_index(best).to(tl.int32), blocks)
                    ranked = tl.where(ranked == best, _TAKEN, ranked)
        else:
            blocks = tl.load(BLOCKS + centroid * slots + slot, mask=slot < slots, other=0).to(tl.int32)

        # the candidates: the chosen sub-blocks' keys, (BLOCK_S SUB, DIM) rows read whole
        key_index = tl.reshape(blocks[:, None] * SUB + tl.arange(0, SUB)[None, :], (BLOCK_S * SUB,))
        ok = (tl.arange(0, BLOCK_S * SUB) // SUB < slots) & (key_index < keys)
        feats = tl.arange(0, DIM)
        k = tl.load(K + (row * keys + key_index)[:, None] * DIM + feats[None, :], mask=ok[:, None], other=0.0)
        # Their logits on tensor cores with exact products, as in the block statistics: the
        # right operand's columns 0-2 are the centroid's three parts in K's dtype, the rest 0.
        qbar = tl.load(QBAR + centroid * DIM + feats)
        hi, mid, lo = three_parts(qbar, k.dtype)
        part = tl.arange(0, 16)[None, :]
        parts = tl.where(part == 0, hi[:, None], tl.where(part == 1, mid[:, None],
                                                          tl.where(part == 2, lo[:, None], 0.0))).to(k.dtype)
        logits = tl.sum(tl.dot(k, parts), 1) * scale
        valid = _unpadded(PAD, row, heads, keys, key_index, ok, PADDED)
        # Padded candidates rank by -inf; the slots that are no candidate (past `slots`, or past
        # the last key) below everything, so that they are never taken: at least top_k candidates
        # are real keys.
        ranked = tl.where(ok, _ranked(tl.where(valid, logits, float("-inf")), key_index), _TAKEN)
        # (indices clamped: in range even for NaN logits, which rank nothing)
        if SORT_KEYS:
            tl.static_assert(TOP_K_POW2 <= BLOCK_S * SUB)
            rank = tl.arange(0, TOP_K_POW2)
            best = tl.topk(ranked, TOP_K_POW2)
            tl.store(TOP + centroid * top_k + rank, tl.minimum(_ranked_index(best), keys - 1), mask=rank < top_k)
        else:
            for t in range(top_k):
                best = tl.max(ranked, 0)
                tl.store(TOP + centroid * top_k + t, tl.minimum(_ranked_index(best), keys - 1))
                ranked = tl.where(ranked == best, _TAKEN, ranked)

    @triton.jit
    def _sum_gradients_kernel(SPARSE, FIRST, SECOND, OUT, heads, keys, first_b, first_h, first_s, second_b,
                              second_h, second_s, out_b, out_h, out_s, DIM: tl.constexpr, BLOCK: tl.constexpr,
                              HAS_SECOND: tl.constexpr):
        """Program (key block, row): OUT = SPARSE (rows, S, DIM) fp32 + FIRST (+ SECOND), the
        latter and OUT (B, H, S, DIM) of the output's dtype with the given strides, the feature
        dim contiguous; summed in fp32, rounded once. OUT may be FIRST: each element is read
        before it is written, by the same program."""
        row = tl.program_id(1).to(tl.int64)
        batch, head = row // heads, row % heads
        keys_here = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = keys_here[:, None] < keys
        feats = tl.arange(0, DIM)[None, :]
        flat = (row * keys + keys_here)[:, None] * DIM + feats
        total = tl.load(SPARSE + flat, mask=ok, other=0.0)
        total += tl.load(FIRST + batch * first_b + head * first_h + keys_here[:, None] * first_s + feats, mask=ok,
                         other=0.0).to(tl.float32)
        if HAS_SECOND:
            total += tl.load(SECOND + batch * second_b + head * second_h + keys_here[:, None] * second_s + feats,
                             mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + batch * out_b + head * out_h + keys_here[:, None] * out_s + feats,
                 total.to(OUT.dtype.element_ty), mask=ok)


    @triton.jit
    def _top_key_probs(QBAR, K, V, TOP, LSE, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, first, scale,
                       drop_scale, DIM: tl.constexpr, BLOCK_K: tl.constexpr, PADDED: tl.constexpr,
                       DROPOUT: tl.constexpr):
        """-> (slot mask, row offsets, key rows, value rows (BLOCK_K, DIM), centroid (DIM,) fp32,
        top-key probabilities (BLOCK_K,) fp32, 0 in unused slots, dropout factors (BLOCK_K,)) of
        one centroid's top-key slots ``first .. first + BLOCK_K``: its attention probabilities
        ``exp(scale qbar . k_t - lse)``, in fp32 multiply-adds as the fp32 products of the
        centroids and the upcast keys. PAD, KEEP: as _cluster_top_rows."""
        top_ok, top_rows, k_top, v_top, drop = _cluster_top_rows(
            TOP, K, V, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, first, drop_scale, DIM, BLOCK_K,
            PADDED, DROPOUT)
        centroid = (row * num_clusters + cluster).to(tl.int64)
        qbar = tl.load(QBAR + centroid * DIM + tl.arange(0, DIM))
        logits = tl.sum(k_top.to(tl.float32) * qbar[None, :], 1) * scale
        probs = tl.where(top_ok, tl.exp(logits - tl.load(LSE + centroid)), 0.0)
        return top_ok, top_rows, k_top, v_top, qbar, probs, drop

    @triton.jit
    def _top_key_summary_kernel(QBAR, K, V, TOP, LSE, CENTROID_VALUES, MASS, REST, PAD, KEEP, num_clusters, keys,
                                heads, top_k, scale, drop_scale, DIM: tl.constexpr, BLOCK_K: tl.constexpr,
                                TILES: tl.constexpr, WITH_REST: tl.constexpr, PADDED: tl.constexpr,
                                DROPOUT: tl.constexpr):
        """Program (cluster, row): the centroid's attention mass on its top keys, and (WITH_REST)
        its output over the other keys, ``CENTROID_VALUES - sum_t p_t z_t v_t`` (``z_t`` the
        dropout factors, which the mass does not take); the top keys in ``TILES`` tiles of
        ``BLOCK_K`` (unrolled: one tile compiles to the straight code)."""
        cluster, row = tl.program_id(0), tl.program_id(1)
        mass = tl.sum(tl.zeros((BLOCK_K,), tl.float32), 0)
        top_part = tl.zeros((DIM,), tl.float32)
        for tile in tl.static_range(TILES):
            _, _, _, v_top, _, probs, drop = _top_key_probs(
                QBAR, K, V, TOP, LSE, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, tile * BLOCK_K, scale,
                drop_scale, DIM, BLOCK_K, PADDED, DROPOUT)
            mass += tl.sum(probs, 0)
            if WITH_REST:
                top_part += tl.sum((probs * drop)[:, None] * v_top.to(tl.float32), 0)
        centroid = (row * num_clusters + cluster).to(tl.int64)
        tl.store(MASS + centroid, mass)
        if WITH_REST:
            feats = tl.arange(0, DIM)
            tl.store(REST + centroid * DIM + feats, tl.load(CENTROID_VALUES + centroid * DIM + feats) - top_part)

    @triton.jit
    def _top_key_grads_kernel(QBAR, K, V, TOP, LSE, GRAD_REST, GRAD_MASS, GRAD_K, GRAD_V, LSE_WEIGHT,
                              GRAD_CENTROIDS, PAD, KEEP, num_clusters, keys, heads, top_k, scale, drop_scale,
                              DIM: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr, PADDED: tl.constexpr,
                              DROPOUT: tl.constexpr):
        """Program (cluster, row): the top-key part of the improved backward for one centroid,
        with ``g`` its rest's gradient, ``gm`` its mass's and ``z_t`` the dropout factors:
        ``a_t = gm - z_t g . v_t``, ``w_t = a_t p_t``; adds ``-p_t z_t g`` to GRAD_V and
        ``scale w_t qbar`` to GRAD_K at its top keys (atomically: clusters share keys), and
        writes ``sum_t w_t`` (LSE_WEIGHT, the weight of the log-sum-exp's dense term) and
        ``scale sum_t w_t k_t`` (GRAD_CENTROIDS); the top keys in ``TILES`` tiles of ``BLOCK_K``."""
        cluster, row = tl.program_id(0), tl.program_id(1)
        centroid = (row * num_clusters + cluster).to(tl.int64)
        feats = tl.arange(0, DIM)
        grad_rest = tl.load(GRAD_REST + centroid * DIM + feats)
        grad_mass = tl.load(GRAD_MASS + centroid)
        lse_weight = tl.sum(tl.zeros((BLOCK_K,), tl.float32), 0)
        weighted_keys = tl.zeros((DIM,), tl.float32)
        for tile in tl.static_range(TILES):
            top_ok, top_rows, k_top, v_top, qbar, probs, drop = _top_key_probs(
                QBAR, K, V, TOP, LSE, PAD, KEEP, row, cluster, num_clusters, keys, heads, top_k, tile * BLOCK_K, scale,
                drop_scale, DIM, BLOCK_K, PADDED, DROPOUT)
            weights = tl.where(top_ok, (grad_mass - drop * tl.sum(v_top.to(tl.float32) * grad_rest[None, :], 1))
                               * probs, 0.0)
            lse_weight += tl.sum(weights, 0)
            weighted_keys += tl.sum(weights[:, None] * k_top.to(tl.float32), 0)
            tl.atomic_add(GRAD_V + top_rows, -(probs * drop)[:, None] * grad_rest[None, :], mask=top_ok[:, None])
            tl.atomic_add(GRAD_K + top_rows, scale * weights[:, None] * qbar[None, :], mask=top_ok[:, None])
        tl.store(LSE_WEIGHT + centroid, lse_weight)
        tl.store(GRAD_CENTROIDS + centroid * DIM + feats, scale * weighted_keys)


    @triton.jit
    def _centroid_grads_kernel(DQB, GRAD_TOP, LSE_WEIGHT, K_OUT, QBAR, SEG_START, DQ_BAR, X, heads, num_clusters,
                               total, parts, scale, dqb_b, dqb_h, dqb_p, dqb_c, k_out_b, k_out_h, k_out_c,
                               DIM: tl.constexpr, BLOCK: tl.constexpr, LSE_TERM: tl.constexpr):
        """Program: ``BLOCK`` centroids ``(b, h, c)`` of :func:`centroid_gradients`."""
        centroid = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = centroid < total
        row = centroid // num_clusters
        cluster = centroid % num_clusters
        batch, head = row // heads, row % heads
        feats = tl.arange(0, DIM)[None, :]
        flat = centroid.to(tl.int64)[:, None] * DIM + feats
        grads = tl.load(GRAD_TOP + flat, mask=ok[:, None], other=0.0)
        dqb = DQB + (batch.to(tl.int64) * dqb_b + head * dqb_h + cluster * dqb_c)[:, None] + feats
        for part in range(parts):
            grads += tl.load(dqb + part * dqb_p, mask=ok[:, None], other=0.0).to(tl.float32)
        if LSE_TERM:
            weight = scale * tl.load(LSE_WEIGHT + centroid, mask=ok, other=0.0)[:, None]
            k_out = tl.load(K_OUT + (batch.to(tl.int64) * k_out_b + head * k_out_h + cluster * k_out_c)[:, None]
                            + feats, mask=ok[:, None], other=0.0)
            grads -= weight * k_out.to(tl.float32)
            x = -weight * tl.load(QBAR + flat, mask=ok[:, None], other=0.0)
            tl.store(X + flat, x.to(X.dtype.element_ty), mask=ok[:, None])
        first = tl.load(SEG_START + row.to(tl.int64) * (num_clusters + 1) + cluster, mask=ok, other=0)
        after = tl.load(SEG_START + row.to(tl.int64) * (num_clusters + 1) + cluster + 1, mask=ok, other=1)
        members = tl.maximum(after - first, 1).to(tl.float32)
        tl.store(DQ_BAR + flat, grads / members[:, None], mask=ok[:, None])


def _key_masks(rows: int, key_padding_mask: Optional[Tensor], keep: Optional[Tensor], dropout_p: float,
               unused: Tensor) -> Tuple[Tensor, Tensor, int, float, dict]:
    """The kernels' view of key padding and dropout: ``(PAD, KEEP, heads, drop_scale, flags)``.

    ``key_padding_mask (B, S)`` bool (True = padded) and ``keep (B, H, C, S)`` bool (the
    clustered op's dropout keep mask) become uint8 views (``unused`` stands in for an absent
    one: the kernel does not read it); ``heads = rows / B`` maps a row to its batch entry;
    ``drop_scale = 1 / (1 - dropout_p)`` multiplies the kept weights; ``flags`` are the
    ``PADDED`` / ``DROPOUT`` constexprs."""
    masks = [m for m in (key_padding_mask, keep) if m is not None]
    heads = rows // masks[0].shape[0] if masks else 1
    pad = unused if key_padding_mask is None else mask_bytes(key_padding_mask)
    kept = unused if keep is None else mask_bytes(keep)
    drop_scale = 1.0 / (1.0 - dropout_p) if keep is not None else 1.0
    return pad, kept, heads, drop_scale, dict(PADDED=key_padding_mask is not None, DROPOUT=keep is not None)


def top_key_summary(qbar: Tensor, key: Tensor, value: Tensor, top: Tensor, lse: Tensor, scale: float,
                    centroid_values: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                    keep: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tuple[Tensor, Optional[Tensor]]:
    """Each centroid's attention mass on its top keys and, given its output over all keys, its
    output over the other keys, without gathering the top key and value rows into
    ``(rows, C, top_k, D)`` fp32 copies.

    Args:
        qbar: ``(rows, C, D)`` fp32 centroids. key, value: ``(rows, S, D)`` fp16 / bf16.
        top: ``(rows, C, top_k)`` int64 key indices. lse: ``(rows, C)`` fp32 log-sum-exp of the
            centroid logits over all keys. centroid_values: ``(rows, C, D)`` fp32 or None.
        key_padding_mask: ``(B, S)`` bool or None: top keys that are padded count for nothing.
        keep: ``(B, H, C, S)`` bool dropout keep mask or None, for ``dropout_p``.

    Returns:
        ``mass (rows, C)`` fp32 (``sum_t exp(scale qbar . k_t - lse)`` over the top keys) and
        ``rest (rows, C, D)`` fp32 (``centroid_values - sum_t p_t z_t v_t``, ``z_t`` the keep
        mask over ``1 - dropout_p``, 1 without), None without ``centroid_values``.
    """
    rows, num_clusters, top_k = top.shape
    qbar, key, value, top, lse = (x.contiguous() for x in (qbar, key, value, top, lse))
    pad, kept, heads, drop_scale, flags = _key_masks(rows, key_padding_mask, keep, dropout_p, top)
    mass = qbar.new_empty(rows, num_clusters)
    rest = None if centroid_values is None else torch.empty_like(qbar)
    _top_key_summary_kernel[(num_clusters, rows)](
        qbar, key, value, top, lse, qbar if rest is None else centroid_values.contiguous(), mass,
        qbar if rest is None else rest, pad, kept, num_clusters, key.shape[1], heads, top_k, scale, drop_scale,
        DIM=qbar.shape[-1], **_key_tiles(top_k), WITH_REST=rest is not None, num_warps=4, **flags,
    )
    return mass, rest


def top_key_gradients(qbar: Tensor, key: Tensor, value: Tensor, top: Tensor, lse: Tensor, grad_rest: Tensor,
                      grad_mass: Tensor, scale: float, grad_key: Tensor, grad_value: Tensor,
                      key_padding_mask: Optional[Tensor] = None, keep: Optional[Tensor] = None,
                      dropout_p: float = 0.0) -> Tuple[Tensor, Tensor]:
    """The top-key part of the improved backward (shapes and masks as :func:`top_key_summary`).

    With ``p_t`` the centroid's probabilities on its top keys, ``z_t`` their dropout factors,
    ``g`` = ``grad_rest (rows, C, D)`` fp32 and ``gm`` = ``grad_mass (rows, C)`` fp32, and
    ``w_t = (gm - z_t g . v_t) p_t``: adds ``-p_t z_t g`` into ``grad_value`` and
    ``scale w_t qbar`` into ``grad_key`` (``(rows, S, D)`` fp32 contiguous, in place,
    atomically, so not bit-reproducible) at the top keys.

    Returns:
        ``lse_weight (rows, C)`` fp32, ``sum_t w_t`` (the dense log-sum-exp term's weight), and
        ``grad_centroids (rows, C, D)`` fp32, ``scale sum_t w_t k_t``.
    """
    rows, num_clusters, top_k = top.shape
    if not (grad_key.is_contiguous() and grad_value.is_contiguous()
            and grad_key.dtype == grad_value.dtype == torch.float32):
        raise ValueError("grad_key and grad_value must be contiguous fp32 buffers")
    qbar, key, value, top, lse, grad_rest, grad_mass = (
        x.contiguous() for x in (qbar, key, value, top, lse, grad_rest, grad_mass))
    pad, kept, heads, drop_scale, flags = _key_masks(rows, key_padding_mask, keep, dropout_p, top)
    lse_weight = qbar.new_empty(rows, num_clusters)
    grad_centroids = torch.empty_like(qbar)
    _top_key_grads_kernel[(num_clusters, rows)](
        qbar, key, value, top, lse, grad_rest, grad_mass, grad_key, grad_value, lse_weight, grad_centroids,
        pad, kept, num_clusters, key.shape[1], heads, top_k, scale, drop_scale, DIM=qbar.shape[-1],
        **_key_tiles(top_k), num_warps=4, **flags,
    )
    return lse_weight, grad_centroids


def centroid_gradients(dqb: Tensor, grad_top: Tensor, seg_start: Tensor, lse_weight: Optional[Tensor] = None,
                       k_out: Optional[Tensor] = None, qbar: Optional[Tensor] = None,
                       scale: float = 1.0) -> Tuple[Tensor, Optional[Tensor]]:
    """The centroid side of the improved flash backward, in one launch.

    Args:
        dqb: the centroid gradient of the dense pass over the keys: flash's ``(B, H, C, D)``
            fp16 / bf16, or the Triton centroid backward's ``(B, H, parts, C, D)`` fp32 parts
            (summed here). Any strides with a contiguous feature dim.
        grad_top: ``(B H, C, D)`` fp32, from :func:`top_key_gradients`. seg_start: ``(B H, C + 1)``
            int64, where each cluster's run of members starts (its member count is the difference).
        lse_weight, k_out, qbar: the log-sum-exp term, where the dense pass left it out:
            ``lse_weight (B H, C)`` fp32 from :func:`top_key_gradients`, ``k_out (B, H, C, D)``
            (any strides with a contiguous feature dim) the centroids' attention over the keys as
            values, ``qbar (B H, C, D)`` fp32; or all None.

    Returns:
        ``dq_bar (B H, C, D)`` fp32, ``(dqb + grad_top [- scale c k_out]) / max(members, 1)`` with
        ``c`` = lse_weight (each member's share of its centroid's gradient), and with the
        log-sum-exp term ``x (B, H, C, D)`` in k_out's dtype, ``-scale c qbar`` (the output
        gradient of that term's flash pass over the keys), else None.
    """
    if dqb.dim() == 4:
        dqb = dqb.unsqueeze(2)  # one part
    batch, heads, parts, num_clusters, dim = dqb.shape
    dqb = dqb if dqb.stride(-1) == 1 else dqb.contiguous()
    grad_top, seg_start = grad_top.contiguous(), seg_start.contiguous()
    dq_bar = torch.empty_like(grad_top)
    lse_term = lse_weight is not None
    if lse_term:
        k_out = k_out if k_out.stride(-1) == 1 else k_out.contiguous()
        qbar, lse_weight = qbar.contiguous(), lse_weight.contiguous()
        x = torch.empty(batch, heads, num_clusters, dim, dtype=k_out.dtype, device=dqb.device)
    else:
        k_out = qbar = lse_weight = x = grad_top  # not read
    total, block = batch * heads * num_clusters, 32
    _centroid_grads_kernel[(triton.cdiv(total, block),)](
        dqb, grad_top, lse_weight, k_out, qbar, seg_start, dq_bar, x, heads, num_clusters, total, parts, scale,
        *dqb.stride()[:4], *k_out.stride()[:3], DIM=dim, BLOCK=block, LSE_TERM=lse_term, num_warps=4,
    )
    return dq_bar, (x if lse_term else None)


def sum_gradients(sparse: Tensor, first: Tensor, second: Optional[Tensor] = None, *,
                  reuse_first: bool = False) -> Tensor:
    """``sparse + first (+ second)`` in fp32, rounded once to ``first``'s dtype.

    Args:
        sparse: ``(B H, S, D)`` fp32 contiguous (the top keys' gradients).
        first, second: ``(B, H, S, D)`` fp16 / bf16 (flash attention's key or value
            gradients), any strides.
        reuse_first: write the sum over ``first`` (which the caller no longer needs) where its
            feature dim is contiguous, rather than into a new tensor: one key-sized buffer
            less at the improved backward's memory peak.

    Returns:
        ``(B, H, S, D)`` in ``first``'s dtype: ``first`` itself where it was reused, else a new
        contiguous tensor.
    """
    batch, heads, keys, dim = first.shape
    parts = [x if x.stride(-1) == 1 else x.contiguous() for x in (first, first if second is None else second)]
    if reuse_first and first.stride(-1) == 1:
        out = first
    else:
        out = torch.empty(batch, heads, keys, dim, dtype=first.dtype, device=first.device)
    block = 64
    _sum_gradients_kernel[(triton.cdiv(keys, block), batch * heads)](
        sparse.contiguous(), parts[0], parts[1], out, heads, keys, *parts[0].stride()[:3], *parts[1].stride()[:3],
        *out.stride()[:3], DIM=dim, BLOCK=block, HAS_SECOND=second is not None, num_warps=4,
    )
    return out


def sub_block_keys(top_k: int, dim: int, keys: int) -> int:
    """Keys per sub-block of :func:`centroid_top_keys`: the fewest of 4, 8 and 16 that leave at
    most ``SELECTION["SUB_BLOCKS"]`` sub-blocks (16 beyond), fewer where ``top_k`` sub-blocks
    of ``dim`` features would exceed ``SELECTION["TILE"]`` values (at least 2).

    Fewer keys per sub-block mean fewer candidates to recompute and rank, but more sub-blocks
    to rank: on the H200 (32 rows, C = 100, D = 64, k = 32; benchmarks/NOTES.md, fifteenth
    session) 4 keys were fastest up to 8k keys, 8 at 16k, 8 or 16 at 32k and 16 at 64k."""
    sub = next((size for size in (4, 8, 16) if triton.cdiv(keys, size) <= SELECTION["SUB_BLOCKS"]), 16)
    return max(2, min(sub, SELECTION["TILE"] // (dim * triton.next_power_of_2(top_k))))


def centroid_block_stats(qbar: Tensor, key: Tensor, scale: float, sub: int,
                         key_padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Statistics of the centroid logits ``scale qbar . k`` (as an fp32 matrix product would
    give them), without storing the logits.

    Args:
        qbar: ``(rows, C, D)`` fp32 centroids. key: ``(rows, S, D)`` fp16 / bf16.
        sub: keys per sub-block, a power of two <= 16.
        key_padding_mask: ``(B, S)`` bool (True = padded: the logit -inf) or None.

    Returns:
        ``sub_max (rows, C, ceil(S / sub))``, the largest logit of each ``sub`` keys, and per
        block of ``BLOCK_N`` keys (``LAUNCH["logits"]``) ``block_max`` and ``block_sum``
        ``(rows, C, ceil(S / BLOCK_N))``, its largest logit and the sum of
        ``exp(logit - block_max)``; all fp32.
    """
    rows, num_clusters, dim = qbar.shape
    keys = key.shape[1]
    options = dict(LAUNCH["logits"])
    block_n, block_c = options.pop("BLOCK_N"), min(options.pop("BLOCK_C"), _tile(num_clusters))
    key_blocks = triton.cdiv(keys, block_n)
    sub_max = qbar.new_empty(rows, num_clusters, triton.cdiv(keys, sub))
    block_max = qbar.new_empty(rows, num_clusters, key_blocks)
    block_sum = torch.empty_like(block_max)
    pad, _, heads, _, flags = _key_masks(rows, key_padding_mask, None, 0.0, key)
    _centroid_block_stats_kernel[(key_blocks, rows, triton.cdiv(num_clusters, block_c))](
        qbar, key, pad, sub_max, block_max, block_sum, num_clusters, keys, heads, key_blocks, sub_max.shape[-1],
        scale, DIM=dim, BLOCK_C=block_c, BLOCK_N=block_n, SUB=sub, PADDED=flags["PADDED"], **options,
    )
    return sub_max, block_max, block_sum


def centroid_top_keys(qbar: Tensor, key: Tensor, scale: float, top_k: int,
                      key_padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Each centroid's ``top_k`` keys by logit, and the log-sum-exp of its logits, without
    a ``(C, S)`` matrix of logits, in two launches.

    The ``top_k`` largest logits of a row lie in at most ``top_k`` sub-blocks of keys
    (:func:`sub_block_keys`), those with the largest maxima (a sub-block whose maximum is
    below the ``top_k``-th largest logit holds none of them). A first pass on tensor cores
    gives every sub-block's maximum and the blocks' softmax sums (:func:`centroid_block_stats`);
    a second, one program per centroid, takes the log-sum-exp from those, chooses the
    sub-blocks, recomputes their logits and picks the keys. Beyond
    ``SELECTION["MAX_SUB_BLOCKS"]`` sub-blocks (more than a program's registers hold)
    ``torch.topk`` chooses the sub-blocks.

    Args:
        qbar: ``(rows, C, D)`` fp32. key: ``(rows, S, D)`` fp16 / bf16. top_k: ``<= S``.
        key_padding_mask: ``(B, S)`` bool or None. Padded keys take no part in the log-sum-exp
            and are chosen only where a centroid has fewer than ``top_k`` valid keys (the
            reference's rule; the kernels that read ``top`` skip them).

    Returns:
        ``lse (rows, C)`` fp32 (+inf for a row without a valid key) and ``top (rows, C, top_k)``
        int64 key indices, largest first.
    """
    qbar, key = qbar.contiguous(), key.contiguous()
    sub = sub_block_keys(top_k, qbar.shape[-1], key.shape[1])
    sub_max, block_max, block_sum = centroid_block_stats(qbar, key, scale, sub, key_padding_mask)
    rows, num_clusters, sub_blocks = sub_max.shape
    slots = min(top_k, sub_blocks)
    blocks, blocks_from = sub_max, 0  # every sub-block a candidate
    if top_k < sub_blocks:
        blocks_from = 1 if sub_blocks <= SELECTION["MAX_SUB_BLOCKS"] else 2
        if blocks_from == 2:
            blocks = torch.topk(sub_max, top_k, dim=-1).indices.contiguous()
    block_b = triton.next_power_of_2(sub_blocks) if blocks_from == 1 else 1
    block_s = max(triton.next_power_of_2(slots), MIN_TILE // sub)
    lse = qbar.new_empty(rows, num_clusters)
    top = torch.empty(rows, num_clusters, top_k, dtype=torch.int64, device=key.device)
    bitonic = block_s * sub <= SELECTION["BITONIC_CANDIDATES"] or top_k >= SELECTION["BITONIC_TOP_K"]
    pad, _, heads, _, flags = _key_masks(rows, key_padding_mask, None, 0.0, key)
    _centroid_top_keys_kernel[(num_clusters, rows)](
        qbar, key, pad, sub_max, block_max, block_sum, blocks, lse, top, num_clusters, key.shape[1], heads,
        block_max.shape[-1], sub_blocks, slots, top_k, scale, DIM=qbar.shape[-1], SUB=sub, PADDED=flags["PADDED"],
        BLOCK_S=block_s, BLOCK_B=block_b, STATS_CHUNK=256,
        # a bitonic top-k needs at least as many values as it keeps
        SORT_BLOCKS=bitonic and block_b >= block_s, SORT_KEYS=bitonic,
        TOP_K_POW2=triton.next_power_of_2(top_k),
        # more warps where the sub-blocks are many: 1024 ranked int64 per warp at most
        BLOCKS_FROM=blocks_from, num_warps=max(SELECTION["num_warps"], min(8, block_b // 1024)),
    )
    return lse, top


def _writable_like(out: Tensor, query: Tensor) -> bool:
    """Whether the kernels can write a result like ``query`` (contiguous) into ``out``."""
    return (out.is_contiguous() and out.shape == query.shape and out.dtype == query.dtype
            and out.device == query.device)


def _tile(size: int) -> int:
    return max(MIN_TILE, triton.next_power_of_2(size))


def _key_tile(top_k: int) -> int:
    """Top-key slots per tile: all of them up to ``ONE_TILE_TOP_K``, else ``KEY_TILE``."""
    return _tile(top_k) if top_k <= ONE_TILE_TOP_K else KEY_TILE


def _key_tiles(top_k: int) -> dict:
    """The per-centroid kernels' ``BLOCK_K`` and ``TILES``: tiles of :func:`_key_tile` slots over ``top_k``."""
    block_k = _key_tile(top_k)
    return dict(BLOCK_K=block_k, TILES=triton.cdiv(top_k, block_k))


def _grid_and_tiles(query: Tensor, num_clusters: int, top_k: int, block_m: int):
    rows, length = query.shape[0] * query.shape[1], query.shape[2]
    grid = (triton.cdiv(length, block_m) + num_clusters + 1, rows)  # see _work_item
    block_k = _key_tile(top_k)
    tiles = dict(DIM=query.shape[-1], BLOCK_K=block_k, BLOCK_C=_tile(num_clusters), ONE_TILE=top_k <= block_k)
    return grid, tiles


def exact_top_keys_fwd(query: Tensor, key: Tensor, value: Tensor, order: Tensor, seg_start: Tensor, top: Tensor,
                       mass: Tensor, rest: Tensor, scale: float, grad_out: Optional[Tensor] = None,
                       key_padding_mask: Optional[Tensor] = None, keep: Optional[Tensor] = None,
                       dropout_p: float = 0.0, out: Optional[Tensor] = None) -> Tensor:
    """The improved variant's output with the exact top-key part, or ``grad_out . exact``.

    Args:
        query: ``(B, H, N, D)``; key, value: ``(B, H, S, D)``; fp16 / bf16.
        order: ``(B H, N)`` int64, positions sorted by cluster; seg_start: ``(B H, C + 1)``
            int64, where each cluster's run starts in ``order``.
        top: ``(B H, C, top_k)`` int64 key indices of each cluster.
        mass: ``(B H, C)`` fp32 centroid attention mass on the top keys;
        rest: ``(B H, C, D)`` fp32 centroid output over the other keys.
        grad_out: ``(B, H, N, D)`` or None.
        key_padding_mask: ``(B, S)`` bool or None: padded top keys take no part in the softmax.
        keep: ``(B, H, C, S)`` bool dropout keep mask or None: the exact part is
            ``sum_t p_t z_t v_t`` with ``z_t`` the mask at the top keys over ``1 - dropout_p``.
        out: a contiguous ``(B, H, N, D)`` tensor of the query dtype to write the output into, or
            None for a new one (``grad_out`` None only).

    Returns:
        ``out (B, H, N, D)`` in the query dtype (``grad_out`` None), else ``(B H, N)`` fp32
        ``grad_out_i . exact_i``.
    """
    length = query.shape[2]
    rows, num_clusters, top_k = top.shape
    query, key, value, order, seg_start, top = (x.contiguous() for x in (query, key, value, order, seg_start, top))
    pad, kept, heads, drop_scale, flags = _key_masks(rows, key_padding_mask, keep, dropout_p, top)
    grad_mode = grad_out is not None
    if out is not None and (grad_mode or not _writable_like(out, query)):
        raise ValueError("out must be a contiguous tensor of the query's shape and dtype, and grad_out None")
    if not grad_mode and out is None:
        out = torch.empty_like(query)
    grad_dot = query.new_empty(rows, length, dtype=torch.float32) if grad_mode else None
    options = dict(LAUNCH["fwd"])
    grid, tiles = _grid_and_tiles(query, num_clusters, top_k, options["BLOCK_M"])
    _exact_fwd_kernel[grid](
        query, key, value, grad_out.contiguous() if grad_mode else query, order, seg_start, top,
        mass.contiguous(), rest.contiguous(), query if out is None else out, grad_dot if grad_mode else mass,
        pad, kept, length, key.shape[2], num_clusters, heads, top_k, scale * LOG2E, drop_scale, GRAD_MODE=grad_mode,
        **tiles, **options, **flags,
    )
    return grad_dot if grad_mode else out


def exact_top_keys_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, order: Tensor,
                       seg_start: Tensor, top: Tensor, mass: Tensor, grad_centroids: Tensor, scale: float,
                       grad_key: Tensor, grad_value: Tensor, key_padding_mask: Optional[Tensor] = None,
                       keep: Optional[Tensor] = None, dropout_p: float = 0.0,
                       grad_query: Optional[Tensor] = None, grad_dot: Optional[Tensor] = None) -> Tensor:
    """Backward of the exact top-key part (shapes and masks as :func:`exact_top_keys_fwd`).

    ``grad_centroids (B H, C, D)`` fp32 is added to each member's query gradient; the top
    keys' gradients are added into ``grad_key``, ``grad_value`` ``(B H, S, D)`` fp32 in place.
    ``grad_query``: a contiguous tensor like the queries to write the query gradient into, or
    None for a new one. ``grad_dot``: ``(B H, N)`` fp32 ``grad_out_i . exact_i`` as
    :func:`exact_top_keys_fwd` gives it, needed where ``top_k > ONE_TILE_TOP_K`` (each query's softmax
    then spans tiles, and it gives the softmax's backward its ``sum_t p_t dp_t``), else unused.

    Returns:
        the query gradient ``(B, H, N, D)`` in the query dtype.
    """
    rows, num_clusters, top_k = top.shape
    tensors = (grad_out, query, key, value, order, seg_start, top, mass, grad_centroids)
    grad_out, query, key, value, order, seg_start, top, mass, grad_centroids = (x.contiguous() for x in tensors)
    if not (grad_key.is_contiguous() and grad_value.is_contiguous()
            and grad_key.dtype == grad_value.dtype == torch.float32):
        raise ValueError("grad_key and grad_value must be contiguous fp32 buffers")
    pad, kept, heads, drop_scale, flags = _key_masks(rows, key_padding_mask, keep, dropout_p, top)
    if grad_query is None:
        grad_query = torch.empty_like(query)
    elif not _writable_like(grad_query, query):
        raise ValueError("grad_query must be a contiguous tensor of the query's shape and dtype")
    options = dict(LAUNCH["bwd"])
    grid, tiles = _grid_and_tiles(query, num_clusters, top_k, options["BLOCK_M"])
    if not tiles["ONE_TILE"] and grad_dot is None:
        raise ValueError(f"grad_dot is needed for top_k {top_k} > ONE_TILE_TOP_K {ONE_TILE_TOP_K} "
                         "(exact_top_keys_fwd with grad_out gives it)")
    grad_dot = mass if grad_dot is None else grad_dot.contiguous()  # not read in one tile
    _exact_bwd_kernel[grid](
        grad_out, query, key, value, order, seg_start, top, mass, grad_centroids, grad_dot, grad_query, grad_key,
        grad_value,
        pad, kept, query.shape[2], key.shape[2], num_clusters, heads, top_k, scale * LOG2E, scale, drop_scale,
        **tiles, **options, **flags,
    )
    return grad_query
