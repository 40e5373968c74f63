"""The GPU path of causal clustered attention: three fused-attention calls merged by log-sum-exp.

:mod:`.causal` defines the variant; this module computes the same function on CUDA
without forming any logits in memory. The softmax of a query of chunk ``t`` runs over
three disjoint column sets, each of which a fused attention kernel (flash attention)
handles on its own:

* **own chunk**, causally: chunk ``t``'s queries against chunk ``t``'s keys with the
  ordinary causal mask, on ``(B H, T, W, D)`` views of q, k, v (no copy);
* **previous chunk**, fully: chunks ``1 .. T-1`` against the keys of chunks ``0 .. T-2``,
  views again;
* **summaries**: chunks ``2 .. T-1`` against their ``C`` cluster summaries. A summary's
  logit ``scale q . kbar_j + log n_j`` needs a per-column offset, which fused attention
  has no input for; it rides in three extra feature columns: queries carry ``1, 1, 1``
  there, summary ``j`` carries ``hi, mid, lo`` with ``hi + mid + lo = log(n_j) / scale``
  to fp32 precision (each part is the previous parts' remainder, rounded to the input
  dtype), so the kernel's fp32 dot product adds the offset. Empty clusters get
  ``EMPTY_LOGIT`` nats, whose ``exp`` is exactly 0.

Each call returns its output and log-sum-exp; the outputs are merged with weights
``exp(lse_part - lse)``. The backward calls each kernel's backward with the *merged*
output and log-sum-exp, which gives exactly the gradients of the joint softmax restricted
to that part's columns (``P = exp(S - lse)``, ``dS = P (dP - rowsum(dout * out))``).

Summaries: per-chunk cluster sums (a kernel without atomics), their prefix over chunks
``0 .. t - 2`` divided by the counts (one kernel writing straight into the summary block),
and the adjoints of both in the backward; one more kernel merges the three parts. Every step is deterministic, so outputs are
bit-reproducible and the leak test can compare them exactly.

Off CUDA (the tests) the same composition runs with explicit softmax products instead
of flash attention, so its algebra is checked on the CPU in float64.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cuda_backend, reference
from .causal import _gather_clusters, _older_past, _older_past_adjoint, _pad_to_chunks, chunk_cluster_sums_ref
from .custom_ops import LIBRARY
from .flash import flash_backward, flash_forward

__all__ = [
    "fused_path_unavailable",
    "causal_clustered_attention_fused",
    "chunk_cluster_sums_op",
    "chunk_cluster_sums_ref",
]

EMPTY_LOGIT = -1000.0
OFFSET_PARTS = 3
FUSED_DTYPES = (torch.float16, torch.bfloat16)
MAX_FLASH_DIM = 248  # + 8 offset columns stays within flash attention's 256
MAX_GRID = 65535  # flash attention puts (batch, heads) = (B H, chunks) on grid dimensions


def fused_path_unavailable(query: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                           dropout_p: float, window: int) -> Optional[str]:
    """Why :func:`causal_clustered_attention_fused` cannot serve these inputs (None if it can).

    The reference (:mod:`.causal`, tensor cores for half precision, cuBLAS fp32 otherwise)
    serves the rest: key padding (flash attention takes no per-key mask), attention
    dropout (the reference draws the documented keep-mask over ``2W + C`` columns),
    float32 / float64 (flash attention is fp16 / bf16), head dims flash does not take,
    and grids beyond its limits.
    """
    if not query.is_cuda:
        return "not a CUDA tensor"
    if query.dtype not in FUSED_DTYPES:
        return f"dtype {query.dtype} (the fused path is fp16 / bf16)"
    if key_padding_mask is not None:
        return "key_padding_mask is given (the fused kernels take no per-key mask)"
    if dropout_p > 0.0:
        return "attention dropout (the reference draws the documented keep-mask)"
    dim, value_dim = query.shape[-1], value.shape[-1]
    if dim != value_dim or dim % 8 or dim > MAX_FLASH_DIM:
        return f"head dims (query {dim}, value {value_dim}) are not equal multiples of 8 up to {MAX_FLASH_DIM}"
    batch, heads, length, _ = query.shape
    if batch * heads > MAX_GRID or -(-length // window) > MAX_GRID:
        return f"batch * heads = {batch * heads} or chunks = {-(-length // window)} exceed {MAX_GRID}"
    return None


# ================================================================ summaries


@torch.library.custom_op(f"{LIBRARY}::chunk_cluster_sums", mutates_args=())
def chunk_cluster_sums_op(x: Tensor, clusters: Tensor, window: int, num_clusters: int) -> Tensor:
    return chunk_cluster_sums_ref(x, clusters, window, num_clusters)


@chunk_cluster_sums_op.register_fake
def _(x, clusters, window, num_clusters):
    batch, heads, length, width = x.shape
    return x.new_empty(batch, heads, -(-length // window), num_clusters, width,
                       dtype=reference._compute_dtype(x.dtype))


def _kernels(x: Tensor):
    """The compiled extension when ``x`` is on CUDA and it is loaded, else None (torch ops)."""
    return cuda_backend.extension() if x.is_cuda else None


def _chunk_slots(clusters: Tensor, window: int, num_clusters: int, trash: int) -> Tensor:
    """Flat (chunk, cluster) slot ``t C + c`` of every key, ``trash`` for keys of no cluster."""
    chunk = torch.arange(clusters.shape[2], device=clusters.device) // window
    return torch.where(clusters >= 0, chunk * num_clusters + clusters, trash)


def _older_past_counts(clusters: Tensor, window: int, num_clusters: int, num_chunks: int, dtype) -> Tensor:
    """Members of each cluster in chunks ``0 .. t - 2``, ``(B, H, T, C)`` in ``dtype`` (sums of
    ones: exact in any order)."""
    batch, heads, _ = clusters.shape
    trash = num_chunks * num_clusters
    slot = _chunk_slots(clusters, window, num_clusters, trash)
    counts = torch.zeros(batch, heads, trash + 1, dtype=dtype, device=clusters.device)
    counts.scatter_add_(2, slot, torch.ones_like(slot, dtype=dtype))
    return _older_past(counts[..., :trash].reshape(batch, heads, num_chunks, num_clusters)).contiguous()


def _summary_means(x: Tensor, clusters: Tensor, counts: Tensor, window: int, first: int, width: int) -> Tensor:
    """Mean member of every cluster over chunks ``0 .. t - 2``, for chunks ``t >= first``:
    ``(B H, T - first, C, width)`` in x's dtype, the means in ``[..., :E]``, zeros after."""
    sums = chunk_cluster_sums_op(x, clusters, window, counts.shape[-1])
    return summary_means_from_sums(sums, counts, first, width, x.dtype)


def summary_means_from_sums(sums: Tensor, counts: Tensor, first: int, width: int, dtype: torch.dtype) -> Tensor:
    """:func:`_summary_means` from the per-chunk cluster sums ``(B, H, T, C, E)`` (fp32 or
    ``dtype``; the prefix sums are fp32 either way) and the older-past ``counts (B, H, T, C)``."""
    batch, heads, chunks, num_clusters = counts.shape
    dim = sums.shape[-1]
    kernels = _kernels(sums)
    if kernels is not None and sums.dtype in (torch.float32, dtype):
        block = sums.new_empty(batch * heads, chunks - first, num_clusters, width, dtype=dtype)
        kernels.older_past_means(sums.contiguous(), counts, first, block)  # writes every column
        return block
    block = sums.new_zeros(batch * heads, chunks - first, num_clusters, width, dtype=dtype)
    means = _older_past(sums.to(counts.dtype)) / counts.clamp(min=1).unsqueeze(-1)
    block[..., :dim] = means[:, :, first:].reshape(-1, *block.shape[1:3], dim)
    return block


def summary_sum_grads(grad_block: Tensor, counts: Tensor, first: int, dim: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Adjoint of :func:`summary_means_from_sums`: ``grad_block (B H, T - first, C, >= dim)``
    -> the gradient of every per-(chunk, cluster) sum, ``(B, H, T, C, dim)``; in ``dtype``
    from the kernel (CUDA, fp32 ``counts``), in ``counts``' dtype otherwise."""
    batch, heads, chunks, num_clusters = counts.shape
    kernels = _kernels(grad_block)
    if kernels is not None and counts.dtype == torch.float32:
        grad_sums = counts.new_empty(batch, heads, chunks, num_clusters, dim, dtype=dtype)
        kernels.older_past_means_backward(grad_block, counts, first, grad_sums)
        return grad_sums
    grad_means = counts.new_zeros(batch, heads, chunks, num_clusters, dim)
    grad_means[:, :, first:] = grad_block[..., :dim].reshape(batch, heads, chunks - first, num_clusters, dim)
    return _older_past_adjoint(grad_means / counts.clamp(min=1).unsqueeze(-1))


def _add_summary_means_backward(grad_x: Tensor, grad_block: Tensor, clusters: Tensor, counts: Tensor,
                                window: int, first: int) -> None:
    """Adjoint of :func:`_summary_means`, added into ``grad_x (B, H, N, E)`` (contiguous, in
    ``counts``' dtype) from ``grad_block (B H, T - first, C, >= E)``."""
    chunks, dim = counts.shape[2], grad_x.shape[-1]
    grad_sums = summary_sum_grads(grad_block, counts, first, dim)
    kernels = _kernels(grad_block)
    if kernels is not None and counts.dtype == torch.float32:
        kernels.chunk_cluster_gather_add(grad_sums, clusters.contiguous(), window, grad_x)
        return
    # Every member key receives the gradient of its (chunk, cluster) sum.
    grad = _gather_clusters(grad_sums, _pad_to_chunks(clusters, chunks, window, value=-1))
    grad_x += grad.reshape(*grad_x.shape[:2], chunks * window, dim)[:, :, : clusters.shape[2]]


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


def _summary_offsets(counts: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``log n / scale`` of every summary (``EMPTY_LOGIT / scale`` when empty), split for the
    extra feature columns: ``(B, H, T, C, OFFSET_PARTS)`` in ``dtype``."""
    # Kept inside the dtype's range: the remainders of an overflowed part would be inf - inf.
    empty = max(EMPTY_LOGIT / scale, -torch.finfo(dtype).max / 4)
    logs = torch.where(counts > 0, counts.clamp(min=1).log() / scale, torch.full_like(counts, empty))
    return _split_exactly(logs, dtype)


# ================================================================ attention parts


def _flash(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in FUSED_DTYPES


def _part_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tuple[Tensor, Tensor]:
    """Attention of ``q (G, T, W, E)`` over ``k, v (G, T, L, E)`` -> ``out`` (q's dtype; the
    accumulation dtype off CUDA) and ``lse (G, T, W)`` (fp32; fp64 for fp64)."""
    if _flash(q):
        return flash_forward(q, k, v, scale, causal)  # lower-right causal mask when L > W
    acc = reference._compute_dtype(q.dtype)
    logits = _part_logits(q, k, scale, causal, acc)
    lse = torch.logsumexp(logits, dim=-1)
    return torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), v.to(acc)), lse


def _part_logits(q: Tensor, k: Tensor, scale: float, causal: bool, acc) -> Tensor:
    logits = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if causal:
        rows, columns = logits.shape[-2:]
        allowed = torch.ones(rows, columns, dtype=torch.bool, device=q.device).tril(columns - rows)
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits


def _part_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                   causal: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of one part for the *merged* ``out`` and ``lse`` of the joint softmax."""
    if _flash(q):
        return flash_backward(grad_out, q, k, v, out, lse, scale, causal)
    acc = reference._compute_dtype(q.dtype)
    q, k, v, grad_out, out = (x.to(acc) for x in (q, k, v, grad_out, out))
    probs = torch.exp(_part_logits(q, k, scale, causal, acc) - lse.unsqueeze(-1))
    row_dot = (grad_out * out).sum(-1, keepdim=True)
    grad_logits = probs * (torch.matmul(grad_out, v.transpose(-1, -2)) - row_dot) * scale
    return (torch.matmul(grad_logits, k), torch.matmul(grad_logits.transpose(-1, -2), q),
            torch.matmul(probs.transpose(-1, -2), grad_out))


# ================================================================ the op


class _Layout:
    """Chunked views and the summary blocks shared by forward and backward.

    ``q, k, v (G, T, W, D)`` with ``G = B H`` (views when ``W`` divides ``N``);
    ``counts (B, H, T, C)`` of the older past; summary keys and values
    ``(G, T - 2, C, width)`` with the offsets in key columns ``D .. D + 2``.
    """

    def __init__(self, query, key, value, clusters, window, num_clusters, scale):
        batch, heads, length, dim = query.shape
        self.length, self.window, self.scale, self.dim = length, window, scale, dim
        self.value_dim = value.shape[-1]
        self.groups, self.chunks = batch * heads, -(-length // window)
        # 3 offset columns, padded to flash attention's multiple of 8 (values padded alike).
        self.width = max(dim, self.value_dim) + 8
        self.q, self.k, self.v = (self.chunked(x) for x in (query, key, value))
        self.has_summaries = self.chunks > 2
        if self.has_summaries:
            acc = reference._compute_dtype(query.dtype)
            self.counts = _older_past_counts(clusters, window, num_clusters, self.chunks, acc)

    def chunked(self, x: Tensor, fill=0.0) -> Tensor:
        """``(B, H, N, E)`` -> ``(G, T, W, E)`` (padded to ``T W`` positions when needed)."""
        if x.shape[2] != self.chunks * self.window:
            pad = self.chunks * self.window - x.shape[2]
            x = F.pad(x, (0, 0, 0, pad), value=fill) if x.dim() == 4 else F.pad(x, (0, pad), value=fill)
        return x.reshape(self.groups, self.chunks, self.window, *x.shape[3:])

    def unchunked(self, x: Tensor, batch: int) -> Tensor:
        return x.reshape(batch, -1, self.chunks * self.window, *x.shape[3:])[:, :, : self.length]

    def summary_queries(self) -> Tensor:
        q = self.q[:, 2:]
        ones = q.new_ones(*q.shape[:-1], OFFSET_PARTS)
        return torch.cat([q, ones, q.new_zeros(*q.shape[:-1], self.width - self.dim - OFFSET_PARTS)], dim=-1)

    def summary_blocks(self, key, value, clusters):
        """``(keys, values)``, each ``(G, T - 2, C, width)`` in the input dtype."""
        keys = _summary_means(key, clusters, self.counts, self.window, 2, self.width)
        values = _summary_means(value, clusters, self.counts, self.window, 2, self.width)
        offsets = _summary_offsets(self.counts[:, :, 2:], self.scale, key.dtype)
        keys[..., self.dim: self.dim + OFFSET_PARTS] = offsets.reshape(*keys.shape[:3], OFFSET_PARTS)
        return keys, values


@torch.library.custom_op(f"{LIBRARY}::causal_fused_fwd", mutates_args=())
def causal_fused_fwd(query: Tensor, key: Tensor, value: Tensor, clusters: Tensor, window: int, num_clusters: int,
                     scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> ``out (B, H, N, Dv)``, ``lse (G, T, W)`` of the joint softmax, and the summary
    blocks (kept for the backward; empty when no chunk reads a summary)."""
    batch = query.shape[0]
    lay = _Layout(query, key, value, clusters, window, num_clusters, scale)
    acc = reference._compute_dtype(query.dtype)
    out, lse = _part_forward(lay.q, lay.k, lay.v, scale, causal=True)  # own chunk
    parts = []
    if lay.chunks > 1:
        parts.append((1, *_part_forward(lay.q[:, 1:], lay.k[:, :-1], lay.v[:, :-1], scale, causal=False)))
    summary_keys, summary_values = query.new_empty(0), query.new_empty(0)
    if lay.has_summaries:
        summary_keys, summary_values = lay.summary_blocks(key, value, clusters)
        s_out, s_lse = _part_forward(lay.summary_queries(), summary_keys, summary_values, scale, causal=False)
        parts.append((2, s_out[..., : lay.value_dim], s_lse))
    # Merge: lse = log sum_p exp(lse_p); out = sum_p exp(lse_p - lse) out_p.
    kernels = _kernels(query)
    if kernels is not None:
        merged, total = kernels.merge_parts([out] + [p[1] for p in parts], [lse] + [p[2] for p in parts],
                                            lay.length, lay.value_dim)
        merged = merged.view(batch, query.shape[1], lay.length, lay.value_dim)
        return merged, total, summary_keys, summary_values
    total = lse.clone()
    for first, _, part_lse in parts:
        total[:, first:] = torch.logaddexp(total[:, first:], part_lse)
    merged = torch.exp(lse - total).unsqueeze(-1) * out.to(acc)
    for first, part_out, part_lse in parts:
        merged[:, first:] += torch.exp(part_lse - total[:, first:]).unsqueeze(-1) * part_out.to(acc)
    return lay.unchunked(merged.to(query.dtype), batch).contiguous(), total, summary_keys, summary_values


@causal_fused_fwd.register_fake
def _(query, key, value, clusters, window, num_clusters, scale):
    batch, heads, length, dim = query.shape
    chunks = -(-length // window)
    out = query.new_empty(batch, heads, length, value.shape[-1])
    lse = query.new_empty(batch * heads, chunks, window, dtype=reference._compute_dtype(query.dtype))
    if chunks > 2:
        block = query.new_empty(batch * heads, chunks - 2, num_clusters, max(dim, value.shape[-1]) + 8)
        return out, lse, block, torch.empty_like(block)
    return out, lse, query.new_empty(0), query.new_empty(0)


@torch.library.custom_op(f"{LIBRARY}::causal_fused_bwd", mutates_args=())
def causal_fused_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, clusters: Tensor, out: Tensor,
                     lse: Tensor, summary_keys: Tensor, summary_values: Tensor, window: int, num_clusters: int,
                     scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    batch = query.shape[0]
    lay = _Layout(query, key, value, clusters, window, num_clusters, scale)
    acc = reference._compute_dtype(query.dtype)
    g, o = lay.chunked(grad_out), lay.chunked(out)
    # Padded query rows (beyond N) have zero gradients; their lse is whatever the forward made.
    dq, dk, dv = (torch.empty(x.shape, dtype=acc, device=x.device).copy_(x)
                  for x in _part_backward(g, lay.q, lay.k, lay.v, o, lse, scale, causal=True))
    if lay.chunks > 1:
        dq_p, dk_p, dv_p = _part_backward(g[:, 1:], lay.q[:, 1:], lay.k[:, :-1], lay.v[:, :-1], o[:, 1:],
                                          lse[:, 1:], scale, causal=False)
        dq[:, 1:] += dq_p
        dk[:, :-1] += dk_p
        dv[:, :-1] += dv_p
    dk, dv = lay.unchunked(dk, batch).contiguous(), lay.unchunked(dv, batch).contiguous()
    if lay.has_summaries:
        pad = (0, lay.width - lay.value_dim)
        dq_s, dk_s, dv_s = _part_backward(F.pad(g[:, 2:], pad), lay.summary_queries(), summary_keys,
                                          summary_values, F.pad(o[:, 2:], pad), lse[:, 2:], scale, causal=False)
        dq[:, 2:] += dq_s[..., : lay.dim]
        _add_summary_means_backward(dk, dk_s, clusters, lay.counts, window, 2)
        _add_summary_means_backward(dv, dv_s, clusters, lay.counts, window, 2)
    return (lay.unchunked(dq, batch).to(query.dtype).contiguous(), dk.to(key.dtype).contiguous(),
            dv.to(value.dtype).contiguous())


@causal_fused_bwd.register_fake
def _(grad_out, query, key, value, *args):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_fused(ctx, inputs, output):
    query, key, value, clusters, window, num_clusters, scale = inputs
    out, lse, summary_keys, summary_values = output
    ctx.mark_non_differentiable(lse, summary_keys, summary_values)
    ctx.save_for_backward(query, key, value, clusters, out, lse, summary_keys, summary_values)
    ctx.hyper = (window, num_clusters, scale)


def _backward_fused(ctx, grad_out, *unused):
    query, key, value, clusters, out, lse, summary_keys, summary_values = ctx.saved_tensors
    dq, dk, dv = causal_fused_bwd(grad_out.contiguous(), query, key, value, clusters, out, lse, summary_keys,
                                  summary_values, *ctx.hyper)
    return dq, dk, dv, None, None, None, None


causal_fused_fwd.register_autograd(_backward_fused, setup_context=_setup_fused)


def causal_clustered_attention_fused(query: Tensor, key: Tensor, value: Tensor, clusters: Tensor,
                                     window: int, num_clusters: int, scale: float) -> Tensor:
    """Causal clustered attention without key padding or dropout, through fused attention.

    Args:
        query, key, value: ``(B, H, N, D)``: fp16 / bf16 on CUDA (flash attention); any
            device and float dtype through explicit products otherwise (the CPU tests).
        clusters: ``(B, H, N)`` int64 leak-free key cluster ids (-1: no cluster).
        window, num_clusters, scale: as :func:`fairseq_clustered.ops.causal_clustered_attention`.

    Returns:
        ``(B, H, N, D)`` in the query dtype, differentiable w.r.t. query, key and value.
    """
    return causal_fused_fwd(query, key, value, clusters, window, num_clusters, scale)[0]
