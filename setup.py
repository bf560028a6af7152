"""Builds sparks_ext._C against the installed torch.

CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are added when the installed torch
has CUDA and nvcc is found; SPARKS_CUDA_ARCH_LIST (default "8.0;9.0") picks the architectures.
Set SPARKS_FORCE_CPU=1 to skip CUDA even where it is available.
Install with `pip install --no-build-isolation .` so the extension matches the torch you run.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cpp = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    cuda = sources("csrc/cuda/*.cu")
    # -fopenmp: at::parallel_for is inlined from ATen's headers as `#pragma omp parallel`, so
    # without it every kernel runs on one thread (the loader reuses torch's libgomp.so.1).
    cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp"]
    link_flags = ["-fopenmp"]
    want_cuda = os.environ.get("SPARKS_FORCE_CPU", "0") != "1"
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda and has_cuda and cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("SPARKS_CUDA_ARCH_LIST", "8.0;9.0"))
        print(f"sparks_ext: building CPU + CUDA kernels (torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})")
        return CUDAExtension(
            "sparks_ext._C", cpp + cuda,
            define_macros=[("SPARKS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    reason = ("SPARKS_FORCE_CPU=1" if not want_cuda else
              "torch has no CUDA" if torch.version.cuda is None else
              "nvcc not found" if CUDA_HOME is None else "no CUDA sources")
    print(f"sparks_ext: building CPU kernels only ({reason}; torch {torch.__version__})")
    return CppExtension("sparks_ext._C", cpp, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=link_flags)


setup(
    name="sparks_ext",
    version="0.1.0",
    description="Sub-bit binary neural networks: codebook-indexed XNOR-popcount convolutions for PyTorch",
    packages=find_packages(include=["sparks_ext", "sparks_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "expecttest", "hypothesis", "matplotlib"],
        "plot": ["matplotlib"],
        "examples": ["scikit-learn", "matplotlib"],
        # benchmarks/bench_models.py: the int8 PT2E baseline (X86InductorQuantizer)
        "bench": ["pytest-benchmark", "matplotlib", "torchao==0.18.*"],
    },
)
