"""Test-session setup shared by every test module.

Without a GPU, Triton kernels (ops/causal_triton.py) can still run: Triton's interpreter
executes them on CPU tensors with numpy. It is chosen by TRITON_INTERPRET=1, which
Triton reads when a kernel is decorated, i.e. before any test module imports the ops, so
it is set here. With a GPU nothing changes and the kernels compile for it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
