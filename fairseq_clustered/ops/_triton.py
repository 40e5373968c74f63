"""Triton, where it is installed (CUDA builds of torch ship it; a CPU install need not).

``MISSING`` is None when it imported, else the reason, which the GPU paths built on it
report when they step aside.
"""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - depends on the install
    triton, tl = None, None
    MISSING = f"triton is not importable ({error})"
else:
    MISSING = None

__all__ = ["triton", "tl", "MISSING", "power_of_two_in", "half_precision_tiles_unavailable"]

MIN_TILE = 16  # tl.dot's smallest tile


def power_of_two_in(value: int, low: int, high: int) -> bool:
    """Whether ``value`` is a power of two in ``low..high`` (tile sizes the kernels take)."""
    return low <= value <= high and value & (value - 1) == 0


def half_precision_tiles_unavailable(query, value, kernels: str):
    """Why fp16 / bf16 tile kernels (named ``kernels`` in the reason) cannot take ``query`` and
    ``value (..., D)``: Triton missing, another dtype, or head dims that are not one power of
    two in 16..128. None when they can."""
    import torch

    if MISSING is not None:
        return MISSING
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {query.dtype} ({kernels} are for fp16 / bf16)"
    dim = query.shape[-1]
    if value.shape[-1] != dim or not power_of_two_in(dim, MIN_TILE, 128):
        return f"head dim {dim} / value dim {value.shape[-1]}: both must be one power of two in 16..128"
    return None
