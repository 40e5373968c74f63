"""Build and install fairseq-clustered.

The CUDA kernels in ``cuda/`` are compiled into ``fairseq_clustered._C`` through
``torch.utils.cpp_extension`` when a CUDA build of torch and ``nvcc`` are present
(``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures, e.g. ``9.0`` for an H100).
Without them the package installs the pure-PyTorch reference only, which works
everywhere. ``FAIRSEQ_CLUSTERED_CUDA=0`` skips the kernels, ``=1`` makes a failed
CUDA setup an error instead of a skip.
"""

import glob
import os

from setuptools import find_packages, setup


def cuda_extensions():
    wanted = os.environ.get("FAIRSEQ_CLUSTERED_CUDA", "auto")
    if wanted == "0":
        return [], {}
    sources = sorted(glob.glob("cuda/*.cu") + glob.glob("cuda/*.cpp"))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as error:  # torch is installed before this package by scripts/setup_env.sh
        if wanted == "1":
            raise RuntimeError(f"FAIRSEQ_CLUSTERED_CUDA=1 but torch is missing: {error}")
        return [], {}
    reason = None
    if not sources:
        reason = "no sources in cuda/"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    elif CUDA_HOME is None:
        reason = "nvcc / CUDA_HOME not found"
    if reason is not None:
        if wanted == "1":
            raise RuntimeError(f"FAIRSEQ_CLUSTERED_CUDA=1 but the CUDA kernels cannot be built: {reason}")
        print(f"fairseq-clustered: building without CUDA kernels ({reason})")
        return [], {}
    # No -std flag: torch's BuildExtension adds the standard its version expects. The
    # C++ ABI is pinned to torch's explicitly (recent torch no longer passes it and the
    # compiler's default decides otherwise).
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', True))}"
    extension = CUDAExtension(
        name="fairseq_clustered._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", abi],
            "nvcc": ["-O3", abi, "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="fairseq-clustered",
    version="0.1.0",
    description="Clustered attention (Vyas et al., 2020) for fairseq, with CUDA kernels",
    packages=find_packages(include=["fairseq_clustered", "fairseq_clustered.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
