"""How the extension is built and loaded (sparks_ext/_build.py): the C++ standard read from
torch's headers, the CUDA root behind links and wrappers, the prebuilt-or-compile choice, and
build_info()."""
import json
import os
import stat

import pytest
import torch

import sparks_ext
from sparks_ext import _build


def _aten_header(tmp_path, text):
    (tmp_path / "ATen").mkdir()
    (tmp_path / "ATen" / "ATen.h").write_text(text)
    return str(tmp_path)


@pytest.mark.parametrize("line, std", [
    ("#error C++17 or later compatible compiler is required to use ATen.", "c++17"),
    ("#error C++20 or later compatible compiler is required to use ATen.", "c++20"),
    ("#  error C++23 or later compatible compiler is required to use ATen.", "c++23"),
    ("#error C++14 or later compatible compiler is required to use ATen.", "c++17"),  # never below 17
    ("#include <c10/core/Allocator.h>", "c++17"),  # no requirement stated
])
def test_cxx_standard_is_what_the_headers_require(tmp_path, line, std):
    assert _build.cxx_standard(_aten_header(tmp_path, f"#pragma once\n#if __cplusplus < 1\n{line}\n#endif\n")) == std


def test_cxx_standard_of_the_installed_torch():
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    text = open(os.path.join(include, "ATen", "ATen.h")).read()
    std = _build.cxx_standard(include)
    assert std in ("c++17", "c++20", "c++23") and std.removeprefix("c++") in text


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _toolkit(root):
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "lib64" / "libcudart.so").write_text("")
    # Like the real nvcc, a dry run prints where it runs from.
    _executable(root / "bin" / "nvcc", f"#!/bin/sh\necho '#$ _HERE_={root}/bin'\necho '#$ TOP={root}/bin/..'\n")
    return root


@pytest.fixture
def clean_cuda_env(monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)


def test_cuda_root_behind_a_wrapper_script(tmp_path, monkeypatch, clean_cuda_env):
    """nvcc on the PATH is a script outside the toolkit (torch would guess its parent's parent)."""
    root = _toolkit(tmp_path / "cuda-13.0")
    wrappers = tmp_path / "usr-local-bin"
    wrappers.mkdir()
    _executable(wrappers / "nvcc", f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert _build.find_cuda_home() == (str(root), "")


def test_cuda_root_behind_a_link_and_a_wrong_cuda_home(tmp_path, monkeypatch, clean_cuda_env):
    root = _toolkit(tmp_path / "cuda")
    links = tmp_path / "bin"
    links.mkdir()
    (links / "nvcc").symlink_to(root / "bin" / "nvcc")
    monkeypatch.setenv("PATH", f"{links}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # what torch guesses from the link: wrong
    found, note = _build.find_cuda_home()
    assert found == str(root)
    assert f"CUDA_HOME={tmp_path} is not a CUDA toolkit root" in note and f"using {root}" in note


def test_no_cuda_toolkit(tmp_path, monkeypatch, clean_cuda_env):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_build, "_is_cuda_root", lambda r: False)
    assert _build.find_cuda_home() == (None, "nvcc not found")


def test_a_prebuilt_extension_for_another_torch_is_not_loaded(tmp_path, monkeypatch):
    """Its config names another torch: the loader compiles for the running one instead."""
    (tmp_path / _build.CONFIG_NAME).write_text(json.dumps({"torch": "0.0.1"}))
    monkeypatch.setattr(_build, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(_build, "_loaded", {})
    monkeypatch.setattr(_build.importlib.util, "find_spec", lambda name: object())
    reasons = []
    monkeypatch.setattr(_build, "_compile", lambda torch_, reason: reasons.append(reason) or (None, {}))
    _build.load_extension()
    assert reasons == [f"the prebuilt extension in {tmp_path} was built against torch 0.0.1, "
                       f"this is torch {torch.__version__}"]


def test_the_compile_at_import_uses_the_setup_py_flags():
    flags = _build.cxx_flags("c++20", with_cuda=False)
    assert flags == ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    assert "-DSPARKS_WITH_CUDA=1" in _build.cxx_flags("c++17", with_cuda=True)
    assert "-std=c++20" in _build.nvcc_flags("c++20") and _build.LINK_FLAGS == ("-fopenmp",)
    root = _build.source_root()
    files = _build.sources(root, with_cuda=False)
    assert str(root / "sparks.cpp") in files and not any(f.endswith(".cu") for f in files)


def test_build_info_reports_the_loaded_extension():
    info = sparks_ext.build_info()
    assert info["extension"] in ("prebuilt", "compiled at import")
    assert os.path.isfile(info["path"])
    assert info["torch_running"] == torch.__version__
    assert info["torch"] in (None, torch.__version__)  # None: a build that recorded no config
    assert info["with_cuda"] == torch._C._dispatch_has_kernel_for_dispatch_key("sparks::conv2d", "CUDA")
    assert info["cpu_kernels"] == sparks_ext.ops.cpu_kernels() and info["cpu_kernels"][0] == "portable"
