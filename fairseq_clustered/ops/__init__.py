"""Public clustered-attention functions.

All functions take per-head tensors shaped ``(B, H, N, D)`` (batch, heads,
positions, features) and boolean padding masks shaped ``(B, length)`` with
``True`` at padded positions. Randomness (hash hyperplanes, dropout) comes only
from an explicit ``torch.Generator`` or explicit ``planes``: never from the
global RNG, so the same generator state gives the same result.

Typical use::

    g = torch.Generator().manual_seed(0)
    out = clustered_attention(q, k, v, key_padding_mask, num_clusters=100, generator=g)
    out = improved_clustered_attention(q, k, v, key_padding_mask, topk=32, generator=g)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import custom_ops, eager, reference
from .validation import (
    check_attention_inputs,
    check_clustering_args,
    check_int_range,
    check_padding_mask,
    check_planes,
    check_probability,
    dropout_keep_mask,
    resolve_scale,
)

__all__ = [
    "draw_hash_planes",
    "hash_queries",
    "cluster_queries",
    "clustered_attention",
    "improved_clustered_attention",
    "reference",
    "custom_ops",
]

DEFAULT_NUM_CLUSTERS = 100
DEFAULT_ITERATIONS = 10
DEFAULT_BITS = 63
DEFAULT_TOPK = 32


def draw_hash_planes(bits: int, dim: int, generator: torch.Generator, device=None) -> Tensor:
    """Random hyperplane normals ``(bits, dim)`` float32 drawn from ``N(0, 1)`` with ``generator``,
    each rounded to bfloat16's 8 significant bits (stored as float32).

    The rounding moves a normal by at most 0.4% of each coordinate, which leaves it as random a
    direction as before, and it makes hashing cheaper without making it less exact: a bf16 or
    fp16 query times a bf16 plane is exact in float32, so the tensor-core hashing takes one
    product per plane where full float32 planes take three (their parts; ``hash_triton``). Any
    float32 planes passed as ``planes=`` still hash exactly as the reference does.
    The planes are drawn on the generator's device and moved to ``device``.
    """
    check_int_range("bits", bits, 1, 63)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    planes = torch.randn(bits, dim, generator=generator, device=generator.device, dtype=torch.float32)
    planes = planes.to(torch.bfloat16).float()
    return planes if device is None else planes.to(device)


def hash_queries(x: Tensor, planes: Tensor, offsets: Optional[Tensor] = None) -> Tensor:
    """Hash ``x (B, H, N, D)`` with hyperplanes ``planes (bits, D)`` into ``(B, H, N)`` int64.

    Bit ``b`` is ``planes[b] . x_i > offsets[b]`` (offsets default to zero).
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must have shape (batch, heads, length, dim), got {getattr(x, 'shape', x)}")
    # Codes are integers, constants for autograd: detached, the backward gets no node that
    # would only add a zero gradient of x's size.
    return custom_ops.hash_codes(x.detach(), *_hash_planes(x, planes, offsets))


def _hash_planes(x: Tensor, planes: Tensor, offsets: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Checked ``planes (bits, D)`` and ``offsets (bits,)``, fp32 and contiguous on ``x``'s device."""
    bits = planes.shape[0] if isinstance(planes, Tensor) and planes.dim() == 2 else -1
    check_int_range("bits (planes.shape[0])", bits, 1, 63)
    check_planes(planes, bits, x.shape[-1], offsets)
    return _planes_on(x, planes, offsets)


def _planes_on(x: Tensor, planes: Tensor, offsets: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """:func:`_hash_planes` of planes (and offsets) already checked."""
    bits = planes.shape[0]
    if planes.device != x.device or planes.dtype != torch.float32 or not planes.is_contiguous():
        planes = planes.to(device=x.device, dtype=torch.float32).contiguous()
    if offsets is None:
        return planes, _zero_offsets(bits, x.device)
    return planes, offsets.to(device=x.device, dtype=torch.float32).contiguous()


_ZERO_OFFSETS = {}


def _zero_offsets(bits: int, device: torch.device) -> Tensor:
    """``(bits,)`` fp32 zeros on ``device``, made once per (bits, device): every call without
    offsets needs them, and on a GPU allocating and zero-filling them is a kernel launch that
    costs more CPU time than the hashing call's own Python. Never written (the kernels read
    offsets only)."""
    if torch.compiler.is_compiling():  # no module state inside a traced graph
        return torch.zeros(bits, device=device)
    zeros = _ZERO_OFFSETS.get((bits, device))
    if zeros is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Made inside someone's CUDA graph capture, the zeros would be filled only when that
            # graph replays and would live in its private pool: not kept.
            return torch.zeros(bits, device=device)
        with torch.inference_mode(False):  # usable outside inference mode too
            zeros = _ZERO_OFFSETS[(bits, device)] = torch.zeros(bits, device=device)
    return zeros


def _resolve_planes(query: Tensor, bits: int, planes: Optional[Tensor], generator) -> Tensor:
    if planes is not None:
        check_planes(planes, bits, query.shape[-1], None)
        return planes
    if generator is None:
        raise ValueError(
            "pass generator= (a torch.Generator to draw hash planes from) or planes= "
            f"(a (bits={bits}, dim={query.shape[-1]}) tensor); the global RNG is never used"
        )
    return draw_hash_planes(bits, query.shape[-1], generator, device=query.device)


def cluster_queries(
    query: Tensor,
    query_padding_mask: Optional[Tensor] = None,
    *,
    num_clusters: int = DEFAULT_NUM_CLUSTERS,
    iterations: int = DEFAULT_ITERATIONS,
    bits: int = DEFAULT_BITS,
    planes: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Hash the queries and cluster them with Lloyd's k-means in Hamming space.

    Args:
        query: ``(B, H, N, D)``.
        query_padding_mask: ``(B, N)`` bool, True = padded (joins no cluster), or None.
        num_clusters: ``C >= 1``; with ``C >=`` the valid queries of a row, every
            query is its own cluster.
        iterations: Lloyd iterations, ``>= 0``. bits: hash bits, 1..63.
        planes: ``(bits, D)`` hyperplanes, or None to draw them from ``generator``.

    Returns:
        ``assignments (B, H, N)`` int64 in ``[0, C)`` (-1 for padded queries) and
        ``centroid_codes (B, H, C)`` int64.
    """
    check_clustering_args(num_clusters, iterations, bits)
    if not isinstance(query, Tensor) or query.dim() != 4:
        raise ValueError(f"query must have shape (batch, heads, length, dim), got {getattr(query, 'shape', query)}")
    check_padding_mask("query_padding_mask", query_padding_mask, query.shape[0], query.shape[2], query.device)
    planes, offsets = _planes_on(query, _resolve_planes(query, bits, planes, generator), None)
    args = (query.detach(), planes, offsets, query_padding_mask, num_clusters, iterations, bits)
    ops = eager.implementations(query)
    return custom_ops.cluster_queries(*args) if ops is None else ops.cluster_queries(*args)


def _prepare(
    ops, query, key, value, key_padding_mask, query_padding_mask, num_clusters, iterations, bits,
    planes, generator, scale, dropout_p, clusters,
):
    """Shared validation and clustering of both attention variants -> ``clusters, keep, scale,
    clustering``. With the eager CUDA ``ops`` and no ``clusters`` given, the queries are not
    clustered here: ``clusters`` is None and ``clustering = (planes, offsets, query_padding_mask,
    iterations, bits)`` is handed to the attention, whose composition clusters them (one graph
    replay less per step); otherwise ``clustering`` is None."""
    check_attention_inputs(query, key, value, key_padding_mask, query_padding_mask)
    check_clustering_args(num_clusters, iterations, bits)
    check_probability("dropout_p", dropout_p)
    scale = resolve_scale(scale, query.shape[-1])
    clustering = None
    if clusters is None and ops is not None:
        planes, offsets = _planes_on(query, _resolve_planes(query, bits, planes, generator), None)
        clustering = (planes, offsets, query_padding_mask, iterations, bits)
    elif clusters is None:
        clusters, _ = cluster_queries(
            query, query_padding_mask, num_clusters=num_clusters, iterations=iterations, bits=bits,
            planes=planes, generator=generator,
        )
    elif not isinstance(clusters, Tensor) or tuple(clusters.shape) != tuple(query.shape[:3]) \
            or clusters.dtype != torch.int64:
        raise ValueError(
            f"clusters must be an int64 tensor of shape {tuple(query.shape[:3])} (batch, heads, queries) "
            f"with ids in [0, num_clusters) and -1 for padded queries, got {getattr(clusters, 'shape', clusters)}"
        )
    keep = dropout_keep_mask((query.shape[0], query.shape[1], num_clusters, key.shape[2]), dropout_p, generator,
                             query.device)
    return clusters, keep, scale, clustering


def clustered_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    *,
    num_clusters: int = DEFAULT_NUM_CLUSTERS,
    iterations: int = DEFAULT_ITERATIONS,
    bits: int = DEFAULT_BITS,
    planes: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    clusters: Optional[Tensor] = None,
) -> Tensor:
    """Clustered attention (Vyas et al., 2020).

    Queries are hashed and grouped into ``num_clusters`` clusters; each cluster's
    centroid (mean query) attends to all keys once and every member receives the
    centroid's output. Cost ``O(N C D)`` instead of ``O(N S D)``.

    Args:
        query: ``(B, H, N, D)``. key: ``(B, H, S, D)``. value: ``(B, H, S, Dv)``;
            float16, bfloat16, float32 or float64, all on one device.
        key_padding_mask: ``(B, S)`` bool, True = padded key, or None.
        query_padding_mask: ``(B, N)`` bool, True = padded query (output zeros), or None.
        num_clusters: ``C >= 1``. iterations: Lloyd iterations ``>= 0``. bits: 1..63.
        planes: ``(bits, D)`` hash hyperplanes; or ``generator`` to draw them.
        scale: logit scale, default ``1/sqrt(D)``.
        dropout_p: dropout on the centroid attention weights (shared by a cluster);
            needs ``generator``.
        clusters: precomputed ``(B, H, N)`` int64 assignments (skips hashing).

    Returns:
        ``(B, H, N, Dv)`` in the query dtype. Exact attention when ``num_clusters``
        is at least the number of valid queries.
    """
    ops = eager.implementations(query)
    clusters, keep, scale, clustering = _prepare(
        ops, query, key, value, key_padding_mask, query_padding_mask, num_clusters, iterations, bits,
        planes, generator, scale, dropout_p, clusters,
    )
    args = (query, key, value, clusters, key_padding_mask, keep, num_clusters, scale, float(dropout_p))
    if ops is not None:
        # the step from C++ where the graph cache holds its graphs (the host's time is most of the step
        # below 8k positions); else through Python
        out = None if clustering is None else ops.clustered_step(query, key, value, key_padding_mask, keep,
                                                                 num_clusters, scale, float(dropout_p), clustering)
        if out is not None:
            return out
        if clustering is not None and not _records_gradient(query, key, value) and ops.packs_clustered(
                query, value, num_clusters):  # evaluation: a forward that keeps nothing for a backward
            return ops.clustered_fwd_inference(query, key, value, *clustering, key_padding_mask, keep, num_clusters,
                                               scale, float(dropout_p))
        return eager.ClusteredAttention.apply(ops, *args, clustering)
    out, _, _ = custom_ops.clustered_attention_fwd(*args)
    return out


def _records_gradient(*inputs: Tensor) -> bool:
    """Whether autograd records a call on ``inputs``: grad mode on and one that requires a gradient."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in inputs)


def improved_clustered_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    *,
    num_clusters: int = DEFAULT_NUM_CLUSTERS,
    iterations: int = DEFAULT_ITERATIONS,
    bits: int = DEFAULT_BITS,
    topk: int = DEFAULT_TOPK,
    planes: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    clusters: Optional[Tensor] = None,
) -> Tensor:
    """Improved clustered attention ("i-clustered", Vyas et al., 2020).

    As :func:`clustered_attention`, then each cluster's ``topk`` keys with the
    largest centroid attention are recomputed exactly per query and weighted by the
    centroid's attention mass on them; the other keys keep the centroid's weights.

    Args: as :func:`clustered_attention`, plus ``topk >= 1`` (keys recomputed exactly).

    Returns:
        ``(B, H, N, Dv)`` in the query dtype. Exact attention when ``topk`` is at
        least the number of keys, for any ``num_clusters``.
    """
    check_int_range("topk", topk, 1)
    ops = eager.implementations(query)
    clusters, keep, scale, clustering = _prepare(
        ops, query, key, value, key_padding_mask, query_padding_mask, num_clusters, iterations, bits,
        planes, generator, scale, dropout_p, clusters,
    )
    args = (query, key, value, clusters, key_padding_mask, keep, num_clusters, topk, scale, float(dropout_p))
    if ops is not None:  # from C++ where the graph cache holds the step's graphs, as clustered_attention
        out = None if clustering is None else ops.improved_step(query, key, value, key_padding_mask, keep,
                                                                num_clusters, topk, scale, float(dropout_p),
                                                                clustering)
        if out is not None:
            return out
        if clustering is not None and not _records_gradient(query, key, value) and ops.packs_improved(
                query, value, key_padding_mask, keep, num_clusters):  # evaluation, as clustered_attention
            return ops.improved_fwd_inference(query, key, value, *clustering, key_padding_mask, keep, num_clusters,
                                              topk, scale, float(dropout_p))
        return eager.ImprovedClusteredAttention.apply(ops, *args, clustering)
    out, *_ = custom_ops.improved_clustered_attention_fwd(*args)
    return out
from .causal import causal_clustered_attention, causal_key_clusters  # noqa: E402  (leak-free causal variant)
from . import cuda_backend  # noqa: E402

# Register the compiled CUDA kernels on the ops as soon as the ops exist, so every
# caller (the fairseq modules included) gets them; without the extension (a CPU
# install) this records why and the reference serves every device.
cuda_backend.load()
