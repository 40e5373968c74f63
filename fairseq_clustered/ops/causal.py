"""Leak-free causal clustered attention, for language models and decoder self-attention.

The paper's clustered attention groups *queries*; a centroid then mixes queries from
later positions, so in a causal stack output ``i`` would depend on the future
(DESIGN.md section 2). This variant never clusters queries. It clusters *keys* of the
distant past only, with clusters that every reader may see:

* The sequence is cut into chunks of ``W = window`` positions; chunk ``t`` holds the
  positions ``[t W, (t + 1) W)``.
* A query of chunk ``t`` attends **exactly** to the keys of chunk ``t - 1`` and, causally,
  of chunk ``t`` (so it always sees at least its last ``W`` positions exactly).
* The older past, chunks ``0 .. t - 2``, is seen through ``C`` **key-cluster summaries**:
  for cluster ``j``, the count ``n_j``, the mean key ``kbar_j`` and the mean value
  ``vbar_j`` of its member keys in chunks ``0 .. t - 2``. The summary enters the *same*
  softmax as the exact keys with the logit ``scale q . kbar_j + log n_j``, which stands
  for the cluster's total mass ``sum_l exp(scale q . k_l) ~ n_j exp(scale q . kbar_j)``,
  and contributes ``vbar_j`` weighted by it.
* Summaries are prefix sums over chunks of per-chunk cluster sums, so the cost is
  ``O(N (2 W + C) D)``: linear in ``N`` for a fixed window and number of clusters. The
  ``(W, 2 W + C)`` logits of each chunk are formed for a group of chunks at a time
  (``_GROUP_ELEMENTS``), so the scratch memory stays bounded at any length.

Which cluster a key joins (``clusters``, constant for autograd): its keys are hashed
with random hyperplanes and a codebook of ``C`` Hamming centroids is fitted with Lloyd's
k-means (the shared ``lloyd_kmeans`` op, a CUDA kernel where the extension is built) on
the keys of the first ``2 W`` positions only; every key then joins its nearest centroid.

Why it cannot leak: a query at position ``i`` of chunk ``t >= 2`` (``i >= 2 W``) reads
(a) keys and values at positions ``<= i`` exactly, (b) summaries of positions
``< (t - 1) W <= i``, whose cluster ids depend on the key itself and on the codebook,
fitted from positions ``< 2 W <= i``. Queries of chunks 0 and 1 read no summary at all.
Nothing at a position ``> i`` enters out_i, and since the cluster ids are constants, no
gradient path leads there either. ``tests/test_causal.py`` checks both bit for bit.

With ``window >= N`` (or ``N <= 2 window``) no summary is used and the result is exact
causal attention.

Shapes follow :mod:`fairseq_clustered.ops`: ``(B, H, N, D)`` tensors, ``(B, N)`` bool
padding masks with True at padded keys (left or right padding; padded keys are never
attended and join no cluster). A query that sees no valid key gets zeros.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cuda_backend, custom_ops, eager, reference
from .validation import (
    check_attention_inputs,
    check_clustering_args,
    check_int_range,
    check_probability,
    dropout_keep_mask,
    resolve_scale,
)

__all__ = [
    "causal_clustered_attention",
    "causal_key_clusters",
    "causal_clustered_attention_fwd_ref",
    "causal_clustered_attention_bwd_ref",
    "causal_key_clusters_ref",
    "causal_logit_columns",
    "DEFAULT_WINDOW",
    "DEFAULT_NUM_CLUSTERS",
]

LIBRARY = custom_ops.LIBRARY
# The causal defaults: the setting that met both of issue 5's bars in one session (H200,
# 2026-12-01; README): a character LM within 3% of full attention's bits per character,
# and forward+backward within 1.0 / 0.10 / 0.05 of exact causal attention's time at
# 4k / 32k / 64k. Window 128 was faster but 4.9% behind at the last validation; 100
# clusters took 1.14-1.18x the time of 64 for 0.2-0.7% fewer bits per character.
DEFAULT_WINDOW = 256
DEFAULT_NUM_CLUSTERS = 64
DEFAULT_ITERATIONS = 10
DEFAULT_BITS = 63


def causal_logit_columns(window: int, num_clusters: int) -> int:
    """Softmax width of every query: ``2 W`` exact keys plus ``C`` summaries."""
    return 2 * window + num_clusters


# =============================================================== key clustering


def codebook_fit_range(window: int, length: int) -> int:
    """Number of leading positions the key codebook is fitted on: ``min(2 W, N)``, the
    positions every query that reads a summary (``i >= 2 W``) may see."""
    return min(2 * window, length)


def _codebook_kernel(codes: Tensor, codebook: Tensor):
    """The compiled extension where its codebook-assignment kernel takes these inputs (CUDA,
    at most 6144 entries, batch * heads <= 65535), else None (the reference, with one
    warning on CUDA)."""
    kernels = cuda_backend.extension() if codes.is_cuda else None
    if kernels is None:
        return None
    from .cuda_kernels import MAX_KERNEL_CLUSTERS, MAX_ROWS, warn_fallback  # loaded with the extension

    rows, entries = codes.shape[0] * codes.shape[1], codebook.shape[-1]
    if entries > MAX_KERNEL_CLUSTERS or rows > MAX_ROWS:
        warn_fallback("causal_key_clusters", f"num_clusters {entries} > {MAX_KERNEL_CLUSTERS} or "
                                             f"batch * heads {rows} > {MAX_ROWS}")
        return None
    return kernels


def _assign_to_codebook(codes: Tensor, codebook: Tensor, key_padding_mask: Optional[Tensor], bits: int) -> Tensor:
    """Nearest codebook entry (Hamming; ties: lowest id) of every key, -1 for padded keys.

    ``codes (B, H, N)``, ``codebook (B, H, C)`` int64 -> ``(B, H, N)`` int64.
    """
    kernels = _codebook_kernel(codes, codebook)
    if kernels is not None:
        clusters = kernels.codebook_assign(codes.contiguous(), codebook.contiguous())
    else:
        clusters = reference.hamming_distance_ref(codes, codebook, bits).argmin(-1)
    if key_padding_mask is not None:
        clusters = clusters.masked_fill(key_padding_mask[:, None, :], -1)
    return clusters


def causal_key_clusters_ref(
    codes: Tensor, key_padding_mask: Optional[Tensor], window: int, num_clusters: int,
    iterations: int, bits: int,
) -> Tensor:
    """Cluster ids of the keys, from a codebook fitted on the first ``2 W`` positions.

    Args:
        codes: ``(B, H, N)`` int64 hash codes of the keys.
        key_padding_mask: ``(B, N)`` bool, True = padded key, or None.
        window: ``W``. num_clusters: ``C``. iterations: Lloyd iterations. bits: code width.

    Returns:
        ``(B, H, N)`` int64 cluster ids in ``[0, C)``, -1 for padded keys. The id of key
        ``l`` depends only on ``codes[..., l]`` and on the keys at positions ``< 2 W``.
    """
    return key_clusters_from_codes(codes, key_padding_mask, window, num_clusters, iterations, bits,
                                   reference.lloyd_kmeans_ref)


def key_clusters_from_codes(codes: Tensor, key_padding_mask: Optional[Tensor], window: int, num_clusters: int,
                            iterations: int, bits: int, lloyd_kmeans) -> Tensor:
    """:func:`causal_key_clusters_ref` with the codebook fitted by ``lloyd_kmeans`` (the
    reference, the ``lloyd_kmeans`` op, or the CUDA composition's own call of the kernel)."""
    fit = codebook_fit_range(window, codes.shape[2])
    fit_mask = None if key_padding_mask is None else key_padding_mask[:, :fit].contiguous()
    _, codebook = lloyd_kmeans(codes[:, :, :fit].contiguous(), fit_mask, num_clusters, iterations, bits)
    return _assign_to_codebook(codes, codebook, key_padding_mask, bits)


# ======================================================= attention: reference


def _pad_to_chunks(x: Tensor, num_chunks: int, window: int, value=0) -> Tensor:
    """Pad dim 2 of ``(B, H, N, ...)`` (or dim 1 of a ``(B, N)`` mask) to ``T W`` and
    split it into ``(T, W)``."""
    dim = 2 if x.dim() >= 3 else 1
    missing = num_chunks * window - x.shape[dim]
    if missing:
        pad_shape = list(x.shape)
        pad_shape[dim] = missing
        x = torch.cat([x, x.new_full(pad_shape, value)], dim=dim)
    return x.reshape(*x.shape[:dim], num_chunks, window, *x.shape[dim + 1:])


def _with_previous_chunk(chunks: Tensor, fill) -> Tensor:
    """``(B, H, T, W, E)`` (or ``(B, T, W)``) -> chunk ``t - 1`` and chunk ``t`` side by
    side, ``(B, H, T, 2W, E)``; chunk ``-1`` is ``fill``."""
    time_dim = 2 if chunks.dim() == 5 else 1
    first = chunks.narrow(time_dim, 0, 1)
    previous = torch.cat([torch.full_like(first, fill), chunks.narrow(time_dim, 0, chunks.shape[time_dim] - 1)],
                         dim=time_dim)
    return torch.cat([previous, chunks], dim=time_dim + 1)


def _chunk_members(clusters: Tensor, num_clusters: int, dtype: torch.dtype) -> Tensor:
    """One-hot membership ``(B, H, T, W, C)`` of chunked cluster ids ``(B, H, T, W)`` (-1: none)."""
    return (clusters.unsqueeze(-1) == torch.arange(num_clusters, device=clusters.device)).to(dtype)


def _chunk_cluster_sums(keys: Tensor, values: Tensor, clusters: Tensor, num_clusters: int):
    """Per chunk and cluster: member count ``(B, H, T, C)``, key sum ``(B, H, T, C, D)``
    and value sum ``(B, H, T, C, Dv)`` (in the dtype of ``keys``)."""
    members = _chunk_members(clusters, num_clusters, keys.dtype)
    members_t = members.transpose(-1, -2)  # (B, H, T, C, W)
    return members.sum(3), torch.matmul(members_t, keys), torch.matmul(members_t, values)


def chunk_cluster_sums_ref(x: Tensor, clusters: Tensor, window: int, num_clusters: int) -> Tensor:
    """Per chunk of ``window`` positions and key cluster, the sum of the member rows.

    ``x (B, H, N, E)``, ``clusters (B, H, N)`` int64 (-1: no cluster) ->
    ``(B, H, T, C, E)`` in float32 (float64 for float64 input), ``T = ceil(N / window)``.
    """
    acc = reference._compute_dtype(x.dtype)
    chunks = -(-x.shape[2] // window)
    members = _chunk_members(_pad_to_chunks(clusters, chunks, window, value=-1), num_clusters, acc)
    return torch.matmul(members.transpose(-1, -2), _pad_to_chunks(x.to(acc), chunks, window))


def _gather_clusters(per_cluster: Tensor, clusters: Tensor) -> Tensor:
    """``(B, H, T, C, E)`` per chunk and cluster -> ``(B, H, T, W, E)`` per key by its cluster
    (zeros for keys of no cluster): the adjoint of the member sums."""
    index = clusters.clamp(min=0).unsqueeze(-1).expand(*clusters.shape, per_cluster.shape[-1])
    return per_cluster.gather(3, index) * (clusters >= 0).unsqueeze(-1).to(per_cluster.dtype)


def _older_past(per_chunk: Tensor) -> Tensor:
    """Prefix sums over chunks ``0 .. t - 2`` for every chunk ``t`` (zeros for ``t < 2``).

    ``per_chunk`` is ``(B, H, T, ...)``; the result has the same shape.
    """
    prefix = torch.cumsum(per_chunk, dim=2)
    zeros = torch.zeros_like(prefix.narrow(2, 0, min(2, prefix.shape[2])))
    return torch.cat([zeros, prefix], dim=2).narrow(2, 0, per_chunk.shape[2])


def _older_past_adjoint(grad: Tensor) -> Tensor:
    """Adjoint of :func:`_older_past`: ``out[c] = sum_{t >= c + 2} grad[t]``."""
    suffix = torch.flip(torch.cumsum(torch.flip(grad, [2]), dim=2), [2])  # sum_{t >= c}
    zeros = suffix.new_zeros(*suffix.shape[:2], 2, *suffix.shape[3:])
    return torch.cat([suffix, zeros], dim=2).narrow(2, 2, grad.shape[2])


# Chunks are processed in groups whose (B, H, G, W, 2W + C) logits hold at most this many
# elements (512 MiB in fp32), so that the peak memory stays bounded at any length.
_GROUP_ELEMENTS = 2**27


class _CausalForward:
    """What forward and backward share: chunked inputs, masks and the cluster summaries.

    Two dtypes: ``acc`` (float32, or float64 for float64 inputs) for logits, softmax and
    the cluster sums; ``mm`` for the large matrix products, ``acc`` in the reference and
    the input's half precision on the tensor-core path (:func:`_tensor_core_dtype`).

    Shapes (``T`` chunks of ``W``): ``q (B,H,T,W,D)``, ``window_keys (B,H,T,2W,D)``,
    ``window_values (B,H,T,2W,Dv)`` (``mm``); ``counts (B,H,T,C)``, ``mean_keys (B,H,T,C,D)``,
    ``mean_values (B,H,T,C,Dv)`` (summaries of chunks ``0..t-2``, ``acc``);
    ``window_valid (B,T,2W)``; ``clusters (B,H,T,W)``. The ``(B,H,G,W,2W+C)`` logits are
    made per group of ``G`` chunks by :meth:`logits`.
    """

    def __init__(self, query, key, value, clusters, key_padding_mask, window, num_clusters, scale,
                 matmul_dtype=None):
        self.acc = acc = reference._compute_dtype(query.dtype)
        self.mm = mm = acc if matmul_dtype is None else matmul_dtype
        batch, heads, length, _ = query.shape
        self.length, self.window, self.scale, self.num_clusters = length, window, scale, num_clusters
        self.num_chunks = num_chunks = -(-length // window)
        self.q = _pad_to_chunks(query.to(mm), num_chunks, window)
        keys = _pad_to_chunks(key, num_chunks, window)
        values = _pad_to_chunks(value, num_chunks, window)
        valid = torch.ones(batch, length, dtype=torch.bool, device=query.device)
        if key_padding_mask is not None:
            valid = ~key_padding_mask
            clusters = clusters.masked_fill(key_padding_mask[:, None, :], -1)  # padded keys join no summary
        self.clusters = _pad_to_chunks(clusters, num_chunks, window, value=-1)  # (B, H, T, W)
        valid = _pad_to_chunks(valid, num_chunks, window, value=False)  # (B, T, W)

        self.window_keys = _with_previous_chunk(keys.to(mm), 0.0)
        self.window_values = _with_previous_chunk(values.to(mm), 0.0)
        # Query r of a chunk sees all W keys of the previous chunk and keys 0..r of its own.
        rows = torch.arange(window, device=query.device)
        self.causal = torch.cat([torch.ones(window, window, dtype=torch.bool, device=query.device),
                                 rows[None, :] <= rows[:, None]], dim=1)  # (W, 2W)
        self.window_valid = _with_previous_chunk(valid, False)  # (B, T, 2W)

        counts, key_sums, value_sums = _chunk_cluster_sums(keys.to(acc), values.to(acc), self.clusters,
                                                           num_clusters)
        self.counts = _older_past(counts)
        self.log_counts = torch.log(self.counts)  # log(0) = -inf drops empty clusters (all of chunks 0, 1)
        self.divisor = self.counts.clamp(min=1).unsqueeze(-1)
        self.mean_keys = _older_past(key_sums) / self.divisor
        self.mean_values = _older_past(value_sums) / self.divisor

        columns = causal_logit_columns(window, num_clusters)
        per_chunk = batch * heads * window * columns
        self.group_size = max(1, min(num_chunks, _GROUP_ELEMENTS // per_chunk))

    def groups(self):
        """Slices of consecutive chunks, ``group_size`` at a time."""
        return [slice(start, min(start + self.group_size, self.num_chunks))
                for start in range(0, self.num_chunks, self.group_size)]

    def logits(self, group: slice) -> Tensor:
        """Scaled logits of the group's queries ``(B, H, G, W, 2W + C)`` in ``acc``: window keys
        (``-inf`` where masked), then summaries (``+ log count``)."""
        q = self.q[:, :, group]
        # In-place steps on fresh tensors keep the peak memory down.
        exact = torch.matmul(q, self.window_keys[:, :, group].transpose(-1, -2)).to(self.acc).mul_(self.scale)
        allowed = self.causal[None, None, None] & self.window_valid[:, None, group, None, :]  # (B,1,G,W,2W)
        exact.masked_fill_(~allowed, float("-inf"))
        mean_keys = self.mean_keys[:, :, group].to(self.mm)
        summary = torch.matmul(q, mean_keys.transpose(-1, -2)).to(self.acc).mul_(self.scale)
        summary.add_(self.log_counts[:, :, group].unsqueeze(3))
        return torch.cat([exact, summary], dim=-1)

    def values(self, group: slice) -> Tensor:
        """Values of the group's ``2W + C`` softmax columns, ``(B, H, G, 2W + C, Dv)`` in ``mm``."""
        return torch.cat([self.window_values[:, :, group], self.mean_values[:, :, group].to(self.mm)], dim=3)

    def unchunk(self, x: Tensor) -> Tensor:
        """``(B, H, T, W, ...)`` -> ``(B, H, N, ...)`` without the padded tail."""
        return x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, : self.length].contiguous()


def _dropout_multipliers(keep_chunks: Optional[Tensor], dropout_p: float, group: slice, dtype) -> Optional[Tensor]:
    """The group's ``(B, H, G, W, 2W + C)`` multipliers ``1/(1-p)`` (kept) or 0, from the
    chunked keep-mask ``(B, H, T, W, 2W + C)``."""
    if keep_chunks is None:
        return None
    return keep_chunks[:, :, group].to(dtype) / (1.0 - dropout_p)


def _tensor_core_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """Matrix-product dtype of the CUDA path: the input's own half precision (fp32
    accumulation inside the products, fp32 softmax outside), else the reference's."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def causal_clustered_attention_fwd_ref(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    clusters: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    window: int,
    num_clusters: int,
    scale: float,
    dropout_p: float,
    matmul_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """Causal clustered attention with given key clusters (see the module docstring).

    Args:
        query, key: ``(B, H, N, D)``. value: ``(B, H, N, Dv)``.
        clusters: ``(B, H, N)`` int64 key cluster ids in ``[0, C)``, -1 = no cluster.
        key_padding_mask: ``(B, N)`` bool (True = padded) or None.
        keep: ``(B, H, N, 2W + C)`` bool dropout keep-mask over the softmax columns
            (``2W`` window keys, then ``C`` summaries) or None.
        window: ``W >= 1``. num_clusters: ``C``. scale: logit scale.
        dropout_p: drop probability behind ``keep``.
        matmul_dtype: dtype of the large matrix products (None: float32 / float64, the
            reference; the CUDA path passes bfloat16 / float16 for half-precision inputs).

    Returns:
        ``out (B, H, N, Dv)`` in the query dtype and ``lse (B, H, N)`` float32 (float64 for
        float64 input), the
        log-sum-exp of each query's logits (``+inf`` where it sees no valid key).
    """
    f = _CausalForward(query, key, value, clusters, key_padding_mask, window, num_clusters, scale,
                       matmul_dtype)
    keep_chunks = None if keep is None else _pad_to_chunks(keep, f.num_chunks, window, value=False)
    batch, heads = query.shape[:2]
    out = query.new_empty(batch, heads, f.num_chunks, window, value.shape[-1], dtype=f.acc)
    lse = query.new_empty(batch, heads, f.num_chunks, window, dtype=f.acc)
    for group in f.groups():
        logits = f.logits(group)
        lse[:, :, group] = group_lse = reference._log_sum_exp(logits)
        weights = logits.sub_(group_lse.unsqueeze(-1)).exp_()  # the logits are not needed any more
        drop = _dropout_multipliers(keep_chunks, dropout_p, group, f.acc)
        if drop is not None:
            weights.mul_(drop)
        out[:, :, group] = torch.matmul(weights.to(f.mm), f.values(group))
    return f.unchunk(out).to(query.dtype), f.unchunk(lse)  # lse in f.acc: float64 keeps its backward exact


def causal_clustered_attention_bwd_ref(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    clusters: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    window: int,
    num_clusters: int,
    scale: float,
    dropout_p: float,
    matmul_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`causal_clustered_attention_fwd_ref` w.r.t. query, key, value.

    Cluster ids are constants. With probabilities ``P``, dropout multipliers ``M``,
    columns' keys ``K`` and values ``V`` (window keys, then summary means):
    ``dP = (dout V^T) M``, ``dL = P (dP - rowsum(dout * out))``, ``dq = scale dL K``;
    window columns scatter ``scale dL^T q`` and ``(P M)^T dout`` back to chunks ``t - 1``
    and ``t``; summary columns give ``d kbar``, ``d vbar``, which flow through the mean
    (``/ n_j``) and the prefix sum over chunks back to every member key and value.

    Returns:
        ``dq (B, H, N, D)``, ``dk (B, H, N, D)``, ``dv (B, H, N, Dv)`` in the input dtypes.
    """
    f = _CausalForward(query, key, value, clusters, key_padding_mask, window, num_clusters, scale,
                       matmul_dtype)
    acc, mm, chunks, w = f.acc, f.mm, f.num_chunks, f.window
    g = _pad_to_chunks(grad_out.to(mm), chunks, w)
    lse_chunks = _pad_to_chunks(lse.to(acc), chunks, w, value=float("inf"))
    # rowsum(P * dP) = dout . out, with or without dropout.
    row_dot = (g.to(acc) * _pad_to_chunks(out, chunks, w).to(acc)).sum(-1, keepdim=True)
    keep_chunks = None if keep is None else _pad_to_chunks(keep, chunks, w, value=False)

    dq = torch.empty_like(f.q, dtype=acc)
    dk = torch.zeros_like(f.q, dtype=acc)  # (B, H, T, W, D)
    dv = torch.zeros(*g.shape, dtype=acc, device=g.device)
    grad_mean_keys = torch.empty_like(f.mean_keys)
    grad_mean_values = torch.empty_like(f.mean_values)
    for group in f.groups():
        probs = f.logits(group).sub_(lse_chunks[:, :, group].unsqueeze(-1)).exp_()
        drop = _dropout_multipliers(keep_chunks, dropout_p, group, acc)
        weights = (probs if drop is None else probs * drop).to(mm)
        g_group, q_group = g[:, :, group], f.q[:, :, group]
        grad_probs = torch.matmul(g_group, f.values(group).transpose(-1, -2)).to(acc)
        if drop is not None:
            grad_probs.mul_(drop)
        grad_logits = grad_probs.sub_(row_dot[:, :, group]).mul_(probs).mul_(scale).to(mm)
        grad_exact, grad_summary = grad_logits.split([2 * w, num_clusters], dim=-1)
        weights_exact, weights_summary = weights.split([2 * w, num_clusters], dim=-1)

        dq[:, :, group] = torch.matmul(grad_exact, f.window_keys[:, :, group]).to(acc) \
            + torch.matmul(grad_summary, f.mean_keys[:, :, group].to(mm)).to(acc)
        _fold_window_into(dk, torch.matmul(grad_exact.transpose(-1, -2), q_group), group)
        _fold_window_into(dv, torch.matmul(weights_exact.transpose(-1, -2), g_group), group)
        grad_mean_keys[:, :, group] = torch.matmul(grad_summary.transpose(-1, -2), q_group)
        grad_mean_values[:, :, group] = torch.matmul(weights_summary.transpose(-1, -2), g_group)

    # Summaries: kbar = older_past(key sums) / n, and likewise for values; each member key
    # and value receives its cluster's gradient of the sums.
    dk += _gather_clusters(_older_past_adjoint(grad_mean_keys / f.divisor), f.clusters)
    dv += _gather_clusters(_older_past_adjoint(grad_mean_values / f.divisor), f.clusters)
    return (f.unchunk(dq).to(query.dtype), f.unchunk(dk).to(key.dtype), f.unchunk(dv).to(value.dtype))


def _fold_window_into(grad_chunks: Tensor, grad_window: Tensor, group: slice) -> None:
    """Add the group's window-column gradients ``(B, H, G, 2W, E)`` to the keys they came
    from, ``grad_chunks (B, H, T, W, E)``: column block 1 of chunk ``t`` is chunk ``t``,
    column block 0 is chunk ``t - 1`` (nothing for ``t = 0``)."""
    previous, current = grad_window.to(grad_chunks.dtype).split(grad_window.shape[3] // 2, dim=3)
    grad_chunks[:, :, group] += current
    start = group.start
    if start == 0:
        previous, start = previous[:, :, 1:], 1
    grad_chunks[:, :, start - 1: group.stop - 1] += previous


# ================================================================ custom ops


@torch.library.custom_op(f"{LIBRARY}::causal_key_clusters", mutates_args=())
def causal_key_clusters_op(
    codes: Tensor, key_padding_mask: Optional[Tensor], window: int, num_clusters: int, iterations: int, bits: int
) -> Tensor:
    # On GPUs where the extension is built the lloyd_kmeans op's kernel fits and
    # _assign_to_codebook's kernel assigns.
    return key_clusters_from_codes(codes, key_padding_mask, window, num_clusters, iterations, bits,
                                   custom_ops.lloyd_kmeans)


@causal_key_clusters_op.register_fake
def _(codes, key_padding_mask, window, num_clusters, iterations, bits):
    return torch.empty_like(codes)


@torch.library.custom_op(f"{LIBRARY}::causal_clustered_attention_fwd", mutates_args=())
def causal_clustered_attention_fwd(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    clusters: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    window: int,
    num_clusters: int,
    scale: float,
    dropout_p: float,
) -> Tuple[Tensor, Tensor]:
    return causal_clustered_attention_fwd_ref(
        query, key, value, clusters, key_padding_mask, keep, window, num_clusters, scale, dropout_p
    )


@causal_clustered_attention_fwd.register_fake
def _(query, key, value, clusters, key_padding_mask, keep, window, num_clusters, scale, dropout_p):
    batch, heads, length, _ = query.shape
    out = query.new_empty(batch, heads, length, value.shape[-1])
    return out, query.new_empty(batch, heads, length, dtype=reference._compute_dtype(query.dtype))


@torch.library.custom_op(f"{LIBRARY}::causal_clustered_attention_bwd", mutates_args=())
def causal_clustered_attention_bwd(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    clusters: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    window: int,
    num_clusters: int,
    scale: float,
    dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    return causal_clustered_attention_bwd_ref(
        grad_out, query, key, value, clusters, key_padding_mask, keep, out, lse, window, num_clusters,
        scale, dropout_p,
    )


@causal_clustered_attention_bwd.register_fake
def _(grad_out, query, key, value, *args):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_causal(ctx, inputs, output):
    query, key, value, clusters, key_padding_mask, keep, window, num_clusters, scale, dropout_p = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(query, key, value, clusters, key_padding_mask, keep, out, lse)
    ctx.hyper = (window, num_clusters, scale, dropout_p)


def _backward_causal(ctx, grad_out, grad_lse):
    query, key, value, clusters, key_padding_mask, keep, out, lse = ctx.saved_tensors
    dq, dk, dv = causal_clustered_attention_bwd(
        grad_out.contiguous(), query, key, value, clusters, key_padding_mask, keep, out, lse, *ctx.hyper
    )
    return dq, dk, dv, None, None, None, None, None, None, None


causal_clustered_attention_fwd.register_autograd(_backward_causal, setup_context=_setup_causal)

# On CUDA, half-precision inputs take their large products on tensor cores (fp32
# accumulation, fp32 softmax and cluster sums); float32 / float64 stay the reference.
@causal_clustered_attention_fwd.register_kernel("cuda")
def _(query, key, value, clusters, key_padding_mask, keep, window, num_clusters, scale, dropout_p):
    return causal_clustered_attention_fwd_ref(
        query, key, value, clusters, key_padding_mask, keep, window, num_clusters, scale, dropout_p,
        matmul_dtype=_tensor_core_dtype(query.dtype),
    )


@causal_clustered_attention_bwd.register_kernel("cuda")
def _(grad_out, query, key, value, clusters, key_padding_mask, keep, out, lse, window, num_clusters, scale,
      dropout_p):
    return causal_clustered_attention_bwd_ref(
        grad_out, query, key, value, clusters, key_padding_mask, keep, out, lse, window, num_clusters, scale,
        dropout_p, matmul_dtype=_tensor_core_dtype(query.dtype),
    )


CAUSAL_OPS = (causal_key_clusters_op, causal_clustered_attention_fwd, causal_clustered_attention_bwd)


# ============================================================ public function


def causal_key_clusters(
    key: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    *,
    window: int = DEFAULT_WINDOW,
    num_clusters: int = DEFAULT_NUM_CLUSTERS,
    iterations: int = DEFAULT_ITERATIONS,
    bits: int = DEFAULT_BITS,
    planes: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Leak-free cluster ids of the keys ``(B, H, N, D)`` -> ``(B, H, N)`` int64.

    Keys are hashed with ``planes (bits, D)`` (or planes drawn from ``generator``); a
    codebook of ``num_clusters`` Hamming centroids is fitted with ``iterations`` Lloyd
    iterations on the valid keys of the first ``2 window`` positions; every valid key
    joins its nearest centroid, padded keys get -1.
    """
    from . import hash_queries, _resolve_planes  # the package imports this module last

    check_int_range("window", window, 1)
    check_clustering_args(num_clusters, iterations, bits)
    codes = hash_queries(key, _resolve_planes(key, bits, planes, generator))
    return causal_key_clusters_op(codes, key_padding_mask, window, num_clusters, iterations, bits)


def _check_clusters(clusters, query: Tensor) -> None:
    batch, heads, length, _ = query.shape
    if not isinstance(clusters, Tensor) or tuple(clusters.shape) != (batch, heads, length) \
            or clusters.dtype != torch.int64 or clusters.device != query.device:
        raise ValueError(
            f"clusters must be an int64 tensor of shape {(batch, heads, length)} (batch, heads, keys) on "
            f"{query.device} with ids in [0, num_clusters) and -1 for no cluster, got "
            f"{getattr(clusters, 'shape', clusters)}"
        )


def _eager_triton_attention(ops, query, key, value, clusters, window, num_clusters, iterations, bits, planes,
                            generator, scale, dropout_p) -> Tensor:
    """The Triton path in eager mode on CUDA: the registered kernels called without
    torch.library's dispatch, with the key clustering in the attention's own composition
    (one CUDA graph replay where it repeats) unless the clustering kernels cannot take it."""
    from . import _planes_on, _resolve_planes  # the package imports this module last

    hash_planes = hash_offsets = None
    if clusters is None and ops.clustering_why_not(key, num_clusters) is None:
        hash_planes, hash_offsets = _planes_on(key, _resolve_planes(key, bits, planes, generator), None)
    elif clusters is None:
        clusters = causal_key_clusters(key, None, window=window, num_clusters=num_clusters, iterations=iterations,
                                       bits=bits, planes=planes, generator=generator)
    keep = _keep_mask(query, window, num_clusters, dropout_p, generator)  # after the planes, as the reference
    return eager.CausalClusteredAttention.apply(ops, query, key, value, clusters, hash_planes, hash_offsets, window,
                                                num_clusters, iterations, bits, scale, keep, dropout_p)


def _keep_mask(query: Tensor, window: int, num_clusters: int, dropout_p: float, generator) -> Optional[Tensor]:
    """The dropout keep-mask ``(B, H, N, 2W + C)`` over every query's softmax columns, drawn
    from ``generator`` (None without dropout): every path takes the same mask."""
    batch, heads, length, _ = query.shape
    return dropout_keep_mask((batch, heads, length, causal_logit_columns(window, num_clusters)), dropout_p,
                             generator, query.device)


def causal_clustered_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    *,
    window: int = DEFAULT_WINDOW,
    num_clusters: int = DEFAULT_NUM_CLUSTERS,
    iterations: int = DEFAULT_ITERATIONS,
    bits: int = DEFAULT_BITS,
    planes: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    clusters: Optional[Tensor] = None,
) -> Tensor:
    """Leak-free causal clustered attention (self-attention: queries and keys share positions).

    Query ``i`` in chunk ``t = i // window`` attends exactly to positions
    ``[(t - 1) window, i]`` and, in the same softmax, to ``num_clusters`` summaries
    (mean key with logit offset ``log count``, mean value) of the key clusters of
    positions ``< (t - 1) window``. Cost ``O(N (2 window + C) D)``. Exact causal
    attention when ``N <= 2 window``.

    Args:
        query, key: ``(B, H, N, D)``. value: ``(B, H, N, Dv)``; float16, bfloat16,
            float32 or float64, on one device.
        key_padding_mask: ``(B, N)`` bool, True = padded key (never attended), or None.
        window: chunk size ``W >= 1``. num_clusters: ``C >= 1`` key clusters.
        iterations: Lloyd iterations ``>= 0`` of the codebook fit. bits: hash bits 1..63.
        planes: ``(bits, D)`` hash hyperplanes, or ``generator`` to draw them (needed only
            when ``N > 2 window`` and ``clusters`` is not given).
        scale: logit scale, default ``1/sqrt(D)``.
        dropout_p: dropout on the attention weights (window keys and summaries); needs
            ``generator``.
        clusters: precomputed ``(B, H, N)`` int64 key cluster ids (see
            :func:`causal_key_clusters`); they must be leak-free for the result to be.

    Returns:
        ``(B, H, N, Dv)`` in the query dtype; zeros for a query that sees no valid key.
    """
    check_attention_inputs(query, key, value, key_padding_mask, None)
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"causal attention is self-attention: query has {query.shape[2]} positions but key has "
            f"{key.shape[2]}; they must match"
        )
    check_int_range("window", window, 1)
    check_clustering_args(num_clusters, iterations, bits)
    check_probability("dropout_p", dropout_p)
    scale = resolve_scale(scale, query.shape[-1])
    batch, heads, length, _ = query.shape
    if clusters is not None:
        _check_clusters(clusters, query)
    elif length <= 2 * window:  # no query reads a summary: nothing to cluster
        clusters = torch.full((batch, heads, length), -1, dtype=torch.int64, device=query.device)
    from . import causal_fused, causal_triton, cuda_kernels  # they build on this module

    # Fastest first: one Triton kernel; else three flash-attention calls; else the reference.
    triton_ok = causal_triton.triton_path_unavailable(query, value, key_padding_mask, dropout_p, window,
                                                      num_clusters) is None
    ops = eager.implementations(query) if triton_ok else None
    if ops is not None:
        return _eager_triton_attention(ops, query, key, value, clusters, window, num_clusters, iterations, bits,
                                       planes, generator, scale, float(dropout_p))
    if clusters is None:
        clusters = causal_key_clusters(key, key_padding_mask, window=window, num_clusters=num_clusters,
                                       iterations=iterations, bits=bits, planes=planes, generator=generator)
    if triton_ok:
        keep = _keep_mask(query, window, num_clusters, dropout_p, generator)
        return causal_triton.causal_clustered_attention_triton(query, key, value, clusters, window, num_clusters,
                                                              scale, keep, float(dropout_p))
    why_not_fused = causal_fused.fused_path_unavailable(query, value, key_padding_mask, dropout_p, window)
    if why_not_fused is None:
        return causal_fused.causal_clustered_attention_fused(query, key, value, clusters, window, num_clusters,
                                                            scale)
    if query.is_cuda:
        cuda_kernels.warn_fallback("causal_clustered_attention", why_not_fused)
    keep = _keep_mask(query, window, num_clusters, dropout_p, generator)
    out, _ = causal_clustered_attention_fwd(
        query, key, value, clusters, key_padding_mask, keep, window, num_clusters, scale, float(dropout_p)
    )
    return out
