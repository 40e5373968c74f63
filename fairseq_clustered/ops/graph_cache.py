"""Replaying the CUDA compositions of the ops from CUDA graphs, one graph per call signature.

At short and medium lengths a clustered-attention step is bound by the host, not the
GPU: each op's composition (:mod:`.cuda_kernels`) issues tens of torch ops and kernel
launches, and on a GPU server's CPU each costs more time to issue than its kernel takes
to run. :class:`GraphCache` records a composition in a CUDA graph the second time it meets
the same *signature* (every tensor argument's shape, strides, dtype and device, the
current stream, and the non-tensor arguments) and from then on runs it as: one copy of
the tensor arguments into the graph's static inputs, one replay, one copy of the outputs
into fresh tensors. The same kernels run on the same values, so the results are
bit-identical to the eager composition. Where the compiled extension is loaded, each of
the two copies is one kernel launch whatever the dtypes (``copy_tensors`` /
``fresh_copies`` in ``cuda/copies.cu``); torch's fused copy takes one per dtype, and each
launch through the dispatcher costs more CPU time than the replay itself.

Inputs read in place. The copies into the static inputs are passes over q, k, v in the
forward and over the incoming gradient, k and v in the backward: 6 of the 10 large tensors a
step's copies moved. Where the extension provides ``GraphInputs`` (``cuda/graph_inputs.cpp``),
the graph's kernels are instead pointed at the caller's tensors before each replay: the kernel
parameters that hold an address inside a static input are found once after the capture, and
rewritten in the executable graph with the same offsets into the call's tensors. That search
only sees addresses passed as kernel parameters, so every graph is checked once, at its
capture: with its static inputs poisoned (NaN, -1) and its kernels pointed at fresh copies of
the call's arguments, one replay must give the eager composition's outputs
(:func:`_same_result`: up to the last bits of atomic floating-point sums, far from what a read
of the poison gives). A graph that fails the check, whose check runs out of memory, or whose
nodes the search cannot read (memcpy nodes on an input, kernels whose parameters travel as one
buffer) keeps copying (:attr:`GraphCache.copied_inputs` says why), and so does a call whose
tensors are not aligned like the static buffers (256 bytes: the kernels chose their vector
widths for those). ``FAIRSEQ_CLUSTERED_GRAPH_INPUTS=copy`` turns it off, for the graphs already
captured too. The search could also take a word that is no address for one of a static input (an int
beside stale struct padding), and rewriting it would fault before the check compares anything:
``cuda/graph_inputs.cpp`` says how that is kept out, and :func:`_placed_buffer` places the static
inputs where no genuine address is mistaken for such a word.

Outputs are never the graph's own buffers: the 12 layers of a model that share a shape share one
graph, and each layer's saved outputs must survive the next layer's replay. So they are copied
into fresh tensors, except the *filled* ones: a composition may take tensors that it writes whole
and returns without reading them (``run``'s ``filled``: the caller allocates them per call, as an
attention output), and those reach its kernels as the inputs do. Read in place, the graph writes
the caller's tensor and nothing is copied; where the graph copies its inputs, the result is copied
from the static buffer into the caller's tensor. (Relocating a graph-owned output instead would not
be safe: the caching allocator may have given its memory, or part of it, to an intermediate
earlier in the same graph, whose kernels would follow.)

What it costs and where it steps aside (:func:`settings`):

* memory: each graph keeps its static inputs and a private pool for the composition's
  intermediates. The cache holds at most ``FAIRSEQ_CLUSTERED_GRAPH_CACHE_MB`` (default
  1024) of them and at most ``MAX_ENTRIES`` graphs, evicting the least recently used;
* each signature is captured at most once: one that was evicted, or whose graph alone
  exceeds the budget, runs eagerly from then on. So a run with many shapes (fairseq's
  length-bucketed batches) pays a bounded number of captures and never thrashes;
* calls whose tensor arguments exceed ``FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB`` (default
  256) run eagerly unless their graph reads them in place: copies into static inputs grow
  with the inputs while the launches they save do not. A larger call is captured where the
  settings let graphs read in place (the capture and its check hold two copies of its
  inputs for that one call); once its check passes, its graph keeps no static inputs (a
  later call that it cannot read in place runs eagerly), and one whose check fails is
  dropped for eager calls. A capture that runs out of memory leaves its signature eager;
* ``FAIRSEQ_CLUSTERED_CUDA_GRAPHS=0`` switches the cache off;
* ``FAIRSEQ_CLUSTERED_GRAPH_INPUTS=copy`` copies every call's tensors into the static inputs
  (the default, ``in-place``, reads them where the check above allows);
* inside a CUDA graph capture (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``)
  the composition runs eagerly, so that the outer capture records it;
* CPU tensors always run eagerly.

A capture that fails (a composition that cannot be captured, or no memory left for its static
inputs) is reported once with a warning and that signature runs eagerly from then on; results
do not change.

Replays from C++. Where the extension provides ``GraphTable`` (``cuda/graph_table.cpp``), a
composition's call may name a *native key* (``run``'s ``native``: the key that a C++ entry point
builds from the same arguments, ``cuda/clustered_step.cpp``). A graph that reads its inputs in
place is then also registered in the table under that key, and the entry point replays it without
Python: it allocates the filled tensors, points the graph at the call's tensors and launches it,
and its backward node does the same with the backward's graph. Everything else stays here: the
captures and their checks, eviction (which removes a graph from the table before it is freed; the
table's replays count as uses for the least-recently-used order), the settings (the table serves
nothing once the environment variables above differ from those it was filled under, nor inside a
capture), and every call that the table does not serve.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

MAX_ENTRIES = 48
# A signature is captured on its second call: the first runs eagerly, which compiles
# Triton kernels and creates library handles outside the capture.
CAPTURE_ON_CALL = 2
MAX_SIGNATURES_TRACKED = 4096


@dataclass(frozen=True)
class Settings:
    enabled: bool
    budget_bytes: int
    max_input_bytes: int
    inputs_in_place: bool


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer (megabytes), got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (megabytes), got {value}")
    return value


_ENVIRONMENT = ("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "FAIRSEQ_CLUSTERED_GRAPH_CACHE_MB",
                "FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB", "FAIRSEQ_CLUSTERED_GRAPH_INPUTS")
_parsed: Dict[Tuple[Optional[str], ...], Settings] = {}


# os.environ's own mapping (bytes names on POSIX), which it keeps in step with every change made
# through it: reading it directly costs 0.2 us where os.environ.get's encoding and decoding of four
# names costs 2.7 (x2 per step; ~15 us each on the GPU server's CPU). None where it differs.
_RAW_ENVIRONMENT = getattr(os.environ, "_data", None)
_RAW_NAMES = tuple(os.environ.encodekey(name) for name in _ENVIRONMENT) if hasattr(os.environ, "encodekey") else None


def settings() -> Settings:
    """The cache's settings from the environment, looked up at every call (tests and users
    may change them between calls) and parsed once per distinct value."""
    if _RAW_ENVIRONMENT is not None and _RAW_NAMES is not None:
        raw = tuple(map(_RAW_ENVIRONMENT.get, _RAW_NAMES))
    else:
        raw = tuple(os.environ.get(name) for name in _ENVIRONMENT)
    config = _parsed.get(raw)
    if config is None:
        config = _parsed[raw] = _parse_settings()
    return config


def _parse_settings() -> Settings:
    switch = os.environ.get("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", "1")
    if switch not in ("0", "1"):
        raise ValueError(f"FAIRSEQ_CLUSTERED_CUDA_GRAPHS must be 0 (off) or 1 (on), got {switch!r}")
    inputs = os.environ.get("FAIRSEQ_CLUSTERED_GRAPH_INPUTS", "in-place")
    if inputs not in ("in-place", "copy"):
        raise ValueError(f"FAIRSEQ_CLUSTERED_GRAPH_INPUTS must be in-place (read the caller's tensors where a "
                         f"check allows) or copy (copy them into the graph), got {inputs!r}")
    return Settings(
        enabled=switch == "1",
        budget_bytes=_env_int("FAIRSEQ_CLUSTERED_GRAPH_CACHE_MB", 1024) * 2**20,
        max_input_bytes=_env_int("FAIRSEQ_CLUSTERED_GRAPH_MAX_INPUT_MB", 256) * 2**20,
        inputs_in_place=inputs == "in-place",
    )


class _Entry:
    """One captured composition: its graph, static inputs and (graph-owned) outputs; ``inputs``, once
    the capture's check has passed, the ``GraphInputs`` that point the graph at the caller's tensors
    (None: the calls' tensors are copied into ``static_tensors``). ``static_tensors`` is None once
    released (:meth:`release_static_inputs`)."""

    def __init__(self, graph, static_tensors: List[Tensor], outputs: Tuple[Tensor, ...], single: bool, nbytes: int,
                 filled: Sequence[int] = ()):
        self.filled = list(filled)
        self.native_keys = set()  # the keys it is registered under in the C++ table
        self.graph = graph
        self.static_tensors = static_tensors
        self.static_bases = [_base(t) for t in static_tensors]
        self.outputs = outputs
        self.single = single
        self.nbytes = nbytes
        self.inputs = None
        self.executable = 0  # the cudaGraphExec_t, where the graph was kept for GraphInputs
        # Filled tensors (indices among the tensor arguments): not copied in. The outputs that are one
        # of them (output index -> tensor index) are the caller's tensors; the others are copied out.
        self.read = [i for i in range(len(static_tensors)) if i not in set(filled)]
        self.filled_outputs = {i: j for i, out in enumerate(outputs) for j in filled
                               if _same_view(out, static_tensors[j])}
        self.copied_outputs = [i for i in range(len(outputs)) if i not in self.filled_outputs]

    def static_bytes(self) -> int:
        """Bytes of the static inputs (0 once released)."""
        return sum(t.numel() * t.element_size() for t in self.static_tensors or ())

    def release_static_inputs(self) -> None:
        """Frees the static inputs of a graph that reads its callers' tensors in place (it replays only so
        from then on): the graph's kernels are pointed at each call's tensors before each replay, and the
        check at capture showed that no kernel reads the static inputs otherwise. The filled outputs
        among them go too (in place they are the caller's tensors)."""
        self.nbytes -= self.static_bytes()
        self.outputs = tuple(None if i in self.filled_outputs else out for i, out in enumerate(self.outputs))
        self.static_tensors = None


class GraphCache:
    """Per-signature CUDA graphs of functions ``fn(*args) -> Tensor | tuple of Tensors``.

    ``fn`` must be a pure function of its arguments that issues only capturable work (no
    host synchronisation, no data-dependent Python control flow): the compositions of
    :mod:`.cuda_kernels` are written that way. Arguments are tensors, None, and hashable
    Python scalars.

    ``copies``: an object with ``copy_tensors(destinations, sources)`` and
    ``fresh_copies(tensors) -> list`` that does each in one launch (the compiled extension),
    or None for torch's copies (one launch per dtype). Where it also has ``GraphInputs``
    (the extension does), graphs read their callers' tensors in place (the module's docstring);
    where it has ``graph_signature``, that builds the calls' keys (:func:`_signature` in C++).
    """

    def __init__(self, copies=None):
        self._copy_into = copies.copy_tensors if copies is not None else _copy_all
        self._fresh_copies = copies.fresh_copies if copies is not None else _fresh_copies
        self._graph_inputs = getattr(copies, "GraphInputs", None)
        # the extension's _signature, where it has one (cuda/graph_signature.cpp): ~5x faster
        self._native_signature = getattr(copies, "graph_signature", None)
        # the graphs that C++ entry points replay (the module's docstring), where the extension has them
        table = getattr(copies, "GraphTable", None)
        self.native = table(list(_ENVIRONMENT)) if table is not None and self._graph_inputs is not None else None
        # name -> why its latest capture copies its inputs (GraphInputs could not be used or its check failed)
        self.copied_inputs: Dict[str, str] = {}
        self._entries: "OrderedDict[Hashable, _Entry]" = OrderedDict()  # least recently used first
        self._calls: "OrderedDict[Hashable, int]" = OrderedDict()  # signatures not captured yet
        self._eager: "OrderedDict[Hashable, None]" = OrderedDict()  # evicted, too large or not capturable
        self._streams: Dict[int, torch.cuda.Stream] = {}
        self._warned = set()
        self.captures = 0
        self._replays = 0

    def __del__(self):
        # The table may outlive the cache (backward nodes hold it): it must not keep graphs freed here.
        native = getattr(self, "native", None)
        if native is not None:
            native.clear()

    # ----------------------------------------------------------------- public

    @property
    def replays(self) -> int:
        """Graph replays so far, those of the C++ entry points included."""
        return self._replays + (self.native.replays if self.native is not None else 0)

    def run(self, name: str, fn: Callable, args: Sequence, filled: Sequence[int] = (),
            native: Optional[Callable[[], Tuple[bytes, Sequence[Tensor]]]] = None):
        """``fn(*args)``, from a cached graph where the rules of the module allow. ``filled``: the
        positions in ``args`` of tensors that ``fn`` writes whole and returns without reading them
        (the module's docstring); the same for every call of ``name``. A position holding None is
        ignored (a composition that makes that output itself on this call's path).

        ``native``: where a C++ entry point replays this composition, a function of no arguments
        giving ``(key, extras)``: the entry point's key of this call and the tensors whose layouts it
        wants remembered with the graph. It is called only where the graph is registered in the
        C++ table (a graph that reads its inputs in place, under in-place settings)."""
        config = settings()
        if not config.enabled:
            return fn(*args)
        # the input limit counts the inputs, not the outputs written into (as when they were the graph's)
        if self._native_signature is not None:
            key, tensors, nbytes = self._native_signature(name, args, filled)
        else:
            key, tensors, nbytes = _signature(name, args)
            nbytes -= sum(args[i].numel() * args[i].element_size() for i in filled if isinstance(args[i], Tensor))
        # CUDA is initialised (the call has CUDA tensors): ask torch._C directly, not through
        # torch.cuda's wrapper, which checks that first on every call.
        if key is None or torch._C._cuda_isCurrentStreamCapturing():
            return fn(*args)
        large = nbytes > config.max_input_bytes  # a graph only where it reads them in place (module docstring)
        if large and not self._may_read_in_place(config):
            return fn(*args)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            if native is not None and entry.inputs is not None and config.inputs_in_place:
                self._publish(entry, tensors, native)
            result = self._replay(entry, tensors, config.inputs_in_place)
            return fn(*args) if result is None else result
        if key in self._eager:
            return fn(*args)
        calls = self._calls.pop(key, 0) + 1
        if calls < CAPTURE_ON_CALL:
            self._remember(self._calls, key, calls)
            return fn(*args)
        filled = tuple(i for i in filled if isinstance(args[i], Tensor))
        entry, pointers = self._capture(name, fn, args, tensors, config, filled)
        if entry is None or (large and pointers is None):
            self._remember(self._eager, key, None)
            return fn(*args)
        # (a large call's graph is kept without its static inputs, below)
        if entry.nbytes - (entry.static_bytes() if large else 0) > config.budget_bytes:  # used for this call only
            self._remember(self._eager, key, None)
            return self._replay(entry, tensors, False)
        if large:  # checked before it joins the cache, which then counts it without its static inputs
            result = self._check_in_place(name, entry, pointers, fn, args, tensors)
            if entry.inputs is None:  # it would copy the inputs: eager from now on
                self._remember(self._eager, key, None)
                return result
            entry.release_static_inputs()
        self._entries[key] = entry
        self._evict(config, key)
        if pointers is not None:
            if not large:
                result = self._check_in_place(name, entry, pointers, fn, args, tensors)
            if native is not None and entry.inputs is not None:
                self._publish(entry, tensors, native)
            return result
        return self._replay(entry, tensors, False)

    def inputs_read_in_place(self) -> int:
        """How many of the cached graphs read their callers' tensors in place (the others copy them)."""
        return sum(e.inputs is not None for e in self._entries.values())

    def memory_bytes(self) -> int:
        """Bytes the cached graphs hold on the GPU (static inputs and private pools)."""
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every graph (their memory returns to PyTorch's caching allocator) and forget
        every signature, so that each may be captured again."""
        if self.native is not None:
            self.native.clear()
        self._entries.clear()
        self._calls.clear()
        self._eager.clear()

    # ---------------------------------------------------------------- private

    def _may_read_in_place(self, config: Settings) -> bool:
        """Whether graphs captured under ``config`` may read their callers' tensors in place (the extension's
        ``GraphInputs``, in-place settings, a torch that keeps the captured graph)."""
        return self._graph_inputs is not None and config.inputs_in_place and _keeps_graphs()

    def _publish(self, entry: _Entry, tensors: List[Tensor], native) -> None:
        """Registers ``entry`` (which reads its inputs in place) in the C++ table under the native key
        of this call (``run``'s ``native``). Again at every call that reaches here, which the table did
        not serve: it may have been cleared since (its settings changed)."""
        if self.native is None:
            return
        native_key, extras = native()
        outputs = [entry.filled_outputs.get(i, -1) for i in range(len(entry.outputs))]
        self.native.add(native_key, entry.executable, entry.inputs, tensors, entry.filled, outputs,
                        [entry.outputs[i] for i in entry.copied_outputs], list(extras))
        entry.native_keys.add(native_key)

    def _forget_native(self, entry: _Entry) -> None:
        """Removes ``entry``'s graph from the C++ table (before the graph is freed)."""
        for native_key in entry.native_keys:
            self.native.remove(native_key)
        entry.native_keys.clear()

    def _replay(self, entry: _Entry, tensors: List[Tensor], in_place: bool):
        """The graph's outputs for ``tensors``: read in place where ``in_place`` (the setting), the
        graph passed its check and the tensors are aligned like its static inputs; else copied in, or
        None where the graph has released its static inputs (the caller then runs the call eagerly)."""
        # (an empty tensor's address is ignored: no kernel reads it)
        in_place = in_place and entry.inputs is not None and entry.inputs.point_at(
            entry.executable, [t.data_ptr() for t in tensors])
        if not in_place and entry.static_tensors is None:
            return None
        if not in_place:
            if entry.inputs is not None:  # back to the static inputs (a no-op where it points there)
                entry.inputs.point_at(entry.executable, entry.static_bases)
            self._copy_into([entry.static_tensors[i] for i in entry.read], [tensors[i] for i in entry.read])
        entry.graph.replay()
        self._replays += 1
        if not entry.filled_outputs:
            outputs = self._fresh_copies(entry.outputs)  # fresh copies: see the module's docstring
            return outputs[0] if entry.single else tuple(outputs)
        outputs = [None] * len(entry.outputs)
        if entry.copied_outputs:  # (none for a forward that fills all it returns: no launch)
            copies = self._fresh_copies([entry.outputs[i] for i in entry.copied_outputs])
            for i, copy in zip(entry.copied_outputs, copies):
                outputs[i] = copy
        for i, j in entry.filled_outputs.items():
            outputs[i] = tensors[j]
        if not in_place:  # the graph wrote the static buffers
            self._copy_into([tensors[j] for j in entry.filled_outputs.values()],
                            [entry.outputs[i] for i in entry.filled_outputs])
        return outputs[0] if entry.single else tuple(outputs)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device)
        return self._streams[index]

    @staticmethod
    def _remember(table: "OrderedDict", key, value) -> None:
        table[key] = value
        while len(table) > MAX_SIGNATURES_TRACKED:
            table.popitem(last=False)

    def _capture(self, name, fn, args, tensors: List[Tensor], config: Settings, filled: Sequence[int] = ()):
        """``(entry, pointers)``: a new :class:`_Entry` for ``fn(*args)`` (its outputs are computed by
        the first replay), or None if the capture failed; and the ``GraphInputs`` of its graph where
        they may read the caller's tensors in place once checked (:meth:`_check_in_place`), else None.
        ``tensors``: the tensors among ``args``; ``filled``: as :meth:`run`'s."""
        try:
            static_args = [_static_copy(a) for a in args]
        except torch.cuda.OutOfMemoryError:  # the call itself fitted: it stays eager
            self._warn_eager(name, "out of memory for its static inputs")
            return None, None
        static_tensors = [a for a in static_args if isinstance(a, Tensor)]
        device = tensors[0].device
        in_place = self._may_read_in_place(config)
        if in_place and any(s.stride() != t.stride() for s, t in zip(static_tensors, tensors)):
            in_place = False  # an input whose elements overlap (an expanded view) has a dense static copy
            self.copied_inputs[name] = "an input's elements overlap in memory"
        current = torch.cuda.current_stream(device)
        stream = self._stream(device)
        torch.cuda.synchronize(device)
        reserved = torch.cuda.memory_reserved(device)
        graph = torch.cuda.CUDAGraph(keep_graph=True) if in_place else torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    outputs = fn(*static_args)
                finally:
                    graph.capture_end()
        except Exception as error:  # a composition that cannot be captured: keep it eager
            self._warn_eager(name, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            current.wait_stream(stream)
            return None, None
        current.wait_stream(stream)
        single = isinstance(outputs, Tensor)
        outputs = (outputs,) if single else tuple(outputs)
        pool = torch.cuda.memory_reserved(device) - reserved
        nbytes = max(0, pool) + sum(t.numel() * t.element_size() for t in static_tensors)
        self.captures += 1
        filled_tensors = [sum(isinstance(a, Tensor) for a in args[:i]) for i in filled]  # among the tensors
        entry = _Entry(graph, static_tensors, outputs, single, nbytes, filled_tensors)
        pointers = None
        if in_place:
            graph.instantiate()
            entry.executable = graph.raw_cuda_graph_exec()
            ends = [base + _span_bytes(t) if base else 0 for base, t in zip(entry.static_bases, static_tensors)]
            try:
                pointers = self._graph_inputs(graph.raw_cuda_graph(), entry.static_bases, ends)
                reason = pointers.unsupported
            except RuntimeError as error:  # a driver call failed: keep copying
                reason = str(error).splitlines()[0]
            if reason:
                self.copied_inputs[name] = reason
                pointers = None
        return entry, pointers

    def _warn_eager(self, name: str, reason: str) -> None:
        """Warns, once per composition, that a capture of ``name`` failed for ``reason``."""
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"fairseq_clustered: {name} cannot be captured in a CUDA graph ({reason}); "
                          "it runs eagerly (same results)", stacklevel=5)

    def _check_in_place(self, name, entry: _Entry, pointers, fn, args, tensors: List[Tensor]):
        """This call's result, from the eager composition; and the check that lets ``entry`` read its
        callers' tensors in place (:meth:`_difference_in_place`). Where the check runs out of memory
        (it needs the eager composition's memory and a copy of the arguments besides the graph's),
        the graph keeps copying and this call replays it so."""
        try:
            expected = fn(*args)
            difference = self._difference_in_place(entry, pointers, tensors, expected)
            reason = None if difference is None else \
                f"its replay reading the inputs in place differed from the eager result: {difference}"
        except torch.cuda.OutOfMemoryError:
            expected, reason = None, "the check that it may read its inputs in place ran out of memory"
        if reason is None:
            entry.inputs = pointers  # left pointing at the check's copies: every replay points it first
            self.copied_inputs.pop(name, None)
            return expected
        pointers.point_at(entry.executable, entry.static_bases)
        self.copied_inputs[name] = reason
        return expected if expected is not None else self._replay(entry, tensors, False)

    def _difference_in_place(self, entry: _Entry, pointers, tensors: List[Tensor], expected) -> Optional[str]:
        """None if ``entry``'s graph, with its static inputs poisoned (all bytes 0xFF: NaN in every float
        dtype, -1 in the integers, True) and its kernels pointed at fresh copies of ``tensors``, replays to
        ``expected`` (:func:`_same_result`); else how it differs. A kernel reading an input through an
        address that :class:`GraphInputs` did not rewrite would read the poison instead."""
        expected = (expected,) if isinstance(expected, Tensor) else tuple(expected)
        elsewhere = [_static_copy(t) for t in tensors]
        for static in entry.static_tensors:
            _bytes_of(static).fill_(0xFF)
        for j in entry.filled_outputs.values():  # a write that misses them leaves the poison there
            _bytes_of(elsewhere[j]).fill_(0xFF)
        if not pointers.point_at(entry.executable, [_base(t) for t in elsewhere]):
            return "its tensors are not aligned like the static inputs"
        entry.graph.replay()
        self._replays += 1
        if len(entry.outputs) != len(expected):
            return f"{len(entry.outputs)} outputs, {len(expected)} eagerly"
        replayed = [elsewhere[entry.filled_outputs[i]] if i in entry.filled_outputs else out
                    for i, out in enumerate(entry.outputs)]
        for i, (got, want) in enumerate(zip(replayed, expected)):
            difference = _same_result(got, want, f"output {i}")
            if difference is not None:
                return difference
        return None

    def _evict(self, config: Settings, newest: Hashable) -> None:
        """Drop the least recently used graphs until the cache is within its limits (the C++ table's
        replays since the last eviction count as uses just before ``newest``, the graph just captured)."""
        if self.native is not None:
            owners = {native_key: key for key, entry in self._entries.items() for native_key in entry.native_keys}
            for native_key in self.native.used_since_asked():
                if native_key in owners:
                    self._entries.move_to_end(owners[native_key])
            self._entries.move_to_end(newest)
        while len(self._entries) > 1 and (len(self._entries) > MAX_ENTRIES
                                          or self.memory_bytes() > config.budget_bytes):
            key, entry = self._entries.popitem(last=False)
            if self.native is not None:
                self._forget_native(entry)
            self._remember(self._eager, key, None)


def _copy_all(destinations: List[Tensor], sources: List[Tensor]) -> None:
    """``destinations[i].copy_(sources[i])`` for every ``i``, one fused copy per dtype.

    torch's fused copy (``_foreach_copy_``) takes its one-launch route only when every
    tensor of the call has one dtype; with mixed dtypes it copies tensor by tensor, a
    ``cudaMemcpyAsync`` each (~10 us of CPU apiece on the H200 server: a third of a causal
    step's host time at 4k went to the ~20 copies of its two replays)."""
    groups: Dict[torch.dtype, Tuple[List[Tensor], List[Tensor]]] = {}
    for destination, source in zip(destinations, sources):
        group = groups.setdefault(destination.dtype, ([], []))
        group[0].append(destination)
        group[1].append(source)
    for group_destinations, group_sources in groups.values():
        torch._foreach_copy_(group_destinations, group_sources)


def _fresh_copies(tensors: Sequence[Tensor]) -> List[Tensor]:
    copies = [torch.empty_like(t) for t in tensors]
    _copy_all(copies, list(tensors))
    return copies


def _signature(name: str, args: Sequence) -> Tuple[Optional[Hashable], List[Tensor], int]:
    """``(key, tensor arguments, their bytes)`` of a call; the key is None when a call has no
    tensor or a tensor off the GPU (such calls run eagerly). The extension's ``graph_signature``
    (``cuda/graph_signature.cpp``) is the same function in C++, and takes its place where loaded.

    The key holds the current stream, and every argument's description: shape, strides,
    dtype and device of a tensor; type and value of anything else. It is built on every
    call, so it takes the cheapest calls that identify these (the raw stream handle, not a
    ``torch.cuda.Stream`` object)."""
    tensors: List[Tensor] = []
    parts: List[Hashable] = [name, None]
    nbytes = 0
    for arg in args:
        if isinstance(arg, Tensor):
            if not arg.is_cuda:
                return None, tensors, 0
            tensors.append(arg)
            nbytes += arg.numel() * arg.element_size()
            parts.append((arg.shape, arg.stride(), arg.dtype, arg.get_device()))
        else:
            parts.append((type(arg), arg))
    if not tensors:
        return None, tensors, 0
    device = tensors[0].get_device()
    parts[1] = (device, torch._C._cuda_getCurrentRawStream(device))
    return tuple(parts), tensors, nbytes


def _static_copy(arg):
    """A graph-owned copy of a tensor argument, with the argument's strides (gaps included) unless its
    elements overlap (then dense), in a buffer of its own with room after its end, so that no other
    buffer starts at an address one past it; anything else as it is."""
    if not isinstance(arg, Tensor):
        return arg
    if _overlaps(arg):
        static = torch.empty_like(arg, memory_format=torch.preserve_format)
    else:
        span = _span_bytes(arg)
        buffer = _placed_buffer(span + 16, arg.device)
        static = buffer[:span].view(arg.dtype).as_strided(arg.shape, arg.stride())
    static.copy_(arg)
    return static


# GraphInputs (cuda/graph_inputs.cpp) refuses a graph where a word of a kernel's parameters lands in a
# static input less than 1 MiB past a 4 GiB boundary: there it may be a small integer beside stale struct
# padding rather than an address. The caching allocator's fresh segments often start exactly on such a
# boundary, so static inputs are placed clear of those windows where they can be (1 MiB more memory for
# the buffer that needs it).
_REGION_BITS = 32
_AMBIGUOUS_BYTES = 1 << 20  # graph_inputs.cpp's kAmbiguousOffset
_PLACEMENT_TRIES = 3


def _reaches_ambiguous(start: int, nbytes: int) -> bool:
    """Whether the addresses from ``start`` to ``start + nbytes`` (included: kernels take one-past-the-end
    pointers) reach into the first ``_AMBIGUOUS_BYTES`` past a 4 GiB boundary. The only window that can
    is the one after the last boundary at or before the end."""
    last_boundary = (start + nbytes) >> _REGION_BITS << _REGION_BITS
    return last_boundary + _AMBIGUOUS_BYTES > start


def _clear_offset(base: int, nbytes: int, room: int) -> Optional[int]:
    """An offset in ``[0, room]``, a multiple of 512 (the static buffers' alignment), from which ``nbytes``
    starting at ``base + offset`` stay clear of the windows of :func:`_reaches_ambiguous`; None if none."""
    if not _reaches_ambiguous(base, nbytes):
        return 0
    past_window = ((base + nbytes) >> _REGION_BITS << _REGION_BITS) + _AMBIGUOUS_BYTES
    offset = -(-(past_window - base) // 512) * 512
    return offset if offset <= room and not _reaches_ambiguous(base + offset, nbytes) else None


def _placed_buffer(nbytes: int, device: torch.device) -> Tensor:
    """``nbytes`` of uint8 on ``device``, clear of the windows of :func:`_reaches_ambiguous` where the
    allocator lets them be: else as allocated (a graph whose kernels take such an address then copies its
    inputs; always so for a buffer of over 4 GiB)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if device.type != "cuda" or nbytes == 0 or not _reaches_ambiguous(buffer.data_ptr(), nbytes):
        return buffer
    room = _AMBIGUOUS_BYTES + 512
    held = []  # the tries that failed, kept until the end so that each next one gets other memory
    for _ in range(_PLACEMENT_TRIES):
        larger = torch.empty(nbytes + room, dtype=torch.uint8, device=device)
        offset = _clear_offset(larger.data_ptr(), nbytes, room)
        if offset is not None:
            return larger[offset:offset + nbytes]
        held.append(larger)
    return buffer


def _same_result(got: Tensor, want: Tensor, what: str) -> Optional[str]:
    """None where ``got`` is ``want`` up to the order of floating-point sums, else how they differ.

    Integers and booleans must be equal. Floats must be finite in the same places and within 1% of
    the largest magnitude of ``want``: compositions with atomic floating-point sums (flash
    attention's backward accumulates dq that way) give results that differ in the last bits from
    run to run, while a read of the poisoned static inputs gives NaN, or cluster ids of -1, or
    all-padded keys, which are far outside that."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{what} is {got.dtype} {tuple(got.shape)}, eagerly {want.dtype} {tuple(want.shape)}"
    if not want.is_floating_point():
        return None if torch.equal(got, want) else f"{what} has other values"
    finite = want.isfinite()
    if not torch.equal(got.isfinite(), finite):
        return f"{what} is not finite where the eager result is, or the other way round"
    if not finite.any():
        return None
    got, want = got[finite].double(), want[finite].double()
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    return None if error <= 0.01 * scale else f"{what} differs by up to {error:.3g} (largest value {scale:.3g})"


def _same_view(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory (an output that is a filled argument)."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def _base(tensor: Tensor) -> int:
    """The address of a tensor's first element, 0 for an empty tensor (never read)."""
    return tensor.data_ptr() if tensor.numel() else 0


def _span_bytes(tensor: Tensor) -> int:
    """Bytes from a tensor's first element to the end of its last (strides >= 0)."""
    if tensor.numel() == 0:
        return 0
    return (1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))) * tensor.element_size()


def _overlaps(tensor: Tensor) -> bool:
    """Whether two elements of ``tensor`` share memory (an expanded view, a zero stride)."""
    extent = 1
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1)
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def _bytes_of(tensor: Tensor) -> Tensor:
    """The whole storage under ``tensor`` as a flat uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())


@functools.lru_cache(maxsize=None)
def _keeps_graphs() -> bool:
    """Whether this torch's CUDAGraph can keep its cudaGraph_t (``keep_graph``, torch 2.8 and newer),
    which GraphInputs reads. Asked at the first capture (the GPU is in use by then)."""
    if not all(hasattr(torch.cuda.CUDAGraph, name) for name in ("instantiate", "raw_cuda_graph",
                                                                   "raw_cuda_graph_exec")):
        return False
    try:
        torch.cuda.CUDAGraph(keep_graph=True)
    except (TypeError, RuntimeError):
        return False
    return True
