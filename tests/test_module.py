"""ClusteredMultiheadAttention against fairseq's own MultiheadAttention (the oracle)."""

import pytest
import torch

pytest.importorskip("fairseq", reason="fairseq is not installed")

from fairseq.modules import MultiheadAttention  # noqa: E402

from fairseq_clustered.modules import (  # noqa: E402
    ClusteredAttentionSettings,
    ClusteredMultiheadAttention,
)

EMBED, HEADS = 32, 4


def make_pair(attention, **kwargs):
    """A fairseq MultiheadAttention and a clustered one holding the same weights."""
    torch.manual_seed(0)
    exact = MultiheadAttention(EMBED, HEADS, self_attention=True, dropout=0.0)
    clustered = ClusteredMultiheadAttention(EMBED, HEADS, self_attention=True, attention=attention, **kwargs)
    clustered.load_state_dict(exact.state_dict())  # same parameter names and shapes, strict
    return exact, clustered


def padded_input(length=11, batch=3):
    torch.manual_seed(1)
    x = torch.randn(length, batch, EMBED)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, length - 4:] = True  # right padding, as fairseq's encoders produce
    padding[2, :2] = True  # left padding (fairseq's --left-pad-source default)
    return x, padding


@pytest.mark.parametrize("attention", ["clustered", "improved"])
def test_parity_with_fairseq_when_every_query_is_its_own_cluster(attention):
    exact, clustered = make_pair(attention, num_clusters=16, topk=2)  # C=16 >= length 11
    x, padding = padded_input()
    valid = (~padding).t().unsqueeze(-1).float()  # (T, B, 1): padded query outputs are not compared
    outputs, grads = [], []
    for module in (exact, clustered):
        xi = x.clone().requires_grad_(True)
        out, _ = module(xi, xi, xi, key_padding_mask=padding, need_weights=False)
        (out * valid * torch.randn_like(out, generator=torch.Generator().manual_seed(5))).sum().backward()
        outputs.append(out * valid)
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_clustered_path_is_taken_and_differs_when_clusters_are_few():
    exact, clustered = make_pair("clustered", num_clusters=2, iterations=3)
    x, padding = padded_input(length=24)
    want, _ = exact(x, x, x, key_padding_mask=padding)
    got, weights = clustered(x, x, x, key_padding_mask=padding, need_weights=True)
    assert weights is None  # documented: no per-query weights at a clustered site
    valid = ~padding.t()
    assert got.shape == want.shape and torch.isfinite(got).all()
    # 2 clusters for 24 queries: at most 2 distinct outputs per (sequence), unlike exact attention
    assert not torch.allclose(got[valid], want[valid], atol=1e-3)


def test_below_min_length_and_full_variant_are_fairseq_exactly():
    x, padding = padded_input(length=9)
    for kwargs in ({"attention": "full"}, {"attention": "clustered", "num_clusters": 2, "min_length": 10}):
        exact, clustered = make_pair(**kwargs)
        want, want_weights = exact(x, x, x, key_padding_mask=padding)
        got, got_weights = clustered(x, x, x, key_padding_mask=padding)
        assert torch.equal(got, want) and torch.equal(got_weights, want_weights)


def test_eval_is_reproducible_and_training_redraws_planes():
    _, module = make_pair("clustered", num_clusters=3, iterations=2, seed=7, layer_index=1)
    x, padding = padded_input(length=40)
    module.eval()
    first, _ = module(x, x, x, key_padding_mask=padding)
    _, other = make_pair("clustered", num_clusters=3, iterations=2, seed=7, layer_index=1)
    other.eval()
    assert torch.equal(first, module(x, x, x, key_padding_mask=padding)[0])
    assert torch.equal(first, other(x, x, x, key_padding_mask=padding)[0])  # same seed, same planes
    module.train()
    draws = [module(x, x, x, key_padding_mask=padding)[0] for _ in range(3)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # planes redrawn each training forward
    _, layer2 = make_pair("clustered", num_clusters=3, iterations=2, seed=7, layer_index=2)
    layer2.eval()
    assert not torch.equal(first, layer2(x, x, x, key_padding_mask=padding)[0])  # layers differ


def test_training_dropout_uses_the_module_generator_not_the_global_rng():
    _, module = make_pair("clustered", num_clusters=3, dropout=0.5, seed=3)
    _, twin = make_pair("clustered", num_clusters=3, dropout=0.5, seed=3)
    x, padding = padded_input(length=30)
    torch.manual_seed(123)
    a = module(x, x, x, key_padding_mask=padding)[0]
    torch.manual_seed(456)  # a different global RNG state must not matter
    b = twin(x, x, x, key_padding_mask=padding)[0]
    assert torch.equal(a, b)


def test_incremental_and_static_kv_calls_are_exact():
    exact, clustered = make_pair("clustered", num_clusters=1)
    x = torch.randn(1, 2, EMBED)
    state_exact, state_clustered = {}, {}
    for _ in range(3):
        want, _ = exact(x, x, x, incremental_state=state_exact)
        got, _ = clustered(x, x, x, incremental_state=state_clustered)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_clustered_site_refuses_attn_mask_and_weight_matrices():
    _, module = make_pair("clustered", num_clusters=2)
    x, padding = padded_input(length=8)
    with pytest.raises(ValueError, match="attn_mask is not supported"):
        module(x, x, x, key_padding_mask=padding, attn_mask=torch.zeros(8, 8))
    with pytest.raises(ValueError, match="need_head_weights"):
        module(x, x, x, need_head_weights=True)


@pytest.mark.parametrize("site", [
    {"encoder_decoder_attention": True},
    {"self_attention": True, "causal": True},
])
def test_leak_guard_refuses_clustering_at_decoder_sites(site):
    with pytest.raises(ValueError, match="would leak future target tokens"):
        ClusteredMultiheadAttention(EMBED, HEADS, attention="clustered", **site)
    ClusteredMultiheadAttention(EMBED, HEADS, attention="full", **site)  # exact is fine there


@pytest.mark.parametrize("option, value, message", [
    ("num_clusters", 0, "--clustered-num-clusters must be an integer >= 1"),
    ("bits", 64, "--clustered-bits must be an integer in 1..63"),
    ("topk", 0, "--clustered-topk"),
    ("iterations", -1, "--clustered-iterations"),
    ("attention", "sparse", "--clustered-attention must be one of full, clustered, improved"),
    ("layers", "0,x", "--clustered-layers must be 'all', 'none' or comma-separated"),
    ("decoder_attention", "clustered", "would leak future target tokens"),
])
def test_settings_errors_name_the_flag(option, value, message):
    with pytest.raises(ValueError, match=message):
        ClusteredAttentionSettings(**{option: value})


def test_layer_selection():
    settings = ClusteredAttentionSettings(attention="improved", layers="0,2")
    assert [settings.variant_for_layer(i, 3) for i in range(3)] == ["improved", "full", "improved"]
    with pytest.raises(ValueError, match="names layer"):
        settings.variant_for_layer(0, 2)
