"""One-kernel attention of causal clustered attention on the GPU (Triton).

:mod:`.causal_fused` computes the attention of a chunk with three flash-attention calls
(own chunk, previous chunk, summaries) and merges them; every part writes its output,
log-sum-exp and fp32 gradients, and the summaries carry their ``log n_j`` offsets in
padded feature columns. This module does the same in one pass: the program of a slice of
chunk ``t`` (all its ``W`` queries up to ``W = 128``; a block of 128 of them for larger
windows) streams the keys it sees through one online softmax, in blocks of the slice's
size:

* its own positions, with the causal mask (first, so the running max is finite from the
  start: every query sees itself), then the chunk's earlier slices, unmasked;
* chunk ``t - 1``'s keys, unmasked (``t >= 1``);
* the ``C`` cluster summaries of chunks ``0 .. t - 2`` (``t >= 2``), whose logits get the
  offset ``log n_j`` added in fp32 (``-inf`` for an empty cluster, so it gets weight 0).

The summaries: one more Triton kernel sums each chunk's keys, values and member counts per
cluster as one-hot matrix products; the extension's prefix-mean kernel turns them into the
means of chunks ``0 .. t - 2``. (A scan over the chunks with the running sums in
registers would skip the fp32 sums in memory, but its looped one-hot products ran 2x
slower, in one pass or in two over segments of chunks: benchmarks/NOTES.md.)

Backward (the joint softmax, ``P = exp(S - lse)``, ``dS = P (dP - rowsum(dO * O))``):

* a query kernel, per slice of a chunk as in the forward: ``dq`` over the same blocks,
  and the slice's part of the gradients of the chunk's summary keys and values, which no
  other program writes (the parts of a chunk's slices are summed by the scan below, in
  a fixed order: the result is deterministic);
* the summaries' gradients go back through the prefix means to per-(chunk, cluster)
  sums: a scan walking the chunks backwards (elementwise, 2x faster than the
  extension's adjoint kernel), which adds each chunk's slice parts as it reads them;
* a key kernel, per slice of chunk ``j``: ``dk``, ``dv`` from the queries of chunks ``j``
  (causally) and ``j + 1``, in blocks, plus the gradient of the (chunk, cluster) sum each
  key is a member of, written once in the input dtype.

Attention dropout: the kernels read the reference's keep-mask ``(B, H, N, 2 W + C)`` (one
byte per query and softmax column: key position ``p`` of a query of chunk ``t`` at column
``p - (t - 1) W``, summary ``j`` at ``2 W + j``), so a seed gives the reference's result.
The dropped probabilities weight the values; the normaliser and the lse are the undropped
softmax's, and the backward's ``rowsum(dO * O)`` stays the right correction.

Requirements (:func:`triton_path_unavailable` says which one fails): CUDA, fp16 / bf16,
no key padding, ``window`` a power of two in 16..256 and the head dim one in 16..128,
query and value head dims equal, ``num_clusters <= 256``, Triton importable. Otherwise
:mod:`.causal_fused` (three flash calls; no dropout) or the reference serves the call.

The kernels run unchanged in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU
tensors, which is how the CPU tests check them against the reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .causal_fused import fused_path_unavailable, summary_means_from_sums
from ._triton import MISSING as _TRITON_MISSING
from ._triton import mask_bytes, power_of_two_in, tl, triton
from .custom_ops import LIBRARY, attention_output_like, laid_out_as

__all__ = ["triton_path_unavailable", "causal_clustered_attention_triton"]

MIN_BLOCK, MAX_BLOCK = 16, 128  # tensor-core tiles need >= 16; > 128 spills registers
MAX_WINDOW = 256  # larger windows stream through the kernels in blocks of at most MAX_BLOCK
MAX_CLUSTERS = 256
LOG2E = 1.4426950408889634


def triton_path_unavailable(query: Tensor, value: Tensor, key_padding_mask: Optional[Tensor], dropout_p: float,
                            window: int, num_clusters: int) -> Optional[str]:
    """Why :func:`causal_clustered_attention_triton` cannot serve these inputs (None if it can);
    attention dropout it takes (as a keep-mask), unlike the three-flash composition."""
    reason = fused_path_unavailable(query, value, key_padding_mask, 0.0, window)
    if reason is not None:
        return reason
    if _TRITON_MISSING is not None:
        return _TRITON_MISSING
    if not power_of_two_in(window, MIN_BLOCK, MAX_WINDOW):
        return f"window {window} is not a power of two in {MIN_BLOCK}..{MAX_WINDOW}"
    if not power_of_two_in(query.shape[-1], MIN_BLOCK, MAX_BLOCK):
        return f"head dim {query.shape[-1]} is not a power of two in {MIN_BLOCK}..{MAX_BLOCK}"
    if num_clusters > MAX_CLUSTERS:
        return f"num_clusters {num_clusters} > {MAX_CLUSTERS}"
    return None


# ================================================================ kernels

if triton is not None:

    @triton.jit
    def _online_softmax_step(acc, row_max, row_sum, logits, values, drop):
        """Fold one block of base-2 ``logits (M, L)`` and ``values (L, D)`` into the running
        ``acc (M, D)``, ``row_max (M,)``, ``row_sum (M,)``; row_max must already be finite.
        ``drop``: the block's dropout multipliers (M, L), or 1.0; they weight the values
        only, not the softmax's normaliser (dropout acts on the probabilities)."""
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        rescale = tl.exp2(row_max - new_max)
        probs = tl.exp2(logits - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + tl.dot((probs * drop).to(values.dtype), values)
        return acc, new_max, row_sum

    @triton.jit
    def _dropout(KEEP, group, length, rows, cols, columns, keep_scale, HAS_DROPOUT: tl.constexpr):
        """Dropout multipliers of the queries at positions ``rows`` over softmax columns
        ``cols`` (window keys ``0 .. 2W - 1``, then the summaries' slots): ``keep_scale`` =
        1 / (1 - p) where the keep-mask KEEP (G, N, columns) uint8 keeps the entry, else 0;
        1.0 without dropout. Rows past the end and columns past ``columns`` (absent summary
        slots) read as dropped."""
        drop = 1.0
        if HAS_DROPOUT:
            ok = (rows < length)[:, None] & (cols < columns)[None, :]
            kept = tl.load(KEEP + (group * length + rows)[:, None] * columns + cols[None, :], mask=ok, other=0)
            drop = tl.where(kept != 0, keep_scale, 0.0)
        return drop

    @triton.jit
    def _group_start(group, heads, stride_b, stride_h):
        """Element offset of (batch, head) group ``group`` in a (B, H, N, D) tensor with these strides."""
        return (group // heads) * stride_b + (group % heads) * stride_h

    @triton.jit
    def _one_hot_sums(X, CLUSTERS, chunk, group, length, base, stride_n, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_C: tl.constexpr, DIM: tl.constexpr):
        """The rows of chunk ``t`` of group ``group`` of X (its rows at ``base + n stride_n``)
        summed per cluster slot, (BLOCK_C, DIM) fp32, and the slots' member counts (BLOCK_C,):
        one-hot products over the chunk's blocks of BLOCK rows (exact products, fp32
        accumulation in a fixed order: reproducible)."""
        feats = tl.arange(0, DIM)
        slots = tl.arange(0, BLOCK_C)
        total = tl.zeros((BLOCK_C, DIM), tl.float32)
        count = tl.zeros((BLOCK_C,), tl.float32)
        for block in tl.static_range(WINDOW // BLOCK):
            rows = chunk * WINDOW + block * BLOCK + tl.arange(0, BLOCK)
            row_ok = rows < length
            cluster = tl.load(CLUSTERS + group * length + rows, mask=row_ok, other=-1)
            members = slots[:, None] == cluster[None, :]  # (BLOCK_C, BLOCK); -1 matches no slot
            x = tl.load(X + base + rows[:, None] * stride_n + feats[None, :], mask=row_ok[:, None], other=0.0)
            total = tl.dot(members.to(x.dtype), x, total)
            # A histogram, not a row sum of the one-hot: the sum took registers enough to
            # spill (ptxas, sm_90a: 132 bytes against 32; benchmarks/kernel_resources.py), and
            # the kernel 0.94 ms against 0.61 at N = 64k, W = 128 on an H200.
            count += tl.histogram(cluster.to(tl.int32), BLOCK_C, mask=cluster >= 0).to(tl.float32)
        return total, count

    @triton.jit
    def _chunk_cluster_sums(K, V, CLUSTERS, SUMS_K, SUMS_V, COUNTS, length, num_chunks, num_clusters,
                            heads, in_b, in_h, in_n, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
                            BLOCK_C: tl.constexpr, DIM: tl.constexpr):
        """Program (chunk t, group g): the sums of the chunk's keys and values per cluster,
        ``(G, T, C, DIM)`` fp32, and the member counts ``(G, C, T)`` fp32. K, V: (B, H, N, DIM)
        with strides (in_b, in_h, in_n, 1)."""
        chunk = tl.program_id(0)
        group = tl.program_id(1).to(tl.int64)
        base = _group_start(group, heads, in_b, in_h)
        slots = tl.arange(0, BLOCK_C)
        slot_ok = slots < num_clusters
        out = ((group * num_chunks + chunk) * num_clusters + slots[:, None]) * DIM + tl.arange(0, DIM)[None, :]
        # Keys, then values: one fp32 accumulator live at a time (with both at once the
        # kernel took 1.6x the time, N = 64k on an H200).
        sum_k, count = _one_hot_sums(K, CLUSTERS, chunk, group, length, base, in_n, WINDOW, BLOCK, BLOCK_C, DIM)
        tl.store(SUMS_K + out, sum_k.to(SUMS_K.dtype.element_ty), mask=slot_ok[:, None])
        tl.store(COUNTS + (group * num_clusters + slots) * num_chunks + chunk, count, mask=slot_ok)
        sum_v, _ = _one_hot_sums(V, CLUSTERS, chunk, group, length, base, in_n, WINDOW, BLOCK, BLOCK_C, DIM)
        tl.store(SUMS_V + out, sum_v.to(SUMS_V.dtype.element_ty), mask=slot_ok[:, None])

    @triton.jit
    def _summary_grads_scan(GRAD_MEAN_K, GRAD_MEAN_V, COUNTS, GRAD_SUMS_K, GRAD_SUMS_V, num_chunks,
                            num_clusters, SLICES: tl.constexpr, BLOCK_C: tl.constexpr, DIM: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        """Adjoint of the prefix means, program (feature block f, group g): the
        gradient of chunk s's per-cluster sums is the sum over its readers t >= s + 2 of
        grad_mean_t / max(n_t, 1), a scan walking the chunks backwards. Each reader's
        grad_mean_t comes in SLICES parts (one per query slice of chunk t), added here in
        fp32 in a fixed order (deterministic; a separate fp32 sum of the parts took 0.6 ms
        at W = 256, N = 32k on an H200, more than this scan).

        GRAD_MEAN_K, GRAD_MEAN_V: (G, T - 2, SLICES, C, DIM); COUNTS: (G, T, C) fp32;
        GRAD_SUMS_K, GRAD_SUMS_V: (G, T, C, DIM), zero for chunks T - 2 and T - 1 (no reader)."""
        group = tl.program_id(1).to(tl.int64)
        feats = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        slots = tl.arange(0, BLOCK_C)
        slot_ok = slots < num_clusters
        tile = slots[:, None] * DIM + feats[None, :]
        last = (group * num_chunks + num_chunks - 2) * num_clusters * DIM + tile
        zeros = tl.zeros((BLOCK_C, BLOCK_D), tl.float32).to(GRAD_SUMS_K.dtype.element_ty)
        tl.store(GRAD_SUMS_K + last, zeros, mask=slot_ok[:, None])
        tl.store(GRAD_SUMS_K + last + num_clusters * DIM, zeros, mask=slot_ok[:, None])
        tl.store(GRAD_SUMS_V + last, zeros, mask=slot_ok[:, None])
        tl.store(GRAD_SUMS_V + last + num_clusters * DIM, zeros, mask=slot_ok[:, None])
        grad_k = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
        grad_v = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
        for step in range(0, num_chunks - 2):
            reader = num_chunks - 1 - step  # T - 1 down to 2
            count = tl.load(COUNTS + (group * num_chunks + reader) * num_clusters + slots, mask=slot_ok, other=1.0)
            inverse = 1.0 / tl.maximum(count, 1.0)[:, None]
            parts_k = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
            parts_v = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
            for part in tl.static_range(SLICES):
                src = ((group * (num_chunks - 2) + reader - 2) * SLICES + part) * num_clusters * DIM + tile
                parts_k += tl.load(GRAD_MEAN_K + src, mask=slot_ok[:, None], other=0.0).to(tl.float32)
                parts_v += tl.load(GRAD_MEAN_V + src, mask=slot_ok[:, None], other=0.0).to(tl.float32)
            grad_k += parts_k * inverse
            grad_v += parts_v * inverse
            dst = (group * num_chunks + reader - 2) * num_clusters * DIM + tile
            tl.store(GRAD_SUMS_K + dst, grad_k.to(GRAD_SUMS_K.dtype.element_ty), mask=slot_ok[:, None])
            tl.store(GRAD_SUMS_V + dst, grad_v.to(GRAD_SUMS_V.dtype.element_ty), mask=slot_ok[:, None])

    @triton.jit
    def _summary_block(SUM_K, SUM_V, COUNTS, q, group, chunk, num_chunks, num_clusters, qk_scale,
                       BLOCK_C: tl.constexpr, DIM: tl.constexpr):
        """Chunk t's summaries: values and keys (BLOCK_C, DIM) from SUM_K / SUM_V (G, T - 2, C,
        DIM), base-2 logits of ``q`` with the ``log n`` offsets (-inf for empty clusters and
        absent slots), and which slots are clusters."""
        slots = tl.arange(0, BLOCK_C)
        slot_ok = slots < num_clusters
        first_slot = (group * (num_chunks - 2) + chunk - 2) * num_clusters
        tile = (first_slot + slots[:, None]) * DIM + tl.arange(0, DIM)[None, :]
        keys = tl.load(SUM_K + tile, mask=slot_ok[:, None], other=0.0)
        values = tl.load(SUM_V + tile, mask=slot_ok[:, None], other=0.0)
        count = tl.load(COUNTS + (group * num_chunks + chunk) * num_clusters + slots, mask=slot_ok, other=0.0)
        # log(0) = -inf: weight exp(-inf) = 0.
        logits = tl.dot(q, tl.trans(keys)) * qk_scale + tl.log(count)[None, :] * 1.4426950408889634
        return values, keys, logits, slot_ok

    @triton.jit
    def _program_tiles(heads, stride_b, stride_h, stride_n, WINDOW: tl.constexpr, ROWS: tl.constexpr,
                       DIM: tl.constexpr):
        """For program (p, g) of a kernel that gives each program a ROWS-row slice of a chunk:
        its chunk, the slice's index in the chunk, the group, the slice's positions (ROWS,),
        and in a (B, H, N, DIM) tensor with the given strides the group's offset and the
        slice's (ROWS, DIM) element offsets from it."""
        chunk = tl.program_id(0) // (WINDOW // ROWS)
        part = tl.program_id(0) % (WINDOW // ROWS)
        group = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        base, tile = _tile(group, rows, heads, stride_b, stride_h, stride_n, DIM)
        return chunk, part, group, rows, base, tile

    @triton.jit
    def _tile(group, rows, heads, stride_b, stride_h, stride_n, DIM: tl.constexpr):
        """The offset of group ``group`` in a (B, H, N, DIM) tensor with these strides, and the
        (len(rows), DIM) element offsets of its ``rows`` from there."""
        return (_group_start(group, heads, stride_b, stride_h),
                rows[:, None] * stride_n + tl.arange(0, DIM)[None, :])

    @triton.jit
    def _complete_block_step(K, V, base, tile, stride_n, q, shift, acc, row_max, row_sum, qk_scale, drop):
        """One online-softmax step of the queries ``q`` over the ROWS keys ``shift`` positions
        from theirs (``tile``: their (ROWS, DIM) element offsets), a block they see whole;
        ``drop``: its dropout multipliers (or 1.0)."""
        k = tl.load(K + base + tile + shift * stride_n)
        v = tl.load(V + base + tile + shift * stride_n)
        return _online_softmax_step(acc, row_max, row_sum, tl.dot(q, tl.trans(k)) * qk_scale, v, drop)

    @triton.jit
    def _window_attention_fwd(Q, K, V, SUM_K, SUM_V, COUNTS, OUT, LSE, KEEP,
                              length, num_chunks, num_clusters, qk_scale, keep_scale,
                              heads, in_b, in_h, in_n, out_b, out_h, out_n,
                              WINDOW: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                              DIM: tl.constexpr, HAS_DROPOUT: tl.constexpr):
        """Program (p, group g), p = t W / ROWS + s: out and natural-log lse of ROWS queries
        of chunk t (its s-th slice). The keys stream through one online softmax in blocks of
        ROWS: the slice's own positions (causally), the chunk's earlier slices, the previous
        chunk's slices, then the summaries.

        Q, K, V: (B, H, N, DIM) with strides (in_b, in_h, in_n, 1); OUT: (B, H, N, DIM) with
        strides (out_b, out_h, out_n, 1); G = B H groups. SUM_K, SUM_V: (G, T - 2, C, DIM);
        COUNTS: (G, T, C) fp32 members of chunks 0 .. t - 2. LSE: (G, T W) fp32. qk_scale =
        scale log2(e). With HAS_DROPOUT, KEEP (G, N, 2 W + C) uint8: the keep-mask over each
        query's softmax columns (key position p at column p - (t - 1) W, summary j at 2 W + j),
        keep_scale = 1 / (1 - p); the lse is the undropped softmax's.
        """
        chunk, part, group, rows, base, tile = _program_tiles(heads, in_b, in_h, in_n, WINDOW, ROWS, DIM)
        row_ok = rows < length
        q = tl.load(Q + base + tile, mask=row_ok[:, None], other=0.0)
        first_column = (chunk - 1) * WINDOW  # the key position at window column 0
        columns = 2 * WINDOW + num_clusters

        # The diagonal block first, causally: every row sees itself, so its max is finite.
        k = tl.load(K + base + tile, mask=row_ok[:, None], other=0.0)
        v = tl.load(V + base + tile, mask=row_ok[:, None], other=0.0)
        logits = tl.dot(q, tl.trans(k)) * qk_scale
        logits = tl.where(rows[:, None] >= rows[None, :], logits, float("-inf"))
        row_max = tl.max(logits, 1)
        probs = tl.exp2(logits - row_max[:, None])
        row_sum = tl.sum(probs, 1)
        drop = _dropout(KEEP, group, length, rows, rows - first_column, columns, keep_scale, HAS_DROPOUT)
        acc = tl.dot((probs * drop).to(v.dtype), v)

        if WINDOW > ROWS:  # (a constexpr test: windows of one block compile without these loops)
            for earlier in range(0, part):  # the chunk's earlier slices: complete, before every row
                shift = (earlier - part) * ROWS
                col_ok = (rows + shift < length)[:, None]  # (a slice past the end reads nothing)
                k = tl.load(K + base + tile + shift * in_n, mask=col_ok, other=0.0)
                v = tl.load(V + base + tile + shift * in_n, mask=col_ok, other=0.0)
                drop = _dropout(KEEP, group, length, rows, rows + shift - first_column, columns, keep_scale,
                                HAS_DROPOUT)
                acc, row_max, row_sum = _online_softmax_step(acc, row_max, row_sum,
                                                             tl.dot(q, tl.trans(k)) * qk_scale, v, drop)

        if chunk > 0:  # previous chunk: complete, no mask
            # A runtime loop, not an unrolled one: fewer registers live across the blocks (at
            # W = 256, 108 bytes of spills per thread against 520 and 1-3% faster on an H200;
            # at W <= 128, one block, the same machine code as unrolled).
            for block in range(0, WINDOW // ROWS):
                shift = (block - part) * ROWS - WINDOW
                drop = _dropout(KEEP, group, length, rows, rows + shift - first_column, columns, keep_scale,
                                HAS_DROPOUT)
                acc, row_max, row_sum = _complete_block_step(K, V, base, tile, in_n, q, shift, acc, row_max, row_sum,
                                                             qk_scale, drop)

        if chunk > 1:  # summaries of chunks 0 .. t - 2
            # (Names of their own: Triton wants a variable's shape the same on both sides of an if.)
            summary_v, _, summary_logits, _ = _summary_block(SUM_K, SUM_V, COUNTS, q, group, chunk, num_chunks,
                                                                num_clusters, qk_scale, BLOCK_C, DIM)
            summary_drop = _dropout(KEEP, group, length, rows, 2 * WINDOW + tl.arange(0, BLOCK_C), columns,
                                    keep_scale, HAS_DROPOUT)
            acc, row_max, row_sum = _online_softmax_step(acc, row_max, row_sum, summary_logits, summary_v,
                                                         summary_drop)

        out = acc / row_sum[:, None]
        out_base, out_tile = _tile(group, rows, heads, out_b, out_h, out_n, DIM)
        tl.store(OUT + out_base + out_tile, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + group * num_chunks * WINDOW + rows, (row_max + tl.log2(row_sum)) * 0.6931471805599453)

    @triton.jit
    def _block_grads(q, grad_out, lse2, delta, k, v, qk_scale, keep, drop):
        """The dropped probabilities (the weights of the values) and the logit gradients of
        one (M, L) block; ``keep`` masks entries, ``drop``: the dropout multipliers (or 1.0).
        With O = (P * drop) V, dP = (dO V^T) * drop and rowsum(P * dP) = rowsum(dO * O) = delta."""
        probs = tl.where(keep, tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None]), 0.0)
        grad_logits = probs * (tl.dot(grad_out, tl.trans(v)) * drop - delta[:, None])
        return probs * drop, grad_logits

    @triton.jit
    def _window_attention_bwd_query(Q, K, V, SUM_K, SUM_V, COUNTS, OUT, GRAD_OUT, LSE, KEEP,
                                    DELTA, GRAD_Q, GRAD_SUM_K, GRAD_SUM_V,
                                    length, num_chunks, num_clusters, qk_scale, scale, keep_scale,
                                    heads, in_b, in_h, in_n, out_b, out_h, out_n,
                                    WINDOW: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                                    DIM: tl.constexpr, HAS_DROPOUT: tl.constexpr):
        """Program (p, group g), p = t W / ROWS + s: dq of ROWS queries of chunk t (its s-th
        slice; keys in the forward's blocks), delta = rowsum(dO * O), and the slice's part of
        the gradients of the chunk's summary keys / values, (G, T - 2, W / ROWS, C, DIM) in q's
        dtype like dq: no other program writes them (deterministic); the gradient scan sums
        the slices. Q, K, V in the input layout (in_*), OUT, GRAD_OUT and GRAD_Q in the output
        layout (out_*), KEEP and keep_scale: as in the forward."""
        chunk, part, group, rows, base, tile = _program_tiles(heads, in_b, in_h, in_n, WINDOW, ROWS, DIM)
        out_base, out_tile = _tile(group, rows, heads, out_b, out_h, out_n, DIM)
        first_column = (chunk - 1) * WINDOW
        columns = 2 * WINDOW + num_clusters
        row_ok = rows < length
        q = tl.load(Q + base + tile, mask=row_ok[:, None], other=0.0)
        grad_out = tl.load(GRAD_OUT + out_base + out_tile, mask=row_ok[:, None], other=0.0)
        out = tl.load(OUT + out_base + out_tile, mask=row_ok[:, None], other=0.0)
        delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)
        row_index = group * num_chunks * WINDOW + rows
        tl.store(DELTA + row_index, delta)
        lse2 = tl.load(LSE + row_index) * 1.4426950408889634

        k = tl.load(K + base + tile, mask=row_ok[:, None], other=0.0)
        v = tl.load(V + base + tile, mask=row_ok[:, None], other=0.0)
        keep = (rows[:, None] >= rows[None, :]) & row_ok[:, None]
        drop = _dropout(KEEP, group, length, rows, rows - first_column, columns, keep_scale, HAS_DROPOUT)
        _, grad_logits = _block_grads(q, grad_out, lse2, delta, k, v, qk_scale, keep, drop)
        grad_q = tl.dot(grad_logits.to(k.dtype), k)

        if WINDOW > ROWS:
            for earlier in range(0, part):
                shift = (earlier - part) * ROWS
                col_ok = (rows + shift < length)[:, None]
                k = tl.load(K + base + tile + shift * in_n, mask=col_ok, other=0.0)
                v = tl.load(V + base + tile + shift * in_n, mask=col_ok, other=0.0)
                drop = _dropout(KEEP, group, length, rows, rows + shift - first_column, columns, keep_scale,
                                HAS_DROPOUT)
                _, grad_logits = _block_grads(q, grad_out, lse2, delta, k, v, qk_scale, row_ok[:, None], drop)
                grad_q += tl.dot(grad_logits.to(k.dtype), k)

        if chunk > 0:
            for block in tl.static_range(WINDOW // ROWS):
                shift = (block - part) * ROWS - WINDOW
                k = tl.load(K + base + tile + shift * in_n)
                v = tl.load(V + base + tile + shift * in_n)
                drop = _dropout(KEEP, group, length, rows, rows + shift - first_column, columns, keep_scale,
                                HAS_DROPOUT)
                _, grad_logits = _block_grads(q, grad_out, lse2, delta, k, v, qk_scale, row_ok[:, None], drop)
                grad_q += tl.dot(grad_logits.to(k.dtype), k)

        if chunk > 1:
            summary_v, summary_k, summary_logits, slot_ok = _summary_block(
                SUM_K, SUM_V, COUNTS, q, group, chunk, num_chunks, num_clusters, qk_scale, BLOCK_C, DIM)
            summary_probs = tl.where(row_ok[:, None], tl.exp2(summary_logits - lse2[:, None]), 0.0)
            summary_drop = _dropout(KEEP, group, length, rows, 2 * WINDOW + tl.arange(0, BLOCK_C), columns,
                                    keep_scale, HAS_DROPOUT)
            summary_grad_logits = summary_probs * (tl.dot(grad_out, tl.trans(summary_v)) * summary_drop
                                                   - delta[:, None])
            grad_q += tl.dot(summary_grad_logits.to(summary_k.dtype), summary_k)
            grad_summary_k = tl.dot(tl.trans(summary_grad_logits.to(q.dtype)), q) * scale
            grad_summary_v = tl.dot(tl.trans((summary_probs * summary_drop).to(grad_out.dtype)), grad_out)
            first_slot = ((group * (num_chunks - 2) + chunk - 2) * (WINDOW // ROWS) + part) * num_clusters
            grad_tile = (first_slot + tl.arange(0, BLOCK_C)[:, None]) * DIM + tl.arange(0, DIM)[None, :]
            tl.store(GRAD_SUM_K + grad_tile, grad_summary_k.to(GRAD_SUM_K.dtype.element_ty), mask=slot_ok[:, None])
            tl.store(GRAD_SUM_V + grad_tile, grad_summary_v.to(GRAD_SUM_V.dtype.element_ty), mask=slot_ok[:, None])

        tl.store(GRAD_Q + out_base + out_tile, (grad_q * scale).to(GRAD_Q.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _grads_from_later_queries(Q, GRAD_OUT, LSE, DELTA, k, v, grad_k, grad_v, base, tile, in_n, out_base,
                                  out_tile, out_n, row_index, keys, shift, length, qk_scale, drop):
        """``grad_k``, ``grad_v`` of the keys ``k``, ``v`` (ROWS, DIM) plus what the ROWS queries
        ``shift`` positions after them give: queries that see every one of these keys (no
        causal mask; positions past the end read nothing). ``base + tile``, ``out_base +
        out_tile``, ``row_index``: the keys' element offsets in the input and the output
        layouts (rows ``in_n`` / ``out_n`` apart) and their LSE / DELTA indices; ``drop``:
        the (queries, keys) dropout multipliers (or 1.0)."""
        row_ok = (keys + shift < length)[:, None]
        q = tl.load(Q + base + tile + shift * in_n, mask=row_ok, other=0.0)
        grad_out = tl.load(GRAD_OUT + out_base + out_tile + shift * out_n, mask=row_ok, other=0.0)
        lse2 = tl.load(LSE + row_index + shift) * 1.4426950408889634
        delta = tl.load(DELTA + row_index + shift)
        probs, grad_logits = _block_grads(q, grad_out, lse2, delta, k, v, qk_scale, row_ok, drop)
        grad_v += tl.dot(tl.trans(probs.to(grad_out.dtype)), grad_out)
        grad_k += tl.dot(tl.trans(grad_logits.to(q.dtype)), q)
        return grad_k, grad_v

    @triton.jit
    def _window_attention_bwd_key(Q, K, V, GRAD_OUT, LSE, DELTA, CLUSTERS, GRAD_SUMS_K, GRAD_SUMS_V, KEEP,
                                  GRAD_K, GRAD_V, length, num_chunks, num_clusters, qk_scale, scale, keep_scale,
                                  heads, in_b, in_h, in_n, out_b, out_h, out_n,
                                  WINDOW: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
                                  HAS_SUMMARIES: tl.constexpr, HAS_DROPOUT: tl.constexpr):
        """Program (p, group g), p = j W / ROWS + s: dk, dv of ROWS keys of chunk j (its s-th
        slice) from the queries that see them exactly, in blocks of ROWS: the slice's own
        positions (causally), the chunk's later slices and the next chunk's slices; plus, with
        summaries, the gradient of each key's (chunk, cluster) sum: GRAD_SUMS_K / _V (G, T, C,
        DIM), CLUSTERS (G, N) int64. Q, K, V in the input layout (in_*), GRAD_OUT, GRAD_K and
        GRAD_V in the output layout (out_*); KEEP, keep_scale: as in the forward (a query of
        chunk t sees key position p at column p - (t - 1) W)."""
        chunk, part, group, keys, base, tile = _program_tiles(heads, in_b, in_h, in_n, WINDOW, ROWS, DIM)
        out_base, out_tile = _tile(group, keys, heads, out_b, out_h, out_n, DIM)
        feats = tl.arange(0, DIM)
        key_ok = keys < length
        k = tl.load(K + base + tile, mask=key_ok[:, None], other=0.0)
        v = tl.load(V + base + tile, mask=key_ok[:, None], other=0.0)
        row_index = group * num_chunks * WINDOW + keys  # LSE and DELTA of the queries at these positions

        # Queries at the same positions, causally: (ROWS, ROWS) blocks, rows are queries.
        q = tl.load(Q + base + tile, mask=key_ok[:, None], other=0.0)
        grad_out = tl.load(GRAD_OUT + out_base + out_tile, mask=key_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + row_index) * 1.4426950408889634
        delta = tl.load(DELTA + row_index)
        keep = (keys[:, None] >= keys[None, :]) & key_ok[:, None]
        columns = 2 * WINDOW + num_clusters
        same_chunk_columns = keys - (chunk - 1) * WINDOW  # these keys' columns for queries of their chunk
        drop = _dropout(KEEP, group, length, keys, same_chunk_columns, columns, keep_scale, HAS_DROPOUT)
        probs, grad_logits = _block_grads(q, grad_out, lse2, delta, k, v, qk_scale, keep, drop)
        grad_v = tl.dot(tl.trans(probs.to(grad_out.dtype)), grad_out)
        grad_k = tl.dot(tl.trans(grad_logits.to(q.dtype)), q)

        # The chunk's later slices (while they hold queries), then the next chunk's: every
        # one of their queries sees all of these keys.
        if WINDOW > ROWS:
            for later in range(part + 1, WINDOW // ROWS):
                shift = (later - part) * ROWS
                drop = _dropout(KEEP, group, length, keys + shift, same_chunk_columns, columns, keep_scale,
                                HAS_DROPOUT)
                grad_k, grad_v = _grads_from_later_queries(Q, GRAD_OUT, LSE, DELTA, k, v, grad_k, grad_v, base, tile,
                                                           in_n, out_base, out_tile, out_n, row_index, keys,
                                                           shift, length, qk_scale, drop)
        if chunk + 1 < num_chunks:
            for block in tl.static_range(WINDOW // ROWS):
                shift = (block - part) * ROWS + WINDOW
                drop = _dropout(KEEP, group, length, keys + shift, same_chunk_columns - WINDOW, columns, keep_scale,
                                HAS_DROPOUT)
                grad_k, grad_v = _grads_from_later_queries(Q, GRAD_OUT, LSE, DELTA, k, v, grad_k, grad_v, base, tile,
                                                           in_n, out_base, out_tile, out_n, row_index, keys,
                                                           shift, length, qk_scale, drop)

        grad_k = grad_k * scale
        if HAS_SUMMARIES:  # each key receives the gradient of its (chunk, cluster) sum
            cluster = tl.load(CLUSTERS + group * length + keys, mask=key_ok, other=-1)
            member = ((cluster >= 0) & (cluster < num_clusters))[:, None]
            sum_tile = ((group * num_chunks + chunk) * num_clusters + cluster[:, None]) * DIM + feats[None, :]
            grad_k += tl.load(GRAD_SUMS_K + sum_tile, mask=member, other=0.0)
            grad_v += tl.load(GRAD_SUMS_V + sum_tile, mask=member, other=0.0)
        tl.store(GRAD_K + out_base + out_tile, grad_k.to(GRAD_K.dtype.element_ty), mask=key_ok[:, None])
        tl.store(GRAD_V + out_base + out_tile, grad_v.to(GRAD_V.dtype.element_ty), mask=key_ok[:, None])


# ================================================================ the op


# Launch shapes: warps per program; the rows of a block: the slice of a chunk each program
# of the attention kernels takes, and the blocks in which keys stream (windows above it
# take several; the sums kernel adds the chunk's blocks); for the gradient scan the
# features per program. One stage: deeper pipelines did not change the times. Chosen on an
# H100 at N = 64k, W = 128, D = 64 (benchmarks/NOTES.md); windows below 128 use 4 warps;
# a "_d128" entry serves 128-wide heads instead. At D = 128 the forward is
# 3-4% faster with 8 warps (it spills 1.8 KB with 4, nothing with 8); the gradient kernels
# were 10-50% slower with 64 rows, though they spill less (benchmarks/NOTES.md).
LAUNCH = {
    "sums": {"num_warps": 4, "rows": MAX_BLOCK},
    "grads_scan": {"num_warps": 8, "features": 16},
    "fwd": {"num_warps": 4, "rows": MAX_BLOCK},
    "fwd_d128": {"num_warps": 8, "rows": MAX_BLOCK},
    "bwd_query": {"num_warps": 8, "rows": MAX_BLOCK},
    "bwd_key": {"num_warps": 8, "rows": MAX_BLOCK},
}


def _launch(kernel: str, window: int, dim: int) -> dict:
    """Keyword arguments of ``kernel``'s launch (``ROWS`` / ``BLOCK_D`` where it takes one)."""
    options = dict(LAUNCH.get(f"{kernel}_d{dim}", LAUNCH[kernel]))
    if window < 128:
        options["num_warps"] = 4
    if "rows" in options:
        options["ROWS"] = min(options.pop("rows"), window)
    if "features" in options:
        options["BLOCK_D"] = min(options.pop("features"), dim)
    return dict({"num_stages": 1}, **options)


def _cluster_block(num_clusters: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(num_clusters))


def _summaries(key: Tensor, value: Tensor, clusters: Tensor, window: int, num_clusters: int):
    """The older-past summaries read by chunks ``2 .. T - 1`` (``T > 2``): member counts
    ``(B, H, T, C)`` fp32 and the mean keys and values ``(G, T - 2, C, D)`` in the input dtype."""
    batch, heads, length, dim = key.shape
    chunks = -(-length // window)
    # fp32 sums: in the input dtype they took as long overall (H100, 64k: the means kernel
    # read its 2-byte strided loads 0.15 ms slower than the sums kernel saved) and are rounded.
    sums_k = torch.empty(batch, heads, chunks, num_clusters, dim, dtype=torch.float32, device=key.device)
    sums_v = torch.empty_like(sums_k)
    # Counts per (cluster, chunk): the prefix over chunks is then a scan along the last,
    # contiguous dim (a scan along an outer dim took 0.2 ms at 64k).
    chunk_counts = torch.empty(batch, heads, num_clusters, chunks, dtype=torch.float32, device=key.device)
    options = _launch("sums", window, dim)
    _chunk_cluster_sums[(chunks, batch * heads)](
        key, value, clusters, sums_k, sums_v, chunk_counts, length, chunks, num_clusters, heads, *key.stride()[:3],
        WINDOW=window, BLOCK=options.pop("ROWS"), BLOCK_C=_cluster_block(num_clusters), DIM=dim, **options,
    )
    older = F.pad(chunk_counts.cumsum(-1), (2, 0))[..., :chunks]  # chunks 0 .. t - 2
    counts = older.transpose(2, 3).contiguous()
    return (counts, summary_means_from_sums(sums_k, counts, 2, dim, key.dtype),
            summary_means_from_sums(sums_v, counts, 2, dim, value.dtype))


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _input_layout(query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``query, key, value`` as the kernels read them, which is with one set of strides for
    the three: as they are where they share theirs and the feature dim is contiguous (a
    model's ``(B, H, N, D)`` views of its ``(N, B, H D)`` projections), else contiguous copies."""
    if query.stride() == key.stride() == value.stride() and query.stride(-1) == 1:
        return query, key, value
    return query.contiguous(), key.contiguous(), value.contiguous()


def _layout_args(inputs: Tensor, outputs: Tensor) -> Tuple[int, ...]:
    """The kernels' layout arguments: heads, then the batch, head and position strides of
    the input layout (``inputs``'s) and of the output layout (``outputs``'s)."""
    return (inputs.shape[1], *inputs.stride()[:3], *outputs.stride()[:3])


def forward(query: Tensor, key: Tensor, value: Tensor, clusters: Tensor, window: int, num_clusters: int,
            scale: float, keep: Optional[Tensor] = None,
            dropout_p: float = 0.0) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward kernels -> ``out (B, H, N, D)``, ``lse (G, T W)`` fp32, and, for the
    backward, the summary keys and values ``(G, T - 2, C, D)`` and their counts
    ``(B, H, T, C)`` (empty when ``T <= 2``: no chunk reads a summary).

    ``keep``: the reference's dropout keep-mask ``(B, H, N, 2 W + C)`` bool over each query's
    softmax columns (see :func:`fairseq_clustered.ops.causal.causal_clustered_attention_fwd_ref`)
    for ``dropout_p``, or None.

    ``out`` is laid out like the queries (dense, its batch, head and position dims in the
    queries' order: a model's ``(N, B, H D)`` output reshapes to it without a copy), and the
    kernels read q, k, v through their strides where the three share them
    (:func:`_input_layout`)."""
    batch, heads, length, dim = query.shape
    query, key, value = _input_layout(query, key, value)
    clusters = clusters.contiguous()
    chunks = -(-length // window)
    out = attention_output_like(query, dim)
    lse = torch.empty(batch * heads, chunks * window, dtype=torch.float32, device=query.device)
    if chunks > 2:
        counts, summary_keys, summary_values = _summaries(key, value, clusters, window, num_clusters)
    else:
        counts, summary_keys, summary_values = _empty(lse), _empty(query), _empty(query)
    options = _launch("fwd", window, dim)
    _window_attention_fwd[(chunks * (window // options["ROWS"]), batch * heads)](
        query, key, value, summary_keys, summary_values, counts, out, lse, _keep_bytes(keep, lse),
        length, chunks, num_clusters, scale * LOG2E, _keep_scale(dropout_p), *_layout_args(query, out),
        WINDOW=window, BLOCK_C=_cluster_block(num_clusters), DIM=dim, HAS_DROPOUT=keep is not None, **options,
    )
    return out, lse, summary_keys, summary_values, counts


def _keep_bytes(keep: Optional[Tensor], like: Tensor) -> Tensor:
    """The keep-mask as the kernels read it: its bytes (a view, no conversion); an empty
    tensor without dropout."""
    return like.new_empty(0, dtype=torch.uint8) if keep is None else mask_bytes(keep)


def _keep_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0


@torch.library.custom_op(f"{LIBRARY}::causal_triton_fwd", mutates_args=())
def causal_triton_fwd(query: Tensor, key: Tensor, value: Tensor, clusters: Tensor, window: int, num_clusters: int,
                      scale: float, keep: Optional[Tensor],
                      dropout_p: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`forward` as a custom op (the path under ``torch.compile`` and functorch)."""
    return forward(query, key, value, clusters, window, num_clusters, scale, keep, dropout_p)


@causal_triton_fwd.register_fake
def _(query, key, value, clusters, window, num_clusters, scale, keep, dropout_p):
    batch, heads, length, dim = query.shape
    chunks = -(-length // window)
    lse = query.new_empty(batch * heads, chunks * window, dtype=torch.float32)
    if chunks > 2:
        block = query.new_empty(batch * heads, chunks - 2, num_clusters, dim)
        counts = query.new_empty(batch, heads, chunks, num_clusters, dtype=torch.float32)
        return attention_output_like(query, dim), lse, block, torch.empty_like(block), counts
    return attention_output_like(query, dim), lse, query.new_empty(0), query.new_empty(0), lse.new_empty(0)


def backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, clusters: Tensor, out: Tensor,
             lse: Tensor, summary_keys: Tensor, summary_values: Tensor, counts: Tensor, window: int,
             num_clusters: int, scale: float, keep: Optional[Tensor] = None,
             dropout_p: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward kernels: ``grad_out`` and what :func:`forward` saved (with its ``keep``
    and ``dropout_p``) -> ``dq, dk, dv``, laid out like ``out`` (a model's ``(B, H, N, D)``
    views of its projections' gradients take them without a copy); ``grad_out`` is read as
    it comes where it has ``out``'s layout."""
    batch, heads, length, dim = query.shape
    query, key, value = _input_layout(query, key, value)
    grad_out, clusters = laid_out_as(grad_out, out), clusters.contiguous()
    chunks = -(-length // window)
    has_summaries = chunks > 2
    delta = torch.empty_like(lse)
    grad_q, grad_k, grad_v = torch.empty_like(out), torch.empty_like(out), torch.empty_like(out)
    layout = _layout_args(query, out)
    keep_bytes, keep_scale = _keep_bytes(keep, lse), _keep_scale(dropout_p)
    options = _launch("bwd_query", window, dim)
    slices = window // options["ROWS"]
    if has_summaries:  # each slice of a chunk writes its part of the chunk's summary gradients
        groups, readers = summary_keys.shape[:2]
        grad_summary_keys = summary_keys.new_empty(groups, readers, slices, num_clusters, dim)
        grad_summary_values = torch.empty_like(grad_summary_keys)
    else:
        grad_summary_keys, grad_summary_values = _empty(query), _empty(query)
    _window_attention_bwd_query[(chunks * slices, batch * heads)](
        query, key, value, summary_keys, summary_values, counts, out, grad_out, lse, keep_bytes,
        delta, grad_q, grad_summary_keys, grad_summary_values,
        length, chunks, num_clusters, scale * LOG2E, scale, keep_scale, *layout,
        WINDOW=window, BLOCK_C=_cluster_block(num_clusters), DIM=dim, HAS_DROPOUT=keep is not None, **options,
    )
    if has_summaries:
        grad_sums_k, grad_sums_v = _chunk_sum_grads(grad_summary_keys, grad_summary_values, counts, window)
    else:
        grad_sums_k = grad_sums_v = _empty(lse)
    options = _launch("bwd_key", window, dim)
    _window_attention_bwd_key[(chunks * (window // options["ROWS"]), batch * heads)](
        query, key, value, grad_out, lse, delta, clusters, grad_sums_k, grad_sums_v, keep_bytes,
        grad_k, grad_v, length, chunks, num_clusters, scale * LOG2E, scale, keep_scale, *layout,
        WINDOW=window, DIM=dim, HAS_SUMMARIES=has_summaries, HAS_DROPOUT=keep is not None, **options,
    )
    return grad_q, grad_k, grad_v


@torch.library.custom_op(f"{LIBRARY}::causal_triton_bwd", mutates_args=())
def causal_triton_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, clusters: Tensor, out: Tensor,
                      lse: Tensor, summary_keys: Tensor, summary_values: Tensor, counts: Tensor, window: int,
                      num_clusters: int, scale: float, keep: Optional[Tensor],
                      dropout_p: float) -> Tuple[Tensor, Tensor, Tensor]:
    return backward(grad_out, query, key, value, clusters, out, lse, summary_keys, summary_values, counts, window,
                    num_clusters, scale, keep, dropout_p)


def _chunk_sum_grads(grad_keys: Tensor, grad_values: Tensor, counts: Tensor, window: int) -> Tuple[Tensor, Tensor]:
    """Adjoint of the summary means: their gradients ``(G, T - 2, S, C, D)``, in parts from
    the S query slices of each chunk -> the gradients of every per-(chunk, cluster) key and
    value sum, ``(G, T, C, D)`` each."""
    groups, readers, slices, num_clusters, dim = grad_keys.shape
    # bf16 halves the traffic of these sums; fp16 keeps fp32, since a suffix sum over
    # hundreds of chunks of loss-scaled gradients can leave fp16's range.
    dtype = torch.bfloat16 if grad_keys.dtype == torch.bfloat16 else torch.float32
    grad_sums_k = grad_keys.new_empty(groups, readers + 2, num_clusters, dim, dtype=dtype)
    grad_sums_v = torch.empty_like(grad_sums_k)
    options = _launch("grads_scan", window, dim)
    _summary_grads_scan[(dim // options["BLOCK_D"], groups)](
        grad_keys, grad_values, counts, grad_sums_k, grad_sums_v, readers + 2, num_clusters, SLICES=slices,
        BLOCK_C=_cluster_block(num_clusters), DIM=dim, **options,
    )
    return grad_sums_k, grad_sums_v


@causal_triton_bwd.register_fake
def _(grad_out, query, key, value, clusters, out, *args):
    return torch.empty_like(out), torch.empty_like(out), torch.empty_like(out)


def _setup(ctx, inputs, output):
    query, key, value, clusters, window, num_clusters, scale, keep, dropout_p = inputs
    out, lse, summary_keys, summary_values, counts = output
    ctx.mark_non_differentiable(lse, summary_keys, summary_values, counts)
    ctx.set_materialize_grads(False)  # no zero gradients for the saved tensors (0.13 ms at 64k)
    ctx.save_for_backward(query, key, value, clusters, out, lse, summary_keys, summary_values, counts, keep)
    ctx.hyper = (window, num_clusters, scale)
    ctx.dropout_p = dropout_p


def _backward(ctx, grad_out, *unused):
    if grad_out is None:  # only the non-differentiable outputs were used
        return (None,) * 9
    *saved, keep = ctx.saved_tensors
    grads = causal_triton_bwd(grad_out, *saved, *ctx.hyper, keep, ctx.dropout_p)
    return (*grads, None, None, None, None, None, None)


causal_triton_fwd.register_autograd(_backward, setup_context=_setup)


def causal_clustered_attention_triton(query: Tensor, key: Tensor, value: Tensor, clusters: Tensor, window: int,
                                      num_clusters: int, scale: float, keep: Optional[Tensor] = None,
                                      dropout_p: float = 0.0) -> Tensor:
    """Causal clustered attention through the one-kernel Triton path.

    Args:
        query, key, value: ``(B, H, N, D)`` fp16 / bf16 on CUDA (CPU tensors under Triton's
            interpreter), ``D`` a power of two in 16..128, ``window`` one in 16..256.
        clusters: ``(B, H, N)`` int64 leak-free key cluster ids (-1: no cluster).
        window, num_clusters, scale: as :func:`fairseq_clustered.ops.causal_clustered_attention`.
        keep, dropout_p: attention dropout, the reference's keep-mask ``(B, H, N, 2 W + C)``
            bool (True = kept) drawn for ``dropout_p``; None and 0 for none.

    Returns:
        ``(B, H, N, D)`` in the query dtype, differentiable w.r.t. query, key and value.
    """
    return causal_triton_fwd(query, key, value, clusters, window, num_clusters, scale, keep, float(dropout_p))[0]
