"""benchmarks/kernel_resources.py: the launches it records are the ones the op makes (grid,
warps and constexprs, against causal_triton's launch rules), and the launches compile for
sm_90a and get a ptxas report, without a GPU. The script runs in a subprocess without
TRITON_INTERPRET (which conftest.py sets: the interpreter's kernels do not compile)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernel_resources.py"
SIZES = ["--length", "1000", "--window", "64", "--clusters", "20", "--dim", "32", "--groups", "3"]


def run_script(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(SCRIPT), *SIZES, "--json", str(out), *args],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    return result, (json.loads(out.read_text()) if out.exists() else None)


def test_recorded_launches_are_the_ops_launches(tmp_path):
    result, rows = run_script(tmp_path, "--launches-only")
    assert result.returncode == 0, result.stderr
    assert [row["kernel"] for row in rows] == ["_chunk_cluster_sums", "_window_attention_fwd",
                                              "_window_attention_bwd_query", "_summary_grads_scan",
                                              "_window_attention_bwd_key"]
    chunks, groups = -(-1000 // 64), 3
    fwd = rows[1]
    # Windows up to a block: one program per chunk and group; below 128, 4 warps.
    assert fwd["grid"] == [chunks, groups]
    assert fwd["kwargs"]["WINDOW"] == 64 and fwd["kwargs"]["ROWS"] == 64 and fwd["kwargs"]["DIM"] == 32
    assert fwd["kwargs"]["num_warps"] == 4
    assert rows[0]["grid"] == [chunks, groups] and rows[0]["kwargs"]["BLOCK"] == 64


def test_launches_compile_for_hopper_with_a_ptxas_report(tmp_path):
    result, rows = run_script(tmp_path)
    if result.returncode != 0 and "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip(f"Triton came without its ptxas: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr
    assert {row["kernel"] for row in rows} == {"_chunk_cluster_sums", "_window_attention_fwd",
                                               "_window_attention_bwd_query", "_summary_grads_scan",
                                               "_window_attention_bwd_key"}
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["programs_per_sm"] >= 1
        assert row["spill_stores"] >= 0 and row["shared_kib"] >= 0
        assert len(row["sass_sha256"]) == 12
    # The scan is elementwise with a small state: far below the register limit, no spills.
    scan = next(row for row in rows if row["kernel"] == "_summary_grads_scan")
    assert scan["registers"] < 128 and scan["spill_stores"] == 0


def test_the_interpreter_is_refused(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--launches-only"], capture_output=True, text=True,
                            env=env, cwd=ROOT)
    assert result.returncode != 0 and "TRITON_INTERPRET=1" in result.stderr


def test_clustered_launches_cover_the_triton_kernels_of_the_gpu_path(tmp_path):
    result, rows = run_script(tmp_path, "--op", "clustered", "--dropout", "--launches-only")
    assert result.returncode == 0, result.stderr
    assert [row["kernel"] for row in rows] == ["_hash_kernel", "_centroid_fwd_kernel", "_centroid_bwd_kernel",
                                              "_centroid_block_stats_kernel", "_centroid_top_keys_kernel",
                                              "_top_key_summary_kernel", "_exact_fwd_kernel",
                                              "_exact_fwd_kernel",  # grad_out . exact, which the backward takes
                                              "_exact_bwd_kernel",
                                              "_top_key_grads_kernel", "_centroid_grads_kernel",
                                              "_sum_gradients_kernel"]
    centroid_fwd = rows[1]["kwargs"]
    assert centroid_fwd["DROPOUT"] is True and centroid_fwd["DIM"] == 32
    from fairseq_clustered.ops import centroid_triton
    assert centroid_fwd["num_warps"] == centroid_triton.LAUNCH["fwd"]["num_warps"]
