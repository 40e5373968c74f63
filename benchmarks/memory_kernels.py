"""The clustered step's memory-bound kernels, each alone, against a copy of the same bytes (CUDA).

Besides Lloyd and the centroid attention, a clustered forward + backward runs kernels whose
work is one pass over a tensor of the queries' size: hashing the queries, their sort by cluster,
the per-cluster sums of the queries (forward) and of the output's gradient (backward), and the
broadcasts of the clusters' rows to their members (the output, the query gradient). At 32 rows
of 8k they took a third of the step's GPU time in the twenty-eighth session's profile. This
script times each alone (CUDA events around a CUDA graph of 10 calls, median of ``--repeats``) on the
assignments of Lloyd's k-means of random queries (``bench_attention.py``'s inputs), and beside
them torch's copy of a tensor of the queries' size in the same run: the bandwidth a pass over
those bytes can reach. Printed: microseconds, GB/s of the bytes each kernel must move, and that
as a fraction of the copy's::

    python benchmarks/memory_kernels.py --lengths 2048,8192,16384
    python benchmarks/memory_kernels.py --lengths 8192 --hash-launch "128,1,4;128,4,4;256,2,8"

``--hash-launch``: settings of the Triton hashing kernel to time (rows per tile, tiles per
program, warps; ``hash_triton.hash_codes_triton``'s ``launch``), each checked to give the
default settings' codes. The hashing's planes are bf16 values, as ``draw_hash_planes`` draws them
(one tensor-core product per plane); the row "float32 planes" hashes with full float32 planes
(three products), as planes a caller passes may be.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_launches(text: str) -> List[Tuple[int, int, int]]:
    """``"128,1,4;256,2,8"`` -> [(128, 1, 4), (256, 2, 8)]; raises SystemExit naming the option."""
    launches = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            rows, tiles, warps = (int(v) for v in part.split(","))
        except ValueError:
            raise SystemExit(f"--hash-launch: each setting is ROWS,TILES,WARPS (integers), got {part!r}") from None
        if rows not in (16, 32, 64, 128, 256) or tiles < 1 or warps not in (1, 2, 4, 8):
            raise SystemExit(f"--hash-launch: ROWS must be a power of two in 16..256, TILES >= 1 and WARPS "
                             f"1, 2, 4 or 8, got {part!r}")
        launches.append((rows, tiles, warps))
    return launches


def median_us(fn: Callable[[], object], repeats: int) -> float:
    """Median over ``repeats`` replays of a CUDA graph of 10 calls, microseconds per call: the GPU's
    time alone (launched one by one, the Triton kernel's ~45 us of host time per launch was timed
    instead: run 1 of the thirtieth session in benchmarks/NOTES.md)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 100.0)  # ms for 10 calls -> us per call
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,16384")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--hash-launch", default="", help="Triton hashing settings to time: ROWS,TILES,WARPS;...")
    args = parser.parse_args()
    launches = parse_launches(args.hash_launch)
    if not torch.cuda.is_available():
        raise SystemExit("memory_kernels.py needs a CUDA GPU (it times the extension's kernels)")
    from fairseq_clustered.ops import cuda_backend, draw_hash_planes, hash_triton

    ops = cuda_backend.cuda_ops()
    if ops is None:
        raise SystemExit("memory_kernels.py needs the compiled extension: " + cuda_backend.status()["hash_codes"])
    ext = ops.ext
    dtype = getattr(torch, args.dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B={args.batch} H={args.heads} "
          f"D={args.dim} {args.dtype}, C={args.clusters}; us (GB/s, fraction of the copy's)")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for length in (int(n) for n in args.lengths.split(",")):
        shape = (args.batch, args.heads, length, args.dim)
        q = torch.randn(shape, generator=gen).to("cuda", dtype)
        planes = draw_hash_planes(63, args.dim, gen, device="cuda")  # the modules' (bf16 values): one product
        full_planes = torch.randn(63, args.dim, generator=gen).cuda()  # float32 planes: three products
        offsets = torch.zeros(63, device="cuda")
        assignments = ops.cluster_queries(q, planes, offsets, None, args.clusters, 10, 63)[0]
        order, seg_start = ext.cluster_order(assignments, args.clusters)
        rows_src = torch.randn(args.batch * args.heads, args.clusters, args.dim, device="cuda")
        out = torch.empty_like(q)
        copy = torch.empty_like(q)
        members = (seg_start[:, 1:] - seg_start[:, :-1]).float()
        tensor_bytes = q.numel() * size
        vectors = q.numel() // args.dim
        copy_us = median_us(lambda: copy.copy_(q), args.repeats)
        copy_gbs = 2 * tensor_bytes / copy_us / 1e3
        print(f"N={length}: members per cluster mean {members.mean():.0f}, max {members.max():.0f}; "
              f"copy of the queries' {tensor_bytes / 2**20:.1f} MiB: {copy_us:.1f} us ({copy_gbs:.0f} GB/s)")
        kernels = [
            ("hash", lambda: ops._hash_codes(q, planes, offsets), tensor_bytes + 8 * vectors),
            ("  float32 planes", lambda: ops._hash_codes(q, full_planes, offsets), tensor_bytes + 8 * vectors),
            ("sort by cluster", lambda: ext.cluster_order(assignments, args.clusters), 16 * vectors),
            ("segment sum", lambda: ext.segment_sum(q, order, seg_start, True), tensor_bytes + 8 * vectors),
            ("  a warp per cluster", lambda: ext.segment_sum(q, order, seg_start, True, 1), tensor_bytes + 8 * vectors),
            ("  a block per cluster", lambda: ext.segment_sum(q, order, seg_start, True, 0), tensor_bytes + 8 * vectors),
            ("broadcast", lambda: ext.broadcast_into(rows_src, assignments, out), tensor_bytes + 8 * vectors),
        ]
        reference = hash_triton.hash_codes_triton(q, planes, offsets)
        for launch in launches:
            codes = hash_triton.hash_codes_triton(q, planes, offsets, launch)
            if not torch.equal(codes, reference):
                raise SystemExit(f"--hash-launch {launch}: codes differ from the default settings' "
                                 f"({(codes != reference).sum().item()} vectors)")
            kernels.append((f"hash {launch}", lambda launch=launch: hash_triton.hash_codes_triton(
                q, planes, offsets, launch), tensor_bytes + 8 * vectors))
        for name, fn, nbytes in kernels:
            us = median_us(fn, args.repeats)
            gbs = nbytes / us / 1e3
            print(f"  {name:<24} {us:8.1f} us  {gbs:6.0f} GB/s  {gbs / copy_gbs:5.2f}")


if __name__ == "__main__":
    main()
