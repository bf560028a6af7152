#!/usr/bin/env bash
# Runs the library's real CUDA kernels on the CPU under a small emulator (tests/cuda_emu) and checks
# every kernel path against a naive integer convolution. Needs no GPU and no nvcc: a host C++
# compiler and the installed torch's headers. Usage: .ci/emulate_cuda.sh [cases]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CXX="${CXX:-g++}"
mapfile -t INCLUDES < <("$PYTHON" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
LIBDIR="$("$PYTHON" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
FLAGS=(-std=c++17 -O2 -ffp-contract=off -Wall -Wno-unused-function -Wno-unused-variable -Wno-unknown-pragmas)
for inc in "${INCLUDES[@]}"; do FLAGS+=(-isystem "$inc"); done
echo "emulate_cuda: building tests/cuda_emu/emu_test.cpp"
"$CXX" "${FLAGS[@]}" "$ROOT/tests/cuda_emu/emu_test.cpp" -o "$OUT/emu_test" -L"$LIBDIR" -lc10 -Wl,-rpath,"$LIBDIR"
"$OUT/emu_test" "${1:-40}"
