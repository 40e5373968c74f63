"""The GPU paths of causal clustered attention (ops/causal_fused.py, ops/causal_triton.py).

On CUDA, causal clustered attention without key padding or dropout runs either as one
Triton kernel (``causal_triton``) or as three flash-attention calls merged by
log-sum-exp, the summaries' log-count offsets carried in extra feature columns
(``causal_fused``). The flash composition's layout is checked on the CPU against the
reference, exactly in float64 (the Triton kernels' CPU checks, under Triton's
interpreter, are in test_causal_triton.py). On the GPU, both paths and the summary
kernels (per-chunk cluster sums, codebook assignment) are checked against the CPU
reference, bit-reproducibility and the leak test included.
"""

import warnings

import pytest
import torch

from fairseq_clustered.ops import causal_clustered_attention, causal_key_clusters, cuda_backend
from fairseq_clustered.ops import causal as causal_ops
from fairseq_clustered.ops import causal_fused, causal_triton

from test_causal import exact_causal, leaks, random_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The two GPU paths, called directly (the public function picks the Triton one when it can).
GPU_PATHS = {"triton": causal_triton.causal_clustered_attention_triton,
             "flash": causal_fused.causal_clustered_attention_fused}


def gpu_path(path, q, window, num_clusters):
    """The attention function of ``path``; skips when the path does not take these inputs."""
    if path == "triton":
        why_not = causal_triton.triton_path_unavailable(q, q, None, 0.0, window, num_clusters)
    else:
        why_not = causal_fused.fused_path_unavailable(q, q, None, 0.0, window)
    if why_not is not None:
        pytest.skip(f"the {path} path does not take these inputs: {why_not}")
    return GPU_PATHS[path]


needs_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_backend.load()),
    reason="needs a CUDA GPU and the compiled extension fairseq_clustered._C",
)


def clusters_for(k, window, num_clusters, seed=0):
    return causal_key_clusters(k.detach().cpu().float(), window=window, num_clusters=num_clusters,
                               generator=torch.Generator().manual_seed(seed)).to(k.device)


def output_and_grads(attention, tensors, grad_out):
    inputs = [x.detach().clone().requires_grad_() for x in tensors]
    out = attention(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [x.grad for x in inputs]


# ------------------------------------------------------------------ CPU: the layout


@pytest.mark.parametrize("n,window,num_clusters,dim,value_dim", [
    (1, 1, 2, 8, 8), (5, 1, 2, 8, 8), (37, 4, 3, 16, 16), (65, 64, 5, 8, 8), (161, 16, 12, 40, 24), (200, 8, 30, 5, 9),
])
def test_fused_layout_equals_the_reference_in_float64(n, window, num_clusters, dim, value_dim):
    """Same function as the reference: the block layout, the lower-right mask, the offsets
    split over three columns and the missing chunk -1, to float64 rounding."""
    gen = torch.Generator().manual_seed(n)
    q, k = (torch.randn(2, 3, n, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, n, value_dim, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, 3, n, value_dim, generator=gen, dtype=torch.float64)
    clusters = clusters_for(k, window, num_clusters)
    scale = dim ** -0.5
    expected = output_and_grads(
        lambda a, b, c: causal_clustered_attention(a, b, c, window=window, num_clusters=num_clusters,
                                                   clusters=clusters), (q, k, v), grad_out)
    got = output_and_grads(
        lambda a, b, c: causal_fused.causal_clustered_attention_fused(a, b, c, clusters, window, num_clusters, scale),
        (q, k, v), grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_offsets_survive_half_precision():
    """hi + mid + lo in bf16 reproduce log(n) / scale to fp32 precision (one bf16 number
    would be off by up to 2**-9 relative, i.e. ~0.2 nats at n = 60000)."""
    counts = torch.tensor([1.0, 2.0, 3.0, 1000.0, 60000.0, 0.0])
    parts = causal_fused._summary_offsets(counts, scale=0.125, dtype=torch.bfloat16)
    assert parts.shape == (6, causal_fused.OFFSET_PARTS) and parts.dtype == torch.bfloat16
    total = parts.float().sum(-1)
    expected = torch.where(counts > 0, counts.clamp(min=1).log() / 0.125, torch.tensor(-8000.0))
    torch.testing.assert_close(total, expected, atol=0, rtol=1e-6)
    assert (parts[:5, 0].float() - expected[:5]).abs().max() > 1e-3  # one part alone would not do


def test_chunk_cluster_sums_against_a_loop():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 23, 5, generator=gen)
    clusters = torch.randint(-1, 4, (2, 3, 23), generator=gen)
    sums = causal_fused.chunk_cluster_sums_ref(x, clusters, 6, 4)
    expected = torch.zeros(2, 3, 4, 4, 5)
    for b in range(2):
        for h in range(3):
            for n in range(23):
                if clusters[b, h, n] >= 0:
                    expected[b, h, n // 6, clusters[b, h, n]] += x[b, h, n]
    torch.testing.assert_close(sums, expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_chunk_cluster_sums_opcheck(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 19, 8, generator=gen).to(device)
    clusters = torch.randint(-1, 5, (2, 2, 19), generator=gen).to(device)
    torch.library.opcheck(causal_fused.chunk_cluster_sums_op, (x, clusters, 4, 5))


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64),
                                          pytest.param("cuda", torch.bfloat16, marks=needs_cuda)])
@pytest.mark.parametrize("n", [9, 40])
def test_fused_ops_opcheck(device, dtype, n):
    """Schemas, fake kernels (with and without summaries) and the registered autograd."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    clusters = torch.randint(-1, 3, (1, 2, n), generator=gen).to(device)
    torch.library.opcheck(causal_fused.causal_fused_fwd, (q, k, v, clusters, 4, 3, 0.3))
    out, lse, keys, values = causal_fused.causal_fused_fwd(q, k, v, clusters, 4, 3, 0.3)
    grad = torch.randn_like(out)
    torch.library.opcheck(causal_fused.causal_fused_bwd,
                          (grad, q.detach(), k.detach(), v.detach(), clusters, out.detach(), lse.detach(),
                           keys.detach(), values.detach(), 4, 3, 0.3))


def test_fused_path_is_taken_exactly_where_documented():
    q = torch.zeros(1, 1, 8, 8, device="meta")
    assert causal_fused.fused_path_unavailable(q, q, None, 0.0, 4) == "not a CUDA tensor"
    if torch.cuda.is_available():
        q = torch.zeros(1, 1, 8, 8, device="cuda", dtype=torch.bfloat16)
        assert causal_fused.fused_path_unavailable(q, q, None, 0.0, 4) is None
        mask = torch.zeros(1, 8, dtype=torch.bool, device="cuda")
        assert "key_padding_mask" in causal_fused.fused_path_unavailable(q, q, mask, 0.0, 4)
        assert "dropout" in causal_fused.fused_path_unavailable(q, q, None, 0.1, 4)
        assert "float64" in causal_fused.fused_path_unavailable(q.double(), q, None, 0.0, 4)
        assert "float32" in causal_fused.fused_path_unavailable(q.float(), q, None, 0.0, 4)
        assert "head dims" in causal_fused.fused_path_unavailable(q[..., :6], q[..., :6], None, 0.0, 4)


# ------------------------------------------------------------------ GPU: the kernels


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunk_cluster_sums_kernel_matches_and_is_bit_reproducible(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 1031, 72, generator=gen).to("cuda", dtype)
    clusters = torch.randint(-1, 37, (2, 3, 1031), generator=gen).cuda()
    got = causal_fused.chunk_cluster_sums_op(x, clusters, 128, 37)
    expected = causal_fused.chunk_cluster_sums_ref(x.cpu().float(), clusters.cpu(), 128, 37)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(got, causal_fused.chunk_cluster_sums_op(x, clusters, 128, 37))


@needs_kernels
def test_codebook_assignment_kernel_matches_the_reference():
    """Nearest codebook entry with ties to the lowest id (few bits: many ties)."""
    gen = torch.Generator().manual_seed(6)
    for bits in (6, 62):
        codes = torch.randint(0, 2**bits, (2, 3, 777), generator=gen)
        codebook = torch.randint(0, 2**bits, (2, 3, 50), generator=gen)
        expected = causal_ops._assign_to_codebook(codes, codebook, None, bits)
        got = cuda_backend.extension().codebook_assign(codes.cuda(), codebook.cuda())
        assert torch.equal(got.cpu(), expected)


@needs_kernels
def test_causal_key_clusters_kernel_matches_the_reference():
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 2**40, (2, 3, 700), generator=gen)
    mask = torch.arange(700)[None, :] < torch.tensor([[0], [33]])  # left padding in row 1
    for window, num_clusters in ((8, 5), (100, 37), (128, 100)):
        expected = causal_ops.causal_key_clusters_ref(codes, mask, window, num_clusters, 10, 40)
        got = causal_ops.causal_key_clusters_op(codes.cuda(), mask.cuda(), window, num_clusters, 10, 40)
        assert torch.equal(got.cpu(), expected)


@needs_cuda
@pytest.mark.parametrize("path", GPU_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,window,num_clusters,dim", [(300, 32, 10, 64), (1025, 64, 20, 32), (517, 128, 100, 128),
                                                       (4099, 128, 100, 64), (1300, 256, 100, 64)])
def test_gpu_path_matches_the_cpu_reference(path, dtype, n, window, num_clusters, dim):
    """Output and gradients on the GPU against the fp32 CPU reference, within 3x the error
    of half-precision SDPA causal attention against fp32."""
    q, k, v = random_inputs(2, 4, n, dim, seed=n)
    grad_out = torch.randn(2, 4, n, dim, generator=torch.Generator().manual_seed(6))
    clusters = clusters_for(k, window, num_clusters)
    attention = gpu_path(path, q.to("cuda", dtype), window, num_clusters)

    def reference(a, b, c):
        return causal_clustered_attention(a, b, c, window=window, num_clusters=num_clusters, clusters=clusters)

    expected = output_and_grads(reference, (q, k, v), grad_out)
    got = [x.float().cpu() for x in output_and_grads(
        lambda a, b, c: attention(a, b, c, clusters.cuda(), window, num_clusters, dim ** -0.5),
        [x.to("cuda", dtype) for x in (q, k, v)], grad_out.to("cuda", dtype))]
    sdpa32 = output_and_grads(exact_causal, (q, k, v), grad_out)
    sdpa_half = [x.float().cpu() for x in output_and_grads(
        exact_causal, [x.to("cuda", dtype) for x in (q, k, v)], grad_out.to("cuda", dtype))]

    def relative(a, b):
        return ((a - b).norm() / b.norm()).item()

    for a, b, a_sdpa, b_sdpa in zip(got, expected, sdpa_half, sdpa32):
        assert relative(a, b) < 3 * relative(a_sdpa, b_sdpa) + 1e-3


@needs_cuda
@pytest.mark.parametrize("path", GPU_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,window", [(256, 128), (100, 64), (1, 1), (300, 8), (250, 16)])
def test_gpu_path_is_exact_causal_when_no_summary_is_needed(path, dtype, n, window):
    q, k, v = random_inputs(2, 3, n, 64, seed=3, dtype=dtype, device="cuda")
    if n > 2 * window:  # one cluster per key: summaries of single keys, log(count) = 0
        clusters, num_clusters = torch.arange(n, device="cuda").expand(2, 3, n).contiguous(), n
    else:
        clusters, num_clusters = torch.full((2, 3, n), -1, device="cuda"), 7
    attention = gpu_path(path, q, window, num_clusters)
    out = attention(q, k, v, clusters, window, num_clusters, 0.125)
    torch.testing.assert_close(out, exact_causal(q, k, v), atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.parametrize("path", GPU_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,window,num_clusters", [(600, 64, 20), (1000, 128, 100), (97, 8, 5),
                                                    (97, 16, 5), (1100, 256, 50)])
def test_gpu_path_does_not_leak(path, dtype, n, window, num_clusters):
    """The leak test on each GPU path, key clustering included: outputs up to i
    bit-identical, zero gradients after i, at random positions (and in the first chunks,
    where the codebook is fitted)."""
    q, k, v = random_inputs(1, 4, n, 64, seed=n, dtype=dtype, device="cuda")
    gen = torch.Generator().manual_seed(n)
    positions = sorted(set(torch.randint(0, n - 1, (3,), generator=gen).tolist()) | {window + 3, 2 * window + 1})
    attention = gpu_path(path, q, window, num_clusters)

    def clustered(a, b, c, mask):
        clusters = causal_key_clusters(b.detach(), window=window, num_clusters=num_clusters,
                                       generator=torch.Generator(device="cuda").manual_seed(1))
        return attention(a, b, c, clusters, window, num_clusters, 0.125)

    for position in positions:
        if position < n - 1:
            assert not leaks(clustered, q, k, v, None, position, seed=position), f"leak at position {position}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,window,num_clusters", [(1025, 64, 20), (1300, 256, 64), (4099, 128, 100)])
def test_triton_path_with_dropout_matches_the_cpu_reference(dtype, n, window, num_clusters):
    """Attention dropout on the Triton path: the reference's keep-mask gives the fp32 CPU
    reference's output and gradients, within 3x the error of half-precision SDPA."""
    q, k, v = random_inputs(2, 4, n, 64, seed=n)
    gen = torch.Generator().manual_seed(7)
    grad_out = torch.randn(2, 4, n, 64, generator=gen)
    keep = torch.rand(2, 4, n, 2 * window + num_clusters, generator=gen) >= 0.1
    clusters = clusters_for(k, window, num_clusters)

    def reference(a, b, c):
        return causal_ops.causal_clustered_attention_fwd(a, b, c, clusters, None, keep, window, num_clusters,
                                                         0.125, 0.1)[0]

    expected = output_and_grads(reference, (q, k, v), grad_out)
    got = [x.float().cpu() for x in output_and_grads(
        lambda a, b, c: causal_triton.causal_clustered_attention_triton(a, b, c, clusters.cuda(), window,
                                                                        num_clusters, 0.125, keep.cuda(), 0.1),
        [x.to("cuda", dtype) for x in (q, k, v)], grad_out.to("cuda", dtype))]
    sdpa32 = output_and_grads(exact_causal, (q, k, v), grad_out)
    sdpa_half = [x.float().cpu() for x in output_and_grads(
        exact_causal, [x.to("cuda", dtype) for x in (q, k, v)], grad_out.to("cuda", dtype))]
    for a, b, a_sdpa, b_sdpa in zip(got, expected, sdpa_half, sdpa32):
        assert ((a - b).norm() / b.norm()).item() < 3 * ((a_sdpa - b_sdpa).norm() / b_sdpa.norm()).item() + 1e-3


@needs_cuda
def test_public_function_takes_the_triton_path_with_dropout(monkeypatch):
    """With attention dropout the public function runs the Triton kernels, not the
    reference, and a seed repeats its result (graphs off: every call reaches the kernels)."""
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "0")
    q, k, v = random_inputs(1, 2, 700, 64, seed=3, dtype=torch.bfloat16, device="cuda")
    assert causal_triton.triton_path_unavailable(q, q, None, 0.1, 64, 10) is None
    calls = []
    real = causal_triton.forward
    monkeypatch.setattr(causal_triton, "forward", lambda *args: calls.append(args) or real(*args))

    def run(seed):
        return causal_clustered_attention(q, k, v, window=64, num_clusters=10, dropout_p=0.1,
                                          generator=torch.Generator("cuda").manual_seed(seed))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        first, again, other = run(0), run(0), run(1)
    assert len(calls) == 3 and all(call[-2] is not None and call[-1] == 0.1 for call in calls)
    assert torch.equal(first, again) and not torch.equal(first, other)


@needs_cuda
def test_public_function_takes_the_triton_path_on_cuda(monkeypatch):
    q, k, v = random_inputs(1, 2, 300, 64, seed=2, dtype=torch.bfloat16, device="cuda")
    assert causal_triton.triton_path_unavailable(q, q, None, 0.0, 64, 10) is None
    calls = []
    real = causal_triton.forward
    monkeypatch.setattr(causal_triton, "forward", lambda *args: calls.append(args) or real(*args))
    causal_clustered_attention(q, k, v, window=64, num_clusters=10, generator=torch.Generator("cuda").manual_seed(0))
    assert len(calls) == 1
    assert "window 48" in causal_triton.triton_path_unavailable(q, q, None, 0.0, 48, 10)
    assert causal_triton.triton_path_unavailable(q, q, None, 0.0, 256, 10) is None  # in blocks of 128
    assert "window 512" in causal_triton.triton_path_unavailable(q, q, None, 0.0, 512, 10)
    assert "head dim 40" in causal_triton.triton_path_unavailable(q[..., :40], q[..., :40], None, 0.0, 64, 10)
    assert "num_clusters 300" in causal_triton.triton_path_unavailable(q, q, None, 0.0, 64, 300)


def _public_output_and_grads(q, k, v, grad_out, clusters, window, num_clusters):
    planes = torch.randn(63, q.shape[-1], generator=torch.Generator().manual_seed(9)).cuda()
    return output_and_grads(
        lambda a, b, c: causal_clustered_attention(a, b, c, window=window, num_clusters=num_clusters, planes=planes,
                                                   clusters=clusters),
        (q, k, v), grad_out)


@needs_kernels
@pytest.mark.parametrize("given_clusters", [False, True])
@pytest.mark.parametrize("n,window", [(1000, 64), (200, 128)])  # (200, 128): no summary, nothing to cluster
def test_eager_path_equals_the_custom_ops_bit_for_bit(monkeypatch, given_clusters, n, window):
    """In eager mode on CUDA the public function calls the kernels through ops/eager.py, the
    key clustering in the attention's composition, replayed from a CUDA graph from the third
    call on: outputs and gradients are the custom ops' path's, bit for bit, on every call."""
    from fairseq_clustered.ops import eager
    num_clusters = 20
    q, k, v = random_inputs(2, 3, n, 64, seed=n, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn_like(q)
    clusters = clusters_for(k, window, num_clusters) if given_clusters else None
    monkeypatch.setattr(eager, "implementations", lambda query: None)
    expected = _public_output_and_grads(q, k, v, grad_out, clusters, window, num_clusters)
    monkeypatch.undo()
    graphs = cuda_backend.graph_cache()
    replays = graphs.replays
    for call in range(3):
        got = _public_output_and_grads(q, k, v, grad_out, clusters, window, num_clusters)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
            assert torch.equal(a, b), f"{name} differs on call {call}"
    assert graphs.replays > replays, "the eager path was not replayed from a graph"


@needs_kernels
def test_public_function_does_not_leak_on_cuda():
    """The leak test through the public function (eager path, key clustering and graph
    replays included), bf16, at random positions."""
    n, window, num_clusters = 700, 64, 16
    q, k, v = random_inputs(1, 4, n, 64, seed=11, dtype=torch.bfloat16, device="cuda")
    planes = torch.randn(63, 64, generator=torch.Generator().manual_seed(2)).cuda()

    def attention(a, b, c, mask):
        return causal_clustered_attention(a, b, c, mask, window=window, num_clusters=num_clusters, planes=planes)

    positions = torch.randint(0, n - 1, (4,), generator=torch.Generator().manual_seed(3)).tolist()
    for position in positions + [2 * window + 5]:
        assert not leaks(attention, q, k, v, None, position, seed=position), f"leak at position {position}"


@needs_cuda
@pytest.mark.parametrize("path", GPU_PATHS)
def test_gpu_path_under_torch_compile(path):
    n, window, num_clusters = 520, 64, 12
    q, k, v = random_inputs(2, 2, n, 64, seed=1, dtype=torch.bfloat16, device="cuda")
    clusters = clusters_for(k, window, num_clusters)
    attention = gpu_path(path, q, window, num_clusters)

    def run(a, b, c):
        return attention(a, b, c, clusters, window, num_clusters, 0.125)

    expected = output_and_grads(run, (q, k, v), torch.ones_like(q))
    got = output_and_grads(torch.compile(run, fullgraph=True), (q, k, v), torch.ones_like(q))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.parametrize("path", GPU_PATHS)
def test_gpu_path_in_a_cuda_graph(path):
    """Forward and backward captured in a CUDA graph and replayed on new inputs equal an
    eager run (no host synchronisation, no allocation outside the graph's pool)."""
    n, window, num_clusters = 700, 64, 12
    q, k, v = random_inputs(2, 2, n, 64, seed=4, dtype=torch.bfloat16, device="cuda")
    clusters = clusters_for(k, window, num_clusters)
    attention = gpu_path(path, q, window, num_clusters)
    static = [x.clone().requires_grad_() for x in (q, k, v)]
    grad_out = torch.randn_like(q)

    def step():
        for x in static:
            x.grad = None
        out = attention(*static, clusters, window, num_clusters, 0.125)
        out.backward(grad_out)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: compiles the Triton kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    fresh = random_inputs(2, 2, n, 64, seed=5, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for x, y in zip(static, fresh):
            x.copy_(y)
    graph.replay()
    expected = output_and_grads(lambda a, b, c: attention(a, b, c, clusters, window, num_clusters, 0.125),
                                fresh, grad_out)
    for a, b in zip([static_out] + [x.grad for x in static], expected):
        if path == "triton":  # no atomics anywhere: bit-identical
            assert torch.equal(a, b)
        else:  # flash attention's backward accumulates dq with atomics
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
