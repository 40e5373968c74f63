"""The graph cache's inputs read in place against copied (``ops/graph_cache.py``,
``cuda/graph_inputs.cpp``): forward+backward step times, and what each graph rewrites.

Step times: for each length N, the clustered and improved steps (B = 4, H = 8, D = 64, bf16,
C = 100, the benchmark's defaults) with ``FAIRSEQ_CLUSTERED_GRAPH_INPUTS=copy`` and ``in-place``,
interleaved in one process (each setting's median over ``--repeats`` CUDA-event-timed steps; the
least of ``--rounds`` such medians), ratios to SDPA's step in brackets:

* ``same``: the same q, k, v at every step, as ``bench_attention.py`` does (an in-place graph then
  rewrites nothing after its first replay);
* ``alternating``: two sets of q, k, v in turn, as a model's layers call it: every in-place
  replay rewrites its kernels' addresses.

Then, at ``--report-length``, each cached graph: its inputs, whether it reads them in place (and
why not), the kernel nodes it rewrites, and the host time of one rewrite of every address against
one launch of the copy it replaces::

    python benchmarks/graph_inputs.py --lengths 1024,4096,16384
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attention import timer  # noqa: E402  (benchmarks/ is this script's directory)
from fairseq_clustered.ops import clustered_attention, cuda_backend, improved_clustered_attention  # noqa: E402

VARIANTS = {"clustered": clustered_attention, "improved": improved_clustered_attention}
SETTING = "FAIRSEQ_CLUSTERED_GRAPH_INPUTS"


def qkv_sets(length, count):
    return [[torch.randn(4, 8, length, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
             for _ in range(3)] for _ in range(count)]


def step_time(attention, sets, grad, planes, repeats):
    """Median ms of forward+backward steps taking ``sets`` in turn (the graph cache emptied first)."""
    cuda_backend.graph_cache().clear()
    turn = [0]

    def step():
        q, k, v = sets[turn[0] % len(sets)]
        turn[0] += 1
        for t in (q, k, v):
            t.grad = None
        attention(q, k, v, num_clusters=100, planes=planes).backward(grad)
    return timer("cuda", step, repeats, warmup=3)


def compare_steps(lengths, planes, repeats, rounds):
    columns = [(inputs, alternating) for alternating in (False, True) for inputs in ("copy", "in-place")]
    print(f"{'N':>6} {'variant':9s} {'sdpa':>7}  " + "  ".join(
        f"{inputs + (' alternating' if alternating else ' same'):>22s}" for inputs, alternating in columns))
    for length in lengths:
        sets = qkv_sets(length, 2)
        grad = torch.randn_like(sets[0][0])
        q, k, v = sets[0]

        def sdpa():
            for t in (q, k, v):
                t.grad = None
            torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)
        base = timer("cuda", sdpa, repeats)
        for name, attention in VARIANTS.items():
            best = {}
            for _ in range(rounds):
                for inputs, alternating in columns:
                    os.environ[SETTING] = inputs
                    ms = step_time(attention, sets if alternating else sets[:1], grad, planes, repeats)
                    best[inputs, alternating] = min(best.get((inputs, alternating), float("inf")), ms)
            print(f"{length:6d} {name:9s} {base:7.3f}  " + "  ".join(
                f"{best[c]:13.3f} ({best[c] / base:5.3f})" for c in columns), flush=True)
    os.environ.pop(SETTING, None)


def report(length, planes):
    """What each cached graph of one clustered and one improved step reads in place, and the host
    time of rewriting its addresses (every one changed) against launching its input copy."""
    cache, extension = cuda_backend.graph_cache(), cuda_backend.extension()
    os.environ[SETTING] = "in-place"
    for name, attention in VARIANTS.items():
        cache.clear()
        (q, k, v), = qkv_sets(length, 1)
        for _ in range(3):
            attention(q, k, v, num_clusters=100, planes=planes).backward(torch.ones_like(q))
        torch.cuda.synchronize()
        print(f"{name} at N = {length}: {cache.inputs_read_in_place()} of {len(cache)} graphs read their inputs "
              f"in place")
        for key, entry in cache._entries.items():
            megabytes = sum(t.numel() * t.element_size() for t in entry.static_tensors) / 2**20
            line = f"  {key[0]:44s} {len(entry.static_tensors):2d} inputs, {megabytes:6.1f} MB: "
            if entry.inputs is None:
                print(line + f"copied ({cache.copied_inputs.get(key[0], 'copies requested')})")
                continue
            elsewhere = [t.clone() for t in entry.static_tensors]
            addresses = [[t.data_ptr() for t in elsewhere], list(entry.static_bases)]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(2000):
                entry.inputs.point_at(entry.executable, addresses[i % 2])
            rewrite = (time.perf_counter() - start) / 2000 * 1e6
            start = time.perf_counter()
            for _ in range(200):
                extension.copy_tensors(entry.static_tensors, elsewhere)
            copy = (time.perf_counter() - start) / 200 * 1e6
            torch.cuda.synchronize()
            print(line + f"in place, {entry.inputs.kernel_nodes} kernel nodes rewritten; host us per call: "
                  f"rewrite {rewrite:.1f}, copy launch {copy:.1f}")
    os.environ.pop(SETTING, None)
    cache.clear()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--report-length", type=int, default=4096, help="0: no report")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not cuda_backend.load():
        sys.exit("needs a CUDA GPU and the compiled fairseq_clustered._C")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; forward+backward ms (ratio to SDPA)")
    planes = torch.randn(63, 64, device="cuda")
    compare_steps([int(n) for n in args.lengths.split(",")], planes, args.repeats, args.rounds)
    if args.report_length:
        report(args.report_length, planes)


if __name__ == "__main__":
    main()
