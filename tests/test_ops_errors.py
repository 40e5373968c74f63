"""Bad arguments raise ValueErrors that name the argument and what is allowed."""

import pytest
import torch

from fairseq_clustered.ops import (
    cluster_queries,
    clustered_attention,
    draw_hash_planes,
    hash_queries,
    improved_clustered_attention,
)


@pytest.fixture
def qkv():
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 2, 10, 8, generator=gen) for _ in range(3))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(num_clusters=0), r"num_clusters must be an integer >= 1, got 0"),
        (dict(num_clusters=2.5), r"num_clusters must be an integer >= 1"),
        (dict(bits=0), r"bits must be an integer in 1\.\.63, got 0"),
        (dict(bits=64), r"bits must be an integer in 1\.\.63, got 64"),
        (dict(iterations=-1), r"iterations must be an integer >= 0, got -1"),
        (dict(dropout_p=1.0), r"dropout_p must be a float in \[0, 1\)"),
        (dict(scale=-1.0), r"scale must be a positive float"),
    ],
)
@pytest.mark.parametrize("fn", [clustered_attention, improved_clustered_attention])
def test_bad_hyperparameters(fn, qkv, gen, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn(*qkv, generator=gen, **kwargs)


@pytest.mark.parametrize("topk", [0, -3])
def test_bad_topk(qkv, gen, topk):
    with pytest.raises(ValueError, match=rf"topk must be an integer >= 1, got {topk}"):
        improved_clustered_attention(*qkv, generator=gen, topk=topk)


def test_mismatched_shapes(qkv, gen):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"key dim 4 must equal query dim 8"):
        clustered_attention(q, k[..., :4], v, generator=gen)
    with pytest.raises(ValueError, match=r"value has 9 positions but key has 10"):
        clustered_attention(q, k, v[:, :, :9], generator=gen)
    with pytest.raises(ValueError, match=r"agree on \(batch, heads\)"):
        clustered_attention(q, k[:1], v[:1], generator=gen)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, heads, queries, dim\)"):
        clustered_attention(q[0], k, v, generator=gen)


def test_mismatched_dtypes(qkv, gen):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"key has dtype torch.float16 but query has torch.float32"):
        clustered_attention(q, k.half(), v, generator=gen)
    with pytest.raises(ValueError, match=r"query must be float16, bfloat16, float32 or float64"):
        clustered_attention(q.long(), k.long(), v.long(), generator=gen)


def test_mismatched_devices(qkv, gen):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"value is on meta but query is on cpu"):
        clustered_attention(q, k, v.to("meta"), generator=gen)


@pytest.mark.parametrize(
    "mask,pattern",
    [
        (torch.zeros(2, 9, dtype=torch.bool), r"key_padding_mask must have shape \(batch=2, length=10\), got \(2, 9\)"),
        (torch.zeros(2, 10), r"key_padding_mask must be a bool tensor"),
        (torch.zeros(10, dtype=torch.bool), r"key_padding_mask must have shape \(batch=2, length=10\)"),
    ],
)
def test_bad_key_padding_mask(qkv, gen, mask, pattern):
    with pytest.raises(ValueError, match=pattern):
        clustered_attention(*qkv, mask, generator=gen)


def test_bad_query_padding_mask(qkv, gen):
    with pytest.raises(ValueError, match=r"query_padding_mask must have shape \(batch=2, length=10\)"):
        improved_clustered_attention(*qkv, None, torch.zeros(2, 3, dtype=torch.bool), generator=gen)


def test_randomness_must_be_explicit(qkv):
    with pytest.raises(ValueError, match=r"pass generator= .* or planes="):
        clustered_attention(*qkv)
    planes = draw_hash_planes(63, 8, torch.Generator())
    with pytest.raises(ValueError, match=r"dropout_p > 0 needs generator="):
        clustered_attention(*qkv, planes=planes, dropout_p=0.1)


def test_bad_planes_and_clusters(qkv, gen):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"planes must have shape \(bits=63, dim=8\), got \(63, 7\)"):
        clustered_attention(q, k, v, planes=torch.zeros(63, 7))
    with pytest.raises(ValueError, match=r"bits \(planes.shape\[0\]\) must be an integer in 1\.\.63, got 64"):
        hash_queries(q, torch.zeros(64, 8))
    with pytest.raises(ValueError, match=r"clusters must be an int64 tensor of shape \(2, 2, 10\)"):
        clustered_attention(q, k, v, clusters=torch.zeros(2, 2, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"num_clusters must be an integer >= 1"):
        cluster_queries(q, num_clusters=0, generator=gen)


def test_quick_input_check_agrees_with_the_full_checks(qkv, monkeypatch):
    """``check_attention_inputs`` first asks a quick predicate, and runs the checks that explain the
    error only where it says no: the predicate must accept exactly what the full checks accept."""
    from fairseq_clustered.ops import validation
    quick_check_accepts = validation._attention_inputs_fit
    monkeypatch.setattr(validation, "_attention_inputs_fit", lambda *_: False)  # the full checks alone

    def full_checks_accept(*args) -> bool:
        try:
            validation.check_attention_inputs(*args)
            return True
        except ValueError:
            return False

    q, k, v = qkv
    mask = torch.zeros(2, 10, dtype=torch.bool)
    cases = [
        (q, k, v, None, None), (q, k, v, mask, mask), (q, k[:, :, :7], v[:, :, :7], mask[:, :7], mask),
        (q, k, v[..., :3], None, None),  # a value dim of its own
        (q, k, v, mask[:1], None), (q, k, v, None, mask[:, :9]), (q, k, v, mask.float(), None),
        (q, k, v, None, mask.to("meta")), (q, k, v, mask.tolist(), None),
        (q, k[:1], v[:1], None, None), (q, k[:, :1], v, None, None), (q, k, v[:, :, :9], None, None),
        (q, k[..., :4], v, None, None), (q[:, :, :0], k, v, None, None), (q, k[:, :, :0], v[:, :, :0], None, None),
        (q, k.double(), v, None, None), (q, k, v.half(), None, None), (q.int(), k.int(), v.int(), None, None),
        (q, k.to("meta"), v, None, None), (q[0], k, v, None, None), (q, k, v[None], None, None),
        (q.tolist(), k, v, None, None), (q, k, None, None, None),
    ]
    for case in cases:
        assert quick_check_accepts(*case) == full_checks_accept(*case), [getattr(t, "shape", t) for t in case[:3]]
    assert sum(quick_check_accepts(*case) for case in cases) == 4  # the first four are valid
