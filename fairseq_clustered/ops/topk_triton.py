"""Centroid logits, their log-sum-exp and per-centroid top-k keys in one pass (Triton).

The improved variant's forward needs, per (batch, head) row and centroid ``j``, the
log-sum-exp of the centroid's logits over all keys and the indices of its ``k`` largest
logits. :class:`fairseq_clustered.ops.cuda_kernels.CudaOps` computes them from an fp32
``(C, S)`` logit matrix (keys upcast to fp32, cuBLAS, then ``torch.logsumexp`` and
``torch.topk``), in row chunks. Here one program holds ``BLOCK_C`` centroids and streams
the keys in blocks of ``TOPK``: logits on tensor cores, an online log-sum-exp, and a
running top-k merged by sorting the ``2 TOPK`` candidates of each centroid. No ``(C, S)``
matrix is written.

Precision: keys are fp16 / bf16 (exact in their dtype); the fp32 centroids are split into
two parts of that dtype (``hi + lo``), so the logits carry about 16 bits of the centroid's
mantissa instead of 24 (relative error ~1e-5): the top-k can differ from the fp32 one only
between keys whose logits lie that close.

Status: **experimental, off by default**. Written and tested on the CPU (Triton's
interpreter) in a session without GPU time left; its speed has not been measured. Set
``FAIRSEQ_CLUSTERED_TRITON_TOPK=1`` to use it in the improved variant's flash path, and
keep it only if ``benchmarks/bench_attention.py --methods sdpa,improved`` shows it faster
(benchmarks/NOTES.md).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._triton import MISSING, power_of_two_in, tl, triton

__all__ = ["ENABLED", "triton_topk_unavailable", "centroid_logsumexp_topk"]


def _switch(name: str) -> bool:
    """An on/off environment variable: unset, "0" or "1"; anything else is an error."""
    value = os.environ.get(name, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1 (unset means 0), got {value!r}")
    return value == "1"


ENABLED = _switch("FAIRSEQ_CLUSTERED_TRITON_TOPK")
BLOCK_CENTROIDS = 64
MIN_TOPK_BLOCK = 16  # tensor-core tiles need >= 16 keys per block
INDEX_BITS = 31


def triton_topk_unavailable(key: Tensor, top_k: int) -> Optional[str]:
    """Why :func:`centroid_logsumexp_topk` cannot serve ``key (rows, S, D)`` (None if it can)."""
    if MISSING is not None:
        return MISSING
    if key.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {key.dtype} (the kernel is for fp16 / bf16 keys)"
    dim = key.shape[-1]
    if not power_of_two_in(dim, 16, 128):
        return f"head dim {dim} is not a power of two in 16..128"
    if top_k > 128:
        return f"top-k {top_k} > 128"
    if key.shape[1] >= 2 ** INDEX_BITS:
        return f"{key.shape[1]} keys do not fit the packed index"
    return None


if triton is not None:

    @triton.jit
    def _sortable(logits, index):
        """Pack fp32 ``logits`` and int ``index`` into int64s whose order is the logits'
        order, ties going to the lower index (the logit's bits, made monotone, above the
        complemented index)."""
        bits = logits.to(tl.int32, bitcast=True)
        monotone = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats count down
        return (monotone.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)

    @triton.jit
    def _centroid_topk_kernel(QBAR, K, LSE, TOP, keys, num_clusters, scale,
                              BLOCK_C: tl.constexpr, TOPK: tl.constexpr, DIM: tl.constexpr):
        """Program (centroid block b, row r): for centroids b BLOCK_C .. of row r, the natural
        log-sum-exp of ``scale qbar . k`` over the row's keys (LSE (rows, C) fp32) and the
        indices of the TOPK largest (TOP (rows, C, TOPK) int64, largest first).

        QBAR: (rows, C, DIM) fp32; K: (rows, keys, DIM) fp16 / bf16, contiguous."""
        row = tl.program_id(1).to(tl.int64)
        centroids = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        centroid_ok = centroids < num_clusters
        feats = tl.arange(0, DIM)
        qbar = tl.load(QBAR + (row * num_clusters + centroids)[:, None] * DIM + feats[None, :],
                       mask=centroid_ok[:, None], other=0.0)
        qbar_hi = qbar.to(K.dtype.element_ty)
        qbar_lo = (qbar - qbar_hi.to(tl.float32)).to(K.dtype.element_ty)

        best = tl.full((BLOCK_C, TOPK), -2 ** 63, tl.int64)  # below every packed logit
        row_max = tl.full((BLOCK_C,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_C,), tl.float32)
        for start in range(0, keys, TOPK):
            cols = start + tl.arange(0, TOPK)
            col_ok = cols < keys
            k = tl.load(K + (row * keys + cols)[:, None] * DIM + feats[None, :], mask=col_ok[:, None], other=0.0)
            logits = (tl.dot(qbar_hi, tl.trans(k)) + tl.dot(qbar_lo, tl.trans(k))) * scale
            logits = tl.where(col_ok[None, :], logits, float("-inf"))
            # Online log-sum-exp; the first block has a finite max (keys >= 1).
            new_max = tl.maximum(row_max, tl.max(logits, 1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
            row_max = new_max
            # Keep the TOPK largest of the kept ones and this block's: sort the 2 TOPK packed
            # candidates of each centroid and take the first half.
            candidates = tl.reshape(tl.join(best, _sortable(logits, cols)), (BLOCK_C, 2 * TOPK))
            ranked = tl.reshape(tl.sort(candidates, 1, descending=True), (BLOCK_C, 2, TOPK))
            best, _ = tl.split(tl.permute(ranked, (0, 2, 1)))

        tl.store(LSE + row * num_clusters + centroids, row_max + tl.log(row_sum), mask=centroid_ok)
        index = 0x7FFFFFFF - (best & 0x7FFFFFFF)
        slots = tl.arange(0, TOPK)
        tl.store(TOP + (row * num_clusters + centroids)[:, None] * TOPK + slots[None, :], index,
                 mask=centroid_ok[:, None])


def centroid_logsumexp_topk(qbar: Tensor, key: Tensor, top_k: int, scale: float) -> Tuple[Tensor, Tensor]:
    """Log-sum-exp and top-k key indices of the centroid logits ``scale qbar . k``.

    Args:
        qbar: ``(rows, C, D)`` fp32 centroids. key: ``(rows, S, D)`` fp16 / bf16.
        top_k: ``1 <= top_k <= min(S, 128)``. scale: logit scale.

    Returns:
        ``lse (rows, C)`` fp32 (natural log) and ``top (rows, C, top_k)`` int64, each
        centroid's keys in decreasing order of logit.
    """
    reason = triton_topk_unavailable(key, top_k)
    if reason is not None:
        raise ValueError(f"centroid_logsumexp_topk: {reason}")
    if not 1 <= top_k <= key.shape[1]:
        raise ValueError(f"centroid_logsumexp_topk: top_k must be in 1..{key.shape[1]} (the keys), got {top_k}")
    rows, num_clusters, dim = qbar.shape
    block = max(MIN_TOPK_BLOCK, triton.next_power_of_2(top_k))
    lse = qbar.new_empty(rows, num_clusters, dtype=torch.float32)
    top = torch.empty(rows, num_clusters, block, dtype=torch.int64, device=qbar.device)
    grid = (triton.cdiv(num_clusters, BLOCK_CENTROIDS), rows)
    _centroid_topk_kernel[grid](qbar.float().contiguous(), key.contiguous(), lse, top, key.shape[1], num_clusters,
                                scale, BLOCK_C=BLOCK_CENTROIDS, TOPK=block, DIM=dim, num_warps=4)
    return lse, top[..., :top_k]
