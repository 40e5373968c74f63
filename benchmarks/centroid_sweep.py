"""The centroid attention kernels' launch settings: GPU time and error against float64.

The clustered variant's centroid attention runs on ``ops/centroid_triton.py``'s kernels where
flash attention cannot take it (key padding, dropout, fp32 inputs), and its backward runs there
for every input the kernels take (twenty-fourth session: the kernel writes dk, dv where the
caller wants them, flash allocates them and a cached graph copied them out). For every
combination of keys per step, warps, pipeline stages, the most programs of a launch
(``centroid_triton.TARGET_PROGRAMS``), the fewest keys of a program (``MIN_KEYS_PER_PROGRAM``,
``--min-keys``), the most centroids of a forward program (``--centroids``: a row's
centroids in tiles of that many) and, in fp32, precision, this prints the forward's and the
backward's microseconds (graph replays, so without launch overhead; "-" where the setting does
not compile, e.g. more shared memory than an SM has) and their largest errors against a float64
computation, beside those of the same computation in torch in the inputs' dtype (fp32 with TF32
off; fp16 / bf16 with the centroids and gradients rounded to it as the kernels take them), the
bar of the tests (a kernel may err at most twice as much).

fp32 products are built from bf16 tensor-core products: Triton's ``bf16x6`` (both operands split
into three bf16 parts at every product), ``split`` (the same six products of parts split by the
kernel, the loop-invariant centroids and their gradients once, before the loop over the keys) or
``fp16x3`` (two fp16 parts per operand, each tile scaled by a power of two into fp16's range,
three products: 22 bits instead of 24; ``--value-scale`` / ``--grad-scale`` skew the inputs to
check the scaling). ``--precision`` is ignored for fp16 / bf16 (their products are native)::

    python benchmarks/centroid_sweep.py --lengths 4096,16384 --precision bf16x6,split \\
        --keys 16,32,64 --warps 4,8 --programs 132,264
    python benchmarks/centroid_sweep.py --dim 128 --precision split --keys 16,32 --warps 8 --stages 1,2
    python benchmarks/centroid_sweep.py --lengths 16384 --precision split,fp16x3 --keys 32 --warps 8 \\
        --value-scale 1e4 --grad-scale 1e-6
    python benchmarks/centroid_sweep.py --dtype bfloat16 --keys 64,128 --warps 4,8 --masked
    python benchmarks/centroid_sweep.py --dtype bfloat16 --lengths 1024,2048,4096 --keys 64 --warps 4 \\
        --centroids 32,64,128

In fp16 / bf16 without ``--masked`` a row "flash" times the route the clustered forward takes
instead for heads wider than ``CudaOps.TRITON_FORWARD_MAX_DIM``: flash's kernels on the centroids
rounded to the key dtype, the merge of its key blocks and the cast of the values to fp32 (its
error: of the values).

rows = B * H = 32, C = 100 centroids, D = 64 (``--dim``), no padding or dropout (``--masked``: the
last tenth of each row's keys padded and a dropout keep mask of rate 0.1): the clustered op's
configuration of ``bench_attention.py``. Errors are relative to the largest magnitude of each
float64 result. (This script was ``centroid_fp32_sweep.py`` until the twenty-fourth session.)
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fairseq_clustered.ops import centroid_triton  # noqa: E402
from fairseq_clustered.ops.cuda_kernels import CudaOps  # noqa: E402
from lloyd_sweep import graph_microseconds  # noqa: E402

NAMES = ("Vbar", "dqbar", "dk", "dv")


def exact(qbar, key, value, grad, scale, dtype, padding=None, keep=None, dropout_p=0.0):
    """Vbar and the gradients of ``sum(Vbar * grad)`` for qbar, key, value, in ``dtype``; ``padding
    (B, S)`` True where a key is padded, ``keep (B, H, C, S)`` the dropout keep mask of rate ``dropout_p``."""
    rows, num_clusters, dim = qbar.shape
    q, k, v = (x.to(dtype).reshape(rows, -1, dim).requires_grad_(True) for x in (qbar, key, value))
    logits = scale * q @ k.transpose(1, 2)
    if padding is not None:
        heads = rows // padding.shape[0]
        logits = logits.masked_fill(padding.repeat_interleave(heads, 0)[:, None, :], float("-inf"))
    probs = torch.softmax(logits, -1)
    if keep is not None:
        probs = probs * keep.reshape(rows, num_clusters, -1).to(dtype) / (1 - dropout_p)
    values = probs @ v
    return (values.detach(), *torch.autograd.grad((values * grad.to(dtype)).sum(), (q, k, v)))


def errors(results, oracle):
    """Largest |result - oracle| over the oracle's largest magnitude, per result."""
    return [((r.double().reshape(o.shape) - o).abs().max() / o.abs().max()).item() for r, o in zip(results, oracle)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="of the keys and values (the centroids are fp32)")
    parser.add_argument("--masked", action="store_true",
                        help="key padding (each row's last tenth) and dropout 0.1, as in fairseq's training")
    parser.add_argument("--precision", default="bf16x6,split")
    parser.add_argument("--keys", default="16,32,64", help="keys per step")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="3", help="Triton's num_stages (software pipelining depth)")
    parser.add_argument("--programs", default=str(centroid_triton.TARGET_PROGRAMS),
                        help="values of centroid_triton.TARGET_PROGRAMS (the most programs of a launch)")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--value-scale", type=float, default=1.0,
                        help="multiplies the values (skewed inputs: the kernels' fp16 splits scale their operands)")
    parser.add_argument("--grad-scale", type=float, default=1.0, help="multiplies the gradient of Vbar")
    parser.add_argument("--min-keys", default=str(centroid_triton.MIN_KEYS_PER_PROGRAM),
                        help="values of centroid_triton.MIN_KEYS_PER_PROGRAM (the fewest keys a program takes: "
                             "with TARGET_PROGRAMS, how many programs a row's keys are split over)")
    parser.add_argument("--centroids", default=str(centroid_triton.MAX_CLUSTERS),
                        help="values of the forward's LAUNCH setting 'centroids' (the most centroids one program "
                             "holds: a power of two in 16..128)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("centroid_sweep.py needs a CUDA GPU (it times kernels there)")
    torch.backends.cuda.matmul.allow_tf32 = False
    batch, heads, dim, scale = 4, 8, args.dim, args.dim ** -0.5
    dtype = getattr(torch, args.dtype)
    half = dtype != torch.float32
    dropout_p = 0.1 if args.masked else 0.0
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; rows={batch * heads} C={args.clusters} "
          f"D={dim} {args.dtype}{', padding and dropout 0.1' if args.masked else ''}, values x {args.value_scale:g}, "
          f"gradient x {args.grad_scale:g}; errors relative to float64's largest magnitude")
    print(f"{'N':>6} {'precision':>9} {'keys':>4} {'warps':>5} {'stages':>6} {'progs':>5} {'min':>5} {'cent':>4} "
          f"{'fwd us':>7} "
          f"{'bwd us':>7}  "
          + "  ".join(f"{name:>8}" for name in NAMES))
    # the LAUNCH entries these calls read (the head dim's, the unmasked one or the dtype's)
    entries = [centroid_triton.launch_entry(kernel, dtype, dim, args.masked) for kernel in ("fwd", "bwd")]
    precisions = ["native"] if half else args.precision.split(",")
    numbers = [[int(v) for v in values.split(",")] for values in (args.keys, args.warps, args.stages, args.programs,
                                                                    args.min_keys, args.centroids)]
    originals = {name: dict(centroid_triton.LAUNCH[name]) for name in entries}
    target_programs, min_keys = centroid_triton.TARGET_PROGRAMS, centroid_triton.MIN_KEYS_PER_PROGRAM
    try:
        for length in (int(n) for n in args.lengths.split(",")):
            generator = torch.Generator("cuda").manual_seed(length)
            qbar, grad = (torch.randn(batch * heads, args.clusters, dim, device="cuda", generator=generator)
                          for _ in range(2))
            key, value = (torch.randn(batch, heads, length, dim, device="cuda", generator=generator).to(dtype)
                          for _ in range(2))
            value, grad = value * args.value_scale, grad * args.grad_scale
            padding = keep = None
            if args.masked:
                padding = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
                padding[:, length - length // 10:] = True
                keep = torch.rand(batch, heads, args.clusters, length, device="cuda", generator=generator) >= dropout_p
            if half:  # the kernels take the centroids and the gradient in the keys' dtype
                qbar, grad = qbar.to(dtype).float(), grad.to(dtype).float()
            masks = dict(padding=padding, keep=keep, dropout_p=dropout_p)
            oracle = exact(qbar, key, value, grad, scale, torch.float64, **masks)
            own = errors(exact(qbar, key, value, grad, scale, dtype, **masks), oracle)
            print(f"{length:>6} {'torch':>9} {'':>4} {'':>5} {'':>6} {'':>5} {'':>5} {'':>4} {'':>7} {'':>7}  "
                  + "  ".join(f"{e:>8.2e}" for e in own))
            if half and not args.masked:
                def flash():  # the clustered forward's flash route, with its cast of the values to fp32
                    out, lse, _ = CudaOps._flash_fwd(qbar, key, value, scale, batch, heads)
                    return out.reshape(batch * heads, args.clusters, dim).float(), lse

                flash_error = errors(flash()[:1], oracle[:1])[0]
                print(f"{length:>6} {'flash':>9} {'':>4} {'':>5} {'':>6} {'':>5} {'':>5} {'':>4} "
                      f"{graph_microseconds(flash):7.1f} "
                      f"{'':>7}  {flash_error:>8.2e}", flush=True)
            for precision, keys, warps, stages, programs, fewest, centroids in itertools.product(precisions, *numbers):
                centroid_triton.TARGET_PROGRAMS, centroid_triton.MIN_KEYS_PER_PROGRAM = programs, fewest
                setting = (f"{length:>6} {precision:>9} {keys:>4} {warps:>5} {stages:>6} {programs:>5} {fewest:>5} "
                           f"{centroids:>4}")
                for name in entries:
                    centroid_triton.LAUNCH[name] = {"num_warps": warps, "keys": keys, "num_stages": stages,
                                                    **({} if half else {"precision": precision})}
                centroid_triton.LAUNCH[entries[0]]["centroids"] = centroids  # the forward's entry

                def forward():
                    return centroid_triton.centroid_attention_fwd(qbar, key, value, padding, keep, scale, dropout_p)

                try:
                    values, lse = forward()
                    fwd_us = f"{graph_microseconds(forward):7.1f}"
                except Exception as error:  # a setting that does not compile (shared memory, registers)
                    print(f"{setting} {'-':>7} {'-':>7}  "
                          f"forward fails: {type(error).__name__}: {str(error)[:120]}")
                    continue

                def backward():
                    return centroid_triton.centroid_attention_bwd(grad, values, qbar, key, value, padding, keep, lse,
                                                                  scale, dropout_p)

                try:
                    grads = backward()
                    bwd_us = f"{graph_microseconds(backward):7.1f}"
                except Exception as error:
                    print(f"{setting} {fwd_us} {'-':>7}  "
                          f"backward fails: {type(error).__name__}: {str(error)[:120]}")
                    continue
                print(f"{setting} {fwd_us} {bwd_us}  "
                      + "  ".join(f"{e:>8.2e}" for e in errors((values, *grads), oracle)), flush=True)
    finally:
        centroid_triton.LAUNCH.update(originals)
        centroid_triton.TARGET_PROGRAMS, centroid_triton.MIN_KEYS_PER_PROGRAM = target_programs, min_keys


if __name__ == "__main__":
    main()
