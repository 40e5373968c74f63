"""Time the queries' sort by cluster: the extension's counting sort against torch's.

Every clustered-attention step sorts each row's queries by cluster (``order`` and
``seg_start``, from which the segment sums, the centroid attention and the improved
variant's kernels read the clusters' members). ``ops.cuda_kernels._segments`` does it with
torch (a stable radix sort of int32 ids, a search for the clusters' starts, casts);
``_C.cluster_order`` in one launch of a block per row. For rows = B * H of N queries with
ids from a Lloyd run on random bf16 vectors (C = 100, 10 iterations), this prints the
microseconds of each (graph-replayed, so without launch overhead) and checks that both give
the same result. ``ops.cuda_kernels.CLUSTER_ORDER_MAX_LENGTH`` is the longest row the ops
give the extension's kernel::

    python benchmarks/cluster_order_sweep.py
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_clustered.ops import cuda_backend  # noqa: E402
from fairseq_clustered.ops.cuda_kernels import CLUSTER_ORDER_MAX_LENGTH, _member_counts, _segments  # noqa: E402
from lloyd_sweep import graph_microseconds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2x12,4x8", help="comma-separated BxH shapes (rows = B * H)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--clusters", type=int, default=100)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not cuda_backend.load():
        sys.exit("needs a CUDA GPU and the compiled fairseq_clustered._C")
    ext = cuda_backend.extension()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; C={args.clusters}; "
          f"the ops take the kernel up to N = {CLUSTER_ORDER_MAX_LENGTH}")
    print(f"{'rows':>5} {'N':>6} {'torch us':>9} {'kernel us':>10} {'ratio':>6}")
    for shape in args.rows.split(","):
        batch, heads = (int(x) for x in shape.split("x"))
        for length in (int(n) for n in args.lengths.split(",")):
            x = torch.randn(batch, heads, length, 64, device="cuda", dtype=torch.bfloat16)
            codes = ext.hash_codes(x, torch.randn(63, 64, device="cuda"), torch.zeros(63, device="cuda"))
            ids, _ = ext.lloyd_kmeans(codes, None, args.clusters, 10, 63)
            expected, got = _segments(ids, args.clusters)[:2], ext.cluster_order(ids, args.clusters)
            if not all(torch.equal(a, b) for a, b in zip(expected, got)):
                sys.exit(f"the kernel's sort differs from torch's at rows {batch * heads}, N {length}")
            torch_us = graph_microseconds(lambda: _segments(ids, args.clusters))
            kernel_us = graph_microseconds(lambda: _member_counts(ext.cluster_order(ids, args.clusters)[1]))
            print(f"{batch * heads:5d} {length:6d} {torch_us:9.1f} {kernel_us:10.1f} {kernel_us / torch_us:6.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
