"""Time Lloyd's k-means kernels against their work split (queries per block), on the GPU.

Every block of the assign kernel adds its shared-memory bit counts into its row's global
counters once per iteration, so the split trades global atomics against parallelism, and
the number of blocks against whole waves of the GPU. For each shape (rows = B * H of N
queries hashed from random bf16 vectors, C = 100, 10 iterations, 63 bits) this prints the
microseconds of one ``lloyd_kmeans`` (graph-replayed, so without launch overhead) for each
setting, 0 being the extension's own choice, and checks that every setting gives the same
assignments and centroids. ``ops.cuda_kernels.lloyd_queries_per_block`` is the policy the
kernels' callers use. ``--tensor-cores`` picks the nearest-centroid kernels: ``auto`` as the
ops do (``ops.cuda_kernels.lloyd_launch_settings``: 1-bit tensor-core products from 2k queries
per row where one wave of blocks takes at most 4096 queries each), ``on`` or ``off``
everywhere; ``both`` prints a row for each (``off`` giving the expected result of both). The
``policy`` column is the ops' split, on the row of the kernels they take. ``--cluster-blocks``
adds a row for the one-launch kernel (a thread block cluster per row, sm_90 and newer) at each of
the given blocks per row, checked against the same result, after the launch-per-step kernels at the
ops' settings for them (those of a GPU without clusters); its ``policy`` column is the ops' choice
of blocks per row (0: the launch-per-step kernels)::

    python benchmarks/lloyd_sweep.py
    python benchmarks/lloyd_sweep.py --tensor-cores both --settings 0,512,2048
    python benchmarks/lloyd_sweep.py --tensor-cores auto --settings 0 --cluster-blocks 1,2,4,8
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_clustered.ops import cuda_backend  # noqa: E402
from fairseq_clustered.ops.cuda_kernels import lloyd_launch_settings, no_clusters  # noqa: E402


def graph_microseconds(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2x12,4x8,24x12,32x8", help="comma-separated BxH shapes (rows = B * H)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--settings", default="0,256,512,1024,2048,4096,8192,16384,65536")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--tensor-cores", choices=("auto", "on", "off", "both"), default="auto")
    parser.add_argument("--cluster-blocks", default="",
                        help="comma-separated blocks per row of the one-launch kernel to time as well (1, 2, 4, 8)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not cuda_backend.load():
        sys.exit("needs a CUDA GPU and the compiled fairseq_clustered._C")
    ext = cuda_backend.cuda_ops().ext
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    settings = [int(s) for s in args.settings.split(",")]
    cluster_blocks = [int(s) for s in args.cluster_blocks.split(",") if s]
    print(f"# {torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}; C={args.clusters}, 10 iterations")
    if cluster_blocks:
        print("# one-launch clusters resident at once, by blocks per row: "
              + ", ".join(f"{k}: {ext.lloyd_cluster_capacity(4096, args.clusters, k)}" for k in range(1, 9)))
    print("rows      N  tensor cores  policy | us by queries per block " + " ".join(f"{s:>7d}" for s in settings))
    for shape in args.rows.split(","):
        batch, heads = (int(x) for x in shape.split("x"))
        for length in (int(n) for n in args.lengths.split(",")):
            x = torch.randn(batch, heads, length, 64, device="cuda", dtype=torch.bfloat16)
            codes = ext.hash_codes(x, torch.randn(63, 64, device="cuda"), torch.zeros(63, device="cuda"))
            expected = ext.lloyd_kmeans(codes, None, args.clusters, 10, 63, tensor_cores=False)
            def capacity(blocks):
                return ext.lloyd_cluster_capacity(length, args.clusters, blocks)

            policy, policy_tensor_cores, policy_blocks = lloyd_launch_settings(batch * heads, length, args.clusters,
                                                                               sms, capacity)
            choices = {"auto": [policy_tensor_cores], "on": [True], "off": [False], "both": [False, True]}
            for tensor_cores in choices[args.tensor_cores]:
                def lloyd(setting):
                    return ext.lloyd_kmeans(codes, None, args.clusters, 10, 63, queries_per_block=setting,
                                            tensor_cores=tensor_cores)

                cells = []
                for setting in settings:
                    if setting > 2 * length:
                        cells.append(f"{'-':>7}")
                        continue
                    got = lloyd(setting)
                    assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"setting {setting} changed the result"
                    cells.append(f"{graph_microseconds(lambda: lloyd(setting)):7.1f}")
                shown = f"{policy:7d}" if tensor_cores == policy_tensor_cores else f"{'-':>7}"
                print(f"{batch * heads:4d} {length:6d} {'on' if tensor_cores else 'off':>13} {shown} | {' ' * 25}"
                      + " ".join(cells), flush=True)
            if cluster_blocks:
                per_step = lloyd_launch_settings(batch * heads, length, args.clusters, sms, no_clusters)
                per_step_us = graph_microseconds(lambda: ext.lloyd_kmeans(codes, None, args.clusters, 10, 63, *per_step))
                cells = [f"per step: {per_step_us:7.1f}"]
                for blocks in cluster_blocks:
                    def one_launch():
                        return ext.lloyd_kmeans(codes, None, args.clusters, 10, 63, cluster_blocks=blocks)

                    got = one_launch()
                    assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"{blocks} blocks changed the result"
                    cells.append(f"{blocks}: {graph_microseconds(one_launch):7.1f}")
                print(f"{batch * heads:4d} {length:6d} {'one launch':>13} {policy_blocks:7d} | us "
                      + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
