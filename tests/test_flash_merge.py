"""Merging attentions over key blocks into the attention over all keys
(``flash.merge_key_splits``, which the centroid attention's split flash forward uses).

Checked against the softmax over all keys computed in float64: without a GPU in Triton's
interpreter on CPU tensors, on a GPU compiled.
"""

import pytest
import torch

from fairseq_clustered.ops import flash
from triton_support import DEVICE, DTYPES, runs_here  # tests/: on the path under pytest


def block_attention(q, k, v, splits):
    """float64 ``(out (B, H splits, L, D), lse (B, H splits, L))`` of each query over each of
    ``splits`` equal key blocks, head ``h``'s block ``s`` at ``h * splits + s``."""
    batch, heads, length, dim = q.shape
    k_s = k.reshape(batch, heads * splits, -1, dim)
    v_s = v.reshape(batch, heads * splits, -1, dim)
    q_s = q.unsqueeze(2).expand(-1, -1, splits, -1, -1).reshape(batch, heads * splits, length, dim)
    logits = q_s @ k_s.transpose(-1, -2) / dim ** 0.5
    return torch.softmax(logits, -1) @ v_s, torch.logsumexp(logits, -1)


@runs_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits,length,dim", [(2, 5, 32), (3, 19, 64), (8, 7, 16)])  # 3: a masked split slot
def test_merge_key_splits_is_the_attention_over_all_keys(dtype, splits, length, dim):
    gen = torch.Generator().manual_seed(splits)
    batch, heads, keys = 2, 3, 24 * splits
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64) for n in (length, keys, keys))
    out_s, lse_s = block_attention(q, k, v, splits)
    # flash's layout: (B, H splits, L, D) views of (B, L, H splits, D) storage
    out_s = out_s.to(dtype).transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)
    out, lse = flash.merge_key_splits(out_s, lse_s.float().to(DEVICE), heads, splits)

    logits = q @ k.transpose(-1, -2) / dim ** 0.5
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, length) and lse.is_contiguous()
    assert (lse.double().cpu() - torch.logsumexp(logits, -1)).abs().max().item() < 1e-5
    # within the rounding of the blocks' outputs to the dtype, and of the sum's one rounding
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    assert (out.double().cpu() - torch.softmax(logits, -1) @ v).abs().max().item() < tol


@runs_here
def test_the_torch_fallback_merges_the_same(monkeypatch):
    """Without Triton the same arithmetic runs as torch ops."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen, dtype=torch.float64) for n in (9, 96, 96))
    out_s, lse_s = block_attention(q, k, v, 4)
    out_s, lse_s = out_s.to(torch.float16).to(DEVICE), lse_s.float().to(DEVICE)
    kernel = flash.merge_key_splits(out_s, lse_s, 2, 4)
    monkeypatch.setattr(flash, "MISSING", "triton is not importable (test)")
    fallback = flash.merge_key_splits(out_s, lse_s, 2, 4)
    torch.testing.assert_close(kernel[1], fallback[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(kernel[0], fallback[0], rtol=0, atol=1e-3)
