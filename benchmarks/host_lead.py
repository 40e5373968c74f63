"""How much of a synchronised eager step is the host's lead before its first kernel (CUDA only).

``bench_attention.py`` times each step between two CUDA events with a synchronisation after
it, so an eager step's time counts the CPU time from the first event to the step's first
kernel as well as the GPU's work. A training loop does not wait like that: the host issues
the next step while the GPU runs this one. For the clustered step (and, with ``--methods``,
SDPA's) at each length this prints the median milliseconds per step measured four ways, on the
same inputs:

* synchronised: as ``bench_attention.py`` (event, step, event, synchronise);
* GPU busy just before: the same, after a GPU sleep of about 10 us queued just before the first
  event, shorter than the host takes to issue the step's first launch: what a GPU coming out of
  idleness costs, apart from the host's lead;
* lead hidden: a GPU sleep is queued first and the first event after it, so the step's
  launches are issued while the GPU sleeps and the events time the GPU's work alone;
* back to back: ten steps between two events, per step (``bench_attention.py``'s "steady"
  column takes five).

``--forward`` times the forward alone, without grad (evaluation: the clustered op's forward that
keeps nothing for a backward, replayed from C++), as ``bench_attention.py``'s "fwd" column::

    python benchmarks/host_lead.py --lengths 1024,4096,8192,16384 --methods clustered,sdpa
    python benchmarks/host_lead.py --lengths 2048 --methods clustered,sdpa --forward
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fairseq_clustered.ops import clustered_attention  # noqa: E402

SLEEP_CYCLES = 3_000_000  # about 1.5 ms of GPU clock: longer than the host needs to issue a step
BUSY_CYCLES = 20_000  # about 10 us: shorter than the host needs to issue the step's first launch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,8192,16384")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--methods", default="clustered", help="clustered and / or sdpa (its default backend)")
    p.add_argument("--forward", action="store_true", help="the forward alone, without grad")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_lead.py needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B={args.batch} H={args.heads} D={args.dim} "
          f"bf16 C={args.clusters}; {'forward without grad' if args.forward else 'forward+backward'}, median ms per step")
    for length in map(int, args.lengths.split(",")):
        shape = (args.batch, args.heads, length, args.dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        grad = torch.randn_like(q)
        planes = torch.randn(63, args.dim, device="cuda")

        for method in args.methods.split(","):
            print(f"N={length:6d} {method:9s}: " + measure(method, q, k, v, grad, planes, args))


def measure(method, q, k, v, grad, planes, args) -> str:
    """The four times of one method's step, as a line."""
    def step():
        for t in (q, k, v):
            t.grad = None
        with torch.set_grad_enabled(not args.forward):
            if method == "sdpa":
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            else:
                out = clustered_attention(q, k, v, planes=planes, num_clusters=args.clusters)
        if not args.forward:
            out.backward(grad)

    for _ in range(4):  # the graphs are captured at the second step
        step()
    torch.cuda.synchronize()
    synchronised, busy, hidden, back_to_back = [], [], [], []
    for _ in range(args.repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for times, cycles in ((synchronised, 0), (busy, BUSY_CYCLES), (hidden, SLEEP_CYCLES)):
            if cycles:
                torch.cuda._sleep(cycles)
            start.record()
            step()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        start.record()
        for _ in range(10):
            step()
        stop.record()
        stop.synchronize()
        back_to_back.append(start.elapsed_time(stop) / 10)
    return (f"synchronised {statistics.median(synchronised):.3f}, GPU busy just before "
            f"{statistics.median(busy):.3f}, lead hidden {statistics.median(hidden):.3f}, back to back "
            f"{statistics.median(back_to_back):.3f}")


if __name__ == "__main__":
    main()
