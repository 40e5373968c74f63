"""The Triton kernels: causal clustered attention in one kernel (ops/causal_triton.py) and
tensor-core hashing (ops/hash_triton.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1) and are checked here against the reference in float32: outputs and
gradients of every block (own chunk, previous chunk, summaries), partial last chunks, a
single chunk, empty and out-of-block clusters, the leak test, and opcheck of the two ops;
hash codes bit for bit up to rounding at the thresholds. On the GPU the compiled
attention kernels are checked in test_causal_fused.py (GPU_PATHS), the hash below.
"""

import os

import pytest
import torch

from fairseq_clustered.ops import causal_clustered_attention, causal_key_clusters
from fairseq_clustered.ops.causal import causal_clustered_attention_fwd
from fairseq_clustered.ops import causal_triton, custom_ops
from fairseq_clustered.ops._triton import power_of_two_in

from test_causal import leaks, random_inputs
from test_causal_fused import output_and_grads
from test_cuda_kernels import _fairseq_layout, assert_codes_match_up_to_rounding
from triton_support import DEVICE, DTYPES, runs_here

interpreted = pytest.mark.skipif(
    causal_triton.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU checks of the Triton kernels need triton and its interpreter (TRITON_INTERPRET=1, set by "
           "conftest.py without a GPU); on a GPU test_causal_fused.py checks the compiled kernels",
)


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


def _blocks_of(monkeypatch, rows):
    """Every kernel in blocks of ``rows`` rows: chunks sliced over programs, keys streamed in blocks."""
    for kernel in ("sums", "fwd", "bwd_query", "bwd_key"):
        monkeypatch.setitem(causal_triton.LAUNCH, kernel, {"num_warps": 4, "rows": rows})


@interpreted
@pytest.mark.parametrize("n,window,num_clusters,rows", [
    (40, 16, 20, None),  # three chunks, 20 clusters in a 32-slot block
    (200, 16, 5, None),  # many chunks
    (130, 32, 7, 16),    # two slices per chunk, the last one partial
])
def test_triton_kernels_with_dropout_equal_the_reference(monkeypatch, n, window, num_clusters, rows):
    """Attention dropout: the kernels read the reference's keep-mask (every column kind:
    the previous chunk, the own chunk, the summaries), so the same mask gives the reference's
    output and gradients."""
    if rows is not None:
        _blocks_of(monkeypatch, rows)
    gen = torch.Generator().manual_seed(n + 1)
    q, k, v, grad_out = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(4))
    clusters = torch.randint(-1, num_clusters, (2, 2, n), generator=gen)
    p = 0.3
    keep = torch.rand(2, 2, n, 2 * window + num_clusters, generator=gen) >= p

    def reference(a, b, c):
        return causal_clustered_attention_fwd(a.double(), b.double(), c.double(), clusters, None, keep, window,
                                              num_clusters, 0.3, p)[0]

    expected = output_and_grads(reference, (q, k, v), grad_out.double())
    got = output_and_grads(
        lambda a, b, c: causal_triton.causal_clustered_attention_triton(a, b, c, clusters, window, num_clusters, 0.3,
                                                                        keep, p),
        (q, k, v), grad_out)
    without = causal_triton.causal_clustered_attention_triton(q, k, v, clusters, window, num_clusters, 0.3)
    assert not torch.allclose(got[0], without)  # the mask is used
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("n,window,num_clusters,dim", [
    (130, 32, 7, 16),   # two blocks per chunk, the last chunk's second block partial
    (100, 64, 20, 16),  # four blocks per chunk
    (200, 64, 5, 32),   # the last chunk (192..199) holds one partial block and three past the end
])
def test_triton_kernels_in_blocks_smaller_than_the_window(monkeypatch, n, window, num_clusters, dim):
    """Windows larger than a block (as 256 on the GPU, in blocks of 128): each program takes
    a slice of a chunk and the keys stream through in blocks; the same results as the
    reference, gradients included (the summary gradients summed over the slices)."""
    _blocks_of(monkeypatch, 16)
    test_triton_kernels_equal_the_reference(n, window, num_clusters, dim)


@interpreted
@pytest.mark.parametrize("rows", [None, 16])
def test_triton_kernels_do_not_leak(monkeypatch, rows):
    if rows is not None:
        _blocks_of(monkeypatch, rows)
    n, window, num_clusters = 90, 16 if rows is None else 32, 4
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
    """Schemas, fake kernels (with and without summaries, with and without dropout) and the
    registered autograd."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen).requires_grad_() for _ in range(3))
    clusters = torch.randint(-1, 3, (1, 2, n), generator=gen)
    for keep, p in ((None, 0.0), (torch.rand(1, 2, n, 2 * 16 + 3, generator=gen) >= 0.25, 0.25)):
        args = (q, k, v, clusters, 16, 3, 0.3, keep, p)
        torch.library.opcheck(causal_triton.causal_triton_fwd, args)
        out, lse, keys, values, counts = causal_triton.causal_triton_fwd(*args)
        torch.library.opcheck(causal_triton.causal_triton_bwd,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), clusters, out.detach(),
                               lse, keys, values, counts, 16, 3, 0.3, keep, p))


def _layout_run(attention, q, k, v, grad_out, layouts):
    """Output and input gradients of ``attention`` with q, k, v passed contiguous ('c'), as
    fairseq's views ('f'), or all three as views of one packed ``(N, B, 3 H D)`` projection
    ('ppp': shared strides, not dense); the inputs as passed."""
    if layouts == "ppp":
        batch, heads, length, dim = q.shape
        packed = torch.cat([x.permute(2, 0, 1, 3).reshape(length, batch, heads * dim) for x in (q, k, v)], -1)
        packed = packed.detach().requires_grad_()
        views = [packed[..., i * heads * dim:(i + 1) * heads * dim].view(length, batch, heads, dim).permute(1, 2, 0, 3)
                 for i in range(3)]
    else:
        views = [(_fairseq_layout(x) if layout == "f" else x.clone()).detach().requires_grad_()
                 for x, layout in zip((q, k, v), layouts)]
    out = attention(*views)
    grads = torch.autograd.grad(out, views, grad_out)
    return out.detach(), grads, views


def _check_layouts(attention, q, k, v, grad_out, exact):
    """fairseq's layout for all three inputs: the output and the gradients come back in it
    (the queries' strides) with the values of contiguous inputs. Mixed layouts (contiguous
    copies inside) and views of one packed projection (read through their strides, results
    dense in their order) give the same values too."""
    out, grads, _ = _layout_run(attention, q, k, v, grad_out, "ccc")
    for layouts in ("fff", "fcf", "ppp"):
        got_out, got_grads, views = _layout_run(attention, q, k, v, grad_out, layouts)
        for a, b in zip((got_out, *got_grads), (out, *grads)):
            torch.testing.assert_close(a, b, **({"atol": 0, "rtol": 0} if exact else {}))
        if layouts != "fcf":
            expected = custom_ops.dense_strides_like(views[0], views[0].shape[-1])
            assert got_out.stride() == expected and all(g.stride() == expected for g in got_grads)
        if layouts == "fff":
            assert got_out.stride() == views[0].stride()


@interpreted
@pytest.mark.parametrize("n,window,rows", [(90, 16, None), (130, 32, 16)])
def test_triton_kernels_read_and_write_fairseq_layout(monkeypatch, n, window, rows):
    """The kernels read q, k, v and the incoming gradient through their strides and write
    the output and the gradients in the queries' layout (no transposing copies around the op)."""
    if rows is not None:
        _blocks_of(monkeypatch, rows)
    gen = torch.Generator().manual_seed(n)
    q, k, v, grad_out = (torch.randn(2, 3, n, 16, generator=gen) for _ in range(4))
    clusters = torch.randint(-1, 5, (2, 3, n), generator=gen)
    grad_out = grad_out.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # as a model's gradient comes

    def attention(a, b, c):
        return causal_triton.causal_clustered_attention_triton(a, b, c, clusters, window, 5, 0.3)

    _check_layouts(attention, q, k, v, grad_out, exact=False)


@pytest.mark.skipif(not torch.cuda.is_available() or causal_triton.triton is None, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("window,n", [(128, 1000), (256, 2100)])
def test_fairseq_layout_gpu(window, n):
    """The public function on the GPU (eager path, graph cache) in fairseq's layout: the same
    bits as on contiguous inputs, results in the queries' layout."""
    gen = torch.Generator().manual_seed(n)
    q, k, v, grad_out = (torch.randn(2, 4, n, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(4))
    grad_out = grad_out.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    planes = torch.randn(63, 64, generator=gen).to("cuda")

    def attention(a, b, c):
        return causal_clustered_attention(a, b, c, window=window, num_clusters=64, planes=planes)

    for _ in range(3):  # the graph cache captures a signature on its second call
        _check_layouts(attention, q, k, v, grad_out, exact=True)


def test_triton_path_reasons_off_cuda():
    q = torch.zeros(1, 1, 8, 16, device="meta")
    assert causal_triton.triton_path_unavailable(q, q, None, 0.0, 16, 4) == "not a CUDA tensor"
    assert not power_of_two_in(48, 16, 128)
    assert power_of_two_in(64, 16, 128) and not power_of_two_in(256, 16, 128)


# ------------------------------------------------------------------ tensor-core hashing


def hash_inputs(bits, dim, n, dtype, device):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, n, dim, generator=gen).to(device, dtype)
    return x, torch.randn(bits, dim, generator=gen).to(device), (torch.randn(bits, generator=gen) * 0.1).to(device)


@interpreted  # fp16 and fp32: Triton's interpreter gets bf16 products wrong (the GPU tests cover bf16)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits,dim,n", [(63, 64, 300), (16, 32, 129), (1, 16, 5)])
def test_triton_hash_matches_the_reference(bits, dim, n, dtype):
    from fairseq_clustered.ops import hash_triton, reference

    x, planes, offsets = hash_inputs(bits, dim, n, dtype, "cpu")
    assert hash_triton.triton_hash_unavailable(x) is None
    expected = reference.hash_codes_ref(x, planes, offsets)
    assert_codes_match_up_to_rounding(hash_triton.hash_codes_triton(x, planes, offsets), expected, x, planes, offsets)
    # Non-contiguous rows (a transposed view with the feature dim still contiguous).
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(hash_triton.hash_codes_triton(x_t, planes, offsets),
                       hash_triton.hash_codes_triton(x, planes, offsets))


@runs_here
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_hash_of_bf16_planes_skips_only_zero_products(dtype):
    """``draw_hash_planes``' planes are bf16 values: a half-precision program hashes them with one
    product, skipping the products of the planes' zero ``mid`` and ``lo`` parts. Oracles: the
    reference (within rounding of the threshold), and the same planes with one plane off bf16's
    grid, which makes every program take all three products: the other planes' bits are the same
    bit for bit."""
    from fairseq_clustered.ops import draw_hash_planes, hash_triton, reference

    x, _, offsets = hash_inputs(63, 64, 300, dtype, DEVICE)
    planes = draw_hash_planes(63, 64, torch.Generator().manual_seed(5), device=DEVICE)
    assert torch.equal(planes, planes.to(torch.bfloat16).float())
    codes = hash_triton.hash_codes_triton(x, planes, offsets)
    assert_codes_match_up_to_rounding(codes, reference.hash_codes_ref(x, planes, offsets), x, planes, offsets)
    off_grid = planes.clone()
    off_grid[62] += off_grid[62].abs() * 2.0 ** -12  # below bf16's precision: a remainder of its own
    assert not torch.equal(off_grid[62], off_grid[62].to(torch.bfloat16).float())
    others = (1 << 62) - 1
    assert torch.equal(hash_triton.hash_codes_triton(x, off_grid, offsets) & others, codes & others)


@interpreted
@pytest.mark.parametrize("launch", [(64, 3, 4), (128, 2, 8), (32, 1, 2)])
def test_triton_hash_launch_settings_give_the_same_codes(launch):
    """Rows per tile, tiles per program and warps change only which program hashes a vector (tiles
    past the last vector are masked): the codes equal those of the module's settings."""
    from fairseq_clustered.ops import hash_triton

    x, planes, offsets = hash_inputs(63, 64, 300, torch.float16, "cpu")
    assert torch.equal(hash_triton.hash_codes_triton(x, planes, offsets, launch),
                       hash_triton.hash_codes_triton(x, planes, offsets))


def test_triton_hash_reasons():
    from fairseq_clustered.ops import _triton, hash_triton

    if hash_triton.MISSING is not None:
        assert hash_triton.triton_hash_unavailable(torch.zeros(1, 1, 2, 16, dtype=torch.bfloat16)) == hash_triton.MISSING
        return
    if not _triton.interpreted():  # compiled kernels: CUDA tensors only
        assert "cpu" in hash_triton.triton_hash_unavailable(torch.zeros(1, 1, 2, 16, dtype=torch.bfloat16))
        if not torch.cuda.is_available():
            return
    device = "cpu" if _triton.interpreted() else "cuda"

    def why(*shape, dtype=torch.float32):
        return hash_triton.triton_hash_unavailable(torch.zeros(*shape, dtype=dtype, device=device))

    assert why(1, 1, 2, 16) is None and why(1, 1, 2, 256, dtype=torch.bfloat16) is None
    assert "float64" in why(1, 1, 2, 16, dtype=torch.float64)
    assert "16..128 (fp32)" in why(1, 1, 2, 256)
    assert "dim 40" in why(1, 1, 2, 40, dtype=torch.bfloat16)
    assert "contiguous" in hash_triton.triton_hash_unavailable(
        torch.zeros(1, 1, 16, 2, dtype=torch.bfloat16, device=device).transpose(-1, -2))
    rows, tiles, _ = hash_triton.default_launch(torch.bfloat16)
    longest = hash_triton.MAX_GRID_Y * rows * tiles
    one_vector = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16, device=device)
    assert hash_triton.triton_hash_unavailable(one_vector.expand(1, 1, longest, 16)) is None
    assert f"{longest + 1} vectors per row" in hash_triton.triton_hash_unavailable(one_vector.expand(1, 1, longest + 1, 16))


@pytest.mark.skipif(not torch.cuda.is_available() or causal_triton.triton is None, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_triton_hash_matches_the_reference_gpu(dtype, dim):
    """Tensor-core hashing (and the CUDA kernel it replaces for half precision) against the
    reference, bits differing only within rounding of the threshold."""
    from fairseq_clustered.ops import cuda_backend, hash_triton, reference

    x, planes, offsets = hash_inputs(63, dim, 4099, dtype, "cuda")
    expected = reference.hash_codes_ref(x, planes, offsets)
    assert_codes_match_up_to_rounding(hash_triton.hash_codes_triton(x, planes, offsets), expected, x, planes, offsets)
    if cuda_backend.load():
        codes = cuda_backend.extension().hash_codes(x, planes, offsets)
        assert_codes_match_up_to_rounding(codes, expected, x, planes, offsets)
