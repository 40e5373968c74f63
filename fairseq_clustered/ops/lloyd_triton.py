"""Lloyd's k-means of hash codes in Hamming space on tensor cores (Triton), one launch per iteration.

The CUDA version (``lloyd_kmeans_cuda`` in ``cuda/clustering.cu``) issues two launches per
iteration (assign + accumulate, then the majority update) and computes every distance with
``__popcll`` per (code, centroid) pair. At our sizes (B * H = 24..32 rows, N = 2k..16k
codes, C = 100, 10 iterations, 63 bits) the launches and the popcount throughput dominate.
Here both the distances and the per-cluster bit counts are small 0/1 matrix products on
tensor cores, and the majority update is folded into the next iteration's launch.

Distances. A code is unpacked to its bits, a row of ``64`` fp16 values (exact): bits
``0 .. bits - 1``, zeros up to bit 62, and a constant 1 in column 63, which no code uses
(``bits <= 63``). Centroid ``j`` becomes a column with ``2 c_b`` in rows ``b < 63`` and
``-|c_j|`` (its popcount) in row 63, so one product with fp32 accumulation gives, exactly,
``score = 2 x . c - |c| = |x| - hamming(x, c)``. The nearest centroid (ties: the lowest
index) is the minimum of ``(64 - score) * BLOCK_C + j`` in int32; padded columns
``j >= C`` get ``-1000`` in row 63 and never win.

Counts. ``one_hot(assignment)^T (BLOCK_C, n) @ x (n, 64)`` gives, per cluster, the number
of members with each bit set and, in column 63 (the constant 1), the member count; padded
codes are all-zero rows and count nowhere. Each program accumulates them over its chunk of
codes in fp32 (exact) and adds them to the row's counters with int32 atomics, so the sums
do not depend on the order of the programs.

Launch ``t`` (``t = 0 .. iterations``; the last one is the final assignment):

* centroids: launch 0 reads the initial ones from the codes (position ``floor(j N / C)``:
  with no padding the rank is the position); launch ``t >= 1`` applies the majority rule
  to centroids ``t - 1`` and counters ``t - 1`` (ties and empty clusters keep the old bit,
  bits ``>= bits`` become 0 as in the reference's re-packing). Every program of the row
  computes the same ``(64, BLOCK_C)`` tile (cheap) and the first writes its codes to slot
  ``t`` of a per-iteration centroid buffer, which launch ``t + 1`` reads;
* launches ``t < iterations`` accumulate counters ``t``; the final one writes the
  assignments (and its centroids are the result).

The counters rotate through three buffers: launch ``t`` reads buffer ``(t - 1) % 3``, adds
to ``t % 3`` and zeroes ``(t + 1) % 3``, which launch ``t - 1`` read last and launch
``t + 1`` adds to. No host synchronisation, no data-dependent control flow on the host and
only torch allocations, so a CUDA graph can capture the whole call.

Scope (:func:`triton_lloyd_unavailable` names what fails): no query padding, ``N > C``
(rows with at most ``C`` queries put every query in its own cluster: the CUDA kernels
serve them), ``C <= 128``, int64 codes ``(B, H, N)``, Triton importable, CUDA tensors (or
CPU tensors in Triton's interpreter, ``TRITON_INTERPRET=1``, which is how the CPU tests
run the kernel). The results equal :func:`.reference.lloyd_kmeans_ref` bit for bit.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._triton import MIN_TILE, MISSING, tl, triton

__all__ = ["triton_lloyd_unavailable", "lloyd_kmeans_triton"]

MAX_CLUSTERS = 128  # all centroids of a row in one tile of the products
WORD = 64  # bit columns of a code tile; column 63 holds the constant 1 (bits <= 63)
MAX_GRID_ROWS = 65535  # rows are the grid's second axis
PADDED_CENTROID = -1000.0  # row 63 of a padded centroid column: its score never wins
COUNTER_BUFFERS = 3  # read (t - 1), add (t), zero (t + 1)
# Codes per step, warps, and the number of programs to aim for: every SM of an H100 / H200
# (132) twice; a program walks a chunk of several steps so that it adds its counts to the
# row's counters once, not once per step (far fewer atomics).
LAUNCH = {"block_n": 128, "num_warps": 8, "target_programs": 264, "max_steps": 32}


def triton_lloyd_unavailable(codes: Tensor, query_padding_mask: Optional[Tensor], num_clusters: int) -> Optional[str]:
    """Why :func:`lloyd_kmeans_triton` cannot cluster ``codes (B, H, N)`` with this mask and
    ``num_clusters`` (None if it can)."""
    if MISSING is not None:
        return MISSING
    if query_padding_mask is not None:
        return "a query padding mask is given (the Triton Lloyd kernel takes none)"
    if codes.dim() != 3 or codes.dtype != torch.int64:
        return f"codes must be (B, H, N) int64, got {tuple(codes.shape)} {codes.dtype}"
    if not (codes.is_cuda or (INTERPRETED and codes.device.type == "cpu")):
        return "not a CUDA tensor" + ("" if INTERPRETED else " (CPU tensors need Triton's interpreter)")
    if num_clusters > MAX_CLUSTERS:
        return f"num_clusters {num_clusters} > {MAX_CLUSTERS}"
    length = codes.shape[-1]
    if length <= num_clusters:
        return f"N = {length} <= num_clusters = {num_clusters} (every query is its own cluster)"
    if codes.shape[0] * codes.shape[1] > MAX_GRID_ROWS:
        return f"batch * heads = {codes.shape[0] * codes.shape[1]} > {MAX_GRID_ROWS}"
    return None


if triton is not None:

    @triton.jit
    def _centroid_tile(CODES, CENT_PREV, COUNTS_PREV, row, length, num_clusters, bits,
                       INIT: tl.constexpr, BLOCK_C: tl.constexpr, WORD: tl.constexpr):
        """-> this launch's centroids: bits ``(WORD, BLOCK_C)`` int32 (0/1, zero rows ``>= bits``)
        and codes ``(BLOCK_C,)`` int64 (0 in padded columns).

        INIT: the codes at positions ``floor(j N / C)``, as they are (a code may carry bits
        ``>= bits``; the reference keeps them until the first update). Else the majority
        rule on centroids ``CENT_PREV (C,)`` int64 and counters ``COUNTS_PREV (C, WORD)``
        int32 (ones per bit, the member count in column 63)."""
        slots = tl.arange(0, BLOCK_C)
        used = slots < num_clusters
        b = tl.arange(0, WORD)
        in_code = b < bits
        if INIT:
            # j < 128 and N < 2**31: j * N needs 64 bits
            positions = (slots.to(tl.int64) * length) // num_clusters
            codes = tl.load(CODES + row * length + positions, mask=used, other=0)
            cbits = ((codes[None, :] >> b[:, None].to(tl.int64)) & 1).to(tl.int32)
            cbits = tl.where(in_code[:, None], cbits, 0)
        else:
            old = tl.load(CENT_PREV + row * num_clusters + slots, mask=used, other=0)
            old_bits = ((old[None, :] >> b[:, None].to(tl.int64)) & 1).to(tl.int32)
            counts = tl.load(COUNTS_PREV + row * num_clusters * WORD + slots[None, :] * WORD + b[:, None],
                             mask=used[None, :], other=0)  # (WORD, BLOCK_C)
            members = tl.sum(tl.where(b[:, None] == WORD - 1, counts, 0), axis=0)  # (BLOCK_C,)
            twice_ones = 2 * counts
            cbits = tl.where(twice_ones > members[None, :], 1,
                             tl.where(twice_ones < members[None, :], 0, old_bits))  # ties, empty: old bit
            cbits = tl.where(in_code[:, None], cbits, 0)
            codes = tl.sum(cbits.to(tl.int64) << b[:, None].to(tl.int64), axis=0)
        return cbits, codes

    @triton.jit
    def _lloyd_kernel(CODES, CENT_PREV, COUNTS_PREV, CENT_OUT, COUNTS_ADD, COUNTS_ZERO, ASSIGN,
                      length, num_clusters, bits, chunk,
                      INIT: tl.constexpr, COUNT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                      WORD: tl.constexpr, PADDED: tl.constexpr):
        """Program (p, row): the codes ``p chunk .. (p + 1) chunk`` of one (batch, head) row.

        CODES ``(rows, N)`` int64; CENT_PREV, CENT_OUT ``(rows, C)`` int64; COUNTS_*
        ``(rows, C, WORD)`` int32; ASSIGN ``(rows, N)`` int64. COUNT: add this chunk's
        counts to COUNTS_ADD (and zero COUNTS_ZERO), else write the assignments."""
        pid = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        slots = tl.arange(0, BLOCK_C)
        used = slots < num_clusters
        b = tl.arange(0, WORD)

        cbits, ccodes = _centroid_tile(CODES, CENT_PREV, COUNTS_PREV, row, length, num_clusters, bits,
                                       INIT, BLOCK_C, WORD)
        if pid == 0:
            tl.store(CENT_OUT + row * num_clusters + slots, ccodes, mask=used)
        # Centroid columns: 2 c_b in rows b < 63, -|c| in row 63 (see the module docstring).
        popcount = tl.sum(cbits, axis=0)
        last = b[:, None] == WORD - 1
        bottom = tl.where(used, -popcount.to(tl.float32), PADDED)
        cmat = tl.where(last, bottom[None, :], 2.0 * cbits.to(tl.float32)).to(tl.float16)  # (WORD, BLOCK_C)

        in_code = b < bits
        shifts = b.to(tl.int64)
        counts = tl.zeros((BLOCK_C, WORD), dtype=tl.float32)
        start = pid * chunk
        for offset in range(0, chunk, BLOCK_N):
            n = start + offset + tl.arange(0, BLOCK_N)
            ok = n < length
            code = tl.load(CODES + row * length + n, mask=ok, other=0)
            xbits = (code[:, None] >> shifts[None, :]) & 1
            x = tl.where(in_code[None, :], xbits, 0)
            x = tl.where((b == WORD - 1)[None, :], ok.to(tl.int64)[:, None], x).to(tl.float16)  # (BLOCK_N, WORD)
            score = tl.dot(x, cmat)  # |x| - hamming, exact in fp32
            key = (64.0 - score).to(tl.int32) * BLOCK_C + slots[None, :]
            nearest = tl.min(key, axis=1) % BLOCK_C  # lowest index among the nearest
            if COUNT:
                one_hot = (slots[:, None] == nearest[None, :]).to(tl.float16)  # (BLOCK_C, BLOCK_N)
                counts += tl.dot(one_hot, x)  # padded codes: zero rows of x
            else:
                tl.store(ASSIGN + row * length + n, nearest.to(tl.int64), mask=ok)
        if COUNT:
            tile = row * num_clusters * WORD + slots[:, None] * WORD + b[None, :]
            totals = counts.to(tl.int32)
            # Integer atomics: the totals do not depend on the order of the programs.
            tl.atomic_add(COUNTS_ADD + tile, totals, mask=used[:, None] & (totals != 0), sem="relaxed")
            if pid == 0:
                tl.store(COUNTS_ZERO + tile, tl.zeros((BLOCK_C, WORD), dtype=tl.int32), mask=used[:, None])

    # The interpreter runs CPU tensors; a compiled kernel needs CUDA ones.
    INTERPRETED = type(_lloyd_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover - depends on the install
    INTERPRETED = False


def _chunk(rows: int, length: int, block_n: int) -> int:
    """Codes per program: a multiple of ``block_n`` giving about ``target_programs`` programs."""
    per_program = -(-rows * length // LAUNCH["target_programs"])
    steps = min(max(-(-per_program // block_n), 1), LAUNCH["max_steps"])
    return steps * block_n


def lloyd_kmeans_triton(codes: Tensor, num_clusters: int, iterations: int, bits: int) -> Tuple[Tensor, Tensor]:
    """:func:`.reference.lloyd_kmeans_ref` without a padding mask, bit for bit, in
    ``iterations + 1`` launches.

    Args:
        codes: ``(B, H, N)`` int64 hash codes, ``N > num_clusters``.
        num_clusters: ``C`` in ``1..128``. iterations: ``>= 0``. bits: code width, ``1..63``.

    Returns:
        ``assignments`` ``(B, H, N)`` int64 in ``[0, C)`` and ``centroid codes`` ``(B, H, C)`` int64.
    """
    why = triton_lloyd_unavailable(codes, None, num_clusters)
    if why is not None:
        raise ValueError(f"lloyd_kmeans_triton: {why}")
    if not 1 <= bits <= 63 or iterations < 0 or num_clusters < 1:
        raise ValueError(f"lloyd_kmeans_triton: bits {bits} (1..63), iterations {iterations} (>= 0), "
                         f"num_clusters {num_clusters} (>= 1)")
    batch, heads, length = codes.shape
    rows = batch * heads
    codes = codes.contiguous()
    assignments = torch.empty_like(codes)
    centroids = torch.empty(iterations + 1, batch, heads, num_clusters, dtype=torch.int64, device=codes.device)
    if rows == 0:
        return assignments, centroids[iterations]
    # Launch t < iterations adds to counters[t % 3]; without iterations they are never read.
    counters = torch.zeros(COUNTER_BUFFERS if iterations else 1, rows, num_clusters, WORD,
                           dtype=torch.int32, device=codes.device)
    block_n = LAUNCH["block_n"]
    chunk = _chunk(rows, length, block_n)
    grid = (triton.cdiv(length, chunk), rows)
    block_c = max(triton.next_power_of_2(num_clusters), MIN_TILE)
    for t in range(iterations + 1):
        count = t < iterations
        _lloyd_kernel[grid](
            codes, centroids[max(t - 1, 0)], counters[(t - 1) % COUNTER_BUFFERS if t else 0], centroids[t],
            counters[t % COUNTER_BUFFERS if count else 0], counters[(t + 1) % COUNTER_BUFFERS if count else 0],
            assignments, length, num_clusters, bits, chunk,
            INIT=t == 0, COUNT=count, BLOCK_N=block_n, BLOCK_C=block_c, WORD=WORD, PADDED=PADDED_CENTROID,
            num_warps=LAUNCH["num_warps"],
        )
    return assignments, centroids[iterations]
