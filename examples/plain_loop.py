"""Sparks layers trained the way a new user would: a plain Adam loop, no schedule.

    python examples/plain_loop.py --seeds 0 1 2 [--epochs 20] [--old]

The network: a real 3x3 stem conv + BatchNorm, two 3x3 binary convs (SparksConv2d with n
codewords, or BinaryConv2d) each followed by BatchNorm and hardtanh, global average pooling and
a linear classifier, on scikit-learn's 8x8 digits (the split of sparks_ext.datasets). One Adam
optimizer over every parameter at lr 1e-3, batch 64, no learning-rate or temperature schedule.
"frequency n" keeps the n most frequent kernels of the trained 1-bit network per layer.
``--old`` reproduces the selection's behaviour before logit_scale and the automatic temperature
(logit_scale=1, a temperature that stays at 1). "swaps" counts the codewords replaced in the hard
selection during the last epoch (both layers together).
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from sparks_ext.datasets import load_digits_split
from sparks_ext.nn import BinaryConv2d, SparksConv2d


class Net(nn.Module):
    def __init__(self, make_conv):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.c1, self.b1 = make_conv(32, 32, 1), nn.BatchNorm2d(32)
        self.c2, self.b2 = make_conv(32, 64, 2), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.hardtanh(self.b1(self.c1(self.stem(x))))
        x = F.hardtanh(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


@torch.no_grad()
def accuracy(model, x, y):
    return 100 * (model.eval()(x).argmax(1) == y).float().mean().item()


def run(n, seed, epochs, old):
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split()
    if n is None:
        model = Net(lambda i, o, s: BinaryConv2d(i, o, 3, stride=s, padding=1))
    else:
        extra = dict(logit_scale=1.0, auto_tau_steps=10 ** 9) if old else {}
        model = Net(lambda i, o, s: SparksConv2d(i, o, 3, n_codewords=n, stride=s, padding=1, **extra))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    layers = [m for m in model.modules() if isinstance(m, SparksConv2d)]
    g = torch.Generator().manual_seed(seed)
    swaps = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(y_train), 64):
            batch = order[i:i + 64]
            before = [set(m.selected.tolist()) for m in layers]
            opt.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            opt.step()
            if epoch == epochs - 1:
                swaps += sum(len(b - set(m.selected.tolist())) for b, m in zip(before, layers))
    rows = {("1-bit" if n is None else f"Sparks n={n}"): (accuracy(model, x_test, y_test), swaps if layers else None)}
    if n is None:
        for k in (16, 32):
            freq = copy.deepcopy(model)
            freq.c1, freq.c2 = freq.c1.to_inference(n_codewords=k), freq.c2.to_inference(n_codewords=k)
            rows[f"frequency n={k}"] = (accuracy(freq, x_test, y_test), None)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--old", action="store_true", help="the selection's previous behaviour")
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {}
    for seed in args.seeds:
        for n in (None, 16, 32):
            for name, value in run(n, seed, args.epochs, args.old).items():
                results.setdefault(name, []).append(value)
                print(f"seed {seed} {name}: {value[0]:.2f}%" + ("" if value[1] is None else f", {value[1]} swaps"),
                      flush=True)
    print("\n| network | accuracy % | swaps in the last epoch |\n|---|---|---|")
    for name, values in results.items():
        accs = [a for a, _ in values]
        swaps = [s for _, s in values if s is not None]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {name} | {statistics.mean(accs):.2f} ± {spread:.2f} | "
              + (f"{statistics.mean(swaps):.0f}" if swaps else "-") + " |")


if __name__ == "__main__":
    main()
