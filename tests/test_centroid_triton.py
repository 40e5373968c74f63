"""The centroid attention with key padding and dropout in Triton (ops/centroid_triton.py).

Oracle: a brute-force float64 computation of ``Vbar = (softmax(scale qbar K^T) * z) V`` over
the unpadded keys (``z = keep / (1 - p)``) and its gradients by autograd, from the same
centroids the kernels read (rounded to the key dtype). Without a GPU in Triton's interpreter
on CPU tensors (fp16 and fp32), on a GPU compiled in bf16, fp16 and fp32 (each fp32 product
as six bf16 products of three-part splits: near fp32's accuracy, which the fp32 tolerance
checks; in the interpreter the parts are fp16, see ``centroid_triton._launch``). The clustered op that uses these kernels is checked against the reference in test_cuda_kernels.py.
"""

import pytest
import torch

from fairseq_clustered.ops import _triton, centroid_triton
from triton_support import DEVICE, DTYPES, runs_here  # tests/: on the path under pytest


def problem(keys, dim, num_clusters, dtype, pad, dropout_p, seed):
    """Centroids, keys and values (viewed from (B, S, H, D) memory, as fairseq's are), a
    padding mask whose batch 1 loses its last third (batch 0 loses every key with
    ``pad == "all"``), a keep mask and the gradient of Vbar."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads = 2, 2
    rows = batch * heads
    qbar = torch.randn(rows, num_clusters, dim, generator=gen).to(DEVICE)
    key, value = (torch.randn(batch, keys, heads, dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
                  for _ in range(2))
    padding = None
    if pad:
        padding = torch.zeros(batch, keys, dtype=torch.bool)
        padding[1, keys - keys // 3:] = True
        if pad == "all":
            padding[0] = True
        padding = padding.to(DEVICE)
    keep = None
    if dropout_p > 0:
        keep = (torch.rand(batch, heads, num_clusters, keys, generator=gen) >= dropout_p).to(DEVICE)
    grad = torch.randn(rows, num_clusters, dim, generator=gen).to(DEVICE)
    return qbar, key, value, padding, keep, grad


def brute_force(qbar, key, value, padding, keep, dropout_p, scale, grad):
    """Vbar, lse (+inf for rows without a valid key) and the gradients, in float64."""
    rows, num_clusters, dim = qbar.shape
    batch, heads, keys, _ = key.shape
    q = qbar.to(key.dtype).double().requires_grad_(True)  # the kernels read the centroids in the key dtype
    k = key.double().reshape(rows, keys, dim).requires_grad_(True)
    v = value.double().reshape(rows, keys, dim).requires_grad_(True)
    logits = scale * q @ k.transpose(1, 2)
    if padding is not None:
        logits = logits.masked_fill(padding.repeat_interleave(heads, 0)[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    if keep is not None:
        probs = probs * keep.reshape(rows, num_clusters, keys).double() / (1 - dropout_p)
    values = probs @ v
    grads = torch.autograd.grad((values * grad.double()).sum(), (q, k, v))
    return values.detach(), torch.where(torch.isneginf(lse), float("inf"), lse).detach(), grads


TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-5}


def assert_close(name, actual, expected, dtype):
    tol = TOLERANCE[dtype]
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol * (1 + expected.abs().max().item()), f"{name}: max error {err}"


@runs_here
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("keys,dim,num_clusters,pad,dropout_p", [
    (97, 32, 5, True, 0.0),       # fewer centroids than the smallest tile, one key range
    (300, 16, 20, False, 0.3),    # two key ranges merged by their log-sum-exps; dropout alone
    (1100, 32, 100, True, 0.1),   # the default C, five ranges, padding and dropout
    (130, 64, 7, "all", 0.2),     # batch 0 has no valid key: zeros, lse = +inf, zero gradients
    (200, 128, 100, True, 0.1),   # 128-wide heads (their own launch settings in fp32)
])
def test_matches_brute_force(dtype, keys, dim, num_clusters, pad, dropout_p):
    qbar, key, value, padding, keep, grad = problem(keys, dim, num_clusters, dtype, pad, dropout_p, seed=keys)
    scale = dim ** -0.5
    values, lse = centroid_triton.centroid_attention_fwd(qbar, key, value, padding, keep, scale, dropout_p)
    ref_values, ref_lse, (ref_dq, ref_dk, ref_dv) = brute_force(qbar, key, value, padding, keep, dropout_p, scale,
                                                                grad)
    assert values.dtype == lse.dtype == torch.float32
    assert_close("values", values, ref_values, dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close("lse", lse[finite], ref_lse[finite], dtype)

    dq, dk, dv = centroid_triton.centroid_attention_bwd(grad, values, qbar, key, value, padding, keep, lse, scale,
                                                        dropout_p)
    assert dq.dtype == torch.float32 and dk.dtype == dv.dtype == dtype and dk.shape == key.shape
    assert_close("dqbar", dq, ref_dq, dtype)
    assert_close("dk", dk.reshape(ref_dk.shape), ref_dk, dtype)
    assert_close("dv", dv.reshape(ref_dv.shape), ref_dv, dtype)
    if pad == "all":
        heads = key.shape[1]
        assert (values[:heads] == 0).all() and (dq[:heads] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()


@runs_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keys,num_clusters", [(97, 5), (1100, 100)])  # one key range; five
def test_log_sum_exp_term_in_the_same_pass(dtype, keys, num_clusters):
    """``lse_weight`` adds the gradient of ``-sum_j c_j lse_j`` (the improved variant's dense term)
    to that of ``sum_j <grad_j, Vbar_j>``, as float64 autograd of the two gives it; with
    ``partial_qbar`` the centroid gradient comes in parts (one per key range) that sum to it."""
    qbar, key, value, _, _, grad = problem(keys, 32, num_clusters, dtype, False, 0.0, seed=keys + 1)
    weight = 3 * torch.randn(qbar.shape[:2], generator=torch.Generator().manual_seed(9)).to(DEVICE)
    rows, dim, scale = qbar.shape[0], qbar.shape[-1], 32 ** -0.5
    q = qbar.to(key.dtype).double().requires_grad_(True)
    k = key.double().reshape(rows, keys, dim).requires_grad_(True)
    v = value.double().reshape(rows, keys, dim).requires_grad_(True)
    logits = scale * q @ k.transpose(1, 2)
    lse = torch.logsumexp(logits, -1)
    values = torch.softmax(logits, -1) @ v
    expected = torch.autograd.grad((values * grad.double()).sum() - (weight.double() * lse).sum(), (q, k, v),
                                   retain_graph=True)

    got_values, got_lse = centroid_triton.centroid_attention_fwd(qbar, key, value, None, None, scale, 0.0)
    parts, dk, dv = centroid_triton.centroid_attention_bwd(grad, got_values, qbar, key, value, None, None, got_lse,
                                                           scale, 0.0, lse_weight=weight, partial_qbar=True)
    block_n = centroid_triton._launch("bwd", dtype, dim, masked=False)["BLOCK_N"]
    per_program = centroid_triton._programs_per_row(rows, keys, block_n)
    assert parts.dtype == torch.float32 and parts.shape == (rows, per_program[0], num_clusters, dim)
    for name, actual, want in zip(("dqbar", "dk", "dv"), (parts.sum(1), dk, dv), expected):
        assert_close(name, actual.reshape(want.shape), want, dtype)
    # the term moves the key and centroid gradients by more than the tolerance (not a no-op)
    plain = torch.autograd.grad((values * grad.double()).sum(), (q, k))
    assert (plain[1] - expected[1]).abs().max().item() > 5 * TOLERANCE[dtype] * (1 + expected[1].abs().max().item())


def test_launch_entries():
    """Each kernel's launch settings: the head dim's own entry first, then (inputs without padding or
    dropout) the unmasked one, then the dtype's; the half-precision backward without masks steps
    128 keys with 8 warps (twenty-fourth session's sweep), with masks 64 with 4."""
    entry = centroid_triton.launch_entry
    assert entry("bwd", torch.bfloat16, 64, masked=False) == "bwd_unmasked"
    assert entry("bwd", torch.float16, 64, masked=True) == "bwd"
    assert entry("bwd", torch.bfloat16, 128, masked=False) == "bwd_d128"
    assert entry("bwd", torch.float32, 64, masked=False) == "bwd_fp32"
    assert entry("fwd", torch.bfloat16, 64, masked=False) == "fwd"
    assert centroid_triton._launch("bwd", torch.bfloat16, 64, masked=False)["BLOCK_N"] == 128
    assert centroid_triton._launch("bwd", torch.bfloat16, 64, masked=True)["BLOCK_N"] == 64


@runs_here
@pytest.mark.parametrize("value_scale,grad_scale", [(1.0, 1.0), (1e4, 1e-6), (1e-4, 1e3)])
def test_fp32_from_scaled_fp16_parts(monkeypatch, value_scale, grad_scale):
    """fp32 through the "fp16x3" products (two fp16 parts per operand, each tile scaled by a power of
    two into fp16's range; three products): within the fp32 tolerance of the float64 brute force
    for values and gradients far outside fp16's range (1e4 x 1e-6: without the scaling the
    gradients' low parts would fall below fp16's subnormals, and the values' products overflow)."""
    for name in ("fwd_fp32", "bwd_fp32"):
        monkeypatch.setitem(centroid_triton.LAUNCH, name, dict(centroid_triton.LAUNCH[name], precision="fp16x3"))
    assert centroid_triton._launch("bwd", torch.float32, 32, masked=True)["PARTS"] == 2
    qbar, key, value, padding, keep, grad = problem(1100, 32, 100, torch.float32, True, 0.1, seed=3)
    value, grad = value * value_scale, grad * grad_scale
    scale = 32 ** -0.5
    values, lse = centroid_triton.centroid_attention_fwd(qbar, key, value, padding, keep, scale, 0.1)
    ref_values, _, ref_grads = brute_force(qbar, key, value, padding, keep, 0.1, scale, grad)
    dq, dk, dv = centroid_triton.centroid_attention_bwd(grad, values, qbar, key, value, padding, keep, lse, scale, 0.1)
    for name, actual, expected in zip(("values", "dqbar", "dk", "dv"), (values, dq, dk, dv), (ref_values, *ref_grads)):
        err = (actual.double().reshape(expected.shape) - expected).abs().max().item()
        assert err <= TOLERANCE[torch.float32] * expected.abs().max().item(), f"{name}: max error {err}"


@runs_here
@pytest.mark.parametrize("centroids", [16, 32, 64, 128])
@pytest.mark.parametrize("keys,num_clusters,pad,dropout_p", [
    (1100, 100, True, 0.1),   # the default C in 2 to 7 tiles, several key ranges, padding and dropout
    (300, 37, "all", 0.0),    # a last tile mostly empty; batch 0 without a valid key
])
def test_forward_in_centroid_tiles(monkeypatch, centroids, keys, num_clusters, pad, dropout_p):
    """With ``LAUNCH``'s ``"centroids"`` below C, a row's centroids take several programs (each
    merging its own key ranges, with its own ticket): the values and log-sum-exps of the float64
    brute force, as with one tile (128: the tile that holds all of C)."""
    dtype = DTYPES[0]
    entry = centroid_triton.launch_entry("fwd", dtype, 32, masked=True)
    monkeypatch.setitem(centroid_triton.LAUNCH, entry, dict(centroid_triton.LAUNCH[entry], centroids=centroids))
    assert centroid_triton._centroid_tile(entry, num_clusters) == min(centroids, 1 << (num_clusters - 1).bit_length())
    qbar, key, value, padding, keep, grad = problem(keys, 32, num_clusters, dtype, pad, dropout_p, seed=centroids)
    values, lse = centroid_triton.centroid_attention_fwd(qbar, key, value, padding, keep, 32 ** -0.5, dropout_p)
    ref_values, ref_lse, _ = brute_force(qbar, key, value, padding, keep, dropout_p, 32 ** -0.5, grad)
    assert_close("values", values, ref_values, dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close("lse", lse[finite], ref_lse[finite], dtype)


def test_centroid_tile_settings(monkeypatch):
    """``"centroids"``: a power of two in 16..128, for the forward only; a tile larger than C's own
    takes C's (one program per key range)."""
    monkeypatch.setitem(centroid_triton.LAUNCH, "fwd", dict(centroid_triton.LAUNCH["fwd"], centroids=64))
    assert centroid_triton._centroid_tile("fwd", 20) == 32 and centroid_triton._centroid_tile("fwd", 100) == 64
    assert "centroids" not in centroid_triton._launch("fwd", torch.bfloat16, 64, masked=True)
    for wrong in (8, 48, 256):
        monkeypatch.setitem(centroid_triton.LAUNCH, "fwd", dict(centroid_triton.LAUNCH["fwd"], centroids=wrong))
        with pytest.raises(ValueError, match=r"LAUNCH\['fwd'\]\['centroids'\] must be a power of two in 16..128"):
            centroid_triton._centroid_tile("fwd", 100)
    monkeypatch.setitem(centroid_triton.LAUNCH, "bwd", dict(centroid_triton.LAUNCH["bwd"], centroids=64))
    with pytest.raises(ValueError, match="'centroids' is a forward setting"):
        centroid_triton._launch("bwd", torch.bfloat16, 64, masked=True)


@runs_here
def test_bit_reproducible():
    qbar, key, value, padding, keep, grad = problem(300, 32, 20, DTYPES[0], True, 0.2, seed=1)
    runs = []
    for _ in range(2):
        values, lse = centroid_triton.centroid_attention_fwd(qbar, key, value, padding, keep, 0.2, 0.2)
        runs.append((values, lse, *centroid_triton.centroid_attention_bwd(grad, values, qbar, key, value, padding,
                                                                          keep, lse, 0.2, 0.2)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@runs_here
@pytest.mark.parametrize("keys,num_clusters", [(512, 20), (1024, 100)])
def test_unmasked_even_steps_match_the_masked_code(monkeypatch, keys, num_clusters):
    """Without padding or dropout, on key ranges of whole steps, the forward compiles with constant
    key validity (``UNMASKED_EVEN_STEPS``): the masked code's values within rounding (compiled on a
    GPU the bits differ: the arithmetic around the dropped selection compiles differently), and the
    float64 brute force's."""
    dtype = DTYPES[0]
    qbar, key, value, _, _, grad = problem(keys, 32, num_clusters, dtype, False, 0.0, seed=keys)
    launch = centroid_triton._launch("fwd", dtype, 32, masked=False)
    rows, tiles = qbar.shape[0], -(-num_clusters // centroid_triton._centroid_tile("fwd", num_clusters))
    parts, per_program = centroid_triton._programs_per_row(rows * tiles, keys, launch["BLOCK_N"])
    assert parts > 1 and keys % per_program == 0  # several ranges, each whole steps: the constant path
    even = centroid_triton.centroid_attention_fwd(qbar, key, value, None, None, 0.2, 0.0)
    monkeypatch.setattr(centroid_triton, "UNMASKED_EVEN_STEPS", False)
    masked = centroid_triton.centroid_attention_fwd(qbar, key, value, None, None, 0.2, 0.0)
    assert_close("values against the masked code", even[0], masked[0].double(), dtype)
    assert_close("lse against the masked code", even[1], masked[1].double(), dtype)
    expected, expected_lse, _ = brute_force(qbar, key, value, None, None, 0.0, 0.2, grad)
    assert_close("values", even[0], expected, dtype)
    assert_close("lse", even[1], expected_lse, dtype)


@runs_here
def test_tickets_given_by_the_caller():
    """``tickets``: int32 zeros the caller cleared (the clustered forward's segment sum clears them in
    its own launch) serve as the forward's own, ``forward_tickets`` of them: the same bits; tickets of
    another count or dtype are refused, naming them."""
    qbar, key, value, padding, keep, _ = problem(300, 32, 20, DTYPES[0], True, 0.2, seed=3)
    rows, num_clusters = qbar.shape[:2]
    expected = centroid_triton.centroid_attention_fwd(qbar, key, value, padding, keep, 0.2, 0.2)
    count = centroid_triton.forward_tickets(rows, num_clusters, key, True)
    assert count > 0  # several key ranges per row: the tickets elect the merging program
    tickets = torch.zeros(count, dtype=torch.int32, device=key.device)
    got = centroid_triton.centroid_attention_fwd(qbar, key, value, padding, keep, 0.2, 0.2, tickets=tickets)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for wrong in (torch.zeros(count + 1, dtype=torch.int32), torch.zeros(count, dtype=torch.int64)):
        with pytest.raises(ValueError, match="tickets must be"):
            centroid_triton.centroid_attention_fwd(qbar, key, value, padding, keep, 0.2, 0.2,
                                                   tickets=wrong.to(key.device))


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU: the programs race for the merge only there")
def test_ranges_merged_in_the_launch_gpu():
    """The forward's programs merge their key ranges themselves: the last of a row's programs to take
    a ticket reads the others' outputs (written from other SMs) and merges them in range order. At
    the benchmark's shape (32 rows, 8 ranges each, all programs resident at once, so which comes
    last varies) 30 launches give the same bits, close to float64; a stale read would not."""
    gen = torch.Generator().manual_seed(5)
    rows, num_clusters, dim, keys = 32, 100, 64, 4096
    qbar = torch.randn(rows, num_clusters, dim, generator=gen).cuda()
    key, value = (torch.randn(4, 8, keys, dim, generator=gen).cuda().to(torch.bfloat16) for _ in range(2))
    parts, _ = centroid_triton._programs_per_row(rows, keys, centroid_triton._launch("fwd", key.dtype, dim, False)
                                                 ["BLOCK_N"])
    assert parts > 1
    runs = [centroid_triton.centroid_attention_fwd(qbar, key, value, None, None, 0.125, 0.0) for _ in range(30)]
    for values, lse in runs[1:]:
        assert torch.equal(values, runs[0][0]) and torch.equal(lse, runs[0][1])
    expected, expected_lse, _ = brute_force(qbar, key, value, None, None, 0.0, 0.125, torch.zeros_like(qbar))
    assert_close("values", runs[0][0], expected, torch.bfloat16)
    assert_close("lse", runs[0][1], expected_lse, torch.bfloat16)


@runs_here
def test_gradients_written_into_given_tensors():
    """``grad_key`` / ``grad_value`` (a CUDA graph's filled arguments) receive dk / dv, the very
    tensors returned, equal to those of a call that makes its own (they start as NaN, so an element
    left unwritten shows); a tensor the kernel cannot write is refused, naming it."""
    qbar, key, value, padding, keep, grad = problem(300, 32, 20, DTYPES[0], True, 0.2, seed=2)
    values, lse = centroid_triton.centroid_attention_fwd(qbar, key, value, padding, keep, 0.2, 0.2)
    _, dk, dv = centroid_triton.centroid_attention_bwd(grad, values, qbar, key, value, padding, keep, lse, 0.2, 0.2)
    given_k, given_v = (torch.full_like(x, float("nan")) for x in (key, value))
    _, got_k, got_v = centroid_triton.centroid_attention_bwd(grad, values, qbar, key, value, padding, keep, lse, 0.2,
                                                             0.2, grad_key=given_k, grad_value=given_v)
    assert got_k is given_k and got_v is given_v
    assert torch.equal(given_k, dk) and torch.equal(given_v, dv)
    with pytest.raises(ValueError, match="grad_value must be"):
        centroid_triton.centroid_attention_bwd(grad, values, qbar, key, value, padding, keep, lse, 0.2, 0.2,
                                               grad_value=torch.empty_like(value).transpose(-1, -2))


def test_unavailable_reasons():
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    if _triton.MISSING is not None:
        assert centroid_triton.triton_centroid_unavailable(q, q, 100) == _triton.MISSING
        return
    assert centroid_triton.triton_centroid_unavailable(q, q, 128) is None
    assert "num_clusters 129" in centroid_triton.triton_centroid_unavailable(q, q, 129)
    assert centroid_triton.triton_centroid_unavailable(q.float(), q.float(), 100) is None
    wide = torch.zeros(1, 1, 4, 128)
    assert centroid_triton.triton_centroid_unavailable(wide, wide, 100) is None  # fp32 at D = 128 as well
    assert "dtype" in centroid_triton.triton_centroid_unavailable(q.double(), q.double(), 100)
    assert "head dim 48" in centroid_triton.triton_centroid_unavailable(q[..., :48], q[..., :48], 100)
