"""Benchmark clustered attention against PyTorch's exact attention.

Configuration of DESIGN.md section 5: B=4, H=8, D=64, bf16, C=100 clusters, 10 Lloyd
iterations, 63 hash bits, top-k 32, N = 1k .. 64k (self-attention, no padding).
For each N it times, in one process on the same inputs, forward and forward+backward:

* ``sdpa``: ``scaled_dot_product_attention`` with PyTorch's default backend choice
  (the baseline every ratio is relative to), and ``flash``: the flash backend;
* ``clustered`` and ``improved``: the public functions of ``fairseq_clustered.ops``
  (hashing and clustering included);
* ``reference``: the pure-PyTorch reference (small N only).

``--causal`` times the causal setting instead (issue 5; by default its window 256 and 64
clusters): ``sdpa`` and ``flash`` with
``is_causal=True`` (the baseline), ``causal_clustered`` (the leak-free variant of
``fairseq_clustered.ops.causal``, key clustering included; on CUDA its one-kernel Triton
path), ``causal_flash_parts`` (the same with the attention as three flash-attention calls,
``ops/causal_fused.py``) and ``causal_reference`` (the variant through its reference op,
tensor cores for half precision).

Times are medians of CUDA-event-timed runs after warm-up, each run synchronised, so an
eager step's time includes the host's lead before its first kernel and a GPU starting from
idle (``host_lead.py`` separates them); on the GPU the forward+backward is also timed
*steady*: ``STEADY_STEPS`` steps back to back per timed run (time per step), as in a
training loop, where the host issues the next step while the GPU runs this one. ``peak``
is the peak memory of one forward+backward, counting its inputs (q, k, v, grad_out) and its
outputs and gradients; ``peak/io`` divides it by the bytes of q, k, v, the output
and their gradients. Writes a CSV (after every measured row, so that a run that dies
keeps what it measured) and, at the end, a log-log PNG (time and memory against N).
``--device cpu`` runs a small CPU version. On the GPU, before the first measurement, the first
length's ``sdpa`` forward+backward runs back to back for ``--warmup-seconds`` (default 2), so that
the first method measured is not the only one timed on a GPU and host fresh from the process's
start (the forty-second session's table had the clustered 1k step at 0.28 ms synchronised, its
process's first clustered measurement, against 0.15 in two reruns).

    python benchmarks/bench_attention.py                 # GPU, bf16, N = 1k..64k
    python benchmarks/bench_attention.py --device cpu    # CPU, small N
    python benchmarks/bench_attention.py --causal        # causal: SDPA(is_causal) vs causal clustered
    python benchmarks/bench_attention.py --dropout 0.1   # attention dropout, as in training (RoBERTa's 0.1)
"""

from __future__ import annotations

import argparse
import logging
import csv
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fairseq_clustered.ops import (  # noqa: E402
    causal_clustered_attention,
    causal_key_clusters,
    clustered_attention,
    draw_hash_planes,
    improved_clustered_attention,
    reference,
)
from fairseq_clustered.ops import causal as causal_ops  # noqa: E402
from fairseq_clustered.ops import causal_fused  # noqa: E402

STEADY_STEPS = 5  # steps per timed run of the steady forward+backward

# Fast-transformers' fp32 clustered attention, forward+backward ms on an H100 with this
# configuration (issue 4), for comparison.
FAST_TRANSFORMERS_MS = {1024: 5.5, 4096: 8.6, 8192: 10.1, 16384: 17.2}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default), float16 or float32 (CPU default)")
    p.add_argument("--lengths", default=None, help="comma-separated N (default 1k..64k on GPU, 256..2048 on CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=None,
                   help=f"C (default 100; with --causal {causal_ops.DEFAULT_NUM_CLUSTERS}, the causal default)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--bits", type=int, default=63)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    p.add_argument("--max-reference-n", type=int, default=None, help="largest N for the reference")
    p.add_argument("--causal", action="store_true", help="the causal setting (see above)")
    p.add_argument("--window", type=int, default=causal_ops.DEFAULT_WINDOW,
                   help=f"causal: chunk size W (default {causal_ops.DEFAULT_WINDOW})")
    p.add_argument("--methods", default=None,
                   help="comma-separated (default sdpa,flash,clustered,improved,reference; "
                        "with --causal sdpa,flash,causal_clustered,causal_flash_parts,causal_reference)")
    p.add_argument("--out", default="bench_attention", help="prefix of the CSV and PNG files")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="attention dropout rate of sdpa, flash, clustered and improved (not with --causal "
                        "or the reference)")
    p.add_argument("--graph", action="store_true",
                   help="also time forward+backward captured in a CUDA graph (GPU time without launch overhead)")
    p.add_argument("--profile", default="", help="comma-separated N: print the top CUDA kernels per method")
    p.add_argument("--profile-forward", default="",
                   help="comma-separated N: the same for the forward alone (without autograd)")
    p.add_argument("--warmup-seconds", type=float, default=2.0,
                   help="GPU: seconds of the first length's sdpa forward+backward before the first measurement")
    p.add_argument("--host-profile", default="",
                   help="comma-separated N: print where the host (CPU) time of a forward+backward goes per method "
                        "(Python functions by own time, torch ops by count)")
    args = p.parse_args()
    if args.warmup_seconds < 0:
        p.error(f"--warmup-seconds must be >= 0, got {args.warmup_seconds}")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dropout and args.causal:
        p.error("--dropout is for the non-causal methods (sdpa, flash, clustered, improved); leave out --causal")
    if args.dropout and args.graph:
        # torch refuses: the clustered ops draw their masks from a generator of their own, which
        # a capture of the whole step cannot advance ("CUDA generator not in capture mode")
        p.error("--graph (the step captured whole in a CUDA graph) does not take --dropout: the clustered ops' "
                "dropout generator cannot be captured; leave out one of them")
    if (args.profile or args.profile_forward) and args.device != "cuda":
        p.error(f"--profile and --profile-forward list CUDA kernels: they need --device cuda, got --device {args.device}")
    if args.clusters is None:
        args.clusters = causal_ops.DEFAULT_NUM_CLUSTERS if args.causal else 100
    return args


def timer(device, fn, repeats, warmup=2):
    """Median milliseconds of ``fn()`` over ``repeats`` runs (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_time(fn, repeats):
    """Median ms of replaying ``fn`` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timer("cuda", graph.replay, repeats)


def profile(name, fn, top=25):
    """Print the GPU time per call of ``fn`` and its ``top`` kernels by time (torch profiler, 3 calls)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / 3 / 1e3
    print(f"  profile {name}: GPU {total:.3f} ms per step, {sum(e.count for e in events) // 3} kernels, "
          f"{step_span(prof, 3):.3f} ms from the first kernel's start to the last one's end")
    for e in events[:top]:
        print(f"    {e.self_device_time_total / 3 / 1e3:8.3f} ms {e.count // 3:4d}x  {e.key[:90]}")


def step_span(prof, steps):
    """The median over ``steps`` equal steps of the GPU's span per step in ms: from the start of a
    step's first kernel to the end of its last, so the gaps between its kernels count too (the sum of
    the kernels' times leaves them out)."""
    kernels = sorted((e.time_range for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda r: r.start)
    per_step = len(kernels) // steps
    spans = sorted(max(r.end for r in kernels[i * per_step:(i + 1) * per_step]) - kernels[i * per_step].start
                   for i in range(steps))
    return spans[steps // 2] / 1e3


def host_profile(name, fn, steps=10):
    """Where the CPU time of ``fn`` goes: the Python functions with the most own time
    (cProfile) and the torch ops issued per step (torch profiler, CPU only)."""
    import cProfile
    import io
    import pstats
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    issue_ms = (time.perf_counter() - start) * 1e3 / steps
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    profiler = cProfile.Profile()
    profiled_steps = 20 * steps  # cProfile prints whole milliseconds: enough steps to see microseconds per step
    profiler.enable()
    for _ in range(profiled_steps):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print(f"  host profile {name}: {issue_ms:.3f} ms to issue a step, {wall_ms:.3f} ms per step with its GPU work; "
          f"cProfile over {profiled_steps} steps (seconds in all: each ms is {1e3 / profiled_steps:g} us per step):")
    lines = text.getvalue().splitlines()
    start_at = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    for line in lines[start_at:start_at + 31]:
        print("    " + line[:150])
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    ops = [e for e in prof.key_averages() if e.key.startswith(("aten::", "fairseq_clustered::", "triton", "cuda"))]
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    print(f"    torch ops per step: {sum(e.count for e in ops if e.key.startswith('aten::'))} aten calls; "
          "by own CPU time:")
    for e in ops[:14]:
        print(f"      {e.self_cpu_time_total / 1e3:7.3f} ms {e.count:4d}x  {e.key[:80]}")


def make_methods(args, planes):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the clustered ops draw their dropout masks from a generator of their own
    dropout = {"dropout_p": args.dropout, "generator": torch.Generator(device=args.device).manual_seed(1)} \
        if args.dropout else {}

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal,
                                                                dropout_p=args.dropout)

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal,
                                                                    dropout_p=args.dropout)

    def causal_clustered(q, k, v):
        return causal_clustered_attention(q, k, v, window=args.window, num_clusters=args.clusters,
                                          iterations=args.iterations, bits=args.bits, planes=planes)

    def key_clusters(k):
        return causal_key_clusters(k.detach(), window=args.window, num_clusters=args.clusters,
                                   iterations=args.iterations, bits=args.bits, planes=planes)

    def causal_flash_parts(q, k, v):
        return causal_fused.causal_clustered_attention_fused(q, k, v, key_clusters(k), args.window, args.clusters,
                                                             q.shape[-1] ** -0.5)

    def causal_reference(q, k, v):
        out, _ = causal_ops.causal_clustered_attention_fwd(q, k, v, key_clusters(k), None, None, args.window,
                                                           args.clusters, q.shape[-1] ** -0.5, 0.0)
        return out

    def clustered(q, k, v):
        return clustered_attention(q, k, v, num_clusters=args.clusters, iterations=args.iterations,
                                   bits=args.bits, planes=planes, **dropout)

    def improved(q, k, v):
        return improved_clustered_attention(q, k, v, num_clusters=args.clusters, iterations=args.iterations,
                                            bits=args.bits, topk=args.topk, planes=planes, **dropout)

    class Reference(torch.autograd.Function):
        """The pure-PyTorch reference end to end (hash, Lloyd, clustered attention)."""

        @staticmethod
        def forward(ctx, q, k, v):
            codes = reference.hash_codes_ref(q, planes, torch.zeros(args.bits, device=q.device))
            a, _ = reference.lloyd_kmeans_ref(codes, None, args.clusters, args.iterations, args.bits)
            out, lse = reference.clustered_attention_fwd_ref(q, k, v, a, None, None, args.clusters,
                                                             q.shape[-1] ** -0.5, 0.0)
            ctx.save_for_backward(q, k, v, a, lse)
            return out

        @staticmethod
        def backward(ctx, g):
            q, k, v, a, lse = ctx.saved_tensors
            return reference.clustered_attention_bwd_ref(g, q, k, v, a, None, None, lse, args.clusters,
                                                         q.shape[-1] ** -0.5, 0.0)

    methods = {"sdpa": sdpa, "flash": flash, "clustered": clustered, "improved": improved,
               "reference": Reference.apply, "causal_clustered": causal_clustered,
               "causal_flash_parts": causal_flash_parts, "causal_reference": causal_reference}
    if args.device != "cuda":
        methods.pop("flash")
    wanted = args.methods or ("sdpa,flash,causal_clustered,causal_flash_parts,causal_reference" if args.causal
                              else "sdpa,flash,clustered,improved" + ("" if args.dropout else ",reference"))
    if args.dropout and "reference" in wanted.split(","):
        raise SystemExit("--dropout: the reference method runs without dropout; leave it out of --methods")
    return {name: fn for name, fn in methods.items() if name in wanted.split(",")}


def measure(args, name, fn, q, k, v, repeats):
    grad = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(grad)

    row = {}
    cache = cuda_graph_cache(args)
    try:
        row["fwd_ms"] = timer(args.device, fwd, repeats)
        row["fwdbwd_ms"] = timer(args.device, fwd_bwd, repeats)
        if args.device == "cuda":
            steps = lambda: [fwd_bwd() for _ in range(STEADY_STEPS)]  # noqa: E731
            row["steady_ms"] = timer(args.device, steps, max(3, repeats // 4), warmup=1) / STEADY_STEPS
        if args.graph and args.device == "cuda" and name in ("clustered", "improved", "causal_clustered",
                                                                  "causal_flash_parts"):
            row["graph_ms"] = graph_time(fwd_bwd, repeats)
        if str(q.shape[2]) in args.profile.split(",") and name != "reference":
            profile(name, fwd_bwd)
        if str(q.shape[2]) in args.profile_forward.split(",") and name != "reference":
            profile(f"{name} forward", fwd)
        if str(q.shape[2]) in args.host_profile.split(",") and name != "reference":
            host_profile(name, fwd_bwd)
        if args.device == "cuda":
            # Peak of one forward+backward counting its inputs (q, k, v, grad_out) but
            # nothing else that happens to be alive in the process.
            for t in (q, k, v):
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd()
            torch.cuda.synchronize()
            inputs = 4 * q.numel() * q.element_size()
            row["peak_mb"] = (torch.cuda.max_memory_allocated() - base + inputs) / 2**20
        if cache is not None:
            # What the cached CUDA graphs of the ops hold at the end (shared by every
            # caller of the same shape, so not multiplied by the layers of a model).
            row["graph_cache_mb"] = cache.memory_bytes() / 2**20
    except torch.cuda.OutOfMemoryError:
        row = {"fwd_ms": math.nan, "fwdbwd_ms": math.nan, "peak_mb": math.nan, "note": "OOM"}
    finally:
        for t in (q, k, v):
            t.grad = None
        if cache is not None:
            cache.clear()  # each method and length starts without graphs
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return row


def warm_up(args, shape, dtype):
    """``sdpa`` forward+backward on random inputs of ``shape`` back to back for ``args.warmup_seconds``."""
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.warmup_seconds:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal).sum().backward()
        steps += 1
        if steps % 10 == 0:
            torch.cuda.synchronize()  # (the host waits for the GPU, not only for its queue)
    torch.cuda.synchronize()
    print(f"warm-up: {steps} sdpa forward+backward steps at N={shape[2]} in {time.perf_counter() - start:.1f} s")


def cuda_graph_cache(args):
    """The ops' CUDA-graph cache (``fairseq_clustered/ops/graph_cache.py``), or None on the CPU."""
    if args.device != "cuda":
        return None
    from fairseq_clustered.ops import cuda_backend
    return cuda_backend.graph_cache()


def main():
    args = parse_args()
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    gpu = args.device == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    lengths = ([int(n) for n in args.lengths.split(",")] if args.lengths
               else ([1024, 2048, 4096, 8192, 16384, 32768, 65536] if gpu else [256, 512, 1024, 2048]))
    batch = args.batch or (4 if gpu else 2)
    heads = args.heads or (8 if gpu else 4)
    max_ref = args.max_reference_n or (4096 if gpu else 2048)
    if gpu:
        from fairseq_clustered.ops import cuda_backend
        status = cuda_backend.status()
        loaded = all(where.startswith("cuda") for where in status.values())
        print("kernels:", "cuda" if loaded else status)
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        from fairseq_clustered.info import graph_cache_line
        print("cuda graphs of the ops:", graph_cache_line(cuda_backend))
    print(f"B={batch} H={heads} D={args.dim} {str(dtype).replace('torch.', '')} C={args.clusters} "
          f"I={args.iterations} bits={args.bits} " + (f"causal, W={args.window}" if args.causal else f"k={args.topk}")
          + (f" dropout={args.dropout}" if args.dropout else ""))
    gen = torch.Generator(device="cpu").manual_seed(0)
    planes = draw_hash_planes(args.bits, args.dim, gen, device=args.device)  # as the modules draw them
    methods = make_methods(args, planes)
    if gpu and args.warmup_seconds > 0:
        warm_up(args, (batch, heads, lengths[0], args.dim), dtype)
    results = []
    for n in lengths:
        shape = (batch, heads, n, args.dim)
        q, k, v = (torch.randn(shape, generator=gen).to(args.device, dtype).requires_grad_(True) for _ in range(3))
        io_mb = 8 * q.numel() * q.element_size() / 2**20  # q, k, v, out and their gradients
        repeats = args.repeats or (max(5, min(30, int(30 * 4096 / n))) if gpu else 3)
        base = {}
        for name, fn in methods.items():
            is_reference = name in ("reference", "causal_reference")
            if is_reference and n > max_ref:
                continue
            row = {"n": n, "method": name, **measure(args, name, fn, q, k, v, 3 if is_reference else repeats)}
            row["io_mb"] = io_mb
            if name == "sdpa":
                base = row
            if base:
                row["fwd_ratio"] = row["fwd_ms"] / base["fwd_ms"]
                row["fwdbwd_ratio"] = row["fwdbwd_ms"] / base["fwdbwd_ms"]
                if "steady_ms" in row:
                    row["steady_ratio"] = row["steady_ms"] / base["steady_ms"]
            if name == "clustered" and n in FAST_TRANSFORMERS_MS and not args.causal:
                row["vs_fast_transformers"] = FAST_TRANSFORMERS_MS[n] / row["fwdbwd_ms"]
                if "steady_ms" in row:
                    row["steady_vs_fast_transformers"] = FAST_TRANSFORMERS_MS[n] / row["steady_ms"]
            results.append(row)
            write_csv(args, results)  # after every row: a run that dies later keeps what it measured
            print(f"  N={n:6d} {name:16s} fwd {row['fwd_ms']:9.3f} ms  fwd+bwd {row['fwdbwd_ms']:9.3f} ms"
                  f"  peak {row.get('peak_mb', math.nan):9.1f} MB", flush=True)
        del q, k, v

    write_outputs(args, results)
    print_table(results)


def write_csv(args, results):
    """``args.out``.csv with every row measured so far (rewritten whole at each call)."""
    keys = ["n", "method", "fwd_ms", "fwd_ratio", "fwdbwd_ms", "fwdbwd_ratio", "steady_ms", "steady_ratio", "graph_ms",
            "peak_mb", "io_mb", "graph_cache_mb", "vs_fast_transformers", "steady_vs_fast_transformers", "note"]
    with open(args.out + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in results:
            writer.writerow(row)


def write_outputs(args, results):
    write_csv(args, results)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == name]
        ns = [r["n"] for r in rows]
        axes[0].loglog(ns, [r["fwd_ms"] for r in rows], "o-", label=name)
        axes[1].loglog(ns, [r["fwdbwd_ms"] for r in rows], "o-", label=name)
        if "peak_mb" in rows[0]:
            axes[2].loglog(ns, [r.get("peak_mb", math.nan) for r in rows], "o-", label=name)
    for ax, title in zip(axes, ["forward (ms)", "forward+backward (ms)", "peak memory (MB)"]):
        ax.set_xlabel("N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(f"wrote {args.out}.csv and {args.out}.png")


def print_table(results):
    steady = any("steady_ms" in r for r in results)
    print("\n   N method            fwd ms  ratio  fwd+bwd ms  ratio" + ("  steady ms  ratio" if steady else "")
          + "   peak MB  peak/io")
    for r in results:
        ratio = lambda key: f"{r[key]:6.3f}" if key in r and not math.isnan(r[key]) else "     -"  # noqa: E731
        peak = r.get("peak_mb", math.nan)
        print(f"{r['n']:6d} {r['method']:16s} {r['fwd_ms']:8.3f} {ratio('fwd_ratio')} {r['fwdbwd_ms']:10.3f} "
              f"{ratio('fwdbwd_ratio')}"
              + (f" {r.get('steady_ms', math.nan):10.3f} {ratio('steady_ratio')}" if steady else "")
              + f" {peak:9.1f} {peak / r['io_mb']:7.2f}"
              + (f"  graph {r['graph_ms']:.3f} ms" if "graph_ms" in r else "")
              + (f"  cached graphs {r['graph_cache_mb']:.0f} MB" if r.get("graph_cache_mb") else "")
              + (f"  {r['vs_fast_transformers']:.0f}x faster than fast-transformers"
                 if "vs_fast_transformers" in r else "")
              + (f" ({r['steady_vs_fast_transformers']:.1f}x steady)" if "steady_vs_fast_transformers" in r else ""))


if __name__ == "__main__":
    main()
