"""Binarizers with straight-through gradients, and the learnable activations of ReActNet.

Every binarizer here maps x to ``where(x >= 0, 1, -1)`` (sign(0) = +1, the convention of the
library's ops), so a layer that binarizes its input again (the ops do) sees exactly the same
values. They differ only in the gradient they pass back:

- :func:`sign_ste`: the straight-through estimator clipped to |x| <= 1 (BinaryNet, larq's
  ``ste_sign``); it is also the input gradient of :func:`sparks_ext.conv2d`.
- :func:`approx_sign`: Bi-Real Net's piecewise-polynomial gradient ``2 - 2|x|`` on |x| < 1.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["sign", "sign_ste", "approx_sign", "SignSTE", "ApproxSign", "BinaryActivation",
           "RSign", "RPReLU", "LearnableBias"]


def sign(x: torch.Tensor) -> torch.Tensor:
    """``where(x >= 0, 1, -1)`` in x's dtype, without gradient."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _SignForward(torch.autograd.Function):
    """sign forward, keeping x for the subclass's backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return sign(x)


class SignSTE(_SignForward):
    """sign forward; backward passes the gradient where |x| <= 1 and blocks it elsewhere."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class ApproxSign(_SignForward):
    """sign forward; Bi-Real Net's backward d/dx = 2 - 2|x| for |x| < 1, else 0."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (2 - 2 * x.abs()).clamp_min(0)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    return SignSTE.apply(x)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    return ApproxSign.apply(x)


class BinaryActivation(nn.Module):
    """Module form of the binarizers: ``gradient="ste"`` (clipped STE) or ``"approx"`` (Bi-Real)."""

    def __init__(self, gradient: str = "approx"):
        super().__init__()
        if gradient not in ("ste", "approx"):
            raise ValueError(f"gradient must be 'ste' or 'approx', got {gradient!r}")
        self.gradient = gradient

    def forward(self, x):
        return approx_sign(x) if self.gradient == "approx" else sign_ste(x)

    def extra_repr(self):
        return f"gradient={self.gradient!r}"


class LearnableBias(nn.Module):
    """Adds a learnable per-channel offset (zero-initialised) to an (N, C, H, W) tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x + self.bias.to(x.dtype)[None, :, None, None]


class RSign(nn.Module):
    """ReActNet's RSign: ``sign(x - beta)`` with a learnable per-channel threshold beta and the
    Bi-Real ApproxSign gradient (or the clipped STE with ``gradient="ste"``)."""

    def __init__(self, channels: int, gradient: str = "approx"):
        super().__init__()
        self.threshold = nn.Parameter(torch.zeros(channels))
        self.binarize = BinaryActivation(gradient)

    def forward(self, x):
        return self.binarize(x - self.threshold.to(x.dtype)[None, :, None, None])


class RPReLU(nn.Module):
    """ReActNet's RPReLU: ``PReLU(x - gamma) + zeta`` with per-channel gamma, slope and zeta."""

    def __init__(self, channels: int, init_slope: float = 0.25):
        super().__init__()
        self.shift_in = LearnableBias(channels)
        self.prelu = nn.PReLU(channels, init=init_slope)
        self.shift_out = LearnableBias(channels)

    def forward(self, x):
        return self.shift_out(self.prelu(x - self.shift_in.bias.to(x.dtype)[None, :, None, None]))
