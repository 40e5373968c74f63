"""The CUDA-graph cache of the ops' compositions (``fairseq_clustered/ops/graph_cache.py``).

Oracle: the same composition run eagerly (the cache switched off) on the same inputs.
Replays must give the eager results, on fresh inputs at every call (a replay that read
stale static inputs would fail), and outputs handed out earlier must survive later
replays. The GPU tests skip without CUDA and the compiled extension.
"""

from __future__ import annotations

import pytest
import torch

from fairseq_clustered.ops import clustered_attention, cuda_backend, graph_cache, improved_clustered_attention

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_backend.load()),
                               reason="needs a CUDA GPU and the compiled fairseq_clustered._C")


# -------------------------------------------------------------------- CPU


@pytest.mark.parametrize("name,value,words", [
    ("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "yes", "0 (off) or 1 (on)"),
    ("FAIRSEQ_CLUSTERED_GRAPH_CACHE_MB", "lots", "an integer"),
    ("FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB", "-1", ">= 0"),
    ("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "yes", "in-place (read the caller's tensors"),
])
def test_bad_settings_name_the_variable(monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as error:
        graph_cache.settings()
    assert name in str(error.value) and words in str(error.value)


def test_defaults(monkeypatch):
    for name in ("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "FAIRSEQ_CLUSTERED_GRAPH_CACHE_MB",
                 "FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB", "FAIRSEQ_CLUSTERED_GRAPH_INPUTS"):
        monkeypatch.delenv(name, raising=False)
    config = graph_cache.settings()
    assert config.enabled and config.budget_bytes == 1024 * 2**20 and config.max_input_bytes == 256 * 2**20
    assert config.inputs_in_place


def _reaches_a_window_brute_force(start, nbytes):
    """Whether some address in [start, start + nbytes] is less than 1 MiB past a multiple of 4 GiB."""
    region = 1 << 32
    return any(max(start, k * region) <= min(start + nbytes, k * region + (1 << 20) - 1)
               for k in range(start // region, (start + nbytes) // region + 1))


_BOUNDARY = 0x7F14 << 32  # a 4 GiB boundary where device addresses live (one such held a failing static input)


@pytest.mark.parametrize("delta", [-(1 << 21), -4096, -512, 0, 512, (1 << 20) - 512, 1 << 20, (1 << 20) + 512, 1 << 31])
@pytest.mark.parametrize("nbytes", [16, 4096 + 16, (1 << 20) + 16, 1 << 27, (1 << 32) - (1 << 20), (1 << 32) + 16])
def test_static_buffers_placement_clear_of_ambiguous_addresses(delta, nbytes):
    """Static inputs stay out of the first MiB past each 4 GiB boundary, where GraphInputs cannot tell an
    address from a small integer beside stale padding. Oracle: the windows each range meets, enumerated;
    the offset chosen is the first multiple of 512 within the room that clears them all, or None where
    none does."""
    base, room = _BOUNDARY + delta, (1 << 20) + 512
    assert graph_cache._reaches_ambiguous(base, nbytes) == _reaches_a_window_brute_force(base, nbytes)
    offset = graph_cache._clear_offset(base, nbytes, room)
    clear = [o for o in range(0, room + 1, 512) if not _reaches_a_window_brute_force(base + o, nbytes)]
    assert offset == (clear[0] if clear else None)


class _FakeAllocations:
    """``torch.empty`` for :func:`graph_cache._placed_buffer`: hands out uint8 "buffers" at the planned
    addresses, in order, and records their sizes."""

    class Buffer:
        def __init__(self, address, nbytes):
            self.address, self.nbytes = address, nbytes

        def data_ptr(self):
            return self.address

        def __getitem__(self, span):
            return ("view", self.address + span.start, span.stop - span.start)

    def __init__(self, addresses):
        self.addresses, self.sizes = list(addresses), []

    def __call__(self, nbytes, dtype=None, device=None):
        self.sizes.append(nbytes)
        return self.Buffer(self.addresses.pop(0), nbytes)


@pytest.mark.parametrize("case", ["clear", "moved past the window", "no room anywhere"])
def test_static_buffers_are_placed_clear_of_ambiguous_addresses(monkeypatch, case):
    """A static buffer that would reach into the first MiB past a 4 GiB boundary is allocated again,
    1 MiB + 512 bytes larger, and used from just past that window; where no try allows it (each try
    gets other memory), the first allocation is used as it is (GraphInputs then refuses the graph)."""
    nbytes, room = 4096, (1 << 20) + 512
    on_boundary, clear = _BOUNDARY, _BOUNDARY + (5 << 20)
    # (each try of the last case starts 2 KiB before a boundary: past that window is 1 MiB + 2 KiB on)
    addresses = {"clear": [clear],
                 "moved past the window": [on_boundary, on_boundary + 512],
                 "no room anywhere": [on_boundary] + [_BOUNDARY - 2048] * graph_cache._PLACEMENT_TRIES}
    allocations = _FakeAllocations(addresses[case])
    monkeypatch.setattr(graph_cache.torch, "empty", allocations)
    placed = graph_cache._placed_buffer(nbytes, torch.device("cuda"))
    if case == "clear":
        assert isinstance(placed, _FakeAllocations.Buffer) and placed.address == clear
        assert allocations.sizes == [nbytes]
    elif case == "moved past the window":
        assert placed == ("view", _BOUNDARY + (1 << 20), nbytes)
        assert allocations.sizes == [nbytes, nbytes + room]
    else:
        assert isinstance(placed, _FakeAllocations.Buffer) and placed.address == on_boundary
        assert allocations.sizes == [nbytes] + [nbytes + room] * graph_cache._PLACEMENT_TRIES


@pytest.mark.parametrize("make", [
    lambda: torch.randn(3, 4, 5),
    lambda: torch.randn(3, 4, 5).permute(2, 0, 1),  # dense, permuted
    lambda: torch.randn(6, 8)[:, ::2],  # gaps between elements
    lambda: torch.randn(101)[1:],  # off the start of its storage
    lambda: torch.randn(4, 1).expand(4, 3),  # overlapping elements
    lambda: torch.randint(0, 9, (0, 4)),  # empty
], ids=["contiguous", "permuted", "strided", "offset", "expanded", "empty"])
def test_static_copies_keep_strides_and_leave_room(make):
    """The graphs' static inputs: the argument's values and strides (so the graph can be pointed at
    the argument itself), a dense copy where elements overlap, and room after the last byte."""
    arg = make()
    static = graph_cache._static_copy(arg)
    assert torch.equal(static, arg) and static.dtype == arg.dtype
    overlapping = arg.numel() > 0 and 0 in arg.stride()
    assert graph_cache._overlaps(arg) == overlapping
    if overlapping:
        assert static.is_contiguous()
    else:
        assert static.stride() == arg.stride()
        assert static.untyped_storage().nbytes() >= graph_cache._span_bytes(arg) + 16
    if arg.numel():  # the span: from the first element to one past the farthest one
        offsets = torch.zeros(arg.shape, dtype=torch.long)
        for dim, stride in enumerate(arg.stride()):
            shape = [1] * arg.dim()
            shape[dim] = arg.shape[dim]
            offsets = offsets + torch.arange(arg.shape[dim]).view(shape) * stride
        assert graph_cache._span_bytes(arg) == (int(offsets.max()) + 1) * arg.element_size()
    else:
        assert graph_cache._span_bytes(arg) == 0


def test_cpu_tensors_run_eagerly():
    cache = graph_cache.GraphCache()
    calls = []

    def double(x, factor):
        calls.append(1)
        return x * factor

    for _ in range(4):
        x = torch.randn(5)
        assert torch.equal(cache.run("double", double, (x, 2)), x * 2)
    assert len(calls) == 4 and cache.captures == 0 and len(cache) == 0


def test_zero_hash_offsets_are_made_once(monkeypatch):
    """The hash's default offsets: zeros, made once per (bits, device) and then reused."""
    from fairseq_clustered import ops
    monkeypatch.setattr(ops, "_ZERO_OFFSETS", {})
    x, planes = torch.randn(2, 3, 10, 8), torch.randn(5, 8)
    _, first = ops._hash_planes(x, planes, None)
    assert torch.equal(first, torch.zeros(5)) and ops._hash_planes(x, planes, None)[1] is first
    assert ops._hash_planes(x, planes[:4], None)[1].shape == (4,)


class _StandInGraph:
    """A captured graph's stand-in for the in-place check on the CPU: a replay writes ``replay()``
    into the entry's one output, as a graph writes its output buffers."""

    def __init__(self, entry, replay):
        self.entry, self.replay_value = entry, replay

    def replay(self):
        self.entry.outputs[0].copy_(self.replay_value())


class _StandInPointers:
    """``GraphInputs`` stand-in: records where the graph was pointed."""

    def __init__(self):
        self.pointed_at = []

    def point_at(self, executable, bases):
        self.pointed_at.append(list(bases))
        return True


@pytest.mark.parametrize("case", ["agrees", "differs", "out of memory"])
def test_the_in_place_check_decides_on_the_replay(monkeypatch, case):
    """``GraphCache._check_in_place`` with a stand-in graph: a replay that gives the eager result lets
    the graph read in place; one that differs, or a check that runs out of memory, leaves it pointed
    back at its static inputs and copying, with the reason; the call's result is the eager one."""
    cache = graph_cache.GraphCache()
    monkeypatch.setattr(cache, "_copy_into", lambda destinations, sources: [
        d.copy_(s) for d, s in zip(destinations, sources)])
    monkeypatch.setattr(cache, "_fresh_copies", lambda tensors: [t.clone() for t in tensors])
    x = torch.arange(4.0)
    entry = graph_cache._Entry(None, [graph_cache._static_copy(x)], (torch.zeros(4),), True, 0)
    static = entry.static_tensors[0]
    entry.graph = _StandInGraph(entry, {"agrees": lambda: x * 2, "differs": lambda: x * 3,
                                        "out of memory": lambda: static * 2}[case])
    if case == "out of memory":
        def out_of_memory(*args):
            raise torch.cuda.OutOfMemoryError("planted")
        monkeypatch.setattr(cache, "_difference_in_place", out_of_memory)
    pointers = _StandInPointers()
    result = cache._check_in_place("double", entry, pointers, lambda a: a * 2, (x,), [x])
    assert torch.equal(result, x * 2)
    if case == "agrees":
        assert entry.inputs is pointers and "double" not in cache.copied_inputs
        assert torch.isnan(static).all(), "the static input was not poisoned for the check"
    else:
        assert entry.inputs is None and pointers.pointed_at[-1] == entry.static_bases
        assert {"differs": "differed", "out of memory": "ran out of memory"}[case] in cache.copied_inputs["double"]


def test_filled_outputs_are_the_callers_tensors():
    """A composition's filled argument (written whole, returned, never read) is not copied into the
    graph, and the output that is it comes back as the caller's own tensor: here a replay that copies
    its inputs (a stand-in graph on the CPU) writes the static buffer, which is then copied into the
    caller's tensor; the other outputs are fresh copies as before."""
    cache = graph_cache.GraphCache()
    copied = []  # every source of the cache's copies
    cache._copy_into = lambda destinations, sources: [copied.append(s) or d.copy_(s)
                                                      for d, s in zip(destinations, sources)]
    cache._fresh_copies = lambda tensors: [t.clone() for t in tensors]
    x, out = torch.arange(4.0), torch.full((4,), float("nan"))
    static_x, static_out = graph_cache._static_copy(x), graph_cache._static_copy(out)
    total = torch.zeros(())
    entry = graph_cache._Entry(None, [static_x, static_out], (static_out, total), False, 0, filled=[1])
    assert entry.filled_outputs == {0: 1} and entry.copied_outputs == [1] and entry.read == [0]

    class Replay:
        def replay(self):
            static_out.copy_(static_x * 2)
            total.copy_(static_x.sum())

    entry.graph = Replay()
    got = cache._replay(entry, [x, out], in_place=False)
    assert got[0] is out and torch.equal(out, x * 2)
    assert torch.equal(got[1], x.sum()) and got[1] is not total
    assert not any(source is out for source in copied), "the filled tensor was copied into the graph"


def test_a_graph_without_static_inputs_replays_only_in_place():
    """A large call's graph frees its static inputs once its check passes (``release_static_inputs``):
    the cache then counts only its pool, the filled output among the static buffers goes too, and a
    replay happens only where the graph can be pointed at the call's tensors; otherwise ``_replay``
    gives None (the cache runs the call eagerly) and copies nothing. CPU stand-ins: a replay writes the
    tensors the graph points at."""
    cache = graph_cache.GraphCache()

    def no_copies(destinations, sources):
        raise AssertionError("a graph without static inputs copied into them")

    cache._copy_into = no_copies
    cache._fresh_copies = lambda tensors: [t.clone() for t in tensors]
    x, out = torch.arange(4.0), torch.full((4,), float("nan"))
    static_x, static_out = graph_cache._static_copy(x), graph_cache._static_copy(out)
    total = torch.zeros(())
    entry = graph_cache._Entry(None, [static_x, static_out], (static_out, total), False, 1000 + 32, filled=[1])
    by_address = {t.data_ptr(): t for t in (x, out, static_x, static_out)}

    class Pointers:
        aligned, bases = True, None

        def point_at(self, executable, bases):
            if self.aligned:
                self.bases = bases
            return self.aligned

    class Replay:
        replays = 0

        def replay(self):
            source, destination = (by_address[base] for base in pointers.bases)
            destination.copy_(source * 2)
            total.copy_(source.sum())
            self.replays += 1

    pointers = Pointers()
    entry.inputs, entry.graph = pointers, Replay()
    entry.release_static_inputs()
    assert entry.static_tensors is None and entry.static_bytes() == 0 and entry.nbytes == 1000
    assert entry.outputs[0] is None and entry.outputs[1] is total
    got = cache._replay(entry, [x, out], in_place=True)
    assert got[0] is out and torch.equal(out, x * 2) and torch.equal(got[1], x.sum()) and got[1] is not total
    pointers.aligned = False  # a call whose tensors are not aligned like the static inputs were
    assert cache._replay(entry, [x, out], in_place=True) is None
    assert cache._replay(entry, [x, out], in_place=False) is None  # settings that copy
    assert entry.graph.replays == 1


@pytest.mark.parametrize("filled", [(), (1,)])
def test_the_input_limit_leaves_out_filled_tensors(monkeypatch, filled):
    """The input limit (FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB) counts what a composition reads, not the
    tensors it fills: with the clustered output among its arguments, a 16k step's q, k, v and output
    came to 256 MB plus the hash planes, over the limit, and ran eagerly. Here (the CPU, the call's
    key stood in) 0.5 MB read and 0.75 MB filled against a 1 MB limit: the call counts towards a
    capture only where the 0.75 MB are filled."""
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB", "1")
    monkeypatch.setattr(graph_cache, "_signature",
                        lambda name, args: (("stand-in",), list(args), sum(t.numel() * t.element_size() for t in args)))
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: False)
    cache = graph_cache.GraphCache()
    read, out = torch.zeros(2**17), torch.empty(3 * 2**16)  # 0.5 MB, 0.75 MB of fp32
    result = cache.run("limit", lambda a, o: o.fill_(a.sum()), (read, out), filled=filled)
    assert result is out and (out == 0).all()
    assert (("stand-in",) in cache._calls) == bool(filled)


class _StandInTable:
    """The extension's ``GraphTable`` as the Python cache uses it: what was added and removed, and the
    keys it reports as served."""

    def __init__(self, environment):
        self.environment, self.graphs, self.served, self.replays = environment, {}, [], 0

    def add(self, key, exec, inputs, tensors, filled, outputs, copied, extras):
        self.graphs[key] = dict(exec=exec, inputs=inputs, tensors=tensors, filled=filled, outputs=outputs,
                                copied=copied, extras=extras)

    def remove(self, key):
        del self.graphs[key]

    def clear(self):
        self.graphs.clear()

    def used_since_asked(self):
        served, self.served = self.served, []
        return served


def test_the_cpp_table_holds_the_kept_graphs_that_read_in_place(monkeypatch):
    """The cache's side of ``cuda/graph_table.cpp`` (a stand-in table, entries made by hand): a graph
    is registered with its filled positions, per output its filled position or -1 and the graph-owned
    outputs to copy; the table's replays since the last capture count as the latest uses when the
    cache evicts (so the graph the table keeps serving stays), an evicted graph leaves the table before
    it is freed, ``clear`` empties it, and ``replays`` counts the table's."""
    class Extension:  # as the extension: its copies, GraphInputs and GraphTable
        GraphTable, GraphInputs = _StandInTable, object

        @staticmethod
        def copy_tensors(destinations, sources):
            for destination, source in zip(destinations, sources):
                destination.copy_(source)

        @staticmethod
        def fresh_copies(tensors):
            return [t.clone() for t in tensors]

    monkeypatch.setattr(graph_cache, "MAX_ENTRIES", 2)
    cache = graph_cache.GraphCache(copies=Extension())
    table = cache.native
    assert isinstance(table, _StandInTable) and table.environment == list(graph_cache._ENVIRONMENT)
    x, out, total = torch.arange(4.0), torch.empty(4), torch.zeros(())
    for name in ("a", "b", "c"):
        static = [x.clone(), out.clone()]  # the graph returns its filled tensor and a sum of its own
        entry = graph_cache._Entry(None, static, (static[1], total.clone()), False, 0, filled=[1])
        entry.inputs, entry.executable = f"inputs {name}", len(name)
        if name == "c":  # the table served "a" since "b" was captured: "b" is the least recently used
            table.served, table.replays = [b"a"], 5
        cache._entries[(name,)] = entry
        cache._publish(entry, [x, out], lambda name=name: (name.encode(), [out]))
        cache._evict(graph_cache.settings(), (name,))
    registered = table.graphs[b"a"]
    assert registered["filled"] == [1] and registered["outputs"] == [1, -1] and registered["extras"] == [out]
    assert registered["copied"][0] is cache._entries[("a",)].outputs[1]
    assert list(cache._entries) == [("a",), ("c",)] and sorted(table.graphs) == [b"a", b"c"]
    assert cache.replays == 5
    cache.clear()
    assert not table.graphs and len(cache) == 0


# -------------------------------------------------------------------- GPU


@needs_gpu
def test_zero_offsets_made_inside_a_capture_are_not_kept_gpu(monkeypatch):
    """Zeros first needed inside a user's CUDA graph capture are filled only when that graph
    replays and live in its pool: they must not be kept for later calls."""
    from fairseq_clustered import ops
    monkeypatch.setattr(ops, "_ZERO_OFFSETS", {})
    x, planes = torch.randn(2, 3, 40, 64, device="cuda"), torch.randn(17, 64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops._hash_planes(x, planes, None)
    assert not ops._ZERO_OFFSETS, "zeros made inside a capture were kept"
    _, outside = ops._hash_planes(x, planes, None)
    assert torch.equal(outside, torch.zeros(17, device="cuda")) and ops._hash_planes(x, planes, None)[1] is outside


def _inputs(seed, dtype, length=300, pad=False, batch=2, heads=3):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, 64, generator=g).to("cuda", dtype).requires_grad_(True)
               for _ in range(3))
    kmask = qmask = None
    if pad:
        kmask = torch.zeros(2, length, dtype=torch.bool)
        kmask[1, length - 40:] = True
        qmask = kmask.clone()
        kmask, qmask = kmask.cuda(), qmask.cuda()
    return q, k, v, kmask, qmask


def _step(variant, seed, dtype, pad, dropout, shape=(2, 3, 300), num_clusters=20, nodes=None):
    """Output and gradients of one forward + backward on fresh inputs (planes from the seed);
    ``shape``: (batch, heads, length). ``nodes``: a list that gets the name of the output's autograd node."""
    batch, heads, length = shape
    q, k, v, kmask, qmask = _inputs(seed, dtype, length, pad, batch, heads)
    fn = clustered_attention if variant == "clustered" else improved_clustered_attention
    generator = torch.Generator().manual_seed(seed)
    out = fn(q, k, v, kmask, qmask, num_clusters=num_clusters, generator=generator, dropout_p=dropout)
    if nodes is not None:
        nodes.append(out.grad_fn.name())
    out.backward(_gradient(seed, out))
    return [out.detach(), q.grad, k.grad, v.grad]


def _gradient(seed, out):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)


def _assert_same(graphed, eager, exact_grads):
    assert torch.equal(graphed[0], eager[0]), "output differs from the eager composition"
    for name, got, want in zip(("dq", "dk", "dv"), graphed[1:], eager[1:]):
        if exact_grads:
            assert torch.equal(got, want), name
        else:  # atomically accumulated gradients: the order of fp32 additions may differ
            scale = 1 + want.double().abs().max().item()
            assert (got.double() - want.double()).abs().max().item() <= 1e-2 * scale, name


@needs_gpu
@pytest.mark.parametrize("inputs", ["in-place", "copy"])
@pytest.mark.parametrize("variant", ["clustered", "improved"])
@pytest.mark.parametrize("dtype,pad,dropout", [(torch.bfloat16, False, 0.0), (torch.float32, True, 0.2)],
                         ids=["bf16-flash", "fp32-padding-dropout"])
def test_replays_match_eager_gpu(monkeypatch, variant, dtype, pad, dropout, inputs):
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", inputs)
    cache = cuda_backend.graph_cache()
    cache.clear()
    captures, replays = cache.captures, cache.replays
    graphed = [_step(variant, seed, dtype, pad, dropout) for seed in range(4)]
    assert cache.captures > captures and cache.replays > replays, "nothing was captured or replayed"
    if inputs == "copy":
        assert cache.inputs_read_in_place() == 0
    else:  # the forward's graph, at least, reads q, k and v where they are
        assert cache.inputs_read_in_place() >= 1, cache.copied_inputs
    # The backward's graphs write into the caller's tensors dq, dk and dv where the Triton kernels make
    # them all (the clustered variant, whose centroid backward is the Triton kernel's wherever it takes
    # the inputs; the improved variant in bf16); the improved variant's fp32 path (the extension's
    # kernels) makes its own.
    filled = {("clustered", False): 3, ("clustered", True): 3, ("improved", False): 3, ("improved", True): 0}
    backward = [entry for key, entry in cache._entries.items() if "_bwd" in key[0]]
    assert backward and all(len(e.filled_outputs) == filled[variant, pad] for e in backward), \
        [len(e.filled_outputs) for e in backward]
    if inputs == "in-place" and (variant, dtype) != ("improved", torch.float32):  # (fp32 improved: not packed)
        assert cache.native.replays >= 2, (len(cache.native), cache.copied_inputs)  # steps 3-4 from C++
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "0")
    replays = cache.replays
    eager = [_step(variant, seed, dtype, pad, dropout) for seed in range(4)]
    assert cache.replays == replays
    for g, e in zip(graphed, eager):
        _assert_same(g, e, exact_grads=False)


@needs_gpu
@pytest.mark.parametrize("variant", ["clustered", "improved"])
def test_replays_match_eager_at_the_benchmark_shape_gpu(monkeypatch, variant):
    """The benchmark's shape (B = 4, H = 8, N = 1024, C = 100, bf16; the tests above take C = 20, so
    their Triton tiles hold 32 centroids, these 128): replays reading their inputs in place give the
    eager composition's results. An experiment that passed the tests at the small shapes died in the
    benchmark's table (1k-16k; the size was not printed) with a CUDA illegal memory access in the
    capture's check (twenty-fourth session, benchmarks/NOTES.md)."""
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "in-place")
    cache = cuda_backend.graph_cache()
    cache.clear()
    steps = [_step(variant, seed, torch.bfloat16, False, 0.0, (4, 8, 1024), 100) for seed in range(3)]
    assert cache.inputs_read_in_place() >= 1, cache.copied_inputs
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "0")
    for seed, graphed in enumerate(steps):
        _assert_same(graphed, _step(variant, seed, torch.bfloat16, False, 0.0, (4, 8, 1024), 100), exact_grads=False)


# ------------------------------------------------- the clustered step from C++ (cuda/clustered_step.cpp)


def _warm_table(monkeypatch, steps=3, **kwargs):
    """The registered ops' cache, cleared, after ``steps`` clustered steps (graphs captured at the second)."""
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "in-place")
    cache = cuda_backend.graph_cache()
    cache.clear()
    assert cache.native is not None, "the extension has no GraphTable"
    for seed in range(steps):
        _step("clustered", seed, torch.bfloat16, **kwargs)
    return cache


@needs_gpu
@pytest.mark.parametrize("variant", ["clustered", "improved"])
@pytest.mark.parametrize("pad,dropout", [(False, 0.0), (True, 0.2)], ids=["flash", "padding-dropout"])
def test_clustered_steps_run_from_cpp_gpu(monkeypatch, variant, pad, dropout):
    """From the third step on, a step of either variant is replayed by the extension's ``clustered_step``
    / ``improved_step``: its output's autograd node is the C++ one, each step replays the forward's and
    the backward's graphs from the table (the second step captured and registered them), and outputs
    and gradients are the eager composition's. A forward without grad is served too."""
    cache = _warm_table(monkeypatch, steps=0)
    table = cache.native
    nodes = []
    graphed = [_step(variant, seed, torch.bfloat16, pad, dropout, nodes=nodes) for seed in range(5)]
    assert "ClusteredStep" not in nodes[0] and all("ClusteredStep" in node for node in nodes[2:]), nodes
    expected = 6 if not pad else 3  # (with padding a backward's graph may copy its inputs: forwards only)
    assert table.replays >= expected and len(table) >= expected // 3, (table.replays, cache.copied_inputs)
    q, k, v, kmask, qmask = _inputs(0, torch.bfloat16, pad=pad)
    replays = table.replays
    fn = clustered_attention if variant == "clustered" else improved_clustered_attention
    with torch.no_grad():  # their own composition (keeping nothing): captured at the second call
        outs = [fn(q, k, v, kmask, qmask, num_clusters=20, generator=torch.Generator().manual_seed(0),
                   dropout_p=dropout) for _ in range(3)]
    assert table.replays == replays + 1 and all(torch.equal(out, graphed[0][0]) for out in outs)
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "0")
    for seed, got in enumerate(graphed):
        _assert_same(got, _step(variant, seed, torch.bfloat16, pad, dropout), exact_grads=False)
    assert table.replays == replays + 1, "the table served calls with the graphs switched off"


@needs_gpu
@pytest.mark.parametrize("variant", ["clustered", "improved"])
@pytest.mark.parametrize("pad,dropout", [(False, 0.0), (True, 0.2)], ids=["flash", "padding-dropout"])
def test_calls_autograd_does_not_record_keep_nothing_gpu(monkeypatch, variant, pad, dropout):
    """A call of either variant that autograd does not record (under ``torch.no_grad``, or with no
    input that requires a gradient) takes the composition that keeps nothing for a backward
    (``clustered_fwd_inference`` / ``improved_fwd_inference``): the step's output bit for bit, without
    an autograd node; its graph is captured at the second such call and replayed from C++
    (``clustered_step`` / ``improved_step``) from the third, and a call that is recorded still gets
    the step's node."""
    cache = _warm_table(monkeypatch, steps=0)
    table = cache.native
    expected = _step(variant, 0, torch.bfloat16, pad, dropout)[0]
    fn = clustered_attention if variant == "clustered" else improved_clustered_attention
    ops = cuda_backend.cuda_ops()
    taken = []
    name = f"{variant}_fwd_inference"
    real = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *args: taken.append(name) or real(*args))
    from_cpp = []
    for call in range(4):
        q, k, v, kmask, qmask = _inputs(0, torch.bfloat16, pad=pad)
        if call % 2:  # grad mode on, no input requires a gradient
            q, k, v = q.detach(), k.detach(), v.detach()
        replays = table.replays
        with torch.set_grad_enabled(call % 2 == 1):
            out = fn(q, k, v, kmask, qmask, num_clusters=20, generator=torch.Generator().manual_seed(0),
                     dropout_p=dropout)
        assert out.grad_fn is None and torch.equal(out, expected), call
        from_cpp.append(table.replays - replays)
    assert from_cpp == [0, 0, 1, 1], from_cpp
    assert taken == [name, name], taken  # the C++ step served the last two
    q, k, v, kmask, qmask = _inputs(0, torch.bfloat16, pad=pad)
    out = fn(q, k, v, kmask, qmask, num_clusters=20, generator=torch.Generator().manual_seed(0), dropout_p=dropout)
    assert out.grad_fn is not None and torch.equal(out.detach(), expected)


@needs_gpu
@pytest.mark.parametrize("variant", ["clustered", "improved"])
def test_a_backward_the_table_lost_runs_in_python_gpu(monkeypatch, variant):
    """A step whose forward ran from C++ and whose backward's graph is gone by its backward (the cache
    cleared in between) gets its gradients from the Python backward, the eager composition's."""
    cache = _warm_table(monkeypatch, steps=0)
    for seed in range(3):
        _step(variant, seed, torch.bfloat16, False, 0.0)
    q, k, v, _, _ = _inputs(3, torch.bfloat16)
    fn = clustered_attention if variant == "clustered" else improved_clustered_attention
    out = fn(q, k, v, num_clusters=20, generator=torch.Generator().manual_seed(3))
    assert "ClusteredStep" in out.grad_fn.name()
    cache.clear()
    replays = cache.native.replays
    out.backward(_gradient(3, out))
    assert cache.native.replays == replays
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "0")
    _assert_same([out.detach(), q.grad, k.grad, v.grad], _step(variant, 3, torch.bfloat16, False, 0.0),
                 exact_grads=False)


@needs_gpu
def test_the_table_follows_the_settings_gpu(monkeypatch):
    """Once the settings' environment changes the table serves nothing (copying inputs: the Python cache
    replays); back to the settings it was filled under, it serves again."""
    cache = _warm_table(monkeypatch, pad=False, dropout=0.0)
    table = cache.native
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "copy")
    replays, python_replays = table.replays, cache.replays - table.replays
    copied = [_step("clustered", seed, torch.bfloat16, False, 0.0) for seed in (3, 4)]
    assert table.replays == replays and cache.replays - table.replays > python_replays
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "in-place")
    again = [_step("clustered", seed, torch.bfloat16, False, 0.0) for seed in (3, 4)]
    assert table.replays >= replays + 2
    for got, want in zip(again, copied):
        _assert_same(got, want, exact_grads=False)


@needs_gpu
def test_a_clustered_step_from_cpp_is_differentiable_once_gpu(monkeypatch):
    """As the Python backward (``once_differentiable``): with ``create_graph=True`` and an incoming
    gradient that requires grad the gradients come, and differentiating them again raises."""
    _warm_table(monkeypatch, pad=False, dropout=0.0)
    q, k, v, _, _ = _inputs(3, torch.bfloat16)
    out = clustered_attention(q, k, v, num_clusters=20, generator=torch.Generator().manual_seed(3))
    assert "ClusteredStep" in out.grad_fn.name()
    (dq,) = torch.autograd.grad(out, q, _gradient(3, out).requires_grad_(True), create_graph=True)
    assert dq.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.sum().backward()


@needs_gpu
def test_misaligned_inputs_leave_the_table_gpu(monkeypatch):
    """Inputs that are not aligned like the graph's static inputs (a view one element into its storage)
    are not served from C++ (the Python cache copies them), and give the eager results."""
    cache = _warm_table(monkeypatch, pad=False, dropout=0.0)
    replays = cache.native.replays
    q, k, v, _, _ = _inputs(5, torch.bfloat16)
    storage = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    shifted = storage[1:].view(q.shape).copy_(q.detach()).requires_grad_(True)
    out = clustered_attention(shifted, k, v, num_clusters=20, generator=torch.Generator().manual_seed(5))
    assert cache.native.replays == replays and "ClusteredStep" not in out.grad_fn.name()
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "0")
    assert torch.equal(out, clustered_attention(q, k, v, num_clusters=20, generator=torch.Generator().manual_seed(5)))


@needs_gpu
def test_evicted_graphs_leave_the_table_gpu(monkeypatch):
    """With room for three graphs, steps at two lengths evict each other's: the table holds exactly the
    graphs the cache keeps (an evicted graph is freed), and every step gives the eager results."""
    monkeypatch.setattr(graph_cache, "MAX_ENTRIES", 3)
    cache = _warm_table(monkeypatch, steps=0)
    lengths = (300, 200) * 3
    graphed = [_step("clustered", seed, torch.bfloat16, False, 0.0, shape=(2, 3, n)) for seed, n in enumerate(lengths)]
    assert len(cache) <= 3
    assert len(cache.native) == sum(len(entry.native_keys) for entry in cache._entries.values())
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "0")
    for seed, (n, got) in enumerate(zip(lengths, graphed)):
        _assert_same(got, _step("clustered", seed, torch.bfloat16, False, 0.0, shape=(2, 3, n)), exact_grads=False)


@needs_gpu
def test_outputs_survive_later_replays_gpu():
    from fairseq_clustered.ops import custom_ops
    cache = cuda_backend.graph_cache()
    cache.clear()
    planes = torch.randn(63, 64, device="cuda")
    kept = []
    for seed in range(4):
        q, k, v, _, _ = _inputs(seed, torch.bfloat16)
        a, _ = custom_ops.lloyd_kmeans(custom_ops.hash_codes(q.detach(), planes, torch.zeros(63, device="cuda")),
                                       None, 20, 10, 63)
        out, lse, centroids = custom_ops.clustered_attention_fwd(q, k, v, a, None, None, 20, 0.125, 0.0)
        kept.append((out, out.clone(), a, a.clone()))
    assert cache.replays >= 2
    for out, out_copy, a, a_copy in kept:
        assert torch.equal(out, out_copy) and torch.equal(a, a_copy)
    assert not torch.equal(kept[2][0], kept[3][0])


@needs_gpu
def test_limits_gpu(monkeypatch):
    cache = cuda_backend.graph_cache()
    eager = [_step("clustered", seed, torch.bfloat16, False, 0.0) for seed in range(3)]
    # Inputs above the size limit run eagerly where the graphs would copy them: nothing is captured.
    cache.clear()
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB", "0")
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "copy")
    captures = cache.captures
    for seed in range(3):
        _assert_same(_step("clustered", seed, torch.bfloat16, False, 0.0), eager[seed], exact_grads=False)
    assert cache.captures == captures and len(cache) == 0
    # Where they read them in place, the graphs are kept without static inputs (the step's tensors
    # are all aligned like them) and replay to the eager results, the C++ step's included.
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "in-place")
    replays = cache.replays
    for seed in range(3):
        _assert_same(_step("clustered", seed, torch.bfloat16, False, 0.0), eager[seed], exact_grads=False)
    assert cache.captures > captures and len(cache) >= 2 and cache.inputs_read_in_place() == len(cache)
    assert all(entry.static_tensors is None for entry in cache._entries.values())
    assert cache.replays >= replays + 2, (cache.replays, cache.copied_inputs)
    cache.clear()
    # A graph larger than the whole budget is used once and not kept.
    monkeypatch.delenv("FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB")
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_CACHE_MB", "0")
    for seed in range(3):
        _assert_same(_step("clustered", seed, torch.bfloat16, False, 0.0), eager[seed], exact_grads=False)
    assert cache.captures > captures and len(cache) == 0 and cache.memory_bytes() == 0
    # Within the budget graphs are kept, and their memory is counted.
    monkeypatch.delenv("FAIRSEQ_CLUSTERED_GRAPH_CACHE_MB")
    cache.clear()
    for seed in range(3):
        _step("clustered", seed, torch.bfloat16, False, 0.0)
    assert len(cache) >= 2 and cache.memory_bytes() > 0  # the forward (clustering included), the backward
    cache.clear()
    assert len(cache) == 0 and cache.memory_bytes() == 0


@needs_gpu
def test_nothing_is_captured_inside_an_outer_capture_gpu():
    """Inside a user's CUDA graph the composition runs eagerly, so the outer graph records it."""
    cache = cuda_backend.graph_cache()
    cache.clear()
    q, k, v, _, _ = _inputs(0, torch.bfloat16)
    planes = torch.randn(63, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        clustered_attention(q, k, v, num_clusters=20, planes=planes)
    torch.cuda.current_stream().wait_stream(stream)
    captures, replays = cache.captures, cache.replays
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = clustered_attention(q, k, v, num_clusters=20, planes=planes)
    graph.replay()
    assert cache.captures == captures and cache.replays == replays
    assert torch.equal(static_out, clustered_attention(q, k, v, num_clusters=20, planes=planes))


@needs_gpu
def test_each_signature_is_captured_at_most_once_gpu(monkeypatch):
    """With room for one graph, two alternating signatures do not thrash: the evicted one
    runs eagerly from then on, and every result is still right."""
    monkeypatch.setattr(graph_cache, "MAX_ENTRIES", 1)
    cache = graph_cache.GraphCache()
    calls = []

    def affine(x, shift):
        calls.append(1)
        return x * 2 + shift

    for step in range(6):
        for length in (10, 20):
            x = torch.randn(length, device="cuda")
            assert torch.equal(cache.run("affine", affine, (x, 1.5)), x * 2 + 1.5)
    assert cache.captures == 2 and len(cache) == 1
    # The kept graph replays (no call of affine); the evicted signature runs it each time.
    before = len(calls)
    cache.run("affine", affine, (torch.randn(20, device="cuda"), 1.5))
    cache.run("affine", affine, (torch.randn(10, device="cuda"), 1.5))
    assert len(calls) == before + 1


def _copy_cases():
    """Tensors of every layout the graph cache hands to its copies: four dtypes, a dense but
    permuted view, a view off a 16-byte boundary, a non-dense (strided) view, an empty
    tensor, one spanning many blocks, and more than one launch's table (16) in all."""
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(2, 3, 7, 64, generator=g).to(dtype) for dtype in (torch.bfloat16, torch.float16,
                                                                             torch.float32)]
    cases += [torch.randint(-5, 100, (2, 3, 333), generator=g), torch.rand(5, 9, generator=g) > 0.5]
    cases += [torch.randn(4, 5, 6, generator=g).permute(2, 0, 1), torch.randn(1001, generator=g)[1:],
              torch.randn(6, 8, generator=g)[:, ::2], torch.empty(0, 4), torch.randn(3, 70001, generator=g)]
    cases += [torch.randn(i + 1, generator=g).to(torch.bfloat16) for i in range(8)]
    return [c.cuda() for c in cases]


@needs_gpu
def test_extension_copies_equal_torch_copies_gpu():
    """``copy_tensors`` / ``fresh_copies`` of the extension (one launch for the dense pairs)
    against torch's copy_: every element of every layout, and fresh tensors that do not alias."""
    extension = cuda_backend.extension()
    sources = _copy_cases()
    destinations = [torch.full_like(s, 7) for s in sources]
    extension.copy_tensors(destinations, sources)
    for i, (got, want) in enumerate(zip(destinations, sources)):
        assert torch.equal(got, want), i
    fresh = extension.fresh_copies(sources)
    for i, (got, want) in enumerate(zip(fresh, sources)):
        assert torch.equal(got, want) and got.dtype == want.dtype and got.shape == want.shape, i
        assert want.numel() == 0 or got.data_ptr() != want.data_ptr(), i
    with pytest.raises(RuntimeError, match="destinations"):
        extension.copy_tensors(destinations[:2], sources[:3])
    with pytest.raises(RuntimeError, match="sizes"):
        extension.copy_tensors([destinations[0]], [sources[1][:, :2]])


@needs_gpu
@pytest.mark.parametrize("copies", ["extension", "torch"])
def test_mixed_dtype_replays_equal_eager_gpu(copies):
    """A composition of mixed-dtype arguments and outputs (including views the one-launch copy
    cannot take) replayed on fresh inputs at every call equals its eager run, with the
    extension's copies and with torch's."""
    cache = graph_cache.GraphCache(copies=cuda_backend.extension() if copies == "extension" else None)

    def composition(a, b, c, flags, scale):
        return (a * scale).to(torch.bfloat16), b + c.float().sum(), c * 3, ~flags

    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(3, 5, 8, generator=g).cuda().transpose(0, 2)  # dense, permuted
        b = torch.randn(101, generator=g).cuda()[1:]  # off a 16-byte boundary
        c = torch.randint(0, 9, (4, 6), generator=g).cuda()[:, ::2]  # strided
        flags = (torch.rand(7, generator=g) > 0.5).cuda()
        got = cache.run("mixed", composition, (a, b, c, flags, 0.5))
        want = composition(a, b, c, flags, 0.5)
        for x, y in zip(got, want):
            assert torch.equal(x, y)
    assert cache.captures == 1 and cache.replays == 3


def _aligned_and_offset(length, seed):
    """Two (length,) fp32 views of the same signature: one at the start of its storage (aligned like
    the graphs' static inputs), one 4 bytes into it (not)."""
    g = torch.Generator().manual_seed(seed)
    storage = torch.randn(length + 1, generator=g).cuda()
    return storage[:-1], storage[1:]


@needs_gpu
def test_inputs_read_in_place_gpu(monkeypatch):
    """A graph that reads its callers' tensors in place: every replay on fresh tensors equals the eager
    composition, including a call whose tensors are not aligned like the static inputs (it copies),
    and the calls after it (in place again). With FAIRSEQ_CLUSTERED_GRAPH_INPUTS=copy set afterwards
    the same graph copies again, and a graph captured with it set reads nothing in place."""
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "in-place")
    cache = graph_cache.GraphCache(copies=cuda_backend.extension())

    def composition(a, b, scale):
        return (a * scale + b.sum()).to(torch.bfloat16), torch.cumsum(b, 0)

    calls = [_aligned_and_offset(1000, seed)[0] for seed in range(4)]
    calls += [_aligned_and_offset(1000, 4)[1], _aligned_and_offset(1000, 5)[0]]
    for i, a in enumerate(calls):
        b = torch.randn(1000, generator=torch.Generator().manual_seed(100 + i)).cuda()
        got = cache.run("in place", composition, (a, b, 0.5))
        for x, y in zip(got, composition(a, b, 0.5)):
            assert torch.equal(x, y), i
    assert cache.captures == 1 and cache.inputs_read_in_place() == 1, cache.copied_inputs
    # Switched to copies, the same graph is pointed back at its static inputs (poisoned by the check
    # until the copies fill them) and copies into them.
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "copy")
    for seed in (6, 7):
        a, b = _aligned_and_offset(1000, seed)[0], torch.randn(1000, device="cuda")
        for x, y in zip(cache.run("in place", composition, (a, b, 0.5)), composition(a, b, 0.5)):
            assert torch.equal(x, y), seed
    assert cache.captures == 1
    copying = graph_cache.GraphCache(copies=cuda_backend.extension())
    for a in calls[:3]:
        copying.run("copied", composition, (a, a, 0.5))
    assert copying.captures == 1 and copying.inputs_read_in_place() == 0


@needs_gpu
def test_a_word_that_may_be_an_integer_is_not_rewritten_gpu():
    """``GraphInputs`` takes every 8-byte word of a kernel's parameters that falls inside a static input for
    that input's address. One that lands less than 1 MiB past a 4 GiB boundary may instead be a small
    integer beside stale struct padding (rewriting it faulted a 32k backward), so the graph is refused and
    keeps copying. Oracle: the extension's copy kernel, whose parameters hold the byte count of its one
    copy (4096) as a plain word and its source's address: ranges planted around each, as if they were
    static inputs."""
    ext = cuda_backend.extension()
    buffer = torch.zeros(3 << 20, dtype=torch.uint8, device="cuda")
    # a source whose address lies well past a 4 GiB boundary, so that it is taken for an address
    skip = (1 << 20) if buffer.data_ptr() % (1 << 32) < (1 << 21) else 0
    source = buffer[skip:skip + 4096]
    destination = torch.empty(4096, dtype=torch.uint8, device="cuda")
    ext.copy_tensors([destination], [source])  # outside the capture: nothing lazily set up in it
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        ext.copy_tensors([destination], [source])
        graph.capture_end()
    graph.instantiate()
    address = ext.GraphInputs(graph.raw_cuda_graph(), [source.data_ptr()], [source.data_ptr() + 4096])
    assert address.unsupported == "" and address.kernel_nodes == 1
    integer = ext.GraphInputs(graph.raw_cuda_graph(), [4000], [5000])
    assert "stale padding" in integer.unsupported and "input 0" in integer.unsupported


@needs_gpu
def test_large_calls_read_in_place_without_static_inputs_gpu(monkeypatch):
    """Calls over the input limit (FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB) get a graph only where it reads
    their tensors in place: once its check passes it keeps no static inputs (its memory is its pool
    alone) and replays to the eager results; a call it cannot read in place (not aligned like the
    static inputs were, or the settings switched to copies) runs eagerly instead of copying; one whose
    inputs cannot be read in place (an expanded view) is not kept at all."""
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "in-place")
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB", "0")
    cache = graph_cache.GraphCache(copies=cuda_backend.extension())

    def composition(a, b, scale):
        return (a * scale + b.sum()).to(torch.bfloat16), torch.cumsum(b, 0)

    def check(a, b, i, name="large"):
        for x, y in zip(cache.run(name, composition, (a, b, 0.5)), composition(a, b, 0.5)):
            assert torch.equal(x, y), i

    for seed in range(4):
        check(_aligned_and_offset(1000, seed)[0], torch.randn(1000, device="cuda"), seed)
    (entry,) = cache._entries.values()
    # (three replays: the check's, then the third and fourth calls')
    assert cache.captures == 1 and cache.replays == 3 and entry.inputs is not None, cache.copied_inputs
    assert entry.static_tensors is None and entry.static_bytes() == 0 and cache.memory_bytes() == entry.nbytes
    check(_aligned_and_offset(1000, 4)[1], torch.randn(1000, device="cuda"), "not aligned")
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "copy")
    check(_aligned_and_offset(1000, 5)[0], torch.randn(1000, device="cuda"), "copy settings")
    assert cache.replays == 3, "a large call was copied into a graph"
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "in-place")
    check(_aligned_and_offset(1000, 6)[0], torch.randn(1000, device="cuda"), "in place again")
    assert cache.replays == 4
    for seed in range(3):  # b's elements overlap: its static copy is dense, the graph would copy
        check(torch.randn(1000, device="cuda"), torch.randn(1, device="cuda").expand(1000), seed, "expanded")
    assert cache.captures == 2 and len(cache) == 1 and cache.replays == 4, "a large graph that copies was kept"


@needs_gpu
@pytest.mark.parametrize("case", ["memcpy", "random", "matmul"])
def test_graphs_the_check_refuses_copy_gpu(monkeypatch, case):
    """Graphs whose inputs cannot be read in place keep copying and give the eager results: an input
    copied by a memcpy node (never rewritten), a composition whose replay differs from its eager run
    (random numbers: the check must refuse it), and cuBLAS products (Hopper kernels may take their
    operands through TMA descriptors; in place or not, the results must be the eager ones)."""
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "in-place")
    cache = graph_cache.GraphCache(copies=cuda_backend.extension())
    weight = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    compositions = {
        "memcpy": lambda x: x.clone() * 2,
        "random": lambda x: x + torch.rand_like(x),
        "matmul": lambda x: (x @ weight).float().relu(),
    }
    composition = compositions[case]
    for seed in range(4):
        x = torch.randn(256, 64, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
        got = cache.run(case, composition, (x,))
        if case != "random":
            assert torch.equal(got, composition(x)), seed
    assert cache.captures == 1
    if case == "memcpy":
        assert cache.inputs_read_in_place() == 0 and "memcpy" in cache.copied_inputs[case]
    if case == "random":
        assert cache.inputs_read_in_place() == 0 and "differed" in cache.copied_inputs[case]


@needs_gpu
def test_no_memory_for_static_inputs_stays_eager_gpu(monkeypatch):
    """A capture that finds no memory for its static inputs (the call itself fitted) leaves its signature
    eager, with one warning, and every call gets the eager result."""
    cache = graph_cache.GraphCache(copies=cuda_backend.extension())

    def out_of_memory(arg):
        raise torch.cuda.OutOfMemoryError("planted")

    monkeypatch.setattr(graph_cache, "_static_copy", out_of_memory)
    with pytest.warns(UserWarning, match="out of memory for its static inputs") as caught:
        for seed in range(4):
            x = torch.randn(1000, generator=torch.Generator().manual_seed(seed)).cuda()
            assert torch.equal(cache.run("no memory", lambda a: a * 2 + 1, (x,)), x * 2 + 1), seed
    assert len([w for w in caught if "no memory" in str(w.message)]) == 1
    assert cache.captures == 0 and cache.replays == 0 and len(cache) == 0


@needs_gpu
def test_a_check_out_of_memory_keeps_copying_gpu(monkeypatch):
    """Where the in-place check runs out of memory, the graph copies its inputs from then on and every
    result is still the eager one."""
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "in-place")
    cache = graph_cache.GraphCache(copies=cuda_backend.extension())

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("planted")

    monkeypatch.setattr(cache, "_difference_in_place", out_of_memory)

    def composition(a, b):
        return a * 2 + b

    for seed in range(4):
        a, b = (torch.randn(300, generator=torch.Generator().manual_seed(seed + i)).cuda() for i in (0, 10))
        assert torch.equal(cache.run("oom", composition, (a, b)), composition(a, b)), seed
    assert cache.captures == 1 and cache.inputs_read_in_place() == 0
    assert "out of memory" in cache.copied_inputs["oom"]


@needs_gpu
@pytest.mark.parametrize("inputs", ["in-place", "copy"])
def test_filled_outputs_gpu(monkeypatch, inputs):
    """A filled argument (``run``'s ``filled``: a tensor the composition writes whole and returns) is
    the output handed back, with the eager result, whether the graph writes it in place or writes its
    static buffer and the cache copies it over; outputs handed out earlier keep their values; an
    output that is not the filled tensor is still a fresh copy."""
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", inputs)
    cache = graph_cache.GraphCache(copies=cuda_backend.extension())

    def composition(a, out):
        torch.mul(a, 2.0, out=out)
        return out, a.cumsum(0)

    handed_out = []
    for seed in range(5):
        a = torch.randn(1000, generator=torch.Generator().manual_seed(seed)).cuda()
        out = torch.empty_like(a)
        got = cache.run("filled", composition, (a, out), filled=(1,))
        assert got[0] is out and torch.equal(out, a * 2) and torch.equal(got[1], a.cumsum(0)), seed
        handed_out.append((got, a))
    for (out, cumsum), a in handed_out:
        assert torch.equal(out, a * 2) and torch.equal(cumsum, a.cumsum(0))
    assert cache.captures == 1
    assert cache.inputs_read_in_place() == (1 if inputs == "in-place" else 0), cache.copied_inputs


@needs_gpu
@pytest.mark.parametrize("inputs", ["in-place", "copy"])
def test_a_filled_position_holding_none_is_ignored_gpu(monkeypatch, inputs):
    """A filled position that holds None on this path (the clustered backward's key gradient where
    flash makes it) is no tensor: the filled tensor after it, and the inputs read, keep their roles.
    (Counted among the tensors, the None would have taken the index of the input after it, which
    the graph would then neither copy in nor read in place.)"""
    monkeypatch.setenv("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", inputs)
    cache = graph_cache.GraphCache(copies=cuda_backend.extension())

    def composition(unused, a, out):
        assert unused is None
        return torch.mul(a, 2.0, out=out), a.cumsum(0)

    for seed in range(5):
        a = torch.randn(1000, generator=torch.Generator().manual_seed(seed)).cuda()
        out = torch.empty_like(a)
        got = cache.run("filled_none", composition, (None, a, out), filled=(0, 2))
        assert got[0] is out and torch.equal(out, a * 2) and torch.equal(got[1], a.cumsum(0)), seed
    assert cache.captures == 1


@needs_gpu
def test_extension_signature_tells_calls_apart_as_python_does_gpu():
    """The extension's ``graph_signature`` (the cache's keys where it is loaded) against
    ``graph_cache._signature``: over calls differing in one way each (sizes, strides, dtype, None
    for a tensor, a scalar's value or type, the stream), two calls get equal keys from one exactly
    where they do from the other, and equal calls on other tensors of the same description do too.
    The tensors and the bytes read are the same; filled tensors are left out of the bytes; a CPU
    tensor, or no tensor at all, gives no key."""
    native = cuda_backend.extension().graph_signature
    x = torch.randn(4, 6, device="cuda")
    calls = [(x, None, 3, 0.5, True, "name"), (x.t().contiguous().t(), None, 3, 0.5, True, "name"),
             (x.to(torch.bfloat16), None, 3, 0.5, True, "name"), (x[:2], None, 3, 0.5, True, "name"),
             (x, x, 3, 0.5, True, "name"), (x, None, 3.0, 0.5, True, "name"), (x, None, 4, 0.5, True, "name"),
             (x, None, 3, 0.5, 1, "name"), (x, None, 3, 0.5, True, "other"),
             (torch.randn(4, 6, device="cuda"), None, 3, 0.5, True, "name")]
    native_keys = [native("op", call, ()) for call in calls]
    python_keys = [graph_cache._signature("op", call) for call in calls]
    for (key, tensors, nbytes), (python_key, python_tensors, python_nbytes) in zip(native_keys, python_keys):
        assert [t is u for t, u in zip(tensors, python_tensors)] == [True] * len(python_tensors)
        assert nbytes == python_nbytes
    for i, (a, python_a) in enumerate(zip(native_keys, python_keys)):
        for j, (b, python_b) in enumerate(zip(native_keys, python_keys)):
            assert (a[0] == b[0]) == (python_a[0] == python_b[0]), (i, j)
    assert native_keys[0][0] == native_keys[-1][0] and native_keys[0][0] != native_keys[1][0]
    assert native("other op", calls[0], ())[0] != native_keys[0][0]
    with torch.cuda.stream(torch.cuda.Stream()):
        assert native("op", calls[0], ())[0] != native_keys[0][0]
    y = torch.randn(1000, device="cuda")
    assert native("op", (x, y), (1,))[2] == x.numel() * 4
    assert native("op", (x, None, y), (1, 2))[2] == x.numel() * 4
    assert native("op", (x, x.cpu()), ())[0] is None and native("op", (None, 1.5), ())[0] is None
