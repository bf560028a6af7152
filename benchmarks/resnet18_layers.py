"""ResNet-18's 3x3 convolutions, the layer shapes every benchmark here times."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    in_channels: int
    out_channels: int
    size: int
    stride: int

    @property
    def name(self) -> str:
        s = "" if self.stride == 1 else "/2"
        return f"{self.in_channels}->{self.out_channels}@{self.size}{s}"

    @property
    def out_size(self) -> int:
        return (self.size + 2 - 3) // self.stride + 1

    def macs(self) -> int:  # per image
        return self.out_channels * self.in_channels * 9 * self.out_size ** 2


# ResNet-18's 3x3 convolutions: the four stage shapes and the three stride-2 entries.
LAYERS = [Layer(64, 64, 56, 1), Layer(128, 128, 28, 1), Layer(256, 256, 14, 1), Layer(512, 512, 7, 1),
          Layer(64, 128, 56, 2), Layer(128, 256, 28, 2), Layer(256, 512, 14, 2)]
