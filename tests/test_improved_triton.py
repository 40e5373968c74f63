"""The improved variant's exact top-key products in Triton (ops/improved_triton.py).

Checked against a brute-force computation in float64 (each query's softmax over its
cluster's top keys, gradients by autograd): without a GPU in Triton's interpreter on
CPU tensors (fp16: the interpreter's bf16 products are not reliable), on a GPU compiled,
in bf16 and fp16. The whole improved op on the GPU, which uses these kernels, is checked
against the reference in test_cuda_kernels.py.
"""

import pytest
import torch

from fairseq_clustered.ops import improved_triton
from fairseq_clustered.ops.cuda_kernels import _segments
from triton_support import DEVICE, DTYPES, runs_here  # tests/: on the path under pytest


def problem(length, keys, dim, num_clusters, top_k, dtype, seed):
    """Random inputs with some empty clusters, one large one and 1 in 10 queries in none
    (padded: cluster -1); top keys distinct per cluster."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2
    q, k, v, grad_out = (torch.randn(1, rows, n, dim, generator=gen).to(DEVICE, dtype)
                         for n in (length, keys, keys, length))
    assignments = torch.randint(0, num_clusters - 2, (1, rows, length), generator=gen)  # the last two empty
    assignments[..., : length // 3] = 0  # one cluster larger than a block of members
    assignments[..., ::10] = -1
    assignments = assignments.to(DEVICE)
    top = torch.stack([torch.randperm(keys, generator=gen)[:top_k] for _ in range(rows * num_clusters)])
    top = top.reshape(rows, num_clusters, top_k).to(DEVICE)
    mass = torch.rand(rows, num_clusters, generator=gen).to(DEVICE)
    rest = torch.randn(rows, num_clusters, dim, generator=gen).to(DEVICE)
    grad_centroids = torch.randn(rows, num_clusters, dim, generator=gen).to(DEVICE)
    return q, k, v, grad_out, assignments, top, mass, rest, grad_centroids


def key_masks(top, keys, dropout_p, seed):
    """For one batch entry whose heads are ``top``'s rows: a key padding mask ``(1, S)`` with
    every third key padded and also every top key of the first row's first cluster (a cluster
    whose top keys are all padded gets zeros), and a dropout keep mask ``(1, H, C, S)``."""
    gen = torch.Generator().manual_seed(seed)
    rows, num_clusters, _ = top.shape
    padded = torch.arange(keys) % 3 == 1
    padded[top[0, 0].cpu()] = True
    keep = torch.rand(1, rows, num_clusters, keys, generator=gen) >= dropout_p
    return padded[None].to(DEVICE), keep.to(DEVICE)


def top_key_masks(top, key_padding_mask, keep, dropout_p):
    """-> (valid (rows, C, K) bool, dropout factors (rows, C, K) float64) of the top keys, for
    masks of one batch entry (as :func:`key_masks`), each None for none."""
    rows, num_clusters, top_k = top.shape
    valid = torch.ones(top.shape, dtype=torch.bool, device=top.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask[0][top]
    drop = torch.ones(top.shape, dtype=torch.float64, device=top.device)
    if keep is not None:
        drop = keep.reshape(rows, num_clusters, -1).gather(-1, top).double() / (1 - dropout_p)
    return valid, drop


def brute_force_exact(q, k, v, assignments, top, scale, top_valid=None, top_drop=None):
    """exact_i = softmax_t(scale q_i . k_t) z_t v_t over the top keys of i's cluster, float64:
    the softmax over the valid ones (``top_valid (rows, C, K)``; zeros where none is), ``z_t``
    the dropout factors ``top_drop (rows, C, K)`` (1 where None)."""
    rows = top.shape[0]
    q, k, v = (x.double().reshape(rows, -1, x.shape[-1]) for x in (q, k, v))
    clusters = assignments.reshape(rows, -1).clamp(min=0)  # padded queries: masked by the caller
    per_query = lambda t: t.gather(1, clusters[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    top_of_query = per_query(top)  # (rows, N, K)
    k_top = k.gather(1, top_of_query.reshape(rows, -1, 1).expand(-1, -1, k.shape[-1])).reshape(*top_of_query.shape, -1)
    v_top = v.gather(1, top_of_query.reshape(rows, -1, 1).expand(-1, -1, v.shape[-1])).reshape(*top_of_query.shape, -1)
    logits = scale * torch.einsum("rnd,rnkd->rnk", q, k_top)
    probs = torch.softmax(logits, dim=-1)
    if top_valid is not None:
        valid = per_query(top_valid)
        probs = torch.where(valid, torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1), 0.0)
    if top_drop is not None:
        probs = probs * per_query(top_drop)
    return torch.einsum("rnk,rnkd->rnd", probs, v_top), clusters


def assert_close(actual, expected, dtype):
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol * (1 + expected.abs().max().item()), f"max error {err}"


@runs_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length,keys,dim,num_clusters,top_k,key_tile", [
    (97, 80, 32, 7, 5, None),      # top-k below the smallest tile (masked slots), 97 = 64 + 33 members
    (200, 150, 64, 12, 16, None),
    (130, 40, 16, 20, 33, None),   # 33 top keys in a 64-slot tile
    (130, 90, 32, 9, 40, 16),      # 40 top keys in three tiles of 16 (online softmax), the last partial
])
@pytest.mark.parametrize("masked", [False, True])
def test_exact_products_match_brute_force(dtype, length, keys, dim, num_clusters, top_k, key_tile, masked,
                                          monkeypatch):
    """``masked``: with key padding (a cluster whose top keys are all padded among the rest) and
    dropout on the top keys. ``key_tile``: more top keys than one tile takes, in tiles of
    ``key_tile`` (the kernels' ``ONE_TILE_TOP_K`` and ``KEY_TILE``, 128 and 64, lowered so that
    the interpreter's case stays small)."""
    if key_tile is not None:
        monkeypatch.setattr(improved_triton, "ONE_TILE_TOP_K", key_tile)
        monkeypatch.setattr(improved_triton, "KEY_TILE", key_tile)
    q, k, v, grad_out, assignments, top, mass, rest, grad_centroids = problem(
        length, keys, dim, num_clusters, top_k, dtype, seed=length)
    scale = dim ** -0.5
    order, seg_start, _ = _segments(assignments, num_clusters)
    rows = top.shape[0]
    dropout_p = 0.25
    key_padding_mask, keep = key_masks(top, keys, dropout_p, seed=length) if masked else (None, None)
    masks = (key_padding_mask, keep, dropout_p if masked else 0.0)
    top_valid, top_drop = top_key_masks(top, *masks)

    out = improved_triton.exact_top_keys_fwd(q, k, v, order, seg_start, top, mass, rest, scale, None, *masks)
    exact, clusters = brute_force_exact(q, k, v, assignments, top, scale, top_valid, top_drop)
    clustered = (assignments.reshape(rows, length, 1) >= 0).double()
    per_query = lambda t: clustered * t.double().gather(1, clusters[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    expected = per_query(mass[..., None]) * exact + per_query(rest)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out.reshape(rows, length, dim), expected, dtype)

    grad_dot = improved_triton.exact_top_keys_fwd(q, k, v, order, seg_start, top, mass, rest, scale, grad_out,
                                                  *masks)
    assert_close(grad_dot, (clustered * grad_out.double().reshape(rows, length, dim) * exact).sum(-1), dtype)

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact64, _ = brute_force_exact(*leaves, assignments, top, scale, top_valid, top_drop)
    (per_query(mass[..., None]) * exact64 * grad_out.double().reshape(rows, length, dim)).sum().backward()
    grad_key = torch.zeros(rows, keys, dim, device=DEVICE)
    grad_value = torch.zeros_like(grad_key)
    if key_tile is not None:  # the softmax's backward over tiles takes the forward's grad_out . exact
        with pytest.raises(ValueError, match="grad_dot is needed for top_k 40 > ONE_TILE_TOP_K 16"):
            improved_triton.exact_top_keys_bwd(grad_out, q, k, v, order, seg_start, top, mass, grad_centroids,
                                               scale, grad_key, grad_value, *masks)
    grad_query = improved_triton.exact_top_keys_bwd(grad_out, q, k, v, order, seg_start, top, mass, grad_centroids,
                                                    scale, grad_key, grad_value, *masks, grad_dot=grad_dot)
    assert grad_query.dtype == dtype
    assert_close(grad_query.reshape(rows, length, dim), leaves[0].grad.reshape(rows, length, dim)
                 + per_query(grad_centroids), dtype)
    assert_close(grad_key, leaves[1].grad.reshape(rows, keys, dim), dtype)
    assert_close(grad_value, leaves[2].grad.reshape(rows, keys, dim), dtype)


@pytest.mark.skipif(improved_triton.triton is None, reason="needs triton")
def test_sub_block_keys_follow_the_length_and_the_tile():
    assert [improved_triton.sub_block_keys(32, 64, n) for n in (1024, 8192, 16384, 32768, 65536, 2**20)] == \
        [4, 4, 8, 16, 16, 16]
    # top_k x sub-block keys x dim stays within the tile: 64 x 8 x 64, 128 x 2 x 128
    assert improved_triton.sub_block_keys(33, 64, 65536) == 8
    assert improved_triton.sub_block_keys(128, 128, 1024) == 2


@pytest.mark.skipif(improved_triton.triton is None, reason="needs triton")
def test_what_the_triton_path_does_not_take():
    meta = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, device="meta", dtype=dtype)  # noqa: E731
    assert improved_triton.triton_exact_unavailable(meta(1, 2, 8, 64), meta(1, 2, 8, 64)) is None
    assert "dtype torch.float32" in improved_triton.triton_exact_unavailable(
        meta(1, 2, 8, 64, dtype=torch.float32), meta(1, 2, 8, 64, dtype=torch.float32))
    assert "head dim 48" in improved_triton.triton_exact_unavailable(meta(1, 2, 8, 48), meta(1, 2, 8, 48))
    assert "value dim 32" in improved_triton.triton_exact_unavailable(meta(1, 2, 8, 64), meta(1, 2, 8, 32))
    # The selection ranks at least two candidate keys per slot within its tile of 32768 values.
    assert improved_triton.selection_unavailable(256, 64) is None
    assert improved_triton.selection_unavailable(128, 128) is None
    assert "top-k 257 at head dim 64" in improved_triton.selection_unavailable(257, 64)
    assert "top-k 129 at head dim 128" in improved_triton.selection_unavailable(129, 128)


@runs_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keys,dim,num_clusters,top_k,max_sub_blocks,sub_blocks_wanted", [
    (300, 32, 7, 2, 4096, 2048),     # 75 sub-blocks of 4 keys, 2 chosen in the kernel
    (300, 32, 7, 2, 4096, 16),       # 19 sub-blocks of 16 (the last partial)
    (1000, 64, 100, 5, 4096, 16),    # 63 sub-blocks of 16, 5 chosen
    (1000, 64, 100, 5, 8, 2048),     # 250 of 4, chosen by torch.topk (more than the kernel would rank)
    (70, 16, 130, 7, 4096, 16),      # 5 sub-blocks of 16, fewer than top-k: every key a candidate
    (1000, 64, 10, 33, 4096, 2048),  # sub-blocks of 4 keys, 33 of them (64 slots)
    (300, 128, 3, 100, 4096, 2048),  # sub-blocks of 2 keys (the tile's limit), 100 of 150 chosen
    (1200, 64, 3, 256, 4096, 2048),  # the most top keys the kernel takes at D = 64: 256 of 600 sub-blocks of 2
])
@pytest.mark.parametrize("bitonic", [0, 1])
def test_block_stats_and_top_keys_match_fp64(dtype, keys, dim, num_clusters, top_k, max_sub_blocks,
                                             sub_blocks_wanted, bitonic, monkeypatch):
    """Sub-block and block maxima, block sums and the log-sum-exp as from float64 products of
    the fp32 centroids and the keys (error at fp32 rounding, not the dtype's: the three-part
    split keeps every product exact); the top keys are those of the float64 logits, largest
    first, whether ranked by max-reductions in turn or by a bitonic top-k."""
    if bitonic and DEVICE == "cpu" and num_clusters > 10:
        pytest.skip("the interpreter takes about a minute over this many centroids' bitonic top-k; "
                    "the small cases cover it here, every case on the GPU")
    gen = torch.Generator().manual_seed(keys + top_k)
    qbar = (3 * torch.randn(3, num_clusters, dim, generator=gen)).to(DEVICE)
    key = torch.randn(3, keys, dim, generator=gen).to(DEVICE, dtype)
    scale = dim ** -0.5
    expected = scale * torch.einsum("rcd,rsd->rcs", qbar.double(), key.double())
    tol = 1e-5 * (1 + expected.abs().max().item())

    monkeypatch.setitem(improved_triton.SELECTION, "SUB_BLOCKS", sub_blocks_wanted)
    sub, block_n = improved_triton.sub_block_keys(top_k, dim, keys), improved_triton.LAUNCH["logits"]["BLOCK_N"]
    sub_max, block_max, block_sum = improved_triton.centroid_block_stats(qbar, key, scale, sub)
    sub_blocks, blocks = -(-keys // sub), -(-keys // block_n)
    assert sub_max.shape == (3, num_clusters, sub_blocks) and block_max.shape == block_sum.shape
    assert block_max.shape == (3, num_clusters, blocks)
    padded = torch.full((3, num_clusters, blocks * block_n), float("-inf"), dtype=torch.float64, device=DEVICE)
    padded[..., :keys] = expected
    want_sub = padded[..., :sub_blocks * sub].reshape(3, num_clusters, sub_blocks, sub).amax(-1)
    assert (sub_max.double() - want_sub).abs().max().item() <= tol
    padded = padded.reshape(3, num_clusters, blocks, block_n)
    want_max = padded.amax(-1)
    assert (block_max.double() - want_max).abs().max().item() <= tol
    want_sum = torch.exp(padded - want_max[..., None]).sum(-1)
    assert torch.allclose(block_sum.double(), want_sum, rtol=1e-4, atol=0)

    monkeypatch.setitem(improved_triton.SELECTION, "MAX_SUB_BLOCKS", max_sub_blocks)
    monkeypatch.setitem(improved_triton.SELECTION, "BITONIC_CANDIDATES", 1 << 20 if bitonic else 0)
    monkeypatch.setitem(improved_triton.SELECTION, "BITONIC_TOP_K", 1 if bitonic else 1 << 20)
    lse, top = improved_triton.centroid_top_keys(qbar, key, scale, top_k)
    assert lse.dtype == torch.float32 and top.dtype == torch.int64 and top.shape == (3, num_clusters, top_k)
    assert torch.allclose(lse.double(), torch.logsumexp(expected, -1), rtol=0, atol=1e-5)
    assert all(len(set(row.tolist())) == top_k for row in top.reshape(-1, top_k))  # distinct keys
    chosen = expected.gather(-1, top)
    assert (chosen - expected.topk(top_k, dim=-1).values).abs().max().item() <= tol  # the top, in order
    # the largest logits in distinct sub-blocks: a selection of the wrong sub-blocks would miss some
    assert (chosen[..., 0] - expected.amax(-1)).abs().max().item() <= tol


@runs_here
@pytest.mark.parametrize("keys,sub_blocks_wanted", [
    (300, 2048),  # 75 sub-blocks of 4 keys: 8 chosen in the kernel
    (70, 16),     # 5 sub-blocks of 16, fewer than top-k: every key a candidate
])
@pytest.mark.parametrize("bitonic", [0, 1])
def test_top_keys_leave_out_padded_keys(keys, sub_blocks_wanted, bitonic, monkeypatch):
    """With key padding the log-sum-exp is over the valid keys (+inf for a batch entry without
    one) and the top keys are the largest valid logits, largest first; a centroid with fewer
    valid keys than top-k fills the rest of its slots with padded keys, which the kernels
    reading ``top`` skip. The block statistics count no padded key."""
    batch, heads, num_clusters, dim, top_k = 3, 2, 5, 32, 8
    gen = torch.Generator().manual_seed(keys)
    qbar = (3 * torch.randn(batch * heads, num_clusters, dim, generator=gen)).to(DEVICE)
    key = torch.randn(batch * heads, keys, dim, generator=gen).to(DEVICE, DTYPES[0])
    padded = torch.zeros(batch, keys, dtype=torch.bool)
    padded[0, 1::3] = True  # many valid keys
    padded[1, :] = True
    padded[1, torch.randperm(keys, generator=gen)[:5]] = False  # 5 valid keys: fewer than top-k
    padded[2, :] = True  # none
    padded = padded.to(DEVICE)
    scale = dim ** -0.5
    logits = scale * torch.einsum("rcd,rsd->rcs", qbar.double(), key.double())
    logits = logits.masked_fill(padded.repeat_interleave(heads, 0)[:, None, :], float("-inf"))
    tol = 1e-5 * (1 + logits[torch.isfinite(logits)].abs().max().item())

    monkeypatch.setitem(improved_triton.SELECTION, "SUB_BLOCKS", sub_blocks_wanted)
    monkeypatch.setitem(improved_triton.SELECTION, "BITONIC_CANDIDATES", 1 << 20 if bitonic else 0)
    monkeypatch.setitem(improved_triton.SELECTION, "BITONIC_TOP_K", 1 if bitonic else 1 << 20)
    sub = improved_triton.sub_block_keys(top_k, dim, keys)
    _, block_max, block_sum = improved_triton.centroid_block_stats(qbar, key, scale, sub, padded)
    assert torch.isfinite(block_sum).all() and (block_sum[heads * 2:] == 0).all()
    assert torch.isneginf(block_max[heads * 2:]).all()

    lse, top = improved_triton.centroid_top_keys(qbar, key, scale, top_k, padded)
    expected_lse = torch.logsumexp(logits, -1)
    assert torch.allclose(lse[:heads * 2].double(), expected_lse[:heads * 2], rtol=0, atol=1e-5)
    assert torch.isposinf(lse[heads * 2:]).all()
    top_padded = padded.repeat_interleave(heads, 0)[:, None, :].expand(-1, num_clusters, -1).gather(-1, top)
    chosen = logits.gather(-1, top)
    # batch entry 0: every slot a valid key, the largest logits in order
    assert not top_padded[:heads].any()
    assert (chosen[:heads] - logits[:heads].topk(top_k, dim=-1).values).abs().max().item() <= tol
    # batch entry 1: its 5 valid keys first, in order, then padded ones
    assert not top_padded[heads:2 * heads, :, :5].any() and top_padded[heads:2 * heads, :, 5:].all()
    assert (chosen[heads:2 * heads, :, :5] - logits[heads:2 * heads].topk(5, dim=-1).values).abs().max() <= tol
    assert top_padded[2 * heads:].all() and ((top >= 0) & (top < keys)).all()


@runs_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_second", [False, True])
@pytest.mark.parametrize("reuse_first", [False, True])
def test_sum_gradients_adds_in_fp32_and_rounds_once(dtype, with_second, reuse_first):
    gen = torch.Generator().manual_seed(3)
    batch, heads, keys, dim = 2, 3, 70, 32  # 70 keys: a partial block
    sparse = torch.randn(batch * heads, keys, dim, generator=gen).to(DEVICE)
    # flash returns (B, S, H, D) storage viewed as (B, H, S, D): non-contiguous inputs
    first, second = (torch.randn(batch, keys, heads, dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
                     for _ in range(2))
    expected = sparse.reshape(batch, heads, keys, dim) + first.float() + (second.float() if with_second else 0)
    out = improved_triton.sum_gradients(sparse, first, second if with_second else None, reuse_first=reuse_first)
    assert out.dtype == dtype and out.shape == first.shape
    # reused: the sum over first's own (non-contiguous) storage; else a new contiguous tensor
    assert (out is first) if reuse_first else (out.is_contiguous() and out.data_ptr() != first.data_ptr())
    assert torch.equal(out, expected.to(dtype))


@runs_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keys,dim,num_clusters,top_k,key_tile", [
    (80, 32, 7, 5, None),      # top-k below the smallest tile (masked slots)
    (150, 64, 12, 16, None),
    (40, 16, 20, 33, None),    # 33 top keys in a 64-slot tile; 20 clusters over 40 keys share keys
    (40, 16, 20, 33, 16),      # the same in three tiles of 16, the last of one key
])
@pytest.mark.parametrize("masked", [False, True])
def test_top_key_summary_and_gradients_match_fp64(dtype, keys, dim, num_clusters, top_k, key_tile, masked,
                                                  monkeypatch):
    """Each centroid's mass and rest on its top keys, and the top-key part of the backward,
    against float64 products of the same (rounded) inputs: autograd of
    ``f = sum_j gm_j mass_j + g_j . rest_j`` with the log-sum-exp a leaf (its gradient is minus
    the dense term's weight). fp32 rounding only: the kernels upcast before multiplying.
    ``masked``: padded top keys count for nothing (a centroid without a valid key has the
    log-sum-exp +inf) and the rest's top-key part takes the dropout factors. ``key_tile``: more top
    keys than one tile takes, in tiles of ``key_tile`` (sums over tiles)."""
    if key_tile is not None:
        monkeypatch.setattr(improved_triton, "ONE_TILE_TOP_K", key_tile)
        monkeypatch.setattr(improved_triton, "KEY_TILE", key_tile)
    gen = torch.Generator().manual_seed(keys + top_k)
    rows = 3
    qbar = torch.randn(rows, num_clusters, dim, generator=gen).to(DEVICE)
    key, value = (torch.randn(rows, keys, dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    top = torch.stack([torch.randperm(keys, generator=gen)[:top_k] for _ in range(rows * num_clusters)])
    top = top.reshape(rows, num_clusters, top_k).to(DEVICE)
    scale = dim ** -0.5
    dropout_p = 0.25
    key_padding_mask, keep = key_masks(top, keys, dropout_p, seed=keys) if masked else (None, None)
    masks = (key_padding_mask, keep, dropout_p if masked else 0.0)
    top_valid, top_drop = top_key_masks(top, *masks)
    logits = scale * torch.einsum("rcd,rsd->rcs", qbar.double(), key.double())
    if masked:
        logits = logits.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, -1).float()
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)
    centroid_values, grad_rest = (torch.randn(rows, num_clusters, dim, generator=gen).to(DEVICE) for _ in range(2))
    grad_mass = torch.randn(rows, num_clusters, generator=gen).to(DEVICE)

    q64, k64, v64, lse64 = (x.detach().double().requires_grad_() for x in (qbar, key, value, lse))
    flat = top.reshape(rows, -1, 1).expand(-1, -1, dim)
    gathered = lambda x: x.gather(1, flat).reshape(rows, num_clusters, top_k, dim)  # noqa: E731
    probs = torch.exp(scale * torch.einsum("rcd,rckd->rck", q64, gathered(k64)) - lse64[..., None])
    probs = torch.where(top_valid, probs, 0.0)
    mass = probs.sum(-1)
    rest = centroid_values.double() - torch.einsum("rck,rckd->rcd", probs * top_drop, gathered(v64))
    ((grad_mass.double() * mass).sum() + (grad_rest.double() * rest).sum()).backward()

    def close(actual, expected):
        err = (actual.double() - expected).abs().max().item()
        assert actual.dtype == torch.float32 and err <= 1e-5 * (1 + expected.abs().max().item()), err

    got_mass, got_rest = improved_triton.top_key_summary(qbar, key, value, top, lse, scale, centroid_values, *masks)
    close(got_mass, mass.detach())
    close(got_rest, rest.detach())
    mass_only, no_rest = improved_triton.top_key_summary(qbar, key, value, top, lse, scale, None, *masks)
    assert no_rest is None and torch.equal(mass_only, got_mass)

    grad_key = torch.zeros(rows, keys, dim, device=DEVICE)
    grad_value = torch.ones(rows, keys, dim, device=DEVICE)  # added into, not overwritten
    lse_weight, grad_centroids = improved_triton.top_key_gradients(
        qbar, key, value, top, lse, grad_rest, grad_mass, scale, grad_key, grad_value, *masks)
    close(lse_weight, -lse64.grad)
    close(grad_centroids, q64.grad)
    close(grad_key, k64.grad)
    close(grad_value, v64.grad + 1)
    with pytest.raises(ValueError, match="contiguous fp32"):
        improved_triton.top_key_gradients(qbar, key, value, top, lse, grad_rest, grad_mass, scale,
                                          grad_key.double(), grad_value)


@runs_here
@pytest.mark.parametrize("dtype", DTYPES)
def test_centroid_gradients_combine_in_one_launch(dtype):
    """``centroid_gradients``: ``dq_bar = (dqb + grad_top - scale c k_out) / max(members, 1)`` and
    ``x = -scale c qbar`` as the torch ops they replace compute them, with flash's layouts
    (``(B, H, C, D)`` views of ``(B, C, H, D)`` storage) and an empty cluster."""
    gen = torch.Generator().manual_seed(5)
    batch, heads, clusters, dim, scale = 2, 3, 7, 32, 0.125
    rows = batch * heads
    flash_layout = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    dqb = flash_layout(torch.randn(batch, heads, clusters, dim, generator=gen).to(dtype)).to(DEVICE)
    k_out = flash_layout(torch.randn(batch, heads, clusters, dim, generator=gen).to(dtype)).to(DEVICE)
    grad_top, qbar = (torch.randn(rows, clusters, dim, generator=gen).to(DEVICE) for _ in range(2))
    lse_weight = torch.randn(rows, clusters, generator=gen).to(DEVICE)
    members = torch.randint(0, 5, (rows, clusters), generator=gen)
    members[0, 3] = 0  # an empty cluster: divided by 1
    seg_start = torch.cat([torch.zeros(rows, 1, dtype=torch.int64), members.cumsum(1)], 1).to(DEVICE)

    dq_bar, x = improved_triton.centroid_gradients(dqb, grad_top, seg_start, lse_weight, k_out, qbar, scale)
    c = scale * lse_weight.double().unsqueeze(-1)
    expected = (dqb.double().reshape(rows, clusters, dim) + grad_top.double()
                - c * k_out.double().reshape(rows, clusters, dim)) / members.clamp(min=1).to(DEVICE).unsqueeze(-1)
    assert dq_bar.dtype == torch.float32 and dq_bar.shape == (rows, clusters, dim)
    assert (dq_bar.double() - expected).abs().max().item() < 1e-5
    assert x.dtype == dtype and x.shape == (batch, heads, clusters, dim)
    want_x = (-c * qbar.double()).reshape(batch, heads, clusters, dim)
    assert (x.double() - want_x).abs().max().item() <= 1e-2 * (1 + want_x.abs().max().item())

    # the Triton centroid backward's parts (one per key range, fp32), summed, without the term
    parts = torch.randn(batch, heads, 3, clusters, dim, generator=gen).to(DEVICE)
    dq_bar, x = improved_triton.centroid_gradients(parts, grad_top, seg_start)
    expected = (parts.double().sum(2).reshape(rows, clusters, dim) + grad_top.double()) \
        / members.clamp(min=1).to(DEVICE).unsqueeze(-1)
    assert x is None and (dq_bar.double() - expected).abs().max().item() < 1e-5
