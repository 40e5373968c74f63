"""Registers, spills and shared memory of our Triton kernels on Hopper, without a GPU.

Device time is scarce; whether a kernel variant spills registers is not. This script runs
an op's host code on CPU tensors with every Triton kernel of its module replaced by a
recorder, so each launch is captured with its real arguments, grid, constexprs, warps and
stages; then compiles each distinct launch for ``sm_90a`` (H100 / H200) with the
argument types and the 16-divisibility specialisation a GPU launch would get, and runs
``ptxas -v`` on the PTX. The table gives, per kernel: registers per thread, spill stores
and loads (bytes per thread), shared memory, how many programs fit on one SM by
registers and by shared memory, and a hash of the SASS instructions: a refactoring that
leaves the hash unchanged leaves the machine code unchanged, so it needs no GPU to show
that it costs nothing.

Compile with the Triton of the GPU machine (3.6.0 there; the version is printed): the
register allocation changes between versions. Its wheel installs anywhere, e.g.

    pip download --no-deps --only-binary=:all: --python-version 3.11 \\
        --platform manylinux_2_28_x86_64 -d /tmp/wheels triton==3.6.0
    pip install --no-deps --target /tmp/triton36 /tmp/wheels/triton-3.6.0-*.whl
    PYTHONPATH=/tmp/triton36 .venv/bin/python benchmarks/kernel_resources.py --window 128

Ops: ``--op causal`` (``fairseq_clustered/ops/causal_triton.py``, forward and backward;
``--module PATH`` compiles that file's kernels instead, say a variant under test or
main's copy, imported under a private name) and ``--op clustered`` (the Triton kernels of
the non-causal GPU path: hash, centroid attention, the improved variant's top keys and
exact products; ``--dropout`` for the centroid kernels with a keep mask).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REGISTERS_PER_SM = 65536
SHARED_MEMORY_PER_SM = 227 * 1024  # sm_90 has 228 KiB per SM and reserves 1 KiB per block: a round bound


@dataclass
class Launch:
    """One recorded kernel launch: the kernel (a ``triton.JITFunction``), grid and arguments."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records, runs nothing."""

    def __init__(self, kernel, launches: List[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid), args, dict(kwargs)))
        return launch


def load_module(path: Optional[str], default: str):
    """The module at ``path`` (imported under a private name, inside the package so that
    its relative imports resolve), or the package module ``default``."""
    if path is None:
        return importlib.import_module(default)
    package = default.rsplit(".", 1)[0]
    name = f"{package}._kernel_resources_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    spec.loader.exec_module(module)
    return module


def record_launches(module, run) -> List[Launch]:
    """The launches ``run()`` makes with every top-level Triton kernel of ``module`` recorded."""
    import triton

    launches: List[Launch] = []
    kernels = {name: obj for name, obj in vars(module).items() if isinstance(obj, triton.runtime.jit.JITFunction)}
    try:
        for name, kernel in kernels.items():
            setattr(module, name, _Recorder(kernel, launches))
        run()
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return launches


def causal_launches(module, length: int, window: int, num_clusters: int, dim: int, dtype: torch.dtype,
                    groups: int) -> List[Launch]:
    """The launches of causal_triton's forward and backward on ``(1, groups, length, dim)``
    CPU inputs (the kernels do not run: the values are irrelevant, the shapes are real)."""
    generator = torch.Generator().manual_seed(0)
    query, key, value, grad_out = (torch.randn(1, groups, length, dim, generator=generator).to(dtype)
                                   for _ in range(4))
    clusters = torch.randint(0, num_clusters, (1, groups, length), generator=generator)
    scale = dim ** -0.5

    def run():
        out, lse, summary_keys, summary_values, counts = module.forward(query, key, value, clusters, window,
                                                                        num_clusters, scale)
        module.backward(grad_out, query, key, value, clusters, out, lse, summary_keys, summary_values, counts,
                        window, num_clusters, scale)

    return record_launches(module, run)


def clustered_launches(length: int, num_clusters: int, dim: int, top_k: int, dtype: torch.dtype,
                       groups: int, dropout: bool) -> List[Launch]:
    """The Triton launches of (improved) clustered attention's GPU path on ``(1, groups,
    length, dim)`` CPU inputs: the hash, the centroid attention forward and backward
    (``dropout``: with a keep mask, as in training), the improved variant's centroid top
    keys, top-key summaries, exact top-key products forward and backward, top-key and centroid
    gradients and gradient sums. (Lloyd, the sort and the broadcast are CUDA kernels of the extension,
    and the key-split merge of ``ops/flash.py`` runs only on CUDA tensors: not covered.)"""
    from fairseq_clustered.ops import centroid_triton, hash_triton, improved_triton

    generator = torch.Generator().manual_seed(0)
    query, key, value, grad_out = (torch.randn(1, groups, length, dim, generator=generator).to(dtype)
                                   for _ in range(4))
    rows = groups
    qbar = torch.randn(rows, num_clusters, dim, generator=generator)
    keep = torch.rand(1, groups, num_clusters, length, generator=generator) > 0.1 if dropout else None
    order = torch.arange(length).repeat(rows, 1)
    seg_start = torch.linspace(0, length, num_clusters + 1).long().repeat(rows, 1)
    top = torch.randint(0, length, (rows, num_clusters, top_k), generator=generator)
    mass = torch.rand(rows, num_clusters, generator=generator)
    rest = torch.randn(rows, num_clusters, dim, generator=generator)
    scale = dim ** -0.5
    launches: List[Launch] = []

    def run_hash():
        hash_triton.hash_codes_triton(query, torch.randn(63, dim, generator=generator), torch.zeros(63))

    def run_centroids():
        values, lse = centroid_triton.centroid_attention_fwd(qbar, key, value, None, keep, scale,
                                                             0.1 if dropout else 0.0)
        centroid_triton.centroid_attention_bwd(values, values, qbar, key, value, None, keep, lse, scale,
                                               0.1 if dropout else 0.0)

    def run_improved():
        lse, _ = improved_triton.centroid_top_keys(qbar, key.reshape(rows, length, dim), scale, top_k)
        improved_triton.top_key_summary(qbar, key.reshape(rows, length, dim), value.reshape(rows, length, dim),
                                        top, lse, scale, rest)
        improved_triton.exact_top_keys_fwd(query, key, value, order, seg_start, top, mass, rest, scale)
        grad_dot = improved_triton.exact_top_keys_fwd(query, key, value, order, seg_start, top, mass, rest, scale,
                                                      grad_out)
        grad_key = torch.zeros(rows, length, dim)
        improved_triton.exact_top_keys_bwd(grad_out, query, key, value, order, seg_start, top, mass, rest, scale,
                                           grad_key, torch.zeros_like(grad_key), grad_dot=grad_dot)
        weight, grad_top = improved_triton.top_key_gradients(
            qbar, key.reshape(rows, length, dim), value.reshape(rows, length, dim), top, lse, rest, mass, scale,
            grad_key, torch.zeros_like(grad_key))
        # the eager step's form: the Triton centroid backward's parts, the lse term already in them
        parts = torch.randn(1, groups, 2, num_clusters, dim, generator=generator)
        improved_triton.centroid_gradients(parts, grad_top, seg_start)
        improved_triton.sum_gradients(grad_key, key)

    runs = ((hash_triton, run_hash), (centroid_triton, run_centroids), (improved_triton, run_improved))
    if dtype == torch.float32:  # the improved variant's kernels take fp16 / bf16 only
        runs = runs[:2]
    for module, run in runs:
        launches += record_launches(module, run)
    return launches


def compile_launch(launch: Launch):
    """``launch`` compiled for sm_90a as a GPU launch would be -> (compiled kernel, its
    constexprs, its options)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    kernel = launch.kernel
    names = [p.name for p in kernel.params]
    values = dict(zip(names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k in names})
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        # The runtime's own specialisation: the type, and "D" where a pointer is 16-byte
        # aligned or an integer a multiple of 16 (integers equal to 1 become constants).
        kind, specialization = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif specialization:
            attrs[(index,)] = BaseBackend.parse_attr(specialization)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return compiled, constexprs, options


def _ptxas() -> str:
    """The ptxas Triton itself assembles sm_90 code with (it chose the PTX version to match)."""
    from triton import knobs
    from triton.backends.nvidia import compiler

    if hasattr(compiler, "get_ptxas"):  # newer Triton: a separate ptxas for sm_90 and up
        return compiler.get_ptxas(90).path
    return knobs.nvidia.ptxas.path


def assemble(ptx: str) -> Dict[str, object]:
    """``ptx`` assembled for sm_90a once (Triton's ptxas, as Triton itself does: the same
    SASS) -> registers, spill_stores, spill_loads, stack (bytes per thread) from ``ptxas
    -v``, and ``sass_sha256``: a hash of that binary's SASS instructions alone
    (``cuobjdump -sass``, addresses and line information left out), so that a refactoring
    that leaves it unchanged runs the same."""
    ptxas = _ptxas()
    with tempfile.TemporaryDirectory() as folder:
        source, binary = os.path.join(folder, "kernel.ptx"), os.path.join(folder, "kernel.cubin")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas, "-arch=sm_90a", "-v", source, "-o", binary], capture_output=True, text=True)
        text = result.stdout + result.stderr
        if result.returncode != 0:
            raise RuntimeError(f"ptxas failed: {text.strip()}")
        listing = subprocess.run([os.path.join(os.path.dirname(ptxas), "cuobjdump"), "-sass", binary],
                                 capture_output=True, text=True, check=True).stdout

    def number(pattern):
        match = re.search(pattern, text)
        return int(match.group(1)) if match else 0

    instructions = [re.sub(r"/\*[0-9a-f]+\*/", "", line).split(";")[0].strip()
                    for line in listing.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack": number(r"(\d+) bytes stack frame"),
            "sass_sha256": hashlib.sha256("\n".join(instructions).encode()).hexdigest()[:12]}


def report(launches: List[Launch]) -> List[dict]:
    """One row per distinct launch configuration, in launch order."""
    rows, seen = [], set()
    for launch in launches:
        compiled, constexprs, options = compile_launch(launch)
        key = (launch.kernel.__name__, tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        resources = assemble(compiled.asm["ptx"])
        warps = options.get("num_warps", 4)
        shared = compiled.metadata.shared
        by_registers = REGISTERS_PER_SM // max(1, resources["registers"] * 32 * warps)
        by_shared = SHARED_MEMORY_PER_SM // shared if shared else None
        rows.append({"kernel": launch.kernel.__name__, "grid": "x".join(str(g) for g in launch.grid),
                     "warps": warps, "stages": options.get("num_stages", ""),
                     "constexprs": " ".join(f"{k}={v}" for k, v in constexprs.items()),
                     **resources, "shared_kib": round(shared / 1024, 1),
                     "programs_per_sm": min(by_registers, by_shared) if by_shared is not None else by_registers})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=["causal", "clustered"], default="causal")
    parser.add_argument("--module", default=None,
                        help="causal: compile this file's kernels instead of causal_triton's")
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--topk", type=int, default=32, help="clustered: the improved variant's top keys")
    parser.add_argument("--dropout", action="store_true", help="clustered: centroid attention with dropout")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=2, help="batch x heads of the recorded call")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                        help="fp32: clustered only, its hash and centroid attention")
    parser.add_argument("--launches-only", action="store_true",
                        help="list the recorded launches (grid, warps, constexprs) without compiling")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the interpreter's kernels cannot be compiled; unset it")
    for option in ("length", "window", "clusters", "dim", "groups", "topk"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be positive, got {getattr(args, option)}")

    import triton

    if args.module is not None and args.op != "causal":
        parser.error("--module applies to --op causal")
    if args.dtype == "fp32" and args.op != "clustered":
        parser.error("--dtype fp32 applies to --op clustered (the causal kernels take fp16 / bf16)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.op == "causal":
        module = load_module(args.module, "fairseq_clustered.ops.causal_triton")
        launches = causal_launches(module, args.length, args.window, args.clusters, args.dim, dtype, args.groups)
        what = f"causal_triton from {module.__file__}; W={args.window}"
    else:
        launches = clustered_launches(args.length, args.clusters, args.dim, args.topk, dtype, args.groups,
                                      args.dropout)
        what = f"clustered (hash, centroid and improved kernels); k={args.topk}, dropout {args.dropout}"
    print(f"# triton {triton.__version__}, sm_90a; {what}; N={args.length} C={args.clusters} D={args.dim} "
          f"{args.dtype}, B*H={args.groups}")
    if args.launches_only:
        rows = [{"kernel": launch.kernel.__name__, "grid": list(launch.grid),
                 "kwargs": dict(launch.kwargs)} for launch in launches]
        for row in rows:
            print(f"{row['kernel']:<30} grid {'x'.join(map(str, row['grid'])):<12} {row['kwargs']}")
        write_json(args.json, rows)
        return rows
    rows = report(launches)
    print(f"{'kernel':<30} {'warps':>5} {'regs':>5} {'spill st':>8} {'spill ld':>8} {'smem KiB':>8} "
          f"{'progs/SM':>8} {'SASS hash':>12}  constexprs")
    for row in rows:
        print(f"{row['kernel']:<30} {row['warps']:>5} {row['registers']:>5} {row['spill_stores']:>8} "
              f"{row['spill_loads']:>8} {row['shared_kib']:>8} {row['programs_per_sm']:>8} {row['sass_sha256']:>12}"
              f"  {row['constexprs']}")
    write_json(args.json, rows)
    return rows


def write_json(path: Optional[str], rows: List[dict]) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(rows, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
