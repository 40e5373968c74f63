"""`python -m fairseq_clustered.info` reports versions and, per kernel, where it runs or why not."""

import os
import subprocess
import sys

import pytest
import torch

from fairseq_clustered.ops import cuda_backend


def test_info_lists_versions_and_every_kernel():
    result = subprocess.run(
        [sys.executable, "-m", "fairseq_clustered.info"], capture_output=True, text=True, check=True
    )
    assert f"torch             {torch.__version__}" in result.stdout
    assert "fairseq " in result.stdout
    from fairseq_clustered.ops import _triton

    expected = _triton.triton.__version__ if _triton.MISSING is None else "triton is not importable"
    assert any(line.startswith("triton ") and expected in line for line in result.stdout.splitlines())
    for name in cuda_backend.KERNELS:
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name))
        assert line.split(None, 1)[1].startswith(("cuda", "reference only (")), line
    graphs = next(line for line in result.stdout.splitlines() if line.startswith("cuda graphs "))
    expected = ("not used (no CUDA kernels)",) if not cuda_backend.load() else ("on: ", "off (")
    assert graphs.split(None, 2)[2].startswith(expected), graphs


def test_info_says_when_the_graph_cache_is_off():
    env = {**os.environ, "FAIRSEQ_CLUSTERED_CUDA_GRAPHS": "0"}
    result = subprocess.run([sys.executable, "-m", "fairseq_clustered.info"], capture_output=True, text=True,
                            check=True, env=env)
    line = next(line for line in result.stdout.splitlines() if line.startswith("cuda graphs "))
    assert ("off (FAIRSEQ_CLUSTERED_CUDA_GRAPHS=0)" if cuda_backend.load() else "not used") in line


def test_status_gives_a_reason_without_kernels():
    status = cuda_backend.status()
    if not cuda_backend.load():
        assert all(reason.startswith("reference only (") and len(reason) > 20 for reason in status.values())


def _extension_importable():
    import importlib.util

    return importlib.util.find_spec("fairseq_clustered._C") is not None


@pytest.mark.skipif(not torch.cuda.is_available() or not _extension_importable(),
                    reason="needs a CUDA GPU and the compiled fairseq_clustered._C")
def test_importing_the_ops_registers_the_cuda_kernels():
    """Users (and the fairseq modules) never call load(): importing the ops must be enough."""
    script = (
        "import torch\n"
        "from fairseq_clustered.ops import custom_ops, cuda_backend\n"
        "assert cuda_backend._loaded is True, cuda_backend._reason\n"
        "codes = torch.randint(0, 2**20, (1, 2, 300), device='cuda')\n"
        "with torch.profiler.profile() as prof:\n"
        "    custom_ops.lloyd_kmeans(codes, None, 10, 3, 20)\n"
        "names = {event.name for event in prof.events()}\n"
        "assert 'aten::argmin' not in names, 'lloyd_kmeans ran the reference on CUDA'\n"
        "print('kernels registered')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "kernels registered" in result.stdout, result.stderr[-2000:]


def test_info_reports_dependent_launches():
    """The "dependent launch" line: on or not used without sm_90 (or without the kernels), off with
    FAIRSEQ_CLUSTERED_PDL=0, and a bad setting named."""
    lines = {}
    for setting in ("1", "0", "maybe"):
        env = {**os.environ, "FAIRSEQ_CLUSTERED_PDL": setting}
        result = subprocess.run([sys.executable, "-m", "fairseq_clustered.info"], capture_output=True, text=True,
                                check=True, env=env)
        lines[setting] = next(line for line in result.stdout.splitlines() if line.startswith("dependent launch "))
    if not cuda_backend.load() or not torch.cuda.is_available():
        assert all("not used (no CUDA kernels)" in line for line in lines.values()), lines
        return
    assert "on: " in lines["1"] or "not used (needs sm_90" in lines["1"], lines
    assert "off (FAIRSEQ_CLUSTERED_PDL=0)" in lines["0"], lines
    assert "FAIRSEQ_CLUSTERED_PDL must be 0 (off) or 1" in lines["maybe"], lines


def test_dependent_launch_setting(monkeypatch):
    """``FAIRSEQ_CLUSTERED_PDL``: unset or 1 allows dependent launches, 0 turns them off, anything else
    is refused with the allowed values; never on CPU tensors (nor in Triton's interpreter)."""
    from fairseq_clustered.ops import _triton

    monkeypatch.delenv("FAIRSEQ_CLUSTERED_PDL", raising=False)
    assert _triton.dependent_launches_allowed()
    for setting, allowed in (("1", True), ("0", False)):
        monkeypatch.setenv("FAIRSEQ_CLUSTERED_PDL", setting)
        assert _triton.dependent_launches_allowed() == allowed
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_PDL", "yes")
    with pytest.raises(ValueError, match=r"FAIRSEQ_CLUSTERED_PDL must be 0 \(off\) or 1 \(on, the default\), got 'yes'"):
        _triton.dependent_launches_allowed()
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_PDL", "1")
    assert not _triton.dependent_launch(torch.device("cpu"))
