"""The improved variant's exact top-key products on tensor cores (Triton).

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
log-sum-exp: :func:`centroid_logits` computes both in one pass on tensor cores (the fp32
centroids split into three half-precision parts, so products stay exact), instead of an
fp32 copy of the keys, an fp32 matrix product and three passes of ``torch.logsumexp``;
:func:`centroid_top_keys` then selects the top keys among the key blocks with the largest
maxima only.

Work items. Cluster ``j`` of row ``r`` has ``ceil(n_j / BLOCK_M)`` member blocks; their
count over the clusters of a row is at most ``ceil(N / BLOCK_M) + C``, so the grid is
``(ceil(N / BLOCK_M) + C, rows)`` and each program finds its (cluster, block) from the
prefix sum of the per-cluster block counts (``C`` values, one vector in registers);
programs past the row's last block return at once. No host synchronisation.

Forward (:func:`exact_top_keys_fwd`): ``out_i`` above, or, given ``grad_out``, the
per-query ``grad_out_i . exact_i`` the backward needs for the gradient of the mass.
Backward (:func:`exact_top_keys_bwd`): with ``p`` the top-key softmax and
``dp_t = mass_j grad_out_i . v_t``: ``ds = p (dp - sum_t p dp)``,
``dq_i = scale ds K_T + dq_bar_j`` (written, one writer per query),
``dK_T += scale ds^T Q``, ``dV_T += mass_j p^T grad_out`` (atomically added to fp32
buffers: clusters can share keys; the backward is therefore not bit-reproducible, as
with the CUDA kernel).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._triton import MISSING, power_of_two_in, tl, triton

__all__ = ["triton_exact_unavailable", "centroid_logits", "centroid_top_keys", "exact_top_keys_fwd",
           "exact_top_keys_bwd"]

MAX_TOP_K = 128  # BLOCK_M x top-k fp32 logits must stay in registers
MIN_TILE = 16  # tl.dot's smallest tile
LOG2E = 1.4426950408889634
# Members per program and warps; chosen on an H100 at N = 32k, D = 64, k = 32 (benchmarks/NOTES.md).
LAUNCH = {"fwd": {"BLOCK_M": 64, "num_warps": 4}, "bwd": {"BLOCK_M": 64, "num_warps": 4},
          "logits": {"BLOCK_N": 64, "BLOCK_C": 128, "num_warps": 4}}


def triton_exact_unavailable(query: Tensor, value: Tensor, top_k: int) -> Optional[str]:
    """Why the Triton exact products cannot serve these inputs (None if they can); the
    caller has already excluded key padding and dropout (the flash path)."""
    if MISSING is not None:
        return MISSING
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {query.dtype} (the Triton exact products are for fp16 / bf16)"
    dim = query.shape[-1]
    if value.shape[-1] != dim or not power_of_two_in(dim, MIN_TILE, 128):
        return f"head dim {dim} / value dim {value.shape[-1]}: both must be one power of two in 16..128"
    if top_k > MAX_TOP_K:
        return f"top-k {top_k} > {MAX_TOP_K}"
    return None


if triton is not None:

    @triton.jit
    def _work_item(SEG_START, row, num_clusters, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """-> (cluster, first sorted position, end of the cluster's positions, live) of
        this program's member block (``live`` False past the row's last block)."""
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
        return cluster, start, end, cluster < num_clusters

    @triton.jit
    def _top_softmax(q, k_top, top_ok, qk_scale):
        """Softmax over the top keys of ``q (M, D) @ k_top (K, D)^T`` -> fp32 ``(M, K)``."""
        logits = tl.dot(q, tl.trans(k_top)) * qk_scale  # log2 domain
        logits = tl.where(top_ok[None, :], logits, float("-inf"))
        probs = tl.exp2(logits - tl.max(logits, 1)[:, None])
        return probs / tl.sum(probs, 1)[:, None]

    @triton.jit
    def _exact_fwd_kernel(Q, K, V, GRAD_OUT, ORDER, SEG_START, TOP, MASS, REST, OUT, GRAD_DOT,
                          length, keys, num_clusters, top_k, qk_scale,
                          DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_C: tl.constexpr, GRAD_MODE: tl.constexpr):
        """Q, GRAD_OUT, OUT: (rows, N, DIM); K, V: (rows, S, DIM); ORDER: (rows, N) int64;
        SEG_START: (rows, C + 1) int64; TOP: (rows, C, top_k) int64; MASS: (rows, C) fp32;
        REST: (rows, C, DIM) fp32; GRAD_DOT: (rows, N) fp32. All contiguous."""
        row = tl.program_id(1).to(tl.int64)
        cluster, start, end, live = _work_item(SEG_START, row, num_clusters, BLOCK_M, BLOCK_C)
        if live:
            feats = tl.arange(0, DIM)
            positions = start + tl.arange(0, BLOCK_M)
            member = positions < end
            queries = tl.load(ORDER + row * length + positions, mask=member, other=0)
            query_rows = (row * length + queries)[:, None] * DIM + feats[None, :]
            q = tl.load(Q + query_rows, mask=member[:, None], other=0.0)
            slots = tl.arange(0, BLOCK_K)
            top_ok = slots < top_k
            top_keys = tl.load(TOP + (row * num_clusters + cluster) * top_k + slots, mask=top_ok, other=0)
            top_rows = (row * keys + top_keys)[:, None] * DIM + feats[None, :]
            k_top = tl.load(K + top_rows, mask=top_ok[:, None], other=0.0)
            v_top = tl.load(V + top_rows, mask=top_ok[:, None], other=0.0)
            probs = _top_softmax(q, k_top, top_ok, qk_scale)
            exact = tl.dot(probs.to(v_top.dtype), v_top)  # (BLOCK_M, DIM) fp32
            if GRAD_MODE:
                grad_out = tl.load(GRAD_OUT + query_rows, mask=member[:, None], other=0.0)
                tl.store(GRAD_DOT + row * length + queries, tl.sum(grad_out.to(tl.float32) * exact, 1), mask=member)
            else:
                mass = tl.load(MASS + row * num_clusters + cluster)
                rest = tl.load(REST + (row * num_clusters + cluster) * DIM + feats)
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
        cluster, start, end, live = _work_item(SEG_START, row, num_clusters, BLOCK_M, BLOCK_C)
        if live:
            feats = tl.arange(0, DIM)
            positions = start + tl.arange(0, BLOCK_M)
            member = positions < end
            queries = tl.load(ORDER + row * length + positions, mask=member, other=0)
            query_rows = (row * length + queries)[:, None] * DIM + feats[None, :]
            q = tl.load(Q + query_rows, mask=member[:, None], other=0.0)
            mass = tl.load(MASS + row * num_clusters + cluster)
            # The exact part enters the output scaled by the mass.
            grad_exact = (tl.load(GRAD_OUT + query_rows, mask=member[:, None], other=0.0).to(tl.float32)
                          * mass).to(q.dtype)
            slots = tl.arange(0, BLOCK_K)
            top_ok = slots < top_k
            top_keys = tl.load(TOP + (row * num_clusters + cluster) * top_k + slots, mask=top_ok, other=0)
            top_rows = (row * keys + top_keys)[:, None] * DIM + feats[None, :]
            k_top = tl.load(K + top_rows, mask=top_ok[:, None], other=0.0)
            v_top = tl.load(V + top_rows, mask=top_ok[:, None], other=0.0)
            probs = _top_softmax(q, k_top, top_ok, qk_scale)
            grad_probs = tl.dot(grad_exact, tl.trans(v_top))
            grad_logits = probs * (grad_probs - tl.sum(probs * grad_probs, 1)[:, None])
            grad_logits = tl.where(member[:, None], grad_logits, 0.0).to(q.dtype)
            grad_centroid = tl.load(GRAD_CENTROIDS + (row * num_clusters + cluster) * DIM + feats)
            grad_q = tl.dot(grad_logits, k_top) * scale + grad_centroid[None, :]
            tl.store(GRAD_Q + query_rows, grad_q.to(GRAD_Q.dtype.element_ty), mask=member[:, None])
            # Rows of non-members are zero in grad_logits and grad_exact: they add nothing.
            grad_k = tl.dot(tl.trans(grad_logits), q) * scale
            grad_v = tl.dot(tl.trans(probs.to(q.dtype)), grad_exact)
            tl.atomic_add(GRAD_K + top_rows, grad_k, mask=top_ok[:, None])
            tl.atomic_add(GRAD_V + top_rows, grad_v, mask=top_ok[:, None])


    @triton.jit
    def _centroid_logits_kernel(QBAR, K, LOGITS, BLOCK_MAX, BLOCK_SUM, num_clusters, keys, key_blocks, scale,
                                DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (key block, row, centroid block): ``LOGITS (rows, C, key_blocks BLOCK_N)``
        fp32 = scale qbar . k (-inf past the last key), and the block's softmax statistics
        ``BLOCK_MAX``, ``BLOCK_SUM`` ``(rows, C, key_blocks)`` (max, sum of exp(logit - max)).

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
        tile = (row * num_clusters + centroids)[:, None] * (key_blocks * BLOCK_N) + key_index[None, :]
        tl.store(LOGITS + tile, logits, mask=c_ok[:, None])
        block_max = tl.max(logits, 1)
        block_sum = tl.sum(tl.exp(logits - block_max[:, None]), 1)
        stats = (row * num_clusters + centroids) * key_blocks + block
        tl.store(BLOCK_MAX + stats, block_max, mask=c_ok)
        tl.store(BLOCK_SUM + stats, block_sum, mask=c_ok)


def centroid_logits(qbar: Tensor, key: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Scaled centroid logits, per key block, as an fp32 matrix product would give them.

    Args:
        qbar: ``(rows, C, D)`` fp32 centroids. key: ``(rows, S, D)`` fp16 / bf16.

    Returns:
        ``logits (rows, C, blocks, BLOCK_N)`` fp32 (-inf past key ``S``), each block's
        largest logit ``(rows, C, blocks)`` and the log-sum-exp over all keys ``(rows, C)``.
    """
    rows, num_clusters, dim = qbar.shape
    keys = key.shape[1]
    qbar, key = qbar.contiguous(), key.contiguous()
    options = dict(LAUNCH["logits"])
    block_n, block_c = options.pop("BLOCK_N"), min(options.pop("BLOCK_C"), _tile(num_clusters))
    key_blocks = triton.cdiv(keys, block_n)
    logits = qbar.new_empty(rows, num_clusters, key_blocks, block_n)
    block_max = qbar.new_empty(rows, num_clusters, key_blocks)
    block_sum = torch.empty_like(block_max)
    _centroid_logits_kernel[(key_blocks, rows, triton.cdiv(num_clusters, block_c))](
        qbar, key, logits, block_max, block_sum, num_clusters, keys, key_blocks, scale,
        DIM=dim, BLOCK_C=block_c, BLOCK_N=block_n, **options,
    )
    top = block_max.amax(-1, keepdim=True)
    lse = (block_sum * torch.exp(block_max - top)).sum(-1).log_() + top.squeeze(-1)
    return logits, block_max, lse


def centroid_top_keys(qbar: Tensor, key: Tensor, scale: float, top_k: int) -> Tuple[Tensor, Tensor]:
    """Each centroid's ``top_k`` keys by logit, and the log-sum-exp of its logits.

    The ``top_k`` largest logits of a row lie in at most ``top_k`` key blocks, those with
    the largest block maxima (a block whose maximum is below the ``top_k``-th largest
    logit holds none of them), so the selection runs over those blocks' logits only:
    ``top_k x BLOCK_N`` candidates instead of ``S``.

    Args:
        qbar: ``(rows, C, D)`` fp32. key: ``(rows, S, D)`` fp16 / bf16. top_k: ``<= S``.

    Returns:
        ``lse (rows, C)`` fp32 and ``top (rows, C, top_k)`` int64 key indices, largest first.
    """
    logits, block_max, lse = centroid_logits(qbar, key, scale)
    rows, num_clusters, key_blocks, block_n = logits.shape
    if top_k >= key_blocks:  # the candidates would be every key
        flat = logits.reshape(rows, num_clusters, key_blocks * block_n)
        return lse, torch.topk(flat, top_k, dim=-1).indices
    blocks = torch.topk(block_max, top_k, dim=-1).indices  # (rows, C, top_k)
    candidates = logits.gather(2, blocks.unsqueeze(-1).expand(-1, -1, -1, block_n))
    best = torch.topk(candidates.reshape(rows, num_clusters, top_k * block_n), top_k, dim=-1).indices
    return lse, blocks.gather(-1, best // block_n) * block_n + best % block_n


def _tile(size: int) -> int:
    return max(MIN_TILE, triton.next_power_of_2(size))


def _grid_and_tiles(query: Tensor, num_clusters: int, top_k: int, block_m: int):
    rows, length = query.shape[0] * query.shape[1], query.shape[2]
    grid = (triton.cdiv(length, block_m) + num_clusters, rows)
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
