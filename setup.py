"""Builds sparks_ext, with its C++ extension sparks_ext._C when torch is importable here.

- ``pip install --no-build-isolation .`` (torch installed): compiles the extension against that
  torch now (ahead of time) and records what it was built against in
  ``sparks_ext/_build_config.json``; ``sparks_ext.build_info()`` reports it after install.
- ``pip install .`` (build isolation: pip builds in an environment without torch): installs the
  Python package and the C++ sources (``sparks_ext/csrc``); the first ``import sparks_ext``
  compiles them against the torch that imports it and caches the result (see
  sparks_ext/_build.py). Nothing is ever built against a torch other than the running one.

CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are added when torch has CUDA and a
CUDA toolkit is found (CUDA_HOME, or the real directory of the nvcc on the PATH);
SPARKS_CUDA_ARCH_LIST (default "8.0;9.0") picks the architectures; SPARKS_FORCE_CPU=1 skips CUDA.
The C++ standard is the one the installed torch's headers require (C++17, C++20 from torch 2.14).
The same source list builds on aarch64: the x86 kernel files compile to nothing there and the
NEON ones (csrc/cpu/*neon*) to the neon family (they compile to nothing on x86).
"""
import glob
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """sparks_ext/_build.py by path: importing the package would import torch and the extension."""
    spec = importlib.util.spec_from_file_location("_sparks_build", os.path.join(ROOT, "sparks_ext", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_module()


class BuildPyWithSources(build_py):
    """Also installs csrc/ as sparks_ext/csrc, which the compile at first import reads."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "sparks_ext", "csrc")
        for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True):
            if os.path.isfile(path) and path.endswith((".cpp", ".h", ".cu", ".cuh")):
                destination = os.path.join(target, os.path.relpath(path, os.path.join(ROOT, "csrc")))
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                shutil.copyfile(path, destination)


def _relative(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def extension_and_commands():
    try:
        import torch
    except ImportError:
        print("sparks_ext: torch is not importable in this build environment (pip's build "
              "isolation): installing the C++ sources; the first `import sparks_ext` compiles "
              "them against the torch that imports it. Install with `pip install "
              "--no-build-isolation .` to compile now.", file=sys.stderr)
        return [], {"build_py": BuildPyWithSources}

    config = build.plan(torch)  # finds the CUDA root and sets CUDA_HOME before the import below
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class BuildExtensionRecordingConfig(BuildExtension.with_options(use_ninja=True)):
        """Writes _build_config.json beside the built extension: the loader compares its torch
        version with the running torch before loading it."""

        def run(self):
            super().run()
            directories = {os.path.join(self.build_lib, "sparks_ext")}
            if self.inplace:
                directories.add(os.path.join(ROOT, "sparks_ext"))
            for directory in directories:
                os.makedirs(directory, exist_ok=True)
                build.write_config(directory, config)

    print(f"sparks_ext: building {build.describe(config)}")
    root = Path(ROOT) / "csrc"
    cxx = build.cxx_flags(config["cxx_standard"], config["with_cuda"])
    if config["with_cuda"]:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", config["cuda_arch_list"])
        extension = CUDAExtension(
            "sparks_ext._C", _relative(build.sources(root, with_cuda=True)),
            extra_compile_args={"cxx": cxx, "nvcc": build.nvcc_flags(config["cxx_standard"])},
            extra_link_args=list(build.LINK_FLAGS))
    else:
        extension = CppExtension("sparks_ext._C", _relative(build.sources(root, with_cuda=False)),
                                 extra_compile_args={"cxx": cxx}, extra_link_args=list(build.LINK_FLAGS))
    return [extension], {"build_py": BuildPyWithSources, "build_ext": BuildExtensionRecordingConfig}


ext_modules, cmdclass = extension_and_commands()
setup(
    name="sparks_ext",
    version="0.1.0",
    description="Sub-bit binary neural networks: codebook-indexed XNOR-popcount convolutions for PyTorch",
    packages=find_packages(include=["sparks_ext", "sparks_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    # ninja: torch.utils.cpp_extension compiles the extension with it when no prebuilt one fits.
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "ninja"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "expecttest", "hypothesis", "matplotlib", "pillow"],
        "train": ["pillow", "scikit-learn"],
        "plot": ["matplotlib"],
        "examples": ["scikit-learn", "matplotlib"],
        # python -m sparks_ext bench and benchmarks/bench_models.py: the benchmark suites, the
        # report's chart and the int8 PT2E baseline (torchao's X86InductorQuantizer)
        "bench": ["pytest", "pytest-benchmark", "matplotlib", "torchao==0.18.*"],
    },
)
