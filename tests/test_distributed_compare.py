"""benchmarks/distributed_compare.py: the loss check and the throughput it reports."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed_compare.py"


def write_log(path, records):
    """A fairseq ``--log-format json --log-interval 1`` log with these train_inner records."""
    with open(path, "w") as log:
        log.write("2026-11-24 06:55:35 | INFO | fairseq_cli.train | training on 1 devices\n")
        for update, (loss, wpb, ups) in enumerate(records, start=1):
            record = {"epoch": 1, "loss": f"{loss:.3f}", "wps": f"{wpb * ups:.1f}", "ups": f"{ups}",
                      "wpb": f"{wpb}", "num_updates": f"{update}"}
            log.write(f"2026-11-24 06:55:36 | INFO | train_inner | {json.dumps(record)}\n")


def compare(tmp_path, single, double, *args):
    write_log(tmp_path / "ws1.log", single)
    write_log(tmp_path / "ws2.log", double)
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "ws1.log"), str(tmp_path / "ws2.log"),
                           "--csv", str(tmp_path / "out.csv"), *args], capture_output=True, text=True)


def test_matching_losses_pass_and_throughput_is_words_over_time(tmp_path):
    single = [(10.0 - 0.1 * i, 1000 + 10 * i, 2.0 + (i % 3)) for i in range(12)]
    double = [(loss * 1.001, wpb, 2 * ups) for loss, wpb, ups in single]
    result = compare(tmp_path, single, double, "--warmup", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    # Brute force: the words of updates 3.. over the sum of their durations 1 / ups.
    words = sum(wpb for _, wpb, _ in single[2:])
    expected = [words / sum(1 / ups for _, _, ups in log[2:]) for log in (single, double)]
    assert f"1 GPU {expected[0]:.0f}, 2 GPUs {expected[1]:.0f}, scaling {expected[1] / expected[0]:.2f}x" \
        in result.stdout
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 1 + len(single)


def test_a_loss_outside_the_tolerance_fails(tmp_path):
    single = [(10.0, 1000, 2.0)] * 12
    double = [(10.0, 1000, 4.0)] * 4 + [(10.5, 1000, 4.0)] + [(10.0, 1000, 4.0)] * 7
    result = compare(tmp_path, single, double, "--tolerance", "0.02")
    assert result.returncode == 1
    assert "OUTSIDE tolerance" in result.stdout


def test_a_log_without_records_is_named(tmp_path):
    (tmp_path / "empty.log").write_text("no records here\n")
    write_log(tmp_path / "ws2.log", [(10.0, 1000, 2.0)] * 3)
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "empty.log"), str(tmp_path / "ws2.log")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "empty.log: no train_inner records" in result.stderr


def test_a_warmup_longer_than_the_run_is_explained(tmp_path):
    records = [(10.0, 1000, 2.0)] * 3
    result = compare(tmp_path, records, records, "--warmup", "5")
    assert result.returncode != 0
    assert "no updates left after the warm-up" in result.stderr
