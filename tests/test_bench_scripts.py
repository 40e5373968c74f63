"""benchmarks/bench_lm.py and bench_model.py: the exact baselines compute fairseq's attention,
and the CPU smoke runs produce their tables."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_lm_sdpa_baseline_equals_fairseq_attention():
    """The ``sdpa`` variant (SDPA with is_causal, no future mask built) gives the logits of
    the ``full`` variant (fairseq's MultiheadAttention with its future mask), same weights."""
    import bench_lm

    outputs = {}
    for variant in ("full", "sdpa"):
        torch.manual_seed(0)
        decoder, dictionary = bench_lm.build_decoder(variant, 48, 40, small=True, window=8, num_clusters=4)
        decoder = decoder.double().eval()
        if variant == "sdpa":
            assert decoder.buffered_future_mask(torch.zeros(48, 2, 64)) is None
        tokens = torch.randint(dictionary.nspecial, len(dictionary), (2, 48),
                               generator=torch.Generator().manual_seed(1))
        outputs[variant] = decoder(tokens)[0]
    torch.testing.assert_close(outputs["sdpa"], outputs["full"], rtol=1e-9, atol=1e-9)


def test_lm_clustered_variant_uses_the_causal_clustered_attention():
    import bench_lm

    decoder, _ = bench_lm.build_decoder("causal_clustered", 64, 40, small=True, window=8, num_clusters=4)
    attentions = decoder.self_attentions()
    assert attentions and all(a.attention == "causal_clustered" and a.window == 8 and a.num_clusters == 4
                              for a in attentions)
    assert all(a.dropout_module.p == 0.0 for a in attentions)


@pytest.mark.parametrize("script,variants", [("bench_lm.py", ["full", "sdpa", "causal_clustered"]),
                                             ("bench_model.py", ["fairseq", "sdpa", "clustered", "improved"])])
def test_cpu_smoke_run_writes_its_table(tmp_path, script, variants):
    out = tmp_path / "rows.csv"
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), "--cpu-smoke", "--csv", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [(int(r["length"]), r["variant"]) for r in rows] == [(n, v) for n in (64, 128) for v in variants]
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    for length in (64, 128):  # the fastest exact variant is the reference of its length
        exact = [float(r["speedup_vs_best_exact"]) for r in rows
                 if int(r["length"]) == length and r["variant"] in variants[:2]]
        assert max(exact) == 1.0


def test_top_keys_sweep_reads_its_settings_and_needs_a_gpu():
    """benchmarks/top_keys_sweep.py: settings are NAME=INTEGER pairs of the selection's knobs
    (anything else is refused, naming the knobs); without a GPU it says so and exits."""
    import top_keys_sweep
    assert top_keys_sweep.parse_settings("default; SUB_BLOCKS=4096,num_warps=8") == [
        ("default", {}), ("SUB_BLOCKS=4096,num_warps=8", {"SUB_BLOCKS": 4096, "num_warps": 8})]
    with pytest.raises(SystemExit, match="SUB_BLOCKS"):
        top_keys_sweep.parse_settings("BLOCKS=3")
    with pytest.raises(SystemExit, match="NAME=INTEGER"):
        top_keys_sweep.parse_settings("TILE=big")
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, str(BENCHMARKS / "top_keys_sweep.py")], capture_output=True,
                                text=True)
        assert result.returncode != 0 and "needs a CUDA GPU" in result.stderr


@pytest.mark.parametrize("script,session", [("centroid_backward.py", "sixteenth"),
                                            ("cluster_order_sweep.py", "nineteenth"),
                                            ("centroid_sweep.py", "twentieth"),
                                            ("centroid_grid_ab.py", "twentieth"),
                                            ("lloyd_phases.py", "twenty-ninth"),
                                            ("memory_kernels.py", "thirtieth")])
def test_gpu_benchmarks_need_a_gpu(script, session):
    """benchmarks/centroid_backward.py, cluster_order_sweep.py, centroid_sweep.py,
    centroid_grid_ab.py, lloyd_phases.py and memory_kernels.py: without a GPU each says so and exits."""
    if torch.cuda.is_available():
        pytest.skip(f"has a GPU: the script runs there (benchmarks/NOTES.md, {session} session)")
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--lengths", "1024"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "needs a CUDA GPU" in result.stderr


def test_memory_kernels_reads_its_hash_settings():
    """benchmarks/memory_kernels.py: ``--hash-launch`` takes ROWS,TILES,WARPS settings and refuses
    anything else, naming the option, before it looks for a GPU."""
    import memory_kernels
    assert memory_kernels.parse_launches("128,1,4; 256,2,8;") == [(128, 1, 4), (256, 2, 8)]
    for bad, message in (("128,1", "ROWS,TILES,WARPS"), ("100,1,4", "power of two"), ("128,0,4", "TILES >= 1"),
                         ("128,1,3", "WARPS")):
        with pytest.raises(SystemExit, match="--hash-launch.*" + message):
            memory_kernels.parse_launches(bad)
    result = subprocess.run([sys.executable, str(BENCHMARKS / "memory_kernels.py"), "--hash-launch", "64,x,4"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "--hash-launch" in result.stderr


def test_lloyd_phases_stamps_the_kernel_as_it_is():
    """benchmarks/lloyd_phases.py: every phase stamp lands in lloyd_cluster_kernel of the current
    cuda/clustering.cu, once and in the kernel's order, with phase 5 (the update) closed just
    before the second cluster barrier; a kernel without one of the stamped lines is refused,
    naming the line."""
    import lloyd_phases
    source = (BENCHMARKS.parent / "cuda" / "clustering.cu").read_text()
    stamped = lloyd_phases.stamped_source(source)
    kernel = stamped[stamped.index("lloyd_cluster_kernel(RowInfo info"):stamped.index("PYBIND11_MODULE")]
    positions = [kernel.index(f"STAMP({k});") for k in range(8)]
    assert all(kernel.count(f"STAMP({k});") == 1 for k in range(8))
    assert kernel.index("STAMPS_BEGIN;") < positions[0] and positions == sorted(positions)
    assert "STAMP(5);\n" + lloyd_phases.BEFORE_BARRIER_2 + "STAMP(6);" in kernel
    assert kernel.index("STAMPS_END;") > positions[7] and "m.def(\"phase_cycles\"" in stamped
    missing = source.replace("      __syncthreads();  // the round's membership bits set\n", "")
    with pytest.raises(ValueError, match="the round's membership bits set"):
        lloyd_phases.stamped_source(missing)


def test_lloyd_phases_splits_the_update():
    """lloyd_phases.py --split-update: the update's two more stamps (8 after the counter loads, 9
    after the new code) land once each inside the update, after barrier 1's stamp 4 and before
    stamp 5, in that order; without the option the kernel gets neither."""
    import lloyd_phases
    source = (BENCHMARKS.parent / "cuda" / "clustering.cu").read_text()
    plain = lloyd_phases.stamped_source(source)
    assert "STAMP(8);" not in plain and "STAMP(9);" not in plain
    split = lloyd_phases.stamped_source(source, split_update=True)
    kernel = split[split.index("lloyd_cluster_kernel(RowInfo info"):split.index("PYBIND11_MODULE")]
    assert all(kernel.count(f"STAMP({k});") == 1 for k in range(10))
    assert kernel.index("STAMP(4);") < kernel.index("STAMP(8);") < kernel.index("STAMP(9);") < kernel.index("STAMP(5);")


def test_bench_attention_refuses_graph_with_dropout():
    """benchmarks/bench_attention.py: ``--graph`` with ``--dropout`` is refused before any work, naming
    both options (a whole-step capture cannot draw the clustered ops' dropout masks; torch raised
    "CUDA generator not in capture mode" mid-run on the GPU, twentieth session)."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_attention.py"), "--device", "cpu",
                             "--dropout", "0.1", "--graph", "--lengths", "256"], capture_output=True, text=True)
    assert result.returncode == 2 and "--graph" in result.stderr and "--dropout" in result.stderr


@pytest.mark.parametrize("option", ["--profile", "--profile-forward"])
def test_bench_attention_profiles_only_on_cuda(option):
    """benchmarks/bench_attention.py: the kernel profiles are refused on the CPU before any work,
    naming the option (torch's profiler lists CUDA kernels; the run used to fail at its first
    synchronisation after timing everything)."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_attention.py"), "--device", "cpu",
                             option, "256", "--lengths", "256"], capture_output=True, text=True)
    assert result.returncode == 2 and option in result.stderr and "--device cuda" in result.stderr



def test_host_layers_cpu_times_the_cache_hit_path():
    """benchmarks/host_layers_cpu.py on the CPU: a time for each mode, and in the ``cache`` mode every
    step replays its two (stand-in) graphs, so the graph cache's hit path is what it times."""
    calls = 20
    run = subprocess.run([sys.executable, str(BENCHMARKS / "host_layers_cpu.py"), "--calls", str(calls),
                          "--profile", "cache"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    times = {line.split()[0]: float(line.split()[1]) for line in lines
             if line.split()[:1] in (["memoised"], ["cache"], ["autograd"])}
    assert set(times) == {"memoised", "cache", "autograd"} and all(t > 0 for t in times.values())
    replays, graphs = next((int(line.split()[1]), int(line.split()[4])) for line in lines
                           if line.strip().startswith("(cache:"))
    assert graphs == 2 and replays >= 2 * calls * 8, run.stdout
    assert any("_replay" in line for line in lines), "the profile does not show the cache's replays"


def test_bench_attention_keeps_rows_measured_before_a_failure(tmp_path, monkeypatch):
    """benchmarks/bench_attention.py writes its CSV after every row: a method that fails at the second
    length (as a CUDA error did mid-table on the GPU, twenty-fourth session) leaves the first length's
    rows on disk, and the error still ends the run."""
    import bench_attention

    measure = bench_attention.measure

    def failing_at_512(args, name, fn, q, k, v, repeats):
        if name == "clustered" and q.shape[2] == 512:
            raise RuntimeError("simulated failure")
        return measure(args, name, fn, q, k, v, repeats)

    monkeypatch.setattr(bench_attention, "measure", failing_at_512)
    out = tmp_path / "table"
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--device", "cpu", "--lengths", "256,512",
                                      "--methods", "sdpa,clustered", "--out", str(out)])
    with pytest.raises(RuntimeError, match="simulated failure"):
        bench_attention.main()
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["n"], row["method"]) for row in rows] == [("256", "sdpa"), ("256", "clustered"), ("512", "sdpa")]
    assert all(float(row["fwdbwd_ms"]) > 0 for row in rows)
