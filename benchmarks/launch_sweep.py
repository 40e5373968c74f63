"""Launch settings of our Triton kernels compared on the GPU, in one process.

For every combination of the values given, the forward+backward of an op (its public
function, as a user calls it) is timed with CUDA events, and its output compared with
the first combination's: a launch setting may change the speed, and the result only by
rounding. ``kernel_resources.py`` says, without a GPU, which settings spill registers;
this script says which is faster.

    python benchmarks/launch_sweep.py --op causal --window 256 --lengths 16384,65536 \\
        --set causal.fwd.num_warps=4,8
    python benchmarks/launch_sweep.py --op clustered --dropout 0.1 --lengths 4096,8192 \\
        --set centroid.bwd.num_warps=4,8

``--set TABLE.KERNEL.OPTION=V1,V2,...`` (repeatable) names a launch table (``causal``:
``causal_triton.LAUNCH``; ``centroid``: ``centroid_triton.LAUNCH``; ``improved``:
``improved_triton.LAUNCH``), an entry and an option; values are integers or, where the
option takes a name (the centroid kernels' fp32 ``precision``), names. The ops' graph cache
is cleared between combinations (a cached graph would replay the previous kernels). B = 4,
H = 8, D = 64 (``--dim``), bf16 (``--dtype``), C = 100, 10 Lloyd iterations, 63 bits, as
``bench_attention.py``.
"""

import argparse
import importlib
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TABLES = {"causal": "fairseq_clustered.ops.causal_triton", "centroid": "fairseq_clustered.ops.centroid_triton",
          "improved": "fairseq_clustered.ops.improved_triton"}


def parse_setting(text: str):
    """``TABLE.KERNEL.OPTION=V1,V2`` -> (the table's entry dict, option, [values])."""
    name, _, values = text.partition("=")
    parts = name.split(".")
    if len(parts) != 3 or not values:
        raise SystemExit(f"--set {text!r}: expected TABLE.KERNEL.OPTION=V1,V2,... (tables: {', '.join(TABLES)})")
    table, kernel, option = parts
    if table not in TABLES:
        raise SystemExit(f"--set {text!r}: unknown table {table!r}; choose from {', '.join(TABLES)}")
    launch = importlib.import_module(TABLES[table]).LAUNCH
    if kernel not in launch:
        raise SystemExit(f"--set {text!r}: {table} has no entry {kernel!r}; its entries: {', '.join(launch)}")
    return launch[kernel], option, [int(v) if v.lstrip("-").isdigit() else v for v in values.split(",")]


def make_op(args, dim):
    """The op under test: ``fn(q, k, v, seed) -> out`` (the seed draws the dropout mask)."""
    from fairseq_clustered.ops import causal_clustered_attention, clustered_attention, improved_clustered_attention

    planes = torch.randn(63, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    common = dict(num_clusters=args.clusters, iterations=10, bits=63, planes=planes)
    if args.op == "causal":
        return lambda q, k, v, seed: causal_clustered_attention(q, k, v, window=args.window, **common)
    chosen = clustered_attention if args.op == "clustered" else improved_clustered_attention
    extra = {} if args.op == "clustered" else {"topk": args.topk}
    return lambda q, k, v, seed: chosen(q, k, v, dropout_p=args.dropout, **common, **extra,
                                        generator=torch.Generator("cuda").manual_seed(seed))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=["causal", "clustered", "improved"], required=True)
    parser.add_argument("--set", action="append", required=True, metavar="TABLE.KERNEL.OPTION=V1,V2")
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--window", type=int, default=128, help="causal: the window")
    parser.add_argument("--dim", type=int, default=64, help="head dim")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--topk", type=int, default=32, help="improved: the top keys")
    parser.add_argument("--dropout", type=float, default=0.0, help="clustered / improved: attention dropout")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    settings = [parse_setting(text) for text in args.set]
    if not torch.cuda.is_available():
        raise SystemExit("launch_sweep.py times kernels on the GPU: no CUDA device here")
    from bench_attention import timer
    from fairseq_clustered.ops.cuda_backend import graph_cache

    batch, heads, dim = 4, 8, args.dim
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    op = make_op(args, dim)
    names = [text.partition("=")[0] for text in args.set]
    originals = [entry.get(option) for entry, option, _ in settings]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.op}, B={batch} H={heads} D={dim} "
          f"{args.dtype} C={args.clusters}" + (f" W={args.window}" if args.op == "causal" else f" dropout={args.dropout}"))
    print(f"{'N':>6}  {'  '.join(names)}  {'fwd+bwd ms':>10}  {'max |out - first|':>17}")
    try:
        for length in (int(n) for n in args.lengths.split(",")):
            generator = torch.Generator("cuda").manual_seed(1)
            q, k, v, grad = (torch.randn(batch, heads, length, dim, device="cuda", dtype=dtype,
                                         generator=generator) for _ in range(4))
            for x in (q, k, v):
                x.requires_grad_(True)
            first = None
            for combination in itertools.product(*(values for _, _, values in settings)):
                for (entry, option, _), value in zip(settings, combination):
                    entry[option] = value
                cache = graph_cache()
                if cache is not None:
                    cache.clear()
                with torch.no_grad():
                    out = op(q, k, v, 0).float()
                first = out if first is None else first
                difference = (out - first).abs().max().item()

                def step():
                    op(q, k, v, 0).backward(grad)

                milliseconds = timer("cuda", step, args.repeats)
                for x in (q, k, v):
                    x.grad = None
                print(f"{length:>6}  " + "  ".join(f"{value:>{len(name)}}" for name, value in zip(names, combination))
                      + f"  {milliseconds:>10.3f}  {difference:>17.3g}")
    finally:
        for (entry, option, _), original in zip(settings, originals):
            if original is None:
                entry.pop(option, None)
            else:
                entry[option] = original


if __name__ == "__main__":
    main()
