#!/usr/bin/env bash
# aarch64 without ARM hardware: cross-compile with Debian's aarch64 toolchain and run under
# qemu-user.
#  1. every C++ source compiles for aarch64 against torch's headers (compile only: torch cannot
#     be cross-built here, so the ATen parts are not linked or run);
#  2. the ATen-free NEON kernels and their core (csrc/cpu/kernel_core.h, neon_kernels.h) are
#     built with tests/cpp/test_neon_core.cpp and run under qemu-aarch64 against a direct
#     integer convolution over the op grid.
# Installs what it lacks with apt (root, or sudo). Prints each step's time.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { echo "+ [$((SECONDS - start)) s] $*"; }

need=()
command -v aarch64-linux-gnu-g++ > /dev/null || need+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
command -v qemu-aarch64 > /dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  step "apt-get install ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null
fi
sysroot=/usr/aarch64-linux-gnu
cxx=aarch64-linux-gnu-g++
flags=(-O3 -std=c++17 -Wall -Wextra -Werror -Icsrc)
out="$(mktemp -d)"

python=${PYTHON:-python}
if "$python" -c "import torch" 2> /dev/null; then
  step "compile every csrc source for aarch64 against torch's headers"
  torch_includes=$("$python" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))')
  py_include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  # shellcheck disable=SC2086
  ls csrc/*.cpp csrc/cpu/*.cpp | xargs -P "$(nproc)" -I{} \
    $cxx -std=c++17 -fopenmp -fsyntax-only -w $torch_includes -I"$py_include" -Icsrc {}
else
  echo "torch not importable by $python: skipping the aarch64 compile check of the ATen sources" >&2
fi

step "build tests/cpp/test_neon_core.cpp for aarch64"
$cxx "${flags[@]}" -pthread tests/cpp/test_neon_core.cpp csrc/cpu/kernel_core.cpp \
  csrc/cpu/lut_neon.cpp csrc/cpu/binary_neon.cpp -o "$out/test_neon_core"

step "run it under qemu-aarch64 (Cortex-A53)"
# Cortex-A53 (ARMv8.0): an instruction newer than ARMv8.0 + Advanced SIMD would fault here.
qemu-aarch64 -cpu cortex-a53 -L "$sysroot" "$out/test_neon_core"
step "done"
rm -rf "$out"
