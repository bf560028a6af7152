"""Pure-PyTorch references: the exact semantics every kernel is tested against (the formula in
:func:`sparks_ext.ops.conv2d`'s docstring).

They decode the codebook into a dense weight and call a float convolution, computed in float64
so that integer sums are exact, then apply the output transform step by step in opmath (float32
for float16 / bfloat16 / float32 inputs, float64 for float64), exactly as the kernels do, and
cast once to the input's dtype. They are the oracle, not the implementation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .ops import IntOrPair, _pair

__all__ = ["conv2d_reference", "binary_conv2d_reference", "decode_weight", "binarize_reference",
           "output_transform_reference"]


def decode_weight(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The dense (C_out, C_in/groups, kh, kw) weight ``codebook[indices]``."""
    return codebook[indices.long()]


def binarize_reference(input: torch.Tensor, threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``where(input >= threshold[c], 1, -1)`` (threshold None: 0), compared in the input's dtype,
    as float64."""
    t = 0 if threshold is None else threshold[None, :, None, None]
    return torch.where(input >= t, 1.0, -1.0).to(torch.float64)


def output_transform_reference(
    acc: torch.Tensor,
    dtype: torch.dtype,
    scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    prelu_weight: Optional[torch.Tensor] = None,
    post_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The ops' output transform of the exact integer sums ``acc``, in ``dtype``'s opmath, each
    step rounded as written, then rounded once to ``dtype``."""
    opmath = torch.float64 if dtype == torch.float64 else torch.float32

    def per_channel(t):
        return t.to(opmath)[None, :, None, None]

    y = acc.to(opmath)
    if scale is not None:
        y = y * per_channel(scale)
    if bias is not None:
        y = y + per_channel(bias)
    if residual is not None:
        y = y + residual.to(opmath)
    if prelu_weight is not None:
        y = torch.where(y >= 0, y, per_channel(prelu_weight) * y)
    if post_bias is not None:
        y = y + per_channel(post_bias)
    return y.to(dtype)


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
    *,
    threshold: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    prelu_weight: Optional[torch.Tensor] = None,
    post_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if weight.dtype == torch.bool:
        weight = weight.to(torch.float64) * 2 - 1
    ph, pw = _pair(padding, "padding")
    xb = F.pad(binarize_reference(input, threshold), (pw, pw, ph, ph), value=float(pad_value))
    acc = F.conv2d(xb, weight.to(torch.float64), None, _pair(stride, "stride"), 0,
                   _pair(dilation, "dilation"), groups)
    return output_transform_reference(acc, input.dtype, scale, bias, residual, prelu_weight,
                                      post_bias)


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
    **fused: Optional[torch.Tensor],
) -> torch.Tensor:
    """Keyword arguments ``threshold``, ``residual``, ``prelu_weight``, ``post_bias`` as in
    :func:`binary_conv2d_reference`."""
    return binary_conv2d_reference(input, decode_weight(codebook, indices), scale, bias, stride,
                                   padding, dilation, groups, pad_value, **fused)
