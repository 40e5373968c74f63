"""How much of a synchronised eager step is the host's lead before its first kernel (CUDA only).

``bench_attention.py`` times each step between two CUDA events with a synchronisation after
it, so an eager step's time counts the CPU time from the first event to the step's first
kernel as well as the GPU's work. A training loop does not wait like that: the host issues
the next step while the GPU runs this one. For the clustered step at each length this prints
the median milliseconds per step measured three ways, on the same inputs:

* synchronised: as ``bench_attention.py`` (event, step, event, synchronise);
* lead hidden: a GPU sleep is queued first and the first event after it, so the step's
  launches are issued while the GPU sleeps and the events time the GPU's work alone;
* back to back: ten steps between two events, per step (``bench_attention.py``'s "steady"
  column takes five).

    python benchmarks/host_lead.py --lengths 1024,4096,8192,16384
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,8192,16384")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_lead.py needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B={args.batch} H={args.heads} D={args.dim} "
          f"bf16 C={args.clusters}; clustered forward+backward, median ms per step")
    for length in map(int, args.lengths.split(",")):
        shape = (args.batch, args.heads, length, args.dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        grad = torch.randn_like(q)
        planes = torch.randn(63, args.dim, device="cuda")

        def step():
            for t in (q, k, v):
                t.grad = None
            clustered_attention(q, k, v, planes=planes, num_clusters=args.clusters).backward(grad)

        for _ in range(4):  # the graphs are captured at the second step
            step()
        torch.cuda.synchronize()
        synchronised, hidden, back_to_back = [], [], []
        for _ in range(args.repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            stop.synchronize()
            synchronised.append(start.elapsed_time(stop))
            torch.cuda._sleep(SLEEP_CYCLES)
            start.record()
            step()
            stop.record()
            stop.synchronize()
            hidden.append(start.elapsed_time(stop))
            start.record()
            for _ in range(10):
                step()
            stop.record()
            stop.synchronize()
            back_to_back.append(start.elapsed_time(stop) / 10)
        print(f"N={length:6d}: synchronised {statistics.median(synchronised):.3f}, lead hidden "
              f"{statistics.median(hidden):.3f}, back to back {statistics.median(back_to_back):.3f}")


if __name__ == "__main__":
    main()
