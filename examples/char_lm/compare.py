"""Compare character-LM runs: test bits per character (``fairseq-eval-lm``), validation
curves, and whether each run is within 3% of the first (the full-attention reference).

Two ways to name the runs:

* ``python examples/char_lm/compare.py OUT``: the ``full`` and ``causal_clustered`` runs
  of ``run.sh`` (``OUT/{full,causal_clustered}/{train.log,eval.log}``); writes
  ``OUT/curves.png`` and ``OUT/summary.csv``.
* ``python examples/char_lm/compare.py --out DIR --run LABEL PREFIX [--run LABEL PREFIX ...]``:
  runs kept as ``PREFIX_train.log`` and ``PREFIX_eval.log`` (as in ``results_*/``), the
  first being the reference; writes ``DIR/curves.png`` and ``DIR/summary.csv``.

fairseq reports losses in base 2, so a loss per character token is bits per character
(the newline token included).
"""

import argparse
import csv
import json
import re
from pathlib import Path
from typing import List, NamedTuple, Tuple

TOLERANCE = 0.03


class Run(NamedTuple):
    label: str
    curve: List[Tuple[int, float]]  # (updates, validation bits per character)
    test_bpc: float

    @property
    def last_valid(self) -> Tuple[int, float]:
        return self.curve[-1] if self.curve else (0, float("nan"))


def validation_curve(train_log: Path):
    """[(num_updates, valid bits per character)] from a ``--log-format json`` log file, one
    point per update count (fairseq repeats a record in its log file and on the console)."""
    points = {}
    for line in train_log.read_text().splitlines():
        # --log-file holds bare JSON records; the console shows them after "| valid |".
        if '"valid_loss"' not in line:
            continue
        record = json.loads(line[line.index("{"):])
        points[int(float(record["valid_num_updates"]))] = float(record["valid_loss"])
    return sorted(points.items())


def test_bits_per_character(eval_log: Path) -> float:
    match = re.search(r"Loss \(base 2\): ([0-9.]+)", eval_log.read_text())
    if match is None:
        raise ValueError(f"no 'Loss (base 2)' line in {eval_log}")
    return float(match.group(1))


def load(label: str, train_log: Path, eval_log: Path) -> Run:
    return Run(label, validation_curve(train_log), test_bits_per_character(eval_log))


def summarise(runs: List[Run], out: Path) -> List[dict]:
    """Rows of ``summary.csv`` (written to ``out``): each run's test and last validation bpc
    and their ratios to the first run's, printed as a table with the 3% verdicts."""
    reference = runs[0]
    rows = []
    for run in runs:
        updates, valid = run.last_valid
        rows.append({"variant": run.label, "test_bpc": f"{run.test_bpc:.4f}",
                     "test_ratio": f"{run.test_bpc / reference.test_bpc:.4f}",
                     "final_valid_bpc": f"{valid:.4f}",
                     "valid_ratio": f"{valid / reference.last_valid[1]:.4f}", "updates": updates})
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    width = max(len(run.label) for run in runs) + 2
    print(f"{'run':<{width}}{'test bpc':>10}{'x ref':>8}{'last valid bpc':>16}{'x ref':>8}{'updates':>9}")
    for row in rows:
        print(f"{row['variant']:<{width}}{row['test_bpc']:>10}{row['test_ratio']:>8}{row['final_valid_bpc']:>16}"
              f"{row['valid_ratio']:>8}{row['updates']:>9}")
    for row in rows[1:]:
        for what in ("test", "valid"):
            ratio = float(row[f"{what}_ratio"])
            verdict = "within" if ratio <= 1 + TOLERANCE else "NOT within"
            print(f"{row['variant']} / {reference.label}, {what}: {ratio:.4f} ({verdict} {TOLERANCE:.0%})")
    return rows


def plot(runs: List[Run], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4))
    for run in runs:
        if run.curve:
            updates, bpc = zip(*run.curve)
            axes.plot(updates, bpc, marker="o", markersize=3, label=f"{run.label} (test {run.test_bpc:.3f})")
    axes.set_xlabel("updates")
    axes.set_ylabel("validation bits per character")
    axes.set_title("Shakespeare character LM (2048-character contexts)")
    axes.set_ylim(top=min(3.0, axes.get_ylim()[1]))
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=120)
    print(f"wrote {out / 'curves.png'} and {out / 'summary.csv'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", type=Path, help="OUT of run.sh (full and causal_clustered)")
    parser.add_argument("--run", nargs=2, action="append", metavar=("LABEL", "PREFIX"), default=[],
                        help="a run kept as PREFIX_train.log and PREFIX_eval.log; the first is the reference")
    parser.add_argument("--out", type=Path, help="where --run's summary.csv and curves.png go")
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (not args.run):
        parser.error("give either OUT (a run.sh output folder) or --run LABEL PREFIX (two or more), not both")
    if args.run_dir is not None:
        out = args.run_dir
        runs = [load(name, out / name / "train.log", out / name / "eval.log") for name in ("full", "causal_clustered")]
    else:
        if len(args.run) < 2 or args.out is None:
            parser.error("--run needs at least two runs (the first is the reference) and --out DIR")
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        runs = [load(label, Path(prefix + "_train.log"), Path(prefix + "_eval.log")) for label, prefix in args.run]
    summarise(runs, out)
    cross = out / "full" / "eval_as_causal_clustered.log"
    if args.run_dir is not None and cross.exists():
        cross_bpc = test_bits_per_character(cross)
        print(f"full model evaluated with causal clustered attention: {cross_bpc:.4f} bpc "
              f"({cross_bpc / runs[0].test_bpc:.4f} x its own)")
    plot(runs, out)


if __name__ == "__main__":
    main()
