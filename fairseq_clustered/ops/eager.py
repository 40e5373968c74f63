"""Eager CUDA calls of the attention ops without torch.library's Python dispatch.

A call of a ``torch.library`` custom op with registered autograd goes through several
layers of Python (argument defaults, the autograd wrapper's ``setup_context``, the
redispatch to the device kernel, the aliasing checks of the result), which costs more
CPU time than the replay of the op's cached CUDA graph it ends in (:mod:`.graph_cache`).
In eager mode on CUDA tensors the public functions therefore call the registered CUDA
implementations (:class:`~.cuda_kernels.CudaOps`) directly, through the small
``torch.autograd.Function`` subclasses below, which save and pass exactly what the custom
ops' registered autograd does. The kernels, and so the results, are the same. Where the
caller has not clustered yet, the clustering runs inside the forward's composition (the
queries of the clustered variants, the keys of the causal one), so a step replays two
graphs: the forward with its clustering, and the backward.

Once the cache holds a clustered (improved) step's two graphs and they read their inputs in place,
the step does not come here at all: the public function's call of ``CudaOps.clustered_step``
(``improved_step``) replays them from C++ with a C++ autograd node (``cuda/clustered_step.cpp``),
and only what that does not serve runs :class:`ClusteredAttention`
(:class:`ImprovedClusteredAttention`).

The custom ops stay the path everywhere else: on the CPU and other devices, without the
compiled extension, under ``torch.compile`` (which needs their fake kernels) and under
functorch transforms.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cuda_backend, custom_ops


def _differentiable_once(backward):
    """``once_differentiable``, whose guard is paid only where the backward is itself recorded.

    ``once_differentiable`` runs the backward under ``no_grad`` and, where grad mode is on
    (``create_graph=True``), makes its results raise if they are differentiated again. Autograd
    runs an ordinary backward with grad mode off already, and there its ``no_grad`` block and
    checks cost about 6 microseconds of host time per step (more on a GPU server's CPU), in a step
    that is bound by the host below 8k positions (benchmarks/NOTES.md, twenty-third session)."""
    guarded = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        return guarded(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)
    return wrapper


def implementations(query: Tensor):
    """The registered :class:`~.cuda_kernels.CudaOps` when this call may use them directly, else None."""
    if not query.is_cuda or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    return cuda_backend.cuda_ops()


class ClusteredAttention(torch.autograd.Function):
    """``out`` of ``CudaOps.clustered_fwd``; backward through ``CudaOps.clustered_bwd``.

    With ``assignments`` None the queries are clustered from ``clustering = (planes, offsets,
    query_padding_mask, iterations, bits)`` (otherwise ``clustering`` is None). Where the kernels
    take the inputs, that happens in the forward's own composition (``CudaOps.clustered_fwd_packed``),
    which also keeps each cluster's output, the queries' sort by cluster and the rest of what the
    backward needs in one buffer, and the backward takes that (``CudaOps.clustered_bwd_packed``)
    instead of the queries and the output: neither is copied into the backward's graph, nor is the
    sort redone.
    """

    @staticmethod
    def forward(ctx, ops, query, key, value, assignments: Optional[Tensor], key_padding_mask: Optional[Tensor],
                keep: Optional[Tensor], num_clusters: int, scale: float, dropout_p: float,
                clustering: Optional[tuple]):
        ctx.ops, ctx.hyper = ops, (num_clusters, scale, dropout_p)
        ctx.query_layout = None  # (set where the backward takes the packed buffer)
        if assignments is None and ops.packs_clustered(query, value, num_clusters):
            out, packed = ops.clustered_fwd_packed(query, key, value, *clustering, key_padding_mask, keep,
                                                   num_clusters, scale, dropout_p)
            # dq in the queries' layout (a model's (N, B, H D) views), made in the backward's graph
            ctx.query_layout = custom_ops.query_gradient_layout(query)
            ctx.save_for_backward(key, value, packed, key_padding_mask, keep)
            return out
        if assignments is None:  # inputs the kernels refuse: these warn and take the reference
            planes, offsets, query_padding_mask, iterations, bits = clustering
            assignments, _ = ops.cluster_queries(query, planes, offsets, query_padding_mask, num_clusters, iterations,
                                                 bits)
        out, lse, centroids = ops.clustered_fwd(query, key, value, assignments, key_padding_mask, keep, num_clusters,
                                                scale, dropout_p)
        ctx.save_for_backward(query, key, value, assignments, key_padding_mask, keep, out, lse, centroids)
        return out

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out):
        # grad_out as it comes (a model's is a view of an (N, B, H Dv) gradient): the kernels
        # read it through its strides, a contiguous copy would cost a pass over it
        if ctx.query_layout is not None:
            key, value, packed, key_padding_mask, keep = ctx.saved_tensors
            shape, strides, dtype = ctx.query_layout
            dq = torch.empty_strided(shape, strides, dtype=dtype, device=key.device)
            dq, dk, dv = ctx.ops.clustered_bwd_packed(grad_out, dq, key, value, packed, key_padding_mask, keep,
                                                      *ctx.hyper)
        else:
            dq, dk, dv = ctx.ops.clustered_bwd(grad_out, *ctx.saved_tensors, *ctx.hyper)
        return None, dq, dk, dv, None, None, None, None, None, None, None


class ImprovedClusteredAttention(torch.autograd.Function):
    """``out`` of ``CudaOps.improved_fwd``; backward through ``CudaOps.improved_bwd``
    (``assignments`` None and ``clustering``: as :class:`ClusteredAttention`). Where the kernels take
    the inputs on the flash path (or its Triton form, with key padding or dropout), the forward's
    composition clusters the queries and keeps the centroids' attention output and log-sum-exp, the
    queries' sort by cluster and the rest of what the backward needs in one buffer
    (``CudaOps.improved_fwd_packed``), and the backward takes that (``CudaOps.improved_bwd_packed``):
    that forward and the sort are not run again."""

    @staticmethod
    def forward(ctx, ops, query, key, value, assignments: Optional[Tensor], key_padding_mask: Optional[Tensor],
                keep: Optional[Tensor], num_clusters: int, topk: int, scale: float, dropout_p: float,
                clustering: Optional[tuple]):
        ctx.ops, ctx.hyper = ops, (num_clusters, scale, dropout_p)
        ctx.topk = None  # (set where the backward takes the packed buffer)
        if assignments is None and ops.packs_improved(query, value, key_padding_mask, keep, num_clusters):
            out, packed = ops.improved_fwd_packed(query, key, value, *clustering, key_padding_mask, keep, num_clusters,
                                                  topk, scale, dropout_p)
            ctx.topk = topk
            ctx.save_for_backward(query, key, value, packed, key_padding_mask, keep)
            return out
        if assignments is None:  # the fp32 products (fp32; masks past the Triton kernels), the reference: nothing kept
            out, lse, top_index, centroids, assignments = ops.improved_fwd_with_clustering(
                query, key, value, *clustering, key_padding_mask, keep, num_clusters, topk, scale, dropout_p)
        else:
            out, lse, top_index, centroids = ops.improved_fwd(query, key, value, assignments, key_padding_mask, keep,
                                                              num_clusters, topk, scale, dropout_p)
        ctx.save_for_backward(query, key, value, assignments, key_padding_mask, keep, lse, top_index, centroids)
        return out

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out):
        if ctx.topk is not None:
            query, key, value, packed, key_padding_mask, keep = ctx.saved_tensors
            num_clusters, scale, dropout_p = ctx.hyper
            dq, dk, dv = ctx.ops.improved_bwd_packed(grad_out.contiguous(), query, key, value, packed,
                                                     key_padding_mask, keep, num_clusters, ctx.topk, scale, dropout_p)
        else:
            dq, dk, dv = ctx.ops.improved_bwd(grad_out.contiguous(), *ctx.saved_tensors, *ctx.hyper)
        return None, dq, dk, dv, None, None, None, None, None, None, None, None


class CausalClusteredAttention(torch.autograd.Function):
    """``out`` of ``CudaOps.causal_fwd`` (the one-kernel Triton path of the causal variant;
    with ``clusters`` None the keys are clustered in the same composition); backward through
    ``CudaOps.causal_bwd``. Saves what the ``causal_triton_fwd`` op's autograd saves."""

    @staticmethod
    def forward(ctx, ops, query, key, value, clusters: Optional[Tensor], planes: Optional[Tensor],
                offsets: Optional[Tensor], window: int, num_clusters: int, iterations: int, bits: int,
                scale: float, keep: Optional[Tensor], dropout_p: float):
        out, lse, summary_keys, summary_values, counts, clusters = ops.causal_fwd(
            query, key, value, clusters, planes, offsets, window, num_clusters, iterations, bits, scale, keep,
            dropout_p)
        ctx.ops, ctx.hyper = ops, (window, num_clusters, scale)
        ctx.dropout_p = dropout_p
        ctx.save_for_backward(query, key, value, clusters, out, lse, summary_keys, summary_values, counts, keep)
        return out

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out):
        # grad_out as it comes: the kernels read it through its strides where it has the
        # output's layout (a model's gradient does), and the backward copies it otherwise
        *saved, keep = ctx.saved_tensors
        dq, dk, dv = ctx.ops.causal_bwd(grad_out, *saved, *ctx.hyper, keep, ctx.dropout_p)
        return None, dq, dk, dv, None, None, None, None, None, None, None, None, None, None
