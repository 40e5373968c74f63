"""Causal clustered attention against exact causal attention, forward and forward+backward.

DESIGN.md section 5: on one GPU, in one process, the same inputs (B=4, H=8, D=64, bf16 by
default), for each length: ``scaled_dot_product_attention(is_causal=True)`` with PyTorch's
default backend choice and with the flash backend, and
:func:`fairseq_clustered.ops.causal_clustered_attention` (its key clustering included,
with fixed hash planes). Median of ``--repeats`` timed runs after ``--warmup`` runs, with
CUDA events; peak memory above the inputs. Prints a table (ratios against the default SDPA)
and writes a CSV.

Usage: ``python benchmarks/bench_causal.py [--lengths 4096 8192 ...] [--csv out.csv]``
"""

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_clustered.ops import causal_clustered_attention, causal_key_clusters, draw_hash_planes  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_call(function, warmup: int, repeats: int, device: torch.device):
    """Median milliseconds of ``function()`` and the peak memory (MiB) it allocated
    (CUDA events on a GPU; wall clock and no memory figure on the CPU, for smoke runs)."""
    for _ in range(warmup):
        function()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            function()
            times.append((time.perf_counter() - began) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return statistics.median(times), peak


def forward_backward(attention, inputs, grad_out):
    def run():
        for x in inputs:
            x.grad = None
        attention(*inputs).backward(grad_out)
    return run


def forward_only(attention, inputs):
    def run():
        with torch.no_grad():
            attention(*inputs)
    return run


def measure(name, attention, inputs, grad_out, args):
    row = {"method": name}
    for mode, function in (("fwd", forward_only(attention, inputs)),
                           ("fwd_bwd", forward_backward(attention, inputs, grad_out))):
        try:
            row[f"{mode}_ms"], row[f"{mode}_mib"] = time_call(function, args.warmup, args.repeats, args.device)
        except torch.cuda.OutOfMemoryError:  # shown as nan in the table, not hidden
            print(f"{name}: out of GPU memory in {mode}", flush=True)
            row[f"{mode}_ms"], row[f"{mode}_mib"] = float("nan"), float("nan")
            torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--bits", type=int, default=63)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--csv", type=Path, default=Path("bench_causal.csv"))
    parser.add_argument("--device", type=torch.device, default=torch.device("cuda"),
                        help="cuda (the measurement) or cpu (a smoke run of the script)")
    args = parser.parse_args()
    if args.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_causal.py needs a CUDA GPU (or --device cpu for a smoke run)")
    device, dtype = args.device, DTYPES[args.dtype]
    planes = draw_hash_planes(args.bits, args.dim, torch.Generator().manual_seed(0), device=device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name} torch {torch.__version__} B={args.batch} H={args.heads} "
          f"D={args.dim} {args.dtype} window={args.window} C={args.clusters} I={args.iterations} bits={args.bits}")

    def clustered(q, k, v):
        return causal_clustered_attention(q, k, v, window=args.window, num_clusters=args.clusters,
                                          iterations=args.iterations, bits=args.bits, planes=planes)

    def sdpa_default(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_flash(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    rows = []
    header = f"{'N':>6} {'method':<20}{'fwd ms':>9}{'ratio':>7}{'f+b ms':>10}{'ratio':>7}{'f+b MiB':>10}"
    print(header)
    for length in args.lengths:
        gen = torch.Generator(device=device).manual_seed(length)
        shape = (args.batch, args.heads, length, args.dim)
        inputs = [torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_() for _ in range(3)]
        grad_out = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        results = [measure("sdpa_default", sdpa_default, inputs, grad_out, args),
                   measure("sdpa_flash", sdpa_flash, inputs, grad_out, args),
                   measure("causal_clustered", clustered, inputs, grad_out, args)]
        clustering_ms, _ = time_call(lambda: causal_key_clusters(
            inputs[1].detach(), window=args.window, num_clusters=args.clusters, iterations=args.iterations,
            bits=args.bits, planes=planes), args.warmup, args.repeats, device)
        results.append({"method": "  key clustering", "fwd_ms": clustering_ms, "fwd_mib": float("nan"),
                        "fwd_bwd_ms": float("nan"), "fwd_bwd_mib": float("nan")})
        reference = results[0]
        for row in results:
            row.update(length=length, fwd_ratio=row["fwd_ms"] / reference["fwd_ms"],
                       fwd_bwd_ratio=row["fwd_bwd_ms"] / reference["fwd_bwd_ms"])
            print(f"{length:>6} {row['method']:<20}{row['fwd_ms']:>9.3f}{row['fwd_ratio']:>7.2f}"
                  f"{row['fwd_bwd_ms']:>10.3f}{row['fwd_bwd_ratio']:>7.2f}{row['fwd_bwd_mib']:>10.0f}", flush=True)
            rows.append(row)
        del inputs, grad_out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fields = ["length", "method", "fwd_ms", "fwd_ratio", "fwd_mib", "fwd_bwd_ms", "fwd_bwd_ratio", "fwd_bwd_mib"]
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
