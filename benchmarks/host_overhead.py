"""Where the CPU time of an eager clustered-attention step goes, layer by layer (CUDA only).

Below 8k positions an eager forward+backward of our ops is bound by the host issuing it,
not by the GPU (benchmarks/NOTES.md). For the clustered, improved (``--topk``) and causal
variants this script prints:

* a timeline of one step, synchronised before each step: the public function's checks,
  the autograd Function's forward, the composition and the graph replay inside it,
  autograd's way to the backward, the backward's composition and replay, and the way back;
* layers of the step, each timed alone: the whole step, the registered CUDA compositions
  called directly, the graph cache's replays (copies included), the bare graph replays,
  the copies, the cache keys, the step with the compositions memoised, an autograd
  Function that does nothing, and a one-input step through a Python Function against one
  through a view (a C++ node): what a Python backward node costs autograd's device thread;
* the CPU cost of the single calls these are made of (a launch, an allocation, a copy, a
  replay, the stream handle).

Layers and single calls are the CPU time to *issue* the work, over short bursts (so that
the GPU's queue never fills and blocks the host), median over bursts, in microseconds.
``--torch-copies`` makes the graph cache copy with torch's per-dtype copies instead of
the extension's one launch, to compare the two in one process; ``--trace`` adds the torch
profiler's CPU events of a step, ``--python-profile`` cProfile's time per Python function.

    python benchmarks/host_overhead.py --lengths 1024,4096
    python benchmarks/host_overhead.py --variants improved --lengths 2048
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from fairseq_clustered import ops
from fairseq_clustered.ops import cuda_backend, custom_ops, graph_cache


def empty_function(saved=None):
    """A ``torch.autograd.Function`` of ``(query, key, value)`` that does no work: it saves ``saved``
    (its own inputs where None) and returns fresh tensors, so that a step through it times autograd
    alone (also ``host_layers_cpu.py``'s floor)."""

    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value):
            ctx.save_for_backward(*((query, key, value) if saved is None else saved))
            return torch.empty_like(query)

        @staticmethod
        def backward(ctx, grad_out):
            ctx.saved_tensors
            return torch.empty_like(grad_out), torch.empty_like(grad_out), torch.empty_like(grad_out)

    return Empty


def one_input_function():
    """A ``torch.autograd.Function`` of one tensor that does no work: its output is fresh, its
    gradient the incoming one (so its step costs what a view's does, but for the Python node)."""

    class One(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query):
            return torch.empty_like(query)

        @staticmethod
        def backward(ctx, grad_out):
            return grad_out

    return One


def issue_us(fn, burst: int = 10, bursts: int = 15) -> float:
    """Median CPU microseconds to issue one ``fn()`` (bursts of ``burst`` calls, synchronised between)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(bursts):
        start = time.perf_counter()
        for _ in range(burst):
            fn()
        times.append((time.perf_counter() - start) / burst * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


@contextlib.contextmanager
def without_table(cache):
    """The graph cache without its C++ table (``cuda/graph_table.cpp``): the steps take the Python path."""
    table, cache.native = cache.native, None
    try:
        yield
    finally:
        cache.native = table


def latest_entry(cache, name):
    """The most recently replayed graph of composition ``name``."""
    return [entry for key, entry in cache._entries.items() if key[0] == name][-1]


# Per variant: the autograd Function of ops/eager.py, and the CudaOps methods its forward and
# backward call (the packed ones for clustered and improved: the backward from what the forward kept).
FUNCTIONS = {"clustered": "ClusteredAttention", "improved": "ImprovedClusteredAttention",
             "causal": "CausalClusteredAttention"}
METHODS = {"clustered": ("clustered_fwd_packed", "clustered_bwd_packed"),
           "improved": ("improved_fwd_packed", "improved_bwd_packed"), "causal": ("causal_fwd", "causal_bwd")}


def variant_calls(variant: str, q, k, v, planes, grad, args):
    """``(public, compositions, forward graph's name, backward graph's name)``: the public function's
    forward, and the registered CUDA compositions of its forward and backward called directly (no
    autograd), as ops/eager.py calls them."""
    cuda_ops = cuda_backend.cuda_ops()
    offsets = torch.zeros(args.bits, device=q.device)
    scale = q.shape[-1] ** -0.5
    q_, k_, v_ = q.detach(), k.detach(), v.detach()
    clustering = dict(num_clusters=args.clusters, iterations=args.iterations, bits=args.bits, planes=planes)
    if variant == "causal":
        fwd_args = (q_, k_, v_, None, planes, offsets, args.window, args.clusters, args.iterations, args.bits, scale)

        def public():
            return ops.causal_clustered_attention(q, k, v, window=args.window, **clustering)

        def compositions():
            out, lse, sk, sv, counts, clusters = cuda_ops.causal_fwd(*fwd_args)
            cuda_ops.causal_bwd(grad, q_, k_, v_, clusters, out, lse, sk, sv, counts, args.window, args.clusters,
                                scale)
        return public, compositions, "causal_clustered_attention_fwd", "causal_clustered_attention_bwd"
    if variant == "improved":
        def public():
            return ops.improved_clustered_attention(q, k, v, topk=args.topk, **clustering)

        def compositions():
            out, packed = cuda_ops.improved_fwd_packed(
                q_, k_, v_, planes, offsets, None, args.iterations, args.bits, None, None, args.clusters, args.topk,
                scale, 0.0)
            cuda_ops.improved_bwd_packed(grad, q_, k_, v_, packed, None, None, args.clusters, args.topk, scale, 0.0)
        return (public, compositions, "improved_clustered_attention_fwd_packed",
                "improved_clustered_attention_bwd_packed")

    def public():
        return ops.clustered_attention(q, k, v, **clustering)

    shape, strides, dtype = custom_ops.query_gradient_layout(q)

    def compositions():
        out, packed = cuda_ops.clustered_fwd_packed(q_, k_, v_, planes, offsets, None, args.iterations, args.bits,
                                                    None, None, args.clusters, scale, 0.0)
        dq = torch.empty_strided(shape, strides, dtype=dtype, device=q.device)
        cuda_ops.clustered_bwd_packed(grad, dq, k_, v_, packed, None, None, args.clusters, scale, 0.0)
    return public, compositions, "clustered_attention_fwd_packed", "clustered_attention_bwd_packed"


def layers(variant: str, q, k, v, planes, args):
    """(label, fn) pairs from the whole step down to the bare replays, and the input and output
    counts of the forward and backward graphs."""
    cuda_ops = cuda_backend.cuda_ops()
    grad = torch.randn_like(q)
    public, compositions, fwd_name, bwd_name = variant_calls(variant, q, k, v, planes, grad, args)

    def step():
        for t in (q, k, v):
            t.grad = None
        public().backward(grad)

    def forward_no_grad():
        with torch.no_grad():
            public()

    step()
    step()  # the signatures are captured now
    cache = cuda_ops.graphs
    compositions()
    compositions()  # captured by now, as the step's were
    # the tensors each composition hands the cache (outputs it fills included), as its replays take them
    seen = {}
    real_run = cache.run

    def recording_run(name, fn, call_args, filled=(), **kwargs):
        seen[name] = list(call_args)
        return real_run(name, fn, call_args, filled, **kwargs)

    cache.run = recording_run
    try:
        compositions()
    finally:
        del cache.run  # the class's method again
    fwd_entry, bwd_entry = latest_entry(cache, fwd_name), latest_entry(cache, bwd_name)
    fwd_tensors, bwd_tensors = ([a for a in seen[name] if isinstance(a, torch.Tensor)] for name in (fwd_name, bwd_name))

    in_place = graph_cache.settings().inputs_in_place

    def replays():
        cache._replay(fwd_entry, fwd_tensors, in_place)
        cache._replay(bwd_entry, bwd_tensors, in_place)

    def bare_replays():
        fwd_entry.graph.replay()
        bwd_entry.graph.replay()

    # A step's forward writes a new output tensor each time, so its graph's kernels are pointed at a
    # new address before each replay (GraphInputs); these alternate between two outputs.
    written = next(iter(fwd_entry.filled_outputs.values()), 0)  # the output's tensor (the causal variant: q)
    other_output = [torch.empty_like(t) if i == written else t for i, t in enumerate(fwd_tensors)]
    toggle = [fwd_tensors, other_output]

    def forward_replays_new_output():
        toggle.reverse()
        cache._replay(fwd_entry, toggle[0], in_place)

    def forward_replays_same_output():
        cache._replay(fwd_entry, fwd_tensors, in_place)

    def forward_pointing_only():
        toggle.reverse()
        if fwd_entry.inputs is not None:
            fwd_entry.inputs.point_at(fwd_entry.executable, [t.data_ptr() for t in toggle[0]])

    def copies():
        cache._copy_into(fwd_entry.static_tensors, fwd_tensors)
        cache._copy_into(bwd_entry.static_tensors, bwd_tensors)
        for entry in (fwd_entry, bwd_entry):
            cache._fresh_copies(entry.outputs)

    Trivial = empty_function(saved=bwd_tensors[1:])  # saves as many tensors as ours

    def autograd_only():
        for t in (q, k, v):
            t.grad = None
        Trivial.apply(q, k, v).backward(grad)

    # Autograd's hand-over to a Python backward against a C++ one: a step of one input through a
    # Python Function that does nothing, and through a view (a C++ node that does nothing either).
    # On CUDA both backward nodes run on autograd's device thread, and only the Python one needs
    # the GIL there, which the waiting caller holds until the engine releases it.
    One = one_input_function()

    def autograd_python_one():
        q.grad = None
        One.apply(q).backward(grad)

    def autograd_cpp_one():
        q.grad = None
        q.view_as(q).backward(grad)

    memo = {}

    def memo_run(name, fn, call_args, filled=(), **kwargs):
        if name not in memo:
            memo[name] = real_run(name, fn, call_args, filled, **kwargs)
        return memo[name]

    def python_only():
        cache.run = memo_run
        try:
            with without_table(cache):
                step()
        finally:
            del cache.run

    def python_step():
        with without_table(cache):
            step()

    def cache_keys():  # as GraphCache.run builds them: the extension's graph_signature where it has one
        for name in (fwd_name, bwd_name):
            call_args = seen[name]
            if cache._native_signature is not None:
                cache._native_signature(name, call_args, ())
            else:
                graph_cache._signature(name, call_args)
            graph_cache.settings()

    return [("step: public function + backward", step),
            ("step through Python (the C++ table off)", python_step), ("forward only, no_grad", forward_no_grad),
            ("compositions called directly (no autograd)", compositions),
            ("graph cache replays (copies in/out, replay)", replays), ("bare graph replays", bare_replays),
            ("forward replay, the same output tensor", forward_replays_same_output),
            ("forward replay, a new output tensor", forward_replays_new_output),
            ("forward: pointing the graph at a new output only", forward_pointing_only),
            ("copies in and out only", copies), ("cache keys + settings only", cache_keys),
            ("step with the compositions memoised (Python only)", python_only),
            ("autograd alone (a Function doing nothing)", autograd_only),
            ("autograd, one input: a Python Function doing nothing", autograd_python_one),
            ("autograd, one input: a C++ node (a view)", autograd_cpp_one)], \
        (len(fwd_entry.static_tensors), len(fwd_entry.outputs), len(bwd_entry.static_tensors),
         len(bwd_entry.outputs))


def timeline(variant: str, step, steps: int = 60):
    """Median CPU microseconds between the landmarks of one step (synchronised before each
    step, so that no queued GPU work can hold the host up): the autograd Function's forward
    and backward, the compositions inside them, and the graph cache's replays inside those."""
    cuda_ops = cuda_backend.cuda_ops()
    function = getattr(ops.eager, FUNCTIONS[variant])
    forward_method, backward_method = METHODS[variant]
    stamps = []

    def stamped(label, fn):
        def wrapper(*call_args, **kwargs):
            stamps.append((f"{label} in", time.perf_counter()))
            result = fn(*call_args, **kwargs)
            stamps.append((f"{label} out", time.perf_counter()))
            return result
        return wrapper

    raw_backward = function.__dict__["backward"]
    function.apply = stamped("apply", function.apply)
    function.backward = staticmethod(stamped("backward", function.backward))
    for method in (forward_method, backward_method):
        setattr(cuda_ops, method, stamped(method, getattr(cuda_ops, method)))
    cuda_ops.graphs.run = stamped("run", cuda_ops.graphs.run)
    cuda_ops.graphs._replay = stamped("replay", cuda_ops.graphs._replay)
    fresh_copies = cuda_ops.graphs._fresh_copies  # an instance attribute: restored below
    cuda_ops.graphs._fresh_copies = stamped("fresh copies", fresh_copies)
    graphs = [entry.graph for entry in cuda_ops.graphs._entries.values()]
    for graph in graphs:  # the launch itself, inside the replay
        graph.replay = stamped("graph launch", graph.replay)
    segments = {}
    try:
        for _ in range(steps):
            torch.cuda.synchronize()
            stamps.clear()
            stamps.append(("start", time.perf_counter()))
            with without_table(cuda_ops.graphs):  # the Python path's landmarks
                step()
            stamps.append(("end", time.perf_counter()))
            seen = {}
            for i, (label, t) in enumerate(stamps):  # the second replay of a step is "replay in #2"
                seen[label] = seen.get(label, 0) + 1
                stamps[i] = (label if seen[label] == 1 else f"{label} #{seen[label]}", t)
            for (a, ta), (b, tb) in zip(stamps, stamps[1:]):
                segments.setdefault(f"{a} -> {b}", []).append((tb - ta) * 1e6)
    finally:
        function.backward = raw_backward
        del function.apply  # the inherited classmethod again
        for name in (forward_method, backward_method):
            delattr(cuda_ops, name)
        for name in ("run", "_replay"):
            delattr(cuda_ops.graphs, name)
        cuda_ops.graphs._fresh_copies = fresh_copies
        for graph in graphs:
            del graph.replay
    print(f"  timeline of a {variant} step (synchronised before each step), median us:")
    for label, values in segments.items():
        print(f"    {label:60s} {statistics.median(values):8.1f}")


def trace(label, fn, steps=5):
    """The CPU-side events (torch ops and CUDA runtime calls) of ``steps`` calls of ``fn``, by own time."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    print(f"  trace of {label}: CPU events by own time, per step")
    for e in events[:22]:
        print(f"    {e.self_cpu_time_total / steps:8.1f} us {e.count / steps:5.1f}x  {e.key[:80]}")


def single_calls(q):
    small = torch.zeros(64, device=q.device)
    other = torch.zeros(64, device=q.device)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        small.add_(1)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        small.add_(1)
    # the replay's CPU time against the graph's kernel count (a composition's graph holds tens)
    chains = {}
    for kernels in (10, 50, 100):
        chains[kernels] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(chains[kernels]):
            for _ in range(kernels):
                small.add_(1)
    return [("small kernel (add_)", lambda: small.add_(1)),
            ("empty_like of q", lambda: torch.empty_like(q)),
            ("_foreach_copy_ of one small tensor", lambda: torch._foreach_copy_([small], [other])),
            ("copy_ of one small tensor", lambda: small.copy_(other)),
            ("replay of a one-kernel graph", graph.replay),
            *((f"replay of a {n}-kernel graph", chain.replay) for n, chain in chains.items()),
            ("current_stream().cuda_stream", lambda: torch.cuda.current_stream(q.device).cuda_stream),
            ("_cuda_getCurrentRawStream", lambda: torch._C._cuda_getCurrentRawStream(q.device.index)),
            ("q.view(torch.uint8)", lambda: q.view(torch.uint8)),
            ("torch.empty of 1 MB", lambda: torch.empty(2**20, dtype=torch.uint8, device=q.device)),
            ("torch.is_grad_enabled + is_compiling", lambda: (torch.is_grad_enabled(), torch.compiler.is_compiling())),
            ("Python call + tuple(q.shape), stride, dtype", lambda: (tuple(q.shape), q.stride(), q.dtype, q.device))]


def python_profile(label, fn, steps=2000, rows=28):
    """cProfile's own time per Python function over ``steps`` calls of ``fn``, per step (the
    profiler's hooks add about a microsecond to every call, so small functions look larger)."""
    import cProfile
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(steps):
        fn()
        if i % 10 == 9:
            torch.cuda.synchronize()  # keep the GPU's queue short, as issue_us does
    profiler.disable()
    print(f"  cProfile of {label}: own / cumulative us per step, calls per step")
    print_profile(profiler, steps, rows, indent="    ")


def print_profile(profiler, steps: int, rows: int, indent: str = "  ") -> None:
    """The ``rows`` functions of a ``cProfile.Profile`` with the most own time: own and cumulative
    microseconds and calls per step, over the ``steps`` it ran (also ``host_layers_cpu.py``'s)."""
    import pstats
    stats = pstats.Stats(profiler).stats
    for (path, line, name), (_, calls, own, cumulative, _) in sorted(stats.items(), key=lambda i: -i[1][2])[:rows]:
        where = f"{path.rsplit('/', 1)[-1]}:{line}" if line else path
        print(f"{indent}{own / steps * 1e6:7.2f} {cumulative / steps * 1e6:8.2f} {calls / steps:5.1f}x  "
              f"{name} ({where})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--variants", default="clustered,causal")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--bits", type=int, default=63)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--topk", type=int, default=32, help="the improved variant's top keys")
    p.add_argument("--torch-copies", action="store_true",
                   help="the graph cache copies with torch's per-dtype copies, not the extension's one launch")
    p.add_argument("--trace", action="store_true", help="also print the torch profiler's CPU events of a step")
    p.add_argument("--python-profile", action="store_true",
                   help="also print cProfile's own time per Python function of a step")
    args = p.parse_args()
    if not torch.cuda.is_available() or cuda_backend.cuda_ops() is None:
        raise SystemExit("host_overhead.py needs a GPU and the compiled extension (python -m fairseq_clustered.info)")
    if args.torch_copies:
        cache = cuda_backend.cuda_ops().graphs
        cache._copy_into, cache._fresh_copies = graph_cache._copy_all, graph_cache._fresh_copies
    gen = torch.Generator().manual_seed(0)
    planes = torch.randn(args.bits, args.dim, generator=gen).cuda()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; CPU microseconds to issue (median of bursts); "
          f"graph cache copies: {'torch' if args.torch_copies else 'extension'}")
    for length in map(int, args.lengths.split(",")):
        shape = (args.batch, args.heads, length, args.dim)
        q, k, v = (torch.randn(shape, generator=gen).to("cuda", torch.bfloat16).requires_grad_(True)
                   for _ in range(3))
        grad = torch.randn_like(q)

        def sdpa_step():
            for t in (q, k, v):
                t.grad = None
            torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)
        print(f"N = {length}: sdpa step {issue_us(sdpa_step):8.1f}")
        for variant in args.variants.split(","):
            rows, counts = layers(variant, q, k, v, planes, args)
            step = rows[0][1]
            if args.trace:
                trace(f"{variant} N={length}", step)
            if args.python_profile:
                python_profile(f"{variant} N={length}", step)
            timeline(variant, step)
            print(f"  {variant} (fwd graph: {counts[0]} inputs, {counts[1]} outputs; bwd: {counts[2]}, {counts[3]})")
            for label, fn in rows:
                print(f"    {label:48s} {issue_us(fn):8.1f}")
            graphs = cuda_backend.cuda_ops().graphs
            print(f"    (graph cache so far: {graphs.captures} captures, {graphs.replays} replays)")
    print("single calls:")
    for label, fn in single_calls(q):
        print(f"    {label:48s} {issue_us(fn, burst=50):8.1f}")


if __name__ == "__main__":
    main()
