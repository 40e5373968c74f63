"""Readable pure-PyTorch reference of clustered attention.

This module is the CPU implementation of every op in :mod:`fairseq_clustered.ops`
and the oracle the CUDA kernels are tested against. It favours clarity over speed:
everything is vectorised over (batch, head) and computed in float32 (float64 when
the inputs are float64, so that ``gradcheck`` can use it).

Notation used in the docstrings (one (batch, head) pair at a time):

* ``B`` batch, ``H`` heads, ``N`` queries, ``S`` keys, ``D`` query/key dim,
  ``Dv`` value dim, ``C`` clusters, ``K`` top keys (``K = min(topk, S)``).
* ``assignments[b, h, i]`` is the cluster of query ``i`` or ``-1`` for a padded
  query; padded queries belong to no cluster and get an output of zeros.
* Padding masks are ``True`` where the position is padding (fairseq's convention).
* ``keep`` is an optional boolean dropout mask on the centroid attention weights,
  shape ``(B, H, C, S)``; kept weights are scaled by ``1 / (1 - dropout_p)``.

Every attention function returns, besides the output, the log-sum-exp of each
centroid's masked logits (``+inf`` for a centroid that sees no valid key, so that
``exp(logit - lse)`` is exactly zero there) and, for the improved variant, the
indices of the top keys. The backward functions take them back instead of
recomputing the softmax and the top-k selection.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "hash_codes_ref",
    "lloyd_kmeans_ref",
    "hamming_distance_ref",
    "clustered_attention_fwd_ref",
    "clustered_attention_bwd_ref",
    "improved_clustered_attention_fwd_ref",
    "improved_clustered_attention_bwd_ref",
    "exact_attention_ref",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else is upcast to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- hashing


def hash_codes_ref(x: Tensor, planes: Tensor, offsets: Tensor) -> Tensor:
    """Hash vectors with random hyperplanes into packed int64 codes.

    Bit ``b`` of the code of ``x_i`` is ``planes[b] . x_i > offsets[b]``.

    Args:
        x: ``(B, H, N, D)`` vectors (any floating dtype; the products are fp32).
        planes: ``(bits, D)`` hyperplane normals, ``1 <= bits <= 63``.
        offsets: ``(bits,)`` thresholds.

    Returns:
        ``(B, H, N)`` int64 codes in ``[0, 2**bits)``.
    """
    dtype = _compute_dtype(x.dtype)
    projections = torch.matmul(x.to(dtype), planes.to(dtype).t())  # (B, H, N, bits)
    bits = (projections > offsets.to(dtype)).to(torch.int64)
    weights = torch.ones_like(bits[0, 0, 0]) << torch.arange(bits.shape[-1], device=x.device)
    return (bits * weights).sum(-1)


def _unpack_bits(codes: Tensor, bits: int) -> Tensor:
    """``(..., )`` int64 codes -> ``(..., bits)`` float32 0/1 bits (lowest bit first)."""
    shifts = torch.arange(bits, device=codes.device)
    return ((codes.unsqueeze(-1) >> shifts) & 1).to(torch.float32)


def _pack_bits(bit_values: Tensor) -> Tensor:
    """``(..., bits)`` 0/1 values -> ``(...)`` int64 codes."""
    shifts = torch.arange(bit_values.shape[-1], device=bit_values.device)
    return (bit_values.to(torch.int64) << shifts).sum(-1)


def hamming_distance_ref(codes: Tensor, centroid_codes: Tensor, bits: int) -> Tensor:
    """Pairwise Hamming distances.

    Args:
        codes: ``(B, H, N)`` int64. centroid_codes: ``(B, H, C)`` int64.

    Returns:
        ``(B, H, N, C)`` float32 distances (exact integers).
    """
    q = _unpack_bits(codes, bits)
    c = _unpack_bits(centroid_codes, bits)
    # popcount(a xor b) = sum a (1 - b) + (1 - a) b, as two exact small-integer matmuls.
    return torch.matmul(q, (1 - c).transpose(-1, -2)) + torch.matmul(1 - q, c.transpose(-1, -2))


# ------------------------------------------------------------------------ clustering


def _valid_ranks(valid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Ranks of the valid positions.

    Args:
        valid: ``(B, N)`` bool, True for a real (non-padded) query.

    Returns:
        ``rank`` ``(B, N)`` int64 (rank among valid positions, -1 where padded),
        ``valid_positions`` ``(B, N)`` int64 (valid positions first, in order),
        ``num_valid`` ``(B,)`` int64.
    """
    rank = torch.cumsum(valid.to(torch.int64), dim=1) - 1
    rank = torch.where(valid, rank, torch.full_like(rank, -1))
    valid_positions = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    return rank, valid_positions, valid.sum(1)


def lloyd_kmeans_ref(
    codes: Tensor,
    query_padding_mask: Optional[Tensor],
    num_clusters: int,
    iterations: int,
    bits: int,
) -> Tuple[Tensor, Tensor]:
    """Lloyd's k-means of hash codes in Hamming space.

    Initial centroids are the codes of ``C`` distinct valid queries, evenly spaced
    among the valid positions (query rank ``floor(j * num_valid / C)`` for centroid
    ``j``). One iteration assigns every valid query to its nearest centroid (ties:
    lowest index) and then sets every centroid bit to the majority bit of its members
    (ties and empty clusters keep the old bit). After ``iterations`` iterations the
    queries are assigned once more to the final centroids, so ``iterations = 0`` is
    "assign to the initial centroids" and the total distance never increases with
    ``iterations``.

    Where a row has at most ``C`` valid queries, every valid query is its own
    cluster (cluster id = its rank among the valid queries), which makes clustered
    attention exact.

    Args:
        codes: ``(B, H, N)`` int64 hash codes.
        query_padding_mask: ``(B, N)`` bool, True = padded query, or None.
        num_clusters: ``C >= 1``. iterations: ``>= 0``. bits: code width, 1..63.

    Returns:
        ``assignments`` ``(B, H, N)`` int64 in ``[0, C)``, -1 for padded queries;
        ``centroid_codes`` ``(B, H, C)`` int64.
    """
    batch, heads, length = codes.shape
    device = codes.device
    if query_padding_mask is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        valid = ~query_padding_mask.to(torch.bool)
    rank, valid_positions, num_valid = _valid_ranks(valid)
    cluster_ids = torch.arange(num_clusters, device=device)

    # Initial centroids: codes of evenly spaced valid queries.
    init_rank = (cluster_ids.unsqueeze(0) * num_valid.unsqueeze(1)) // num_clusters  # (B, C)
    init_pos = valid_positions.gather(1, init_rank.clamp(max=max(length - 1, 0)))
    centroids = codes.gather(2, init_pos.unsqueeze(1).expand(batch, heads, num_clusters))

    query_bits = _unpack_bits(codes, bits)  # (B, H, N, bits)
    valid_f = valid.to(torch.float32)[:, None, :, None]  # (B, 1, N, 1)

    def assign(centroid_codes: Tensor) -> Tensor:
        distances = hamming_distance_ref(codes, centroid_codes, bits)
        return distances.argmin(-1)  # argmin returns the first (lowest) index on ties

    for _ in range(iterations):
        members = torch.nn.functional.one_hot(assign(centroids), num_clusters).to(torch.float32)
        members = members * valid_f  # padded queries join no cluster
        counts = members.sum(2).unsqueeze(-1)  # (B, H, C, 1)
        ones = torch.matmul(members.transpose(-1, -2), query_bits)  # (B, H, C, bits)
        old_bits = _unpack_bits(centroids, bits)
        new_bits = torch.where(2 * ones > counts, 1.0, torch.where(2 * ones < counts, 0.0, old_bits))
        centroids = _pack_bits(new_bits)

    assignments = assign(centroids)

    # Rows with at most C valid queries: every valid query is its own cluster.
    singleton = (num_valid <= num_clusters)[:, None, None]  # (B, 1, 1)
    singleton_assign = rank.unsqueeze(1).expand(batch, heads, length)
    assignments = torch.where(singleton, singleton_assign, assignments)
    singleton_centroids = codes.gather(
        2, valid_positions[:, :num_clusters].unsqueeze(1).expand(batch, heads, -1)
    )
    singleton_centroids = torch.nn.functional.pad(
        singleton_centroids, (0, num_clusters - singleton_centroids.shape[-1])
    )
    has_member = cluster_ids.unsqueeze(0) < num_valid.unsqueeze(1)  # (B, C)
    singleton_centroids = singleton_centroids * has_member.unsqueeze(1)
    centroids = torch.where(singleton, singleton_centroids, centroids)

    assignments = torch.where(valid.unsqueeze(1), assignments, torch.full_like(assignments, -1))
    return assignments, centroids


# ------------------------------------------------------------------ shared pieces


def _membership(assignments: Tensor, num_clusters: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """One-hot membership ``(B, H, N, C)`` (zero rows for padded queries) and
    cluster sizes ``(B, H, C)``."""
    members = (assignments.unsqueeze(-1) == torch.arange(num_clusters, device=assignments.device))
    members = members.to(dtype)
    return members, members.sum(2)


def _centroids(queries: Tensor, members: Tensor, counts: Tensor) -> Tensor:
    """Mean of each cluster's member queries, ``(B, H, C, D)``; zeros for empty clusters."""
    sums = torch.matmul(members.transpose(-1, -2), queries)
    return sums / counts.clamp(min=1).unsqueeze(-1)


def cluster_centroids_ref(query: Tensor, assignments: Tensor, num_clusters: int) -> Tensor:
    """Mean member query of every cluster, ``(B, H, C, D)`` in float32 (float64 for float64
    input); zeros for empty clusters. The clustered forward returns it for its backward."""
    dtype = _compute_dtype(query.dtype)
    members, counts = _membership(assignments, num_clusters, dtype)
    return _centroids(query.to(dtype), members, counts)


def _centroid_logits(centroids: Tensor, key: Tensor, key_padding_mask: Optional[Tensor], scale: float) -> Tensor:
    """Scaled centroid-key logits ``(B, H, C, S)``, ``-inf`` at padded keys."""
    logits = torch.matmul(centroids, key.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))
    return logits


def _log_sum_exp(logits: Tensor) -> Tensor:
    """Row log-sum-exp, ``+inf`` for rows that are entirely ``-inf``."""
    lse = torch.logsumexp(logits, dim=-1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def _dropout_scale(keep: Optional[Tensor], dropout_p: float, dtype: torch.dtype) -> Optional[Tensor]:
    """Dropout multipliers ``(B, H, C, S)``: ``1/(1-p)`` where kept, 0 where dropped."""
    if keep is None:
        return None
    return keep.to(dtype) / (1.0 - dropout_p)


def _per_query(per_cluster: Tensor, assignments: Tensor) -> Tensor:
    """Broadcast ``(B, H, C, ...)`` per-cluster values to ``(B, H, N, ...)`` by assignment.

    Padded queries (assignment -1) read cluster 0; callers zero them afterwards.
    """
    index = assignments.clamp(min=0)
    trailing = per_cluster.shape[3:]
    index = index.reshape(*index.shape, *([1] * len(trailing))).expand(*index.shape, *trailing)
    return per_cluster.gather(2, index)


def _valid_query_mask(assignments: Tensor, dtype: torch.dtype) -> Tensor:
    return (assignments >= 0).to(dtype).unsqueeze(-1)


def _softmax_backward(probs: Tensor, grad_probs: Tensor) -> Tensor:
    """Gradient of the logits of a softmax along the last dim."""
    return probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))


# ------------------------------------------------------------ clustered attention


def clustered_attention_fwd_ref(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    assignments: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    num_clusters: int,
    scale: float,
    dropout_p: float,
) -> Tuple[Tensor, Tensor]:
    """Clustered attention with given clusters.

    ``out_i = softmax(scale * mean_{m in c(i)} q_m . K^T) V`` for every valid query ``i``
    of cluster ``c(i)``.

    Args:
        query: ``(B, H, N, D)``. key: ``(B, H, S, D)``. value: ``(B, H, S, Dv)``.
        assignments: ``(B, H, N)`` int64 cluster ids in ``[0, C)``, -1 = padded query.
        key_padding_mask: ``(B, S)`` bool (True = padded) or None.
        keep: ``(B, H, C, S)`` bool dropout keep-mask or None.
        num_clusters: ``C``. scale: logit scale. dropout_p: drop probability behind ``keep``.

    Returns:
        ``out`` ``(B, H, N, Dv)`` in the query dtype (zeros for padded queries) and
        ``lse`` ``(B, H, C)`` float32 (float64 for float64 input) log-sum-exp of each centroid's logits.
    """
    dtype = _compute_dtype(query.dtype)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    members, counts = _membership(assignments, num_clusters, dtype)
    logits = _centroid_logits(_centroids(q, members, counts), k, key_padding_mask, scale)
    lse = _log_sum_exp(logits)
    weights = torch.exp(logits - lse.unsqueeze(-1))
    drop = _dropout_scale(keep, dropout_p, dtype)
    if drop is not None:
        weights = weights * drop
    centroid_values = torch.matmul(weights, v)  # (B, H, C, Dv)
    out = _per_query(centroid_values, assignments) * _valid_query_mask(assignments, dtype)
    return out.to(query.dtype), lse  # float64 for float64 input: keeps its backward exact


def clustered_attention_bwd_ref(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    assignments: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    lse: Tensor,
    num_clusters: int,
    scale: float,
    dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`clustered_attention_fwd_ref` w.r.t. query, key and value.

    The clusters are constants. With ``G_j = sum_{i in j} dout_i``:
    ``dV = A^T G``, ``dA = G V^T``, ``dL = A * (dA - rowsum(A * dA))``,
    ``dK = scale dL^T Qbar``, ``dq_i = scale (dL K)_{c(i)} / |c(i)|``.

    Returns:
        ``dq (B, H, N, D)``, ``dk (B, H, S, D)``, ``dv (B, H, S, Dv)`` in the input dtypes.
    """
    dtype = _compute_dtype(query.dtype)
    q, k, v, g = query.to(dtype), key.to(dtype), value.to(dtype), grad_out.to(dtype)
    members, counts = _membership(assignments, num_clusters, dtype)
    centroids = _centroids(q, members, counts)
    logits = _centroid_logits(centroids, k, key_padding_mask, scale)
    probs = torch.exp(logits - lse.to(dtype).unsqueeze(-1))
    drop = _dropout_scale(keep, dropout_p, dtype)
    weights = probs if drop is None else probs * drop

    grad_centroid_values = torch.matmul(members.transpose(-1, -2), g)  # (B, H, C, Dv)
    dv = torch.matmul(weights.transpose(-1, -2), grad_centroid_values)
    grad_weights = torch.matmul(grad_centroid_values, v.transpose(-1, -2))
    if drop is not None:
        grad_weights = grad_weights * drop
    grad_logits = _softmax_backward(probs, grad_weights) * scale
    dk = torch.matmul(grad_logits.transpose(-1, -2), centroids)
    grad_centroids = torch.matmul(grad_logits, k) / counts.clamp(min=1).unsqueeze(-1)
    dq = torch.matmul(members, grad_centroids)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


# --------------------------------------------------- improved clustered attention


def _top_keys(logits: Tensor, key_padding_mask: Optional[Tensor], topk: int) -> Tuple[Tensor, Tensor]:
    """Top ``K = min(topk, S)`` keys of each centroid and which of them are real keys.

    Returns ``top_index`` ``(B, H, C, K)`` int64 and ``top_valid`` ``(B, H, C, K)`` bool
    (False where the selection had to fall back on a padded key).
    """
    k = min(topk, logits.shape[-1])
    top_index = torch.topk(logits, k, dim=-1).indices
    return top_index, _top_valid(top_index, key_padding_mask)


def _top_valid(top_index: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    if key_padding_mask is None:
        return torch.ones_like(top_index, dtype=torch.bool)
    batch, heads = top_index.shape[:2]
    not_padded = ~key_padding_mask.to(torch.bool)[:, None, None, :].expand(batch, heads, 1, -1)
    return not_padded.expand(-1, -1, top_index.shape[2], -1).gather(-1, top_index)


def _gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """``rows (B, H, S, E)``, ``index (B, H, N, K)`` -> ``(B, H, N, K, E)``."""
    batch, heads, n, k = index.shape
    flat = index.reshape(batch, heads, n * k, 1).expand(-1, -1, -1, rows.shape[-1])
    return rows.gather(2, flat).reshape(batch, heads, n, k, rows.shape[-1])


def _scatter_rows(grad_rows: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """Adjoint of :func:`_gather_rows`: ``(B, H, N, K, E)`` -> ``(B, H, S, E)`` sums."""
    batch, heads, n, k, e = grad_rows.shape
    out = grad_rows.new_zeros(batch, heads, num_rows, e)
    flat = index.reshape(batch, heads, n * k, 1).expand(-1, -1, -1, e)
    return out.scatter_add_(2, flat, grad_rows.reshape(batch, heads, n * k, e))


class _ImprovedForward:
    """Intermediate values of the improved clustered attention, shared by forward and backward.

    Shapes: ``members (B,H,N,C)``, ``counts (B,H,C)``, ``centroids (B,H,C,D)``,
    ``probs (B,H,C,S)`` centroid attention, ``drop (B,H,C,S)`` or None,
    ``top_index / top_valid (B,H,C,K)``, ``mass (B,H,C)`` = attention mass on the top keys,
    ``query_index (B,H,N,K)`` each query's top keys, ``query_drop (B,H,N,K)``,
    ``top_keys / top_values (B,H,N,K,D / Dv)``, ``top_probs (B,H,N,K)`` exact softmax
    over the top keys, ``rest_weights (B,H,C,S)`` centroid weights off the top keys,
    ``exact (B,H,N,Dv)`` the exact part per query.
    """

    def __init__(self, q, k, v, assignments, key_padding_mask, keep, num_clusters, scale,
                 dropout_p, topk=None, lse=None, top_index=None):
        """Either ``topk`` (forward: select the top keys) or the forward's ``lse`` and
        ``top_index`` (backward: reuse them) must be given."""
        dtype = q.dtype
        self.members, self.counts = _membership(assignments, num_clusters, dtype)
        self.centroids = _centroids(q, self.members, self.counts)
        logits = _centroid_logits(self.centroids, k, key_padding_mask, scale)
        if lse is None:
            lse = _log_sum_exp(logits)
            top_index, self.top_valid = _top_keys(logits, key_padding_mask, topk)
        else:
            self.top_valid = _top_valid(top_index, key_padding_mask)
        self.lse, self.top_index = lse.to(dtype), top_index
        self.probs = torch.exp(logits - lse.to(dtype).unsqueeze(-1))
        self.drop = _dropout_scale(keep, dropout_p, dtype)
        on_top = torch.zeros_like(self.probs).scatter_(-1, top_index, 1.0)
        self.off_top = 1.0 - on_top
        self.mass = (self.probs.gather(-1, top_index) * self.top_valid).sum(-1)
        self.rest_weights = self.probs * self.off_top
        if self.drop is not None:
            self.rest_weights = self.rest_weights * self.drop

        self.query_index = _per_query(top_index, assignments)
        query_valid = _per_query(self.top_valid, assignments)
        self.top_keys = _gather_rows(k, self.query_index)
        self.top_values = _gather_rows(v, self.query_index)
        top_logits = torch.einsum("bhnd,bhnkd->bhnk", q, self.top_keys) * scale
        top_logits = top_logits.masked_fill(~query_valid, float("-inf"))
        # A query whose cluster sees no valid key gets zeros, not NaN.
        self.top_probs = torch.softmax(top_logits, dim=-1).nan_to_num(0.0)
        self.query_drop = None
        weights = self.top_probs
        if self.drop is not None:
            self.query_drop = _per_query(self.drop.gather(-1, top_index), assignments)
            weights = weights * self.query_drop
        self.exact = torch.einsum("bhnk,bhnke->bhne", weights, self.top_values)


def improved_clustered_attention_fwd_ref(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    assignments: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    num_clusters: int,
    topk: int,
    scale: float,
    dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Improved clustered attention with given clusters.

    For query ``i`` of cluster ``j`` with centroid attention ``A_j`` and top keys
    ``T_j`` (the ``min(topk, S)`` largest entries of ``A_j``, never padded keys unless
    fewer valid keys exist, in which case those slots are ignored):
    ``out_i = m_j * sum_{l in T_j} softmax_{T_j}(scale q_i . k_l) v_l + sum_{l not in T_j} A_j[l] v_l``
    with ``m_j = sum_{l in T_j} A_j[l]``. With ``topk >= S`` this is exact attention.

    Args: as :func:`clustered_attention_fwd_ref`, plus ``topk >= 1``.

    Returns:
        ``out (B, H, N, Dv)`` in the query dtype, ``lse (B, H, C)`` float32 (float64 for float64 input) and
        ``top_index (B, H, C, K)`` int64 with ``K = min(topk, S)``.
    """
    dtype = _compute_dtype(query.dtype)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    f = _ImprovedForward(q, k, v, assignments, key_padding_mask, keep, num_clusters, scale,
                         dropout_p, topk=topk)
    rest = torch.matmul(f.rest_weights, v)  # (B, H, C, Dv)
    out = _per_query(f.mass, assignments).unsqueeze(-1) * f.exact + _per_query(rest, assignments)
    out = out * _valid_query_mask(assignments, dtype)
    return out.to(query.dtype), f.lse, f.top_index


def improved_clustered_attention_bwd_ref(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    assignments: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    lse: Tensor,
    top_index: Tensor,
    num_clusters: int,
    scale: float,
    dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`improved_clustered_attention_fwd_ref` w.r.t. query, key, value.

    Clusters and top-key indices are constants; gradients flow through the centroids,
    the centroid attention (via the mass ``m_j`` and the remainder), and the exact
    top-key products.

    Returns:
        ``dq (B, H, N, D)``, ``dk (B, H, S, D)``, ``dv (B, H, S, Dv)`` in the input dtypes.
    """
    dtype = _compute_dtype(query.dtype)
    q, k, v, g = query.to(dtype), key.to(dtype), value.to(dtype), grad_out.to(dtype)
    g = g * _valid_query_mask(assignments, dtype)
    f = _ImprovedForward(q, k, v, assignments, key_padding_mask, keep, num_clusters, scale,
                         dropout_p, lse=lse, top_index=top_index)
    num_keys = k.shape[2]

    # out_i = m_j * exact_i + rest_j
    grad_rest = torch.matmul(f.members.transpose(-1, -2), g)  # (B, H, C, Dv)
    grad_mass = torch.matmul(f.members.transpose(-1, -2), (g * f.exact).sum(-1, keepdim=True)).squeeze(-1)
    grad_exact = _per_query(f.mass, assignments).unsqueeze(-1) * g  # (B, H, N, Dv)

    # rest_j = sum_l rest_weights[j, l] v_l
    dv = torch.matmul(f.rest_weights.transpose(-1, -2), grad_rest)
    grad_probs = torch.matmul(grad_rest, v.transpose(-1, -2)) * f.off_top
    if f.drop is not None:
        grad_probs = grad_probs * f.drop
    # m_j = sum_{l in T_j} probs[j, l]
    grad_probs = grad_probs.scatter_add(
        -1, f.top_index, grad_mass.unsqueeze(-1).expand(f.top_index.shape) * f.top_valid
    )

    # exact_i = sum_l top_probs[i, l] * drop * v_l
    weights = f.top_probs if f.query_drop is None else f.top_probs * f.query_drop
    dv = dv + _scatter_rows(weights.unsqueeze(-1) * grad_exact.unsqueeze(-2), f.query_index, num_keys)
    grad_top_probs = torch.einsum("bhne,bhnke->bhnk", grad_exact, f.top_values)
    if f.query_drop is not None:
        grad_top_probs = grad_top_probs * f.query_drop
    grad_top_logits = _softmax_backward(f.top_probs, grad_top_probs) * scale
    dq = torch.einsum("bhnk,bhnkd->bhnd", grad_top_logits, f.top_keys)
    dk = _scatter_rows(grad_top_logits.unsqueeze(-1) * q.unsqueeze(-2), f.query_index, num_keys)

    # centroid attention: probs = softmax(scale * centroids K^T)
    grad_logits = _softmax_backward(f.probs, grad_probs) * scale
    dk = dk + torch.matmul(grad_logits.transpose(-1, -2), f.centroids)
    grad_centroids = torch.matmul(grad_logits, k) / f.counts.clamp(min=1).unsqueeze(-1)
    dq = dq + torch.matmul(f.members, grad_centroids)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


# -------------------------------------------------------------------- exact oracle


def exact_attention_ref(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Plain softmax attention in fp32 (fp64 for fp64 inputs), the oracle for exactness.

    Shapes: ``(B, H, N, D)``, ``(B, H, S, D)``, ``(B, H, S, Dv)``, mask ``(B, S)``;
    returns ``(B, H, N, Dv)``. Rows with no valid key are zeros.
    """
    dtype = _compute_dtype(query.dtype)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(query.to(dtype), key.to(dtype).transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, value.to(dtype)).to(query.dtype)
