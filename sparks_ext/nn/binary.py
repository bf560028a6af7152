"""Trainable 1-bit convolution (:class:`BinaryConv2d`) and its inference layer (:class:`XnorConv2d`).

Both binarize the input by sign (sign(0) = +1) and zero-pad the binarized input, exactly like the
library's ops. The trainable layer keeps latent real weights W; its kernels are sign(W) with the
clipped straight-through gradient, scaled per output channel by alpha = mean |W| (XNOR-Net).
Its forward runs the decode-to-dense path (``F.conv2d`` on the binarized input,
``backend="dense"``, the default) or the dense XNOR op (``backend="op"``,
:func:`sparks_ext.binary_conv2d` with its autograd); both give the same integer sums, then
the same scale and bias. Its inference layer :class:`XnorConv2d` runs the op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import IntOrPair, binary_conv2d
from ..quantizers import sign, sign_ste
from .base import InferenceBinaryConv, TrainableBinaryConv
from .codebook import CodebookConv2d, FusedTransform, most_frequent_codebook, nearest_codeword

__all__ = ["BinaryConv2d", "XnorConv2d"]


class _LatentBinaryConv(TrainableBinaryConv):
    """Shared by the trainable layers with latent weights: latent weight, optional bias, scale,
    the two forward paths, and the inference layer holding their kernels. Subclasses provide
    ``_binary_weight()``: the {-1,+1} kernels carrying gradients."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                 bias, backend):
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if backend not in ("dense", "op"):
            raise ValueError(f"backend must be 'dense' or 'op', got {backend!r}")
        self.backend = backend
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def scale(self) -> torch.Tensor:
        """alpha = mean |W| per output channel (differentiable)."""
        return self.weight.abs().mean(dim=(1, 2, 3))

    def _ste(self, binary: torch.Tensor) -> torch.Tensor:
        """``binary`` in the forward pass; the gradient reaches the latent weights where
        |W| <= 1 (clipped straight-through estimator)."""
        clipped = self.weight.clamp(-1, 1)
        return binary + (clipped - clipped.detach())

    def _conv(self, x: torch.Tensor, weight_pm1: torch.Tensor) -> torch.Tensor:
        alpha = self.scale().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight_pm1 = weight_pm1.to(x.dtype)
        if self.backend == "op":
            return binary_conv2d(x, weight_pm1, alpha, bias, *self._geometry())
        # Integer sums are exact in float; then scale and bias, as the ops' epilogue does.
        out = F.conv2d(sign_ste(x), weight_pm1, None, self.stride, self.padding, self.dilation, self.groups)
        out = out * alpha[None, :, None, None]
        return out if bias is None else out + bias[None, :, None, None]

    def _codebook_layer(self, codebook: torch.Tensor, indices: torch.Tensor,
                        cls: type = CodebookConv2d) -> CodebookConv2d:
        """The inference layer (``cls``, a CodebookConv2d) with this layer's geometry, scale and
        bias, the given codebook (n, kh, kw) and indices (C_out, C_in/groups)."""
        return cls._holding(self.geometry_config(), self._scale_bias(codebook=codebook, indices=indices),
                            n_codewords=codebook.shape[0])

    def _scale_bias(self, **tensors) -> dict:
        return dict(tensors, scale=self.scale(), bias=self.bias)


class BinaryConv2d(_LatentBinaryConv):
    r"""Trainable 1-bit convolution: ``conv(sign(x), sign(W)) * mean|W| + bias``.

    Args: as ``nn.Conv2d`` (``bias=False`` by default; BatchNorm usually follows), plus
    ``backend`` for the training forward: ``"dense"`` (F.conv2d on the binarized input) or
    ``"op"`` (:func:`sparks_ext.binary_conv2d` with its autograd).

    ``to_inference()`` gives the :class:`XnorConv2d` computing the same outputs as eval mode
    (same integer sums; scale and bias applied by the op);
    ``to_inference(n_codewords=n)`` gives the frequency baseline: a
    :class:`~sparks_ext.nn.CodebookConv2d` holding the n most frequent binary kernels, every
    kernel mapped to its nearest one (as ``CodebookConv2d.from_conv2d``).
    """

    bits_per_weight = 1.0

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair = 3,
                 stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                 groups: int = 1, bias: bool = False, backend: str = "dense"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, backend)

    def _binary_weight(self) -> torch.Tensor:
        return self._ste(sign(self.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self._binary_weight())

    @torch.no_grad()
    def to_inference(self, n_codewords: Optional[int] = None):
        if n_codewords is None:
            return XnorConv2d._holding(self.geometry_config(), self._scale_bias(weight=self.weight >= 0))
        codebook = most_frequent_codebook(self.weight, n_codewords)
        return self._codebook_layer(codebook, nearest_codeword(self.weight, codebook))


class XnorConv2d(FusedTransform, InferenceBinaryConv):
    r"""Inference 1-bit convolution running :func:`sparks_ext.binary_conv2d`.

    Buffers: ``weight`` bool (C_out, C_in/groups, kh, kw), True = +1, channels_last; ``scale`` and ``bias``
    float32 (C_out,), cast to the input's dtype in ``forward``. ``forward(x, residual=None)``
    and the optional fused buffers ``threshold``, ``prelu_weight``, ``post_bias``: see
    :class:`~sparks_ext.nn.codebook.FusedTransform` (set by :func:`sparks_ext.convert`).
    """

    bits_per_weight = 1.0
    FILE_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "bias")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair = 3,
                 stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        kh, kw = self.kernel_size
        # channels_last: the layout binary_conv2d packs without a per-call copy (copy_ and
        # load_state_dict keep it)
        weight = torch.ones(out_channels, in_channels // groups, kh, kw, dtype=torch.bool)
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self._init_epilogue(out_channels, bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._apply_transform(binary_conv2d, x, residual, self.weight)

    def kernels(self) -> torch.Tensor:
        return self.weight.to(torch.int8) * 2 - 1

