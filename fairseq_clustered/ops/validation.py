"""Argument checks for the public ops: one place, clear ``ValueError``s.

Every message names the argument, what was given and what is allowed, so that a
bad configuration fails before any kernel runs (never as a CUDA illegal memory
access deep inside a launch).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

MAX_HASH_BITS = 63
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int_range(name: str, value, low: int, high: Optional[int] = None) -> None:
    """``low <= value (<= high)`` for a Python int (bool is refused)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")


def check_probability(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


def resolve_scale(scale, dim: int) -> float:
    """The logit scale: ``1/sqrt(dim)`` for None, else a positive number."""
    if scale is None:
        return dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise ValueError(f"scale must be a positive float or None (1/sqrt(dim)), got {scale!r}")
    return float(scale)


def dropout_keep_mask(shape, dropout_p: float, generator, device) -> Optional[Tensor]:
    """Bool keep-mask of ``shape`` (True = kept) drawn from ``generator``, moved to ``device``;
    None when ``dropout_p`` is 0. Dropout needs an explicit generator (the global RNG is
    never used)."""
    if dropout_p <= 0.0:
        return None
    if generator is None:
        raise ValueError("dropout_p > 0 needs generator= (a torch.Generator) to draw the dropout mask")
    # One kernel writing the bool mask (uniform draws compared inside it), not an fp32 tensor of
    # draws four times the mask's size written and read again by a comparison.
    keep = torch.empty(shape, dtype=torch.bool, device=generator.device)
    return keep.bernoulli_(1.0 - dropout_p, generator=generator).to(device)


def check_clustering_args(num_clusters, iterations, bits) -> None:
    check_int_range("num_clusters", num_clusters, 1)
    check_int_range("iterations", iterations, 0)
    check_int_range("bits", bits, 1, MAX_HASH_BITS)


def _check_tensor(name: str, tensor, ndim: int, layout: str) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(tensor.shape)}")


def check_padding_mask(name: str, mask: Optional[Tensor], batch: int, length: int, device) -> None:
    """A padding mask is ``(batch, length)`` bool on the attention's device (True = padded)."""
    if mask is None:
        return
    _check_tensor(name, mask, 2, f"(batch={batch}, length={length})")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"{name} must have shape (batch={batch}, length={length}), got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = padded), got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the attention inputs are on {device}")


def _mask_fits(mask, batch: int, length: int, device) -> bool:
    """Whether :func:`check_padding_mask` would accept the tensor ``mask``."""
    return (isinstance(mask, Tensor) and mask.shape == (batch, length) and mask.dtype == torch.bool
            and mask.device == device)


def _attention_inputs_fit(query, key, value, key_padding_mask, query_padding_mask) -> bool:
    """Whether :func:`check_attention_inputs` would accept these, answered with as few tensor
    attribute reads as possible: the checks run at every call of an eager step, whose time below
    8k positions on a GPU is the host's, and the full checks took 4.1-4.2 us of a workstation's CPU
    (about 5x that on the GPU server's) against 1.1-1.8 for this (benchmarks/NOTES.md, twenty-fifth
    session). Inputs it refuses go through the full checks, which say what is wrong."""
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return False
    query_shape, key_shape, value_shape = query.shape, key.shape, value.shape
    if len(query_shape) != 4 or len(key_shape) != 4 or len(value_shape) != 4:
        return False
    dtype, device = query.dtype, query.device
    if dtype not in FLOAT_DTYPES or key.dtype != dtype or value.dtype != dtype:
        return False
    if key.device != device or value.device != device:
        return False
    batch, heads, length, dim = query_shape
    keys = key_shape[2]
    return (key_shape[0] == batch and key_shape[1] == heads and value_shape[0] == batch and value_shape[1] == heads
            and key_shape[3] == dim and value_shape[2] == keys and length >= 1 and keys >= 1
            and (key_padding_mask is None or _mask_fits(key_padding_mask, batch, keys, device))
            and (query_padding_mask is None or _mask_fits(query_padding_mask, batch, length, device)))


def check_attention_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    query_padding_mask: Optional[Tensor],
) -> None:
    """query ``(B, H, N, D)``, key ``(B, H, S, D)``, value ``(B, H, S, Dv)``: same dtype
    and device; masks ``(B, S)`` and ``(B, N)`` bool."""
    if _attention_inputs_fit(query, key, value, key_padding_mask, query_padding_mask):
        return
    _check_tensor("query", query, 4, "(batch, heads, queries, dim)")
    _check_tensor("key", key, 4, "(batch, heads, keys, dim)")
    _check_tensor("value", value, 4, "(batch, heads, keys, value_dim)")
    if query.dtype not in FLOAT_DTYPES:
        raise ValueError(f"query must be float16, bfloat16, float32 or float64, got {query.dtype}")
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dtype != query.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype} but query has {query.dtype}; they must match")
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device} but query is on {query.device}; they must match")
    batch, heads, length, dim = query.shape
    if key.shape[:2] != (batch, heads) or value.shape[:2] != (batch, heads):
        raise ValueError(
            "query, key and value must agree on (batch, heads): got "
            f"{tuple(query.shape[:2])}, {tuple(key.shape[:2])}, {tuple(value.shape[:2])}"
        )
    if key.shape[3] != dim:
        raise ValueError(f"key dim {key.shape[3]} must equal query dim {dim}")
    if value.shape[2] != key.shape[2]:
        raise ValueError(f"value has {value.shape[2]} positions but key has {key.shape[2]}; they must match")
    if length < 1 or key.shape[2] < 1:
        raise ValueError(f"query and key need at least one position, got {length} and {key.shape[2]}")
    check_padding_mask("key_padding_mask", key_padding_mask, batch, key.shape[2], query.device)
    check_padding_mask("query_padding_mask", query_padding_mask, batch, length, query.device)


def check_planes(planes: Tensor, bits: int, dim: int, offsets: Optional[Tensor]) -> None:
    _check_tensor("planes", planes, 2, f"(bits={bits}, dim={dim})")
    if tuple(planes.shape) != (bits, dim):
        raise ValueError(f"planes must have shape (bits={bits}, dim={dim}), got {tuple(planes.shape)}")
    if not planes.is_floating_point():
        raise ValueError(f"planes must be floating point, got {planes.dtype}")
    if offsets is not None:
        _check_tensor("offsets", offsets, 1, f"(bits={bits},)")
        if offsets.shape[0] != bits:
            raise ValueError(f"offsets must have shape (bits={bits},), got {tuple(offsets.shape)}")
