"""The op test grid, shared by every test that runs a conv kernel (all CPU paths, CUDA), and
small helpers shared by the layer tests (SteSign, train_steps).

A ``Case`` is one convolution geometry + options; ``Case.make`` builds its tensors
deterministically. ``GRID`` covers: kernel sizes 1x1, 3x3, 5x5, 1x7 and 8x8 (64 taps), stride,
padding (int and pair), dilation, groups (incl. depthwise), pad_value 0/+1/-1, batch 0, codebook
sizes 1..512, binary and ternary codebooks, every float dtype, and contiguous / channels_last /
non-contiguous inputs.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch


class SteSign(torch.autograd.Function):
    """The training-time oracle for the ops' autograd: sign with sign(0) = +1 forward, gradient
    passed where |x| <= 1 (larq's ste_sign). Written out here, independent of the library."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def train_steps(layer, x, steps=3, lr=0.05):
    """A few Adam steps on mean(layer(x)^2), so that a training layer's parameters (and its
    selection state) move off their initial values. Returns the optimizer."""
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    return opt


@dataclass(frozen=True)
class Case:
    batch: int = 2
    in_channels: int = 8
    out_channels: int = 16
    size: tuple = (9, 9)
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (1, 1)
    dilation: tuple = (1, 1)
    groups: int = 1
    n: int = 16
    pad_value: float = 0.0
    ternary: bool = False
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # | "channels_last" | "strided"

    @property
    def id(self) -> str:
        fields = [f"b{self.batch}", f"c{self.in_channels}-{self.out_channels}", f"s{self.size[0]}x{self.size[1]}",
                  f"k{self.kernel[0]}x{self.kernel[1]}", f"st{self.stride[0]}{self.stride[1]}",
                  f"p{self.padding[0]}{self.padding[1]}", f"d{self.dilation[0]}{self.dilation[1]}",
                  f"g{self.groups}", f"n{self.n}", f"pv{self.pad_value:+g}",
                  "tern" if self.ternary else "bin", str(self.dtype).replace("torch.", ""), self.layout]
        return "-".join(fields)

    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups, pad_value=self.pad_value)

    def make_input(self, device="cpu", seed=0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        shape = (self.batch, self.in_channels, *self.size)
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        # Exact zeros exercise sign(0) = +1.
        x[torch.rand(shape, generator=g) < 0.05] = 0.0
        x = x.to(self.dtype).to(device)
        if self.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif self.layout == "strided":
            wide = torch.zeros((self.batch, self.in_channels, self.size[0], 2 * self.size[1]),
                               dtype=self.dtype, device=device)
            wide[..., ::2] = x
            x = wide[..., ::2]
            assert not x.is_contiguous()
        return x

    def make_codebook(self, device="cpu", seed=0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 1)
        kh, kw = self.kernel
        low = -1 if self.ternary else 0
        cb = torch.randint(low, 2, (self.n, kh, kw), generator=g)
        if not self.ternary:
            cb = cb * 2 - 1
        return cb.to(torch.int8).to(device)

    def make_indices(self, device="cpu", seed=0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 2)
        shape = (self.out_channels, self.in_channels // self.groups)
        return torch.randint(0, self.n, shape, generator=g).to(device)

    def make_dense_weight(self, device="cpu", seed=0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 3)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel)
        return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(self.dtype).to(device)

    def make_scale_bias(self, device="cpu", seed=0):
        g = torch.Generator().manual_seed(seed + 4)
        scale = torch.rand(self.out_channels, generator=g, dtype=torch.float64) + 0.5
        bias = torch.randn(self.out_channels, generator=g, dtype=torch.float64)
        return scale.to(self.dtype).to(device), bias.to(self.dtype).to(device)


def _geometries():
    base = Case()
    yield base
    yield dataclasses.replace(base, kernel=(1, 1), padding=(0, 0))
    yield dataclasses.replace(base, kernel=(5, 5), padding=(2, 2), size=(11, 10))
    yield dataclasses.replace(base, kernel=(1, 7), padding=(0, 3), size=(6, 13))
    yield dataclasses.replace(base, kernel=(8, 8), padding=(3, 4), size=(12, 12), n=8)
    yield dataclasses.replace(base, stride=(2, 2), size=(10, 11))
    yield dataclasses.replace(base, stride=(2, 1), padding=(2, 1), size=(9, 8))
    yield dataclasses.replace(base, dilation=(2, 2), padding=(2, 2), size=(12, 12))
    yield dataclasses.replace(base, dilation=(1, 3), padding=(0, 3), size=(7, 14))
    yield dataclasses.replace(base, padding=(0, 0))
    yield dataclasses.replace(base, groups=2)
    yield dataclasses.replace(base, groups=8, out_channels=8)  # depthwise
    yield dataclasses.replace(base, groups=8, out_channels=16)  # depthwise, multiplier 2
    yield dataclasses.replace(base, batch=0)
    yield dataclasses.replace(base, batch=1, size=(1, 1), kernel=(1, 1), padding=(0, 0))
    yield dataclasses.replace(base, n=1)
    yield dataclasses.replace(base, n=32, in_channels=64, out_channels=64, size=(8, 8))
    yield dataclasses.replace(base, n=64, in_channels=24, out_channels=72, size=(7, 7))
    yield dataclasses.replace(base, n=100)
    yield dataclasses.replace(base, n=512, in_channels=16, out_channels=8, size=(6, 6))
    yield dataclasses.replace(base, in_channels=3, out_channels=5, size=(5, 7))


GEOMETRIES = list(_geometries())

# Every geometry with each padding value, binary and ternary, float32 contiguous.
GRID = [dataclasses.replace(g, pad_value=pv, ternary=t)
        for g, pv, t in itertools.product(GEOMETRIES, (0.0, 1.0, -1.0), (False, True))]
# dtypes x memory layouts on a few geometries.
GRID += [dataclasses.replace(g, dtype=dt, layout=lay, pad_value=pv)
         for g, dt, lay, pv in itertools.product(
             (GEOMETRIES[0], GEOMETRIES[5], GEOMETRIES[11]),
             (torch.float16, torch.bfloat16, torch.float32, torch.float64),
             ("contiguous", "channels_last", "strided"),
             (0.0, -1.0))]
