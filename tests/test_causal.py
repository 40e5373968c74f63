"""Causal clustered attention: the leak test, exactness, a brute-force oracle, gradients,
opcheck, approximation quality and argument errors.

The leak test is the contract of the causal variant (DESIGN.md section 2): changing any
input at positions > i leaves every output at positions <= i bit-identical, and the
gradients of out_i with respect to inputs after i are exactly zero. It runs on the
reference (CPU) and, when a GPU is present, on CUDA.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_clustered.ops import (
    causal_clustered_attention,
    causal_key_clusters,
    clustered_attention,
    draw_hash_planes,
)
from fairseq_clustered.ops import causal as causal_ops

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def random_inputs(batch, heads, n, d, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen).to(device, dtype) for _ in range(3)]


def padding_mask(kind, batch, n, seed=0):
    """None, or a (B, N) bool mask with True at left- or right-padded positions."""
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(n // 2, n + 1, (batch,), generator=gen)
    positions = torch.arange(n)[None, :]
    if kind == "right":
        return positions >= lengths[:, None]
    return positions < (n - lengths)[:, None]


def exact_causal(q, k, v, key_padding_mask=None):
    """scaled_dot_product_attention(is_causal=True), with padded keys removed; rows that
    see no valid key are zeros (as the causal op defines them)."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None, None] & ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("n,window", [(1, 1), (7, 7), (97, 100), (97, 49), (130, 65)])
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_exact_causal_when_no_summary_is_needed(n, window, pad):
    """window >= N, or N <= 2 window: every query sees its whole past exactly."""
    q, k, v = random_inputs(2, 3, n, 40, seed=n)
    mask = padding_mask(pad, 2, n, seed=n)
    out = causal_clustered_attention(q, k, v, mask, window=window, num_clusters=4)
    torch.testing.assert_close(out, exact_causal(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_exact_causal_when_every_key_is_its_own_cluster():
    """One cluster per key: each summary is a single key with log(count) = 0, so the
    softmax over window + summaries is exact causal attention at any length."""
    n, window = 53, 4
    q, k, v = random_inputs(1, 2, n, 16, seed=3)
    clusters = torch.arange(n).expand(1, 2, n).contiguous()
    out = causal_clustered_attention(q, k, v, window=window, num_clusters=n, clusters=clusters)
    torch.testing.assert_close(out, exact_causal(q, k, v), atol=1e-5, rtol=1e-5)


def brute_force_causal_clustered(q, k, v, clusters, key_padding_mask, window, num_clusters):
    """The definition, one query at a time in float64: exact keys of chunks t-1 and t up
    to i, one summary per non-empty cluster of the keys before chunk t-1."""
    batch, heads, n, _ = q.shape
    scale = q.shape[-1] ** -0.5
    out = torch.zeros(batch, heads, n, v.shape[-1], dtype=torch.float64)
    valid = torch.ones(batch, n, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                start = max(0, (i // window - 1) * window)
                logits, values = [], []
                for l in range(start, i + 1):
                    if valid[b, l]:
                        logits.append(scale * float(q[b, h, i].double() @ k[b, h, l].double()))
                        values.append(v[b, h, l].double())
                for j in range(num_clusters):
                    members = [l for l in range(start) if valid[b, l] and clusters[b, h, l] == j]
                    if members:
                        key_mean = k[b, h, members].double().mean(0)
                        logits.append(scale * float(q[b, h, i].double() @ key_mean) + math.log(len(members)))
                        values.append(v[b, h, members].double().mean(0))
                if logits:
                    weights = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                    out[b, h, i] = (weights[:, None] * torch.stack(values)).sum(0)
    return out


@pytest.mark.parametrize("n,window,clusters_n,pad", [(41, 4, 3, "left"), (29, 5, 6, "right"), (17, 1, 2, "none")])
def test_matches_brute_force_definition(n, window, clusters_n, pad):
    q, k, v = random_inputs(2, 2, n, 8, seed=n)
    mask = padding_mask(pad, 2, n, seed=1)
    clusters = causal_key_clusters(k, mask, window=window, num_clusters=clusters_n, iterations=3, bits=8,
                                   generator=torch.Generator().manual_seed(0))
    out = causal_clustered_attention(q, k, v, mask, window=window, num_clusters=clusters_n, clusters=clusters)
    expected = brute_force_causal_clustered(q, k, v, clusters, mask, window, clusters_n)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_key_clusters_ignore_padding_and_use_the_whole_range():
    q, k, v = random_inputs(2, 2, 64, 16, seed=5)
    mask = padding_mask("left", 2, 64, seed=2)
    clusters = causal_key_clusters(k, mask, window=8, num_clusters=6, generator=torch.Generator().manual_seed(0))
    assert clusters.dtype == torch.int64 and clusters.shape == (2, 2, 64)
    assert torch.equal(clusters < 0, mask[:, None, :].expand(2, 2, 64))
    assert clusters.max() < 6 and clusters[~mask[:, None, :].expand(2, 2, 64)].unique().numel() > 1


# ------------------------------------------------------------------ the leak test


def run_causal(q, k, v, mask, window, num_clusters, seed):
    """The public function with clusters recomputed from the (possibly changed) keys."""
    return causal_clustered_attention(
        q, k, v, mask, window=window, num_clusters=num_clusters, iterations=4, bits=16,
        generator=torch.Generator().manual_seed(seed),  # planes drawn on the CPU, moved to q's device
    )


def change_future(tensors, mask, position, seed):
    """Copies of q, k, v and mask whose entries after ``position`` are redrawn."""
    gen = torch.Generator().manual_seed(seed)
    changed = []
    for x in tensors:
        y = x.detach().clone()
        fresh = torch.randn(y[:, :, position + 1:].shape, generator=gen).to(y.device, y.dtype) * 3
        y[:, :, position + 1:] = fresh
        changed.append(y)
    new_mask = None
    if mask is not None:
        new_mask = mask.clone()
        new_mask[:, position + 1:] = torch.rand(new_mask[:, position + 1:].shape, generator=gen).to(mask.device) < 0.5
    return changed, new_mask


def leaks(attention, q, k, v, mask, position, seed):
    """True when ``attention(q, k, v, mask)`` at positions <= ``position`` reads the future,
    through the forward values or through the gradients of out_position."""
    out = attention(q, k, v, mask)
    (q2, k2, v2), mask2 = change_future((q, k, v), mask, position, seed)
    out2 = attention(q2, k2, v2, mask2)
    if not torch.equal(out[:, :, : position + 1], out2[:, :, : position + 1]):
        return True
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    attention(*inputs, mask)[:, :, position].sum().backward()
    grads = [x.grad for x in inputs]
    assert any(g[:, :, : position + 1].abs().sum() > 0 for g in grads), "no gradient at all: a vacuous test"
    return any(g[:, :, position + 1:].abs().sum() != 0 for g in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,window,num_clusters", [(37, 4, 3), (96, 8, 5), (161, 16, 12)])
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_no_leak(device, dtype, n, window, num_clusters, pad):
    """On CUDA, bfloat16 takes the tensor-core path; float32 (and the CPU) the reference."""
    q, k, v = random_inputs(2, 2, n, 16, seed=n, device=device, dtype=dtype)
    mask = padding_mask(pad, 2, n, seed=n)
    mask = None if mask is None else mask.to(device)
    gen = torch.Generator().manual_seed(n)
    # Positions where some row already has a valid key (else out_i is zeros with no gradient).
    first = 0 if mask is None else int((~mask).any(0).nonzero()[0])
    positions = sorted(set(torch.randint(first, n - 1, (3,), generator=gen).tolist()) | {2 * window + 1})
    attention = lambda a, b, c, m: run_causal(a, b, c, m, window, num_clusters, seed=7)  # noqa: E731
    for position in positions:
        assert not leaks(attention, q, k, v, mask, position, seed=position), f"leak at position {position}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_the_cpu_reference(dtype):
    """Forward and gradients on CUDA against the fp32 CPU reference: float32 to 1e-4, half
    precision (tensor-core path) within 3x the error of half-precision SDPA."""
    n, window, num_clusters = 300, 32, 10
    q, k, v = random_inputs(2, 4, n, 64, seed=5)
    grad_out = torch.randn(2, 4, n, 64, generator=torch.Generator().manual_seed(6))
    mask = padding_mask("right", 2, n, seed=3)
    clusters = causal_key_clusters(k, mask, window=window, num_clusters=num_clusters,
                                   generator=torch.Generator().manual_seed(0))

    def run(tensors, device, run_dtype, attention=None):
        inputs = [x.detach().clone().to(device, run_dtype).requires_grad_() for x in tensors]
        if attention is None:
            out = causal_clustered_attention(*inputs, mask.to(device), window=window, num_clusters=num_clusters,
                                             clusters=clusters.to(device))
        else:
            out = attention(*inputs, mask.to(device))
        out.backward(grad_out.to(device, run_dtype))
        return [x.float().cpu() for x in (out, *[i.grad for i in inputs])]

    def relative(a, b):
        return ((a - b).norm() / b.norm()).item()

    expected = run((q, k, v), "cpu", torch.float32)
    got = run((q, k, v), "cuda", dtype)
    if dtype == torch.float32:
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        return
    sdpa32 = run((q, k, v), "cpu", torch.float32, exact_causal)
    sdpa_half = run((q, k, v), "cuda", dtype, exact_causal)
    for a, b, a_sdpa, b_sdpa in zip(got, expected, sdpa_half, sdpa32):
        assert relative(a, b) < 3 * relative(a_sdpa, b_sdpa) + 1e-3


def test_leak_test_catches_query_clustering():
    """The paper's query clustering does leak; the same check must say so (else it proves nothing)."""
    q, k, v = random_inputs(1, 2, 64, 16, seed=1)

    def query_clustered(a, b, c, m):  # causal masking per key does not stop centroids mixing queries
        outs = []
        for i in range(a.shape[2]):
            outs.append(clustered_attention(a, b[:, :, : i + 1], c[:, :, : i + 1], num_clusters=4,
                                            generator=torch.Generator().manual_seed(0))[:, :, i])
        return torch.stack(outs, 2)

    assert leaks(query_clustered, q, k, v, None, position=40, seed=3)


# ------------------------------------------------------------------ gradients and ops


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_float64(dropout_p):
    n, window, num_clusters = 23, 3, 4
    q, k, v = [x.double().requires_grad_() for x in random_inputs(1, 2, n, 6, seed=2)]
    mask = padding_mask("left", 1, n, seed=4)
    clusters = causal_key_clusters(k.detach(), mask, window=window, num_clusters=num_clusters, bits=8,
                                   generator=torch.Generator().manual_seed(0))

    def attention(a, b, c):
        return causal_clustered_attention(
            a, b, c, mask, window=window, num_clusters=num_clusters, clusters=clusters, dropout_p=dropout_p,
            generator=torch.Generator().manual_seed(5),
        )

    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_opcheck():
    n, window, num_clusters = 19, 4, 3
    q, k, v = random_inputs(2, 2, n, 8, seed=9)
    mask = padding_mask("right", 2, n, seed=3)
    codes = torch.randint(0, 2**10, (2, 2, n), generator=torch.Generator().manual_seed(0))
    clusters = causal_ops.causal_key_clusters_op(codes, mask, window, num_clusters, 3, 10)
    keep = torch.rand(2, 2, n, causal_ops.causal_logit_columns(window, num_clusters),
                      generator=torch.Generator().manual_seed(1)) > 0.2
    scale = 8 ** -0.5
    torch.library.opcheck(causal_ops.causal_key_clusters_op, (codes, mask, window, num_clusters, 3, 10))
    for keep_mask, p in ((None, 0.0), (keep, 0.2)):
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), clusters, mask, keep_mask,
                window, num_clusters, scale, p)
        torch.library.opcheck(causal_ops.causal_clustered_attention_fwd, args)
        out, lse = causal_ops.causal_clustered_attention_fwd(*args)
        torch.library.opcheck(causal_ops.causal_clustered_attention_bwd,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), clusters, mask,
                               keep_mask, out.detach(), lse, window, num_clusters, scale, p))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    q, k, v = random_inputs(1, 2, 70, 32, seed=4)
    planes = draw_hash_planes(20, 32, torch.Generator().manual_seed(0))
    kwargs = dict(window=8, num_clusters=5, bits=20, planes=planes)
    expected = causal_clustered_attention(q, k, v, **kwargs)
    out = causal_clustered_attention(q.to(dtype), k.to(dtype), v.to(dtype), **kwargs)
    assert out.dtype == dtype
    # The result may differ from fp32 where a half-precision key hashes differently.
    close = ((out.float() - expected).abs() < 0.05).float().mean()
    assert close > 0.9


# ------------------------------------------------------------------ approximation quality


def structured_inputs(batch=2, heads=2, n=512, d=32, prototypes=8, seed=0):
    """Keys near a few prototype directions (a distant past worth summarising), queries
    aimed at prototypes, random values."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(prototypes, d, generator=gen)
    centers = centers / centers.norm(dim=-1, keepdim=True) * 0.8 * d ** 0.5
    k = centers[torch.randint(0, prototypes, (batch, heads, n), generator=gen)]
    k = k + 0.1 * torch.randn(batch, heads, n, d, generator=gen)
    q = centers[torch.randint(0, prototypes, (batch, heads, n), generator=gen)]
    q = q + 0.1 * torch.randn(batch, heads, n, d, generator=gen)
    v = torch.randn(batch, heads, n, d, generator=gen)
    return q, k, v


def relative_error(out, expected):
    return ((out - expected).norm() / expected.norm()).item()


def test_summaries_approximate_the_distant_past():
    """Summaries of hashed key clusters track exact causal attention; the same softmax
    with random clusters, or with no summaries at all, does not."""
    q, k, v = structured_inputs()
    window, num_clusters = 32, 16
    expected = exact_causal(q, k, v)
    out = causal_clustered_attention(q, k, v, window=window, num_clusters=num_clusters,
                                     generator=torch.Generator().manual_seed(1))
    random_clusters = torch.randint(0, num_clusters, q.shape[:3], generator=torch.Generator().manual_seed(2))
    with_random = causal_clustered_attention(q, k, v, window=window, num_clusters=num_clusters,
                                             clusters=random_clusters)
    window_only = causal_clustered_attention(q, k, v, window=window, num_clusters=num_clusters,
                                             clusters=torch.full_like(random_clusters, -1))
    bound = 0.2
    assert relative_error(out, expected) < bound
    assert relative_error(with_random, expected) > 2 * bound
    assert relative_error(window_only, expected) > 2 * bound


# ------------------------------------------------------------------ argument errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "window must be an integer >= 1"),
    (dict(window=2.5), "window must be an integer >= 1"),
    (dict(num_clusters=0), "num_clusters must be an integer >= 1"),
    (dict(iterations=-1), "iterations must be an integer >= 0"),
    (dict(bits=64), "bits must be an integer in 1..63"),
    (dict(dropout_p=1.0), r"dropout_p must be a float in \[0, 1\)"),
    (dict(scale=-1.0), "scale must be a positive float"),
    (dict(dropout_p=0.1, planes=torch.randn(63, 8)), "dropout_p > 0 needs generator"),
    (dict(), "pass generator="),
    (dict(planes=torch.randn(5, 8)), r"planes must have shape \(bits=63, dim=8\)"),
    (dict(clusters=torch.zeros(1, 2, 40)), "clusters must be an int64 tensor of shape"),
])
def test_bad_arguments(kwargs, match):
    q, k, v = random_inputs(1, 2, 40, 8)
    kwargs.setdefault("window", 4)
    with pytest.raises(ValueError, match=match):
        causal_clustered_attention(q, k, v, **kwargs)


def test_bad_shapes():
    q, k, v = random_inputs(1, 2, 40, 8)
    with pytest.raises(ValueError, match="self-attention"):
        causal_clustered_attention(q, k[:, :, :30], v[:, :, :30], window=64)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        causal_clustered_attention(q, k, v, torch.zeros(1, 39, dtype=torch.bool), window=64)
    with pytest.raises(ValueError, match="query must have shape"):
        causal_clustered_attention(q[0], k, v, window=64)


# ------------------------------------------------------------------ fairseq module and model


def build_tiny_lm(extra_args=()):
    """A 2-layer clustered_transformer_lm over a 30-symbol dictionary, in eval mode."""
    pytest.importorskip("fairseq")
    from types import SimpleNamespace

    from fairseq import options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_clustered.models.clustered_lm import ClusteredTransformerLanguageModel

    dictionary = Dictionary()
    for index in range(26):
        dictionary.add_symbol(chr(ord("a") + index))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        "unused-data", "--task", "language_modeling", "--arch", "clustered_transformer_lm",
        "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-input-dim", "32",
        "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64",
        "--decoder-attention-heads", "4", "--tokens-per-sample", "128", "--clustered-window", "8",
        "--clustered-num-clusters", "5", "--clustered-bits", "16", "--seed", "2", *extra_args,
    ])
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    torch.manual_seed(0)  # parameter initialisation only (fairseq initialises from the global RNG)
    model_cfg = convert_namespace_to_omegaconf(args).model  # as fairseq-train passes it
    return ClusteredTransformerLanguageModel.build_model(model_cfg, task).eval(), dictionary


def test_model_uses_causal_clustered_attention_and_no_future_mask():
    model, _ = build_tiny_lm()
    attentions = model.decoder.self_attentions()
    assert [attn.attention for attn in attentions] == ["causal_clustered", "causal_clustered"]
    assert model.decoder.buffered_future_mask(torch.zeros(100, 1, 32)) is None
    full, _ = build_tiny_lm(["--clustered-layers", "1"])
    assert [attn.attention for attn in full.decoder.self_attentions()] == ["full", "causal_clustered"]
    assert full.decoder.buffered_future_mask(torch.zeros(100, 1, 32)).shape == (100, 100)


def test_model_does_not_leak():
    """The whole decoder (embeddings, layer norms, FFNs, 2 layers): logits at positions <= i
    are bit-identical when the tokens after i change; the gradient of the logits at i
    reaches no later token embedding."""
    model, dictionary = build_tiny_lm(["--clustered-layers", "all"])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (2, 100), generator=gen)
    logits = model(tokens)[0]
    for position in (3, 20, 57):
        changed = tokens.clone()
        changed[:, position + 1:] = torch.randint(dictionary.nspecial, len(dictionary),
                                                  changed[:, position + 1:].shape, generator=gen)
        assert torch.equal(model(changed)[0][:, : position + 1], logits[:, : position + 1])
    # Gradient: feed the token embeddings as a leaf tensor (a forward hook replaces them).
    embedded = model.decoder.embed_tokens(tokens).detach().requires_grad_()
    handle = model.decoder.embed_tokens.register_forward_hook(lambda module, inputs, output: embedded)
    model(tokens)[0][:, 40].sum().backward()
    handle.remove()
    assert embedded.grad[:, 41:].abs().sum() == 0 and embedded.grad[:, :41].abs().sum() > 0


def test_module_is_exact_when_the_window_covers_the_sequence():
    pytest.importorskip("fairseq")
    from fairseq.modules import MultiheadAttention

    from fairseq_clustered.modules.causal_attention import CausalClusteredMultiheadAttention

    torch.manual_seed(0)
    exact = MultiheadAttention(32, 4, self_attention=True)
    clustered = CausalClusteredMultiheadAttention(32, 4, self_attention=True, window=16, num_clusters=3)
    clustered.load_state_dict(exact.state_dict())
    x = torch.randn(30, 2, 32)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 25:] = True  # right padding
    future = torch.triu(torch.full((30, 30), float("-inf")), 1)
    expected, _ = exact(x, x, x, key_padding_mask=mask, attn_mask=future)
    out, weights = clustered(x, x, x, key_padding_mask=mask, attn_mask=future)
    assert weights is None
    torch.testing.assert_close(out[:, 0], expected[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:25, 1], expected[:25, 1], atol=1e-5, rtol=1e-5)
    # Incremental decoding: exact attention over the cache, step by step.
    state = {}
    steps = [clustered(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)[0] for t in range(30)]
    torch.testing.assert_close(torch.cat(steps)[:, 0], expected[:, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="causal future mask"):
        clustered(x, x, x, attn_mask=torch.zeros(30, 30))


def test_module_refuses_non_causal_sites():
    pytest.importorskip("fairseq")
    from fairseq_clustered.modules.causal_attention import CausalClusteredMultiheadAttention

    with pytest.raises(ValueError, match="causal \\*self\\*-attention"):
        CausalClusteredMultiheadAttention(32, 4, encoder_decoder_attention=True)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        CausalClusteredMultiheadAttention(32, 4, self_attention=True, window=0)
    with pytest.raises(ValueError, match="attention must be one of"):
        CausalClusteredMultiheadAttention(32, 4, self_attention=True, attention="clustered")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_path_error_is_that_of_half_precision_attention(dtype):
    """The CUDA path's products in half precision (run here on the CPU): its error against the
    fp32 reference stays within a small multiple of plain PyTorch attention's in that dtype."""
    n, window, num_clusters = 150, 16, 6
    q, k, v = random_inputs(2, 2, n, 32, seed=11)
    grad_out = torch.randn(2, 2, n, 32, generator=torch.Generator().manual_seed(3))
    clusters = causal_key_clusters(k, window=window, num_clusters=num_clusters, generator=torch.Generator().manual_seed(0))
    args = (clusters, None, None, window, num_clusters, 32 ** -0.5, 0.0)
    out32, lse32 = causal_ops.causal_clustered_attention_fwd_ref(q, k, v, *args)
    grads32 = causal_ops.causal_clustered_attention_bwd_ref(grad_out, q, k, v, clusters, None, None, out32, lse32,
                                                           window, num_clusters, 32 ** -0.5, 0.0)
    half = [x.to(dtype) for x in (q, k, v)]
    out, lse = causal_ops.causal_clustered_attention_fwd_ref(*half, *args, matmul_dtype=dtype)
    grads = causal_ops.causal_clustered_attention_bwd_ref(grad_out.to(dtype), *half, clusters, None, None, out, lse,
                                                         window, num_clusters, 32 ** -0.5, 0.0, matmul_dtype=dtype)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)

    def half_precision_error(x32, x):
        return ((x.float() - x32).norm() / x32.norm()).item()

    exact = exact_causal(q, k, v)
    baseline = half_precision_error(exact, exact_causal(*half))
    assert half_precision_error(out32, out) < 3 * baseline
    half_inputs = [x.detach().requires_grad_() for x in half]
    exact_causal(*half_inputs).backward(grad_out.to(dtype))
    full_inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    exact_causal(*full_inputs).backward(grad_out)
    for g32, g, x32, x in zip(grads32, grads, full_inputs, half_inputs):
        assert half_precision_error(g32, g) < 3 * half_precision_error(x32.grad, x.grad)


def test_key_clusters_op_matches_its_reference():
    """The op fits the codebook through the lloyd_kmeans op (a CUDA kernel where built);
    it must agree with the pure reference."""
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 2**20, (2, 3, 90), generator=gen)
    mask = padding_mask("left", 2, 90, seed=6)
    for window, num_clusters in ((8, 5), (50, 7), (100, 3)):
        expected = causal_ops.causal_key_clusters_ref(codes, mask, window, num_clusters, 4, 20)
        assert torch.equal(causal_ops.causal_key_clusters_op(codes, mask, window, num_clusters, 4, 20), expected)


def test_translation_decoder_can_opt_in():
    """ClusteredCausalTransformerDecoder with encoder-decoder attention (a translation
    decoder): causal clustered self-attention, exact cross-attention, no leak of target
    tokens, and incremental decoding equal to the whole pass while it is exact (<= 2W)."""
    pytest.importorskip("fairseq")
    from argparse import Namespace

    from fairseq.data import Dictionary
    from fairseq.models.transformer import base_architecture

    from fairseq_clustered.models.clustered_lm import ClusteredCausalTransformerDecoder

    dictionary = Dictionary()
    for index in range(20):
        dictionary.add_symbol(f"w{index}")
    args = Namespace(encoder_embed_dim=32, decoder_embed_dim=32, encoder_ffn_embed_dim=64,
                     decoder_ffn_embed_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_layers=1, decoder_layers=2, max_target_positions=256, max_source_positions=256,
                     clustered_window=4, clustered_num_clusters=3, clustered_bits=12, seed=5)
    base_architecture(args)
    torch.manual_seed(0)
    decoder = ClusteredCausalTransformerDecoder(
        args, dictionary, torch.nn.Embedding(len(dictionary), 32, dictionary.pad()), no_encoder_attn=False
    ).eval()
    assert [attn.attention for attn in decoder.self_attentions()] == ["causal_clustered"] * 2
    assert decoder.layers[0].encoder_attn is not None
    gen = torch.Generator().manual_seed(1)
    encoder_out = {"encoder_out": [torch.randn(7, 2, 32, generator=gen)],
                   "encoder_padding_mask": [torch.zeros(2, 7, dtype=torch.bool)]}
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (2, 30), generator=gen)
    logits = decoder(tokens, encoder_out=encoder_out)[0]
    changed = tokens.clone()
    changed[:, 16:] = dictionary.nspecial
    assert torch.equal(decoder(changed, encoder_out=encoder_out)[0][:, :16], logits[:, :16])
    state = {}
    steps = [decoder(tokens[:, : t + 1], encoder_out=encoder_out, incremental_state=state)[0] for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, 1), logits[:, :8], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad,dropout_p", [("left", 0.0), ("right", 0.25)])
def test_groups_of_chunks_give_the_same_result(monkeypatch, pad, dropout_p):
    """Long sequences are processed a group of chunks at a time (bounded memory); any
    grouping must give the result of one group, forward and backward."""
    n, window, num_clusters = 75, 4, 5
    q, k, v = random_inputs(2, 2, n, 8, seed=8)
    mask = padding_mask(pad, 2, n, seed=9)
    grad_out = torch.randn(2, 2, n, 8, generator=torch.Generator().manual_seed(2))

    def run():
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = causal_clustered_attention(*inputs, mask, window=window, num_clusters=num_clusters, bits=12,
                                         dropout_p=dropout_p, generator=torch.Generator().manual_seed(4))
        out.backward(grad_out)
        return [out] + [x.grad for x in inputs]

    whole = run()
    per_chunk_columns = 2 * 2 * window * causal_ops.causal_logit_columns(window, num_clusters)
    for chunks_per_group in (1, 3, 7):
        monkeypatch.setattr(causal_ops, "_GROUP_ELEMENTS", chunks_per_group * per_chunk_columns)
        for got, expected in zip(run(), whole):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_gradcheck_with_groups_of_chunks(monkeypatch):
    monkeypatch.setattr(causal_ops, "_GROUP_ELEMENTS", 1)  # one chunk per group
    q, k, v = [x.double().requires_grad_() for x in random_inputs(1, 1, 17, 4, seed=3)]
    clusters = torch.randint(-1, 3, (1, 1, 17), generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(
        lambda a, b, c: causal_clustered_attention(a, b, c, window=3, num_clusters=3, clusters=clusters), (q, k, v)
    )
