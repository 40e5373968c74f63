"""The reference ops against independent oracles: exact attention, brute force, gradcheck.

These tests make ``fairseq_clustered.ops.reference`` trustworthy as the oracle of
every kernel: they run on the CPU in fp32/fp64.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fairseq_clustered.ops import (
    cluster_queries,
    clustered_attention,
    custom_ops,
    draw_hash_planes,
    hash_queries,
    improved_clustered_attention,
    reference,
)


def make_inputs(batch, heads, n, s, d, dv=None, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(batch, heads, n, d, generator=gen, dtype=dtype)
    k = torch.randn(batch, heads, s, d, generator=gen, dtype=dtype)
    v = torch.randn(batch, heads, s, dv, generator=gen, dtype=dtype)
    return q, k, v


def right_padding(lengths, total):
    """(B, total) bool mask, True past each row's length."""
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def explicit_softmax_attention(q, k, v, key_padding_mask):
    """Per-row loop with an explicit softmax formula: the second, independent oracle."""
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    scale = q.shape[-1] ** -0.5
    for b, h in itertools.product(range(q.shape[0]), range(q.shape[1])):
        valid = torch.ones(k.shape[2], dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask[b]
        logits = (q[b, h].double() @ k[b, h, valid].double().t()) * scale
        weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
        weights = weights / weights.sum(-1, keepdim=True)
        out[b, h] = weights @ v[b, h, valid].double()
    return out


def sdpa(q, k, v, key_padding_mask):
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------- exactness


@pytest.mark.parametrize("n", [1, 7, 97, 257])
@pytest.mark.parametrize("d", [16, 40, 64])
@pytest.mark.parametrize("padded", [False, True])
def test_enough_clusters_is_exact_attention(n, d, padded):
    q, k, v = make_inputs(2, 2, n, n, d, seed=n * d)
    mask = right_padding([n, max(1, n - n // 3)], n) if padded else None
    gen = torch.Generator().manual_seed(1)
    # C >= number of valid queries: every query is its own cluster.
    out = clustered_attention(q, k, v, mask, mask, num_clusters=n, generator=gen)
    expected_sdpa = sdpa(q, k, v, mask)
    expected_loop = explicit_softmax_attention(q, k, v, mask)
    valid_q = torch.ones(2, n, dtype=torch.bool) if mask is None else ~mask
    for b in range(2):
        rows = valid_q[b]
        assert (out[b][:, rows] - expected_sdpa[b][:, rows]).abs().max() <= 1e-5
        assert (out[b][:, rows].double() - expected_loop[b][:, rows]).abs().max() <= 1e-5
        assert torch.all(out[b][:, ~rows] == 0), "padded queries must get zeros"


@pytest.mark.parametrize("n,s", [(1, 1), (7, 5), (97, 97), (257, 100)])
@pytest.mark.parametrize("d", [16, 40, 64])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("num_clusters", [1, 3])
def test_improved_with_all_keys_is_exact(n, s, d, padded, num_clusters):
    q, k, v = make_inputs(2, 2, n, s, d, seed=n + s + d)
    mask = right_padding([s, max(1, s - s // 4)], s) if padded else None
    gen = torch.Generator().manual_seed(2)
    out = improved_clustered_attention(q, k, v, mask, num_clusters=num_clusters, topk=s, generator=gen)
    assert (out - sdpa(q, k, v, mask)).abs().max() <= 1e-5
    assert (out.double() - explicit_softmax_attention(q, k, v, mask)).abs().max() <= 1e-5


def test_topk_larger_than_keys_is_exact():
    q, k, v = make_inputs(1, 2, 33, 20, 16)
    mask = right_padding([13], 20)
    out = improved_clustered_attention(q, k, v, mask, num_clusters=4, topk=1000, generator=torch.Generator())
    assert (out - sdpa(q, k, v, mask)).abs().max() <= 1e-5


def test_all_padded_rows_give_finite_zeros():
    q, k, v = make_inputs(2, 2, 9, 9, 8)
    key_mask = right_padding([9, 0], 9)  # batch 1: every key padded
    query_mask = right_padding([9, 0], 9)
    gen = torch.Generator().manual_seed(0)
    for fn in (clustered_attention, improved_clustered_attention):
        out = fn(q, k, v, key_mask, query_mask, num_clusters=3, generator=gen)
        assert torch.isfinite(out).all()
        assert torch.all(out[1] == 0)
        out = fn(q, k, v, key_mask, None, num_clusters=3, generator=gen)  # queries valid, keys not
        assert torch.isfinite(out).all() and torch.all(out[1] == 0)


# ---------------------------------------------------------------- hashing


def test_hash_codes_match_brute_force():
    q, _, _ = make_inputs(1, 2, 13, 1, 10)
    planes = draw_hash_planes(11, 10, torch.Generator().manual_seed(3))
    offsets = torch.randn(11, generator=torch.Generator().manual_seed(4)) * 0.1
    codes = hash_queries(q, planes, offsets)
    for h, i in itertools.product(range(2), range(13)):
        expected = sum(1 << b for b in range(11) if float(planes[b] @ q[0, h, i]) > float(offsets[b]))
        assert int(codes[0, h, i]) == expected


def test_hashing_adds_nothing_to_the_backward():
    """Codes are constants: hashing a tensor that requires grad records no autograd node
    (one would only add a zero gradient of the input's size in every backward)."""
    q, _, _ = make_inputs(1, 2, 13, 1, 10)
    codes = hash_queries(q.requires_grad_(), draw_hash_planes(11, 10, torch.Generator().manual_seed(3)))
    assert codes.grad_fn is None and not codes.requires_grad


def test_sixty_three_bits_fit_in_int64():
    q, _, _ = make_inputs(1, 1, 50, 1, 8)
    codes = hash_queries(q, draw_hash_planes(63, 8, torch.Generator().manual_seed(0)))
    assert codes.dtype == torch.int64 and (codes >= 0).all() and (codes < 2**63 - 1).all()


# ------------------------------------------------------------- clustering


def brute_force_lloyd(codes, valid, num_clusters, iterations, bits):
    """Lloyd in Hamming space on Python ints, one row at a time (the spec, literally)."""
    positions = [i for i in range(len(codes)) if valid[i]]
    if len(positions) <= num_clusters:
        return [positions.index(i) if valid[i] else -1 for i in range(len(codes))]
    centroids = [codes[positions[j * len(positions) // num_clusters]] for j in range(num_clusters)]

    def assign():
        result = []
        for i in range(len(codes)):
            if not valid[i]:
                result.append(-1)
                continue
            distances = [bin(codes[i] ^ c).count("1") for c in centroids]
            result.append(distances.index(min(distances)))
        return result

    for _ in range(iterations):
        assignment = assign()
        for j in range(num_clusters):
            members = [codes[i] for i in range(len(codes)) if assignment[i] == j]
            new = 0
            for b in range(bits):
                ones = sum((m >> b) & 1 for m in members)
                bit = 1 if 2 * ones > len(members) else 0 if 2 * ones < len(members) else (centroids[j] >> b) & 1
                new |= bit << b
            centroids[j] = new
    return assign()


@pytest.mark.parametrize("bits,num_clusters,iterations", [(5, 3, 0), (9, 4, 3), (63, 6, 10), (1, 2, 2)])
def test_lloyd_matches_brute_force(bits, num_clusters, iterations):
    gen = torch.Generator().manual_seed(bits * 7 + num_clusters)
    codes = torch.randint(0, 2**min(bits, 62), (2, 2, 40), generator=gen) if bits < 63 else \
        torch.randint(0, 2**62, (2, 2, 40), generator=gen) * 2 + torch.randint(0, 2, (2, 2, 40), generator=gen)
    codes = codes & ((1 << bits) - 1)
    mask = right_padding([40, 23], 40)
    assignments, _ = custom_ops.lloyd_kmeans(codes, mask, num_clusters, iterations, bits)
    for b, h in itertools.product(range(2), range(2)):
        expected = brute_force_lloyd(codes[b, h].tolist(), (~mask[b]).tolist(), num_clusters, iterations, bits)
        assert assignments[b, h].tolist() == expected


def test_cluster_ids_and_counts():
    q, _, _ = make_inputs(3, 2, 200, 1, 16)
    mask = right_padding([200, 150, 60], 200)
    assignments, centroids = cluster_queries(q, mask, num_clusters=50, generator=torch.Generator().manual_seed(0))
    assert assignments.shape == (3, 2, 200) and centroids.shape == (3, 2, 50)
    valid = ~mask
    assert ((assignments >= 0) == valid[:, None, :]).all(), "padded queries join no cluster, valid ones do"
    assert (assignments < 50).all()
    counts = torch.stack([torch.bincount(a[a >= 0], minlength=50) for a in assignments.flatten(0, 1)])
    assert counts.sum(-1).tolist() == [200, 200, 150, 150, 60, 60]


def test_total_hamming_distance_never_increases():
    q, _, _ = make_inputs(2, 2, 300, 1, 32, seed=5)
    mask = right_padding([300, 211], 300)
    planes = draw_hash_planes(63, 32, torch.Generator().manual_seed(1))
    codes = hash_queries(q, planes)
    totals = []
    for iterations in range(11):
        assignments, centroids = custom_ops.lloyd_kmeans(codes, mask, 20, iterations, 63)
        distances = reference.hamming_distance_ref(codes, centroids, 63)
        chosen = distances.gather(-1, assignments.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        totals.append((chosen * (assignments >= 0)).sum((-1)))  # (B, H)
    totals = torch.stack(totals)
    assert (totals[1:] <= totals[:-1]).all(), totals
    assert (totals[-1] < totals[0]).any(), "Lloyd should improve on the initial centroids"


def test_same_generator_state_same_result():
    q, k, v = make_inputs(2, 2, 120, 120, 16)
    results = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(1234)
        results.append(improved_clustered_attention(q, k, v, num_clusters=10, topk=8, generator=gen, dropout_p=0.2))
    assert torch.equal(results[0], results[1])
    other = improved_clustered_attention(q, k, v, num_clusters=10, topk=8, dropout_p=0.2,
                                         generator=torch.Generator().manual_seed(99))
    assert not torch.equal(results[0], other)


def test_global_rng_is_not_used():
    q, k, v = make_inputs(1, 2, 64, 64, 16)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    clustered_attention(q, k, v, num_clusters=8, generator=torch.Generator().manual_seed(0), dropout_p=0.1)
    assert torch.equal(before, torch.get_rng_state())


# ---------------------------------------------------------- approximation


def clusterable_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(20, 64, generator=gen)
    choice = torch.randint(0, 20, (1024,), generator=gen)
    q = prototypes[choice] + 0.3 * torch.randn(1024, 64, generator=gen)
    k = torch.randn(1024, 64, generator=gen)
    v = torch.randn(1024, 64, generator=gen)
    return q[None, None], k[None, None], v[None, None]


def relative_error(out, exact):
    return float((out - exact).norm() / exact.norm())


@pytest.mark.parametrize("seed", [0, 1])
def test_approximation_on_clusterable_queries(seed):
    q, k, v = clusterable_inputs(seed)
    exact = reference.exact_attention_ref(q, k, v)
    kwargs = dict(num_clusters=100, iterations=10, bits=63)
    clustered = relative_error(clustered_attention(q, k, v, generator=torch.Generator().manual_seed(seed), **kwargs), exact)
    improved = relative_error(
        improved_clustered_attention(q, k, v, topk=32, generator=torch.Generator().manual_seed(seed), **kwargs), exact
    )
    random_clusters = torch.randint(0, 100, (1, 1, 1024), generator=torch.Generator().manual_seed(seed))
    random_error = relative_error(clustered_attention(q, k, v, clusters=random_clusters, **kwargs), exact)
    assert clustered <= 0.30, clustered
    assert improved <= 0.20, improved
    assert improved < clustered
    assert random_error > 0.6, "the oracle must separate good clusters from random ones"


# -------------------------------------------------------------- gradients


def fixed_clusters(batch, heads, n, num_clusters, query_mask, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clusters = torch.randint(0, num_clusters, (batch, heads, n), generator=gen)
    return torch.where(query_mask[:, None, :], torch.full_like(clusters, -1), clusters)


@pytest.mark.parametrize("variant", ["clustered", "improved"])
@pytest.mark.parametrize("dropout", [False, True])
def test_gradcheck(variant, dropout):
    q, k, v = make_inputs(2, 2, 9, 7, 5, dv=3, dtype=torch.float64, seed=11)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    key_mask = right_padding([7, 5], 7)
    query_mask = right_padding([9, 6], 9)
    clusters = fixed_clusters(2, 2, 9, 3, query_mask)
    keep = torch.rand(2, 2, 3, 7, generator=torch.Generator().manual_seed(0)) > 0.3 if dropout else None
    p = 0.3 if dropout else 0.0
    if variant == "clustered":
        fn = lambda q, k, v: custom_ops.clustered_attention_fwd(q, k, v, clusters, key_mask, keep, 3, 0.4, p)[0]
    else:
        fn = lambda q, k, v: custom_ops.improved_clustered_attention_fwd(
            q, k, v, clusters, key_mask, keep, 3, 3, 0.4, p)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_plain_clustered_query_gradient_is_centroid_gradient_over_size():
    q, k, v = make_inputs(1, 1, 6, 5, 4, dtype=torch.float64)
    q.requires_grad_()
    clusters = torch.tensor([[[0, 0, 0, 1, 1, 2]]])
    out = clustered_attention(q, k, v, num_clusters=3, clusters=clusters)
    out.sum().backward()
    # Members of one cluster share a centroid, so they get identical gradients.
    assert torch.allclose(q.grad[0, 0, 0], q.grad[0, 0, 1]) and torch.allclose(q.grad[0, 0, 3], q.grad[0, 0, 4])
    # The centroid gradient is split evenly: 3 * grad of a member of cluster 0 = d out / d centroid.
    centroid = q[0, 0, :3].detach().mean(0, keepdim=True).requires_grad_()
    logits = centroid @ k[0, 0].t() * 0.5
    (torch.softmax(logits, -1) @ v[0, 0]).sum().mul(3).backward()
    assert torch.allclose(3 * q.grad[0, 0, 0], centroid.grad[0])


def opcheck_samples():
    q, k, v = make_inputs(2, 2, 11, 9, 8)
    key_mask = right_padding([9, 6], 9)
    query_mask = right_padding([11, 7], 11)
    clusters = fixed_clusters(2, 2, 11, 4, query_mask)
    keep = torch.rand(2, 2, 4, 9, generator=torch.Generator().manual_seed(0)) > 0.2
    codes = hash_queries(q, draw_hash_planes(12, 8, torch.Generator().manual_seed(0)))
    grad = torch.randn(2, 2, 11, 8)
    out, lse, centroids = custom_ops.clustered_attention_fwd(q, k, v, clusters, key_mask, keep, 4, 0.3, 0.2)
    _, lse_i, top, centroids_i = custom_ops.improved_clustered_attention_fwd(q, k, v, clusters, key_mask, keep, 4, 3,
                                                                             0.3, 0.2)
    req = lambda t: t.clone().requires_grad_()
    return [
        (custom_ops.hash_codes, (q, draw_hash_planes(12, 8, torch.Generator()), torch.zeros(12))),
        (custom_ops.lloyd_kmeans, (codes, query_mask, 4, 3, 12)),
        (custom_ops.cluster_queries,
         (q, draw_hash_planes(12, 8, torch.Generator()), torch.zeros(12), query_mask, 4, 3, 12)),
        (custom_ops.clustered_attention_fwd, (req(q), req(k), req(v), clusters, key_mask, keep, 4, 0.3, 0.2)),
        (custom_ops.clustered_attention_bwd,
         (grad, q, k, v, clusters, key_mask, keep, out, lse, centroids, 4, 0.3, 0.2)),
        (custom_ops.improved_clustered_attention_fwd,
         (req(q), req(k), req(v), clusters, key_mask, keep, 4, 3, 0.3, 0.2)),
        (custom_ops.improved_clustered_attention_bwd,
         (grad, q, k, v, clusters, key_mask, keep, lse_i, top, centroids_i, 4, 0.3, 0.2)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_opcheck(index):
    op, args = opcheck_samples()[index]
    torch.library.opcheck(op, args)


def test_opcheck_covers_every_op():
    assert {op for op, _ in opcheck_samples()} == set(custom_ops.ALL_OPS)


@pytest.mark.parametrize("fn", [clustered_attention, improved_clustered_attention])
def test_torch_compile_fullgraph_matches_eager(fn):
    q, k, v = make_inputs(2, 2, 40, 40, 16)
    mask = right_padding([40, 31], 40)
    planes = draw_hash_planes(63, 16, torch.Generator().manual_seed(0))

    def run(q, k, v, mask):
        return fn(q, k, v, mask, mask, num_clusters=8, iterations=3, planes=planes)

    compiled = torch.compile(run, fullgraph=True)
    assert torch.equal(compiled(q, k, v, mask), run(q, k, v, mask))
