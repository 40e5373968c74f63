"""examples/char_lm/compare.py: the bits per character it reads, their ratios to the
reference run and the 3% verdicts, on synthetic fairseq logs with known values."""

import csv
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "char_lm" / "compare.py"


def write_run(prefix: Path, valid_curve, test_bpc):
    """``prefix_train.log`` with fairseq's JSON validation records (each written twice, as
    fairseq does in its log file and on the console) and ``prefix_eval.log``."""
    with open(f"{prefix}_train.log", "w") as log:
        for updates, bpc in valid_curve:
            record = {"epoch": 1, "valid_loss": f"{bpc:.3f}", "valid_num_updates": f"{updates}"}
            log.write(json.dumps(record) + "\n")
            log.write(f"2026-11-30 20:30:00 | INFO | valid | {json.dumps(record)}\n")
    with open(f"{prefix}_eval.log", "w") as log:
        log.write(f"INFO:fairseq_cli.eval_lm:Loss (base 2): {test_bpc:.4f}, Perplexity: 3.94\n")


def run_compare(tmp_path, *runs):
    args = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")]
    for label, prefix in runs:
        args += ["--run", label, str(prefix)]
    return subprocess.run(args, capture_output=True, text=True)


def test_ratios_and_verdicts_against_the_first_run(tmp_path):
    write_run(tmp_path / "full", [(100, 3.0), (200, 2.5), (300, 2.0)], 2.0)
    write_run(tmp_path / "close", [(100, 3.1), (200, 2.55), (300, 2.05)], 2.04)  # +2.5%, +2%
    write_run(tmp_path / "far", [(100, 3.2), (200, 2.7), (300, 2.1)], 2.02)  # valid +5%, test +1%
    result = run_compare(tmp_path, ("full", tmp_path / "full"), ("close", tmp_path / "close"),
                         ("far", tmp_path / "far"))
    assert result.returncode == 0, result.stderr
    rows = {row["variant"]: row for row in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    assert rows["full"]["test_ratio"] == "1.0000" and rows["full"]["updates"] == "300"
    assert rows["close"]["final_valid_bpc"] == "2.0500" and rows["close"]["valid_ratio"] == "1.0250"
    assert rows["far"]["valid_ratio"] == "1.0500" and rows["far"]["test_ratio"] == "1.0100"
    assert "close / full, valid: 1.0250 (within 3%)" in result.stdout
    assert "far / full, valid: 1.0500 (NOT within 3%)" in result.stdout
    assert "far / full, test: 1.0100 (within 3%)" in result.stdout
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_one_run_is_refused(tmp_path):
    write_run(tmp_path / "full", [(100, 3.0)], 2.0)
    result = run_compare(tmp_path, ("full", tmp_path / "full"))
    assert result.returncode != 0 and "at least two runs" in result.stderr


def test_a_run_sh_output_folder(tmp_path):
    """The form run.sh calls: OUT/{full,causal_clustered}/{train.log,eval.log}."""
    for name, bpc in (("full", 2.0), ("causal_clustered", 2.1)):
        (tmp_path / name).mkdir()
        write_run(tmp_path / name / "x", [(250, bpc + 0.5), (500, bpc)], bpc)
        for kind in ("train", "eval"):
            (tmp_path / name / f"x_{kind}.log").rename(tmp_path / name / f"{kind}.log")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "causal_clustered / full, test: 1.0500 (NOT within 3%)" in result.stdout
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "curves.png").exists()
