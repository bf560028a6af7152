"""The CUDA kernels' own code, run on the CPU under tests/cuda_emu (no GPU, no nvcc needed).

.ci/emulate_cuda.sh compiles csrc/cuda/*_kernels.cuh with the host compiler against a small
emulator (cooperative fibers for threads, barriers and warp collectives, the m16n8k256 b1 MMA
from its PTX fragment layout) and checks every kernel path against a naive integer convolution.
"""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
def test_cuda_kernels_under_the_emulator():
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "emulate_cuda.sh"), "25"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and "OK: 25 cases, 0 failures" in proc.stdout, (
        proc.stdout[-3000:], proc.stderr[-3000:])
