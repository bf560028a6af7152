#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc (compile only, objects to a temporary directory) against
# the installed torch's headers, so that the CUDA kernels cannot rot on machines without a GPU
# or without CUDA torch. Architectures: SPARKS_CUDA_ARCH_LIST (default "8.0;9.0").
# Exits non-zero on any compile error; exits 0 with a message when nvcc is absent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc";
  elif command -v nvcc >/dev/null 2>&1; then NVCC="$(command -v nvcc)";
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc;
  fi
fi
if [[ -z "$NVCC" ]]; then
  echo "compile_cuda: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
CUDA_ROOT="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
PYTHON="${PYTHON:-python}"

mapfile -t TORCH_INCLUDES < <("$PYTHON" -c \
  'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
CXX11_ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
# The C++ standard the installed torch's headers require, as setup.py picks it.
CXX_STD="$("$PYTHON" -c 'import importlib.util as u, os, sys, torch
s = u.spec_from_file_location("build", sys.argv[1]); b = u.module_from_spec(s); s.loader.exec_module(b)
print(b.cxx_standard(os.path.join(os.path.dirname(torch.__file__), "include")))' "$ROOT/sparks_ext/_build.py")"

GENCODE=()
IFS=';' read -r -a ARCHS <<< "${SPARKS_CUDA_ARCH_LIST:-8.0;9.0}"
for arch in "${ARCHS[@]}"; do
  arch="${arch// /}"
  [[ -z "$arch" ]] && continue
  sm="${arch//./}"
  GENCODE+=("-gencode" "arch=compute_${sm},code=sm_${sm}")
done

FLAGS=(-c "-std=$CXX_STD" -O3 --expt-relaxed-constexpr
       # the flags torch.utils.cpp_extension adds to every CUDA extension
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
       "-D_GLIBCXX_USE_CXX11_ABI=${CXX11_ABI}" -DSPARKS_WITH_CUDA=1
       -Xcompiler -fPIC -Werror=all-warnings -I"$CUDA_ROOT/include")
for inc in "${TORCH_INCLUDES[@]}"; do FLAGS+=(-isystem "$inc"); done
# A CPU-only torch wheel ships the c10/cuda headers but not the one CMake generates for them.
TORCH_INC="${TORCH_INCLUDES[0]}"
if [[ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  FLAGS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "compile_cuda: no csrc/cuda/*.cu sources"
  exit 0
fi
echo "compile_cuda: $("$NVCC" --version | tail -1), archs ${SPARKS_CUDA_ARCH_LIST:-8.0;9.0}"
for src in "${SOURCES[@]}"; do
  echo "compile_cuda: ${src#$ROOT/}"
  "$NVCC" "${FLAGS[@]}" "${GENCODE[@]}" "$src" -o "$OUT/$(basename "$src").o"
done
echo "compile_cuda: OK (${#SOURCES[@]} files)"
