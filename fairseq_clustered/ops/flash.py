"""PyTorch's flash-attention kernel as the CUDA compositions use it.

``flash_forward`` also returns the log-sum-exp of every query row, which the
compositions merge across key blocks (:func:`merge_key_splits`) or column sets;
``flash_backward`` runs the kernel's backward from a *given* output and log-sum-exp
(those of the whole softmax the block belongs to), so a forward never has to be run
again for its context.
Inputs are ``(batch, heads, length, dim)`` fp16 / bf16 CUDA tensors with a contiguous
last dim; no dropout.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._triton import MISSING, interpreted, tl, triton


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


def merge_key_splits(out_s: Tensor, lse_s: Tensor, heads: int, splits: int) -> Tuple[Tensor, Tensor]:
    """The attention over all keys from ``splits`` attentions over blocks of them.

    Args:
        out_s: ``(B, H splits, L, D)``, the attention of each key block (head ``h``'s block
            ``s`` at ``h * splits + s``), any strides. lse_s: ``(B, H splits, L)`` fp32, their
            log-sum-exps.

    Returns:
        ``out (B, H, L, D)`` contiguous in ``out_s``'s dtype, ``sum_s exp(lse_s - lse) out_s``
        summed in fp32, and ``lse (B, H, L)`` fp32 contiguous, the log-sum-exp over the blocks.
        One Triton launch where Triton is installed (on CUDA, or in its interpreter), else
        seven torch ops with the same arithmetic.
    """
    batch, _, length, dim = out_s.shape
    if MISSING is not None or out_s.device.type != "cuda" and not interpreted():
        lse_b = lse_s.reshape(batch, heads, splits, length)
        lse = torch.logsumexp(lse_b, dim=2)
        weights = torch.exp(lse_b - lse.unsqueeze(2)).unsqueeze(-1)
        out = (weights * out_s.reshape(batch, heads, splits, length, dim).float()).sum(2).to(out_s.dtype)
        return out, lse
    out = torch.empty(batch, heads, length, dim, dtype=out_s.dtype, device=out_s.device)
    lse = torch.empty(batch, heads, length, dtype=torch.float32, device=out_s.device)
    block_rows = 16
    _merge_key_splits_kernel[(triton.cdiv(batch * heads * length, block_rows),)](
        out_s, lse_s, out, lse, heads, length, splits, batch * heads * length, *out_s.stride(), *lse_s.stride(),
        DIM=dim, BLOCK_D=triton.next_power_of_2(dim), SPLITS=triton.next_power_of_2(splits),
        BLOCK_ROWS=block_rows, num_warps=4,
    )
    return out, lse


if triton is not None:

    @triton.jit
    def _merge_key_splits_kernel(OUT_S, LSE_S, OUT, LSE, heads, length, splits, total, out_b, out_h, out_l, out_d,
                                 lse_b, lse_h, lse_l, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                 SPLITS: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        """Program: ``BLOCK_ROWS`` rows ``(b, h, l)`` of :func:`merge_key_splits`, as torch's
        ``logsumexp`` and the weighted sum over the splits compute them (in fp32)."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        ok = rows < total
        batch = rows // (heads * length)
        head = rows // length % heads
        position = rows % length
        split = tl.arange(0, SPLITS)
        parts = (head * splits)[:, None] + split[None, :]  # (BLOCK_ROWS, SPLITS)
        here = ok[:, None] & (split < splits)[None, :]
        lse_s = tl.load(LSE_S + batch.to(tl.int64)[:, None] * lse_b + parts * lse_h + position[:, None] * lse_l,
                        mask=here, other=float("-inf"))
        largest = tl.max(lse_s, 1)
        lse = largest + tl.log(tl.sum(tl.exp(lse_s - largest[:, None]), 1))
        weights = tl.exp(lse_s - lse[:, None])  # 0 for the masked splits
        feats = tl.arange(0, BLOCK_D)
        rows_at = batch.to(tl.int64)[:, None, None] * out_b + parts[:, :, None].to(tl.int64) * out_h \
            + position.to(tl.int64)[:, None, None] * out_l + feats[None, None, :] * out_d
        parts_out = tl.load(OUT_S + rows_at, mask=here[:, :, None] & (feats < DIM)[None, None, :], other=0.0)
        out = tl.sum(weights[:, :, None] * parts_out.to(tl.float32), 1)
        tl.store(OUT + rows.to(tl.int64)[:, None] * DIM + feats[None, :], out.to(OUT.dtype.element_ty),
                 mask=ok[:, None] & (feats < DIM)[None, :])
        tl.store(LSE + rows, lse, mask=ok)
