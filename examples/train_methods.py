"""Trains signed-binary, Bop and expert (EBConv) networks on scikit-learn's 8x8 digits.

    python examples/train_methods.py --seeds 0 1 2 [--epochs 30] [--out examples/RESULTS_methods.md]

Every network is the SmallCNN of examples/train_digits.py (real stem and classifier, four binary
3x3 block convs) with its block convs swapped for the method's layer; same data split
(random_state=0), same Adam + one-cycle schedule. Rows:
- 1-bit (latent, Adam): BinaryConv2d trained with latent weights, the baseline;
- 1-bit (Bop): the same network, its binary weights stored as +-1 and flipped by Bop, the real
  parameters trained by Adam inside the same optimizer; with the paper's defaults
  (--bop-gamma/--bop-tau) and with a faster gamma and larger tau suited to a short run;
- signed-binary (STE / EDE, per channel or per kernel, optionally with a learned sub-codebook
  of n masks): SignedBinaryConv2d;
- EBConv: ExpertBinaryConv2d with 4 experts, 1-bit or sharing a Sparks codebook.
Test accuracy is measured after converting every method layer with ``to_inference()`` (so
through sparks_ext.conv2d) and checked equal to the eval-mode accuracy. "codewords at inference"
is the codebook size of the deployed method layers (mean over the four block convs): the
distinct ternary kernels of a signed layer, the shared codebook of an expert layer.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from sparks_ext.datasets import load_digits_split
from sparks_ext.models import SmallCNN
from sparks_ext.nn import (BinaryConv2d, ExpertBinaryConv2d, ExpertCodebookConv2d, SignedBinaryConv2d,
                           SignedCodebookConv2d)
from sparks_ext.nn.signed import set_ede_progress
from sparks_ext.optim import Bop
from sparks_ext.selection import TemperatureSchedule, set_temperature

from common import accuracy, minibatches

# name -> (layer factory kwargs, optimizer); "layer" picks the block conv class.
RUNS = {
    "1-bit (latent, Adam)": dict(layer="binary"),
    "1-bit (Bop)": dict(layer="binary", bop=True),
    "1-bit (Bop, gamma=1e-2, tau=1e-4)": dict(layer="binary", bop=True, gamma=1e-2, tau=1e-4),
    "signed-binary, channel, STE": dict(layer="signed"),
    "signed-binary, channel, EDE": dict(layer="signed", gradient="ede"),
    "signed-binary, kernel, STE": dict(layer="signed", region="kernel"),
    "signed-binary + Sparks n=32": dict(layer="signed", n_codewords=32),
    "EBConv 4 experts, 1-bit": dict(layer="expert"),
    "EBConv 4 experts, Sparks n=32": dict(layer="expert", n_codewords=32),
}


def build(spec: dict, width: int) -> torch.nn.Module:
    """SmallCNN whose four binary block convs are replaced by the method's layer."""
    model = SmallCNN(conv="binary", width=width)
    kwargs = {k: v for k, v in spec.items() if k not in ("layer", "bop", "gamma", "tau")}
    for block in model.layers:
        for name in ("conv1", "conv2"):
            old = getattr(block, name)
            geom = (old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
            if spec["layer"] == "signed":
                new = SignedBinaryConv2d(*geom, **kwargs)
            elif spec["layer"] == "expert":
                new = ExpertBinaryConv2d(*geom, **kwargs)
            else:
                new = BinaryConv2d(*geom, **kwargs)
            setattr(block, name, new)
    return model


def binary_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, BinaryConv2d)]


def train(model, spec, data, seed, args):
    x_train, y_train, _, _ = data
    logits = [p for name, p in model.named_parameters() if name.endswith("logits")]
    binary = binary_weights(model) if spec.get("bop") else []
    taken = {id(p) for p in logits + binary}
    others = [p for p in model.parameters() if id(p) not in taken]
    groups = [{"params": others}] + ([{"params": logits, "lr": args.logit_lr}] if logits else [])
    adam = torch.optim.Adam(groups, lr=args.lr)
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=[g["lr"] for g in groups], total_steps=total)
    opt = adam
    if binary:
        with torch.no_grad():
            for w in binary:
                w.copy_(torch.where(w >= 0, 1.0, -1.0))
        opt = Bop(binary, adam, gamma=spec.get("gamma", args.bop_gamma), tau=spec.get("tau", args.bop_tau))
    tau = TemperatureSchedule(args.tau_start, args.tau_end, total)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    model.train()
    for xb, yb in minibatches(x_train, y_train, args.batch, args.epochs, generator):
        set_temperature(model, tau(step))
        set_ede_progress(model, step / max(total - 1, 1))
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        sched.step()
        step += 1
    if binary:
        assert all(bool(((w == 1) | (w == -1)).all()) for w in binary), "Bop left a non-binary weight"
    return model.eval()


def deploy(model):
    """Every signed / expert layer replaced by its inference layer (running sparks_ext.conv2d)."""
    for block in model.layers:
        for name in ("conv1", "conv2"):
            conv = getattr(block, name)
            if isinstance(conv, (SignedBinaryConv2d, ExpertBinaryConv2d)):
                setattr(block, name, conv.to_inference())
    return model.eval()


def method_layers(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", default=list(RUNS), help="subset of row names")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--logit-lr", type=float, default=1e-3,
                   help="Adam lr of the selection logits; the layers use 50 x logits (logit_scale), "
                        "so this moves the effective logits as 5e-2 did before that scale existed")
    p.add_argument("--tau-start", type=float, default=1.0)
    p.add_argument("--tau-end", type=float, default=0.05)
    p.add_argument("--bop-gamma", type=float, default=1e-4)
    p.add_argument("--bop-tau", type=float, default=1e-8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="append the tables (markdown) to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits_split()

    results, densities, usage, codewords = {}, {}, {}, {}
    start = time.time()
    for seed in args.seeds:
        for name in args.runs:
            spec = RUNS[name]
            torch.manual_seed(seed)
            t0 = time.time()
            model = train(build(spec, args.width), spec, data, seed, args)
            eval_acc = accuracy(model, data)
            signed = method_layers(model, SignedBinaryConv2d)
            if signed:
                densities.setdefault(name, []).append(
                    sum(m.density * m.weight.numel() for m in signed) / sum(m.weight.numel() for m in signed))
            deployed = deploy(model)
            for m in method_layers(deployed, ExpertCodebookConv2d):  # the inference layers
                m.reset_usage()
            acc = accuracy(deployed, data)
            if acc != eval_acc:  # to_inference() is exact, so this would be a bug
                print(f"WARNING {name}: deployed accuracy {acc} != eval accuracy {eval_acc}", flush=True)
            books = [m.n_codewords for m in method_layers(deployed, (SignedCodebookConv2d, ExpertCodebookConv2d))]
            if books:
                codewords.setdefault(name, []).append(statistics.mean(books))
            experts = method_layers(deployed, ExpertCodebookConv2d)
            if experts:
                usage.setdefault(name, []).append([m.usage.tolist() for m in experts])
            results.setdefault(name, []).append(acc)
            print(f"seed {seed} {name}: {acc:.2f}% ({time.time() - t0:.0f} s)"
                  + (f" density {densities[name][-1]:.3f}" if signed else "")
                  + (f" usage {usage[name][-1]}" if experts else ""), flush=True)
    elapsed = time.time() - start

    lines = [f"Test accuracy on sklearn digits (450 test images), SmallCNN width {args.width}, "
             f"{args.epochs} epochs, seeds {args.seeds}; mean ± std (min-max), measured after "
             f"to_inference() (sparks_ext.conv2d); row \"1-bit (Bop)\" uses gamma={args.bop_gamma:g}, tau={args.bop_tau:g}. "
             f"Wall time {elapsed:.0f} s.", "",
             "| network | accuracy % | min-max | density (non-zero weights) | codewords at inference |",
             "|---|---|---|---|---|"]
    for name in args.runs:
        accs = results[name]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        density = f"{100 * statistics.mean(densities[name]):.1f}%" if name in densities else "100%"
        books = f"{statistics.mean(codewords[name]):.0f}" if name in codewords else "-"
        lines.append(f"| {name} | {statistics.mean(accs):.2f} ± {spread:.2f} | "
                     f"{min(accs):.2f}-{max(accs):.2f} | {density} | {books} |")
    for name, per_seed in usage.items():
        lines += ["", f"Expert usage on the 450 test images, {name} (samples per expert, "
                  "per block conv, seed by seed):", "",
                  "| seed | conv 1 | conv 2 | conv 3 | conv 4 |", "|---|---|---|---|---|"]
        for seed, layers in zip(args.seeds, per_seed):
            lines.append(f"| {seed} | " + " | ".join(str(u) for u in layers) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
