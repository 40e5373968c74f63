"""The experimental centroid log-sum-exp + top-k kernel (ops/topk_triton.py).

On the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py without a
GPU): against an fp64 computation of the same logits. On a GPU: the improved variant with
the kernel switched on, against the fp64 reference (the flash path, taken without padding).
"""

import os

import pytest
import torch

from fairseq_clustered.ops import topk_triton

interpreted = pytest.mark.skipif(
    topk_triton.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU checks of the Triton kernel need triton and its interpreter (TRITON_INTERPRET=1, set by "
           "conftest.py without a GPU)",
)


@interpreted  # fp16: Triton's interpreter gets bf16 products wrong
@pytest.mark.parametrize("rows,clusters,keys,dim,top_k", [
    (2, 5, 50, 16, 3),      # keys not a multiple of the key block
    (1, 70, 70, 32, 16),    # two centroid blocks, the second partial
    (3, 4, 20, 16, 20),     # fewer keys than the key block; every key is a top key
    (1, 3, 40, 64, 1),
])
def test_kernel_matches_fp64_logits(rows, clusters, keys, dim, top_k):
    gen = torch.Generator().manual_seed(keys)
    qbar = torch.randn(rows, clusters, dim, generator=gen)
    key = torch.randn(rows, keys, dim, generator=gen).half()
    lse, top = topk_triton.centroid_logsumexp_topk(qbar, key, top_k, 0.3)
    logits = torch.bmm(qbar.double(), key.double().transpose(1, 2)) * 0.3
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)
    # Random logits have no near-ties at ~1e-5: the same keys in the same order.
    assert torch.equal(top, torch.topk(logits, top_k, -1).indices)


@interpreted
def test_ties_go_to_the_lower_index():
    key = torch.ones(1, 40, 16, dtype=torch.float16)
    lse, top = topk_triton.centroid_logsumexp_topk(torch.ones(1, 2, 16), key, 5, 1.0)
    assert top.tolist() == [[[0, 1, 2, 3, 4]] * 2]
    torch.testing.assert_close(lse, torch.full((1, 2), 16.0 + torch.log(torch.tensor(40.0)).item()))


def test_reasons_and_errors():
    key = torch.zeros(1, 8, 16, device="meta")
    if topk_triton.MISSING is None:
        assert "dtype" in topk_triton.triton_topk_unavailable(key, 4)
        assert "head dim 48" in topk_triton.triton_topk_unavailable(torch.zeros(1, 8, 48, device="meta").half(), 4)
        assert "top-k 200" in topk_triton.triton_topk_unavailable(key.half(), 200)
    with pytest.raises(ValueError, match="centroid_logsumexp_topk"):
        topk_triton.centroid_logsumexp_topk(torch.zeros(1, 2, 16), key, 4, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("length,dim", [(97, 32), (1025, 64), (4099, 128)])
def test_improved_with_the_kernel_gpu(monkeypatch, dtype, length, dim):
    import test_cuda_kernels

    if dtype not in test_cuda_kernels.DTYPES:
        pytest.skip(f"{dtype} is not among the kernel tests' dtypes")
    monkeypatch.setattr(topk_triton, "ENABLED", True)
    test_cuda_kernels.test_improved_gpu(dtype, length, dim, pad=False)
