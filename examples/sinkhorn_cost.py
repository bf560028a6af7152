"""How much the learned selection costs next to the convolution it serves (one training step).

For ResNet-18's 3x3 layer shapes, times forward + backward of: the selection alone (Gumbel
noise + Sinkhorn on the (n + 1) x 512 problem the layer uses, and on the square 512 x 512
permutation of the paper for comparison), the Hungarian step (scipy, run every k steps), and
whole layers: BinaryConv2d vs SparksConv2d. Medians over repeats, in milliseconds.

    python examples/sinkhorn_cost.py [--batch 16] [--threads 1] [--n 32]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from sparks_ext.nn import BinaryConv2d, SparksConv2d
from sparks_ext.selection import gumbel_noise, hungarian, sinkhorn

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (channels, spatial size), stride 1


def median_ms(fn, repeats):
    return interleaved_ms([fn], repeats)[0]


def interleaved_ms(fns, repeats):
    """Medians of the functions timed in turn, so that a busy machine slows all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def selection_step(rows, iters):
    logits = torch.zeros(rows, 512).normal_(0, 0.01).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(rows, 512)

    def run():
        soft = sinkhorn((logits + gumbel_noise(logits.shape, gen)) / 0.5, iters)
        (soft * weights).sum().backward()
    return run


def layer_step(layer, x):
    def run():
        layer(x).sum().backward()
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--hungarian-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    partial = median_ms(selection_step(args.n, args.iters), 3 * args.repeats)
    square = median_ms(selection_step(512, args.iters), args.repeats)
    soft = sinkhorn(torch.randn(args.n, 512), args.iters)
    hung = median_ms(lambda: hungarian(soft), 3 * args.repeats)
    soft_sq = sinkhorn(torch.randn(512, 512), args.iters)
    hung_sq = median_ms(lambda: hungarian(soft_sq), args.repeats)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"batch {args.batch}, n = {args.n}, {args.iters} Sinkhorn iterations, Hungarian every "
          f"{args.hungarian_every} steps; medians in ms (forward + backward).\n")
    print(f"selection alone: (n+1) x 512 Sinkhorn {partial:.2f} ms, Hungarian {hung:.2f} ms; "
          f"square 512 x 512 Sinkhorn {square:.2f} ms, Hungarian {hung_sq:.2f} ms\n")
    print("| layer (C_in = C_out, HxW) | BinaryConv2d | SparksConv2d | Sparks overhead | "
          "selection / conv (ours) | selection / conv (512 x 512) |")
    print("|---|---|---|---|---|---|")
    for channels, size in SHAPES:
        x = torch.randn(args.batch, channels, size, size, requires_grad=True)
        binary = BinaryConv2d(channels, channels, 3, padding=1)
        sparks = SparksConv2d(channels, channels, 3, n_codewords=args.n, padding=1,
                              sinkhorn_iters=args.iters, hungarian_every=args.hungarian_every)
        t_bin, t_sp = interleaved_ms([layer_step(binary, x), layer_step(sparks, x)], args.repeats)
        amortised = partial + hung / args.hungarian_every
        amortised_sq = square + hung_sq / args.hungarian_every
        print(f"| {channels}, {size}x{size} | {t_bin:.1f} | {t_sp:.1f} | {100 * (t_sp / t_bin - 1):+.0f}% | "
              f"{100 * amortised / t_bin:.1f}% | {100 * amortised_sq / t_bin:.1f}% |")


if __name__ == "__main__":
    main()
