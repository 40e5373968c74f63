"""Fit the Lloyd kernel rule's time model to a ``lloyd_sweep.py`` output, and check the rule on it.

``ops.cuda_kernels.lloyd_cluster_blocks`` picks, per shape, the one-launch kernel at k blocks per
row or the kernels launched per step, by a model of both kernels' times (``ONE_LAUNCH_LLOYD_US``,
``PER_STEP_LLOYD_US``). This script reads what ``lloyd_sweep.py --settings 0 --cluster-blocks ...``
printed (no GPU needed: it parses the text) and

* fits the one-launch model (``cuda_kernels.one_launch_lloyd_terms``: ``waves * (fixed + cached *
  min(slice, 8192) + uncached * max(slice - 8192, 0) + per_block / k)``) and the per-step model
  (``per_step_lloyd_terms``: ``fixed + per_query * rows * N / sms + per_row * rows``; the sweep's
  ``us per step`` column, with the tensor-core search where ``lloyd_tensor_core_split`` takes it),
  by least squares on the relative error: the very terms the rule multiplies;
* prints the fitted constants beside the module's and each model's error on the points;
* prints, for every shape, the kernel the module's rule picks, its measured time, the fastest
  measured and their ratio (``-`` where the rule picks a setting the sweep did not time)::

    python benchmarks/lloyd_fit.py benchmarks/results/lloyd_dsmem_update_sweep_h200_session29.txt

The GPU's SM count and resident clusters per blocks per row come from the sweep's header lines.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_clustered.ops import cuda_kernels  # noqa: E402

ONE_LAUNCH_ROW = re.compile(r"\s*(\d+)\s+(\d+)\s+one launch\s+(\d+) \| us per step:\s+([\d.]+)\s+(.*)")


@dataclass
class Shape:
    """One shape of the sweep: ``rows`` rows of ``length`` queries, the per-step kernels' time and
    the one-launch kernel's by blocks per row (microseconds)."""
    rows: int
    length: int
    per_step_us: float
    one_launch_us: Dict[int, float]


def parse_sweep(text: str) -> Tuple[int, Dict[int, int], List[Shape]]:
    """``(sms, capacity by blocks per row, shapes)`` from ``lloyd_sweep.py``'s output."""
    sms_match = re.search(r"(\d+) SMs", text)
    capacity_match = re.search(r"resident at once, by blocks per row: (.*)", text)
    if sms_match is None or capacity_match is None:
        raise SystemExit("not a lloyd_sweep.py output with --cluster-blocks: its header lines are missing")
    capacity = {int(k): int(v) for k, v in re.findall(r"(\d+): (\d+)", capacity_match.group(1))}
    shapes = []
    for line in text.splitlines():
        match = ONE_LAUNCH_ROW.match(line)
        if match:
            times = {int(k): float(us) for k, us in re.findall(r"(\d+):\s+([\d.]+)", match.group(5))}
            shapes.append(Shape(int(match.group(1)), int(match.group(2)), float(match.group(4)), times))
    if not shapes:
        raise SystemExit("no 'one launch' rows: run lloyd_sweep.py with --cluster-blocks")
    return int(sms_match.group(1)), capacity, shapes


def relative_least_squares(terms: np.ndarray, times: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Coefficients minimising the squared relative error of ``terms @ c`` against ``times``, and
    the relative errors."""
    coefficients, *_ = np.linalg.lstsq(terms / times[:, None], np.ones(len(times)), rcond=None)
    return coefficients, terms @ coefficients / times - 1


ONE_LAUNCH_KEYS = tuple(cuda_kernels.ONE_LAUNCH_LLOYD_US)
PER_STEP_KEYS = ("fixed", "per_query", "per_row")  # PER_STEP_LLOYD_US's factors, in order


@dataclass
class Fit:
    """A model's constants fitted to the sweep, the module's, and the relative errors of both."""
    name: str
    keys: Tuple[str, ...]
    fitted: np.ndarray
    module: np.ndarray
    fitted_errors: np.ndarray
    module_errors: np.ndarray


def _fit(name: str, keys: Tuple[str, ...], module: List[float], terms: np.ndarray, times: np.ndarray) -> Fit:
    fitted, errors = relative_least_squares(terms, times)
    module = np.array(module, dtype=float)
    return Fit(name, keys, fitted, module, errors, terms @ module / times - 1)


def fit_models(sms: int, capacity: Dict[int, int], shapes: List[Shape]) -> List[Fit]:
    """The one-launch model and the per-step models (tensor cores, population counts: those with
    at least 3 points) fitted to the sweep's shapes."""
    model = cuda_kernels.ONE_LAUNCH_LLOYD_US
    points = [(cuda_kernels.one_launch_lloyd_terms(s.rows, s.length, k, capacity[k]), us)
              for s in shapes for k, us in s.one_launch_us.items()]
    fits = [_fit("one-launch kernel", ONE_LAUNCH_KEYS, [model[k] for k in ONE_LAUNCH_KEYS],
                 np.array([t for t, _ in points]), np.array([us for _, us in points]))]
    for tensor_cores in (True, False):
        chosen = [s for s in shapes
                  if (cuda_kernels.lloyd_tensor_core_split(s.rows, s.length, sms) > 0) == tensor_cores]
        if len(chosen) >= 3:
            fits.append(_fit(f"per-step kernels, {'tensor cores' if tensor_cores else 'population counts'}",
                             PER_STEP_KEYS, list(cuda_kernels.PER_STEP_LLOYD_US[tensor_cores]),
                             np.array([cuda_kernels.per_step_lloyd_terms(s.rows, s.length, sms) for s in chosen]),
                             np.array([s.per_step_us for s in chosen])))
    return fits


def rule_against_measured(sms: int, capacity: Dict[int, int], shapes: List[Shape]):
    """Per shape ``(shape, the rule's blocks per row, its measured us or None, fastest blocks, its us)``
    (blocks 0: the kernels launched per step)."""
    rows = []
    for s in shapes:
        measured = {0: s.per_step_us, **s.one_launch_us}
        rule = cuda_kernels.lloyd_cluster_blocks(s.rows, s.length, sms, lambda k: capacity.get(k, 0))
        best = min(measured, key=measured.get)
        rows.append((s, rule, measured.get(rule), best, measured[best]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="a file with lloyd_sweep.py's output (run with --cluster-blocks)")
    args = parser.parse_args()
    sms, capacity, shapes = parse_sweep(Path(args.sweep).read_text())
    for fit in fit_models(sms, capacity, shapes):
        print(f"{fit.name}: {len(fit.fitted_errors)} points")
        for key, value, now in zip(fit.keys, fit.fitted, fit.module):
            print(f"  {key:>10s}  fitted {value:10.4g}   module {now:10.4g}")
        print(f"  relative error: fitted median {np.median(abs(fit.fitted_errors)):.3f} max "
              f"{abs(fit.fitted_errors).max():.3f}; module median {np.median(abs(fit.module_errors)):.3f} max "
              f"{abs(fit.module_errors).max():.3f}")
    print("rows      N  rule  its us  | best  its us  ratio   (blocks per row; 0: launches per step)")
    for s, rule, got, best, best_us in rule_against_measured(sms, capacity, shapes):
        ratio = "-" if got is None else f"{got / best_us:.2f}"
        got_text = "-" if got is None else f"{got:.1f}"
        print(f"{s.rows:4d} {s.length:6d}  {rule:4d} {got_text:>7s}  | {best:4d} {best_us:7.1f}  {ratio:>5s}")


if __name__ == "__main__":
    main()
