"""Where the Triton kernel tests run: compiled on a GPU, else in Triton's interpreter on
CPU tensors (TRITON_INTERPRET=1, set by conftest.py without a GPU; fp16 only there: the
interpreter's bf16 products are not reliable)."""

import os

import pytest
import torch

from fairseq_clustered.ops import _triton

on_gpu = torch.cuda.is_available()
runs_here = pytest.mark.skipif(
    _triton.triton is None or not (on_gpu or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton and a GPU, or Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU)",
)
DEVICE = "cuda" if on_gpu else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if on_gpu else [torch.float16]
