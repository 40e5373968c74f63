"""PyTorch's flash-attention kernel as the CUDA compositions use it.

``flash_forward`` also returns the log-sum-exp of every query row, which the
compositions merge across key blocks or column sets; ``flash_backward`` runs the
kernel's backward from a *given* output and log-sum-exp (those of the whole softmax
the block belongs to), so a forward never has to be run again for its context.
Inputs are ``(batch, heads, length, dim)`` fp16 / bf16 CUDA tensors with a contiguous
last dim; no dropout.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False) -> Tuple[Tensor, Tensor]:
    """``out`` (q's dtype) and ``lse (B, H, Lq)`` fp32. With ``causal`` and ``Lk > Lq`` the
    mask is aligned to the lower right (query ``r`` sees keys ``<= r + Lk - Lq``)."""
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1][..., : q.shape[2]].contiguous()


def flash_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                   causal: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` for ``grad_out``, with the softmax probabilities ``exp(S - lse)`` and
    ``rowsum(grad_out * out)`` taken from the given ``out`` and ``lse``."""
    unused = torch.empty((), dtype=torch.long)  # random-state placeholders: no dropout
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, unused, unused,
        scale=scale)
