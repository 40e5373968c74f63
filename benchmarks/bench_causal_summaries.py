"""The causal path's summaries on the GPU, alone: the chunk-sums kernel, and ``_summaries``
(the sums, the counts' prefix and the prefix means), at windows 128 and 256.

The numbers of benchmarks/NOTES.md (ninth session, runs 4 and 8: 0.94 -> 0.61 ms for the
sums kernel at N = 64k, W = 128) came from this code. B = 4, H = 8, D = 64, bf16, C = 100,
random cluster ids; the median of 30 CUDA-event-timed calls after 3 warm-up calls.
``--sweep`` times the sums kernel with 4 and 8 warps and 1 and 2 stages (run 4's sweep).

    python benchmarks/bench_causal_summaries.py [--sweep]
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH, HEADS, LENGTH, DIM, CLUSTERS = 4, 8, 65536, 64, 100


def median_ms(fn, repeats=30, warmup=3):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[repeats // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="the sums kernel under warps 4 / 8 and stages 1 / 2")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_causal_summaries.py times kernels on the GPU: no CUDA device here")
    from fairseq_clustered.ops import causal_triton

    generator = torch.Generator("cuda").manual_seed(0)
    key = torch.randn(BATCH, HEADS, LENGTH, DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
    value = torch.randn_like(key)
    clusters = torch.randint(0, CLUSTERS, (BATCH, HEADS, LENGTH), device="cuda", generator=generator)
    for window in (128, 256):
        chunks = -(-LENGTH // window)
        sums_k = torch.empty(BATCH, HEADS, chunks, CLUSTERS, DIM, dtype=torch.float32, device="cuda")
        sums_v = torch.empty_like(sums_k)
        counts = torch.empty(BATCH, HEADS, CLUSTERS, chunks, dtype=torch.float32, device="cuda")
        default = causal_triton._launch("sums", window, DIM)
        block = default.pop("ROWS")
        variants = ([{"num_warps": w, "num_stages": st} for w, st in itertools.product((4, 8), (1, 2))]
                    if args.sweep else [default])
        for options in variants:
            def sums_kernel():
                causal_triton._chunk_cluster_sums[(chunks, BATCH * HEADS)](
                    key, value, clusters, sums_k, sums_v, counts, LENGTH, chunks, CLUSTERS, WINDOW=window,
                    BLOCK=block, BLOCK_C=causal_triton._cluster_block(CLUSTERS), DIM=DIM, **options)

            print(f"W={window} {options}: sums kernel {median_ms(sums_kernel):.3f} ms")
        summaries_ms = median_ms(lambda: causal_triton._summaries(key, value, clusters, window, CLUSTERS))
        print(f"W={window}: _summaries {summaries_ms:.3f} ms")


if __name__ == "__main__":
    main()
