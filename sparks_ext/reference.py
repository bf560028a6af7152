"""Pure-PyTorch references: the exact semantics every kernel is tested against (docs/design.md, section 1).

They decode the codebook into a dense weight and call a float convolution, computed in float64
so that integer sums are exact, then cast once to the input's dtype. They are the oracle, not the
implementation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .ops import IntOrPair, _pair

__all__ = ["conv2d_reference", "binary_conv2d_reference", "decode_weight"]


def decode_weight(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The dense (C_out, C_in/groups, kh, kw) weight ``codebook[indices]``."""
    return codebook[indices.long()]


def binary_conv2d_reference(
    input: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    pad_value: float = 0.0,
) -> torch.Tensor:
    if weight.dtype == torch.bool:
        weight = weight.to(torch.float64) * 2 - 1
    ph, pw = _pair(padding, "padding")
    xb = torch.where(input >= 0, 1.0, -1.0).to(torch.float64)
    xb = F.pad(xb, (pw, pw, ph, ph), value=float(pad_value))
    out = F.conv2d(xb, weight.to(torch.float64), None, _pair(stride, "stride"), 0,
                   _pair(dilation, "dilation"), groups)
    if scale is not None:
        out = out * scale.to(torch.float64)[None, :, None, None]
    if bias is not None:
        out = out + bias.to(torch.float64)[None, :, None, None]
    return out.to(input.dtype)


def conv2d_reference(
    input: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    pad_value: float = 0.0,
) -> torch.Tensor:
    return binary_conv2d_reference(input, decode_weight(codebook, indices), scale, bias, stride,
                                   padding, dilation, groups, pad_value)
