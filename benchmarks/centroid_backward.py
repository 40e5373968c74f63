"""GPU time of the centroid attention's backward at the benchmark's shape: PyTorch's flash
backward against the Triton centroid backward (``ops/centroid_triton.py``), alone and with the
improved variant's log-sum-exp term.

For each length N: 32 rows (B = 4, H = 8) of C = 100 fp32 centroids against N bf16 keys and
values, D = 64. Each column is the median of CUDA-graph replays of one call, in microseconds:

* ``flash``: flash's backward of the centroid attention (the clustered variant's dense part);
* ``flash + lse pass``: that, plus the flash forward over ``(Qbar, K, K)`` and its backward that
  the improved variant's log-sum-exp term took before the sixteenth session;
* ``triton``: the Triton centroid backward;
* ``triton + lse term``: the same with ``lse_weight`` (the improved variant's dense part now),
  centroid gradients left in their per-range parts;
* ``flash + copies``: flash's backward and fresh copies of its ``dk``, ``dv``: what the clustered
  backward paid for them inside a cached CUDA graph before the twenty-fourth session
  (``ops/graph_cache.py`` copies graph-owned outputs out, and flash allocates dk, dv itself);
* ``triton in place``: the Triton backward writing ``dk``, ``dv`` into given tensors (the graph
  cache's "filled" arguments, allocated by the caller: nothing copied)::

    python benchmarks/centroid_backward.py --lengths 1024,4096,32768
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attention import graph_time  # noqa: E402  (benchmarks/ is this script's directory)
from fairseq_clustered.ops import centroid_triton  # noqa: E402
from fairseq_clustered.ops.flash import flash_backward, flash_forward  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,4096,16384,32768,65536")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available() or centroid_triton.triton is None:
        sys.exit("needs a CUDA GPU and triton")
    batch, heads, clusters, dim = 4, 8, args.clusters, 64
    rows, scale = batch * heads, dim ** -0.5
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B={batch} H={heads} C={clusters} D={dim} "
          f"bf16; us per call (CUDA-graph replays)")
    for length in (int(n) for n in args.lengths.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(0)
        qbar = torch.randn(rows, clusters, dim, device="cuda", generator=gen)
        key, value = (torch.randn(batch, heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                      for _ in range(2))
        grad = torch.randn(rows, clusters, dim, device="cuda", generator=gen)
        lse_weight = torch.randn(rows, clusters, device="cuda", generator=gen)
        qb = qbar.reshape(batch, heads, clusters, dim).to(torch.bfloat16)
        grad_b = grad.reshape(batch, heads, clusters, dim).to(torch.bfloat16)
        out, lse = flash_forward(qb, key, value, scale)
        values, lse_rows = out.reshape(rows, clusters, dim), lse.reshape(rows, clusters)

        def flash_lse_pass():
            flash_backward(grad_b, qb, key, value, out, lse, scale)
            k_out, k_lse = flash_forward(qb, key, key, scale)
            flash_backward(grad_b, qb, key, key, k_out, k_lse, scale)

        times = {
            "flash": lambda: flash_backward(grad_b, qb, key, value, out, lse, scale),
            "flash + lse pass": flash_lse_pass,
            "triton": lambda: centroid_triton.centroid_attention_bwd(grad, values, qbar, key, value, None, None,
                                                                     lse_rows, scale, 0.0),
            "triton + lse term": lambda: centroid_triton.centroid_attention_bwd(
                grad, values, qbar, key, value, None, None, lse_rows, scale, 0.0, lse_weight=lse_weight,
                partial_qbar=True),
        }
        grad_key, grad_value = torch.empty_like(key), torch.empty_like(value)

        def flash_and_copies():
            _, dk, dv = flash_backward(grad_b, qb, key, value, out, lse, scale)
            return dk.clone(), dv.clone()

        times["flash + copies"] = flash_and_copies
        times["triton in place"] = lambda: centroid_triton.centroid_attention_bwd(
            grad, values, qbar, key, value, None, None, lse_rows, scale, 0.0, grad_key=grad_key, grad_value=grad_value)
        cells = "  ".join(f"{name} {graph_time(fn, args.repeats) * 1e3:.1f}" for name, fn in times.items())
        print(f"N={length}: {cells}", flush=True)


if __name__ == "__main__":
    main()
