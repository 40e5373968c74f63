"""Tests of the CUDA implementations of the fairseq_clustered ops.

Two layers:

* CPU: the composition in ``fairseq_clustered/ops/cuda_kernels.py`` (sorting into
  clusters, the dense centroid attention, the improved variant's mass / remainder /
  backward algebra) runs over ``EmulatedExtension``, a plain-PyTorch stand-in for
  each compiled kernel, and is compared with the reference. This runs everywhere.
* GPU (skipped without CUDA and the compiled extension): the real kernels against
  the reference in float64, with flash-attention's rule: the kernel's error is at
  most twice the error of the reference run in the same low precision (plus a tiny
  floor), over odd sizes, padding and non-contiguous inputs; clustering equal to the
  reference given the same hashes; determinism; edge cases; opcheck;
  ``torch.compile(fullgraph=True)``; CUDA graph capture and replay.

``FCL_SANITIZE=1`` shrinks the GPU sizes (for compute-sanitizer runs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fairseq_clustered.ops import _triton, centroid_triton, custom_ops, reference
from fairseq_clustered.ops.cuda_kernels import CudaOps, _segments, kept_layout

ROOT = Path(__file__).resolve().parents[1]

SANITIZE = os.environ.get("FCL_SANITIZE") == "1"


# ----------------------------------------------------------------- emulation


class EmulatedExtension:
    """Plain-PyTorch versions of the functions of ``fairseq_clustered._C`` (same contracts)."""

    @staticmethod
    def hash_codes(x, planes, offsets):
        return reference.hash_codes_ref(x, planes, offsets)

    @staticmethod
    def lloyd_kmeans(codes, mask, num_clusters, iterations, bits, queries_per_block=0, tensor_cores=True,
                     cluster_blocks=0):
        return reference.lloyd_kmeans_ref(codes, mask, num_clusters, iterations, bits)

    @staticmethod
    def lloyd_kmeans_sorted(codes, mask, num_clusters, iterations, bits, cluster_blocks):
        assignments, centroids = reference.lloyd_kmeans_ref(codes, mask, num_clusters, iterations, bits)
        return (assignments, centroids, *_segments(assignments, num_clusters)[:2])

    @staticmethod
    def codebook_assign(codes, codebook):
        return reference.hamming_distance_ref(codes, codebook, 63).argmin(-1)

    @staticmethod
    def cluster_order(assignments, num_clusters):
        return _segments(assignments, num_clusters)[:2]

    @staticmethod
    def segment_sum(x, order, seg_start, mean, per_warp=-1, zero=None):
        if zero is not None:
            zero.zero_()
        batch, heads, length, width = x.shape
        rows = x.reshape(batch * heads, length, width).float()
        clusters = seg_start.shape[1] - 1
        out = torch.zeros(batch * heads, clusters, width)
        for r in range(batch * heads):
            for c in range(clusters):
                idx = order[r, seg_start[r, c]:seg_start[r, c + 1]]
                if len(idx):
                    out[r, c] = rows[r, idx].sum(0) / (len(idx) if mean else 1)
        return out

    @staticmethod
    def broadcast(src, assignments, dtype):
        batch, heads, length = assignments.shape
        rows = src.shape[0]
        index = assignments.reshape(rows, length).clamp(min=0)
        out = src.gather(1, index.unsqueeze(-1).expand(-1, -1, src.shape[-1]))
        out = out * (assignments.reshape(rows, length, 1) >= 0)
        return out.reshape(batch, heads, length, -1).to(dtype)

    @staticmethod
    def broadcast_into(src, assignments, out, assignments_ready=False):
        out.copy_(EmulatedExtension.broadcast(src, assignments, out.dtype))

    @staticmethod
    def _exact(q, k, v, assignments, top_index, key_mask, drop_top, scale):
        """Per-query exact part (rows, N, D) in fp32, differentiable w.r.t. q, k, v."""
        batch, heads, length, dim = q.shape
        rows = batch * heads
        a = assignments.reshape(rows, length).clamp(min=0)
        top = top_index.gather(1, a.unsqueeze(-1).expand(-1, -1, top_index.shape[-1]))  # (rows, N, K)
        k_rows = k.reshape(rows, -1, dim)
        v_rows = v.reshape(rows, -1, dim)
        flat = top.reshape(rows, -1, 1).expand(-1, -1, dim)
        keys = k_rows.gather(1, flat).reshape(rows, length, -1, dim)
        values = v_rows.gather(1, flat).reshape(rows, length, -1, dim)
        logits = torch.einsum("rnd,rnkd->rnk", q.reshape(rows, length, dim), keys) * scale
        if key_mask is not None:
            valid = (~key_mask).repeat_interleave(heads, 0).gather(1, top.reshape(rows, -1)).reshape(top.shape)
            logits = logits.masked_fill(~valid, float("-inf"))
        probs = torch.softmax(logits, -1).nan_to_num(0.0)
        if drop_top is not None:
            probs = probs * drop_top.gather(1, a.unsqueeze(-1).expand(-1, -1, top.shape[-1]))
        exact = torch.einsum("rnk,rnkd->rnd", probs, values)
        return exact * (assignments.reshape(rows, length, 1) >= 0)

    def improved_exact_fwd(self, q, k, v, grad_out, assignments, order, top_index, key_mask, drop_top, mass, rest,
                           scale):
        rows, length = q.shape[0] * q.shape[1], q.shape[2]
        exact = self._exact(q.float(), k.float(), v.float(), assignments, top_index, key_mask, drop_top, scale)
        if grad_out is not None:
            return (grad_out.reshape(rows, length, -1).float() * exact).sum(-1)
        a = assignments.reshape(rows, length).clamp(min=0)
        out = mass.gather(1, a).unsqueeze(-1) * exact + rest.gather(1, a.unsqueeze(-1).expand(-1, -1, rest.shape[-1]))
        out = out * (assignments.reshape(rows, length, 1) >= 0)
        return out.reshape(q.shape).to(q.dtype)

    def improved_exact_bwd(self, grad_out, q, k, v, assignments, order, top_index, key_mask, drop_top, mass, dq_bar,
                           scale, dk32, dv32):
        rows, length = q.shape[0] * q.shape[1], q.shape[2]
        qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        with torch.enable_grad():  # an autograd backward (the eager path's) runs without grad
            exact = self._exact(qf, kf, vf, assignments, top_index, key_mask, drop_top, scale)
            a = assignments.reshape(rows, length).clamp(min=0)
            weight = mass.gather(1, a).unsqueeze(-1) * grad_out.reshape(rows, length, -1).float()
            dq, dk, dv = torch.autograd.grad((exact * weight).sum(), (qf, kf, vf))
        dk32 += dk.reshape(dk32.shape)
        dv32 += dv.reshape(dv32.shape)
        dq_centroid = self.broadcast(dq_bar, assignments, torch.float32)
        return (dq + dq_centroid).to(q.dtype)


# ------------------------------------------------------------------ inputs


def make_inputs(batch, heads, length, keys, dim, dtype, device, clusters, pad=True, noncontig=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(n):
        if noncontig:  # (B, N, H, D) memory viewed as (B, H, N, D), like fairseq's T x B x C reshapes
            return torch.randn(batch, n, heads, dim, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, heads, n, dim, generator=g).to(device=device, dtype=dtype)

    q, k, v = rand(length), rand(keys), rand(keys)
    qmask = kmask = None
    if pad:
        qmask = torch.zeros(batch, length, dtype=torch.bool)
        kmask = torch.zeros(batch, keys, dtype=torch.bool)
        qmask[-1, length - length // 3:] = True
        kmask[-1, keys - keys // 4:] = True
        qmask, kmask = qmask.to(device), kmask.to(device)
    codes = reference.hash_codes_ref(q, torch.randn(16, dim, generator=g).to(device), torch.zeros(16, device=device))
    assignments, _ = reference.lloyd_kmeans_ref(codes, qmask, clusters, 3, 16)
    return q, k, v, qmask, kmask, assignments


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------- CPU: composition


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_composition_matches_reference_cpu(pad, dropout):
    """cuda_kernels' dense path + emulated kernels == reference (fp64, so exact up to rounding)."""
    torch.manual_seed(0)
    ops = CudaOps(EmulatedExtension(), use_flash=False)
    q, k, v, qmask, kmask, a = make_inputs(2, 2, 13, 11, 32, torch.float64, "cpu", clusters=4, pad=pad)
    ops_kernel_dtypes = (torch.float64,)
    import fairseq_clustered.ops.cuda_kernels as ck
    old = ck.KERNEL_DTYPES
    ck.KERNEL_DTYPES = old + ops_kernel_dtypes  # the emulation computes in fp32/fp64 alike
    try:
        keep = (torch.rand(2, 2, 4, 11) >= dropout) if dropout > 0 else None
        scale = 32 ** -0.5
        out, lse, centroids = ops.clustered_fwd(q, k, v, a, kmask, keep, 4, scale, dropout)
        ref_out, ref_lse = reference.clustered_attention_fwd_ref(q, k, v, a, kmask, keep, 4, scale, dropout)
        assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5
        assert max_err(centroids, reference.cluster_centroids_ref(q, a, 4)) < 1e-5
        g = torch.randn_like(out)
        grads = ops.clustered_bwd(g, q, k, v, a, kmask, keep, out, ref_lse, centroids, 4, scale, dropout)
        ref_grads = reference.clustered_attention_bwd_ref(g, q, k, v, a, kmask, keep, ref_lse, 4, scale, dropout)
        for x, y in zip(grads, ref_grads):
            assert max_err(x, y) < 1e-5

        for topk in (3, 40):
            out, lse, top, centroids = ops.improved_fwd(q, k, v, a, kmask, keep, 4, topk, scale, dropout)
            ref_out, ref_lse, ref_top = reference.improved_clustered_attention_fwd_ref(
                q, k, v, a, kmask, keep, 4, topk, scale, dropout)
            assert torch.equal(top.sort(-1).values, ref_top.sort(-1).values)
            assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5
            grads = ops.improved_bwd(g, q, k, v, a, kmask, keep, ref_lse, ref_top, centroids, 4, scale, dropout)
            ref_grads = reference.improved_clustered_attention_bwd_ref(
                g, q, k, v, a, kmask, keep, ref_lse, ref_top, 4, scale, dropout)
            for x, y in zip(grads, ref_grads):
                assert max_err(x, y) < 1e-5
    finally:
        ck.KERNEL_DTYPES = old


class MathAttentionOps(CudaOps):
    """CudaOps whose flash calls are replaced by exact math attention (fp64 on the CPU)."""

    def _flash_ok(self, query, value, key_padding_mask, keep):
        return key_padding_mask is None and keep is None and query.shape[-1] == value.shape[-1]

    @staticmethod
    def _attn_fwd(q, k, v, scale):
        with torch.enable_grad():  # also inside an autograd Function's backward (once_differentiable)
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
            logits = torch.matmul(q, k.transpose(-1, -2)) * scale
            out = torch.matmul(torch.softmax(logits, -1), v)
        return out.detach(), torch.logsumexp(logits, -1).detach(), (q, k, v, out)

    @classmethod
    def _attn_ctx(cls, q, k, v, scale, out, lse):
        return cls._attn_fwd(q, k, v, scale)[2]

    @staticmethod
    def _flash_lse_dtype(dtype):
        return dtype  # the math's log-sum-exps are in the inputs' dtype

    @staticmethod
    def _attn_bwd(grad_out, ctx):
        q, k, v, out = ctx
        with torch.enable_grad():
            return torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype), retain_graph=True)


@pytest.mark.parametrize("topk", [3, 40])
def test_flash_path_algebra_cpu(topk):
    """The flash-based improved path (remainder from V_bar, sparse + lse-term backward) == reference."""
    import fairseq_clustered.ops.cuda_kernels as ck
    ops = MathAttentionOps(EmulatedExtension())
    q, k, v, _, _, a = make_inputs(2, 2, 13, 11, 32, torch.float64, "cpu", clusters=4, pad=False)
    old = ck.KERNEL_DTYPES
    ck.KERNEL_DTYPES = old + (torch.float64,)
    try:
        scale = 32 ** -0.5
        out, lse, top, centroids = ops.improved_fwd(q, k, v, a, None, None, 4, topk, scale, 0.0)
        ref_out, ref_lse, ref_top = reference.improved_clustered_attention_fwd_ref(q, k, v, a, None, None, 4, topk,
                                                                                   scale, 0.0)
        assert torch.equal(top.sort(-1).values, ref_top.sort(-1).values)
        assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5
        g = torch.randn_like(out)
        grads = ops.improved_bwd(g, q, k, v, a, None, None, ref_lse, ref_top, centroids, 4, scale, 0.0)
        ref_grads = reference.improved_clustered_attention_bwd_ref(g, q, k, v, a, None, None, ref_lse, ref_top, 4,
                                                                   scale, 0.0)
        for name, x, y in zip("qkv", grads, ref_grads):
            assert max_err(x, y) < 1e-5, name
        out, lse, centroids = ops.clustered_fwd(q, k, v, a, None, None, 4, scale, 0.0)
        ref_out, ref_lse = reference.clustered_attention_fwd_ref(q, k, v, a, None, None, 4, scale, 0.0)
        assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5
        grads = ops.clustered_bwd(g, q, k, v, a, None, None, out, ref_lse, centroids, 4, scale, 0.0)
        ref_grads = reference.clustered_attention_bwd_ref(g, q, k, v, a, None, None, ref_lse, 4, scale, 0.0)
        for name, x, y in zip("qkv", grads, ref_grads):
            assert max_err(x, y) < 1e-5, name
    finally:
        ck.KERNEL_DTYPES = old


def test_top_keys_in_chunks_leave_out_padded_keys_cpu():
    """``CudaOps._top_keys_in_chunks``, the top keys' selection beyond the selection kernel's top-k:
    the log-sum-exp and the top keys of fp32 logits as float64 gives them, padded keys never chosen
    while enough are valid, and +inf for a centroid without a valid key (as the kernel gives it)."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, num_clusters, keys, dim, top_k, scale = 2, 3, 5, 40, 16, 12, 0.25
    qbar = torch.randn(batch * heads, num_clusters, dim, generator=gen)
    key = torch.randn(batch, heads, keys, dim, generator=gen)
    padded = torch.zeros(batch, keys, dtype=torch.bool)
    padded[0, ::3] = True  # 26 valid keys for 12 top keys
    padded[1] = True  # none valid
    lse, top = CudaOps._top_keys_in_chunks(qbar, key, padded, scale, top_k)
    logits = scale * torch.einsum("rcd,rsd->rcs", qbar.double(), key.reshape(batch * heads, keys, dim).double())
    logits = logits.masked_fill(padded.repeat_interleave(heads, 0)[:, None, :], float("-inf"))[:heads]
    assert lse.dtype == torch.float32 and top.shape == (batch * heads, num_clusters, top_k)
    assert max_err(lse[:heads], torch.logsumexp(logits, -1)) < 1e-5
    assert torch.equal(top[:heads].sort(-1).values, logits.topk(top_k, -1).indices.sort(-1).values)
    assert not padded[0, top[:heads]].any()
    assert torch.equal(lse[heads:], torch.full_like(lse[heads:], float("inf")))


def test_improved_backward_from_the_kept_forward_parts_cpu(monkeypatch):
    """On the flash path the eager improved step's backward takes the forward's centroid flash
    output, log-sum-exp and sort, packed in one buffer (``improved_bwd_packed``), instead of running
    them again: the same gradients as the op's backward, bit for bit; and through the public
    function, the reference's gradients (fp64 over the CPU stand-in, flash replaced by exact math)."""
    import fairseq_clustered.ops.cuda_kernels as ck
    from fairseq_clustered import ops as public
    monkeypatch.setattr(ck, "KERNEL_DTYPES", ck.KERNEL_DTYPES + (torch.float64,))
    cuda_ops = MathAttentionOps(EmulatedExtension())
    q, k, v, _, _, a = make_inputs(2, 2, 13, 11, 32, torch.float64, "cpu", clusters=4, pad=False)
    scale, topk = 32 ** -0.5, 3
    out, lse, top, centroids, *kept = cuda_ops._improved_fwd_keeping(q, k, v, a, None, None, 4, topk, scale, 0.0)
    assert len(kept) == 4
    for x, y in zip((out, lse, top, centroids), cuda_ops._improved_fwd(q, k, v, a, None, None, 4, topk, scale, 0.0)):
        assert torch.equal(x, y)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(4))
    expected = cuda_ops.improved_bwd(g, q, k, v, a, None, None, lse, top, centroids, 4, scale, 0.0)
    layout = cuda_ops.improved_kept_layout(q, k, v, None, None, 4, topk)
    packed = torch.empty(layout.nbytes, dtype=torch.uint8)
    cuda_ops._pack(packed, layout, (lse, top, centroids, *kept, a))
    got = cuda_ops.improved_bwd_packed(g, q, k, v, packed, None, None, 4, topk, scale, 0.0)
    for name, x, y in zip("qkv", got, expected):
        assert torch.equal(x, y), name

    kept_calls = []
    real_kept = cuda_ops.improved_bwd_packed
    monkeypatch.setattr(cuda_ops, "improved_bwd_packed", lambda *args: kept_calls.append(1) or real_kept(*args))
    monkeypatch.setattr(public.eager, "implementations", lambda query: cuda_ops)
    planes = torch.randn(12, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    public.improved_clustered_attention(*leaves, num_clusters=4, iterations=3, bits=12, topk=topk,
                                        planes=planes).backward(g)
    assert kept_calls, "the eager backward did not take the kept parts"
    assignments, _ = public.cluster_queries(q, num_clusters=4, iterations=3, bits=12, planes=planes)
    ref_out, ref_lse, ref_top = reference.improved_clustered_attention_fwd_ref(q, k, v, assignments, None, None, 4,
                                                                               topk, scale, 0.0)
    ref_grads = reference.improved_clustered_attention_bwd_ref(g, q, k, v, assignments, None, None, ref_lse, ref_top,
                                                               4, scale, 0.0)
    for name, leaf, y in zip("qkv", leaves, ref_grads):
        assert max_err(leaf.grad, y) < 1e-5, name


@pytest.mark.skipif(_triton.MISSING is not None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU)")
@pytest.mark.parametrize("dense", ["triton", "flash", "masked"])
def test_flash_path_with_the_triton_kernels_cpu(monkeypatch, dense):
    """The improved flash path in half precision, whose exact top-key products, their
    gradients and the final gradient sums (written over the dense gradients' buffers) run
    as the Triton kernels, here in Triton's interpreter, against the float64 reference. The
    backward's dense part is one pass of the Triton centroid backward, or (``flash``: where
    those kernels refuse the shapes, as for more than 128 clusters) flash's passes, with the
    log-sum-exp term through a second one. ``masked``: key padding (a batch entry with fewer
    valid keys than top-k among them) and dropout, which flash does not take: the Triton
    centroid attention takes both directions of the dense part."""
    from fairseq_clustered.ops import improved_triton

    if dense == "flash":
        monkeypatch.setattr(centroid_triton, "triton_centroid_unavailable", lambda *args: "refused by the test")

    sums = []
    real_sum = improved_triton.sum_gradients
    monkeypatch.setattr(improved_triton, "sum_gradients",
                        lambda sparse, first, *rest, **kw: sums.append(first) or real_sum(sparse, first, *rest, **kw))
    ops = MathAttentionOps(EmulatedExtension())
    q, k, v, _, kmask, a = make_inputs(2, 2, 70, 66, 32, torch.float16, "cpu", clusters=4, pad=dense == "masked")
    scale, topk, p = 32 ** -0.5, 8, 0.0
    keep = None
    if dense == "masked":
        # the Triton path where a GPU would take it (the interpreter runs on the CPU tensors)
        monkeypatch.setattr(ops, "_centroid_triton_ok",
                            lambda query, value, clusters: centroid_triton.triton_centroid_unavailable(
                                query, value, clusters) is None)
        monkeypatch.setattr(ops, "_dense_inputs", lambda *args: pytest.fail("took the (C, S) products"))
        kmask[0, 5:] = True  # 5 valid keys in the first batch entry: fewer than top-k
        p = 0.2
        keep = torch.rand(2, 2, 4, 66, generator=torch.Generator().manual_seed(5)) >= p
    d64 = [t.double() for t in (q, k, v)]
    out, lse, top, centroids = ops.improved_fwd(q, k, v, a, kmask, keep, 4, topk, scale, p)
    ref_out, ref_lse, ref_top = reference.improved_clustered_attention_fwd_ref(*d64, a, kmask, keep, 4, topk, scale,
                                                                               p)
    assert out.dtype == torch.float16
    assert max_err(out, ref_out) < 1e-2 and max_err(lse, ref_lse) < 1e-2
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    grads = ops.improved_bwd(g, q, k, v, a, kmask, keep, lse, top, centroids, 4, scale, p)
    ref_grads = reference.improved_clustered_attention_bwd_ref(g.double(), *d64, a, kmask, keep, lse.double(), top,
                                                               4, scale, p)
    for name, x, y in zip("qkv", grads, ref_grads):
        assert x.dtype == torch.float16 and max_err(x, y) < 4e-3 * (1 + y.abs().max().item()), name
    # the Triton sums, written over the dense gradients' buffers where their feature dim is
    # contiguous (flash's and the Triton centroid backward's are; this emulation's key gradient
    # is not: a new tensor there)
    assert len(sums) == 2
    for grad, dense_grad in zip(grads[1:], sums):
        assert (grad is dense_grad) == (dense_grad.stride(-1) == 1)
    assert any(grad is dense_grad for grad, dense_grad in zip(grads[1:], sums))


@pytest.mark.parametrize("variant", ["clustered", "improved"])
def test_eager_path_matches_the_custom_ops_cpu(monkeypatch, variant):
    """The public functions' eager CUDA path (ops/eager.py) wires the CUDA implementations as
    the custom ops' registered autograd does: run here over the CPU stand-in of the
    extension, it gives the custom ops' (the reference's) outputs and gradients."""
    from fairseq_clustered import ops
    dim = 16 if variant == "clustered" else 32  # the improved variant's kernels take 32, 64, 128
    q, k, v, qmask, kmask, _ = make_inputs(2, 2, 33, 29, dim, torch.float32, "cpu", 5)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    fn = ops.clustered_attention if variant == "clustered" else ops.improved_clustered_attention
    extra = {} if variant == "clustered" else {"topk": 4}
    planes = torch.randn(12, dim, generator=torch.Generator().manual_seed(2))

    def run():
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*inputs, kmask, qmask, num_clusters=5, iterations=3, bits=12, planes=planes, dropout_p=0.2,
                 generator=torch.Generator().manual_seed(3), **extra)
        out.backward(grad)
        return [out.detach()] + [t.grad for t in inputs]

    expected = run()
    used = []
    stand_in = CudaOps(EmulatedExtension(), use_flash=False)
    monkeypatch.setattr(ops.eager, "implementations", lambda query: used.append(query) or stand_in)
    got = run()
    assert used, "the eager path was not taken"
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


def test_calls_autograd_does_not_record_keep_nothing_cpu(monkeypatch):
    """A clustered call that autograd does not record (under ``torch.no_grad``, or with no input that
    requires a gradient) takes the composition that keeps nothing for a backward
    (``CudaOps.clustered_fwd_inference``), over the CPU stand-in of the extension here, and gives
    the custom op's (the reference's) output without an autograd node; a recorded call takes the
    forward that packs what its backward needs."""
    from fairseq_clustered import ops
    q, k, v, qmask, kmask, _ = make_inputs(2, 2, 33, 29, 16, torch.float32, "cpu", 5)
    planes = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))

    def run(*qkv):
        return ops.clustered_attention(*qkv, kmask, qmask, num_clusters=5, iterations=3, bits=12, planes=planes,
                                       dropout_p=0.2, generator=torch.Generator().manual_seed(3))

    expected = run(q, k, v)
    stand_in = CudaOps(EmulatedExtension(), use_flash=False)
    taken = []
    for name in ("clustered_fwd_inference", "clustered_fwd_packed"):
        real = getattr(stand_in, name)
        monkeypatch.setattr(stand_in, name, lambda *args, _real=real, _name=name: taken.append(_name) or _real(*args))
    monkeypatch.setattr(ops.eager, "implementations", lambda query: stand_in)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with torch.no_grad():
        out = run(*leaves)
    assert taken == ["clustered_fwd_inference"] and out.grad_fn is None
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out = run(q, k, v)  # grad mode on, no input requires a gradient
    assert taken[1:] == ["clustered_fwd_inference"] and out.grad_fn is None
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out = run(*leaves)
    assert taken[2:] == ["clustered_fwd_packed"] and out.grad_fn is not None
    torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-5)


def test_forwards_take_the_sort_from_a_one_launch_lloyd_cpu(monkeypatch):
    """Where Lloyd runs in one launch (``cluster_blocks > 0``), the forwards that cluster (the clustered
    one that packs for its backward, the one that keeps nothing, the improved one) take the queries'
    sort by cluster from that launch (the extension's ``lloyd_kmeans_sorted``) and launch no sort of
    their own, with the outputs and gradients of the separate sort (over the CPU stand-in; its
    ``packs_improved`` made to say yes, as below)."""
    from fairseq_clustered import ops
    q, k, v, qmask, kmask, _ = make_inputs(2, 2, 33, 29, 16, torch.float32, "cpu", 7)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    planes = torch.randn(12, 16, generator=torch.Generator().manual_seed(5))
    settings = {"cluster_blocks": 0}
    calls = []

    class Counting(EmulatedExtension):
        def lloyd_kmeans_sorted(self, *args):
            calls.append("lloyd_kmeans_sorted")
            return EmulatedExtension.lloyd_kmeans_sorted(*args)

        def cluster_order(self, *args):
            calls.append("cluster_order")
            return EmulatedExtension.cluster_order(*args)

    stand_in = CudaOps(Counting(), use_flash=False)
    monkeypatch.setattr(stand_in, "_lloyd_settings", lambda codes, clusters: (0, False, settings["cluster_blocks"]))
    monkeypatch.setattr(stand_in, "packs_improved", lambda *args: True)
    monkeypatch.setattr(ops.eager, "implementations", lambda query: stand_in)

    def run():
        results = []
        with torch.no_grad():
            results.append(ops.clustered_attention(q, k, v, kmask, qmask, num_clusters=5, iterations=3, bits=12,
                                                   planes=planes))
            results.append(ops.improved_clustered_attention(q, k, v, kmask, qmask, num_clusters=5, iterations=3,
                                                            bits=12, topk=4, planes=planes))
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = ops.clustered_attention(*leaves, kmask, qmask, num_clusters=5, iterations=3, bits=12, planes=planes,
                                      dropout_p=0.2, generator=torch.Generator().manual_seed(3))
        out.backward(grad)
        return results + [out.detach()] + [t.grad for t in leaves]

    separate = run()
    assert "cluster_order" in calls and "lloyd_kmeans_sorted" not in calls
    calls.clear()
    settings["cluster_blocks"] = 3
    fused = run()
    assert calls == ["lloyd_kmeans_sorted"] * 3  # (the backward reads the sort the forward packed)
    for name, a, b in zip(("clustered no-grad", "improved no-grad", "out", "dq", "dk", "dv"), fused, separate):
        assert torch.equal(a, b), name


def test_improved_calls_autograd_does_not_record_keep_nothing_cpu(monkeypatch):
    """The improved variant's call that autograd does not record takes ``CudaOps.improved_fwd_inference``
    (the composition that keeps nothing) where :meth:`CudaOps.packs_improved` takes the inputs, and gives
    the custom op's (the reference's) output without an autograd node. Over the CPU stand-in, whose
    inputs no flash path takes, ``packs_improved`` is made to say yes (its composition then runs the
    dense path, which returns the output first as the flash path's does)."""
    from fairseq_clustered import ops
    q, k, v, qmask, kmask, _ = make_inputs(2, 2, 33, 29, 16, torch.float32, "cpu", 6)
    planes = torch.randn(12, 16, generator=torch.Generator().manual_seed(4))

    def run(*qkv):
        return ops.improved_clustered_attention(*qkv, kmask, qmask, num_clusters=5, iterations=3, bits=12,
                                                topk=4, planes=planes)

    expected = run(q, k, v)
    stand_in = CudaOps(EmulatedExtension(), use_flash=False)
    assert not stand_in.packs_improved(q, v, kmask, None, 5)  # (the real answer here)
    taken = []
    real = stand_in.improved_fwd_inference
    monkeypatch.setattr(stand_in, "improved_fwd_inference", lambda *args: taken.append(1) or real(*args))
    monkeypatch.setattr(stand_in, "packs_improved", lambda *args: True)
    monkeypatch.setattr(ops.eager, "implementations", lambda query: stand_in)
    with torch.no_grad():
        out = run(*(t.clone().requires_grad_(True) for t in (q, k, v)))
    assert taken == [1] and out.grad_fn is None
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out = run(q, k, v)  # grad mode on, no input requires a gradient
    assert taken == [1, 1] and out.grad_fn is None
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def _fairseq_layout(x):
    """``(B, H, N, D)`` as fairseq's attention sees it: a view of an ``(N, B, H * D)`` tensor."""
    batch, heads, length, dim = x.shape
    return x.permute(2, 0, 1, 3).reshape(length, batch, heads * dim).view(length, batch, heads, dim).permute(1, 2, 0, 3)


def _folds_back(x):
    """Whether ``x (B, H, N, D)`` folds back into ``(N, B, H * D)`` as a view (no copy)."""
    return x.permute(2, 0, 1, 3).is_contiguous()


def _in_both_layouts(attend, q, k, v, grad):
    """``[out, dq, dk, dv]`` of ``attend(q, k, v)`` backpropagating ``grad``, on contiguous inputs
    and on fairseq-layout views of the same values; checks that the second call's output folds
    back into ``(N, B, H * D)`` and that its gradients have their inputs' strides."""
    def run(leaves):
        out = attend(*leaves)
        out.backward(grad)
        return [out] + [t.grad for t in leaves]

    contiguous = run([t.clone().requires_grad_(True) for t in (q, k, v)])
    leaves = [_fairseq_layout(t).detach().requires_grad_(True) for t in (q, k, v)]
    laid_out = run(leaves)
    assert _folds_back(laid_out[0]), f"output strides {laid_out[0].stride()}"
    for name, leaf, got in zip("qkv", leaves, laid_out[1:]):
        assert got.stride() == leaf.stride(), f"d{name} strides {got.stride()}, {name} {leaf.stride()}"
    return contiguous, laid_out


@pytest.mark.parametrize("path", ["custom_op", "eager"])
def test_results_in_the_inputs_layout_cpu(monkeypatch, path):
    """Given fairseq's layout (views of ``(N, B, H D)`` projections), the clustered op returns the
    output and the gradients in that layout (so the model folds them back without a copy), with
    the values of the same call on contiguous inputs. ``custom_op``: the op's CPU (reference)
    implementation; ``eager``: the CUDA composition over the CPU stand-in of the extension."""
    from fairseq_clustered import ops
    if path == "eager":
        stand_in = CudaOps(EmulatedExtension(), use_flash=False)
        monkeypatch.setattr(ops.eager, "implementations", lambda query: stand_in)
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, 40, 16, generator=gen) for _ in range(4))
    planes = torch.randn(12, 16, generator=gen)

    contiguous, laid_out = _in_both_layouts(
        lambda *qkv: ops.clustered_attention(*qkv, num_clusters=5, iterations=3, bits=12, planes=planes,
                                             dropout_p=0.2, generator=torch.Generator().manual_seed(3)),
        q, k, v, grad)
    for name, got, expected in zip(("out", "dq", "dk", "dv"), laid_out, contiguous):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or _triton.triton is None,
                    reason="the Triton centroid kernels run on CPU tensors only in Triton's interpreter")
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_backward_from_the_kept_forward_parts_cpu(monkeypatch, dropout):
    """The eager backward from what the forward kept, packed in one buffer (each cluster's output,
    the sort, the log-sum-exps, centroids and assignments: ``clustered_bwd_packed``), equals the op's
    backward from the queries and the output, bit for bit, with padded queries and empty clusters
    (the buffer gives back exactly what was packed). Run over the CPU
    stand-in of the extension, the centroid attention in Triton's interpreter (the GPU's kernel path
    for key padding / dropout)."""
    from fairseq_clustered.ops import centroid_triton
    ops = CudaOps(EmulatedExtension())
    monkeypatch.setattr(ops, "_centroid_triton_ok",  # on CUDA tensors only, otherwise
                        lambda query, value, clusters: centroid_triton.triton_centroid_unavailable(
                            query, value, clusters) is None)
    q, k, v, qmask, kmask, a = make_inputs(2, 2, 37, 41, 16, torch.float32, "cpu", 9, seed=3)
    a[:, :, :5] = -1  # padded queries; with 9 clusters over ~30 queries some are empty
    keep = torch.rand(2, 2, 9, 41, generator=torch.Generator().manual_seed(1)) >= dropout if dropout else None
    grad = _fairseq_layout(torch.randn(2, 2, 37, 16, generator=torch.Generator().manual_seed(2)))
    out, lse, centroids, cluster_outputs, order, seg_start = ops._clustered_fwd_keeping(
        q, k, v, a, kmask, keep, 9, 0.25, dropout)
    assert ops._centroid_triton_ok(q, v, 9)
    expected = ops.clustered_bwd(grad, q, k, v, a, kmask, keep, out, lse, centroids, 9, 0.25, dropout)
    layout = kept_layout(q, v, 9)
    packed = torch.full((layout.nbytes,), 0xFF, dtype=torch.uint8)
    kept = (lse, centroids, cluster_outputs, order, seg_start, a)
    ops._pack(packed, layout, kept)
    assert all(torch.equal(x, y) for x, y in zip(layout.views(packed), kept))
    dq = torch.empty_strided(q.shape, custom_ops.dense_strides_like(q, 16), dtype=q.dtype)
    got = ops.clustered_bwd_packed(grad, dq, k, v, packed, kmask, keep, 9, 0.25, dropout)
    for name, x, y in zip(("dq", "dk", "dv"), got, expected):
        assert torch.equal(x, y), name
    assert got[0].stride() == q.stride()


def test_kept_tensors_packed_cpu():
    """The clustered forward's kept tensors in one buffer: each on a 16-byte boundary, read back
    exactly, every other byte zero (a graph's filled buffer is compared byte for byte with the eager
    result); a tensor that does not fit its place is refused, not copied."""
    ops = CudaOps(EmulatedExtension())
    q, v = torch.zeros(1, 3, 37, 16, dtype=torch.bfloat16), torch.zeros(1, 3, 37, 8, dtype=torch.bfloat16)
    layout = kept_layout(q, v, 9)  # 3 rows: 27 log-sum-exps (108 bytes), 3 x 37 int64 ids (888 bytes)
    assert all(offset % 16 == 0 for _, _, offset in layout.entries) and layout.nbytes % 16 == 0
    gen = torch.Generator().manual_seed(0)
    kept = [(torch.randn(shape, generator=gen) * 100).to(dtype) for dtype, shape, _ in layout.entries]
    packed = torch.full((layout.nbytes,), 0xFF, dtype=torch.uint8)
    ops._pack(packed, layout, kept)
    views = layout.views(packed)
    assert [(x.dtype, tuple(x.shape)) for x in views] == [(dtype, shape) for dtype, shape, _ in layout.entries]
    assert all(torch.equal(x, y) for x, y in zip(views, kept))
    gaps = layout.gaps(packed)
    assert sum(gap.numel() for gap in gaps) > 0 and all((gap == 0).all() for gap in gaps)
    assert sum(x.numel() * x.element_size() for x in views) + sum(gap.numel() for gap in gaps) == layout.nbytes
    with pytest.raises(RuntimeError, match="does not fit its place"):
        ops._pack(packed, layout, [kept[0].double(), *kept[1:]])


def test_fake_kernels_follow_the_inputs_layout_cpu():
    """The clustered ops' fake kernels (what torch.compile plans with) give the strides the real
    ones return, for fairseq's layout: opcheck compares them."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_fairseq_layout(torch.randn(2, 3, 24, 16, generator=gen)) for _ in range(3))
    a = torch.randint(-1, 4, (2, 3, 24), generator=gen)
    out, lse, centroids = custom_ops.clustered_attention_fwd(q, k, v, a, None, None, 4, 0.25, 0.0)
    assert _folds_back(out)
    torch.library.opcheck(custom_ops.clustered_attention_fwd, (q, k, v, a, None, None, 4, 0.25, 0.0))
    g = _fairseq_layout(torch.randn(2, 3, 24, 16, generator=gen))
    torch.library.opcheck(custom_ops.clustered_attention_bwd,
                          (g, q, k, v, a, None, None, out, lse, centroids, 4, 0.25, 0.0))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or _triton.triton is None,
                    reason="the causal Triton kernels run on CPU tensors only in Triton's interpreter "
                           "(TRITON_INTERPRET=1, set by conftest.py without a GPU)")
@pytest.mark.parametrize("given_clusters", [False, True])
def test_causal_eager_path_matches_the_custom_ops_cpu(monkeypatch, given_clusters):
    """causal_clustered_attention's eager CUDA path (the key clustering and the Triton kernels
    in one composition of CudaOps, ops/eager.py's autograd Function) gives the custom ops'
    outputs and gradients: run here over the CPU stand-in of the extension, with the Triton
    kernels in the interpreter, against the reference path of the same call."""
    from fairseq_clustered import ops
    from fairseq_clustered.ops import causal_triton
    gen = torch.Generator().manual_seed(4)
    n, window, num_clusters, bits = 80, 16, 5, 12
    q, k, v, grad = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(4))
    planes = torch.randn(bits, 16, generator=gen)
    clusters = torch.randint(-1, num_clusters, (1, 2, n), generator=gen) if given_clusters else None

    def run():
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = ops.causal_clustered_attention(*inputs, window=window, num_clusters=num_clusters, iterations=3,
                                             bits=bits, planes=planes, clusters=clusters)
        out.backward(grad)
        return [out.detach()] + [t.grad for t in inputs]

    expected = run()  # CPU: the reference path
    used = []
    stand_in = CudaOps(EmulatedExtension(), use_flash=False)
    monkeypatch.setattr(ops.eager, "implementations", lambda query: used.append(query) or stand_in)
    monkeypatch.setattr(causal_triton, "triton_path_unavailable", lambda *args: None)
    got = run()
    assert used, "the eager path was not taken"
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)


def test_segments_cpu():
    a = torch.tensor([[[2, -1, 0, 2, 0, 1]]])
    order, seg_start, counts = _segments(a, 4)
    assert order.tolist() == [[1, 2, 4, 5, 0, 3]]
    assert seg_start.tolist() == [[1, 3, 4, 6, 6]]
    assert counts.tolist() == [[2.0, 1.0, 2.0, 0.0]]


def test_lloyd_tensor_core_split_cpu():
    """Tensor-core Lloyd from 2k queries per row, one wave of blocks (two per SM) with whole
    blocks per row and 512..4096 queries each; elsewhere the population-count kernels (0)."""
    from fairseq_clustered.ops.cuda_kernels import lloyd_tensor_core_split
    sms = 132
    assert lloyd_tensor_core_split(32, 1024, sms) == 0  # shorter rows: population counts
    assert lloyd_tensor_core_split(32, 65536, sms) == 0  # one wave would take 8192 per block
    assert lloyd_tensor_core_split(288, 16384, sms) == 0  # more rows than resident blocks
    assert lloyd_tensor_core_split(288, 2048, sms) == 0
    for rows, length in ((32, 2048), (32, 4096), (32, 8192), (32, 16384), (32, 32768), (24, 16384), (24, 32768),
                         (8, 65536), (1, 16384)):
        per_block = lloyd_tensor_core_split(rows, length, sms)
        assert 512 <= per_block <= 4096
        blocks = rows * -(-length // per_block)
        assert blocks <= 2 * sms or per_block == 512, (rows, length, per_block)
    assert lloyd_tensor_core_split(32, 16384, sms) == 2048 and lloyd_tensor_core_split(24, 16384, sms) == 1490
    assert lloyd_tensor_core_split(32, 4096, sms) == 512 and lloyd_tensor_core_split(32, 8192, sms) == 1024


# Resident clusters of the one-launch kernel by blocks per row, as on a GPU of 132 SMs in GPCs of
# 14 to 18 (the GPC's SM count floored to the cluster size, summed): for test_lloyd_*_cpu.
GPC_SMS = (18, 18, 18, 18, 16, 16, 14, 14)


def gpc_capacity(blocks):
    return sum(sms // blocks for sms in GPC_SMS)


def test_lloyd_cluster_blocks_cpu():
    """The one-launch kernel's blocks per row: the fewest-waves, least-work choice by the model,
    against the kernels launched per step; none where the GPU cannot run it."""
    from fairseq_clustered.ops.cuda_kernels import lloyd_cluster_blocks, no_clusters
    sms = sum(GPC_SMS)
    assert sms == 132 and gpc_capacity(4) == 30 and gpc_capacity(3) == 42
    assert lloyd_cluster_blocks(8, 4096, sms, gpc_capacity) == 8  # few rows: all the room per row
    assert lloyd_cluster_blocks(24, 4096, sms, gpc_capacity) == 4  # 24 clusters of 5 would not fit (22)
    assert lloyd_cluster_blocks(32, 2048, sms, gpc_capacity) == 3  # 32 of 4 would not fit (30)
    assert lloyd_cluster_blocks(32, 16384, sms, gpc_capacity) == 3  # 32 of 4 would not fit
    assert lloyd_cluster_blocks(8, 65536, sms, gpc_capacity) == 0  # few long rows: per step, every SM busy
    assert lloyd_cluster_blocks(256, 8192, sms, gpc_capacity) == 1  # two waves of one block per row
    assert lloyd_cluster_blocks(288, 16384, sms, gpc_capacity) == 3  # 7 waves of 42 clusters of 3, not 3 of 1
    assert lloyd_cluster_blocks(32, 2048, sms, no_clusters) == 0
    for rows, length in ((1, 97), (8, 1024), (32, 4096), (300, 65536)):
        blocks = lloyd_cluster_blocks(rows, length, sms, gpc_capacity)
        assert 0 <= blocks <= 8 and (blocks == 0 or gpc_capacity(blocks) > 0)
    # Many long rows: waves of small clusters (15 of 20 clusters of 6) beat 3 waves of one block per
    # row, whose slices of 64k queries are read again every iteration.
    assert lloyd_cluster_blocks(300, 65536, sms, gpc_capacity) == 6


def test_lloyd_launch_settings_cpu():
    """The ops' choice: the one-launch kernel where its rule takes it (C <= 128 on a GPU that runs
    it); else the tensor-core kernels and their split where that rule takes them and C <= 128;
    else the population counts and their split."""
    from fairseq_clustered.ops.cuda_kernels import (lloyd_cluster_blocks, lloyd_launch_settings,
                                                    lloyd_queries_per_block, lloyd_tensor_core_split, no_clusters)
    sms = 132
    assert lloyd_launch_settings(32, 4096, 100, sms, gpc_capacity) == (
        0, True, lloyd_cluster_blocks(32, 4096, sms, gpc_capacity))
    split = lloyd_tensor_core_split(8, 65536, sms)
    assert split and lloyd_launch_settings(8, 65536, 100, sms, gpc_capacity) == (split, True, 0)
    assert lloyd_launch_settings(8, 65536, 100, sms, no_clusters) == (split, True, 0)
    assert lloyd_launch_settings(32, 4096, 129, sms, gpc_capacity) == (lloyd_queries_per_block(32, 4096, sms), False, 0)
    assert lloyd_launch_settings(32, 1024, 100, sms, no_clusters) == (lloyd_queries_per_block(32, 1024, sms), False, 0)


def test_lloyd_rule_against_the_measured_sweep_cpu():
    """The rule's time model against an H200's measured sweep (benchmarks/results, twenty-ninth
    session): benchmarks/lloyd_fit.py's least-squares constants are the module's within 5%, and
    wherever the sweep timed the rule's choice it is within 5% of the fastest measured kernel."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import lloyd_fit
    sweep = ROOT / "benchmarks" / "results" / "lloyd_dsmem_update_sweep_h200_session29.txt"
    sms, capacity, shapes = lloyd_fit.parse_sweep(sweep.read_text())
    assert sms == 132 and capacity[4] == 30 and len(shapes) == 21
    fits = lloyd_fit.fit_models(sms, capacity, shapes)
    assert [fit.name for fit in fits] == ["one-launch kernel", "per-step kernels, tensor cores",
                                          "per-step kernels, population counts"]
    for fit in fits:
        assert np.allclose(fit.fitted, fit.module, rtol=0.05), (fit.name, fit.fitted, fit.module)
        assert np.median(abs(fit.module_errors)) < 0.05, fit.name
    timed = 0
    for shape, rule, got, best, best_us in lloyd_fit.rule_against_measured(sms, capacity, shapes):
        if got is not None:
            timed += 1
            assert got <= 1.05 * best_us, (shape.rows, shape.length, rule, got, best, best_us)
    assert timed >= 20


# ------------------------------------------------------------------ GPU


def _extension_loaded():
    if not torch.cuda.is_available():
        return False
    from fairseq_clustered.ops import cuda_backend
    return cuda_backend.load()


needs_gpu = pytest.mark.skipif(not _extension_loaded(), reason="needs a CUDA GPU and the compiled fairseq_clustered._C")

SIZES = [(97, 32), (1025, 64), (4099, 128)] if not SANITIZE else [(97, 32), (133, 64)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def _lowp(fn, *args):
    """Run a reference function in the inputs' own precision (no upcast), as flash-attention's tests do."""
    old = reference._compute_dtype
    reference._compute_dtype = lambda dtype: dtype
    try:
        return fn(*args)
    finally:
        reference._compute_dtype = old


def _check(name, got, oracle, lowp, floor=1e-6):
    err, base = max_err(got, oracle), max_err(lowp, oracle)
    bound = 2 * base + floor * (1 + oracle.double().abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > 2 x reference low-precision error {base:.3g} (+floor)"


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("length,dim", SIZES)
@pytest.mark.parametrize("pad", [False, True])
def test_clustered_gpu(dtype, length, dim, pad):
    _check_clustered_op(dtype, length, dim, pad, 25)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_clustered_flash_backward_gpu(dtype):
    """More clusters than the Triton centroid kernels take (128): the clustered backward's centroid
    attention is flash's backward (its dk, dv copied out of the graph), the only inputs that still
    take it; within the low-precision rule of the fp64 reference."""
    from fairseq_clustered.ops import cuda_backend
    C = 150
    ops = cuda_backend.cuda_ops()
    q = torch.empty(1, 1, 1, 64, dtype=dtype, device="cuda")
    assert not ops._centroid_bwd_on_triton(q, q, C) and ops._centroid_bwd_on_triton(q, q, 128)
    _check_clustered_op(dtype, 1025, 64, False, C)


def _check_clustered_op(dtype, length, dim, pad, C):
    """The clustered op's output and gradients against the fp64 reference (the low-precision rule)."""
    q, k, v, qmask, kmask, a = make_inputs(2, 3, length, length + 7, dim, dtype, "cuda", C, pad=pad)
    scale = dim ** -0.5
    d64 = [t.double() for t in (q, k, v)]
    out, lse, centroids = custom_ops.clustered_attention_fwd(q, k, v, a, kmask, None, C, scale, 0.0)
    ref_out, ref_lse = reference.clustered_attention_fwd_ref(*d64, a, kmask, None, C, scale, 0.0)
    low_out, _ = _lowp(reference.clustered_attention_fwd_ref, q, k, v, a, kmask, None, C, scale, 0.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    _check("out", out, ref_out, low_out)
    assert max_err(lse, ref_lse) < (2e-2 if dtype != torch.float32 else 1e-4)
    g = torch.randn_like(out)
    grads = custom_ops.clustered_attention_bwd(g, q, k, v, a, kmask, None, out, ref_lse.float(), centroids, C,
                                               scale, 0.0)
    ref_grads = reference.clustered_attention_bwd_ref(g.double(), *d64, a, kmask, None, ref_lse, C, scale, 0.0)
    low_grads = _lowp(reference.clustered_attention_bwd_ref, g, q, k, v, a, kmask, None, ref_lse.to(dtype), C,
                      scale, 0.0)
    for n, x, y, z in zip("qkv", grads, ref_grads, low_grads):
        _check(f"d{n}", x, y, z)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("length,dim", SIZES)
@pytest.mark.parametrize("pad", [False, True])
def test_improved_gpu(dtype, length, dim, pad):
    C, topk = 25, 32
    q, k, v, qmask, kmask, a = make_inputs(2, 3, length, length + 7, dim, dtype, "cuda", C, pad=pad)
    scale = dim ** -0.5
    d64 = [t.double() for t in (q, k, v)]
    out, lse, top, centroids = custom_ops.improved_clustered_attention_fwd(q, k, v, a, kmask, None, C, topk, scale,
                                                                           0.0)
    ref_out, ref_lse, ref_top = reference.improved_clustered_attention_fwd_ref(*d64, a, kmask, None, C, topk,
                                                                               scale, 0.0)
    low_out, _, _ = _lowp(reference.improved_clustered_attention_fwd_ref, q, k, v, a, kmask, None, C, topk, scale,
                          0.0)
    assert torch.isfinite(out).all()
    # Same top keys as the fp64 oracle (as sets; fp32 logits, so no near-tie flips expected at these sizes).
    same = (top.sort(-1).values == ref_top.sort(-1).values).all(-1).float().mean().item()
    assert same > 0.99, f"top-key sets agree on only {same:.3f} of the centroids"
    _check("out", out, ref_out, low_out)
    _check_improved_backward(torch.randn_like(out), q, k, v, a, kmask, ref_lse, ref_top, centroids, C, scale)


def _check_improved_backward(g, q, k, v, a, kmask, ref_lse, ref_top, centroids, C, scale, keep=None, p=0.0):
    """The improved op's gradients for ``g`` against the fp64 reference (the low-precision rule),
    given the reference forward's float64 ``ref_lse`` and its ``ref_top``."""
    d64 = [t.double() for t in (q, k, v)]
    grads = custom_ops.improved_clustered_attention_bwd(g, q, k, v, a, kmask, keep, ref_lse.float(), ref_top,
                                                        centroids, C, scale, p)
    ref_grads = reference.improved_clustered_attention_bwd_ref(g.double(), *d64, a, kmask, keep, ref_lse, ref_top,
                                                               C, scale, p)
    low_grads = _lowp(reference.improved_clustered_attention_bwd_ref, g, q, k, v, a, kmask, keep,
                      ref_lse.to(q.dtype), ref_top, C, scale, p)
    for n, x, y, z in zip("qkv", grads, ref_grads, low_grads):
        _check(f"d{n}", x, y, z)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("length,dim", SIZES)
def test_improved_padding_and_dropout_gpu(monkeypatch, dtype, length, dim):
    """Key padding and dropout in half precision take the Triton kernels (top keys, exact
    products, the centroid attention with both masks), not fp32 products over (C, S)
    matrices: output and gradients within the low-precision rule of the fp64 reference. The
    last batch entry has fewer valid keys than top-k in one case."""
    from fairseq_clustered.ops import cuda_backend
    C, topk, p = 25, 32, 0.2
    keys = length + 7
    q, k, v, qmask, kmask, a = make_inputs(2, 3, length, keys, dim, dtype, "cuda", C)
    if length == SIZES[0][0]:
        kmask[-1, 20:] = True  # 20 valid keys for 32 top keys
    keep = torch.rand(2, 3, C, keys, device="cuda") >= p
    monkeypatch.setattr(cuda_backend.cuda_ops(), "_dense_inputs",
                        lambda *args: pytest.fail("the improved op took the fp32 (C, S) products"))
    _check_improved_op(q, k, v, a, kmask, keep, C, topk, p)


def _check_improved_op(q, k, v, a, kmask, keep, C, topk, p):
    """The improved op's forward and backward against the fp64 reference: output and gradients within
    the low-precision rule, log-sum-exps within 1e-3, as many valid top keys per centroid (padded ones
    only where too few keys are valid) and the same sets of them for more than 99% of the centroids."""
    scale = q.shape[-1] ** -0.5
    d64 = [t.double() for t in (q, k, v)]
    out, lse, top, centroids = custom_ops.improved_clustered_attention_fwd(q, k, v, a, kmask, keep, C, topk, scale,
                                                                           p)
    ref_out, ref_lse, ref_top = reference.improved_clustered_attention_fwd_ref(*d64, a, kmask, keep, C, topk,
                                                                               scale, p)
    low_out, _, _ = _lowp(reference.improved_clustered_attention_fwd_ref, q, k, v, a, kmask, keep, C, topk, scale, p)
    assert torch.isfinite(out).all() and max_err(lse, ref_lse) < 1e-3
    batch, heads, keys = k.shape[0], k.shape[1], k.shape[2]
    valid = torch.ones(batch, keys, dtype=torch.bool, device=k.device) if kmask is None else ~kmask
    valid = valid[:, None, None, :].expand(-1, heads, C, -1)
    top_valid, ref_valid = valid.gather(-1, top), valid.gather(-1, ref_top)
    assert torch.equal(top_valid.sum(-1), ref_valid.sum(-1))
    same = (top.masked_fill(~top_valid, -1).sort(-1).values
            == ref_top.masked_fill(~ref_valid, -1).sort(-1).values).all(-1).float().mean().item()
    assert same > 0.99, f"top-key sets agree on only {same:.3f} of the centroids"
    _check("out", out, ref_out, low_out)
    _check_improved_backward(torch.randn_like(out), q, k, v, a, kmask, ref_lse, ref_top, centroids, C, scale, keep, p)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_improved_backward_past_the_centroid_kernels_gpu(dtype):
    """With more than 128 clusters the Triton centroid backward does not take the improved
    backward's dense part; flash's passes (the log-sum-exp term through a second one) do, and
    the gradients still meet the low-precision rule against the fp64 reference."""
    C, topk, length = 130, 16, 700
    q, k, v, _, _, a = make_inputs(2, 2, length, length, 64, dtype, "cuda", C, pad=False)
    assert centroid_triton.triton_centroid_unavailable(q, v, C) is not None
    scale = 64 ** -0.5
    d64 = [t.double() for t in (q, k, v)]
    _, _, _, centroids = custom_ops.improved_clustered_attention_fwd(q, k, v, a, None, None, C, topk, scale, 0.0)
    _, ref_lse, ref_top = reference.improved_clustered_attention_fwd_ref(*d64, a, None, None, C, topk, scale, 0.0)
    g = torch.randn(q.shape, device="cuda", dtype=dtype)
    _check_improved_backward(g, q, k, v, a, None, ref_lse, ref_top, centroids, C, scale)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("dim,topk", [(64, 200), (64, 300), (128, 200)])
@pytest.mark.parametrize("masked", [False, True])
def test_improved_many_top_keys_gpu(monkeypatch, dtype, dim, topk, masked):
    """More top keys than one tile of the Triton exact products (``ONE_TILE_TOP_K``, 128) are taken
    in tiles, and more than the selection kernel ranks (300 at D = 64, 200 at D = 128) are chosen from
    fp32 logits in row chunks; neither takes the fp32 ``(C, S)`` products nor the extension's
    per-query kernels. Output and gradients within the low-precision rule of the fp64 reference,
    the same top-key sets. ``masked``: key padding and dropout."""
    from fairseq_clustered.ops import cuda_backend, improved_triton
    ops = cuda_backend.cuda_ops()
    C, length, keys = 25, 1025, 1100
    p = 0.2 if masked else 0.0
    q, k, v, _, kmask, a = make_inputs(2, 3, length, keys, dim, dtype, "cuda", C, pad=masked)
    keep = torch.rand(2, 3, C, keys, device="cuda") >= p if masked else None
    assert topk > improved_triton.ONE_TILE_TOP_K
    assert (improved_triton.selection_unavailable(topk, dim) is None) == ((dim, topk) == (64, 200))
    monkeypatch.setattr(ops, "_dense_inputs", lambda *args: pytest.fail("the improved op took the (C, S) products"))
    monkeypatch.setattr(ops, "ext", _Refusing(ops.ext, {"improved_exact_fwd", "improved_exact_bwd"}))
    _check_improved_op(q, k, v, a, kmask, keep, C, topk, p)


class _Refusing:
    """The extension with some of its functions (``names``) failing the test where called."""

    def __init__(self, ext, names):
        self._ext, self._names = ext, names

    def __getattr__(self, attr):
        if attr in self._names:
            return lambda *args: pytest.fail(f"the extension's {attr} was called")
        return getattr(self._ext, attr)


@needs_gpu
@pytest.mark.parametrize("variant", ["clustered", "improved"])
def test_dropout_gpu(variant):
    """Dropout keep-masks (fp32 against fp64)."""
    C, p = 8, 0.3
    q, k, v, qmask, kmask, a = make_inputs(2, 2, 61, 67, 64, torch.float32, "cuda", C)
    keep = torch.rand(2, 2, C, 67, device="cuda") >= p
    d64 = [t.double() for t in (q, k, v)]
    g = torch.randn(2, 2, 61, 64, device="cuda")
    if variant == "clustered":
        out, lse, centroids = custom_ops.clustered_attention_fwd(q, k, v, a, kmask, keep, C, 0.125, p)
        ref_out, ref_lse = reference.clustered_attention_fwd_ref(*d64, a, kmask, keep, C, 0.125, p)
        grads = custom_ops.clustered_attention_bwd(g, q, k, v, a, kmask, keep, out, lse, centroids, C, 0.125, p)
        ref_grads = reference.clustered_attention_bwd_ref(g.double(), *d64, a, kmask, keep, ref_lse, C, 0.125, p)
    else:
        out, lse, top, centroids = custom_ops.improved_clustered_attention_fwd(q, k, v, a, kmask, keep, C, 16, 0.125,
                                                                               p)
        ref_out, ref_lse, ref_top = reference.improved_clustered_attention_fwd_ref(*d64, a, kmask, keep, C, 16,
                                                                                   0.125, p)
        grads = custom_ops.improved_clustered_attention_bwd(g, q, k, v, a, kmask, keep, lse, ref_top, centroids, C,
                                                            0.125, p)
        ref_grads = reference.improved_clustered_attention_bwd_ref(g.double(), *d64, a, kmask, keep, ref_lse,
                                                                   ref_top, C, 0.125, p)
    assert max_err(out, ref_out) < 1e-4
    for x, y in zip(grads, ref_grads):
        assert max_err(x, y) < 1e-4


def assert_codes_match_up_to_rounding(codes, expected, x, planes, offsets):
    """Bits may differ only where the projection is within rounding of the threshold."""
    bits = planes.shape[0]
    projections = x.double() @ planes.double().t() - offsets.double()
    differ = (((codes ^ expected).unsqueeze(-1) >> torch.arange(bits, device=codes.device)) & 1).bool()
    assert (projections.abs()[differ] < 1e-4).all()
    assert differ.sum() <= codes.numel() * bits * 1e-4
    assert (codes >= 0).all() and (codes >> bits == 0).all()  # no bit beyond the used ones


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_hash_gpu(dtype):
    length = 97 if SANITIZE else 1025
    q, *_ = make_inputs(2, 3, length, 5, 64, dtype, "cuda", 4, pad=False)
    planes = torch.randn(63, 64, device="cuda")
    offsets = torch.randn(63, device="cuda") * 0.1
    codes = custom_ops.hash_codes(q, planes, offsets)
    assert_codes_match_up_to_rounding(codes, reference.hash_codes_ref(q, planes, offsets), q, planes, offsets)


@needs_gpu
@pytest.mark.parametrize("length,clusters,pad", [(97, 10, True), (1025, 100, False), (4099, 100, True),
                                                 (50, 64, True), (300, 600, False)])
def test_lloyd_gpu(length, clusters, pad):
    """Same assignments and centroids as the reference, given the same hashes; deterministic."""
    if SANITIZE:
        length = min(length, 300)
    g = torch.Generator().manual_seed(length)
    codes = torch.randint(0, 2**62, (2, 3, length), generator=g).cuda()
    mask = None
    if pad:
        mask = torch.zeros(2, length, dtype=torch.bool, device="cuda")
        mask[1, length // 2:] = True
    a, c = custom_ops.lloyd_kmeans(codes, mask, clusters, 10, 63)
    ra, rc = reference.lloyd_kmeans_ref(codes, mask, clusters, 10, 63)
    assert torch.equal(a, ra) and torch.equal(c, rc)
    a2, c2 = custom_ops.lloyd_kmeans(codes, mask, clusters, 10, 63)
    assert torch.equal(a, a2) and torch.equal(c, c2)
    # Realistic codes: hashes of clustered-ish data, fewer bits.
    x = torch.randn(2, 3, length, 32, generator=g).cuda()
    codes = reference.hash_codes_ref(x, torch.randn(31, 32, generator=g).cuda(), torch.zeros(31, device="cuda"))
    a, c = custom_ops.lloyd_kmeans(codes, mask, clusters, 10, 31)
    ra, rc = reference.lloyd_kmeans_ref(codes, mask, clusters, 10, 31)
    assert torch.equal(a, ra) and torch.equal(c, rc)


@needs_gpu
@pytest.mark.parametrize("queries_per_block", [1, 97, 512, 4096, 1 << 20])
def test_lloyd_queries_per_block_gpu(queries_per_block):
    """The kernels' work split (queries per block, hence how many blocks add their bit counts
    into a row's counters) does not change the result: the reference's, bit for bit."""
    from fairseq_clustered.ops import cuda_backend
    ext = cuda_backend.cuda_ops().ext
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 3001, 32, generator=g).cuda()
    codes = reference.hash_codes_ref(x, torch.randn(63, 32, generator=g).cuda(), torch.zeros(63, device="cuda"))
    mask = torch.zeros(2, 3001, dtype=torch.bool, device="cuda")
    mask[0, 2000:] = True
    a, c = ext.lloyd_kmeans(codes, mask, 40, 10, 63, queries_per_block=queries_per_block)
    ra, rc = reference.lloyd_kmeans_ref(codes, mask, 40, 10, 63)
    assert torch.equal(a, ra) and torch.equal(c, rc)
    with pytest.raises(RuntimeError, match="queries_per_block"):
        ext.lloyd_kmeans(codes, mask, 40, 10, 63, queries_per_block=-1)


@needs_gpu
@pytest.mark.parametrize("clusters", [1, 8, 9, 40, 100, 104, 105, 128])
@pytest.mark.parametrize("bits", [63, 31, 8])
def test_lloyd_tensor_cores_gpu(clusters, bits):
    """The nearest centroids by 1-bit tensor-core products (C <= 128) give the assignments and
    centroids of the population-count kernels and of the reference, bit for bit: every
    centroid-tile count, a padded last tile (C not a multiple of 8), few bits (many ties), a
    row with fewer valid queries than clusters, ragged padding."""
    from fairseq_clustered.ops import cuda_backend
    ext = cuda_backend.cuda_ops().ext
    g = torch.Generator().manual_seed(clusters * 100 + bits)
    length = 300 if SANITIZE else 2500
    centres = torch.randn(2, 3, 6, 32, generator=g)
    x = centres[:, :, torch.randint(0, 6, (length,), generator=g)] + 0.5 * torch.randn(2, 3, length, 32, generator=g)
    codes = reference.hash_codes_ref(x, torch.randn(bits, 32, generator=g), torch.zeros(bits)).cuda()
    for mask in (None, torch.arange(length)[None, :] >= torch.tensor([[length - 77], [min(clusters, 60)]])):
        mask = None if mask is None else mask.cuda()
        got = ext.lloyd_kmeans(codes, mask, clusters, 10, bits, 0, tensor_cores=True)
        counted = ext.lloyd_kmeans(codes, mask, clusters, 10, bits, 0, tensor_cores=False)
        expected = reference.lloyd_kmeans_ref(codes, mask, clusters, 10, bits)
        for a, b, c in zip(got, counted, expected):
            assert torch.equal(a, c) and torch.equal(b, c)


@needs_gpu
@pytest.mark.parametrize("cluster_blocks", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("clusters,bits", [(1, 63), (9, 63), (100, 63), (104, 31), (105, 8), (128, 63)])
def test_lloyd_one_launch_gpu(cluster_blocks, clusters, bits):
    """Lloyd's one-launch kernel (a thread block cluster of 1 to 8 blocks per row, sm_90) gives the
    reference's assignments and centroids bit for bit: every centroid-tile count, few bits (many
    ties), rows shorter than the blocks' slices, a row with fewer valid queries than clusters,
    ragged padding, no iterations or one; and the same again on a rerun."""
    from fairseq_clustered.ops import cuda_backend
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread block clusters need sm_90 or newer")
    ext = cuda_backend.cuda_ops().ext
    g = torch.Generator().manual_seed(clusters * 100 + bits + cluster_blocks)
    for length in ((97, 300) if SANITIZE else (97, 2500)):
        centres = torch.randn(2, 3, 6, 32, generator=g)
        x = centres[:, :, torch.randint(0, 6, (length,), generator=g)] + 0.5 * torch.randn(2, 3, length, 32,
                                                                                           generator=g)
        codes = reference.hash_codes_ref(x, torch.randn(bits, 32, generator=g), torch.zeros(bits)).cuda()
        ragged = torch.arange(length)[None, :] >= torch.tensor([[length - 77], [min(clusters, 60)]])
        for mask, iterations in ((None, 10), (ragged.cuda(), 10), (ragged.cuda(), 0), (None, 1)):
            got = ext.lloyd_kmeans(codes, mask, clusters, iterations, bits, cluster_blocks=cluster_blocks)
            expected = reference.lloyd_kmeans_ref(codes, mask, clusters, iterations, bits)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (length, mask is None, iterations)
            again = ext.lloyd_kmeans(codes, mask, clusters, iterations, bits, cluster_blocks=cluster_blocks)
            assert all(torch.equal(a, b) for a, b in zip(got, again))


@needs_gpu
@pytest.mark.parametrize("cluster_blocks", [1, 3, 8])
@pytest.mark.parametrize("clusters", [9, 100, 128])
def test_lloyd_one_launch_sorts_its_assignments_gpu(cluster_blocks, clusters):
    """``lloyd_kmeans_sorted``: the one-launch kernel's assignments and centroids are the reference's
    bit for bit, and its ``order`` and ``seg_start`` are ``cluster_order``'s of those assignments (a
    stable sort: the same permutation, whatever the slicing), over rows shorter than the blocks'
    slices, slices of more than one chunk of 1024 queries, fewer valid queries than clusters (every
    query its own cluster), ragged padding (the padded queries first, in query order) and no
    iterations. Without the one-launch kernel it is refused, naming the argument."""
    from fairseq_clustered.ops import cuda_backend
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread block clusters need sm_90 or newer")
    ext = cuda_backend.cuda_ops().ext
    g = torch.Generator().manual_seed(clusters * 10 + cluster_blocks)
    for length in ((97, 1300) if SANITIZE else (97, 2500, 9000)):
        x = torch.randn(2, 3, length, 32, generator=g)
        codes = reference.hash_codes_ref(x, torch.randn(63, 32, generator=g), torch.zeros(63)).cuda()
        ragged = (torch.arange(length)[None, :] >= torch.tensor([[length - 77], [min(clusters, 60)]])).cuda()
        for mask, iterations in ((None, 10), (ragged, 10), (ragged, 0)):
            assignments, centroids, order, seg_start = ext.lloyd_kmeans_sorted(codes, mask, clusters, iterations, 63,
                                                                               cluster_blocks)
            expected = reference.lloyd_kmeans_ref(codes, mask, clusters, iterations, 63)
            assert torch.equal(assignments, expected[0]) and torch.equal(centroids, expected[1]), (length, iterations)
            expected_order, expected_start = ext.cluster_order(assignments, clusters)
            assert torch.equal(seg_start, expected_start), (length, mask is None, iterations)
            assert torch.equal(order, expected_order), (length, mask is None, iterations)
    with pytest.raises(RuntimeError, match="cluster_blocks > 0"):
        ext.lloyd_kmeans_sorted(codes, None, clusters, 10, 63, 0)


@needs_gpu
@pytest.mark.parametrize("cluster_blocks", [1, 2])
def test_lloyd_one_launch_long_slices_gpu(cluster_blocks):
    """Slices longer than a block keeps in shared memory (more than 8192 queries: the codes read
    and their bits transposed again in every counting round of 2048) give the reference's
    result bit for bit, with and without padding, at C = 100 and C = 128."""
    from fairseq_clustered.ops import cuda_backend
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread block clusters need sm_90 or newer")
    ext = cuda_backend.cuda_ops().ext
    g = torch.Generator().manual_seed(cluster_blocks)
    length = 4200 if SANITIZE else 20000  # sanitized: one block's 4200, past a round but kept whole
    centres = torch.randn(1, 2, 40, 32, generator=g)
    x = centres[:, :, torch.randint(0, 40, (length,), generator=g)] + 0.7 * torch.randn(1, 2, length, 32, generator=g)
    codes = reference.hash_codes_ref(x, torch.randn(63, 32, generator=g), torch.zeros(63)).cuda()
    ragged = (torch.arange(length)[None, :] >= length - 3001).cuda()
    for clusters in (100, 128):
        for mask in (None, ragged):
            got = ext.lloyd_kmeans(codes, mask, clusters, 10, 63, cluster_blocks=cluster_blocks)
            expected = reference.lloyd_kmeans_ref(codes, mask, clusters, 10, 63)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (clusters, mask is None)


@needs_gpu
def test_lloyd_one_launch_full_slices_gpu():
    """The one-launch kernel counts in 16 bits: a block of 65535 queries (the most it takes) whose
    members nearly all share one code, so that a cluster's member count and its set bits' counters
    reach 65531, gives the reference's result bit for bit; a row whose blocks would take more
    queries is refused, naming cluster_blocks and a block count that fits here, and its capacity is 0."""
    from fairseq_clustered.ops import cuda_backend
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread block clusters need sm_90 or newer")
    ext = cuda_backend.cuda_ops().ext
    g = torch.Generator().manual_seed(5)
    length = 65535
    codes = torch.full((1, 1, length), 0x5555_5555_5555_5555 >> 1, dtype=torch.int64)
    codes[0, 0, :7] = torch.randint(0, 2**62, (7,), generator=g)
    expected = reference.lloyd_kmeans_ref(codes, None, 3, 10, 63)
    assert int(torch.bincount(expected[0].flatten()).max()) >= 65531
    got = ext.lloyd_kmeans(codes.cuda(), None, 3, 10, 63, cluster_blocks=1)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected))
    longer = torch.zeros(1, 1, length + 1, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match=r"cluster_blocks = 1 gives blocks of 65536 .* pass cluster_blocks = 2\.\.8 "):
        ext.lloyd_kmeans(longer, None, 3, 10, 63, cluster_blocks=1)
    # The fewest blocks that fit, not ceil(N / 65535): 131070 queries in 2 blocks are slices of 65536
    # (tiles of 16); past 8 blocks' worth none fits. Both refused before any launch.
    with pytest.raises(RuntimeError, match=r"cluster_blocks = 2 gives blocks of 65536 .* pass cluster_blocks = 3\.\.8 "):
        ext.lloyd_kmeans(torch.zeros(1, 1, 131070, dtype=torch.int64, device="cuda"), None, 3, 10, 63,
                         cluster_blocks=2)
    with pytest.raises(RuntimeError, match=r"no cluster_blocks up to 8 fits; pass cluster_blocks=0"):
        ext.lloyd_kmeans(torch.zeros(1, 1, 8 * 65535 + 1, dtype=torch.int64, device="cuda"), None, 3, 10, 63,
                         cluster_blocks=8)
    assert ext.lloyd_cluster_capacity(length + 1, 3, 1) == 0
    assert ext.lloyd_cluster_capacity(length + 1, 3, 2) > 0
    assert all(torch.equal(a, b) for a, b in zip(ext.lloyd_kmeans(longer, None, 3, 10, 63, cluster_blocks=2),
                                                 ext.lloyd_kmeans(longer, None, 3, 10, 63, cluster_blocks=0)))


@needs_gpu
def test_lloyd_one_launch_many_rows_gpu():
    """More clusters of blocks than the GPU holds at once (they run in waves): the reference's
    result, and the ops' own choice of kernel gives it too."""
    from fairseq_clustered.ops import cuda_backend
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread block clusters need sm_90 or newer")
    ext = cuda_backend.cuda_ops().ext
    g = torch.Generator().manual_seed(11)
    rows = 40 if SANITIZE else 640
    codes = torch.randint(0, 2**62, (rows // 8, 8, 300), generator=g).cuda()
    expected = reference.lloyd_kmeans_ref(codes, None, 20, 10, 63)
    got = ext.lloyd_kmeans(codes, None, 20, 10, 63, cluster_blocks=4)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(torch.equal(a, b) for a, b in zip(custom_ops.lloyd_kmeans(codes, None, 20, 10, 63), expected))


@needs_gpu
def test_lloyd_one_launch_errors_gpu():
    """Blocks per row outside 0..8, or more clusters than its tiles hold, are refused with a
    message naming the argument; nothing is launched."""
    from fairseq_clustered.ops import cuda_backend
    ext = cuda_backend.cuda_ops().ext
    codes = torch.randint(0, 2**62, (1, 2, 300)).cuda()
    for blocks in (-1, 9, 16):
        with pytest.raises(RuntimeError, match=r"cluster_blocks must be 0 \(launches per iteration\) or 1..8"):
            ext.lloyd_kmeans(codes, None, 10, 10, 63, cluster_blocks=blocks)
    expected = "num_clusters <= 128" if torch.cuda.get_device_capability()[0] >= 9 else "sm_90 or newer"
    with pytest.raises(RuntimeError, match=expected):
        ext.lloyd_kmeans(codes, None, 129, 10, 63, cluster_blocks=2)
    assert ext.lloyd_cluster_capacity(300, 129, 2) == 0
    with pytest.raises(RuntimeError, match="cluster_blocks must be 1..8"):
        ext.lloyd_cluster_capacity(300, 10, 0)


@needs_gpu
def test_lloyd_cluster_capacity_gpu():
    """The one-launch kernel's resident clusters: at most one block per SM (32 warps of 64
    registers fill one), at least one cluster, fewer with larger clusters; none before sm_90."""
    from fairseq_clustered.ops import cuda_backend
    ext = cuda_backend.cuda_ops().ext
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    capacity = [ext.lloyd_cluster_capacity(4096, 100, k) for k in range(1, 9)]
    if torch.cuda.get_device_capability()[0] < 9:
        assert capacity == [0] * 8
        return
    assert capacity[0] == sms
    for k, clusters in enumerate(capacity, start=1):
        assert 1 <= clusters * k <= sms and (k == 1 or clusters <= capacity[k - 2]), capacity


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cluster_queries_is_hash_then_lloyd_gpu(dtype):
    """The fused clustering op gives what its two steps give on the GPU, and the reference's
    clusters for the GPU's hashes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 1025, 64, generator=g).to("cuda", dtype)
    mask = torch.zeros(2, 1025, dtype=torch.bool)
    mask[1, 700:] = True
    mask = mask.cuda()
    planes = torch.randn(63, 64, generator=g).cuda()
    offsets = torch.zeros(63, device="cuda")
    for _ in range(3):  # the second call and later replay a cached graph
        a, c = custom_ops.cluster_queries(x, planes, offsets, mask, 30, 10, 63)
        codes = custom_ops.hash_codes(x, planes, offsets)
        ea, ec = custom_ops.lloyd_kmeans(codes, mask, 30, 10, 63)
        assert torch.equal(a, ea) and torch.equal(c, ec)
        ra, rc = reference.lloyd_kmeans_ref(codes, mask, 30, 10, 63)
        assert torch.equal(a, ra) and torch.equal(c, rc)
        x = torch.randn(x.shape, generator=g).to("cuda", dtype)


@needs_gpu
@pytest.mark.parametrize("rows,length,clusters", [
    (3, 1, 1), (2, 97, 5), (4, 1025, 100), (2, 4099, 256), (1, 2048, 2), (2, 0, 3), (1, 8191, 100), (16, 20000, 100),
])
def test_cluster_order_gpu(rows, length, clusters):
    """The extension's counting sort by cluster against :func:`_segments` (torch's stable sort and a
    search): with padded queries (-1), empty clusters, one chunk or several with a partial last one,
    rows split over 1 to 8 blocks of a cluster (slices of unequal chunks), the largest C it takes;
    bit-identical reruns. Ids out of range (below -1 or >= C: no cluster)
    land in the same two runs, before seg_start[0] and from seg_start[C], in query order."""
    from fairseq_clustered.ops import cuda_backend
    ext = cuda_backend.extension()
    g = torch.Generator().manual_seed(rows * 7 + length)
    ids = torch.randint(-1, clusters, (rows, 2, length), generator=g)
    ids[:, :, length // 3: length // 2] = clusters // 2  # a large cluster
    ids = ids.cuda()
    order, seg_start = ext.cluster_order(ids, clusters)
    expected = _segments(ids, clusters)
    assert order.dtype == seg_start.dtype == torch.int64
    assert torch.equal(order, expected[0]) and torch.equal(seg_start, expected[1])
    again = ext.cluster_order(ids, clusters)
    assert torch.equal(again[0], order) and torch.equal(again[1], seg_start)
    if length > 1:
        wild = ids.clone()
        wild[:, :, ::7] = -5
        wild[:, :, 1::11] = clusters + 3
        order, seg_start = ext.cluster_order(wild, clusters)
        want_order, want_start = _segments(wild, clusters)[:2]
        assert torch.equal(seg_start, want_start)
        flat = wild.reshape(order.shape)
        for r in range(order.shape[0]):
            first, last = seg_start[r, 0].item(), seg_start[r, -1].item()
            assert torch.equal(order[r, first:last], want_order[r, first:last])
            for run in (order[r, :first], order[r, last:]):  # no cluster: in query order
                assert torch.equal(run, run.sort().values)
            assert (flat[r, order[r, :first]] < 0).all() and (flat[r, order[r, last:]] >= clusters).all()
    with pytest.raises(RuntimeError, match="num_clusters must be in 1..256"):
        ext.cluster_order(ids, 257)


def _layouts(x: torch.Tensor):
    """``x (B, H, N, E)`` as given, as a view of an ``(N, B, H, E)`` tensor (fairseq's layout), and
    one element past a 16-byte boundary (the kernels' scalar paths)."""
    batch, heads, length, width = x.shape
    fairseq = x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape)
    shifted.copy_(x)
    return {"contiguous": x, "fairseq": fairseq, "misaligned": shifted}


@needs_gpu
@pytest.mark.parametrize("clusters", [7, 101])
@pytest.mark.parametrize("width,dtype", [(64, torch.bfloat16), (48, torch.float16), (8, torch.bfloat16),
                                         (128, torch.float32), (64, torch.float32), (33, torch.bfloat16)])
def test_segment_sum_gpu(width, dtype, clusters):
    """The extension's per-cluster sums and means against float64 sums of the same members: clusters of
    very different sizes (one holding a third of the row, empty ones, padded queries in none; 7
    clusters of about 200 members, or 101 of about 10, a number the warp kernel's blocks of 4 do
    not divide), rows in three layouts (16-byte loads where every row start is aligned, the scalar
    kernel otherwise), a warp or a block per cluster (``per_warp``, and the choice by size, which
    must give one of the two), and bit-identical reruns."""
    from fairseq_clustered.ops import cuda_backend
    ext = cuda_backend.extension()
    length = 1499
    g = torch.Generator().manual_seed(width + clusters)
    ids = torch.randint(-1, clusters - 2, (2, 3, length), generator=g)  # the last two clusters empty
    ids[:, :, 100:600] = 2
    x = torch.randn(2, 3, length, width, generator=g).to("cuda", dtype)
    order, seg_start = ext.cluster_order(ids.cuda(), clusters)
    one_hot = torch.nn.functional.one_hot((ids + 1).clamp(min=0), clusters + 1)[..., 1:].double()  # (B, H, N, C)
    sums = torch.einsum("bhnc,bhne->bhce", one_hot, x.double().cpu()).reshape(6, clusters, width)
    counts = one_hot.sum(2).reshape(6, clusters, 1)
    means = sums / counts.clamp(min=1)
    for name, view in _layouts(x).items():
        for mean, expected in ((False, sums), (True, means)):
            by_kernel = []
            for per_warp in (0, 1):
                got = ext.segment_sum(view, order, seg_start, mean, per_warp)
                assert got.dtype == torch.float32 and got.shape == (6, clusters, width)
                # the inputs are exact in float64: what differs is the fp32 accumulation (~500 terms)
                torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-5, atol=1e-5 if mean else 1e-3,
                                           msg=f"{name}, mean={mean}, per_warp={per_warp}")
                assert torch.equal(ext.segment_sum(view, order, seg_start, mean, per_warp), got), name
                by_kernel.append(got)
            chosen = ext.segment_sum(view, order, seg_start, mean)
            assert any(torch.equal(chosen, got) for got in by_kernel), name
    with pytest.raises(RuntimeError, match="per_warp must be -1"):
        ext.segment_sum(x, order, seg_start, False, 2)


@needs_gpu
def test_segment_sum_fills_zero_gpu():
    """``zero``: the segment sum's launch also fills that int32 tensor with zeros (the centroid
    attention's tickets, a fill launch less), on either 16-byte kernel and on the scalar kernel's path
    (rows not 16-byte aligned: there a fill of its own), more ints than a block has threads, the sums
    unchanged; a tensor it cannot fill is refused, naming the argument."""
    from fairseq_clustered.ops import cuda_backend
    ext = cuda_backend.extension()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 9, (2, 3, 500), generator=g)
    x = torch.randn(2, 3, 500, 64, generator=g).to("cuda", torch.bfloat16)
    order, seg_start = ext.cluster_order(ids.cuda(), 9)
    for name, view in _layouts(x).items():
        for per_warp in (0, 1):
            zero = torch.full((301,), 7, dtype=torch.int32, device="cuda")
            got = ext.segment_sum(view, order, seg_start, True, per_warp, zero=zero)
            assert torch.equal(got, ext.segment_sum(view, order, seg_start, True, per_warp)), name
            assert not zero.any(), f"{name}, per_warp={per_warp}: {zero.count_nonzero()} ints left"
    with pytest.raises(RuntimeError, match="zero must be a contiguous int32"):
        ext.segment_sum(x, order, seg_start, True, zero=torch.zeros(4, dtype=torch.int64, device="cuda"))


_DEPENDENT_LAUNCH_SCRIPT = """
import sys
import torch
from fairseq_clustered.ops import clustered_attention, improved_clustered_attention
g = torch.Generator().manual_seed(0)
q, k, v, grad = (torch.randn(2, 4, 2048, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(4))
q, k, v = (t.requires_grad_() for t in (q, k, v))
planes = torch.randn(63, 64, generator=g).cuda()
results = []
for improved in (False, True):
    def step():
        if improved:
            return improved_clustered_attention(q, k, v, num_clusters=100, planes=planes, topk=32)
        return clustered_attention(q, k, v, num_clusters=100, planes=planes)
    for _ in range(3):  # eager, then the graph cache's replays
        out = step()
        out.backward(grad)
        results += [out.detach(), q.grad, k.grad, v.grad]
        q.grad = k.grad = v.grad = None
        with torch.no_grad():
            results.append(step())
torch.save([r.cpu() for r in results], sys.argv[1])
"""


@needs_gpu
def test_dependent_launches_change_no_bit_gpu(tmp_path):
    """Programmatic dependent launches (on by default from sm_90; FAIRSEQ_CLUSTERED_PDL=0 turns them
    off) let each kernel of a step start while the one before it ends, and each waits for that
    kernel's results: the outputs and gradients of clustered and improved attention, eager and
    replayed from the graph cache, with and without grad, are the same bits either way (two
    processes), but for the improved variant's key and value gradients, which float atomics sum in
    no fixed order. A setting other than 0 or 1 is refused, naming the variable."""
    import subprocess
    import sys
    runs = {}
    for setting in ("0", "1", "2"):
        path = tmp_path / f"pdl{setting}.pt"
        result = subprocess.run([sys.executable, "-c", _DEPENDENT_LAUNCH_SCRIPT, str(path)], capture_output=True,
                                text=True, timeout=300, env={**os.environ, "FAIRSEQ_CLUSTERED_PDL": setting})
        if setting == "2":
            assert result.returncode != 0 and "FAIRSEQ_CLUSTERED_PDL must be 0 (off) or 1" in result.stderr, (
                result.stderr[-1000:])
            continue
        assert result.returncode == 0, result.stderr[-2000:]
        runs[setting] = torch.load(path)
    assert len(runs["0"]) == len(runs["1"]) == 30
    for index, (off, on) in enumerate(zip(runs["0"], runs["1"])):
        if index >= 15 and index % 5 in (2, 3):  # the improved variant's dk, dv: float atomics in any order
            torch.testing.assert_close(on, off, rtol=1e-2, atol=1e-3, msg=f"result {index}")
        else:
            assert torch.equal(off, on), f"result {index} differs with dependent launches"


@needs_gpu
def test_segment_sum_choice_gpu():
    """The shape's choice of segment-sum kernel: at the benchmark's 32 rows and C = 100, a warp per
    cluster for 2k queries (20 members, 2 passes of a warp: more clusters than the blocks one wave
    holds on any GPU of fewer than 350 SMs) and a block per cluster for 10k (103 members, 7 passes)."""
    from fairseq_clustered.ops import cuda_backend
    ext = cuda_backend.extension()
    for length, per_warp in ((2048, 1), (10240, 0)):
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(0, 100, (4, 8, length), generator=g).cuda()
        x = torch.randn(4, 8, length, 64, generator=g).to("cuda", torch.bfloat16)
        order, seg_start = ext.cluster_order(ids, 100)
        other = ext.segment_sum(x, order, seg_start, True, 1 - per_warp)
        chosen = ext.segment_sum(x, order, seg_start, True)
        assert torch.equal(chosen, ext.segment_sum(x, order, seg_start, True, per_warp)), length
        assert not torch.equal(chosen, other), f"{length}: the two kernels' sums should differ in their last bits"


@needs_gpu
@pytest.mark.parametrize("width,dtype", [(64, torch.bfloat16), (128, torch.float16), (64, torch.float32),
                                         (40, torch.bfloat16), (33, torch.float32)])
def test_broadcast_against_indexing_gpu(width, dtype):
    """broadcast_into against torch's indexing of the cluster rows (zeros for padded queries), into
    outputs in three layouts and rows whose length is not a multiple of a block's queries; with the
    assignments read before the prior kernel's end (``assignments_ready``: they were made kernels
    earlier), also from a transposed copy (made by the call itself: read after the wait)."""
    from fairseq_clustered.ops import cuda_backend
    ext = cuda_backend.extension()
    clusters, length = 9, 1037
    g = torch.Generator().manual_seed(width)
    src = torch.randn(6, clusters, width, generator=g).cuda()
    a = torch.randint(-1, clusters, (2, 3, length), generator=g).cuda()
    a_strided = a.transpose(0, 1).contiguous().transpose(0, 1)
    rows = src[torch.arange(6, device="cuda")[:, None], a.reshape(6, length).clamp(min=0)]  # (6, N, E)
    expected = torch.where(a.reshape(6, length, 1) < 0, 0.0, rows).reshape(2, 3, length, width).to(dtype)
    for ready, assignments in [(False, a), (True, a), (True, a_strided)]:
        for name, out in _layouts(torch.full((2, 3, length, width), 7.0, device="cuda", dtype=dtype)).items():
            ext.broadcast_into(src, assignments, out, ready)
            assert torch.equal(out, expected), (name, ready, assignments.is_contiguous())


@needs_gpu
def test_edge_cases_gpu():
    """All-padded rows finite, C larger than N, topk larger than S (exact), bit-identical reruns."""
    from fairseq_clustered.ops import clustered_attention, improved_clustered_attention
    from fairseq_clustered.ops.reference import exact_attention_ref
    q, k, v, qmask, kmask, _ = make_inputs(2, 2, 97, 97, 64, torch.bfloat16, "cuda", 4)
    kmask[0] = True  # batch 0 sees no key at all
    qmask[0] = True
    planes = torch.randn(63, 64, device="cuda")
    for fn in (clustered_attention, improved_clustered_attention):
        out = fn(q, k, v, kmask, qmask, planes=planes)
        assert torch.isfinite(out).all() and (out[0] == 0).all()
    # C > N: exact attention; topk > S: exact attention.
    q, k, v, qmask, kmask, _ = make_inputs(2, 2, 97, 89, 64, torch.float32, "cuda", 4)
    exact = exact_attention_ref(q, k, v, kmask)
    valid = ~qmask[:, None, :, None]
    out = clustered_attention(q, k, v, kmask, qmask, num_clusters=200, planes=planes)
    assert max_err(out * valid, exact * valid) < 1e-4
    out = improved_clustered_attention(q, k, v, kmask, qmask, num_clusters=5, topk=1000, planes=planes)
    assert max_err(out * valid, exact * valid) < 1e-4
    # Determinism: forward bit-identical.
    for fn in (clustered_attention, improved_clustered_attention):
        a = fn(q, k, v, kmask, qmask, num_clusters=7, planes=planes)
        b = fn(q, k, v, kmask, qmask, num_clusters=7, planes=planes)
        assert torch.equal(a, b)


@needs_gpu
def test_extension_errors_gpu():
    """The host code refuses bad arguments with a readable error (run in a subprocess: it may crash).

    It did crash (SIGSEGV) when the extension was built with the GPU machine's CC/CXX (a
    wrapped /opt/gcc toolchain); built with the system cc / c++, as torch's JIT extensions
    are and as benchmarks/gpu_check.sh does, it raises (H100, torch 2.11, 2026-11-24)."""
    import subprocess
    import sys
    script = (
        "import torch, fairseq_clustered._C as ext\n"
        "x = torch.randn(1, 1, 8, 200, device='cuda')\n"
        "order = torch.arange(8, device='cuda').reshape(1, 8)\n"
        "seg = torch.tensor([[0, 8]], device='cuda')\n"
        "try:\n"
        "    ext.segment_sum(x, order, seg, False)\n"
        "except RuntimeError as error:\n"
        "    assert 'width must be' in str(error)\n"
        "    print('raised')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "raised" in result.stdout, (result.returncode, result.stderr[-500:])


@needs_gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["flash", "triton"])
@pytest.mark.parametrize("pad", [False, True])
def test_results_in_the_inputs_layout_gpu(dropout, pad):
    """fairseq's layout (views of (N, B, H D) projections) on the GPU: the output and the gradients
    come back in that layout, with the values of the same call on contiguous inputs."""
    from fairseq_clustered.ops import clustered_attention
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, grad = (torch.randn(2, 4, 1025, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(4))
    kmask = (torch.arange(1025) >= torch.tensor([[1025], [900]])).cuda() if pad else None
    planes = torch.randn(63, 64, device="cuda")

    expected, got = _in_both_layouts(
        lambda *qkv: clustered_attention(*qkv, kmask, kmask, num_clusters=50, planes=planes, dropout_p=dropout,
                                         generator=torch.Generator(device="cuda").manual_seed(1)),
        q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2, msg=name)
        if dropout:  # the Triton kernels read and write through strides: the same sums in the same order
            assert torch.equal(a, b), name


@needs_gpu
@pytest.mark.parametrize("width,dtype", [(64, torch.bfloat16), (33, torch.float16), (40, torch.float32)])
def test_broadcast_into_gpu(width, dtype):
    """broadcast_into writes the rows through out's strides (16-byte stores only where every row
    start is aligned), the same values as broadcast's contiguous output; other elements untouched."""
    from fairseq_clustered.ops import cuda_backend
    ext = cuda_backend.cuda_ops().ext
    src = torch.randn(6, 9, width, device="cuda")
    a = torch.randint(-1, 9, (2, 3, 50), device="cuda")
    expected = ext.broadcast(src, a, dtype)
    storage = torch.full((50, 2, 3, width + 3), 7.0, device="cuda", dtype=dtype)  # odd row stride
    out = storage[..., 1:width + 1].permute(1, 2, 0, 3)
    ext.broadcast_into(src, a, out)
    assert torch.equal(out, expected)
    assert (storage[..., 0] == 7).all() and (storage[..., width + 1:] == 7).all()
    with pytest.raises(RuntimeError, match="last dim must be contiguous"):
        ext.broadcast_into(src, a, torch.empty(2, 3, width, 50, device="cuda", dtype=dtype).transpose(2, 3))


def _op_args(dtype=torch.bfloat16):
    q, k, v, qmask, kmask, a = make_inputs(2, 2, 65, 70, 64, dtype, "cuda", 6)
    return q, k, v, qmask, kmask, a


@needs_gpu
@pytest.mark.parametrize("mask", [False, True])
def test_opcheck_gpu(mask):
    q, k, v, qmask, kmask, a = _op_args()
    kmask = kmask if mask else None
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    planes = torch.randn(63, 64, device="cuda")
    torch.library.opcheck(custom_ops.hash_codes, (q.detach(), planes, torch.zeros(63, device="cuda")))
    codes = custom_ops.hash_codes(q.detach(), planes, torch.zeros(63, device="cuda"))
    torch.library.opcheck(custom_ops.lloyd_kmeans, (codes, qmask, 6, 10, 63))
    torch.library.opcheck(custom_ops.cluster_queries,
                          (q.detach(), planes, torch.zeros(63, device="cuda"), qmask, 6, 10, 63))
    torch.library.opcheck(custom_ops.clustered_attention_fwd, (q, k, v, a, kmask, None, 6, 0.125, 0.0))
    torch.library.opcheck(custom_ops.improved_clustered_attention_fwd, (q, k, v, a, kmask, None, 6, 8, 0.125, 0.0))


def test_eager_backward_is_differentiable_once_cpu():
    """The eager Functions' backward guard (``eager._differentiable_once``) against torch's
    ``once_differentiable``, which it calls only where grad mode is on: the same gradients, the
    backward run without grad mode either way, and with ``create_graph=True`` the same refusal of a
    second differentiation (where the plain backward would silently give no second derivative)."""
    from torch.autograd.function import once_differentiable

    from fairseq_clustered.ops import eager
    grad_modes = []

    def square_backward(ctx, grad):
        grad_modes.append(torch.is_grad_enabled())
        (x,) = ctx.saved_tensors
        return 2 * x * grad

    def square(guard):
        class Square(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x * x

            backward = staticmethod(guard(square_backward))
        return Square

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    incoming = torch.randn(5, dtype=torch.float64, requires_grad=True)  # recorded where create_graph
    ours, torchs = square(eager._differentiable_once), square(once_differentiable)
    for create_graph in (False, True):
        (got,) = torch.autograd.grad(ours.apply(x), x, incoming, create_graph=create_graph)
        (want,) = torch.autograd.grad(torchs.apply(x), x, incoming, create_graph=create_graph)
        assert torch.equal(got, want) and torch.equal(got.detach(), 2 * x.detach() * incoming.detach())
        assert got.requires_grad == want.requires_grad == create_graph
        if create_graph:
            for second in (got, want):
                with pytest.raises(RuntimeError, match="differentiate twice"):
                    second.sum().backward()
    assert grad_modes == [False] * 4


@needs_gpu
@pytest.mark.parametrize("variant", ["clustered", "improved"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_eager_path_gpu(monkeypatch, variant, dropout):
    """On CUDA tensors the public functions call the CUDA implementations directly
    (ops/eager.py); the results are the custom ops' (same output; gradients within the
    rounding of atomically accumulated sums). With key padding and dropout too, the improved
    variant's backward runs from the forward's kept parts (its Triton path)."""
    from fairseq_clustered.ops import clustered_attention, cuda_backend, eager, improved_clustered_attention
    q, k, v, qmask, kmask, _ = _op_args()
    grad = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    fn = clustered_attention if variant == "clustered" else improved_clustered_attention
    planes = torch.randn(63, 64, device="cuda")

    def run():
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*inputs, kmask, qmask, num_clusters=6, planes=planes, dropout_p=dropout,
                 generator=torch.Generator(device="cuda").manual_seed(0))
        out.backward(grad)
        return [out.detach()] + [t.grad for t in inputs]

    taken, kept_calls = [], []
    real = eager.implementations
    monkeypatch.setattr(eager, "implementations", lambda query: taken.append(real(query)) or taken[-1])
    cuda_ops = cuda_backend.cuda_ops()
    real_kept = cuda_ops.improved_bwd_packed
    monkeypatch.setattr(cuda_ops, "improved_bwd_packed", lambda *args: kept_calls.append(1) or real_kept(*args))
    got = run()
    assert taken and taken[-1] is not None, "the eager path was not taken on CUDA"
    assert bool(kept_calls) == (variant == "improved"), "the improved backward did not take the kept parts"
    monkeypatch.setattr(eager, "implementations", lambda query: None)
    expected = run()
    assert torch.equal(got[0], expected[0])
    for name, a, b in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
        if variant == "clustered":  # no atomics: the backward from the forward's kept parts is the op's, exactly
            assert torch.equal(a, b), name
        assert max_err(a, b) <= 1e-2 * (1 + b.double().abs().max().item()), name


@needs_gpu
@pytest.mark.parametrize("length,keys", [(65, 70), (2048, 2048)])
def test_improved_eager_flash_path_gpu(monkeypatch, length, keys):
    """Without key padding and dropout the eager improved step's backward runs from the
    forward's centroid flash output, log-sum-exp and sort (``improved_bwd_packed``): the custom
    ops' output, and their gradients within the rounding of atomically accumulated sums. 2048
    keys split the centroids' flash forward over key blocks (merged by log-sum-exp)."""
    from fairseq_clustered.ops import cuda_backend, eager, improved_clustered_attention
    q, k, v, _, _, _ = make_inputs(2, 2, length, keys, 64, torch.bfloat16, "cuda", 6)
    grad = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    planes = torch.randn(63, 64, device="cuda")
    cuda_ops = cuda_backend.cuda_ops()
    assert (cuda_ops._key_splits(4, keys) > 1) == (keys == 2048)

    def run():
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = improved_clustered_attention(*inputs, num_clusters=6, topk=16, planes=planes)
        out.backward(grad)
        return [out.detach()] + [t.grad for t in inputs]

    kept_calls = []
    real_kept = cuda_ops.improved_bwd_packed
    monkeypatch.setattr(cuda_ops, "improved_bwd_packed", lambda *args: kept_calls.append(1) or real_kept(*args))
    got = run()
    assert kept_calls, "the eager backward did not take the kept parts"
    monkeypatch.setattr(eager, "implementations", lambda query: None)
    expected = run()
    assert torch.equal(got[0], expected[0])
    for name, a, b in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
        assert max_err(a, b) <= 1e-2 * (1 + b.double().abs().max().item()), name


@needs_gpu
def test_compile_fullgraph_gpu():
    from fairseq_clustered.ops import clustered_attention, improved_clustered_attention
    q, k, v, qmask, kmask, _ = _op_args()
    planes = torch.randn(63, 64, device="cuda")

    def f(q, k, v):
        return (clustered_attention(q, k, v, kmask, qmask, num_clusters=6, planes=planes)
                + improved_clustered_attention(q, k, v, kmask, qmask, num_clusters=6, topk=8, planes=planes))

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    assert torch.equal(eager, compiled)


@needs_gpu
@pytest.mark.parametrize("variant", ["clustered", "improved"])
@pytest.mark.parametrize("mask", [False, True])
def test_cuda_graph_gpu(variant, mask):
    """A forward + backward (clustering included) captured in a CUDA graph replays to the eager result."""
    from fairseq_clustered.ops import clustered_attention, improved_clustered_attention
    q, k, v, qmask, kmask, _ = _op_args()
    if not mask:
        qmask = kmask = None
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    planes = torch.randn(63, 64, device="cuda")
    grad = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    fn = clustered_attention if variant == "clustered" else improved_clustered_attention

    def step():
        out = fn(q, k, v, kmask, qmask, num_clusters=6, planes=planes)
        out.backward(grad)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for t in (q, k, v):
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for t in (q, k, v):
        t.grad = None
    eager = [step().detach().clone()]
    eager_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for t in (q, k, v):
        t.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager[0])
    for t, e in zip((q, k, v), eager_grads):
        assert max_err(t.grad, e) <= 1e-2 * (1 + e.double().abs().max().item())
