"""Compare the full and causal clustered runs of ``run.sh``: test bits per character
(``fairseq-eval-lm``), validation curves, and whether they are within 3% of each other.

Reads ``OUT/{full,causal_clustered}/{train.log,eval.log}``; writes ``OUT/curves.png`` and
``OUT/summary.csv`` and prints a table. fairseq reports losses in base 2, so a loss per
character token is bits per character (the newline token included).

Usage: ``python examples/char_lm/compare.py runs/char_lm``
"""

import csv
import json
import re
import sys
from pathlib import Path

VARIANTS = ("full", "causal_clustered")
TOLERANCE = 0.03


def validation_curve(train_log: Path):
    """[(num_updates, valid bits per character)] from a ``--log-format json`` log file."""
    curve = []
    for line in train_log.read_text().splitlines():
        # --log-file holds bare JSON records; the console shows them after "| valid |".
        if '"valid_loss"' not in line:
            continue
        record = json.loads(line[line.index("{"):])
        curve.append((int(float(record["valid_num_updates"])), float(record["valid_loss"])))
    return curve


def test_bits_per_character(eval_log: Path) -> float:
    match = re.search(r"Loss \(base 2\): ([0-9.]+)", eval_log.read_text())
    if match is None:
        raise ValueError(f"no 'Loss (base 2)' line in {eval_log}")
    return float(match.group(1))


def main(out: Path):
    curves = {name: validation_curve(out / name / "train.log") for name in VARIANTS}
    test = {name: test_bits_per_character(out / name / "eval.log") for name in VARIANTS}
    ratio = test["causal_clustered"] / test["full"]
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "test_bpc", "final_valid_bpc", "updates"])
        for name in VARIANTS:
            last = curves[name][-1] if curves[name] else (0, float("nan"))
            writer.writerow([name, f"{test[name]:.4f}", f"{last[1]:.4f}", last[0]])
    print(f"{'variant':<18}{'test bpc':>10}{'last valid bpc':>16}{'updates':>9}")
    for name in VARIANTS:
        last = curves[name][-1] if curves[name] else (0, float("nan"))
        print(f"{name:<18}{test[name]:>10.4f}{last[1]:>16.4f}{last[0]:>9}")
    verdict = "within" if ratio <= 1 + TOLERANCE else "NOT within"
    print(f"causal_clustered / full = {ratio:.4f} ({verdict} {TOLERANCE:.0%})")
    cross = out / "full" / "eval_as_causal_clustered.log"
    if cross.exists():
        cross_bpc = test_bits_per_character(cross)
        print(f"full model evaluated with causal clustered attention: {cross_bpc:.4f} bpc "
              f"({cross_bpc / test['full']:.4f} x its own)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name in VARIANTS:
        if curves[name]:
            updates, bpc = zip(*curves[name])
            axes.plot(updates, bpc, marker="o", label=f"{name} (test {test[name]:.3f})")
    axes.set_xlabel("updates")
    axes.set_ylabel("validation bits per character")
    axes.set_title("Shakespeare character LM")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=120)
    print(f"wrote {out / 'curves.png'} and {out / 'summary.csv'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
