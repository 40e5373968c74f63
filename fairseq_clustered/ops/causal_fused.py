"""The GPU path of causal clustered attention: one fused-attention call over per-chunk blocks.

:mod:`.causal` defines the variant; this module computes the same function on CUDA without
forming any logits in memory. For chunk ``t`` of ``W`` queries the softmax columns are the
``C`` cluster summaries, the ``W`` keys of chunk ``t - 1`` and the ``W`` keys of chunk ``t``;
a query sees the first ``C + W`` columns fully and its own chunk causally. Laid out in that
order this is exactly a *lower-right aligned* causal mask on a ``W x (C + 2W)`` block, which
PyTorch's fused attention kernels implement (flash attention for fp16 / bf16, the
memory-efficient kernel for fp32). One call over the ``B H T`` blocks is the whole forward;
autograd runs the kernels' backward and the adjoints of the summaries.

Two details keep it equal to the reference:

* The summary logit ``scale q . kbar_j + log n_j`` needs a per-column offset, which fused
  attention has no input for. The offset rides in three extra feature columns: queries
  carry ``1, 1, 1`` there and column ``j``'s key carries ``hi, mid, lo`` with
  ``hi + mid + lo = log(n_j) / scale`` to fp32 precision (each part is what the previous
  parts left over, rounded to the input dtype), so the kernel's fp32 dot product adds the
  offset. Empty clusters and the missing chunk ``-1`` get an offset of ``EMPTY_LOGIT``
  nats, whose ``exp`` is exactly 0 in fp32.
* The per-chunk cluster sums (op ``chunk_cluster_sums``) come from a kernel without
  atomics on CUDA (``cuda/causal.cu``) and the counts are sums of ones, so every output is bit-reproducible: the leak test
  compares outputs before and after changing the future exactly.

Memory: the key and value blocks hold ``(C + 2W) / W`` times the keys and values (2.8x at
``W = 128, C = 100``), the fp32 summaries ``C / W`` times the keys; nothing is quadratic.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .causal import _older_past, _pad_to_chunks
from .custom_ops import LIBRARY

__all__ = ["fused_path_unavailable", "causal_clustered_attention_fused", "chunk_cluster_sums_op",
           "chunk_cluster_sums_ref"]

EMPTY_LOGIT = -1000.0
OFFSET_PARTS = 3
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID = 65535  # the fused kernels put (batch, heads) = (B H, T) on grid dimensions


def fused_path_unavailable(query: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                           dropout_p: float, window: int) -> Optional[str]:
    """Why :func:`causal_clustered_attention_fused` cannot serve these inputs (None if it can).

    The reference (:mod:`.causal`, tensor cores for half precision) serves the rest:
    key padding (the fused kernels take no per-key mask), attention dropout (the
    reference draws the documented keep-mask over ``2W + C`` columns), float64, and grids
    beyond the kernels' limits.
    """
    if not query.is_cuda:
        return "not a CUDA tensor"
    if query.dtype not in FUSED_DTYPES:
        return f"dtype {query.dtype} has no fused kernel"
    if key_padding_mask is not None:
        return "key_padding_mask is given (the fused kernels take no per-key mask)"
    if dropout_p > 0.0:
        return "attention dropout (the reference draws the documented keep-mask)"
    batch, heads, length, _ = query.shape
    if batch * heads > MAX_GRID or -(-length // window) > MAX_GRID:
        return f"batch * heads = {batch * heads} or chunks = {-(-length // window)} exceed {MAX_GRID}"
    return None


@torch.library.custom_op(f"{LIBRARY}::chunk_cluster_sums", mutates_args=())
def chunk_cluster_sums_op(x: Tensor, clusters: Tensor, window: int, num_clusters: int) -> Tensor:
    return chunk_cluster_sums_ref(x, clusters, window, num_clusters)


@chunk_cluster_sums_op.register_fake
def _(x, clusters, window, num_clusters):
    batch, heads, length, width = x.shape
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(batch, heads, -(-length // window), num_clusters, width, dtype=dtype)


def _setup_sums(ctx, inputs, output):
    x, clusters, window, _ = inputs
    ctx.save_for_backward(clusters)
    ctx.window, ctx.input_dtype = window, x.dtype


def _backward_sums(ctx, grad_sums):
    # Every member key receives the gradient of its (chunk, cluster) sum.
    (clusters,) = ctx.saved_tensors
    batch, heads, length = clusters.shape
    chunks, num_clusters, width = grad_sums.shape[2:]
    slot = _chunk_slots(clusters, ctx.window, num_clusters, trash=0)
    grad = grad_sums.reshape(batch, heads, chunks * num_clusters, width)
    grad = grad.gather(2, slot.unsqueeze(-1).expand(batch, heads, length, width))
    return (grad * (clusters >= 0).unsqueeze(-1)).to(ctx.input_dtype), None, None, None


chunk_cluster_sums_op.register_autograd(_backward_sums, setup_context=_setup_sums)


def chunk_cluster_sums_ref(x: Tensor, clusters: Tensor, window: int, num_clusters: int) -> Tensor:
    """Per chunk of ``window`` positions and key cluster, the sum of the member rows.

    ``x (B, H, N, E)``, ``clusters (B, H, N)`` int64 (-1: no cluster) ->
    ``(B, H, T, C, E)`` in float32 (float64 for float64 input), ``T = ceil(N / window)``.
    """
    acc = reference._compute_dtype(x.dtype)
    chunks = -(-x.shape[2] // window)
    rows = _pad_to_chunks(x.to(acc), chunks, window)  # (B, H, T, W, E)
    ids = _pad_to_chunks(clusters, chunks, window, value=-1)  # (B, H, T, W)
    members = (ids.unsqueeze(-1) == torch.arange(num_clusters, device=x.device)).to(acc)
    return torch.matmul(members.transpose(-1, -2), rows)


def _chunk_slots(clusters: Tensor, window: int, num_clusters: int, trash: int) -> Tensor:
    """Flat (chunk, cluster) slot ``t C + c`` of every key, ``trash`` for keys of no cluster."""
    chunk = torch.arange(clusters.shape[2], device=clusters.device) // window
    return torch.where(clusters >= 0, chunk * num_clusters + clusters, trash)


def _chunk_counts(clusters: Tensor, window: int, num_clusters: int, num_chunks: int, dtype: torch.dtype) -> Tensor:
    """Members per chunk and cluster, ``(B, H, T, C)`` in ``dtype`` (sums of ones: exact in any order)."""
    batch, heads, _ = clusters.shape
    trash = num_chunks * num_clusters
    slot = _chunk_slots(clusters, window, num_clusters, trash)
    counts = torch.zeros(batch, heads, trash + 1, dtype=dtype, device=clusters.device)
    counts.scatter_add_(2, slot, torch.ones_like(slot, dtype=counts.dtype))
    return counts[..., :trash].reshape(batch, heads, num_chunks, num_clusters)


def _split_exactly(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x (...)`` (fp32, or fp64) -> ``(..., OFFSET_PARTS)`` in ``dtype`` whose sum is ``x`` to
    about 2**-24 relative (exactly when ``dtype`` is ``x``'s): each part is the previous
    parts' remainder, rounded."""
    parts = []
    rest = x
    for _ in range(OFFSET_PARTS):
        part = rest.to(dtype)
        parts.append(part)
        rest = rest - part.to(rest.dtype)
    return torch.stack(parts, dim=-1)


def _column_offsets(counts: Tensor, window: int, scale: float, dtype: torch.dtype) -> Tensor:
    """Logit offsets / ``scale`` of every column of every chunk's block, split for the extra
    feature columns: ``(B, H, T, C + 2W, OFFSET_PARTS)`` in ``dtype``.

    Summary ``j``: ``log n_j`` (``EMPTY_LOGIT`` when empty); previous-chunk keys: 0, except
    for chunk 0, which has no previous chunk (``EMPTY_LOGIT``); own-chunk keys: 0.
    """
    # Kept inside the dtype's range: the remainders of an overflowed part would be inf - inf.
    empty = max(EMPTY_LOGIT / scale, -torch.finfo(dtype).max / 4)
    summary = torch.where(counts > 0, counts.clamp(min=1).log() / scale, torch.full_like(counts, empty))
    batch, heads, chunks, _ = counts.shape
    exact = counts.new_zeros(batch, heads, chunks, 2 * window)
    exact[:, :, 0, :window] = empty
    return _split_exactly(torch.cat([summary, exact], dim=-1), dtype)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _lower_right_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Attention of ``q (G, T, W, E)`` over ``k, v (G, T, L, E)`` with query ``r`` seeing key
    columns ``<= r + L - W`` (a lower-right aligned causal mask).

    CUDA: fused kernels (flash attention for fp16 / bf16, whose causal mask is lower-right
    aligned when ``L > W``; the memory-efficient kernel with mask type 2 for fp32). Other
    devices (the CPU tests of this path): SDPA with the mask spelled out.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal=True, return_debug_mask=False, scale=scale)[0]
    if q.is_cuda:
        out = torch.ops.aten._efficient_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias=None, cu_seqlens_q=None,
            cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, custom_mask_type=2,
            compute_log_sumexp=torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)),
            scale=scale, seqlen_k=None)[0]
        return out.transpose(1, 2)
    rows, columns = q.shape[2], k.shape[2]
    allowed = torch.ones(rows, columns, dtype=torch.bool, device=q.device).tril(columns - rows)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def causal_clustered_attention_fused(query: Tensor, key: Tensor, value: Tensor, clusters: Tensor,
                                     window: int, num_clusters: int, scale: float) -> Tensor:
    """Causal clustered attention without key padding or dropout, through fused attention.

    Args:
        query, key: ``(B, H, N, D)``; value ``(B, H, N, Dv)``; fp16 / bf16 / fp32 on CUDA
            (any device and dtype works, through SDPA with an explicit mask off CUDA).
        clusters: ``(B, H, N)`` int64 leak-free key cluster ids (-1: no cluster).
        window, num_clusters, scale: as :func:`fairseq_clustered.ops.causal_clustered_attention`.

    Returns:
        ``(B, H, N, Dv)`` in the query dtype, differentiable w.r.t. query, key and value.
    """
    batch, heads, length, dim = query.shape
    value_dim = value.shape[-1]
    chunks = -(-length // window)
    columns = num_clusters + 2 * window
    width = _round_up(max(dim, value_dim) + OFFSET_PARTS, 8)
    dtype = query.dtype

    # Summaries of chunks 0 .. t - 2 for every chunk t, as in the reference.
    acc = reference._compute_dtype(dtype)  # of the summaries: float32, float64 for float64 input
    counts = _older_past(_chunk_counts(clusters, window, num_clusters, chunks, acc))
    divisor = counts.clamp(min=1).unsqueeze(-1)
    mean_keys = _older_past(chunk_cluster_sums_op(key, clusters, window, num_clusters)) / divisor
    mean_values = _older_past(chunk_cluster_sums_op(value, clusters, window, num_clusters)) / divisor

    def block(summaries: Tensor, rows: Tensor) -> Tensor:
        """``(B, H, T, C + 2W, E)``: the summaries, chunk t - 1 (zeros for t = 0), chunk t."""
        rows = _pad_to_chunks(rows, chunks, window)
        previous = F.pad(rows[:, :, :-1], (0, 0, 0, 0, 1, 0))
        return torch.cat([summaries.to(dtype), previous, rows], dim=3)

    offsets = _column_offsets(counts, window, scale, dtype)
    keys = block(mean_keys, key)
    keys = torch.cat([keys, offsets, keys.new_zeros(*keys.shape[:-1], width - dim - OFFSET_PARTS)], dim=-1)
    values = F.pad(block(mean_values, value), (0, width - value_dim))
    queries = _pad_to_chunks(query, chunks, window)
    queries = torch.cat([queries, queries.new_ones(*queries.shape[:-1], OFFSET_PARTS),
                         queries.new_zeros(*queries.shape[:-1], width - dim - OFFSET_PARTS)], dim=-1)

    groups = batch * heads
    out = _lower_right_causal_attention(
        queries.reshape(groups, chunks, window, width), keys.reshape(groups, chunks, columns, width),
        values.reshape(groups, chunks, columns, width), scale)
    return out.reshape(batch, heads, chunks * window, width)[:, :, :length, :value_dim]
