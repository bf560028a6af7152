"""The Bi-Real / ReActNet basic block shared by the models, parameterised by the conv type."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..nn import BinaryConv2d, SparksConv2d
from ..quantizers import RPReLU, RSign

__all__ = ["CONV_TYPES", "make_conv", "BasicBlock"]

CONV_TYPES = ("float", "binary", "sparks")


def make_conv(conv: str, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
              padding: int = 1, n_codewords: Optional[int] = None,
              conv_kwargs: Optional[dict] = None) -> nn.Module:
    """A bias-free 3x3 conv of the given type: ``nn.Conv2d`` ("float"), :class:`BinaryConv2d`
    ("binary") or :class:`SparksConv2d` with ``n_codewords`` ("sparks"); ``conv_kwargs`` go to
    SparksConv2d (e.g. ``hungarian_every``) or BinaryConv2d (``backend``)."""
    kwargs = dict(conv_kwargs or {})
    if conv == "float":
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
    if conv == "binary":
        return BinaryConv2d(in_channels, out_channels, kernel_size, stride, padding, **kwargs)
    if conv == "sparks":
        if n_codewords is None:
            raise ValueError("conv='sparks' needs n_codewords")
        return SparksConv2d(in_channels, out_channels, kernel_size, n_codewords, stride, padding, **kwargs)
    raise ValueError(f"conv must be one of {CONV_TYPES}, got {conv!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convs, each with its own shortcut (Bi-Real Net) and ReActNet's RSign before and
    RPReLU after it: ``y = RPReLU(BN(conv(RSign(x))) + shortcut(x))``. The shortcut is the
    identity, or (when the shape changes) real-valued AvgPool + 1x1 conv + BN. With
    ``conv="float"`` the RSigns are left out and the convs see real inputs."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, conv: str = "binary",
                 n_codewords: Optional[int] = None, conv_kwargs: Optional[dict] = None):
        super().__init__()
        binary = conv != "float"
        self.binarize1 = RSign(in_channels) if binary else nn.Identity()
        self.conv1 = make_conv(conv, in_channels, channels, 3, stride, 1, n_codewords, conv_kwargs)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = RPReLU(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride) if stride != 1 else nn.Identity(),
                nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.binarize2 = RSign(channels) if binary else nn.Identity()
        self.conv2 = make_conv(conv, channels, channels, 3, 1, 1, n_codewords, conv_kwargs)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = RPReLU(channels)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(self.binarize1(x))) + self.shortcut(x))
        return self.act2(self.bn2(self.conv2(self.binarize2(out))) + out)
