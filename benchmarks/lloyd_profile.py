"""One ``lloyd_kmeans`` call per row length between CUDA profiler start and stop, for Nsight Compute.

32 rows (B = 4, H = 8) of N queries hashed from random bf16 vectors, C = 100, 10 iterations, 63
bits, with the launch settings the ops take (``ops.cuda_kernels.lloyd_launch_settings``); three
warm-up calls outside the profiled range. Each kernel of the profiled call (the one-launch kernel,
or init, 10 x assign and update, final) gets its own ncu report section::

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section WarpStateStats --section Occupancy --section LaunchStats \\
        python benchmarks/lloyd_profile.py 2048,8192
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_clustered.ops import cuda_backend  # noqa: E402
from fairseq_clustered.ops.cuda_kernels import _device_lloyd_settings  # noqa: E402


def main():
    if not torch.cuda.is_available() or not cuda_backend.load():
        sys.exit("needs a CUDA GPU and the compiled fairseq_clustered._C")
    lengths = [int(n) for n in (sys.argv[1] if len(sys.argv) > 1 else "2048,8192").split(",")]
    ext = cuda_backend.cuda_ops().ext
    for length in lengths:
        x = torch.randn(4, 8, length, 64, device="cuda", dtype=torch.bfloat16)
        codes = ext.hash_codes(x, torch.randn(63, 64, device="cuda"), torch.zeros(63, device="cuda"))
        settings = _device_lloyd_settings(ext, 0, 32, length, 100)
        for _ in range(3):
            ext.lloyd_kmeans(codes, None, 100, 10, 63, *settings)
        torch.cuda.synchronize()
        print(f"N={length} (queries_per_block, tensor_cores, cluster_blocks)={settings}", flush=True)
        torch.cuda.profiler.start()
        ext.lloyd_kmeans(codes, None, 100, 10, 63, *settings)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
