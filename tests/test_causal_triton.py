"""The one-kernel Triton path of causal clustered attention (ops/causal_triton.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1) and are checked here against the reference in float32: outputs and
gradients of every block (own chunk, previous chunk, summaries), partial last chunks, a
single chunk, empty and out-of-block clusters, the leak test, and opcheck of the two ops.
On the GPU the same kernels are compiled and checked in test_causal_fused.py (GPU_PATHS).
"""

import os

import pytest
import torch

from fairseq_clustered.ops import causal_clustered_attention, causal_key_clusters
from fairseq_clustered.ops import causal_triton

from test_causal import leaks, random_inputs

interpreted = pytest.mark.skipif(
    causal_triton.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU checks of the Triton kernels need triton and its interpreter (TRITON_INTERPRET=1, set by "
           "conftest.py without a GPU); on a GPU test_causal_fused.py checks the compiled kernels",
)


def output_and_grads(attention, tensors, grad_out):
    inputs = [x.detach().clone().requires_grad_() for x in tensors]
    out = attention(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [x.grad for x in inputs]


@interpreted
@pytest.mark.parametrize("n,window,num_clusters,dim", [
    (16, 16, 3, 16),    # one chunk: own-chunk causal block only
    (40, 16, 20, 32),   # three chunks, the last partial; 20 clusters in a 32-slot block
    (200, 16, 5, 16),   # many chunks, few clusters (large counts)
    (130, 32, 7, 16),   # partial last chunk of a larger window
])
def test_triton_kernels_equal_the_reference(n, window, num_clusters, dim):
    gen = torch.Generator().manual_seed(n)
    q, k, v, grad_out = (torch.randn(2, 2, n, dim, generator=gen) for _ in range(4))
    clusters = torch.randint(-1, num_clusters, (2, 2, n), generator=gen)  # -1: keys of no cluster
    clusters[0, 0, : n // 2] = 0  # one cluster holds many keys, others stay empty for a while
    scale = 0.3

    def reference(a, b, c):
        return causal_clustered_attention(a.double(), b.double(), c.double(), window=window,
                                          num_clusters=num_clusters, clusters=clusters, scale=scale)

    expected = output_and_grads(reference, (q, k, v), grad_out.double())
    got = output_and_grads(
        lambda a, b, c: causal_triton.causal_clustered_attention_triton(a, b, c, clusters, window, num_clusters,
                                                                        scale),
        (q, k, v), grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-4)


@interpreted
def test_triton_kernels_with_chunks_sliced_over_programs(monkeypatch):
    """The forward and key-gradient kernels can give each program a slice of a chunk
    (``LAUNCH[...]["rows"] < window``); same results as whole chunks."""
    monkeypatch.setitem(causal_triton.LAUNCH, "fwd", {"num_warps": 4, "rows": 16})
    monkeypatch.setitem(causal_triton.LAUNCH, "bwd_key", {"num_warps": 4, "rows": 16})
    test_triton_kernels_equal_the_reference(130, 32, 7, 16)
    test_triton_kernels_equal_the_reference(100, 64, 20, 16)


@interpreted
def test_triton_kernels_do_not_leak():
    n, window, num_clusters = 90, 16, 4
    q, k, v = random_inputs(1, 2, n, 16, seed=3)

    def attention(a, b, c, mask):
        clusters = causal_key_clusters(b.detach(), window=window, num_clusters=num_clusters,
                                       generator=torch.Generator().manual_seed(1))
        return causal_triton.causal_clustered_attention_triton(a, b, c, clusters, window, num_clusters, 0.25)

    for position in (5, window + 3, 2 * window + 1, 70):
        assert not leaks(attention, q, k, v, None, position, seed=position), f"leak at position {position}"


@interpreted
@pytest.mark.parametrize("n", [20, 50])
def test_triton_ops_opcheck(n):
    """Schemas, fake kernels (with and without summaries) and the registered autograd."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen).requires_grad_() for _ in range(3))
    clusters = torch.randint(-1, 3, (1, 2, n), generator=gen)
    args = (q, k, v, clusters, 16, 3, 0.3)
    torch.library.opcheck(causal_triton.causal_triton_fwd, args)
    out, lse, keys, values, counts = causal_triton.causal_triton_fwd(*args)
    torch.library.opcheck(causal_triton.causal_triton_bwd,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), clusters, out.detach(),
                           lse, keys, values, counts, 16, 3, 0.3))


def test_triton_path_reasons_off_cuda():
    q = torch.zeros(1, 1, 8, 16, device="meta")
    assert causal_triton.triton_path_unavailable(q, q, None, 0.0, 16, 4) == "not a CUDA tensor"
    assert not causal_triton._power_of_two_in(48, 16, 128)
    assert causal_triton._power_of_two_in(64, 16, 128) and not causal_triton._power_of_two_in(256, 16, 128)
