"""GPU time of the improved variant's top-key selection (``improved_triton.centroid_top_keys``)
against its settings, and a check that every setting picks the same keys.

For each length N: 32 rows (B = 4, H = 8) of N bf16 keys and C fp32 centroids (3 x normal, so
that the logits spread as a trained model's do), D = 64, k = 32. Each setting of
``improved_triton.SELECTION`` (keys per sub-block through ``SUB_BLOCKS``, the candidates' tile
``TILE``, ``num_warps``, ``MAX_SUB_BLOCKS``) is timed as the median of CUDA-graph replays of one
call, in microseconds, and its top keys are compared with those of the defaults: the same set
for every centroid, or the count of centroids that differ. Settings are ``name=value`` pairs
joined by ``,``; several settings by ``;``::

    python benchmarks/top_keys_sweep.py --lengths 1024,4096,32768 \\
        --settings "default;SUB_BLOCKS=16384;num_warps=8;MAX_SUB_BLOCKS=8"

``--ncu`` wraps one call per length and setting in the CUDA profiler's start and stop, for
Nsight Compute (``ncu --profile-from-start off ...``).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attention import graph_time  # noqa: E402  (benchmarks/ is this script's directory)
from fairseq_clustered.ops import improved_triton  # noqa: E402


def parse_settings(text: str):
    """``"default;A=1,B=2"`` -> ``[("default", {}), ("A=1,B=2", {"A": 1, "B": 2})]``."""
    settings = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        if item == "default":
            settings.append((item, {}))
            continue
        values = {}
        for pair in item.split(","):
            name, _, value = pair.partition("=")
            if name not in improved_triton.SELECTION or not value.lstrip("-").isdigit():
                raise SystemExit(f"--settings: {pair!r} is not NAME=INTEGER with NAME one of "
                                 f"{sorted(improved_triton.SELECTION)}")
            values[name] = int(value)
        settings.append((item, values))
    return settings


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,4096,16384,32768,65536")
    parser.add_argument("--settings", default="default")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--ncu", action="store_true", help="profile one call per length and setting")
    args = parser.parse_args()
    settings = parse_settings(args.settings)
    if not torch.cuda.is_available() or improved_triton.triton is None:
        sys.exit("needs a CUDA GPU and triton")
    defaults = dict(improved_triton.SELECTION)
    rows, dim, scale = 32, 64, 64 ** -0.5
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; rows={rows} C={args.clusters} D={dim} "
          f"k={args.topk}; defaults {defaults}; us per call (CUDA-graph replays) [centroids whose top keys "
          "differ from the defaults']")
    for length in (int(n) for n in args.lengths.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(length)
        qbar = 3 * torch.randn(rows, args.clusters, dim, device="cuda", generator=gen)
        key = torch.randn(rows, length, dim, device="cuda", generator=gen).to(torch.bfloat16)
        _, reference = improved_triton.centroid_top_keys(qbar, key, scale, args.topk)
        reference = reference.sort(-1).values
        cells = []
        for name, values in settings:
            improved_triton.SELECTION.update(defaults, **values)
            try:
                call = lambda: improved_triton.centroid_top_keys(qbar, key, scale, args.topk)  # noqa: E731
                differing = (call()[1].sort(-1).values != reference).any(-1).sum().item()
                if args.ncu:
                    torch.cuda.synchronize()
                    torch.cuda.profiler.start()
                    call()
                    torch.cuda.synchronize()
                    torch.cuda.profiler.stop()
                sub = improved_triton.sub_block_keys(args.topk, dim, length)
                us = graph_time(call, args.repeats) * 1e3
                cells.append(f"{name} (sub {sub}): {us:.1f} [{differing}]")
            finally:
                improved_triton.SELECTION.update(defaults)
        print(f"N={length}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
