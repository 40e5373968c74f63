"""Where the time of Lloyd's one-launch kernel goes, phase by phase (CUDA, sm_90).

``lloyd_cluster_kernel`` (``cuda/clustering.cu``) runs all of Lloyd in one launch, each
iteration in phases separated by barriers. This script builds a copy of the file in which thread
0 of every block reads its SM's clock (``clock64``) after each phase and adds the cycles to that
phase, compiles it with torch's JIT extensions (about a minute), runs it on random codes for each
shape and prints the phases' microseconds per iteration, averaged over the blocks, beside the
launch's time (CUDA events, launches back to back). Thread 0 times the phases that end in a
barrier as the whole block sees them, and its own share of the update (its warp's centroids).
The stamps are inserted at the kernel's own comments (``STAMPS``), so the copy is the kernel as
it is; the script stops with the missing line if one of them changed. ``--split-update`` stamps
the update twice more: after its counter loads (an empty asm that takes their sums, so that the
stamp waits for the loads) and after the new code's reductions::

    python benchmarks/lloyd_phases.py --rows 4x8 --lengths 1024,2048,4096 --cluster-blocks 1,3
    python benchmarks/lloyd_phases.py --rows 4x8 --lengths 2048 --cluster-blocks 3 --split-update
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["set-up", "round set-up", "search and membership", "counting", "cluster barrier 1 (clearing)",
          "update (thread 0)", "cluster barrier 2", "final assignment"]
# With --split-update phase 5 holds the update's stores only, and phases 8 and 9 its loads and code.
SPLIT_PHASES = ["update loads (thread 0)", "update code (thread 0)"]
SLOTS = len(PHASES) + len(SPLIT_PHASES)  # the stamps' cycle counters per block
PER_ITERATION = (*range(1, 7), *range(len(PHASES), SLOTS))  # the phases inside the iteration loop
# The second cluster barrier: phase 5 (the update) closes just before it, phase 6 after it.
BEFORE_BARRIER_2 = "    cluster_barrier();  // every copy of the centroids updated, every block's counters read\n"
# (a line of lloyd_cluster_kernel, what goes after it): STAMP(k) closes phase k.
STAMPS: List[Tuple[str, str]] = [
    ("  const auto [rank, size] = cluster_place();\n", "STAMPS_BEGIN;\n"),
    ("  __syncthreads();  // the fragments and bit rows written, before the search or the final assignment\n",
     "STAMP(0);\n"),
    ("      // The round's nearest centroids, as membership bits.\n", "STAMP(1);\n"),
    ("      __syncthreads();  // the round's membership bits set\n", "STAMP(2);\n"),
    ("      __syncthreads();  // the round counted before its bits are cleared\n", "STAMP(3);\n"),
    ("    cluster_wait();  // every block's counters complete\n", "STAMP(4);\n"),
    (BEFORE_BARRIER_2, "STAMP(6);\n"),
    ("  if (rank == 0) {\n    for (int j = threadIdx.x; j < C; j += blockDim.x) centroids[bh * C + j] = sm.cent[j];\n  }\n",
     "STAMP(7);\nSTAMPS_END;\n"),
]
UPDATE_STAMPS: List[Tuple[str, str]] = [
    ("          ones.z += part[k].y & 0xFFFFu, ones.w += part[k].y >> 16;\n        }\n      }\n",
     'asm volatile("" :: "r"(ones.x), "r"(ones.w));\nSTAMP(8);\n'),
    ("                            __reduce_or_sync(half_warp, q < 8 ? placed : 0u);\n",
     'asm volatile("" :: "l"(code));\nSTAMP(9);\n'),
]
MACROS = f"\n#define FCL_PHASE_SLOTS {SLOTS}" + r'''
__device__ long long fcl_phase_cycles[65536 * FCL_PHASE_SLOTS];
#define STAMPS_BEGIN long long stamp_last = clock64(); long long stamp_cycles[FCL_PHASE_SLOTS] = {}
#define STAMP(k) do { const long long now = clock64(); stamp_cycles[k] += now - stamp_last; stamp_last = now; } while (0)
#define STAMPS_END do { if (threadIdx.x == 0) { long long* out = fcl_phase_cycles + \
  (blockIdx.y * gridDim.x + blockIdx.x) * FCL_PHASE_SLOTS; for (int i = 0; i < FCL_PHASE_SLOTS; ++i) out[i] = stamp_cycles[i]; } } while (0)
'''
BINDINGS = r'''
#include <torch/extension.h>
at::Tensor phase_cycles(int64_t blocks) {
  at::Tensor out = at::empty({blocks, FCL_PHASE_SLOTS}, at::TensorOptions().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemcpyFromSymbol(out.data_ptr<int64_t>(), fcl_phase_cycles, blocks * FCL_PHASE_SLOTS * sizeof(long long)));
  return out;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lloyd_kmeans", &fcl::lloyd_kmeans_cuda);
  m.def("hash_codes", &fcl::hash_codes_cuda);
  m.def("phase_cycles", &phase_cycles);
}
'''


def stamped_source(source: str, split_update: bool = False) -> str:
    """``cuda/clustering.cu`` with the phase stamps (and the update's two more with
    ``split_update``), their macros and bindings; raises ValueError naming the kernel line that is
    missing (or not unique) where the kernel changed."""
    for line, stamp in STAMPS + (UPDATE_STAMPS if split_update else []):
        if source.count(line) != 1:
            raise ValueError(f"lloyd_phases: lloyd_cluster_kernel no longer has exactly one line {line.strip()!r}; "
                             "update STAMPS to the kernel")
        source = source.replace(line, line + stamp)
    source = source.replace(BEFORE_BARRIER_2, "STAMP(5);\n" + BEFORE_BARRIER_2)
    include = '#include "common.cuh"\n'
    if source.count(include) != 1:
        raise ValueError(f"lloyd_phases: clustering.cu no longer includes {include.strip()} once")
    return source.replace(include, include + MACROS) + BINDINGS


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="4x8", help="comma-separated BxH shapes (rows = B * H)")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--cluster-blocks", default="1,3", help="comma-separated blocks per row (1..8)")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--split-update", action="store_true",
                        help="also stamp the update after its counter loads and after the new code")
    parser.add_argument("--build-dir", default=None,
                        help="where the stamped copy is built and kept (default: a new temporary directory); "
                             "a later run with the same directory and kernel reuses the build")
    parser.add_argument("--build-only", action="store_true",
                        help="build the stamped copy and stop (several trees' copies can build at once, then "
                             "time one at a time)")
    parser.add_argument("--clock-ghz", type=float, default=1.98,
                        help="the SM clock that converts cycles to microseconds (an H200's under load)")
    args = parser.parse_args()
    import torch
    from torch.utils.cpp_extension import load
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        sys.exit("lloyd_phases.py needs a CUDA GPU with thread block clusters (sm_90 or newer)")
    build = Path(args.build_dir) if args.build_dir else Path(tempfile.mkdtemp(prefix="lloyd_phases_"))
    build.mkdir(parents=True, exist_ok=True)
    stamped = build / "clustering_stamped.cu"
    source = stamped_source((ROOT / "cuda" / "clustering.cu").read_text(), args.split_update)
    if not stamped.exists() or stamped.read_text() != source:  # unchanged, ninja finds the build current
        stamped.write_text(source)
    major, minor = torch.cuda.get_device_capability()
    started = time.time()
    print(f"building the stamped kernel in {build} ...", flush=True)
    ext = load("lloyd_phases", [str(stamped)], extra_include_paths=[str(ROOT / "cuda")], build_directory=str(build),
               extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor}a,code=sm_{major}{minor}a"])
    if args.build_only:
        print(f"built in {time.time() - started:.0f} s")
        return
    print(f"built in {time.time() - started:.0f} s; {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"C = {args.clusters}, 10 iterations, 63 bits; us per launch, then per phase (per iteration inside the "
          f"loop) at {args.clock_ghz} GHz")
    names = list(PHASES)
    if args.split_update:
        names[5] = "update stores (thread 0)"
        names += SPLIT_PHASES
    print("rows      N  blocks  launch | " + " | ".join(names))
    for shape in args.rows.split(","):
        batch, heads = (int(x) for x in shape.split("x"))
        for length in (int(n) for n in args.lengths.split(",")):
            x = torch.randn(batch, heads, length, 64, device="cuda", dtype=torch.bfloat16)
            codes = ext.hash_codes(x, torch.randn(63, 64, device="cuda"), torch.zeros(63, device="cuda"))
            for blocks in (int(k) for k in args.cluster_blocks.split(",")):
                launch = lambda: ext.lloyd_kmeans(codes, None, args.clusters, 10, 63, 0, True, blocks)  # noqa: E731
                for _ in range(3):
                    launch()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    launch()
                stop.record()
                stop.synchronize()
                cycles = ext.phase_cycles(batch * heads * blocks).double().mean(0)
                us = [cycles[k].item() / (10 if k in PER_ITERATION else 1) / (args.clock_ghz * 1e3) for k in range(len(names))]
                print(f"{batch * heads:4d} {length:6d} {blocks:7d} {start.elapsed_time(stop) / 20 * 1e3:7.1f} | "
                      + " | ".join(f"{u:.2f}" for u in us))


if __name__ == "__main__":
    main()
