"""The Python layers of an eager clustered-attention step, timed on any CPU (no GPU needed).

Below 8k positions an eager step on the GPU is bound by the host issuing it, most of all by the
Python that runs before the backward's graph is launched (benchmarks/NOTES.md, twenty-third
session), and the GPU server's CPU runs that Python about 5x slower than a workstation's, with a
spread of up to 2x between runs. This script runs the same layers on the CPU, where their time is
stable, so that changes to them can be measured before any GPU time is spent:

* ``memoised``: the public function, its checks, the autograd Function and the packed forward and
  backward, with each composition memoised (run once, its outputs handed back after);
* ``cache``: the same through the graph cache's hit path (keys, lookups, the replay's output
  handling), with the graph launch and the kernel pointers replaced by no-ops and the CPU tensors
  let through the cache (the Python key; the extension builds it in C++ on the GPU);
* ``autograd``: a ``torch.autograd.Function`` that saves three tensors and does nothing: the floor.

The compositions' kernels are the tests' plain-PyTorch stand-ins (``tests/test_cuda_kernels.py``'s
``EmulatedExtension``), so their own time is not measured, only the layers around them. Medians of
8 rounds, microseconds per step; ``--profile`` adds cProfile's own time per function (single
threaded here: a CPU backward runs on the calling thread, so, unlike on the GPU, the backward's
functions are profiled correctly)::

    python benchmarks/host_layers_cpu.py
    python benchmarks/host_layers_cpu.py --profile cache
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fairseq_clustered import ops  # noqa: E402
from fairseq_clustered.ops import eager, graph_cache  # noqa: E402
from fairseq_clustered.ops.cuda_kernels import CudaOps  # noqa: E402
from host_overhead import empty_function, print_profile  # noqa: E402

_NOTHING = empty_function()  # autograd alone: saves q, k, v, returns fresh outputs, no work


class _NoLaunch:
    """A captured graph's stand-in: its replay launches nothing."""

    def replay(self):
        pass


class _NoPointers:
    """``GraphInputs``' stand-in: every call's tensors are accepted in place, nothing is rewritten."""

    def point_at(self, executable, bases):
        return True


def _cpu_signature():
    """``graph_cache._signature`` with CPU tensors let through (their key as a CUDA tensor's, stream 0)."""
    source = inspect.getsource(graph_cache._signature)
    source = source.replace("if not arg.is_cuda:", "if False:").replace(
        "torch._C._cuda_getCurrentRawStream(device)", "0")
    assert "if False:" in source and "torch._C._cuda_getCurrentRawStream" not in source, \
        "graph_cache._signature changed: update host_layers_cpu.py"
    namespace = dict(vars(graph_cache))
    exec(source, namespace)
    return namespace["_signature"]


def stand_in_ops(mode: str) -> CudaOps:
    """``CudaOps`` on the tests' stand-in extension, its graph cache memoising (``memoised``) or
    replaying stand-in graphs (``cache``)."""
    from test_cuda_kernels import EmulatedExtension

    cuda_ops = CudaOps(EmulatedExtension())
    cache = cuda_ops.graphs
    if mode == "memoised":
        memo = {}

        def memoised_run(name, fn, args, filled=(), native=None):
            if name not in memo:
                memo[name] = fn(*args)
            if "bwd" in name:  # fresh gradients, as a replay gives (autograd takes them without a copy)
                return tuple(torch.empty_like(t) for t in memo[name])
            return memo[name]
        cache.run = memoised_run
        return cuda_ops

    graph_cache._signature = _cpu_signature()
    torch._C._cuda_isCurrentStreamCapturing = lambda: False
    cache._fresh_copies = lambda tensors: [torch.empty_like(t) for t in tensors]

    def capture(name, fn, args, tensors, config, filled=()):
        outputs = fn(*args)
        single = isinstance(outputs, torch.Tensor)
        outputs = (outputs,) if single else tuple(outputs)
        filled_tensors = [sum(isinstance(a, torch.Tensor) for a in args[:i]) for i in filled]
        return graph_cache._Entry(_NoLaunch(), list(tensors), outputs, single, 0, filled_tensors), _NoPointers()

    def passed_check(name, entry, pointers, fn, args, tensors):
        entry.inputs = pointers
        return cache._replay(entry, tensors, True)
    cache._capture, cache._check_in_place = capture, passed_check
    return cuda_ops


def steps(args):
    """``{mode: step function}`` for the modes asked for, and the ops of the ``cache`` mode (or None)."""
    shape = (args.batch, args.heads, args.length, args.dim)
    q, k, v = (torch.randn(shape).requires_grad_() for _ in range(3))
    grad = torch.randn(shape)
    planes = torch.randn(63, args.dim)
    made, cache_ops = {}, None
    for mode in args.modes.split(","):
        if mode == "autograd":
            def step():
                for t in (q, k, v):
                    t.grad = None
                _NOTHING.apply(q, k, v).backward(grad)
        elif mode in ("memoised", "cache"):
            cuda_ops = stand_in_ops(mode)
            if mode == "cache":
                cache_ops = cuda_ops

            def step(cuda_ops=cuda_ops):
                eager.implementations = lambda query: cuda_ops
                for t in (q, k, v):
                    t.grad = None
                ops.clustered_attention(q, k, v, num_clusters=args.clusters, planes=planes).backward(grad)
        else:
            raise SystemExit(f"--modes: memoised, cache or autograd, got {mode!r}")
        made[mode] = step
    return made, cache_ops


def median_us(step, calls: int, rounds: int = 8) -> float:
    for _ in range(min(50, calls)):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def profile(step, calls: int, rows: int = 30) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    print("  own / cumulative us per step, calls per step")
    print_profile(profiler, calls, rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="memoised,cache,autograd")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--calls", type=int, default=500, help="steps per round (8 rounds)")
    p.add_argument("--profile", default="", help="a mode to profile with cProfile after the timings")
    args = p.parse_args()
    made, cache_ops = steps(args)
    print(f"CPU, torch {torch.__version__}, Python {sys.version.split()[0]}; clustered step, "
          f"(B, H, N, D) = ({args.batch}, {args.heads}, {args.length}, {args.dim}), C = {args.clusters}; "
          f"us per step, median of 8 rounds")
    for mode, step in made.items():
        print(f"  {mode:10s} {median_us(step, args.calls):8.1f}")
    if cache_ops is not None:
        print(f"  (cache: {cache_ops.graphs.replays} replays of {len(cache_ops.graphs)} stand-in graphs)")
    if args.profile:
        print(f"cProfile of {args.profile}:")
        profile(made[args.profile], args.calls)


if __name__ == "__main__":
    main()
