"""The ``fairseq_clustered::*`` custom ops: schemas, reference kernels, fake kernels, autograd.

Each op is declared once with :func:`torch.library.custom_op`; its default
implementation is the pure-PyTorch reference (:mod:`.reference`), which serves the
CPU and any device without a compiled kernel. The CUDA extension, when it loads,
registers faster implementations of the same ops for the ``cuda`` device (see
:mod:`.cuda_backend`). Arguments are validated by the public functions in
:mod:`fairseq_clustered.ops`; these ops assume valid input.

Ops (shapes as in :mod:`.reference`):

* ``hash_codes(x, planes, offsets) -> codes``
* ``lloyd_kmeans(codes, query_padding_mask, C, iterations, bits) -> (assignments, centroid_codes)``
* ``cluster_queries(x, planes, offsets, query_padding_mask, C, iterations, bits) -> (assignments,
  centroid_codes)``: the two above as one op (one call, and on CUDA one composition)
* ``clustered_attention_fwd(q, k, v, assignments, key_padding_mask, keep, C, scale, p) -> (out, lse, centroids)``
* ``clustered_attention_bwd(dout, q, k, v, assignments, key_padding_mask, keep, out, lse, centroids, C, scale, p)
  -> (dq, dk, dv)``: the forward's output and centroids spare the backward computing them again
* ``improved_clustered_attention_fwd(..., C, topk, scale, p) -> (out, lse, top_index, centroids)``
* ``improved_clustered_attention_bwd(dout, ..., lse, top_index, centroids, C, scale, p) -> (dq, dk, dv)``

The ``*_fwd`` ops are differentiable with respect to q, k and v through the
matching ``*_bwd`` op; clusters, top-key indices and dropout masks are constants.

Layouts: the clustered ops' ``out`` follows the query's memory layout
(:func:`attention_output_like`) and their ``dq, dk, dv`` those of ``q, k, v``
(``torch.empty_like``), so that a model's ``(B, H, N, D)`` views of its ``(N, B, H D)``
projections get results that fold back into that shape without a transposing copy.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference

LIBRARY = "fairseq_clustered"


def dense_strides_like(query: Tensor, value_dim: int) -> Tuple[int, ...]:
    """Strides of a dense ``(B, H, N, value_dim)`` tensor whose batch, head and position dims lie in
    memory in the query's order (outermost first, by the query's strides), the feature dim innermost.

    Worked out once per query shape and strides: an eager CUDA step asks for them twice, in a step
    whose time below 8k positions is the host's (benchmarks/NOTES.md, twenty-third session). Under
    ``torch.compile``, and for symbolic sizes (which are not hashable), they are worked out every time."""
    shape, strides = tuple(query.shape[:3]), tuple(query.stride()[:3])
    if not torch.compiler.is_compiling():
        try:
            return _remembered_dense_strides(shape, strides, value_dim)
        except TypeError:  # symbolic sizes
            pass
    return _dense_strides(shape, strides, value_dim)


def _dense_strides(shape: Tuple[int, ...], strides: Tuple[int, ...], value_dim: int) -> Tuple[int, ...]:
    """:func:`dense_strides_like` of a query's first three sizes and strides."""
    outer = sorted(range(3), key=lambda d: -strides[d])  # stable for ties
    dense, step = [0, 0, 0, 1], value_dim
    for d in reversed(outer):
        dense[d] = step
        step *= shape[d]
    return tuple(dense)


_remembered_dense_strides = functools.lru_cache(maxsize=4096)(_dense_strides)


def attention_output_like(query: Tensor, value_dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An empty ``(B, H, N, value_dim)`` tensor (query's dtype by default) laid out as
    :func:`dense_strides_like` says."""
    return torch.empty_strided((*query.shape[:3], value_dim), dense_strides_like(query, value_dim),
                               dtype=dtype or query.dtype, device=query.device)


def query_gradient_layout(query: Tensor) -> Tuple[torch.Size, Tuple[int, ...], torch.dtype]:
    """``(shape, strides, dtype)`` of the query gradient that the packed backwards fill: dense, in the
    queries' order of dims (:func:`dense_strides_like`), so that a model's ``(B, H, N, D)`` views of
    ``(N, B, H D)`` projections get theirs without a copy. The eager step and the C++ step's key
    (``CudaOps.clustered_fwd_packed``) both take it from here."""
    return query.shape, dense_strides_like(query, query.shape[-1]), query.dtype


def laid_out_as(result: Tensor, like: Tensor) -> Tensor:
    """``result`` in the layout that ``torch.empty_like(like)`` has (``like`` of ``result``'s shape);
    a copy only where they differ."""
    if result.stride() == like.stride():
        return result
    layout = torch.empty_like(like, dtype=result.dtype)
    return result if result.stride() == layout.stride() else layout.copy_(result)


# ------------------------------------------------------------------------ hashing


@torch.library.custom_op(f"{LIBRARY}::hash_codes", mutates_args=())
def hash_codes(x: Tensor, planes: Tensor, offsets: Tensor) -> Tensor:
    return reference.hash_codes_ref(x, planes, offsets)


@hash_codes.register_fake
def _(x, planes, offsets):
    return x.new_empty(x.shape[:-1], dtype=torch.int64)


# --------------------------------------------------------------------- clustering


@torch.library.custom_op(f"{LIBRARY}::lloyd_kmeans", mutates_args=())
def lloyd_kmeans(
    codes: Tensor, query_padding_mask: Optional[Tensor], num_clusters: int, iterations: int, bits: int
) -> Tuple[Tensor, Tensor]:
    return reference.lloyd_kmeans_ref(codes, query_padding_mask, num_clusters, iterations, bits)


@lloyd_kmeans.register_fake
def _(codes, query_padding_mask, num_clusters, iterations, bits):
    batch, heads, _ = codes.shape
    return torch.empty_like(codes), codes.new_empty(batch, heads, num_clusters)


@torch.library.custom_op(f"{LIBRARY}::cluster_queries", mutates_args=())
def cluster_queries(
    x: Tensor, planes: Tensor, offsets: Tensor, query_padding_mask: Optional[Tensor], num_clusters: int,
    iterations: int, bits: int
) -> Tuple[Tensor, Tensor]:
    codes = reference.hash_codes_ref(x, planes, offsets)
    return reference.lloyd_kmeans_ref(codes, query_padding_mask, num_clusters, iterations, bits)


@cluster_queries.register_fake
def _(x, planes, offsets, query_padding_mask, num_clusters, iterations, bits):
    batch, heads, length, _ = x.shape
    return x.new_empty(batch, heads, length, dtype=torch.int64), x.new_empty(batch, heads, num_clusters,
                                                                             dtype=torch.int64)


# ------------------------------------------------------------- clustered attention


@torch.library.custom_op(f"{LIBRARY}::clustered_attention_fwd", mutates_args=())
def clustered_attention_fwd(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    assignments: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    num_clusters: int,
    scale: float,
    dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    out, lse = reference.clustered_attention_fwd_ref(
        query, key, value, assignments, key_padding_mask, keep, num_clusters, scale, dropout_p
    )
    out = laid_out_as(out, attention_output_like(query, out.shape[-1], out.dtype))
    return out, lse, reference.cluster_centroids_ref(query, assignments, num_clusters)


@clustered_attention_fwd.register_fake
def _(query, key, value, assignments, key_padding_mask, keep, num_clusters, scale, dropout_p):
    batch, heads, length, dim = query.shape
    acc = reference._compute_dtype(query.dtype)
    out = attention_output_like(query, value.shape[-1])
    lse = query.new_empty(batch, heads, num_clusters, dtype=acc)
    return out, lse, query.new_empty(batch, heads, num_clusters, dim, dtype=acc)


@torch.library.custom_op(f"{LIBRARY}::clustered_attention_bwd", mutates_args=())
def clustered_attention_bwd(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    assignments: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    centroids: Tensor,
    num_clusters: int,
    scale: float,
    dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    grads = reference.clustered_attention_bwd_ref(
        grad_out, query, key, value, assignments, key_padding_mask, keep, lse, num_clusters, scale, dropout_p
    )
    return tuple(laid_out_as(g, x) for g, x in zip(grads, (query, key, value)))


@clustered_attention_bwd.register_fake
def _(grad_out, query, key, value, *args):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_clustered(ctx, inputs, output):
    query, key, value, assignments, key_padding_mask, keep, num_clusters, scale, dropout_p = inputs
    out, lse, centroids = output
    ctx.mark_non_differentiable(lse, centroids)
    ctx.set_materialize_grads(False)  # no zero gradients built for lse and centroids
    ctx.save_for_backward(query, key, value, assignments, key_padding_mask, keep, out, lse, centroids)
    ctx.hyper = (num_clusters, scale, dropout_p)


def _backward_clustered(ctx, grad_out, grad_lse, grad_centroids):
    if grad_out is None:  # the output does not reach the loss
        return (None,) * 9
    query, key, value, assignments, key_padding_mask, keep, out, lse, centroids = ctx.saved_tensors
    dq, dk, dv = clustered_attention_bwd(
        grad_out, query, key, value, assignments, key_padding_mask, keep, out, lse, centroids,
        *ctx.hyper
    )
    return dq, dk, dv, None, None, None, None, None, None


clustered_attention_fwd.register_autograd(_backward_clustered, setup_context=_setup_clustered)


# ---------------------------------------------------- improved clustered attention


@torch.library.custom_op(f"{LIBRARY}::improved_clustered_attention_fwd", mutates_args=())
def improved_clustered_attention_fwd(
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    out, lse, top_index = reference.improved_clustered_attention_fwd_ref(
        query, key, value, assignments, key_padding_mask, keep, num_clusters, topk, scale, dropout_p
    )
    return out, lse, top_index, reference.cluster_centroids_ref(query, assignments, num_clusters)


@improved_clustered_attention_fwd.register_fake
def _(query, key, value, assignments, key_padding_mask, keep, num_clusters, topk, scale, dropout_p):
    batch, heads, length, dim = query.shape
    acc = reference._compute_dtype(query.dtype)
    out = query.new_empty(batch, heads, length, value.shape[-1])
    lse = query.new_empty(batch, heads, num_clusters, dtype=acc)
    top_index = query.new_empty(batch, heads, num_clusters, min(topk, key.shape[2]), dtype=torch.int64)
    return out, lse, top_index, query.new_empty(batch, heads, num_clusters, dim, dtype=acc)


@torch.library.custom_op(f"{LIBRARY}::improved_clustered_attention_bwd", mutates_args=())
def improved_clustered_attention_bwd(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    assignments: Tensor,
    key_padding_mask: Optional[Tensor],
    keep: Optional[Tensor],
    lse: Tensor,
    top_index: Tensor,
    centroids: Tensor,
    num_clusters: int,
    scale: float,
    dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    return reference.improved_clustered_attention_bwd_ref(
        grad_out, query, key, value, assignments, key_padding_mask, keep, lse, top_index,
        num_clusters, scale, dropout_p,
    )


@improved_clustered_attention_bwd.register_fake
def _(grad_out, query, key, value, *args):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_improved(ctx, inputs, output):
    query, key, value, assignments, key_padding_mask, keep, num_clusters, topk, scale, dropout_p = inputs
    _, lse, top_index, centroids = output
    ctx.mark_non_differentiable(lse, top_index, centroids)
    ctx.set_materialize_grads(False)  # no zero gradients built for lse, top_index and centroids
    ctx.save_for_backward(query, key, value, assignments, key_padding_mask, keep, lse, top_index, centroids)
    ctx.hyper = (num_clusters, scale, dropout_p)


def _backward_improved(ctx, grad_out, grad_lse, grad_top_index, grad_centroids):
    if grad_out is None:  # the output does not reach the loss
        return (None,) * 10
    query, key, value, assignments, key_padding_mask, keep, lse, top_index, centroids = ctx.saved_tensors
    dq, dk, dv = improved_clustered_attention_bwd(
        grad_out.contiguous(), query, key, value, assignments, key_padding_mask, keep, lse, top_index, centroids,
        *ctx.hyper,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


improved_clustered_attention_fwd.register_autograd(_backward_improved, setup_context=_setup_improved)


ALL_OPS = (
    hash_codes,
    lloyd_kmeans,
    cluster_queries,
    clustered_attention_fwd,
    clustered_attention_bwd,
    improved_clustered_attention_fwd,
    improved_clustered_attention_bwd,
)
