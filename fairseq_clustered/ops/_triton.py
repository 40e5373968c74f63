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

__all__ = ["triton", "tl", "MISSING", "power_of_two_in"]


def power_of_two_in(value: int, low: int, high: int) -> bool:
    """Whether ``value`` is a power of two in ``low..high`` (tile sizes the kernels take)."""
    return low <= value <= high and value & (value - 1) == 0
