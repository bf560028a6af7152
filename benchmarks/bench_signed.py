"""Signed-binary (ternary codebook) vs binary codebook vs dense XNOR convolution on ResNet-18's
3x3 layer shapes.

    python benchmarks/bench_signed.py [--threads 2] [--batch 1] [--n 32 64 512] [--density 0.4]

All timings in one process, same threads, median of ``--repeats`` calls after warm-up.
- ``xnor``: :func:`sparks_ext.binary_conv2d` with a dense {-1,+1} weight (skipped if this build
  has no CPU kernel for it);
- ``binary n``: :func:`sparks_ext.conv2d` with n random {-1,+1} codewords;
- ``signed n``: :func:`sparks_ext.conv2d` with n signed-binary codewords (each {0,+1} or {0,-1},
  a fraction ``--density`` of taps non-zero), the codebook a SignedBinaryConv2d deploys to.
Indices are uniform random in both codebook cases. Prints a markdown table; the ratio column is
signed / binary time at the same n (below 1 means the zeros are paid back), from medians and,
in brackets, from minima (less sensitive to other jobs on a shared machine).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import sparks_ext

# (C_in, C_out, H, stride): ResNet-18's 3x3 binary convs (each repeated in the network).
SHAPES = [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2),
          (256, 256, 14, 1), (256, 512, 14, 2), (512, 512, 7, 1)]


def median_ms(fns, repeats: int, warmup: int = 2):
    """Median and minimum time (ms) of each function; calls are interleaved so that every
    function sees the same machine load (the build machine is shared)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [(1e3 * statistics.median(t), 1e3 * min(t)) for t in times]


def binary_codebook(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(n, 3, 3, generator=g) < 0.5, 1, -1).to(torch.int8)


def signed_codebook(n: int, density: float, g: torch.Generator) -> torch.Tensor:
    signs = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, 1, -1)
    return (signs * (torch.rand(n, 3, 3, generator=g) < density)).to(torch.int8)


def kernel_family() -> str:
    import os
    return os.environ.get("SPARKS_CPU_KERNEL", "auto")


def has_binary_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("sparks::binary_conv2d", "CPU")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--n", type=int, nargs="+", default=[32, 64, 512])
    p.add_argument("--density", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    xnor = has_binary_kernel()

    print(f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{args.threads} threads, kernel family {kernel_family()}, median of {args.repeats}; signed codewords {args.density:.0%} non-zero; "
          f"times in ms\n")
    head = "| C_in→C_out @ H, stride | batch |" + (" xnor |" if xnor else "")
    head += "".join(f" binary n={n} | signed n={n} | signed/binary (min) |" for n in args.n)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for batch in args.batch:
        for cin, cout, h, stride in SHAPES:
            x = torch.randn(batch, cin, h, h, generator=g)
            scale = torch.rand(cout, generator=g)
            row = f"| {cin}→{cout} @ {h}, s{stride} | {batch} |"
            if xnor:
                weight = torch.where(torch.rand(cout, cin, 3, 3, generator=g) < 0.5, 1.0, -1.0)
                (t, _), = median_ms([lambda: sparks_ext.binary_conv2d(x, weight, scale, None, stride, 1)],
                                    args.repeats)
                row += f" {t:.2f} |"
            for n in args.n:
                idx = torch.randint(0, n, (cout, cin), generator=g, dtype=torch.int32)
                books = (binary_codebook(n, g), signed_codebook(n, args.density, g))
                (tb, mb), (ts, ms) = median_ms(
                    [lambda b=b: sparks_ext.conv2d(x, b, idx, scale, None, stride, 1) for b in books],
                    args.repeats)
                row += f" {tb:.2f} | {ts:.2f} | {ts / tb:.2f} ({ms / mb:.2f}) |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
