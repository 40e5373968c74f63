"""The improved variant's fp16 / bf16 path on tensor cores (Triton): top keys, exact
top-key products, gradient sums.

Improved clustered attention gives query ``i`` of cluster ``j``

    out_i = mass_j * exact_i + rest_j,    exact_i = softmax_t(scale q_i . k_t) v_t  over t in T_j,

where ``T_j`` are the cluster's ``top_k`` keys. All members of a cluster share ``T_j``,
so with the queries sorted by cluster (``order``, ``seg_start``) the exact part is a
small dense attention per cluster: a block of up to ``BLOCK_M`` consecutive members
against the cluster's ``top_k`` key and value rows, two tile products on tensor cores.
The CUDA kernels of ``cuda/attention.cu`` compute it one query per warp with fp32
multiply-adds and a shared-memory cache of the cluster's rows; they stay the path for
key padding, dropout, fp32 and top-k > 128.

The forward's top-k selection needs the centroids' fp32 logits over all keys and their
log-sum-exp. :func:`centroid_top_keys` gets them without the ``(C, S)`` fp32 matrix: one
pass on tensor cores (the fp32 centroids split into three half-precision parts, so
products stay exact) gives each key block's largest logit and the log-sum-exp; the top
keys lie in the ``top_k`` blocks with the largest maxima, whose logits are recomputed and
searched. It replaces an fp32 copy of the keys, an fp32 matrix product, three passes of
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

from ._triton import MIN_TILE, tiles_unavailable, tl, triton

__all__ = ["triton_exact_unavailable", "centroid_block_stats", "candidate_logits", "centroid_top_keys",
           "exact_top_keys_fwd", "exact_top_keys_bwd", "top_key_summary", "top_key_gradients", "sum_gradients"]

MAX_TOP_K = 128  # BLOCK_M x top-k fp32 logits must stay in registers
LOG2E = 1.4426950408889634
# Members per program and warps (fwd / bwd), keys and centroids per program of the block
# statistics (logits); chosen by sweeps of the improved step on an H100 at N = 32k, D = 64,
# k = 32 (benchmarks/NOTES.md; the logits sweep was within run-to-run noise of 1-2 ms).
LAUNCH = {"fwd": {"BLOCK_M": 64, "num_warps": 4}, "bwd": {"BLOCK_M": 64, "num_warps": 4},
          "logits": {"BLOCK_N": 64, "BLOCK_C": 128, "num_warps": 4}}


def triton_exact_unavailable(query: Tensor, value: Tensor, top_k: int) -> Optional[str]:
    """Why the Triton exact products cannot serve these inputs (None if they can); the
    caller has already excluded key padding and dropout (the flash path)."""
    why = tiles_unavailable(query, value, "the Triton exact products")
    if why is None and top_k > MAX_TOP_K:
        why = f"top-k {top_k} > {MAX_TOP_K}"
    return why


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
    def _top_softmax(q, k_top, top_ok, qk_scale):
        """Softmax over the top keys of ``q (M, D) @ k_top (K, D)^T`` -> fp32 ``(M, K)``."""
        logits = tl.dot(q, tl.trans(k_top)) * qk_scale  # log2 domain
        logits = tl.where(top_ok[None, :], logits, float("-inf"))
        probs = tl.exp2(logits - tl.max(logits, 1)[:, None])
        return probs / tl.sum(probs, 1)[:, None]

    @triton.jit
    def _member_rows(ORDER, row, length, start, end, DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """-> (member mask, query indices, offsets of their (BLOCK_M, DIM) rows) of the sorted
        positions ``start .. start + BLOCK_M`` before ``end`` (no member when ``start >= end``)."""
        positions = start + tl.arange(0, BLOCK_M)
        member = positions < end
        queries = tl.load(ORDER + row * length + positions, mask=member, other=0)
        return member, queries, (row * length + queries)[:, None] * DIM + tl.arange(0, DIM)[None, :]

    @triton.jit
    def _cluster_top_rows(TOP, K, V, row, cluster, num_clusters, keys, top_k, DIM: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        """-> (slot mask, row offsets, key rows, value rows) ``(BLOCK_K, DIM)`` of the cluster's top keys."""
        slots = tl.arange(0, BLOCK_K)
        top_ok = slots < top_k
        top_keys = tl.load(TOP + (row * num_clusters + cluster) * top_k + slots, mask=top_ok, other=0)
        top_rows = (row * keys + top_keys)[:, None] * DIM + tl.arange(0, DIM)[None, :]
        k_top = tl.load(K + top_rows, mask=top_ok[:, None], other=0.0)
        v_top = tl.load(V + top_rows, mask=top_ok[:, None], other=0.0)
        return top_ok, top_rows, k_top, v_top

    @triton.jit
    def _exact_fwd_kernel(Q, K, V, GRAD_OUT, ORDER, SEG_START, TOP, MASS, REST, OUT, GRAD_DOT,
                          length, keys, num_clusters, top_k, qk_scale,
                          DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_C: tl.constexpr, GRAD_MODE: tl.constexpr):
        """Q, GRAD_OUT, OUT: (rows, N, DIM); K, V: (rows, S, DIM); ORDER: (rows, N) int64;
        SEG_START: (rows, C + 1) int64; TOP: (rows, C, top_k) int64; MASS: (rows, C) fp32;
        REST: (rows, C, DIM) fp32; GRAD_DOT: (rows, N) fp32. All contiguous."""
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
            top_ok, top_rows, k_top, v_top = _cluster_top_rows(TOP, K, V, row, cluster, num_clusters, keys, top_k,
                                                               DIM, BLOCK_K)
            probs = _top_softmax(q, k_top, top_ok, qk_scale)
            exact = tl.dot(probs.to(v_top.dtype), v_top)  # (BLOCK_M, DIM) fp32
            if GRAD_MODE:
                grad_out = tl.load(GRAD_OUT + query_rows, mask=member[:, None], other=0.0)
                tl.store(GRAD_DOT + row * length + queries, tl.sum(grad_out.to(tl.float32) * exact, 1), mask=member)
            else:
                mass = tl.load(MASS + row * num_clusters + cluster)
                rest = tl.load(REST + (row * num_clusters + cluster) * DIM + tl.arange(0, DIM))
                out = mass * exact + rest[None, :]
                tl.store(OUT + query_rows, out.to(OUT.dtype.element_ty), mask=member[:, None])

    @triton.jit
    def _exact_bwd_kernel(GRAD_OUT, Q, K, V, ORDER, SEG_START, TOP, MASS, GRAD_CENTROIDS, GRAD_Q, GRAD_K, GRAD_V,
                          length, keys, num_clusters, top_k, qk_scale, scale,
                          DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        """GRAD_CENTROIDS: (rows, C, DIM) fp32, added to every member's query gradient;
        GRAD_Q: (rows, N, DIM) in the input dtype; GRAD_K, GRAD_V: (rows, S, DIM) fp32,
        added to."""
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
            top_ok, top_rows, k_top, v_top = _cluster_top_rows(TOP, K, V, row, cluster, num_clusters, keys, top_k,
                                                               DIM, BLOCK_K)
            probs = _top_softmax(q, k_top, top_ok, qk_scale)
            grad_probs = tl.dot(grad_exact, tl.trans(v_top))
            grad_logits = probs * (grad_probs - tl.sum(probs * grad_probs, 1)[:, None])
            grad_logits = tl.where(member[:, None], grad_logits, 0.0).to(q.dtype)
            grad_centroid = tl.load(GRAD_CENTROIDS + (row * num_clusters + cluster) * DIM + tl.arange(0, DIM))
            grad_q = tl.dot(grad_logits, k_top) * scale + grad_centroid[None, :]
            tl.store(GRAD_Q + query_rows, grad_q.to(GRAD_Q.dtype.element_ty), mask=member[:, None])
            # Rows of non-members are zero in grad_logits and grad_exact: they add nothing.
            grad_k = tl.dot(tl.trans(grad_logits), q) * scale
            grad_v = tl.dot(tl.trans(probs.to(q.dtype)), grad_exact)
            tl.atomic_add(GRAD_K + top_rows, grad_k, mask=top_ok[:, None])
            tl.atomic_add(GRAD_V + top_rows, grad_v, mask=top_ok[:, None])


    @triton.jit
    def _centroid_block_stats_kernel(QBAR, K, BLOCK_MAX, BLOCK_SUM, num_clusters, keys, key_blocks, scale,
                                     DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (key block, row, centroid block): the softmax statistics of the block's
        logits ``scale qbar . k``, ``BLOCK_MAX``, ``BLOCK_SUM`` ``(rows, C, key_blocks)``
        (max, sum of exp(logit - max)); the logits themselves are not stored.

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
        hi = qbar.to(k.dtype)
        remainder = qbar - hi.to(tl.float32)
        mid = remainder.to(k.dtype)
        lo = (remainder - mid.to(tl.float32)).to(k.dtype)
        logits = (tl.dot(hi, k_t) + tl.dot(mid, k_t) + tl.dot(lo, k_t)) * scale
        logits = tl.where(k_ok[None, :], logits, float("-inf"))
        block_max = tl.max(logits, 1)
        block_sum = tl.sum(tl.exp(logits - block_max[:, None]), 1)
        stats = (row * num_clusters + centroids) * key_blocks + block
        tl.store(BLOCK_MAX + stats, block_max, mask=c_ok)
        tl.store(BLOCK_SUM + stats, block_sum, mask=c_ok)

    @triton.jit
    def _candidate_logits_kernel(QBAR, K, BLOCKS, CANDIDATES, num_clusters, keys, num_blocks, scale,
                                 DIM: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (centroid, row): the logits of the centroid's chosen key blocks,
        ``BLOCKS (rows, C, num_blocks)`` -> ``CANDIDATES (rows, C, num_blocks BLOCK_N)``
        fp32 (-inf past the last key), by fp32 multiply-adds."""
        centroid = tl.program_id(0).to(tl.int64) + tl.program_id(1).to(tl.int64) * num_clusters  # row * C + c
        row = tl.program_id(1).to(tl.int64)
        feats = tl.arange(0, DIM)
        qbar = tl.load(QBAR + centroid * DIM + feats)
        for slot in range(num_blocks):
            block = tl.load(BLOCKS + centroid * num_blocks + slot)
            key_index = block * BLOCK_N + tl.arange(0, BLOCK_N)
            k_ok = key_index < keys
            k = tl.load(K + (row * keys + key_index)[:, None] * DIM + feats[None, :], mask=k_ok[:, None], other=0.0)
            logits = tl.sum(k.to(tl.float32) * qbar[None, :], 1) * scale
            tl.store(CANDIDATES + (centroid * num_blocks + slot) * BLOCK_N + tl.arange(0, BLOCK_N),
                     tl.where(k_ok, logits, float("-inf")))


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
    def _top_key_probs(QBAR, K, V, TOP, LSE, row, cluster, num_clusters, keys, top_k, scale,
                       DIM: tl.constexpr, BLOCK_K: tl.constexpr):
        """-> (slot mask, row offsets, key rows, value rows (BLOCK_K, DIM), centroid (DIM,) fp32,
        top-key probabilities (BLOCK_K,) fp32, 0 in unused slots) of one centroid: its attention
        probabilities ``exp(scale qbar . k_t - lse)`` on its top keys, in fp32 multiply-adds as
        the fp32 products of the centroids and the upcast keys."""
        top_ok, top_rows, k_top, v_top = _cluster_top_rows(TOP, K, V, row, cluster, num_clusters, keys, top_k,
                                                           DIM, BLOCK_K)
        centroid = (row * num_clusters + cluster).to(tl.int64)
        qbar = tl.load(QBAR + centroid * DIM + tl.arange(0, DIM))
        logits = tl.sum(k_top.to(tl.float32) * qbar[None, :], 1) * scale
        probs = tl.where(top_ok, tl.exp(logits - tl.load(LSE + centroid)), 0.0)
        return top_ok, top_rows, k_top, v_top, qbar, probs

    @triton.jit
    def _top_key_summary_kernel(QBAR, K, V, TOP, LSE, CENTROID_VALUES, MASS, REST, num_clusters, keys, top_k,
                                scale, DIM: tl.constexpr, BLOCK_K: tl.constexpr, WITH_REST: tl.constexpr):
        """Program (cluster, row): the centroid's attention mass on its top keys, and (WITH_REST)
        its output over the other keys, ``CENTROID_VALUES - sum_t p_t v_t``."""
        cluster, row = tl.program_id(0), tl.program_id(1)
        _, _, _, v_top, _, probs = _top_key_probs(QBAR, K, V, TOP, LSE, row, cluster, num_clusters, keys, top_k,
                                                  scale, DIM, BLOCK_K)
        centroid = (row * num_clusters + cluster).to(tl.int64)
        tl.store(MASS + centroid, tl.sum(probs, 0))
        if WITH_REST:
            feats = tl.arange(0, DIM)
            top_part = tl.sum(probs[:, None] * v_top.to(tl.float32), 0)
            tl.store(REST + centroid * DIM + feats, tl.load(CENTROID_VALUES + centroid * DIM + feats) - top_part)

    @triton.jit
    def _top_key_grads_kernel(QBAR, K, V, TOP, LSE, GRAD_REST, GRAD_MASS, GRAD_K, GRAD_V, LSE_WEIGHT,
                              GRAD_CENTROIDS, num_clusters, keys, top_k, scale, DIM: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        """Program (cluster, row): the top-key part of the improved backward for one centroid,
        with ``g`` its rest's gradient and ``gm`` its mass's: ``a_t = gm - g . v_t``,
        ``w_t = a_t p_t``; adds ``-p_t g`` to GRAD_V and ``scale w_t qbar`` to GRAD_K at its top
        keys (atomically: clusters share keys), and writes ``sum_t w_t`` (LSE_WEIGHT, the
        weight of the log-sum-exp's dense term) and ``scale sum_t w_t k_t`` (GRAD_CENTROIDS)."""
        cluster, row = tl.program_id(0), tl.program_id(1)
        top_ok, top_rows, k_top, v_top, qbar, probs = _top_key_probs(
            QBAR, K, V, TOP, LSE, row, cluster, num_clusters, keys, top_k, scale, DIM, BLOCK_K)
        centroid = (row * num_clusters + cluster).to(tl.int64)
        feats = tl.arange(0, DIM)
        grad_rest = tl.load(GRAD_REST + centroid * DIM + feats)
        weights = tl.where(top_ok, (tl.load(GRAD_MASS + centroid)
                                    - tl.sum(v_top.to(tl.float32) * grad_rest[None, :], 1)) * probs, 0.0)
        tl.store(LSE_WEIGHT + centroid, tl.sum(weights, 0))
        tl.store(GRAD_CENTROIDS + centroid * DIM + feats, scale * tl.sum(weights[:, None] * k_top.to(tl.float32), 0))
        tl.atomic_add(GRAD_V + top_rows, -probs[:, None] * grad_rest[None, :], mask=top_ok[:, None])
        tl.atomic_add(GRAD_K + top_rows, scale * weights[:, None] * qbar[None, :], mask=top_ok[:, None])


def top_key_summary(qbar: Tensor, key: Tensor, value: Tensor, top: Tensor, lse: Tensor, scale: float,
                    centroid_values: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Each centroid's attention mass on its top keys and, given its output over all keys, its
    output over the other keys, without gathering the top key and value rows into
    ``(rows, C, top_k, D)`` fp32 copies.

    Args:
        qbar: ``(rows, C, D)`` fp32 centroids. key, value: ``(rows, S, D)`` fp16 / bf16.
        top: ``(rows, C, top_k)`` int64 key indices. lse: ``(rows, C)`` fp32 log-sum-exp of the
            centroid logits over all keys. centroid_values: ``(rows, C, D)`` fp32 or None.

    Returns:
        ``mass (rows, C)`` fp32 (``sum_t exp(scale qbar . k_t - lse)`` over the top keys) and
        ``rest (rows, C, D)`` fp32 (``centroid_values - sum_t p_t v_t``), None without
        ``centroid_values``.
    """
    rows, num_clusters, top_k = top.shape
    qbar, key, value, top, lse = (x.contiguous() for x in (qbar, key, value, top, lse))
    mass = qbar.new_empty(rows, num_clusters)
    rest = None if centroid_values is None else torch.empty_like(qbar)
    _top_key_summary_kernel[(num_clusters, rows)](
        qbar, key, value, top, lse, qbar if rest is None else centroid_values.contiguous(), mass,
        qbar if rest is None else rest, num_clusters, key.shape[1], top_k, scale,
        DIM=qbar.shape[-1], BLOCK_K=_tile(top_k), WITH_REST=rest is not None, num_warps=4,
    )
    return mass, rest


def top_key_gradients(qbar: Tensor, key: Tensor, value: Tensor, top: Tensor, lse: Tensor, grad_rest: Tensor,
                      grad_mass: Tensor, scale: float, grad_key: Tensor,
                      grad_value: Tensor) -> Tuple[Tensor, Tensor]:
    """The top-key part of the improved backward (shapes as :func:`top_key_summary`).

    With ``p_t`` the centroid's probabilities on its top keys, ``g`` = ``grad_rest (rows, C, D)``
    fp32 and ``gm`` = ``grad_mass (rows, C)`` fp32, and ``w_t = (gm - g . v_t) p_t``: adds
    ``-p_t g`` into ``grad_value`` and ``scale w_t qbar`` into ``grad_key`` (``(rows, S, D)``
    fp32 contiguous, in place, atomically, so not bit-reproducible) at the top keys.

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
    lse_weight = qbar.new_empty(rows, num_clusters)
    grad_centroids = torch.empty_like(qbar)
    _top_key_grads_kernel[(num_clusters, rows)](
        qbar, key, value, top, lse, grad_rest, grad_mass, grad_key, grad_value, lse_weight, grad_centroids,
        num_clusters, key.shape[1], top_k, scale, DIM=qbar.shape[-1], BLOCK_K=_tile(top_k), num_warps=4,
    )
    return lse_weight, grad_centroids


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


def centroid_block_stats(qbar: Tensor, key: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Per key block, the largest centroid logit; and the log-sum-exp over all keys, as an
    fp32 matrix product would give them.

    Args:
        qbar: ``(rows, C, D)`` fp32 centroids. key: ``(rows, S, D)`` fp16 / bf16.

    Returns:
        ``block_max (rows, C, blocks)`` (blocks of ``LAUNCH["logits"]["BLOCK_N"]`` keys) and
        ``lse (rows, C)``, fp32.
    """
    rows, num_clusters, dim = qbar.shape
    keys = key.shape[1]
    options = dict(LAUNCH["logits"])
    block_n, block_c = options.pop("BLOCK_N"), min(options.pop("BLOCK_C"), _tile(num_clusters))
    key_blocks = triton.cdiv(keys, block_n)
    block_max = qbar.new_empty(rows, num_clusters, key_blocks)
    block_sum = torch.empty_like(block_max)
    _centroid_block_stats_kernel[(key_blocks, rows, triton.cdiv(num_clusters, block_c))](
        qbar, key, block_max, block_sum, num_clusters, keys, key_blocks, scale,
        DIM=dim, BLOCK_C=block_c, BLOCK_N=block_n, **options,
    )
    top = block_max.amax(-1, keepdim=True)
    lse = (block_sum * torch.exp(block_max - top)).sum(-1).log_() + top.squeeze(-1)
    return block_max, lse


def candidate_logits(qbar: Tensor, key: Tensor, blocks: Tensor, scale: float) -> Tensor:
    """The centroid logits over chosen key blocks: ``blocks (rows, C, n)`` int64 block
    indices -> ``(rows, C, n, BLOCK_N)`` fp32, -inf past the last key."""
    rows, num_clusters, dim = qbar.shape
    block_n = LAUNCH["logits"]["BLOCK_N"]
    blocks = blocks.contiguous()
    candidates = qbar.new_empty(*blocks.shape, block_n)
    _candidate_logits_kernel[(num_clusters, rows)](
        qbar, key, blocks, candidates, num_clusters, key.shape[1], blocks.shape[-1], scale,
        DIM=dim, BLOCK_N=block_n, num_warps=4,
    )
    return candidates


def centroid_top_keys(qbar: Tensor, key: Tensor, scale: float, top_k: int) -> Tuple[Tensor, Tensor]:
    """Each centroid's ``top_k`` keys by logit, and the log-sum-exp of its logits, without
    a ``(C, S)`` matrix of logits.

    The ``top_k`` largest logits of a row lie in at most ``top_k`` key blocks, those with
    the largest block maxima (a block whose maximum is below the ``top_k``-th largest
    logit holds none of them). A first pass finds every block's maximum and the
    log-sum-exp; the logits of the chosen blocks are then recomputed, ``top_k x BLOCK_N``
    candidates per centroid, and the selection runs over them.

    Args:
        qbar: ``(rows, C, D)`` fp32. key: ``(rows, S, D)`` fp16 / bf16. top_k: ``<= S``.

    Returns:
        ``lse (rows, C)`` fp32 and ``top (rows, C, top_k)`` int64 key indices, largest first.
    """
    qbar, key = qbar.contiguous(), key.contiguous()
    block_max, lse = centroid_block_stats(qbar, key, scale)
    rows, num_clusters, key_blocks = block_max.shape
    if top_k >= key_blocks:  # every block is a candidate
        blocks = torch.arange(key_blocks, device=key.device).expand(rows, num_clusters, -1)
    else:
        blocks = torch.topk(block_max, top_k, dim=-1).indices  # (rows, C, top_k)
    candidates = candidate_logits(qbar, key, blocks, scale)
    block_n = candidates.shape[-1]
    best = torch.topk(candidates.reshape(rows, num_clusters, -1), top_k, dim=-1).indices
    return lse, blocks.gather(-1, best // block_n) * block_n + best % block_n


def _tile(size: int) -> int:
    return max(MIN_TILE, triton.next_power_of_2(size))


def _grid_and_tiles(query: Tensor, num_clusters: int, top_k: int, block_m: int):
    rows, length = query.shape[0] * query.shape[1], query.shape[2]
    grid = (triton.cdiv(length, block_m) + num_clusters + 1, rows)  # see _work_item
    tiles = dict(DIM=query.shape[-1], BLOCK_K=_tile(top_k), BLOCK_C=_tile(num_clusters))
    return grid, tiles


def exact_top_keys_fwd(query: Tensor, key: Tensor, value: Tensor, order: Tensor, seg_start: Tensor, top: Tensor,
                       mass: Tensor, rest: Tensor, scale: float, grad_out: Optional[Tensor] = None) -> Tensor:
    """The improved variant's output with the exact top-key part, or ``grad_out . exact``.

    Args:
        query: ``(B, H, N, D)``; key, value: ``(B, H, S, D)``; fp16 / bf16.
        order: ``(B H, N)`` int64, positions sorted by cluster; seg_start: ``(B H, C + 1)``
            int64, where each cluster's run starts in ``order``.
        top: ``(B H, C, top_k)`` int64 key indices of each cluster.
        mass: ``(B H, C)`` fp32 centroid attention mass on the top keys;
        rest: ``(B H, C, D)`` fp32 centroid output over the other keys.
        grad_out: ``(B, H, N, D)`` or None.

    Returns:
        ``out (B, H, N, D)`` in the query dtype (``grad_out`` None), else ``(B H, N)`` fp32
        ``grad_out_i . exact_i``.
    """
    batch, heads, length, dim = query.shape
    rows, num_clusters, top_k = top.shape
    query, key, value, order, seg_start, top = (x.contiguous() for x in (query, key, value, order, seg_start, top))
    grad_mode = grad_out is not None
    out = None if grad_mode else torch.empty_like(query)
    grad_dot = query.new_empty(rows, length, dtype=torch.float32) if grad_mode else None
    options = dict(LAUNCH["fwd"])
    grid, tiles = _grid_and_tiles(query, num_clusters, top_k, options["BLOCK_M"])
    _exact_fwd_kernel[grid](
        query, key, value, grad_out.contiguous() if grad_mode else query, order, seg_start, top,
        mass.contiguous(), rest.contiguous(), query if out is None else out, grad_dot if grad_mode else mass,
        length, key.shape[2], num_clusters, top_k, scale * LOG2E, GRAD_MODE=grad_mode, **tiles, **options,
    )
    return grad_dot if grad_mode else out


def exact_top_keys_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, order: Tensor,
                       seg_start: Tensor, top: Tensor, mass: Tensor, grad_centroids: Tensor, scale: float,
                       grad_key: Tensor, grad_value: Tensor) -> Tensor:
    """Backward of the exact top-key part (shapes as :func:`exact_top_keys_fwd`).

    ``grad_centroids (B H, C, D)`` fp32 is added to each member's query gradient; the top
    keys' gradients are added into ``grad_key``, ``grad_value`` ``(B H, S, D)`` fp32 in place.

    Returns:
        the query gradient ``(B, H, N, D)`` in the query dtype.
    """
    rows, num_clusters, top_k = top.shape
    tensors = (grad_out, query, key, value, order, seg_start, top, mass, grad_centroids)
    grad_out, query, key, value, order, seg_start, top, mass, grad_centroids = (x.contiguous() for x in tensors)
    if not (grad_key.is_contiguous() and grad_value.is_contiguous()
            and grad_key.dtype == grad_value.dtype == torch.float32):
        raise ValueError("grad_key and grad_value must be contiguous fp32 buffers")
    grad_query = torch.empty_like(query)
    options = dict(LAUNCH["bwd"])
    grid, tiles = _grid_and_tiles(query, num_clusters, top_k, options["BLOCK_M"])
    _exact_bwd_kernel[grid](
        grad_out, query, key, value, order, seg_start, top, mass, grad_centroids, grad_query, grad_key, grad_value,
        query.shape[2], key.shape[2], num_clusters, top_k, scale * LOG2E, scale, **tiles, **options,
    )
    return grad_query
