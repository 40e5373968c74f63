"""Triton, where it is installed (CUDA builds of torch ship it; a CPU install need not).

``MISSING`` is None when it imported, else the reason, which the GPU paths built on it
report when they step aside.
"""

import functools
from typing import Optional

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - depends on the install
    triton, tl = None, None
    MISSING = f"triton is not importable ({error})"
else:
    MISSING = None

if triton is not None:

    @triton.jit
    def safe_max(maximum):
        """A softmax's running or row maximum, ready to subtract: -inf (no valid key yet) becomes
        0, so that every term ``exp(-inf - 0)`` is 0 instead of ``exp(-inf + inf)``, NaN."""
        return tl.where(maximum == float("-inf"), 0.0, maximum)

    @triton.jit
    def three_parts(x, dtype: tl.constexpr):
        """fp32 ``x`` as three parts of ``dtype`` (fp16 / bf16), ``hi + mid + lo``: ``x`` rounded,
        the remainder rounded, what is left rounded. Their sum keeps about 24 of ``x``'s bits
        (bf16: 3 x 8), so tensor-core products of the parts, summed in fp32, stand in for an
        fp32 product."""
        hi = x.to(dtype)
        remainder = x - hi.to(tl.float32)
        mid = remainder.to(dtype)
        lo = (remainder - mid.to(tl.float32)).to(dtype)
        return hi, mid, lo

    @triton.jit
    def power_of_two_scale(largest):
        """``(scale, inverse)``: powers of two (so that scaling is exact) with ``largest * scale`` in
        ``[2^14, 2^15)`` for a largest magnitude ``largest`` (fp32 scalar): the top of fp16's range,
        far above its subnormals. Taken from the exponent bits, clamped so that both are normal fp32
        (a zero or tiny ``largest`` gets the largest scale, 2^126)."""
        exponent = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF
        exponent = tl.minimum(tl.maximum(exponent, 15), 254)
        scale = ((268 - exponent) << 23).to(tl.float32, bitcast=True)  # 2^(141 - e), e the biased exponent
        inverse = ((exponent - 14) << 23).to(tl.float32, bitcast=True)  # 2^(e - 141)
        return scale, inverse

    @triton.jit
    def two_scaled_parts(x):
        """fp32 ``x`` as ``(hi, lo, inverse)``: fp16 parts of ``x * scale``, ``scale`` the power of
        two of :func:`power_of_two_scale` for the tile's largest magnitude, and ``inverse = 1 / scale``.
        ``hi + lo`` keeps 22 of ``x``'s bits (2 x 11) where fp16's exponent range alone (5 bits) would
        lose the small ones; products of the parts, summed in fp32 and times the inverses, stand in
        for fp32 products to about 2^-21 of their largest terms."""
        scale, inverse = power_of_two_scale(tl.max(tl.abs(x)))
        scaled = x * scale
        hi = scaled.to(tl.float16)
        lo = (scaled - hi.to(tl.float32)).to(tl.float16)
        return hi, lo, inverse

    try:  # programmatic dependent launch (Triton 3.3 and newer)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # pragma: no cover - depends on the install
        gdc_wait = gdc_launch_dependents = None

    @triton.jit
    def wait_for_prior_kernel(DEPENDENT: tl.constexpr):
        """First in a kernel launched with ``launch_pdl=DEPENDENT`` (:func:`dependent_launch`): wait
        until the kernel before it on the stream has finished and its writes are visible; nothing
        where ``DEPENDENT`` is False. The CUDA kernels' ``wait_for_prior_kernels``
        (``cuda/common.cuh``), which says why and what it saves."""
        if DEPENDENT:
            gdc_wait()

    @triton.jit
    def let_next_kernel_start(DEPENDENT: tl.constexpr):
        """Where a kernel's remaining work is a short tail: the kernel after it may be scheduled (its
        blocks then wait for this one's end); nothing where ``DEPENDENT`` is False."""
        if DEPENDENT:
            gdc_launch_dependents()

else:  # pragma: no cover - depends on the install
    safe_max = three_parts = power_of_two_scale = two_scaled_parts = None
    wait_for_prior_kernel = let_next_kernel_start = None
    gdc_wait = gdc_launch_dependents = None

__all__ = ["triton", "tl", "MISSING", "power_of_two_in", "tiles_unavailable", "dot_precision",
           "interpreted", "dependent_launch", "dependent_launch_options", "dependent_launches_allowed",
           "wait_for_prior_kernel", "let_next_kernel_start", "mask_bytes", "safe_max", "three_parts",
           "power_of_two_scale", "two_scaled_parts"]

MIN_TILE = 16  # tl.dot's smallest tile


def power_of_two_in(value: int, low: int, high: int) -> bool:
    """Whether ``value`` is a power of two in ``low..high`` (tile sizes the kernels take)."""
    return low <= value <= high and value & (value - 1) == 0


def mask_bytes(mask):
    """A bool / integer mask as contiguous uint8 for the kernels: a bool tensor is viewed as bytes
    (a dropout keep mask ``(B, H, C, S)`` is as large as the keys; converting it would be a full
    copy)."""
    import torch

    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8)


def tiles_unavailable(query, value, kernels: str, fp32: bool = False):
    """Why tensor-core tile kernels for fp16 / bf16 (and, with ``fp32``, fp32) operands, named
    ``kernels`` in the reason, cannot take ``query`` and ``value (..., D)``: Triton missing,
    another dtype, or head dims that are not one power of two in 16..128. None when they can."""
    import torch

    if MISSING is not None:
        return MISSING
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if fp32 else ())
    if query.dtype not in dtypes:
        return f"dtype {query.dtype} ({kernels} are for fp16 / bf16{' / fp32' if fp32 else ''})"
    dim = query.shape[-1]
    if value.shape[-1] != dim or not power_of_two_in(dim, MIN_TILE, 128):
        return f"head dim {dim} / value dim {value.shape[-1]}: both must be one power of two in 16..128"
    return None


def dot_precision(dtype, fp32: Optional[str] = None) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``. fp32 operands take ``fp32``
    (for example ``"bf16x6"``: each operand split into three bf16 parts and six bf16 products
    summed, about fp32's accuracy on tensor cores, where Triton's default TF32 keeps 10
    mantissa bits) where this Triton compiles it for CUDA, else ``"ieee"`` (fp32 multiply-adds,
    as in Triton's interpreter, whose products are numpy's fp32). Other dtypes ignore it."""
    import torch

    if dtype != torch.float32 or fp32 is None:
        return "tf32"
    return fp32 if fp32 in _cuda_dot_precisions() else "ieee"


def interpreted() -> bool:
    """Whether kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, on CPU tensors)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def dependent_launch(device) -> bool:
    """Whether the Triton kernels that call :func:`wait_for_prior_kernel` launch on ``device`` as
    programmatic dependents of the kernel before them (``launch_pdl``): compiled (not the
    interpreter) on sm_90 or newer with a Triton that has it, unless ``FAIRSEQ_CLUSTERED_PDL=0``
    (the switch of the CUDA kernels' launches too, ``cuda/common.cuh``, and like them read once per
    device: this runs before every launch of those kernels)."""
    return device.type == "cuda" and _dependent_on(device.index)


@functools.lru_cache(maxsize=None)
def _dependent_on(index: Optional[int]) -> bool:
    """:func:`dependent_launch` for CUDA device ``index`` (an invalid setting raises, and is not kept)."""
    if interpreted() or gdc_wait is None:
        return False
    return dependent_launches_allowed() and _compute_major(index) >= 9


def dependent_launches_allowed() -> bool:
    """``FAIRSEQ_CLUSTERED_PDL``: unset or ``1`` allows programmatic dependent launches, ``0`` turns
    them off (a switch for measuring their gain, and for ruling them out when a result looks wrong)."""
    import os

    setting = os.environ.get("FAIRSEQ_CLUSTERED_PDL", "1")
    if setting not in ("0", "1"):
        raise ValueError(f"FAIRSEQ_CLUSTERED_PDL must be 0 (off) or 1 (on, the default), got {setting!r}")
    return setting == "1"


def dependent_launch_options(device) -> dict:
    """A launch's keyword arguments for a kernel with a ``DEPENDENT`` constexpr that it passes to
    :func:`wait_for_prior_kernel`: that flag and Triton's ``launch_pdl``, both :func:`dependent_launch`."""
    dependent = dependent_launch(device)
    return {"DEPENDENT": dependent, "launch_pdl": dependent}


@functools.lru_cache(maxsize=None)
def _compute_major(index: Optional[int]) -> int:
    """The compute capability's major number of CUDA device ``index`` (a tensor's device has one)."""
    import torch

    return torch.cuda.get_device_capability(index)[0]


def _cuda_dot_precisions() -> tuple:
    """The input precisions this Triton's CUDA backend compiles (none under the interpreter)."""
    if interpreted():
        return ()
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a Triton without the CUDA backend
        return ()
    return tuple(CUDAOptions.allowed_dot_input_precisions)
