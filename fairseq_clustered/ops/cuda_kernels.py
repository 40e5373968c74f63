"""CUDA implementations of the ``fairseq_clustered::*`` custom ops.

:func:`register` is called by :mod:`.cuda_backend` once ``fairseq_clustered._C``
has loaded. Each op's CUDA implementation composes the compiled kernels (hashing,
Lloyd's k-means, per-cluster sums, broadcasts, the per-query exact top-key products
of the improved variant) with torch ops where those are the fast choice: the
centroid attention of C centroids against all S keys is small dense work done by
PyTorch's flash-attention kernel (bf16/fp16, no key padding, no dropout), by the
Triton kernels of :mod:`.centroid_triton` (key padding or dropout; and fp32, each
product as six bf16 products of three-part splits), or, where neither applies (C > 128,
head dims that are not powers of two in 16..128), by fp32 cuBLAS products
in chunks of (batch x head) rows that bound the scratch memory. The improved variant in
fp16 / bf16 takes flash's algebra (the remainder from the centroids' full output) with the
Triton kernels of :mod:`.improved_triton` for its top keys, with or without key padding and
dropout (the centroid attention then from :mod:`.centroid_triton`), for any top-k (the top
keys from fp32 logits in row chunks where its selection kernel does not take top-k); fp32 and
the shapes those kernels refuse keep the fp32 products and the extension's per-query kernels.

Nothing here synchronises with the host, so a forward + backward can be captured
in a CUDA graph. Configurations without a kernel (fp64, head dims other than 32,
64 and 128 for the improved variant, more than 6144 clusters) run the reference on
the GPU, with one warning per reason.

Layout conventions: ``rows = B * H``; ``order (rows, N)`` is a stable sort of the
assignments (padded queries first) and ``seg_start (rows, C + 1)`` the first sorted
position of each cluster, so cluster ``c``'s members are
``order[r, seg_start[r, c]:seg_start[r, c + 1]]``.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import causal, causal_fused, causal_triton, centroid_triton, custom_ops, hash_triton, improved_triton, reference
from .graph_cache import GraphCache
from .flash import flash_backward, flash_forward, merge_key_splits

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
IMPROVED_HEAD_DIMS = (32, 64, 128)
MAX_CLUSTER_WIDTH = 128  # segment sums: one thread per feature
MAX_KERNEL_CLUSTERS = 6144  # Lloyd keeps the centroids in shared memory
MAX_HASH_DIM = 800
MAX_KINDS_REMEMBERED = 4096  # CudaOps._per_kind
MAX_ROWS = 65535  # batch * heads: the kernels put the rows on the grid's y dimension
# Scratch budget of one chunk of the dense (rows, C, S) fp32 matrices.
DENSE_CHUNK_BYTES = 128 * 2**20

_warned = set()


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) that the reference serves this call."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(
            f"fairseq_clustered: {op} runs the reference implementation on the GPU ({reason}); "
            "results are the same, only slower",
            stacklevel=3,
        )


def _segments(assignments: Tensor, num_clusters: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``order (rows, N)``, ``seg_start (rows, C+1)`` and ``counts (rows, C)`` fp32."""
    batch, heads, length = assignments.shape
    # int32 keys: half the radix-sort passes of int64 (cluster ids are < 2**31).
    flat = assignments.reshape(batch * heads, length).to(torch.int32)
    sorted_ids, order = torch.sort(flat, dim=1, stable=True)
    bounds = torch.arange(num_clusters + 1, device=flat.device, dtype=torch.int32).expand(batch * heads, -1)
    bounds = bounds.contiguous()
    seg_start = torch.searchsorted(sorted_ids.contiguous(), bounds)
    return order.contiguous(), seg_start.contiguous(), _member_counts(seg_start)


# The extension's sort by cluster (one launch per call) takes up to this many clusters (its per-warp
# counters of every cluster sit in shared memory) and queries per row: on the H200 it took 0.28-0.52
# of torch's time up to 16k, 0.66-0.75 at 32k, 0.84-1.05 at 64k (24 / 32 rows, C = 100;
# benchmarks/cluster_order_sweep.py, benchmarks/NOTES.md, nineteenth session).
CLUSTER_ORDER_MAX_CLUSTERS = 256
CLUSTER_ORDER_MAX_LENGTH = 32768


def _member_counts(seg_start: Tensor) -> Tensor:
    """Each cluster's member count ``(rows, C)`` fp32 from ``seg_start (rows, C+1)``."""
    return (seg_start[:, 1:] - seg_start[:, :-1]).to(torch.float32)


TENSOR_CORE_LLOYD_MIN_LENGTH = 2048
TENSOR_CORE_LLOYD_MAX_CLUSTERS = 128  # the kernels' centroid tiles: at most 16 of 8 centroids
TENSOR_CORE_LLOYD_MAX_PER_BLOCK = 4096
TENSOR_CORE_LLOYD_MIN_PER_BLOCK = 512  # a block's set-up (counters, fragments) needs work to pay for


def lloyd_tensor_core_split(rows: int, length: int, sms: int) -> int:
    """Queries per block for Lloyd's tensor-core kernels (the extension's ``tensor_cores``:
    nearest centroids by 1-bit products, C <= 128 on sm_80+) on ``rows = B * H`` rows of
    ``length`` queries, or 0 where the population-count kernels are the faster choice.

    One wave of blocks (two per SM, whole blocks per row, at least 512 queries each), from 2k
    queries per row and while a block takes at most 4096 queries. Measured with the centroids'
    fragments in shared memory and 16 warps per block (``benchmarks/lloyd_sweep.py --tensor-cores
    both``, H200, C = 100, 10 iterations; benchmarks/NOTES.md, twenty-fifth session), at this split
    against the population counts at theirs: 32 rows of 2k 111.1 -> 109.5 us, of 4k 163.9 -> 145.3,
    of 8k 257.8 -> 211.7, of 16k 456.3 -> 341.8 (the register form of the fragments: 422.4), of 32k
    817.7 -> 602.9 (732.3); 24 rows of 2k 112.3 -> 105.9, of 4k 159.2 -> 141.5, of 8k 209.4 ->
    175.7, of 16k 352.8 -> 273.6, of 32k 643.6 -> 464.6. 1k is not measured with that kernel (the
    register form lost there). At 24 rows of 64k (a one-wave block would take 5958 queries) the
    register form's 4096 queries per block lost 7%. The 512-query floor (rows so few that a wave
    would give each block less) is not measured, nor are more rows than resident blocks (a block
    per row would not fit in one wave: the population counts, as before the rule took 2k rows).
    """
    if length < TENSOR_CORE_LLOYD_MIN_LENGTH or rows > 2 * sms:
        return 0
    per_row = max(1, (2 * sms) // rows)
    per_block = max(-(-length // per_row), TENSOR_CORE_LLOYD_MIN_PER_BLOCK)
    return per_block if per_block <= TENSOR_CORE_LLOYD_MAX_PER_BLOCK else 0


ONE_LAUNCH_LLOYD_MAX_BLOCKS = 8  # blocks per row: the portable size of a thread block cluster
ONE_LAUNCH_LLOYD_CACHED = 8192  # queries of a block's slice kept in shared memory (the kernel's CLUSTER_CACHED_CODES)
# Lloyd's time (C = 100, 10 iterations, H200), microseconds. The one-launch kernel's wave of
# blocks: fixed, per query of a block's slice up to ONE_LAUNCH_LLOYD_CACHED and past it (read
# again every iteration), and divided by the blocks per row (the centroids' updates, shared
# among the row's blocks). The kernels launched per step: fixed, per query of each SM's share
# and per row (the update launches), with the tensor-core search or the population counts. Fitted
# to benchmarks/lloyd_sweep.py by benchmarks/lloyd_fit.py (benchmarks/NOTES.md, twenty-ninth
# session, run 8: results/lloyd_dsmem_update_sweep_h200_session29.txt): the one-launch kernel's
# median error 3%, at most 11%, over 8 / 32 / 256 rows of 1k..64k queries at 1..8 blocks per row;
# the per-step kernels' median 2%, at most 8%. Since that session's update (counters read through
# cluster addresses) the updates no longer cost less with more blocks per row: the fit's
# per-block term is slightly negative, a few microseconds that favour more blocks, within the
# model's error (it was 27 us, and the fixed term 42, on the twenty-seventh session's sweep).
ONE_LAUNCH_LLOYD_US = {"fixed": 47.1, "cached": 0.0363, "uncached": 0.049, "per_block": -5.0}
# by tensor cores: (fixed, per_query, per_row), the factors of per_step_lloyd_terms
PER_STEP_LLOYD_US = {True: (75.0, 0.0467, 0.26), False: (80.0, 0.0917, 0.22)}


def one_launch_lloyd_terms(rows: int, length: int, blocks: int, capacity: int) -> Tuple[float, ...]:
    """What ``ONE_LAUNCH_LLOYD_US``'s constants multiply (in its order), for the one-launch kernel
    on ``rows`` rows of ``length`` queries at ``blocks`` blocks per row, ``capacity`` clusters of
    them resident at once: each wave's 1, the queries of a block's slice up to and past
    ``ONE_LAUNCH_LLOYD_CACHED``, 1 / blocks; times the waves."""
    slice_ = -(-(-(-length // blocks)) // 16) * 16  # the kernel's chunk: whole tiles of 16
    waves = -(-rows // capacity)
    return (waves, waves * min(slice_, ONE_LAUNCH_LLOYD_CACHED), waves * max(slice_ - ONE_LAUNCH_LLOYD_CACHED, 0),
            waves / blocks)


def one_launch_lloyd_us(rows: int, length: int, blocks: int, capacity: int) -> float:
    """Modelled microseconds of the one-launch kernel (:func:`one_launch_lloyd_terms`)."""
    terms = one_launch_lloyd_terms(rows, length, blocks, capacity)
    return sum(factor * term for factor, term in zip(ONE_LAUNCH_LLOYD_US.values(), terms))


def per_step_lloyd_terms(rows: int, length: int, sms: int) -> Tuple[float, ...]:
    """What ``PER_STEP_LLOYD_US``'s constants multiply: 1, the queries of each SM's share, the rows."""
    return 1.0, rows * length / sms, float(rows)


def per_step_lloyd_us(rows: int, length: int, sms: int) -> float:
    """Modelled microseconds of the kernels launched per step, with the tensor-core search where
    :func:`lloyd_tensor_core_split` takes it, else the population counts."""
    factors = PER_STEP_LLOYD_US[lloyd_tensor_core_split(rows, length, sms) > 0]
    return sum(factor * term for factor, term in zip(factors, per_step_lloyd_terms(rows, length, sms)))


def lloyd_cluster_blocks(rows: int, length: int, sms: int, cluster_capacity: Callable[[int], int]) -> int:
    """Blocks per row of Lloyd's one-launch kernel (the extension's ``cluster_blocks``: a thread
    block cluster per row does the initial centroids, every iteration and the final assignment,
    C <= 128 on sm_90+) on ``rows = B * H`` rows of ``length`` queries, or 0 where the kernels
    launched per iteration are the faster choice.

    ``cluster_capacity(k)``: how many clusters of k blocks the GPU keeps resident at once (the
    extension's ``lloyd_cluster_capacity``; 0 where the kernel does not run). A cluster's blocks
    share one GPC, so that is not ``sms // k``: on an H200 (132 SMs), 32 rows of four blocks took
    twice as long as 24 rows, the rows past the GPCs' room waiting for a second wave. The choice
    is the k with the least modelled time (:func:`one_launch_lloyd_us`, in waves of
    ``ceil(rows / capacity)``) against the per-step kernels' (:func:`per_step_lloyd_us`). Fewer
    blocks win ties.
    """
    best_blocks, best_us = 0, per_step_lloyd_us(rows, length, sms)
    for blocks in range(1, ONE_LAUNCH_LLOYD_MAX_BLOCKS + 1):
        capacity = cluster_capacity(blocks)
        if capacity <= 0:
            continue
        us = one_launch_lloyd_us(rows, length, blocks, capacity)
        if us < best_us:
            best_blocks, best_us = blocks, us
    return best_blocks


def lloyd_launch_settings(rows: int, length: int, num_clusters: int, sms: int,
                          cluster_capacity: Callable[[int], int]) -> Tuple[int, bool, int]:
    """``(queries_per_block, tensor_cores, cluster_blocks)`` for the extension's ``lloyd_kmeans``
    on ``rows`` rows of ``length`` queries and ``num_clusters``, on a GPU of ``sms``
    multiprocessors that keeps ``cluster_capacity(k)`` clusters of k blocks of the one-launch
    kernel resident (0 where it does not run: before sm_90, C > 128): that kernel where
    :func:`lloyd_cluster_blocks` takes it; else the tensor-core kernels and their split where
    :func:`lloyd_tensor_core_split` takes them (C <= 128); else the population counts and
    :func:`lloyd_queries_per_block`."""
    if num_clusters <= TENSOR_CORE_LLOYD_MAX_CLUSTERS:
        blocks = lloyd_cluster_blocks(rows, length, sms, cluster_capacity)
        if blocks:
            return 0, True, blocks
        split = lloyd_tensor_core_split(rows, length, sms)
        if split:
            return split, True, 0
    return lloyd_queries_per_block(rows, length, sms), False, 0


def no_clusters(blocks: int) -> int:
    """A ``cluster_capacity`` for GPUs without the one-launch kernel."""
    return 0


@functools.lru_cache(maxsize=4096)
def _device_lloyd_settings(ext, device_index: int, rows: int, length: int, num_clusters: int) -> Tuple[int, bool, int]:
    """:func:`lloyd_launch_settings` on CUDA device ``device_index`` (remembered per shape: the
    capacity is a driver query)."""
    properties = torch.cuda.get_device_properties(device_index)

    def capacity(blocks: int) -> int:
        with torch.cuda.device(device_index):
            return ext.lloyd_cluster_capacity(length, num_clusters, blocks)

    return lloyd_launch_settings(rows, length, num_clusters, properties.multi_processor_count, capacity)


def lloyd_queries_per_block(rows: int, length: int, sms: int) -> int:
    """Queries per block of Lloyd's assign kernels for ``rows = B * H`` rows of ``length``
    queries on a GPU of ``sms`` multiprocessors.

    Every block adds its shared-memory bit counts into its row's counters once per iteration,
    and two blocks of the kernel are resident per SM, so a few blocks past a whole wave cost a
    wave more. 256 queries per block where 512 would leave most SMs idle; otherwise 512 or
    2048, whichever gives fewer whole waves times the per-block work (queries + 128). Measured
    (``benchmarks/lloyd_sweep.py``, H200, C = 100, 10 iterations, rows 24 / 32 / 256 / 288 of
    1k..64k queries, benchmarks/NOTES.md): 56.9 ms summed over the 28 shapes, against 59.1 for
    the extension's own choice (enough blocks for one wave) and 56.1 for the best setting of
    each shape; at most 1.12x the best (24 rows of 4k); 32 rows of 8k 358 -> 258 us, of 32k
    1177 -> 817 us.
    """
    if 2 * rows * length <= 512 * sms:
        return 256
    resident = 2 * sms

    def cost(per_block: int) -> int:
        waves = -(-rows * -(-length // per_block) // resident)
        return waves * (per_block + 128)

    return 2048 if cost(2048) <= cost(512) else 512


def _row_chunks(rows: int, num_clusters: int, keys: int):
    per_row = max(1, num_clusters * keys * 4)
    step = max(1, min(rows, DENSE_CHUNK_BYTES // per_row))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class ImprovedRoute(NamedTuple):
    """Where the improved variant's steps run for a kind of input (:meth:`CudaOps._improved_route`)."""
    flash_path: bool  # the flash path's algebra: flash itself, or its Triton form; else fp32 (C, S) products
    exact_on_triton: bool  # ... with the Triton exact products, which write into a given output / dq
    all_triton: bool  # every step in Triton (the form for key padding and dropout), which writes given dk, dv
    # ... and the centroids' attention forward on the Triton kernel (with key padding or dropout, and for head
    # dims up to CudaOps.TRITON_FORWARD_MAX_DIM without), whose fp32 values and log-sum-exps the forward keeps
    centroids_on_triton: bool


class CudaOps:
    """The op implementations over a compiled extension ``ext`` (``fairseq_clustered._C``).

    ``use_flash`` lets the tests run the dense fp32 path where flash would be taken.
    Where the kernels serve a call, its composition runs through ``graphs``, which
    replays it from a CUDA graph once its signature repeats (:mod:`.graph_cache`).
    """

    def __init__(self, ext, use_flash: bool = True):
        self.ext = ext
        self.use_flash = use_flash
        # The extension's one-launch copies (cuda/copies.cu) where it has them; an extension
        # built before them (or a stand-in) leaves the graph cache to torch's copies.
        self.graphs = GraphCache(copies=ext if hasattr(ext, "fresh_copies") else None)
        self._by_kind: Dict[tuple, object] = {}  # see _per_kind
        if self.graphs.native is not None:  # (weakly: the table may outlive these ops, in a backward node)
            self.graphs.native.set_backward_fallback("clustered", weakref.WeakMethod(self.clustered_bwd_packed))
            self.graphs.native.set_backward_fallback("improved", weakref.WeakMethod(self.improved_bwd_packed))

    # ------------------------------------------------------------------ clustering

    @staticmethod
    def _hash_why_not(x: Tensor) -> Optional[str]:
        if x.dtype not in KERNEL_DTYPES:
            return f"dtype {x.dtype} has no kernel"
        if x.shape[-1] > MAX_HASH_DIM:
            return f"dim {x.shape[-1]} > {MAX_HASH_DIM}"
        return None

    @staticmethod
    def _lloyd_why_not(codes: Tensor, num_clusters: int) -> Optional[str]:
        if num_clusters > MAX_KERNEL_CLUSTERS:
            return f"num_clusters {num_clusters} > {MAX_KERNEL_CLUSTERS}"
        if codes.shape[0] * codes.shape[1] > MAX_ROWS:
            return f"batch * heads = {codes.shape[0] * codes.shape[1]} > {MAX_ROWS}"
        return None

    def hash_codes(self, x: Tensor, planes: Tensor, offsets: Tensor) -> Tensor:
        why = self._hash_why_not(x)
        if why is not None:
            warn_fallback("hash_codes", why)
            return reference.hash_codes_ref(x, planes, offsets)
        return self._hash_codes(x, planes, offsets)

    def _hash_codes(self, x: Tensor, planes: Tensor, offsets: Tensor) -> Tensor:
        if hash_triton.triton_hash_unavailable(x) is None:  # tensor cores, fp32's accuracy
            return hash_triton.hash_codes_triton(x, planes, offsets)
        return self.ext.hash_codes(x, planes, offsets)

    def lloyd_kmeans(self, codes, query_padding_mask, num_clusters, iterations, bits):
        why = self._lloyd_why_not(codes, num_clusters)
        if why is not None:
            warn_fallback("lloyd_kmeans", why)
            return reference.lloyd_kmeans_ref(codes, query_padding_mask, num_clusters, iterations, bits)
        return self.graphs.run("lloyd_kmeans", self._lloyd_kmeans,
                               (codes, query_padding_mask, num_clusters, iterations, bits))

    def _lloyd_kmeans(self, codes, query_padding_mask, num_clusters, iterations, bits):
        per_block, tensor_cores, cluster_blocks = self._lloyd_settings(codes, num_clusters)
        return tuple(self.ext.lloyd_kmeans(codes, query_padding_mask, num_clusters, iterations, bits, per_block,
                                           tensor_cores, cluster_blocks))

    def _lloyd_settings(self, codes: Tensor, num_clusters: int) -> Tuple[int, bool, int]:
        """The extension's ``lloyd_kmeans`` settings for ``codes (B, H, N)``: :func:`lloyd_launch_settings`."""
        if not codes.is_cuda:
            return 0, False, 0
        rows, length = codes.shape[0] * codes.shape[1], codes.shape[2]
        return _device_lloyd_settings(self.ext, codes.get_device(), rows, length, num_clusters)

    def cluster_queries(self, x, planes, offsets, query_padding_mask, num_clusters, iterations, bits):
        """Hashing and Lloyd's k-means as one composition (one graph replay where they repeat)."""
        if self._hash_why_not(x) is not None or self._lloyd_why_not(x, num_clusters) is not None:
            codes = self.hash_codes(x, planes, offsets)  # these warn and take the reference
            return self.lloyd_kmeans(codes, query_padding_mask, num_clusters, iterations, bits)
        return self.graphs.run("cluster_queries", self._cluster_queries,
                               (x, planes, offsets, query_padding_mask, num_clusters, iterations, bits))

    def clustering_why_not(self, x: Tensor, num_clusters: int) -> Optional[str]:
        """Why the kernels cannot hash and cluster ``x (B, H, N, D)`` into ``num_clusters``
        inside an attention composition (None if they can: see :meth:`clustered_fwd_packed` and
        :meth:`improved_fwd_with_clustering`)."""
        return self._hash_why_not(x) or self._lloyd_why_not(x, num_clusters)

    def _cluster_queries(self, x, planes, offsets, query_padding_mask, num_clusters, iterations, bits):
        return self._lloyd_kmeans(self._hash_codes(x, planes, offsets), query_padding_mask, num_clusters,
                                  iterations, bits)

    def _cluster_queries_sorted(self, x, planes, offsets, query_padding_mask, num_clusters, iterations, bits):
        """:meth:`_cluster_queries`' assignments with their sort by cluster (:meth:`_sort_by_cluster`'s
        ``order, seg_start``): ``(assignments, (order, seg_start))``. Where Lloyd runs in one launch
        (thread block clusters, sm_90) that launch sorts them too, which saves a forward the sort's
        own launch (the same permutation: both are stable counting sorts of the same ids)."""
        codes = self._hash_codes(x, planes, offsets)
        cluster_blocks = self._lloyd_settings(codes, num_clusters)[2]
        if cluster_blocks > 0:
            assignments, _, order, seg_start = self.ext.lloyd_kmeans_sorted(codes, query_padding_mask, num_clusters,
                                                                            iterations, bits, cluster_blocks)
            return assignments, (order, seg_start)
        assignments, _ = self._lloyd_kmeans(codes, query_padding_mask, num_clusters, iterations, bits)
        return assignments, self._sort_by_cluster(assignments.contiguous(), num_clusters)

    @staticmethod
    def _centroid_tickets(rows, num_clusters, key, key_padding_mask, keep) -> Tensor:
        """Uninitialised int32 tickets for the Triton centroid attention's forward on these inputs
        (``centroid_triton.forward_tickets`` of them), for the centroids' segment sum to zero in its
        launch (:meth:`_sorted_centroids`' ``zero``) instead of a fill of their own."""
        masked = key_padding_mask is not None or keep is not None
        return torch.empty(centroid_triton.forward_tickets(rows, num_clusters, key, masked), dtype=torch.int32,
                           device=key.device)

    def _sorted_centroids(self, query, assignments, num_clusters, sort, zero=None):
        """``(order, seg_start, qbar)``: ``sort`` (:meth:`_cluster_queries_sorted`'s) or, where it is
        None, the sort made here, and the clusters' mean queries ``(B H, C, D)`` fp32 (:meth:`_centroids`).
        ``zero``: an int32 tensor the centroids' launch fills with zeros, or None."""
        order, seg_start = sort if sort is not None else self._sort_by_cluster(assignments, num_clusters)
        return order, seg_start, self._centroids(query, order, seg_start, zero)

    def chunk_cluster_sums(self, x, clusters, window, num_clusters):
        if x.dtype not in KERNEL_DTYPES:
            warn_fallback("chunk_cluster_sums", f"dtype {x.dtype} has no kernel")
            return causal_fused.chunk_cluster_sums_ref(x, clusters, window, num_clusters)
        return self.ext.chunk_cluster_sums(x, clusters, window, num_clusters)

    # ------------------------------------------------------------------ causal

    def causal_fwd(self, query, key, value, clusters, planes, offsets, window, num_clusters, iterations, bits,
                   scale, keep=None, dropout_p=0.0):
        """The one-kernel Triton path of causal clustered attention (:mod:`.causal_triton`, whose
        requirements the caller has checked) as one composition; with ``clusters`` None the keys
        are hashed with ``planes (bits, D)`` / ``offsets (bits,)`` and clustered inside it (see
        :meth:`clustering_why_not`).

        Returns ``out``, ``lse``, the summary keys, values and counts, and the ``(B, H, N)`` key
        cluster ids: what :meth:`causal_bwd` takes (with ``keep`` and ``dropout_p``: attention
        dropout, as :func:`.causal_triton.forward`).
        """
        return self.graphs.run("causal_clustered_attention_fwd", self._causal_fwd, (
            query, key, value, clusters, planes, offsets, window, num_clusters, iterations, bits, scale, keep,
            dropout_p))

    def _causal_fwd(self, query, key, value, clusters, planes, offsets, window, num_clusters, iterations, bits,
                    scale, keep, dropout_p):
        if clusters is None:  # the Lloyd kernel called directly (no op dispatch, no graph of its own)
            clusters = causal.key_clusters_from_codes(self._hash_codes(key, planes, offsets), None, window,
                                                      num_clusters, iterations, bits, self._lloyd_kmeans)
        return (*causal_triton.forward(query, key, value, clusters, window, num_clusters, scale, keep, dropout_p),
                clusters)

    def causal_bwd(self, grad_out, query, key, value, clusters, out, lse, summary_keys, summary_values, counts,
                   window, num_clusters, scale, keep=None, dropout_p=0.0):
        """``dq, dk, dv`` of :meth:`causal_fwd` as one composition."""
        return self.graphs.run("causal_clustered_attention_bwd", causal_triton.backward, (
            grad_out, query, key, value, clusters, out, lse, summary_keys, summary_values, counts, window,
            num_clusters, scale, keep, dropout_p))

    # ------------------------------------------------------------------ shared

    def improved_fwd_with_clustering(self, query, key, value, planes, offsets, query_padding_mask, iterations, bits,
                                     *attention):
        """:meth:`cluster_queries`, then :meth:`improved_fwd` on the assignments, as one composition
        (one graph replay where it repeats, one less than two calls); ``attention`` are its arguments
        after ``assignments``. Returns its outputs and then the assignments; on the flash path (and
        its Triton form) then what the backward keeps (:meth:`_improved_fwd_keeping`), which the eager
        path takes packed (:meth:`improved_fwd_packed`)."""
        key_padding_mask, keep, num_clusters, topk = attention[:4]
        if self._why_not(query, value, improved=True) or self.clustering_why_not(query, num_clusters):
            assignments, _ = self.cluster_queries(query, planes, offsets, query_padding_mask, num_clusters,
                                                  iterations, bits)  # these warn and take the reference
            return (*self.improved_fwd(query, key, value, assignments, *attention), assignments)
        # the output is written into a tensor of the caller's (graph_cache's "filled")
        out = self._improved_query_sized_to_fill(query, value, key_padding_mask, keep, num_clusters)
        return self.graphs.run("improved_clustered_attention_fwd_with_clustering", self._improved_fwd_with_clustering,
                               (out, query, key, value, planes, offsets, query_padding_mask, iterations, bits,
                                *attention), filled=(0,))

    def _improved_fwd_with_clustering(self, out, query, key, value, planes, offsets, query_padding_mask, iterations,
                                      bits, *attention):
        assignments, sort = self._cluster_queries_sorted(query, planes, offsets, query_padding_mask, attention[2],
                                                         iterations, bits)
        out, lse, top, centroids, *kept = self._improved_fwd_keeping(query, key, value, assignments, *attention, out,
                                                                     sort=sort)
        return (out, lse, top, centroids, assignments, *kept)

    def improved_fwd_packed(self, query, key, value, planes, offsets, query_padding_mask, iterations, bits,
                            key_padding_mask, keep, num_clusters, topk, scale, dropout_p):
        """:meth:`improved_fwd_with_clustering` on the flash path or its Triton form
        (:meth:`packs_improved`), with what its backward needs in one buffer, as
        :meth:`clustered_fwd_packed`: ``(out, packed)``, ``packed`` laid out as
        :meth:`improved_kept_layout` says; :meth:`improved_bwd_packed` takes it."""
        out = self._improved_query_sized_to_fill(query, value, key_padding_mask, keep, num_clusters)

        def native():  # improved_step's key of this call (its forward fills out and the buffer)
            return self.ext.improved_forward_key(query, key, value, planes, offsets, query_padding_mask,
                                                 key_padding_mask, keep, iterations, bits, num_clusters, topk, scale,
                                                 dropout_p, False), []

        return self._run_packing("improved_clustered_attention_fwd_packed", self._improved_fwd_packing,
                                 self._improved_layout(query, key, value, key_padding_mask, keep, num_clusters, topk),
                                 out, query, key, value, planes, offsets, query_padding_mask, iterations, bits,
                                 key_padding_mask, keep, num_clusters, topk, scale, dropout_p,
                                 native=native if out is not None else None)

    def improved_fwd_inference(self, query, key, value, planes, offsets, query_padding_mask, iterations, bits,
                               key_padding_mask, keep, num_clusters, topk, scale, dropout_p) -> Tensor:
        """The output of :meth:`improved_fwd_packed` for calls that autograd does not record, as
        :meth:`clustered_fwd_inference`: no packed buffer and no pack of what a backward would need.
        Its graph writes the output where the caller gets it where the Triton exact products make it
        (and the extension's ``improved_step`` then replays it from C++ for such calls). Arguments as
        :meth:`improved_fwd_packed`'s; where :meth:`packs_improved` takes them."""
        out = self._improved_query_sized_to_fill(query, value, key_padding_mask, keep, num_clusters)

        def native():  # improved_step's key of this call (the composition that keeps nothing)
            return self.ext.improved_forward_key(query, key, value, planes, offsets, query_padding_mask,
                                                 key_padding_mask, keep, iterations, bits, num_clusters, topk, scale,
                                                 dropout_p, True), []

        return self.graphs.run("improved_clustered_attention_fwd_inference", self._improved_fwd_inference, (
            out, query, key, value, planes, offsets, query_padding_mask, iterations, bits, key_padding_mask, keep,
            num_clusters, topk, scale, dropout_p), filled=(0,), native=native if out is not None else None)

    def _improved_fwd_inference(self, out, query, key, value, planes, offsets, query_padding_mask, iterations, bits,
                                *attention):
        return self._improved_fwd_with_clustering(out, query, key, value, planes, offsets, query_padding_mask,
                                                  iterations, bits, *attention)[0]

    def _improved_layout(self, query, key, value, key_padding_mask, keep, num_clusters, topk) -> "KeptLayout":
        """:meth:`improved_kept_layout`, remembered per kind."""
        return self._per_kind(
            ("improved_kept_layout", query.shape, key.shape[2], key.dtype, value.shape[-1], key_padding_mask is None,
             keep is None, num_clusters, topk),
            lambda: self.improved_kept_layout(query, key, value, key_padding_mask, keep, num_clusters, topk))

    def _improved_fwd_packing(self, out, packed, layout, query, key, value, planes, offsets, query_padding_mask,
                              iterations, bits, *attention):
        out, lse, top, centroids, assignments, *kept = self._improved_fwd_with_clustering(
            out, query, key, value, planes, offsets, query_padding_mask, iterations, bits, *attention)
        self._pack(packed, layout, (lse, top, centroids, *kept, assignments))
        return out, packed

    def packs_improved(self, query, value, key_padding_mask, keep, num_clusters) -> bool:
        """Whether the kernels cluster and attend these inputs on the improved variant's flash path or
        its Triton form (:meth:`improved_fwd_packed` takes them)."""
        return self._per_kind(
            ("packs_improved", query.dtype, query.is_cuda, query.shape[0], query.shape[1], query.shape[-1],
             value.shape[-1], key_padding_mask is None, keep is None, num_clusters),
            lambda: (self._why_not(query, value, improved=True) is None
                     and self.clustering_why_not(query, num_clusters) is None
                     and self._improved_route(query, value, key_padding_mask, keep, num_clusters).flash_path))

    def improved_kept_layout(self, query, key, value, key_padding_mask, keep, num_clusters, topk) -> KeptLayout:
        """The :class:`KeptLayout` of what :meth:`_improved_fwd_keeping` keeps on the flash path (its
        order; the assignments last): the centroids' attention output and log-sum-exp are flash's
        ``(B, H, C, Dv)`` in the key dtype and ``(B, H, C)``, or where the Triton kernel makes them
        (:class:`ImprovedRoute`'s ``centroids_on_triton``) its ``(B H, C, Dv)`` and ``(B H, C)`` fp32."""
        batch, heads, length, dim = query.shape
        rows, value_dim, top_k = batch * heads, value.shape[-1], min(topk, key.shape[2])
        if self._improved_route(query, value, key_padding_mask, keep, num_clusters).centroids_on_triton:
            centroid_values = (torch.float32, (rows, num_clusters, value_dim))
            centroid_lse = (torch.float32, (rows, num_clusters))
        else:
            centroid_values = (key.dtype, (batch, heads, num_clusters, value_dim))
            centroid_lse = (self._flash_lse_dtype(key.dtype), (batch, heads, num_clusters))
        return _laid_out(((torch.float32, (batch, heads, num_clusters)),  # log-sum-exps
                          (torch.int64, (batch, heads, num_clusters, top_k)),  # top keys
                          (torch.float32, (batch, heads, num_clusters, dim)),  # centroids
                          centroid_values, centroid_lse,
                          (torch.int64, (rows, length)),  # order
                          (torch.int64, (rows, num_clusters + 1)),  # seg_start
                          (torch.int64, (batch, heads, length))))  # assignments

    @staticmethod
    def _flash_lse_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype of the log-sum-exps of :meth:`_attn_fwd` for inputs of ``dtype`` (flash's: fp32)."""
        return torch.float32

    def improved_bwd_packed(self, grad_out, query, key, value, packed, key_padding_mask, keep, num_clusters, topk,
                            scale, dropout_p):
        """:meth:`improved_bwd` from :meth:`improved_fwd_packed`'s ``packed`` (laid out for these inputs and
        ``topk``: :meth:`improved_kept_layout`), unpacked inside the composition: the sort of the queries is
        not done again, nor the centroids' attention forward. ``grad_out`` contiguous. The backward node
        of ``improved_step`` (``cuda/clustered_step.cpp``) calls this where its table does not hold the
        backward's graph."""
        layout = self._improved_layout(query, key, value, key_padding_mask, keep, num_clusters, topk)

        def native():  # the key under which improved_step's backward node looks this call up
            return self.ext.improved_backward_key(grad_out, query, key, value, packed, key_padding_mask, keep,
                                                  num_clusters, scale, dropout_p), []

        return self.graphs.run("improved_clustered_attention_bwd_packed", self._improved_bwd_unpacking, (
            grad_out, query, key, value, packed, layout, key_padding_mask, keep, num_clusters, scale, dropout_p,
            *self._improved_gradients_to_fill(query, key, value, key_padding_mask, keep, num_clusters)),
            filled=(11, 12, 13), native=native)

    def _improved_bwd_unpacking(self, grad_out, query, key, value, packed, layout, key_padding_mask, keep,
                                num_clusters, scale, dropout_p, dq=None, dk=None, dv=None):
        lse, top, centroids, centroid_values, centroid_lse, order, seg_start, assignments = layout.views(packed)
        return self._improved_bwd_kept(grad_out, query, key, value, assignments, key_padding_mask, keep, lse, top,
                                       centroids, centroid_values, centroid_lse, order, seg_start, num_clusters,
                                       scale, dropout_p, dq, dk, dv)

    def clustered_fwd_packed(self, query, key, value, planes, offsets, query_padding_mask, iterations, bits,
                             key_padding_mask, keep, num_clusters, scale, dropout_p):
        """:meth:`cluster_queries`, then :meth:`clustered_fwd` on the assignments, as one composition
        where the kernels take the inputs (:meth:`packs_clustered`), with what its backward needs in
        one buffer: ``(out, packed)``, where ``packed`` (uint8) holds the log-sum-exps, centroids,
        each cluster's output, the sort by cluster and the assignments as :func:`kept_layout` says
        (:meth:`clustered_bwd_packed` takes them). Both ``out`` and ``packed`` are allocated here and
        written by the composition's graph (graph_cache's "filled"): a replay makes no copies out of
        the graph and the backward's graph reads one tensor instead of six, which saves CPU time
        where the step is bound by it (each tensor a replay hands out or reads costs an allocation or
        a signature entry; benchmarks/NOTES.md, twenty-first session)."""

        def native():  # clustered_step's key of this call, and the layout of its backward's dq
            shape, strides, dtype = custom_ops.query_gradient_layout(query)
            dq = torch.empty_strided(shape, strides, dtype=dtype, device="meta")
            return self.ext.clustered_forward_key(query, key, value, planes, offsets, query_padding_mask,
                                                  key_padding_mask, keep, iterations, bits, num_clusters, scale,
                                                  dropout_p, False), [dq]

        return self._run_packing("clustered_attention_fwd_packed", self._clustered_fwd_packing,
                                 self._kept_layout(query, value, num_clusters),
                                 custom_ops.attention_output_like(query, value.shape[-1]), query, key, value, planes,
                                 offsets, query_padding_mask, iterations, bits, key_padding_mask, keep, num_clusters,
                                 scale, dropout_p, native=native)

    def clustered_fwd_inference(self, query, key, value, planes, offsets, query_padding_mask, iterations, bits,
                                key_padding_mask, keep, num_clusters, scale, dropout_p) -> Tensor:
        """The output of :meth:`clustered_fwd_packed` for calls that autograd does not record
        (evaluation, generation, ``torch.no_grad``), from a composition that keeps nothing for a
        backward: no packed buffer, no copy of each cluster's output in the query dtype. Its graph
        writes the output where the caller gets it (graph_cache's "filled"), and the extension's
        ``clustered_step`` replays it from C++ for such calls (``clustered_forward_key``'s
        ``keeps_nothing``).
        Arguments as :meth:`clustered_fwd_packed`'s; where :meth:`packs_clustered` takes them."""

        def native():  # clustered_step's key of this call (the composition that keeps nothing)
            return self.ext.clustered_forward_key(query, key, value, planes, offsets, query_padding_mask,
                                                  key_padding_mask, keep, iterations, bits, num_clusters, scale,
                                                  dropout_p, True), []

        out = custom_ops.attention_output_like(query, value.shape[-1])
        return self.graphs.run("clustered_attention_fwd_inference", self._clustered_fwd_inference, (
            out, query, key, value, planes, offsets, query_padding_mask, iterations, bits, key_padding_mask, keep,
            num_clusters, scale, dropout_p), filled=(0,), native=native)

    def _clustered_fwd_inference(self, out, query, key, value, planes, offsets, query_padding_mask, iterations,
                                 bits, key_padding_mask, keep, num_clusters, scale, dropout_p):
        assignments, sort = self._cluster_queries_sorted(query, planes, offsets, query_padding_mask, num_clusters,
                                                         iterations, bits)
        return self._clustered_fwd_keeping(query, key, value, assignments, key_padding_mask, keep, num_clusters,
                                           scale, dropout_p, out, keeping=False, sort=sort)[0]

    def clustered_step(self, query, key, value, key_padding_mask, keep, num_clusters, scale, dropout_p, clustering):
        """The output of a clustered step whose graphs the cache registered in its C++ table, replayed by
        the extension's ``clustered_step`` (``cuda/clustered_step.cpp``) with a C++ backward node; None
        where the table does not serve the call (then ``eager.ClusteredAttention`` runs it). Arguments
        as :meth:`clustered_fwd_packed`'s, ``clustering = (planes, offsets, query_padding_mask,
        iterations, bits)``."""
        if self.graphs.native is None:
            return None
        planes, offsets, query_padding_mask, iterations, bits = clustering
        return self.ext.clustered_step(self.graphs.native, query, key, value, planes, offsets, query_padding_mask,
                                       key_padding_mask, keep, iterations, bits, num_clusters, scale, dropout_p)

    def improved_step(self, query, key, value, key_padding_mask, keep, num_clusters, topk, scale, dropout_p,
                      clustering):
        """:meth:`clustered_step` for the improved variant (its graphs from :meth:`improved_fwd_packed` and
        :meth:`improved_bwd_packed`); None where the table does not serve the call (then
        ``eager.ImprovedClusteredAttention`` runs it)."""
        if self.graphs.native is None:
            return None
        planes, offsets, query_padding_mask, iterations, bits = clustering
        return self.ext.improved_step(self.graphs.native, query, key, value, planes, offsets, query_padding_mask,
                                      key_padding_mask, keep, iterations, bits, num_clusters, topk, scale, dropout_p)

    def _kept_layout(self, query: Tensor, value: Tensor, num_clusters: int) -> "KeptLayout":
        """:func:`kept_layout`, remembered per kind (``query`` may be its gradient: same shape and dtype)."""
        return self._per_kind(("kept_layout", query.shape, query.dtype, value.shape[-1], num_clusters),
                              lambda: kept_layout(query, value, num_clusters))

    def _run_packing(self, name, composition, layout, out, query, *arguments, native=None):
        """``composition(out, packed, layout, query, *arguments)`` through the graph cache as ``name``,
        with ``out`` and a new uint8 ``packed`` buffer of ``layout.nbytes`` as the outputs its graph
        writes (graph_cache's "filled") -> ``(out, packed)``. ``native``: as the cache's."""
        packed = torch.empty(layout.nbytes, dtype=torch.uint8, device=query.device)
        return self.graphs.run(name, composition, (out, packed, layout, query, *arguments), filled=(0, 1),
                               native=native)

    def _clustered_fwd_packing(self, out, packed, layout, query, key, value, planes, offsets, query_padding_mask,
                               iterations, bits, key_padding_mask, keep, num_clusters, scale, dropout_p):
        assignments, sort = self._cluster_queries_sorted(query, planes, offsets, query_padding_mask, num_clusters,
                                                         iterations, bits)
        out, lse, centroids, cluster_outputs, order, seg_start = self._clustered_fwd_keeping(
            query, key, value, assignments, key_padding_mask, keep, num_clusters, scale, dropout_p, out, sort=sort)
        self._pack(packed, layout, (lse, centroids, cluster_outputs, order, seg_start, assignments))
        return out, packed

    def packs_clustered(self, query: Tensor, value: Tensor, num_clusters: int) -> bool:
        """Whether the kernels cluster and attend these inputs (:meth:`clustered_fwd_packed` takes them)."""
        return self._per_kind(
            ("packs_clustered", query.dtype, query.shape[0], query.shape[1], query.shape[-1], value.shape[-1],
             num_clusters),
            lambda: (self._why_not(query, value, improved=False) is None
                     and self.clustering_why_not(query, num_clusters) is None))

    def _per_kind(self, kind: tuple, work_out):
        """``work_out()``, remembered under ``kind``: what depends only on the inputs' shapes, strides,
        dtypes and the hyper-parameters in ``kind``. An eager step asks for several such answers, and
        working them out again at every call (building layouts, checking limits)
        cost tens of microseconds of host time per step on the GPU server, where the step below 8k
        positions is bound by the host (benchmarks/NOTES.md, twenty-third session). At most
        ``MAX_KINDS_REMEMBERED`` answers are kept (fairseq's length-bucketed batches bring many shapes)."""
        answer = self._by_kind.get(kind)
        if answer is None:
            if len(self._by_kind) >= MAX_KINDS_REMEMBERED:
                self._by_kind.clear()
            answer = self._by_kind[kind] = work_out()
        return answer

    def _pack(self, packed: Tensor, layout: KeptLayout, tensors: Sequence[Tensor]) -> None:
        """Copies ``tensors`` into their places in ``packed`` (one launch), and zeros into the gaps
        between them, so that every byte of it is written (a graph's filled argument is checked
        byte for byte against the eager result)."""
        destinations, sources = [], []
        for view, tensor, gap in zip(layout.views(packed), tensors, layout.gaps(packed)):
            if tensor.dtype != view.dtype or tensor.shape != view.shape:
                raise RuntimeError(f"fairseq_clustered: kept tensor {tensor.dtype} {tuple(tensor.shape)} does not "
                                   f"fit its place {view.dtype} {tuple(view.shape)} (a bug: please report it)")
            destinations.append(view)
            sources.append(tensor.contiguous())
            if gap.numel():
                destinations.append(gap)
                sources.append(_zero_bytes(packed.device)[:gap.numel()])
        copy = getattr(self.ext, "copy_tensors", None)
        if copy is not None:
            copy(destinations, sources)
        else:  # an extension without the one-launch copies (the CPU tests' stand-ins)
            for destination, source in zip(destinations, sources):
                destination.copy_(source)

    def clustered_bwd_packed(self, grad_out, dq, key, value, packed, key_padding_mask, keep, num_clusters, scale,
                             dropout_p):
        """:meth:`clustered_bwd` from :meth:`clustered_fwd_packed`'s ``packed``, unpacked inside the
        composition (so in its graph, at no cost per replay): neither the queries nor the output are
        read, so neither is copied into the graph, and the sort is not done again. ``dq``: an empty
        tensor of the queries' shape and dtype in the layout wanted (dense), written into by the graph
        (graph_cache's "filled"), as are dk and dv where the Triton centroid backward makes them.
        The backward node of ``clustered_step`` (``cuda/clustered_step.cpp``) calls this where its
        table does not hold the backward's graph."""
        dk, dv = self._key_gradients_to_fill(dq, key, value, num_clusters)

        def native():  # the key under which clustered_step's backward node looks this call up
            return self.ext.clustered_backward_key(grad_out, dq, key, value, packed, key_padding_mask, keep,
                                                   num_clusters, scale, dropout_p), []

        return self.graphs.run("clustered_attention_bwd_packed", self._clustered_bwd_unpacking, (
            grad_out, dq, key, value, packed, self._kept_layout(dq, value, num_clusters), key_padding_mask, keep,
            num_clusters, scale, dropout_p, dk, dv), filled=(1, 11, 12), native=native)

    def _clustered_bwd_unpacking(self, grad_out, dq, key, value, packed, layout, key_padding_mask, keep,
                                 num_clusters, scale, dropout_p, dk=None, dv=None):
        lse, centroids, cluster_outputs, order, seg_start, assignments = layout.views(packed)
        return self._clustered_bwd_sorted(grad_out, dq, key, value, assignments, key_padding_mask, keep, lse,
                                          centroids, cluster_outputs, order, seg_start, num_clusters, scale,
                                          dropout_p, dk, dv)

    def _why_not(self, query: Tensor, value: Tensor, improved: bool) -> Optional[str]:
        """Why the kernels cannot serve these inputs (None when they can).

        Everything the extension's host checks would refuse is caught here first, so
        that unsupported inputs take the reference instead of raising inside the
        extension (see the note in tests/test_cuda_kernels.py about errors there).
        """
        if query.dtype not in KERNEL_DTYPES:
            return f"dtype {query.dtype} has no kernel"
        if query.shape[0] * query.shape[1] > MAX_ROWS:
            return f"batch * heads = {query.shape[0] * query.shape[1]} > {MAX_ROWS}"
        dim, value_dim = query.shape[-1], value.shape[-1]
        if improved and (dim != value_dim or dim not in IMPROVED_HEAD_DIMS):
            return f"head dims (query {dim}, value {value_dim}) are not equal and in {IMPROVED_HEAD_DIMS}"
        if max(dim, value_dim) > MAX_CLUSTER_WIDTH:
            return f"head dims (query {dim}, value {value_dim}) exceed {MAX_CLUSTER_WIDTH}"
        return None

    def _flash_ok(self, query, value, key_padding_mask, keep) -> bool:
        return (
            self.use_flash
            and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
            and key_padding_mask is None
            and keep is None
            and query.shape[-1] == value.shape[-1]
            and query.shape[-1] % 8 == 0
        )

    def _centroid_triton_ok(self, query, value, num_clusters) -> bool:
        """Whether the clustered variant's centroid attention, where flash cannot take it (key
        padding, dropout, fp32), runs on tensor cores in Triton (:mod:`.centroid_triton`)
        rather than as fp32 products of a (C, S) matrix."""
        return (self.use_flash and query.is_cuda
                and centroid_triton.triton_centroid_unavailable(query, value, num_clusters) is None)

    # Head dims up to this take the clustered forward's centroid attention on the Triton kernel where flash
    # could take it too (:func:`centroid_triton.centroid_attention_fwd`): one launch that reads the fp32
    # centroids, merges its key ranges itself and writes the fp32 values the broadcast reads, where the
    # flash route takes the centroids' cast, flash's split-key kernel and its combine, the merge of our
    # key blocks, the log-sum-exps' copy and the values' cast. At 32 rows, C = 100, D = 64 (bf16, graph
    # replays) it took 14.9 / 20.0 / 26.5 / 41.6 / 68.6 / 120.5 / 228.7 us at 1k / 2k / 4k / 8k / 16k /
    # 32k / 64k keys against the flash route's 18.3 / 27.9 / 36.2 / 49.8 / 79.3 / 130.4 / 241.0
    # (benchmarks/centroid_sweep.py; benchmarks/NOTES.md, thirty-first session). Wider heads keep flash
    # (not measured against it).
    TRITON_FORWARD_MAX_DIM = 64

    def _improved_triton_ok(self, query, value, num_clusters) -> bool:
        """Whether the improved variant, where flash cannot take it (key padding, dropout), runs on
        the flash path's algebra with Triton kernels (the centroid attention with its masks, the top
        keys and the exact top-key products) rather than as fp32 products of (C, S) matrices."""
        return (self._centroid_triton_ok(query, value, num_clusters)
                and improved_triton.triton_exact_unavailable(query, value) is None)

    def _improved_route(self, query, value, key_padding_mask, keep, num_clusters) -> ImprovedRoute:
        """Where the improved variant's steps run for these inputs (:class:`ImprovedRoute`), worked out
        once per kind of input (dtype, CUDA or not, head dims, which masks are given, C: all that the
        predicates read; :meth:`_per_kind`): the eager step asks before its forward and again before
        its backward, and the predicates cost tens of microseconds of host time per step
        (benchmarks/NOTES.md, twenty-second session)."""
        def work_out():
            all_triton = self._improved_triton_ok(query, value, num_clusters)
            flash_path = self._flash_ok(query, value, key_padding_mask, keep) or all_triton
            exact_on_triton = flash_path and improved_triton.triton_exact_unavailable(query, value) is None
            masked = key_padding_mask is not None or keep is not None
            centroids_on_triton = all_triton and (masked or query.shape[-1] <= self.TRITON_FORWARD_MAX_DIM)
            return ImprovedRoute(flash_path, exact_on_triton, all_triton, centroids_on_triton)
        return self._per_kind(("improved_route", query.dtype, query.is_cuda, query.shape[-1], value.shape[-1],
                               key_padding_mask is None, keep is None, num_clusters), work_out)

    def _sort_by_cluster(self, assignments: Tensor, num_clusters: int) -> Tuple[Tensor, Tensor]:
        """:func:`_segments`'s ``order, seg_start`` (the counts, where wanted, are
        :func:`_member_counts` of ``seg_start``), from the extension's counting sort (one launch
        instead of torch's radix sort, search and casts) where it takes the shape. Both are stable
        sorts of the cluster ids, so both give the same permutation (up to the order among ids
        below 0, the padded queries' -1, which are in no cluster)."""
        if num_clusters <= CLUSTER_ORDER_MAX_CLUSTERS and assignments.shape[-1] <= CLUSTER_ORDER_MAX_LENGTH:
            return self.ext.cluster_order(assignments, num_clusters)
        return _segments(assignments, num_clusters)[:2]

    def _centroids(self, query, order, seg_start, zero=None) -> Tensor:
        """Mean member query of every cluster, fp32 ``(rows, C, D)`` (zeros when empty); ``zero``: an
        int32 tensor the same launch fills with zeros (the extension's ``segment_sum``), or None."""
        return self.ext.segment_sum(query, order, seg_start, True, zero=zero)

    @staticmethod
    def _dense_inputs(key, value, key_padding_mask, keep, num_clusters, dropout_p):
        batch, heads, keys, dim = key.shape
        rows = batch * heads
        k_rows = key.reshape(rows, keys, dim)
        v_rows = value.reshape(rows, keys, value.shape[-1])
        mask_rows = CudaOps._padding_rows(key_padding_mask, heads)
        drop_rows = None
        if keep is not None:
            drop_rows = keep.reshape(rows, num_clusters, keys)
        scale_drop = 1.0 / (1.0 - dropout_p) if keep is not None else 1.0
        return k_rows, v_rows, mask_rows, drop_rows, scale_drop

    @staticmethod
    def _padding_rows(key_padding_mask: Optional[Tensor], heads: int) -> Optional[Tensor]:
        """``key_padding_mask (B, S)`` as bool ``(B H, S)``, one row per (batch, head); None for None."""
        if key_padding_mask is None:
            return None
        return key_padding_mask.to(torch.bool).repeat_interleave(heads, dim=0)

    @staticmethod
    def _chunk_logits(qbar, k_chunk, mask_chunk, scale):
        """fp32 logits ``scale qbar k^T`` of one row chunk, -inf at the keys ``mask_chunk (rows, S)`` marks."""
        logits = torch.bmm(qbar, k_chunk.transpose(1, 2)) * scale
        if mask_chunk is not None:
            logits.masked_fill_(mask_chunk[:, None, :], float("-inf"))
        return logits

    @staticmethod
    def _logsumexp_or_inf(logits):
        """The log-sum-exp of each row of ``logits``, +inf for a row without a valid key (so that its
        probabilities ``exp(logit - lse)`` are 0, not NaN)."""
        lse = torch.logsumexp(logits, dim=-1)
        return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)

    @staticmethod
    def _chunk_probs(qbar, k_chunk, mask_chunk, scale, lse=None):
        """fp32 logits and probabilities of one row chunk; lse (+inf for empty rows)."""
        logits = CudaOps._chunk_logits(qbar, k_chunk, mask_chunk, scale)
        if lse is None:
            lse = CudaOps._logsumexp_or_inf(logits)
        probs = torch.exp(logits - lse.unsqueeze(-1))
        return logits, probs, lse

    # ------------------------------------------------------------ clustered

    def clustered_fwd(self, query, key, value, assignments, key_padding_mask, keep, num_clusters, scale, dropout_p):
        why = self._why_not(query, value, improved=False)
        if why is not None:
            warn_fallback("clustered_attention_fwd", why)
            out, lse = reference.clustered_attention_fwd_ref(
                query, key, value, assignments, key_padding_mask, keep, num_clusters, scale, dropout_p)
            out = custom_ops.laid_out_as(out, custom_ops.attention_output_like(query, out.shape[-1], out.dtype))
            return out, lse, reference.cluster_centroids_ref(query, assignments, num_clusters)
        out = custom_ops.attention_output_like(query, value.shape[-1])
        return self.graphs.run("clustered_attention_fwd", self._clustered_fwd, (
            query, key, value, assignments, key_padding_mask, keep, num_clusters, scale, dropout_p, out),
            filled=(9,))

    def _clustered_fwd(self, query, key, value, assignments, key_padding_mask, keep, num_clusters, scale,
                       dropout_p, out=None):
        return self._clustered_fwd_keeping(query, key, value, assignments, key_padding_mask, keep, num_clusters,
                                           scale, dropout_p, out)[:3]

    def _clustered_fwd_keeping(self, query, key, value, assignments, key_padding_mask, keep, num_clusters, scale,
                               dropout_p, out=None, keeping=True, sort=None):
        """:meth:`_clustered_fwd`'s ``out, lse, centroids``, then what :meth:`clustered_bwd_packed` takes
        instead of the queries and the output: each cluster's output ``(B H, C, Dv)`` (what its
        members received; None without ``keeping``, for a forward no backward follows) and the sort
        of the queries by cluster (``order``, ``seg_start``). ``out``: the tensor to write the output
        into (``custom_ops.attention_output_like(query)``), or None for a new one. ``sort``: that sort
        where the clustering made it (:meth:`_cluster_queries_sorted`), else None."""
        batch, heads, length, dim = query.shape
        rows, value_dim = batch * heads, value.shape[-1]
        assignments = assignments.contiguous()
        on_triton = self._centroid_triton_ok(query, value, num_clusters)
        on_flash = self._flash_ok(query, value, key_padding_mask, keep) and not (
            on_triton and dim <= self.TRITON_FORWARD_MAX_DIM)
        tickets = None  # the Triton centroid attention's, zeroed by the centroids' segment sum
        if on_triton and not on_flash:
            tickets = self._centroid_tickets(rows, num_clusters, key, key_padding_mask, keep)
        order, seg_start, qbar = self._sorted_centroids(query, assignments, num_clusters, sort, zero=tickets)
        cluster_outputs = None  # what the members receive, in the query dtype (below, where not flash's)
        if on_flash:
            out_c, lse, _ = self._flash_fwd(qbar, key, value, scale, batch, heads)
            cluster_outputs = out_c.reshape(rows, num_clusters, value_dim)
            centroid_values = cluster_outputs.float()  # the broadcast reads fp32 rows
        elif on_triton:
            centroid_values, lse = centroid_triton.centroid_attention_fwd(
                qbar, key, value, key_padding_mask, keep, scale, dropout_p, tickets=tickets)
        else:
            centroid_values, lse = self._dense_clustered_fwd(
                qbar, key, value, key_padding_mask, keep, num_clusters, scale, dropout_p)
        if out is None:
            out = custom_ops.attention_output_like(query, value_dim)
        # the assignments were made before the segment sums' launch: ready while the attention runs
        out = self._broadcast(centroid_values, assignments, out, assignments_ready=True)
        if cluster_outputs is None and keeping:
            cluster_outputs = centroid_values.to(query.dtype)
        return (out, lse.reshape(batch, heads, num_clusters).float().contiguous(),
                qbar.reshape(batch, heads, num_clusters, dim), cluster_outputs, order, seg_start)

    @classmethod
    def _flash_fwd(cls, qbar, key, value, scale, batch, heads):
        """Centroid attention through flash: ``(out (B, H, C, Dv), lse (B, H, C), ctx for _flash_bwd)``."""
        qb = qbar.reshape(batch, heads, qbar.shape[1], qbar.shape[2]).to(key.dtype)
        return cls._attn_fwd(qb, key, value, scale)

    @staticmethod
    def _key_splits(batch_heads: int, keys: int) -> int:
        """How many key blocks the centroid attention's forward is split into.

        With C <= 128 centroids flash runs one thread block per (batch, head): 32 blocks
        for the benchmark shape, a quarter of an H100. Splitting the keys into blocks
        (each >= 1024 keys) treated as extra heads, then merging the partial outputs
        by their log-sum-exps, fills the GPU (flash-decoding's idea).
        """
        splits = 1
        while (batch_heads * splits * 2 <= 2 * 132 and keys % (splits * 2) == 0
               and keys // (splits * 2) >= 1024):
            splits *= 2
        return splits

    @classmethod
    def _attn_fwd(cls, q, k, v, scale):
        """Exact attention of ``q (B, H, C, D)`` over ``k, v``; returns out, lse (fp32) and a backward context."""
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        batch, heads, clusters, dim = q.shape
        keys = k.shape[2]
        splits = cls._key_splits(batch * heads, keys)
        if splits == 1:
            out, lse = flash_forward(q, k, v, scale)
        else:
            block = keys // splits
            k_s = k.reshape(batch, heads * splits, block, dim)
            v_s = v.reshape(batch, heads * splits, block, v.shape[-1])
            q_s = q.unsqueeze(2).expand(batch, heads, splits, clusters, dim).reshape(batch, heads * splits, clusters, dim)
            out, lse = merge_key_splits(*flash_forward(q_s, k_s, v_s, scale), heads, splits)
        return out, lse, (q, k, v, scale, out, lse)

    @staticmethod
    def _attn_ctx(q, k, v, scale, out, lse):
        """The backward context of :meth:`_attn_fwd` from its known output and log-sum-exp,
        without running it."""
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        return q, k, v, scale, out, lse

    @staticmethod
    def _attn_bwd(grad_out, ctx):
        """Gradients (dq, dk, dv) of :meth:`_attn_fwd` for ``grad_out`` (same dtype as q).

        Flash's backward needs only the output and the log-sum-exp of the whole rows,
        so it runs unsplit (it parallelises over key blocks itself).
        """
        q, k, v, scale, out, lse = ctx
        return flash_backward(grad_out.contiguous(), q, k, v, out, lse, scale)

    def _dense_clustered_fwd(self, qbar, key, value, key_padding_mask, keep, num_clusters, scale, dropout_p):
        k_rows, v_rows, mask_rows, drop_rows, scale_drop = self._dense_inputs(
            key, value, key_padding_mask, keep, num_clusters, dropout_p)
        rows, keys = k_rows.shape[:2]
        centroid_values = qbar.new_empty(rows, num_clusters, v_rows.shape[-1])
        lse = qbar.new_empty(rows, num_clusters)
        for r0, r1 in _row_chunks(rows, num_clusters, keys):
            mask_c = None if mask_rows is None else mask_rows[r0:r1]
            _, probs, lse_c = self._chunk_probs(qbar[r0:r1], k_rows[r0:r1].float(), mask_c, scale)
            if drop_rows is not None:
                probs = probs * drop_rows[r0:r1] * scale_drop
            centroid_values[r0:r1] = torch.bmm(probs, v_rows[r0:r1].float())
            lse[r0:r1] = lse_c
        return centroid_values, lse

    def clustered_bwd(self, grad_out, query, key, value, assignments, key_padding_mask, keep, out, lse, centroids,
                      num_clusters, scale, dropout_p):
        """Gradients; ``out`` and ``centroids`` are the forward's, so neither the centroids nor
        (on the flash path) the centroid attention's output are computed again."""
        why = self._why_not(query, value, improved=False)
        if why is not None:
            warn_fallback("clustered_attention_bwd", why)
            grads = reference.clustered_attention_bwd_ref(
                grad_out, query, key, value, assignments, key_padding_mask, keep, lse, num_clusters, scale, dropout_p)
            return tuple(custom_ops.laid_out_as(g, x) for g, x in zip(grads, (query, key, value)))
        # dq (and dk, dv where the Triton centroid backward makes them) are written into tensors of the
        # caller's (graph_cache's "filled")
        dk, dv = self._key_gradients_to_fill(query, key, value, num_clusters)
        return self.graphs.run("clustered_attention_bwd", self._clustered_bwd, (
            grad_out, query, key, value, assignments, key_padding_mask, keep, out, lse, centroids, num_clusters,
            scale, dropout_p, torch.empty_like(query), dk, dv), filled=(13, 14, 15))

    def _clustered_bwd(self, grad_out, query, key, value, assignments, key_padding_mask, keep, out, lse, centroids,
                       num_clusters, scale, dropout_p, dq, dk=None, dv=None):
        assignments = assignments.contiguous()
        order, seg_start = self._sort_by_cluster(assignments, num_clusters)
        return self._clustered_bwd_sorted(
            grad_out, dq, key, value, assignments, key_padding_mask, keep, lse, centroids,
            self._cluster_outputs(out, order, seg_start, num_clusters), order, seg_start, num_clusters, scale,
            dropout_p, dk, dv)

    def _centroid_bwd_on_triton(self, query, value, num_clusters) -> bool:
        """Whether the clustered backward takes the centroids' attention backward from the Triton
        kernel (:func:`centroid_triton.centroid_attention_bwd`, which writes dk / dv where it is told)
        rather than from flash (which allocates them) or the dense fp32 products: wherever the kernel
        takes the inputs. Without padding and dropout flash could take them too, but in a cached
        graph its dk / dv are the graph's own buffers and are copied out at every replay, and its
        backward alone was slower as well: at 4k / 8k / 16k keys (32 rows, C = 100, D = 64, bf16,
        graph replays) the kernel with dk / dv written in place took 79 / 119 / 198 us (72 / 107 / 175
        at the 128-key launch it has now), flash's backward 93 / 160 / 288 and 112 / 192 / 355 with
        the copies (benchmarks/centroid_backward.py; benchmarks/NOTES.md, twenty-fourth session)."""
        return self._per_kind(
            ("centroid_bwd_on_triton", query.dtype, query.is_cuda, query.shape[-1], value.shape[-1], num_clusters),
            lambda: self._centroid_triton_ok(query, value, num_clusters))

    def _key_gradients_to_fill(self, query, key, value, num_clusters):
        """``(dk, dv)``: empty tensors for the clustered backward's key and value gradients where it
        writes them itself (:meth:`_centroid_bwd_on_triton`), handed to its composition as "filled"
        arguments so that a graph writes them where the caller gets them; else ``(None, None)``."""
        if not self._centroid_bwd_on_triton(query, value, num_clusters):
            return None, None
        return centroid_triton.gradient_like(key), centroid_triton.gradient_like(value)

    def _clustered_bwd_sorted(self, grad_out, dq, key, value, assignments, key_padding_mask, keep, lse, centroids,
                              cluster_outputs, order, seg_start, num_clusters, scale, dropout_p, dk=None, dv=None):
        """The gradients, given the queries' sort by cluster, each cluster's output ``(B H, C, Dv)``
        and an empty ``dq (B, H, N, D)`` in the layout wanted (it stands for the queries in the
        checks: only their shape and dtype matter here). ``dk``, ``dv``: empty key and value
        gradients (:meth:`_key_gradients_to_fill`) where the Triton centroid backward writes them,
        else None."""
        batch, heads, length, dim = dq.shape
        rows, value_dim = batch * heads, value.shape[-1]
        counts = _member_counts(seg_start)
        qbar = centroids.reshape(rows, num_clusters, dim).float()
        grad_centroid_values = self.ext.segment_sum(grad_out, order, seg_start, False)  # (rows, C, Dv)
        if dk is not None:  # _centroid_bwd_on_triton
            grad_centroids, dk, dv = centroid_triton.centroid_attention_bwd(
                grad_centroid_values, cluster_outputs, qbar, key, value, key_padding_mask, keep,
                lse.reshape(rows, num_clusters), scale, dropout_p, grad_key=dk, grad_value=dv)
        elif self._flash_ok(dq, value, key_padding_mask, keep):
            qb = qbar.reshape(batch, heads, num_clusters, dim).to(key.dtype)
            ctx = self._attn_ctx(qb, key, value, scale,
                                 cluster_outputs.reshape(batch, heads, num_clusters, value_dim),
                                 lse.float().contiguous())
            grad_c = grad_centroid_values.reshape(batch, heads, num_clusters, value_dim).to(dq.dtype)
            dqb, dk, dv = self._attn_bwd(grad_c, ctx)
            grad_centroids = dqb.reshape(rows, num_clusters, dim).float()
        else:
            grad_centroids, dk, dv = self._dense_clustered_bwd(
                grad_centroid_values, qbar, key, value, key_padding_mask, keep, lse, num_clusters, scale, dropout_p)
            dk = dk.reshape(key.shape).to(key.dtype)
            dv = dv.reshape(value.shape).to(value.dtype)
        grad_centroids = grad_centroids / counts.clamp(min=1).unsqueeze(-1)
        dq = self._broadcast(grad_centroids, assignments.contiguous(), dq)
        # the Triton kernels write dk, dv in these layouts already (no copy); flash and the dense path may not
        return dq, custom_ops.laid_out_as(dk, key), custom_ops.laid_out_as(dv, value)

    def _broadcast(self, rows: Tensor, assignments: Tensor, out: Tensor, assignments_ready: bool = False) -> Tensor:
        """``out (B, H, N, E)`` filled with the row ``rows[b * H + h, assignments[b, h, n]]`` of
        ``rows (B H, C, E)`` (zeros for -1), in ``out``'s own layout: the caller's, so that a model's
        ``(B, H, N, E)`` views of ``(N, B, H E)`` tensors get results that fold back without a copy.
        ``assignments_ready``: the assignments were written before the last kernel ahead of this call
        began, not by it (the extension's ``broadcast_into`` then reads them while that kernel runs)."""
        if out.stride(-1) != 1:  # the kernel writes rows with a contiguous feature dim
            return out.copy_(self.ext.broadcast(rows.contiguous(), assignments, out.dtype))
        self.ext.broadcast_into(rows.contiguous(), assignments, out, assignments_ready)
        return out

    @staticmethod
    def _cluster_outputs(out, order, seg_start, num_clusters) -> Tensor:
        """Each cluster's attention output ``(rows, C, Dv)``, read from ``out (B, H, N, Dv)`` at the
        cluster's first member: what its members received (empty clusters read any row; their
        gradients are zero)."""
        batch, heads, length, value_dim = out.shape
        first = order.gather(1, seg_start[:, :num_clusters].clamp(max=length - 1).to(torch.int64))
        # Indexed per (batch, head), not through out.reshape(B H, N, Dv): in the layout of a model's
        # (N, B, H Dv) tensors that reshape is a view, in others a copy of the whole output.
        b = torch.arange(batch, device=out.device).view(batch, 1, 1)
        h = torch.arange(heads, device=out.device).view(1, heads, 1)
        return out[b, h, first.view(batch, heads, num_clusters)].reshape(batch * heads, num_clusters, value_dim)

    def _dense_clustered_bwd(self, grad_cv, qbar, key, value, key_padding_mask, keep, lse, num_clusters, scale,
                             dropout_p):
        k_rows, v_rows, mask_rows, drop_rows, scale_drop = self._dense_inputs(
            key, value, key_padding_mask, keep, num_clusters, dropout_p)
        rows, keys = k_rows.shape[:2]
        lse_rows = lse.reshape(rows, num_clusters).float()
        grad_centroids = qbar.new_empty(qbar.shape)
        dk = qbar.new_empty(rows, keys, k_rows.shape[-1])
        dv = qbar.new_empty(rows, keys, v_rows.shape[-1])
        for r0, r1 in _row_chunks(rows, num_clusters, keys):
            k_c, v_c = k_rows[r0:r1].float(), v_rows[r0:r1].float()
            mask_c = None if mask_rows is None else mask_rows[r0:r1]
            _, probs, _ = self._chunk_probs(qbar[r0:r1], k_c, mask_c, scale, lse_rows[r0:r1])
            g = grad_cv[r0:r1]
            weights = probs
            grad_weights = torch.bmm(g, v_c.transpose(1, 2))
            if drop_rows is not None:
                drop = drop_rows[r0:r1] * scale_drop
                weights = probs * drop
                grad_weights = grad_weights * drop
            dv[r0:r1] = torch.bmm(weights.transpose(1, 2), g)
            grad_logits = probs * (grad_weights - (probs * grad_weights).sum(-1, keepdim=True)) * scale
            dk[r0:r1] = torch.bmm(grad_logits.transpose(1, 2), qbar[r0:r1])
            grad_centroids[r0:r1] = torch.bmm(grad_logits, k_c)
        return grad_centroids, dk, dv

    # ---------------------------------------------------- improved clustered

    def improved_fwd(self, query, key, value, assignments, key_padding_mask, keep, num_clusters, topk, scale,
                     dropout_p):
        why = self._why_not(query, value, improved=True)
        if why is not None:
            warn_fallback("improved_clustered_attention_fwd", why)
            out, lse, top_index = reference.improved_clustered_attention_fwd_ref(
                query, key, value, assignments, key_padding_mask, keep, num_clusters, topk, scale, dropout_p)
            return out, lse, top_index, reference.cluster_centroids_ref(query, assignments, num_clusters)
        out = self._improved_query_sized_to_fill(query, value, key_padding_mask, keep, num_clusters)
        return self.graphs.run("improved_clustered_attention_fwd", self._improved_fwd, (
            query, key, value, assignments, key_padding_mask, keep, num_clusters, topk, scale, dropout_p, out),
            filled=(10,))

    def _improved_query_sized_to_fill(self, query, value, key_padding_mask, keep, num_clusters):
        """A contiguous empty tensor like the queries where the improved composition writes its output
        (forward) or query gradient (backward) into one (the Triton exact products on the flash path
        and its Triton form), handed to it as a "filled" argument; else None (its kernels make their own)."""
        if self._improved_route(query, value, key_padding_mask, keep, num_clusters).exact_on_triton:
            return _dense_like(query)
        return None

    def _improved_fwd(self, query, key, value, assignments, key_padding_mask, keep, num_clusters, topk, scale,
                      dropout_p, out=None):
        return self._improved_fwd_keeping(query, key, value, assignments, key_padding_mask, keep, num_clusters, topk,
                                          scale, dropout_p, out)[:4]

    def _improved_fwd_keeping(self, query, key, value, assignments, key_padding_mask, keep, num_clusters, topk,
                              scale, dropout_p, out=None, sort=None):
        """:meth:`_improved_fwd`'s ``out, lse, top_index, centroids``, then, on the flash path (and
        its Triton form for key padding and dropout), what :meth:`improved_bwd_packed` takes
        besides: the centroids' attention output (flash's ``(B, H, C, Dv)``, the Triton kernels'
        ``(B H, C, Dv)`` fp32) and log-sum-exp (so that the backward need not run that forward
        again) and the sort of the queries by cluster (``order``, ``seg_start``). ``out``: a
        contiguous tensor like the queries for the Triton exact products to write the output into
        (the other paths make their own), or None. ``sort``: as :meth:`_clustered_fwd_keeping`'s."""
        batch, heads, length, dim = query.shape
        keys = key.shape[2]
        top_k = min(topk, keys)
        assignments = assignments.contiguous()
        route = self._improved_route(query, value, key_padding_mask, keep, num_clusters)
        tickets = None  # the Triton centroid attention's, zeroed by the centroids' segment sum (as the clustered's)
        if route.flash_path and route.centroids_on_triton:
            tickets = self._centroid_tickets(batch * heads, num_clusters, key, key_padding_mask, keep)
        order, seg_start, qbar = self._sorted_centroids(query, assignments, num_clusters, sort, zero=tickets)
        centroids = qbar.reshape(batch, heads, num_clusters, dim)  # for the backward
        if route.flash_path:
            out, lse, top, centroid_values, centroid_lse = self._improved_fwd_flash(
                route, query, key, value, assignments, order, seg_start, qbar, num_clusters, top_k, scale,
                key_padding_mask, keep, dropout_p, out, tickets)
            return out, lse, top, centroids, centroid_values, centroid_lse, order, seg_start
        k_rows, v_rows, mask_rows, drop_rows, scale_drop = self._dense_inputs(
            key, value, key_padding_mask, keep, num_clusters, dropout_p)
        rows = batch * heads
        lse = qbar.new_empty(rows, num_clusters)
        mass = qbar.new_empty(rows, num_clusters)
        rest = qbar.new_empty(rows, num_clusters, dim)
        top_index = torch.empty(rows, num_clusters, top_k, dtype=torch.int64, device=query.device)
        drop_top = None if drop_rows is None else qbar.new_empty(rows, num_clusters, top_k)
        for r0, r1 in _row_chunks(rows, num_clusters, keys):
            mask_c = None if mask_rows is None else mask_rows[r0:r1]
            logits, probs, lse_c = self._chunk_probs(qbar[r0:r1], k_rows[r0:r1].float(), mask_c, scale)
            top = torch.topk(logits, top_k, dim=-1).indices
            top_probs = probs.gather(-1, top)
            if mask_c is not None:
                top_probs = top_probs * (~mask_c[:, None, :].expand(-1, num_clusters, -1)).gather(-1, top)
            rest_weights = probs.scatter(-1, top, 0.0)
            if drop_rows is not None:
                drop = drop_rows[r0:r1] * scale_drop
                rest_weights = rest_weights * drop
                drop_top[r0:r1] = drop.gather(-1, top)
            rest[r0:r1] = torch.bmm(rest_weights, v_rows[r0:r1].float())
            mass[r0:r1] = top_probs.sum(-1)
            lse[r0:r1] = lse_c
            top_index[r0:r1] = top
        mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
        out = self.ext.improved_exact_fwd(query, key, value, None, assignments, order, top_index, mask, drop_top,
                                          mass, rest, scale)
        return (out, lse.reshape(batch, heads, num_clusters),
                top_index.reshape(batch, heads, num_clusters, top_k), centroids)

    def improved_bwd(self, grad_out, query, key, value, assignments, key_padding_mask, keep, lse, top_index,
                     centroids, num_clusters, scale, dropout_p):
        """Gradients; ``centroids`` are the forward's (not computed again)."""
        why = self._why_not(query, value, improved=True)
        if why is not None:
            warn_fallback("improved_clustered_attention_bwd", why)
            return reference.improved_clustered_attention_bwd_ref(
                grad_out, query, key, value, assignments, key_padding_mask, keep, lse, top_index, num_clusters,
                scale, dropout_p)
        return self.graphs.run("improved_clustered_attention_bwd", self._improved_bwd, (
            grad_out, query, key, value, assignments, key_padding_mask, keep, lse, top_index, centroids,
            num_clusters, scale, dropout_p,
            *self._improved_gradients_to_fill(query, key, value, key_padding_mask, keep, num_clusters)),
            filled=(13, 14, 15))

    def _improved_gradients_to_fill(self, query, key, value, key_padding_mask, keep, num_clusters):
        """``(dq, dk, dv)`` for the improved backward to write into, handed to its composition as "filled"
        arguments: ``dq`` as :meth:`_improved_query_sized_to_fill` gives it; ``dk``, ``dv`` empty tensors
        where its Triton path writes them (the centroids' backward, then the top keys' parts summed over
        them), else None."""
        dq = self._improved_query_sized_to_fill(query, value, key_padding_mask, keep, num_clusters)
        if not self._improved_route(query, value, key_padding_mask, keep, num_clusters).all_triton:
            return dq, None, None
        return dq, centroid_triton.gradient_like(key), centroid_triton.gradient_like(value)

    def _improved_bwd(self, grad_out, query, key, value, assignments, key_padding_mask, keep, lse, top_index,
                      centroids, num_clusters, scale, dropout_p, dq=None, dk=None, dv=None):
        """``dq``, ``dk``, ``dv``: as :meth:`_improved_bwd_flash`'s."""
        batch, heads, length, dim = query.shape
        keys = key.shape[2]
        rows = batch * heads
        top_k = top_index.shape[-1]
        assignments = assignments.contiguous()
        order, seg_start = self._sort_by_cluster(assignments, num_clusters)
        counts = _member_counts(seg_start)
        qbar = centroids.reshape(rows, num_clusters, dim).float().contiguous()
        if self._improved_route(query, value, key_padding_mask, keep, num_clusters).flash_path:
            return self._improved_bwd_flash(grad_out, query, key, value, assignments, order, seg_start, counts, qbar,
                                            lse, top_index, num_clusters, scale, None, key_padding_mask, keep,
                                            dropout_p, dq, dk, dv)
        k_rows, v_rows, mask_rows, drop_rows, scale_drop = self._dense_inputs(
            key, value, key_padding_mask, keep, num_clusters, dropout_p)
        top = top_index.reshape(rows, num_clusters, top_k).contiguous()
        lse_rows = lse.reshape(rows, num_clusters).float()
        mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()

        # Mass on the top keys, from the top logits alone.
        top_keys = k_rows.gather(1, top.reshape(rows, -1, 1).expand(-1, -1, dim))
        top_keys = top_keys.reshape(rows, num_clusters, top_k, dim).float()
        top_logits = torch.einsum("rcd,rckd->rck", qbar, top_keys) * scale
        top_valid = None
        if mask_rows is not None:
            top_valid = (~mask_rows).gather(1, top.reshape(rows, -1)).reshape(rows, num_clusters, top_k)
            top_logits = top_logits.masked_fill(~top_valid, float("-inf"))
        mass = torch.exp(top_logits - lse_rows.unsqueeze(-1)).sum(-1)
        drop_top = None
        if drop_rows is not None:
            drop_top = (drop_rows.gather(-1, top).float() * scale_drop).contiguous()

        grad_rest = self.ext.segment_sum(grad_out, order, seg_start, False)  # (rows, C, D)
        gm = self.ext.improved_exact_fwd(query, key, value, grad_out, assignments, order, top, mask, drop_top,
                                         mass, grad_rest, scale)  # (rows, N): grad_out_i . exact_i
        grad_mass = self.ext.segment_sum(gm.reshape(batch, heads, length, 1), order, seg_start, False)
        grad_mass = grad_mass.reshape(rows, num_clusters, 1)
        if top_valid is not None:
            grad_mass_top = grad_mass.expand(-1, -1, top_k) * top_valid
        else:
            grad_mass_top = grad_mass.expand(-1, -1, top_k)

        dk32 = qbar.new_empty(rows, keys, dim)
        dv32 = qbar.new_empty(rows, keys, dim)
        dq_bar = qbar.new_empty(qbar.shape)
        for r0, r1 in _row_chunks(rows, num_clusters, keys):
            k_c, v_c = k_rows[r0:r1].float(), v_rows[r0:r1].float()
            mask_c = None if mask_rows is None else mask_rows[r0:r1]
            _, probs, _ = self._chunk_probs(qbar[r0:r1], k_c, mask_c, scale, lse_rows[r0:r1])
            top_c = top[r0:r1]
            g = grad_rest[r0:r1]
            rest_weights = probs.scatter(-1, top_c, 0.0)
            grad_probs = torch.bmm(g, v_c.transpose(1, 2)).scatter_(-1, top_c, 0.0)
            if drop_rows is not None:
                drop = drop_rows[r0:r1] * scale_drop
                rest_weights = rest_weights * drop
                grad_probs = grad_probs * drop
            dv32[r0:r1] = torch.bmm(rest_weights.transpose(1, 2), g)
            grad_probs.scatter_add_(-1, top_c, grad_mass_top[r0:r1])
            grad_logits = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True)) * scale
            dk32[r0:r1] = torch.bmm(grad_logits.transpose(1, 2), qbar[r0:r1])
            dq_bar[r0:r1] = torch.bmm(grad_logits, k_c)
        dq_bar = (dq_bar / counts.clamp(min=1).unsqueeze(-1)).contiguous()
        dq = self.ext.improved_exact_bwd(grad_out, query, key, value, assignments, order, top, mask, drop_top,
                                         mass.contiguous(), dq_bar, scale, dk32, dv32)
        return dq, dk32.reshape(key.shape).to(key.dtype), dv32.reshape(value.shape).to(value.dtype)

    def _improved_bwd_kept(self, grad_out, query, key, value, assignments, key_padding_mask, keep, lse, top_index,
                           centroids, centroid_outputs, centroid_lse, order, seg_start, num_clusters, scale,
                           dropout_p, dq=None, dk=None, dv=None):
        batch, heads, _, dim = query.shape
        counts = _member_counts(seg_start)
        qbar = centroids.reshape(batch * heads, num_clusters, dim).float().contiguous()
        return self._improved_bwd_flash(grad_out, query, key, value, assignments.contiguous(), order, seg_start,
                                        counts, qbar, lse, top_index, num_clusters, scale,
                                        (centroid_outputs, centroid_lse), key_padding_mask, keep, dropout_p, dq,
                                        dk, dv)

    # Without key padding and dropout the improved variant needs no (C, S) matrix in
    # the backward and only fp32 logits (for the top-k selection and lse) in the
    # forward: with V_bar = A V from flash attention, the remainder is
    # R_j = V_bar_j - sum_{t in T_j} A_jt v_t, and the backward splits into flash's
    # backward for V_bar, a sparse part on the C x K top entries, and a dense
    # correction -c_j A_jl from the top entries' dependence on lse_j. On the Triton
    # centroid kernels that correction is c_j added to the row's rowsum(dO * O), in
    # the same pass over the keys as V_bar's backward; otherwise its products A K and
    # A^T X come from one more flash forward / backward over (Qbar, K, K).
    #
    # Key padding and dropout keep that algebra: padded keys leave the softmax (and the top
    # keys, unless a centroid has fewer valid ones), and with the dropout factors z_jl of the
    # centroid rows V_bar_j = sum_l A_jl z_jl v_l, R_j = V_bar_j - sum_{t in T_j} A_jt z_jt v_t,
    # and the exact part weighs its softmax by z_jt. V_bar and its backward (with the lse term)
    # then come from the Triton centroid kernels, which take both masks, instead of flash.

    @staticmethod
    def _top_rows(rows_tensor, top):
        """Gather ``rows_tensor (rows, S, E)`` at ``top (rows, C, K)`` -> fp32 ``(rows, C, K, E)``."""
        rows, clusters, top_k = top.shape
        width = rows_tensor.shape[-1]
        flat = top.reshape(rows, clusters * top_k, 1).expand(-1, -1, width)
        return rows_tensor.gather(1, flat).reshape(rows, clusters, top_k, width).float()

    def _exact_top_keys_fwd(self, query, key, value, grad_out, assignments, order, seg_start, top, mass, rest,
                            scale, masks=(None, None, 0.0), out=None):
        """The flash path's exact top-key part (tensor cores in Triton where it can, else the
        extension's kernel, which the routing gives no ``masks``): ``out`` (``grad_out`` None; the
        Triton kernel writes into ``out`` where given) or ``grad_out . exact`` per query.
        ``masks``: ``(key_padding_mask, keep, dropout_p)``."""
        if improved_triton.triton_exact_unavailable(query, value) is None:
            return improved_triton.exact_top_keys_fwd(query, key, value, order, seg_start, top, mass, rest, scale,
                                                      grad_out, *masks, out=out)
        return self.ext.improved_exact_fwd(query, key, value, grad_out, assignments, order, top, None, None,
                                           mass.contiguous(), rest.contiguous(), scale)

    @staticmethod
    def _top_keys_in_chunks(qbar, key, key_padding_mask, scale, top_k):
        """:func:`improved_triton.centroid_top_keys`'s ``lse (rows, C)`` (+inf for a centroid without a
        valid key) and ``top (rows, C, top_k)``, from fp32 ``(C, S)`` logits in row chunks (torch's
        log-sum-exp and top-k), where its selection kernel does not take ``top_k``."""
        batch, heads, keys, dim = key.shape
        rows, num_clusters = qbar.shape[:2]
        k_rows = key.reshape(rows, keys, dim)
        mask_rows = CudaOps._padding_rows(key_padding_mask, heads)
        lse = qbar.new_empty(rows, num_clusters)
        top = torch.empty(rows, num_clusters, top_k, dtype=torch.int64, device=key.device)
        for r0, r1 in _row_chunks(rows, num_clusters, keys):
            logits = CudaOps._chunk_logits(qbar[r0:r1], k_rows[r0:r1].float(),
                                           None if mask_rows is None else mask_rows[r0:r1], scale)
            lse[r0:r1] = CudaOps._logsumexp_or_inf(logits)
            top[r0:r1] = torch.topk(logits, top_k, dim=-1).indices
        return lse, top

    def _improved_fwd_flash(self, route, query, key, value, assignments, order, seg_start, qbar, num_clusters,
                            top_k, scale, key_padding_mask=None, keep=None, dropout_p=0.0, out=None, tickets=None):
        """``out, lse (B, H, C), top (B, H, C, k)`` and the centroids' attention output (flash's
        ``(B, H, C, Dv)``; where ``route.centroids_on_triton``, the Triton kernel's ``(B H, C, Dv)``
        fp32) and log-sum-exp. ``route``: the caller's :meth:`_improved_route` of these inputs (its
        ``flash_path``). ``out``: as :meth:`_improved_fwd_keeping`'s. ``tickets``:
        the Triton centroid attention's zeroed tickets (``centroid_triton.centroid_attention_fwd``), or
        None for it to make its own."""
        batch, heads, length, dim = query.shape
        rows, keys = batch * heads, key.shape[2]
        k_rows = key.reshape(rows, keys, dim)
        v_rows = value.reshape(rows, keys, dim)
        masks = (key_padding_mask, keep, dropout_p)
        # (key padding and dropout are routed here only with the Triton kernels)
        on_triton = route.exact_on_triton
        if on_triton and improved_triton.selection_unavailable(top_k, dim) is None:  # no (C, S) logits
            lse, top = improved_triton.centroid_top_keys(qbar, k_rows, scale, top_k, key_padding_mask)
        else:
            lse, top = self._top_keys_in_chunks(qbar, key, key_padding_mask, scale, top_k)
        if route.centroids_on_triton:
            # as the clustered forward's (TRITON_FORWARD_MAX_DIM): one launch, fp32 values for the summary
            out_c, flash_lse = centroid_triton.centroid_attention_fwd(qbar, key, value, key_padding_mask, keep,
                                                                      scale, dropout_p, tickets=tickets)
            centroid_values = out_c
        else:
            out_c, flash_lse, _ = self._flash_fwd(qbar, key, value, scale, batch, heads)
            centroid_values = out_c.reshape(rows, num_clusters, dim).float()
        if on_triton:  # no gathered copies
            mass, rest = improved_triton.top_key_summary(qbar, k_rows, v_rows, top, lse, scale, centroid_values,
                                                         *masks)
        else:
            top_probs = torch.exp(torch.einsum("rcd,rckd->rck", qbar, self._top_rows(k_rows, top)) * scale
                                  - lse.unsqueeze(-1))
            mass = top_probs.sum(-1)
            rest = centroid_values - torch.einsum("rck,rckd->rcd", top_probs, self._top_rows(v_rows, top))
        out = self._exact_top_keys_fwd(query, key, value, None, assignments, order, seg_start, top, mass, rest,
                                       scale, masks, out)
        return (out, lse.reshape(batch, heads, num_clusters), top.reshape(batch, heads, num_clusters, top_k), out_c,
                flash_lse)

    def _improved_bwd_flash(self, grad_out, query, key, value, assignments, order, seg_start, counts, qbar, lse,
                            top_index, num_clusters, scale, centroid_flash=None, key_padding_mask=None, keep=None,
                            dropout_p=0.0, dq=None, dk=None, dv=None):
        """The flash path's gradients; ``centroid_flash``: the forward's ``(out, lse)`` of the
        centroids' attention (as :meth:`_improved_fwd_flash` returns them), or None to run it
        again. Key padding and dropout (``keep``, ``dropout_p``) are routed here only where the
        Triton kernels take every step (:meth:`_improved_triton_ok`). ``dq``: a contiguous tensor
        like the queries for the Triton exact products to write the query gradient into (the
        extension's kernel makes its own), or None. ``dk``, ``dv``: tensors to write the key and
        value gradients into where the Triton kernels take every step
        (:meth:`_improved_gradients_to_fill`), or None."""
        batch, heads, length, dim = query.shape
        rows, keys = batch * heads, key.shape[2]
        top_k = top_index.shape[-1]
        k_rows = key.reshape(rows, keys, dim)
        v_rows = value.reshape(rows, keys, dim)
        top = top_index.reshape(rows, num_clusters, top_k).contiguous()
        lse_rows = lse.reshape(rows, num_clusters).float()
        masks = (key_padding_mask, keep, dropout_p)
        masked = key_padding_mask is not None or keep is not None
        # The top keys' part in Triton where it can (no gathered (rows, C, top_k, D) copies of the
        # top key and value rows), else in torch.
        fused_top = improved_triton.triton_exact_unavailable(query, value) is None
        if fused_top:
            mass, _ = improved_triton.top_key_summary(qbar, k_rows, v_rows, top, lse_rows, scale, None, *masks)
        else:
            top_keys, top_values = self._top_rows(k_rows, top), self._top_rows(v_rows, top)
            top_probs = torch.exp(torch.einsum("rcd,rckd->rck", qbar, top_keys) * scale - lse_rows.unsqueeze(-1))
            mass = top_probs.sum(-1).contiguous()

        grad_rest = self.ext.segment_sum(grad_out, order, seg_start, False)  # G_j (rows, C, D)
        gm = self._exact_top_keys_fwd(query, key, value, grad_out, assignments, order, seg_start, top, mass,
                                      grad_rest, scale, masks)  # grad_out_i . exact_i
        grad_mass = self.ext.segment_sum(gm.reshape(batch, heads, length, 1), order, seg_start, False)
        # The top keys' gradients (sparse; the exact part's kernel adds into them too), in
        # fp32, added to the dense pass's key and value gradients at the end.
        dk32 = qbar.new_zeros(rows, keys, dim)
        dv32 = qbar.new_zeros(rows, keys, dim)

        # Top entries: f = sum_j gm_j m_j - G_j . sum_t A_jt v_t, so df/dA_jt = a_jt.
        if fused_top:
            c, grad_top = improved_triton.top_key_gradients(qbar, k_rows, v_rows, top, lse_rows, grad_rest,
                                                            grad_mass.reshape(rows, num_clusters), scale, dk32, dv32,
                                                            *masks)

        if fused_top and centroid_triton.triton_centroid_unavailable(query, value, num_clusters) is None:
            # Everything dense in one pass over the keys: the backward of V_bar = A V for dO = G
            # together with the lse term, which only adds c_j to each centroid's rowsum(dO * O).
            if centroid_flash is None and masked:
                centroid_flash = centroid_triton.centroid_attention_fwd(qbar, key, value, key_padding_mask, keep,
                                                                        scale, dropout_p)
            elif centroid_flash is None:
                centroid_flash = self._flash_fwd(qbar, key, value, scale, batch, heads)[:2]
            centroid_values, centroid_lse = centroid_flash
            # dk, dv: the caller's where given, which the sums below write over again
            dqb_parts, dk, dv = centroid_triton.centroid_attention_bwd(
                grad_rest, centroid_values.reshape(rows, num_clusters, dim), qbar, key, value, key_padding_mask,
                keep, centroid_lse.reshape(rows, num_clusters), scale, dropout_p, lse_weight=c, partial_qbar=True,
                grad_key=dk, grad_value=dv)
            dq_bar, _ = improved_triton.centroid_gradients(
                dqb_parts.reshape(batch, heads, *dqb_parts.shape[1:]), grad_top, seg_start)
            dk_lse = None  # in dk already
        else:
            # V_bar part: flash backward with dO = G.
            if centroid_flash is None:
                _, _, ctx = self._flash_fwd(qbar, key, value, scale, batch, heads)
            else:
                ctx = self._attn_ctx(qbar.reshape(batch, heads, num_clusters, dim).to(key.dtype), key, value, scale,
                                     *centroid_flash)
            qb = ctx[0]
            dqb, dk, dv = self._attn_bwd(grad_rest.reshape(batch, heads, num_clusters, dim).to(query.dtype), ctx)
            # The dense lse term goes through a flash pass over (Qbar, K, K): A K and A^T X with
            # X = -scale c Qbar, c the top entries' weight.
            k_out, _, k_ctx = self._attn_fwd(qb, key, key, scale)
            if fused_top:
                dq_bar, x = improved_triton.centroid_gradients(dqb, grad_top, seg_start, c, k_out, qbar, scale)
            else:
                a = grad_mass - torch.einsum("rcd,rckd->rck", grad_rest, top_values)
                w = a * top_probs  # gradient of the top logits (before the lse term), / scale
                c = w.sum(-1)  # the lse term: dlogit_jl -= c_j A_jl for every key l
                flat = top.reshape(rows, num_clusters * top_k, 1).expand(-1, -1, dim)
                dv32.scatter_add_(1, flat,
                                  (-top_probs.unsqueeze(-1) * grad_rest.unsqueeze(2)).reshape(rows, -1, dim))
                dk32.scatter_add_(1, flat, (scale * w.unsqueeze(-1) * qbar.unsqueeze(2)).reshape(rows, -1, dim))
                grad_centroids = (dqb.reshape(rows, num_clusters, dim).float()
                                  + scale * torch.einsum("rck,rckd->rcd", w, top_keys)
                                  - scale * c.unsqueeze(-1) * k_out.reshape(rows, num_clusters, dim).float())
                x = (-scale * c.unsqueeze(-1) * qbar).reshape(batch, heads, num_clusters, dim).to(query.dtype)
                dq_bar = (grad_centroids / counts.clamp(min=1).unsqueeze(-1)).contiguous()
            dk_lse = self._attn_bwd(x, k_ctx)[2]  # (indexed: the other key-sized gradient is freed at once)

        # The kernels add the exact top-key parts into dk32 / dv32 in place.
        if fused_top:
            dq = improved_triton.exact_top_keys_bwd(grad_out, query, key, value, order, seg_start, top, mass, dq_bar,
                                                    scale, dk32, dv32, *masks, grad_query=dq, grad_dot=gm)
            # Summed over the dense pass's buffers, and the key side's fp32 buffer freed before the value
            # side's sum: the backward's memory peak is here.
            dk = improved_triton.sum_gradients(dk32, dk, dk_lse, reuse_first=True)
            del dk32, dk_lse
            return dq, dk, improved_triton.sum_gradients(dv32, dv, reuse_first=True)
        dq = self.ext.improved_exact_bwd(grad_out, query, key, value, assignments, order, top, None, None, mass,
                                         dq_bar, scale, dk32, dv32)
        dk32 += dk.reshape(dk32.shape).float() + dk_lse.reshape(dk32.shape).float()
        dv32 += dv.reshape(dv32.shape).float()
        return dq, dk32.reshape(key.shape).to(key.dtype), dv32.reshape(value.shape).to(value.dtype)


PACK_ALIGNMENT = 16  # bytes: each kept tensor starts on a 16-byte boundary (the copies' vector width)


@dataclass(frozen=True)
class KeptLayout:
    """Where a forward's kept tensors lie in one uint8 buffer: ``entries`` are ``(dtype, shape, byte
    offset)`` in the order of the forward's pack (:func:`kept_layout` for the clustered variant,
    :meth:`CudaOps.improved_kept_layout` for the improved one), each starting on a
    ``PACK_ALIGNMENT`` boundary; ``nbytes``: the buffer's size. Hashable: a graph's signature holds it."""
    entries: Tuple[Tuple[torch.dtype, Tuple[int, ...], int], ...]
    nbytes: int

    def __post_init__(self):
        # A graph's key is hashed at every call (the cache's lookup and its LRU move): the hash of the
        # nested entries, worked out once here, not at each of those (~1 us of Python apiece).
        object.__setattr__(self, "_hash", hash((self.entries, self.nbytes)))

    def __hash__(self) -> int:
        return self._hash

    def views(self, packed: Tensor) -> Tuple[Tensor, ...]:
        """The kept tensors: views of ``packed``."""
        return tuple(packed[offset:offset + _size(dtype, shape)].view(dtype).view(shape)
                     for dtype, shape, offset in self.entries)

    def gaps(self, packed: Tensor) -> Tuple[Tensor, ...]:
        """The bytes of ``packed`` after each kept tensor, up to the next one's start (or the end)."""
        ends = [offset for _, _, offset in self.entries[1:]] + [self.nbytes]
        return tuple(packed[offset + _size(dtype, shape):end] for (dtype, shape, offset), end in zip(self.entries, ends))


def _size(dtype: torch.dtype, shape: Tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


@functools.lru_cache(maxsize=4096)  # one per shape; fairseq's length-bucketed batches bring many
def _laid_out(parts: Tuple[Tuple[torch.dtype, Tuple[int, ...]], ...]) -> KeptLayout:
    """The :class:`KeptLayout` of ``parts``, ``(dtype, shape)`` in order, each on a ``PACK_ALIGNMENT`` boundary."""
    entries, offset = [], 0
    for dtype, shape in parts:
        entries.append((dtype, shape, offset))
        offset += -(-_size(dtype, shape) // PACK_ALIGNMENT) * PACK_ALIGNMENT
    return KeptLayout(tuple(entries), offset)


def kept_layout(query: Tensor, value: Tensor, num_clusters: int) -> KeptLayout:
    """The :class:`KeptLayout` of a clustered forward of ``query (B, H, N, D)`` and ``value (B, H, S, Dv)``
    (:meth:`CudaOps._clustered_fwd_packing`'s order)."""
    batch, heads, length, dim = query.shape
    rows = batch * heads
    return _laid_out(((torch.float32, (batch, heads, num_clusters)),  # log-sum-exps
                      (torch.float32, (batch, heads, num_clusters, dim)),  # centroids
                      (query.dtype, (rows, num_clusters, value.shape[-1])),  # each cluster's output
                      (torch.int64, (rows, length)),  # order
                      (torch.int64, (rows, num_clusters + 1)),  # seg_start
                      (torch.int64, (batch, heads, length))))  # assignments


_ZERO_BYTES = {}


def _zero_bytes(device: torch.device) -> Tensor:
    """``PACK_ALIGNMENT`` zero bytes on ``device``, made once outside any capture (a graph reads them)."""
    zeros = _ZERO_BYTES.get(device)
    if zeros is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # else they'd live in its pool
            return torch.zeros(PACK_ALIGNMENT, dtype=torch.uint8, device=device)
        zeros = _ZERO_BYTES[device] = torch.zeros(PACK_ALIGNMENT, dtype=torch.uint8, device=device)
    return zeros


def _dense_like(query: Tensor) -> Tensor:
    """A contiguous tensor of the queries' shape and dtype: the improved op's output and query
    gradient, which the Triton exact products write into (graph_cache's "filled" arguments)."""
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


def register(extension) -> CudaOps:
    """Register the CUDA implementations of every ``fairseq_clustered::*`` op."""
    ops = CudaOps(extension)
    custom_ops.hash_codes.register_kernel("cuda")(ops.hash_codes)
    custom_ops.lloyd_kmeans.register_kernel("cuda")(ops.lloyd_kmeans)
    custom_ops.cluster_queries.register_kernel("cuda")(ops.cluster_queries)
    custom_ops.clustered_attention_fwd.register_kernel("cuda")(ops.clustered_fwd)
    custom_ops.clustered_attention_bwd.register_kernel("cuda")(ops.clustered_bwd)
    custom_ops.improved_clustered_attention_fwd.register_kernel("cuda")(ops.improved_fwd)
    custom_ops.improved_clustered_attention_bwd.register_kernel("cuda")(ops.improved_bwd)
    causal_fused.chunk_cluster_sums_op.register_kernel("cuda")(ops.chunk_cluster_sums)
    return ops
