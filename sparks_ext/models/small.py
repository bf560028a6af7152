"""A small binary CNN for 8x8 (scikit-learn digits) and 28x28 (MNIST-like) images."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .common import BasicBlock

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Real 3x3 stem conv, two :class:`BasicBlock` stages (4 binary 3x3 convs), global average
    pooling and a real classifier. Spatial sizes: 8x8 -> 8x8 -> 4x4; 28x28 -> 14x14 -> 7x7.

    Args:
        image_size: 8 or 28; width: channels of the first stage (the second has 2 * width).
        conv: ``"float"``, ``"binary"`` or ``"sparks"``; n_codewords: codebook size for "sparks".
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 conv: str = "binary", n_codewords: Optional[int] = None, image_size: int = 8,
                 conv_kwargs: Optional[dict] = None):
        super().__init__()
        if image_size not in (8, 28):
            raise ValueError(f"image_size must be 8 or 28, got {image_size}")
        first_stride = 1 if image_size == 8 else 2
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.layers = nn.Sequential(
            BasicBlock(width, width, first_stride, conv, n_codewords, conv_kwargs),
            BasicBlock(width, 2 * width, 2, conv, n_codewords, conv_kwargs))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))
