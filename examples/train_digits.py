"""Trains float, 1-bit, Sparks and frequency-selected networks on scikit-learn's 8x8 digits.

    python examples/train_digits.py --seeds 0 1 2 [--epochs 15] [--jobs 2] [--out table.md]

Every network is a SmallCNN (real stem and classifier, four 3x3 block convs that are float,
1-bit or Sparks). "Sparks n" learns its n codewords per layer (Gumbel-Sinkhorn + PSTE) while it
trains; "frequency n" takes the trained 1-bit network and keeps, per layer, its n most frequent
kernels (BinaryConv2d.to_inference(n_codewords=n)), without retraining. The train/test split is
fixed (random_state=0); --seed changes initialisation, batch order and Gumbel noise. Each
(seed, network) run is independent and seeds itself, so --jobs runs them in parallel processes
(one torch thread each) with the same results as one process.
"""
from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sparks_ext.datasets import load_digits_split
from sparks_ext.models import SmallCNN
from sparks_ext.nn import CodebookConv2d, SparksConv2d
from sparks_ext.packing import kernels_to_ids
from sparks_ext.selection import TemperatureSchedule, set_temperature

from common import accuracy, minibatches

SIZES = (64, 32, 16, 8)


def train(conv, n, data, seed, args):
    torch.manual_seed(seed)
    x_train, y_train, _, _ = data
    model = SmallCNN(conv=conv, n_codewords=n, width=args.width,
                     conv_kwargs={"hungarian_every": args.hungarian_every} if conv == "sparks" else None)
    logits = [p for name, p in model.named_parameters() if name.endswith("logits")]
    others = [p for name, p in model.named_parameters() if not name.endswith("logits")]
    opt = torch.optim.Adam([{"params": others}, {"params": logits, "lr": args.logit_lr}], lr=args.lr)
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[args.lr, args.logit_lr], total_steps=total)
    tau = TemperatureSchedule(args.tau_start, args.tau_end, total)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    model.train()
    for xb, yb in minibatches(x_train, y_train, args.batch, args.epochs, generator):
        set_temperature(model, tau(step))
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        sched.step()
        step += 1
    return model.eval()


def frequency_model(binary_model, n):
    """The trained 1-bit model with each BinaryConv2d replaced by its n most frequent kernels."""
    model = copy.deepcopy(binary_model)
    for block in model.layers:
        block.conv1 = block.conv1.to_inference(n_codewords=n)
        block.conv2 = block.conv2.to_inference(n_codewords=n)
    return model.eval()


def distinct_fraction(model):
    """Fraction of codebook layers whose codewords are pairwise distinct."""
    layers = [m for m in model.modules() if isinstance(m, (SparksConv2d, CodebookConv2d))]
    books = [m.codebook() if isinstance(m, SparksConv2d) else m.codebook for m in layers]
    return sum(kernels_to_ids(b).unique().numel() == b.shape[0] for b in books) / len(books)


def run(job):
    """One (network, seed) training run -> [(row name, seed, accuracy, distinct fraction)]: the
    trained network, and for the 1-bit one its frequency-selected variants."""
    conv, n, seed, args = job
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    model = train(conv, n, data, seed, args)
    name = {"float": "float", "binary": "1-bit"}.get(conv, f"Sparks n={n}")
    rows = [(name, seed, accuracy(model, data), distinct_fraction(model) if n else None)]
    if conv == "binary":
        for m in args.sizes:
            freq = frequency_model(model, m)
            rows.append((f"frequency n={m}", seed, accuracy(freq, data), distinct_fraction(freq)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seed", type=int, help="a single seed (overrides --seeds)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--logit-lr", type=float, default=1e-3,
                   help="Adam lr of the selection logits; the layers use 50 x logits (logit_scale), "
                        "so this moves the effective logits as 5e-2 did before that scale existed")
    p.add_argument("--tau-start", type=float, default=1.0)
    p.add_argument("--tau-end", type=float, default=0.05)
    p.add_argument("--hungarian-every", type=int, default=10)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny net)")
    p.add_argument("--jobs", type=int, default=2, help="training runs in parallel processes")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    args = p.parse_args()
    seeds = [args.seed] if args.seed is not None else args.seeds
    runs = [("float", None), ("binary", None)] + [("sparks", n) for n in args.sizes]
    jobs = [(conv, n, seed, args) for seed in seeds for conv, n in runs]
    results = {}  # row name -> list of (seed, accuracy, distinct fraction)
    start = time.time()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        for rows in tqdm(pool.map(run, jobs), total=len(jobs), desc="training", unit="run"):
            for name, seed, acc, frac in rows:
                results.setdefault(name, []).append((acc, frac))
    elapsed = time.time() - start

    order = ["float", "1-bit"] + [f"{kind} n={n}" for n in args.sizes for kind in ("Sparks", "frequency")]
    lines = [f"Test accuracy on sklearn digits (450 test images), SmallCNN width {args.width}, "
             f"{args.epochs} epochs, seeds {seeds}; mean ± std (min-max). Wall time {elapsed:.0f} s "
             f"({args.jobs} process(es), {args.threads} thread(s) each).", "",
             "| network | bits/weight | accuracy % | min-max | distinct codewords (layers) |",
             "|---|---|---|---|---|"]
    for name in order:
        accs = [a for a, _ in results[name]]
        fracs = [f for _, f in results[name] if f is not None]
        n = int(name.split("=")[1]) if "=" in name else None
        bits = 32.0 if name == "float" else (1.0 if n is None else math.log2(n) / 9)
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        distinct = f"{100 * statistics.mean(fracs):.0f}%" if fracs else "-"
        lines.append(f"| {name} | {bits:.2f} | {statistics.mean(accs):.2f} ± {spread:.2f} | "
                     f"{min(accs):.2f}-{max(accs):.2f} | {distinct} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
