"""``python -m fairseq_clustered.info``: versions and which kernels are available."""

from __future__ import annotations

import importlib.metadata
import platform
import sys


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    import torch

    from .ops import _triton, cuda_backend

    lines = [
        f"python            {platform.python_version()} ({sys.executable})",
        f"torch             {torch.__version__}",
        f"torch CUDA        {torch.version.cuda or 'none (CPU build)'}",
        f"CUDA device       {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        f"fairseq           {_version('fairseq-fixed') if _version('fairseq-fixed') != 'not installed' else _version('fairseq')}",
        f"fairseq-clustered {_version('fairseq-clustered')}",
        f"triton            {_triton.triton.__version__ if _triton.MISSING is None else _triton.MISSING}"
        + ("" if _triton.MISSING is None else " (the Triton kernels step aside for the CUDA / flash ones)"),
        "kernels:",
    ]
    for name, where in cuda_backend.status().items():
        lines.append(f"  {name:34s} {where}")
    lines.append(f"cuda graphs       {graph_cache_line(cuda_backend)}")
    lines.append(f"dependent launch  {dependent_launch_line(cuda_backend)}")
    return "\n".join(lines)


def dependent_launch_line(cuda_backend) -> str:
    """One line on programmatic dependent launches between the kernels (``cuda/common.cuh``,
    ``ops/_triton.py``): on, off, or why not used."""
    import torch

    from .ops import _triton

    if cuda_backend.graph_cache() is None or not torch.cuda.is_available():
        return "not used (no CUDA kernels)"
    try:
        allowed = _triton.dependent_launches_allowed()
    except ValueError as error:
        return f"invalid setting: {error}"
    if not allowed:
        return "off (FAIRSEQ_CLUSTERED_PDL=0)"
    if torch.cuda.get_device_capability()[0] < 9:
        return "not used (needs sm_90 or newer)"
    triton_too = "" if _triton.MISSING is None and _triton.gdc_wait is not None else (
        " (the CUDA kernels' only: this Triton has no grid dependency control)")
    return ("on: each kernel of the clustered forward starts while the one before it ends, and waits for its "
            f"results{triton_too}; FAIRSEQ_CLUSTERED_PDL=0 turns it off")


def graph_cache_line(cuda_backend) -> str:
    """One line on the CUDA-graph cache of the ops (``ops/graph_cache.py``): off, on with
    its limits, or not used."""
    from .ops import graph_cache

    if cuda_backend.graph_cache() is None:
        return "not used (no CUDA kernels)"
    try:
        config = graph_cache.settings()
    except ValueError as error:
        return f"invalid setting: {error}"
    if not config.enabled:
        return "off (FAIRSEQ_CLUSTERED_CUDA_GRAPHS=0)"
    inputs = ("read in place where a check at capture allows (FAIRSEQ_CLUSTERED_GRAPH_INPUTS=copy copies them)"
              if config.inputs_in_place else "copied into the graphs (FAIRSEQ_CLUSTERED_GRAPH_INPUTS=copy)")
    native = cuda_backend.graph_cache().native is not None
    larger = ", larger ones where read in place" if config.inputs_in_place else ""
    return (f"on: the kernels' compositions replay from a CUDA graph once a call signature repeats (inputs up to "
            f"{config.max_input_bytes >> 20} MiB{larger}, cache up to {config.budget_bytes >> 20} MiB; "
            f"FAIRSEQ_CLUSTERED_CUDA_GRAPHS=0 turns it off); the calls' tensors {inputs}"
            + ("; the clustered and improved steps from C++ where their graphs read their inputs in place"
               if native and config.inputs_in_place else ""))


if __name__ == "__main__":
    print(report())
