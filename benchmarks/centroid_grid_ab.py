"""The centroid attention kernels' launch grid, before and after the twentieth session, in one process.

``centroid_triton._programs_per_row`` used to round the programs per (batch, head) row up
(``cdiv(TARGET_PROGRAMS, rows)``: 288 programs for 32 rows, a last wave of 24 on the SMs); it
now takes at most ``TARGET_PROGRAMS`` in all. This times the Triton centroid forward and
backward (graph replays, microseconds, the better of two rounds) with key padding (the
last tenth of the keys) and dropout 0.1, C = 100, D = 64, under the old rule (``old``,
reproduced here) and the current one, for bf16 and fp32 and several ``B x H``::

    python benchmarks/centroid_grid_ab.py

The "parts" column gives the programs per row at 64-key steps (the fp32 backward steps 32).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fairseq_clustered.ops import centroid_triton  # noqa: E402
from fairseq_clustered.ops._triton import triton  # noqa: E402
from lloyd_sweep import graph_microseconds  # noqa: E402

CURRENT = centroid_triton._programs_per_row


def old(rows: int, keys: int, block_n: int):
    """The rule before the twentieth session: the programs per row rounded up."""
    wanted = max(1, min(triton.cdiv(centroid_triton.TARGET_PROGRAMS, rows),
                        triton.cdiv(keys, centroid_triton.MIN_KEYS_PER_PROGRAM)))
    per_program = triton.cdiv(triton.cdiv(keys, wanted), block_n) * block_n
    return triton.cdiv(keys, per_program), per_program


def times(rule, qbar, grad, key, value, padding, keep):
    """(forward us, backward us) of the kernels with the launch grid of ``rule``."""
    centroid_triton._programs_per_row = rule
    try:
        def forward():
            return centroid_triton.centroid_attention_fwd(qbar, key, value, padding, keep, 0.125, 0.1)

        values, lse = forward()

        def backward():
            return centroid_triton.centroid_attention_bwd(grad, values, qbar, key, value, padding, keep, lse,
                                                          0.125, 0.1)

        backward()
        return graph_microseconds(forward), graph_microseconds(backward)
    finally:
        centroid_triton._programs_per_row = CURRENT


def main():
    if not torch.cuda.is_available():
        sys.exit("centroid_grid_ab.py needs a CUDA GPU (it times kernels there)")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; C=100 D=64, padding and dropout 0.1")
    print(f"{'dtype':>9} {'BxH':>5} {'S':>6} {'parts old/new':>13} {'fwd old':>8} {'fwd new':>8} "
          f"{'bwd old':>8} {'bwd new':>8}")
    for dtype in (torch.bfloat16, torch.float32):
        for batch, heads in ((4, 8), (2, 12), (1, 16), (8, 16)):
            for keys in (4096, 16384):
                rows = batch * heads
                g = torch.Generator("cuda").manual_seed(0)
                qbar, grad = (torch.randn(rows, 100, 64, device="cuda", generator=g) for _ in range(2))
                key, value = (torch.randn(batch, heads, keys, 64, device="cuda", generator=g).to(dtype)
                              for _ in range(2))
                padding = torch.zeros(batch, keys, dtype=torch.bool, device="cuda")
                padding[:, keys - keys // 10:] = True
                keep = torch.rand(batch, heads, 100, keys, device="cuda", generator=g) >= 0.1
                best = {}
                for _ in range(2):
                    for name, rule in (("old", old), ("new", CURRENT)):
                        got = times(rule, qbar, grad, key, value, padding, keep)
                        best[name] = min(best.get(name, got), got)
                parts = f"{old(rows, keys, 64)[0]}/{CURRENT(rows, keys, 64)[0]}"
                print(f"{str(dtype)[6:]:>9} {batch}x{heads:<3} {keys:>6} {parts:>13} {best['old'][0]:8.1f} "
                      f"{best['new'][0]:8.1f} {best['old'][1]:8.1f} {best['new'][1]:8.1f}", flush=True)


if __name__ == "__main__":
    main()
