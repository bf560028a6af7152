"""Bi-Real / ReActNet-style ResNet-18 whose 16 3x3 block convs are float, 1-bit or Sparks.

The stem, the 1x1 downsampling shortcuts and the classifier stay real-valued, as in Bi-Real Net,
ReActNet and the Sparks paper.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .common import BasicBlock

__all__ = ["BinaryResNet", "resnet18"]


class BinaryResNet(nn.Module):
    """ResNet with :class:`BasicBlock` stages.

    Args:
        blocks: blocks per stage (ResNet-18: (2, 2, 2, 2)); widths: channels per stage.
        stem: ``"imagenet"`` (7x7 stride-2 conv + max-pool, for 224x224 inputs) or ``"cifar"``
            (3x3 stride-1 conv, for 32x32 inputs).
        conv: ``"float"``, ``"binary"`` or ``"sparks"``; n_codewords: codebook size for "sparks".
        conv_kwargs: extra arguments of the binary conv layers.
    """

    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 1000,
                 conv: str = "binary", n_codewords: Optional[int] = None, stem: str = "imagenet",
                 in_channels: int = 3, conv_kwargs: Optional[dict] = None):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        layers, channels = [], widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(channels, width, stride, conv, n_codewords, conv_kwargs))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet18(num_classes: int = 1000, conv: str = "binary", n_codewords: Optional[int] = None,
             stem: str = "imagenet", in_channels: int = 3, conv_kwargs: Optional[dict] = None) -> BinaryResNet:
    """Bi-Real/ReActNet ResNet-18: 16 binary 3x3 convs (use ``stem="cifar"`` for 32x32 inputs)."""
    return BinaryResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, conv, n_codewords, stem,
                        in_channels, conv_kwargs)
