"""Loading the compiled CUDA kernels and registering them on the custom ops.

``load()`` imports ``fairseq_clustered._C`` once. If it is missing (a CPU-only
install) or fails to import, the reference implementation serves every device
and :func:`status` says why; the error is kept, not swallowed, so
``python -m fairseq_clustered.info`` can print it.
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch

_loaded: Optional[bool] = None
_reason: str = "not loaded yet"
_extension = None
_ops = None  # the registered cuda_kernels.CudaOps

# Names of the kernels the extension provides, for status reporting.
KERNELS = (
    "hash_codes",
    "lloyd_kmeans",
    "cluster_queries",
    "clustered_attention_fwd",
    "clustered_attention_bwd",
    "improved_clustered_attention_fwd",
    "improved_clustered_attention_bwd",
    "causal_key_clusters",
    "causal_clustered_attention",
)


def load() -> bool:
    """Import the extension and register its CUDA kernels (idempotent).

    Returns True when the CUDA kernels are registered.
    """
    global _loaded, _reason, _extension, _ops
    if _loaded is not None:
        return _loaded
    if torch.version.cuda is None:
        _loaded, _reason = False, f"torch {torch.__version__} is a CPU build"
        return _loaded
    try:
        extension = importlib.import_module("fairseq_clustered._C")
    except ImportError as error:
        _loaded, _reason = False, f"the extension fairseq_clustered._C is not available: {error}"
        return _loaded
    from . import cuda_kernels  # registers the kernels; errors here are real bugs and propagate

    _ops = cuda_kernels.register(extension)
    _loaded, _reason, _extension = True, "loaded", extension
    return _loaded


def extension():
    """The loaded ``fairseq_clustered._C`` module, or None (see :func:`status` for why)."""
    load()
    return _extension


def cuda_ops():
    """The registered :class:`~fairseq_clustered.ops.cuda_kernels.CudaOps`, or None without kernels."""
    load()
    return _ops


def graph_cache():
    """The :class:`~fairseq_clustered.ops.graph_cache.GraphCache` of the registered CUDA ops
    (``clear()`` frees its graphs, ``memory_bytes()`` says what they hold), or None without kernels."""
    ops = cuda_ops()
    return None if ops is None else ops.graphs


# What each CUDA implementation covers; everything else runs the reference on the GPU
# with one warning naming the reason (see fairseq_clustered/ops/cuda_kernels.py).
_CLUSTERED_COVERAGE = ("fp32/fp16/bf16, head dims <= 128; fp16/bf16: Triton on tensor cores (forward: head dims "
                       "<= 64, wider ones by flash without padding or dropout); fp32: Triton on tensor cores, each "
                       "product as six bf16 products (Triton: head dim a power of two 16..128, C <= 128); else "
                       "fp32 cuBLAS")
KERNEL_NOTES = {
    "hash_codes": "fp32/fp16/bf16, dim <= 800; on tensor cores (Triton) with a power-of-two dim 16..256 "
                  "(fp32: 16..128)",
    "lloyd_kmeans": ("num_clusters <= 6144, batch*heads <= 65535; where C <= 128, nearest centroids by 1-bit "
                     "tensor-core products (sm_80+), and on sm_90+ all iterations in one launch of a thread "
                     "block cluster per row where its rule takes it; else population counts"),
    "cluster_queries": "hash_codes then lloyd_kmeans in one composition (same coverage)",
    "clustered_attention_fwd": _CLUSTERED_COVERAGE,
    "clustered_attention_bwd": _CLUSTERED_COVERAGE,
    "improved_clustered_attention_fwd": "fp32/fp16/bf16, head dim = value dim in 32/64/128; fp16/bf16: top keys "
                                        "and exact top-key products on tensor cores (Triton; past the selection "
                                        "kernel's top-k the top keys from fp32 logits in row chunks), the "
                                        "centroid attention by Triton (C <= 128; without padding or dropout "
                                        "head dims <= 64, wider ones by flash); else fp32 cuBLAS and "
                                        "per-query kernels",
    "improved_clustered_attention_bwd": "fp32/fp16/bf16, head dim = value dim in 32/64/128; fp16/bf16: top keys "
                                        "and exact top-key products on tensor cores (Triton, any top-k), the "
                                        "centroid attention's backward in one Triton pass (C <= 128; else flash "
                                        "without padding or dropout); else fp32 cuBLAS and per-query kernels",
    "causal_key_clusters": "codebook assignment kernel; num_clusters <= 6144, batch*heads <= 65535",
    "causal_clustered_attention": "fp16/bf16, no key padding or dropout: one Triton kernel where the window is a "
                                  "power of two in 16..256, the head dim one in 16..128 and C <= 256, else flash attention in three "
                                  "parts (head dim a multiple of 8, <= 248); summary kernels; otherwise the "
                                  "reference (tensor cores for half precision)",
}


def status() -> Dict[str, str]:
    """Kernel name -> "cuda (what it covers)" or the reason only the reference is available."""
    load()
    return {name: (f"cuda ({KERNEL_NOTES[name]})" if _loaded else f"reference only ({_reason})")
            for name in KERNELS}
