"""How the C++ extension ``sparks_ext._C`` is built and loaded.

One set of sources and flags serves both ways of getting it:

- ahead of time: ``pip install --no-build-isolation .`` runs ``setup.py`` with the installed torch,
  which compiles ``sparks_ext/_C*.so`` and records in ``_build_config.json`` beside it what it was
  built against;
- at first import: a plain ``pip install .`` (build isolation, no torch in the build) installs
  the C++ sources instead, and ``import sparks_ext`` compiles them against the torch that is
  importing it (``torch.utils.cpp_extension.load``, needs ninja and a C++ compiler), caches the
  result per torch version, Python, CUDA and source hash, and says so on stderr. A prebuilt
  extension recorded for another torch is not loaded (torch's C++ ABI changes between
  versions); it is compiled again for the running torch the same way.

This module imports torch only inside functions: ``setup.py`` loads it by path, also where the
build environment has no torch.
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "_build_config.json"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


# ---------------------------------------------------------------------------------------------
# Sources and flags, shared by setup.py and the compile at import.

def source_root() -> Path:
    """``csrc/``: installed inside the package by a plain install, beside it in a checkout."""
    for root in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if (root / "sparks.cpp").is_file():
            return root
    raise ImportError(f"sparks_ext: no prebuilt extension and no C++ sources to compile "
                      f"(looked for csrc/ in {PACKAGE_DIR} and {PACKAGE_DIR.parent}); reinstall "
                      f"sparks_ext")


def sources(root: Path, with_cuda: bool) -> list[str]:
    cpp = sorted(glob.glob(str(root / "*.cpp"))) + sorted(glob.glob(str(root / "cpu" / "*.cpp")))
    cuda = sorted(glob.glob(str(root / "cuda" / "*.cu"))) if with_cuda else []
    return cpp + cuda


def cxx_standard(torch_include: str) -> str:
    """The C++ standard the installed torch's headers require: ATen.h stops with
    ``#error C++NN or later compatible compiler is required`` below it (C++17 up to torch 2.13,
    C++20 from 2.14)."""
    try:
        text = (Path(torch_include) / "ATen" / "ATen.h").read_text(errors="replace")
    except OSError:
        return "c++17"
    found = re.search(r"#\s*error\s+C\+\+(\d+) or later", text)
    return f"c++{max(17, int(found.group(1)))}" if found else "c++17"


def cxx_flags(std: str, with_cuda: bool) -> list[str]:
    # -fopenmp: at::parallel_for is inlined from ATen's headers as `#pragma omp parallel`, so
    # without it every kernel runs on one thread (the loader reuses torch's libgomp.so.1).
    return ["-O3", f"-std={std}", "-fvisibility=hidden", "-fopenmp"] + (
        ["-DSPARKS_WITH_CUDA=1"] if with_cuda else [])


def nvcc_flags(std: str) -> list[str]:
    return ["-O3", f"-std={std}", "--expt-relaxed-constexpr", "-DSPARKS_WITH_CUDA=1"]


LINK_FLAGS = ("-fopenmp",)  # a tuple: torch.utils.cpp_extension appends to the list it is given


def _is_cuda_root(root: Optional[str]) -> bool:
    if not root:
        return False
    libs = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
            os.path.join("targets", "sbsa-linux", "lib"))
    return (os.path.isfile(os.path.join(root, "bin", "nvcc"))
            and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))
            and any(glob.glob(os.path.join(root, d, "libcudart.so*")) for d in libs))


def _nvcc_reported_root(nvcc: str) -> Optional[str]:
    """nvcc reached through a wrapper script prints its real directory in a dry run (TOP=...)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(found.group(1).strip()) if found else None


def find_cuda_home() -> tuple[Optional[str], str]:
    """The CUDA toolkit root (bin/nvcc, include/cuda_runtime.h, libcudart), and a note when
    CUDA_HOME / CUDA_PATH were set to something else. torch guesses the root as the parent of
    the directory holding ``nvcc`` on the PATH, which is wrong when that ``nvcc`` is a link or
    wrapper outside the toolkit (the link step then fails with ``cannot find -lcudart``); here
    the link is resolved, and a wrapper is asked where it runs nvcc from."""
    note = ""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_cuda_root(value):
                return value, note
            note = f"{var}={value} is not a CUDA toolkit root (no bin/nvcc, include/cuda_runtime.h and libcudart); "
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates.append(lambda: _nvcc_reported_root(nvcc))
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        root = candidate() if callable(candidate) else candidate
        if _is_cuda_root(root):
            return root, (note + f"using {root}") if note else ""
    return None, note + ("nvcc not found" if not nvcc else f"no CUDA toolkit root found for {nvcc}")


def set_cuda_home() -> tuple[Optional[str], str]:
    """Finds the CUDA root and makes torch.utils.cpp_extension use it (it reads CUDA_HOME when
    first imported, so this runs before that import where possible)."""
    root, note = find_cuda_home()
    if root:
        os.environ["CUDA_HOME"] = root
        extension_module = sys.modules.get("torch.utils.cpp_extension")
        if extension_module is not None:
            extension_module.CUDA_HOME = root
    return root, note


def plan(torch) -> dict:
    """What to build against the given torch: C++ standard, CUDA or not (and why not), arch list."""
    std = cxx_standard(os.path.join(os.path.dirname(torch.__file__), "include"))
    cuda_home, note = set_cuda_home() if torch.version.cuda is not None else (None, "")
    if os.environ.get("SPARKS_FORCE_CPU", "0") == "1":
        reason, note = "SPARKS_FORCE_CPU=1", ""
    elif torch.version.cuda is None:
        reason = "torch has no CUDA"
    else:
        reason = "" if cuda_home else (note or "nvcc not found")
    with_cuda = cuda_home is not None and not reason
    return {"torch": torch.__version__, "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "cxx_standard": std, "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
            "with_cuda": with_cuda, "cuda_version": torch.version.cuda if with_cuda else None,
            "cuda_home": cuda_home if with_cuda else None, "cuda_arch_list": (os.environ.get("SPARKS_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
                                                       if with_cuda else None),
            "cuda_note": note, "cpu_only_reason": reason if not with_cuda else None}


def describe(config: dict) -> str:
    kernels = (f"CPU + CUDA kernels (CUDA {config['cuda_version']}, arch {config['cuda_arch_list']})"
               if config["with_cuda"] else f"CPU kernels only ({config['cpu_only_reason']})")
    return f"{kernels}, torch {config['torch']}, {config['cxx_standard']}"


def write_config(directory: str, config: dict) -> None:
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Loading at import.

_loaded: dict = {}


def _read_config(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None


def _cache_dir(config: dict, files: list[str], flags: list[str]) -> Path:
    digest = hashlib.sha256()
    for path in files + sorted(glob.glob(str(Path(files[0]).parent / "**" / "*.h"), recursive=True)):
        digest.update(path.encode())
        digest.update(Path(path).read_bytes())
    digest.update(" ".join(flags).encode())
    tag = (f"torch{config['torch']}-py{config['python']}-"
           f"{'cu' + str(config['cuda_version']) if config['with_cuda'] else 'cpu'}-"
           f"abi{int(config['cxx11_abi'])}-{digest.hexdigest()[:12]}")
    base = os.environ.get("SPARKS_EXT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sparks_ext")
    return Path(base) / tag


def _ensure_ninja_on_path() -> None:
    """cpp_extension runs ``ninja``; a venv's pip-installed ninja is not on the PATH when the
    venv's python runs without the venv activated."""
    if shutil.which("ninja"):
        return
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package
        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, "ninja")):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return


def _compile(torch, reason: str):
    config = plan(torch)
    root = source_root()
    files = sources(root, config["with_cuda"])
    cflags = cxx_flags(config["cxx_standard"], config["with_cuda"])
    cuda_flags = nvcc_flags(config["cxx_standard"]) if config["with_cuda"] else None
    build_dir = _cache_dir(config, files, cflags + (cuda_flags or []) + [str(config["cuda_arch_list"])])
    fresh = not any(build_dir.glob("_C*.so"))
    if fresh:
        print(f"sparks_ext: {reason}; compiling the C++ extension for it ({describe(config)}) into "
              f"{build_dir}. This happens once per torch version and takes a few minutes.",
              file=sys.stderr, flush=True)
    if config["cuda_note"]:
        print(f"sparks_ext: {config['cuda_note']}", file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    _ensure_ninja_on_path()
    if config["with_cuda"]:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", config["cuda_arch_list"])
    from torch.utils import cpp_extension

    start = time.perf_counter()
    module = cpp_extension.load(
        name="_C", sources=files, extra_cflags=cflags, extra_cuda_cflags=cuda_flags,
        extra_ldflags=list(LINK_FLAGS), extra_include_paths=[str(root)], build_directory=str(build_dir),
        with_cuda=config["with_cuda"], is_python_module=True, verbose=False)
    if fresh:
        print(f"sparks_ext: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    write_config(str(build_dir), config)
    return module, {**config, "extension": "compiled at import", "path": module.__file__}


def load_extension():
    """``sparks_ext._C``: the prebuilt extension when it was built against the running torch,
    else the one compiled (once, then cached) for it."""
    if "module" in _loaded:
        return _loaded["module"]
    import torch

    spec = importlib.util.find_spec("sparks_ext._C")
    if spec is not None:
        built = _read_config(PACKAGE_DIR)
        if built is None or built.get("torch") == torch.__version__:
            module = importlib.import_module("sparks_ext._C")
            info = dict(built or {"torch": None})
            info.update(extension="prebuilt", path=spec.origin)
            _loaded.update(module=module, info=info)
            return module
        reason = (f"the prebuilt extension in {PACKAGE_DIR} was built against torch "
                  f"{built.get('torch')}, this is torch {torch.__version__}")
    else:
        reason = f"no prebuilt extension for torch {torch.__version__}"
    module, info = _compile(torch, reason)
    sys.modules["sparks_ext._C"] = module
    _loaded.update(module=module, info=info)
    return module


def build_info() -> dict:
    """What the loaded extension is: ``extension`` ("prebuilt" or "compiled at import") and its
    ``path``; ``torch`` it was built against (None for a build that did not record it) and
    ``torch_running``; ``with_cuda`` (CUDA kernels built), ``cuda_version``, ``cuda_arch_list``
    and, without CUDA, ``cpu_only_reason``; ``cxx_standard``; ``cpu_kernels``: the CPU kernel
    families this machine runs (see :func:`sparks_ext.ops.cpu_kernels`)."""
    import torch

    load_extension()
    info = {key: value for key, value in _loaded["info"].items() if key not in ("cuda_note", "python")}
    info["torch_running"] = torch.__version__
    # What the dispatcher holds, also for a build that recorded no config.
    info["with_cuda"] = torch._C._dispatch_has_kernel_for_dispatch_key("sparks::conv2d", "CUDA")
    info["cpu_kernels"] = list(torch.ops.sparks.cpu_kernels.default())
    return info
