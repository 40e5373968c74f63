"""`python -m fairseq_clustered.info` reports versions and, per kernel, where it runs or why not."""

import subprocess
import sys

import torch

from fairseq_clustered.ops import cuda_backend


def test_info_lists_versions_and_every_kernel():
    result = subprocess.run(
        [sys.executable, "-m", "fairseq_clustered.info"], capture_output=True, text=True, check=True
    )
    assert f"torch             {torch.__version__}" in result.stdout
    assert "fairseq " in result.stdout
    for name in cuda_backend.KERNELS:
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name))
        assert line.split(None, 1)[1].startswith(("cuda", "reference only (")), line


def test_status_gives_a_reason_without_kernels():
    status = cuda_backend.status()
    if not cuda_backend.load():
        assert all(reason.startswith("reference only (") and len(reason) > 20 for reason in status.values())
