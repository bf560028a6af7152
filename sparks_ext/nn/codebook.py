"""CodebookConv2d: the drop-in inference layer that runs :func:`sparks_ext.conv2d`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import IntOrPair, conv2d
from ..packing import kernels_to_ids, ids_to_kernels
from .base import InferenceCodebookConv, check_n_codewords

__all__ = ["CodebookConv2d", "most_frequent_codebook", "nearest_codeword"]

FUSED_BUFFERS = ("threshold", "prelu_weight", "post_bias")
_TRANSFORM_TENSORS = ("scale", "bias") + FUSED_BUFFERS


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    # The dtype test is far cheaper than a no-op .to() call per buffer and per call.
    return t if t is None or t.dtype == dtype else t.to(dtype)


class FusedTransform:
    """The optional input threshold and output transform of the library's inference convs,
    which :func:`sparks_ext.convert` fills when it fuses a model (``fuse=True``)::

        out = op(x >= threshold ? +1 : -1) * scale + bias      # the conv (threshold None -> 0)
        out = out + residual                                    # forward(x, residual)
        out = where(out >= 0, out, prelu_weight * out)          # per-channel PReLU
        out = out + post_bias

    ``threshold`` (C_in,), ``prelu_weight`` and ``post_bias`` (C_out,) are buffers that are
    ``None`` (absent from the state dict) until set; the op applies all of it in its epilogue,
    rounding once. A residual the op cannot take (another shape: a broadcasting add) is added
    after the op, exactly as written, with the rest of the transform in torch.
    """

    def _init_epilogue(self, out_channels: int, bias: bool) -> None:
        """The buffers ``scale`` (ones) and ``bias`` (zeros, or None) of shape (C_out,), then
        the fused ones, unset."""
        self.register_buffer("scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        for name in FUSED_BUFFERS:
            self.register_buffer(name, None)

    def _output_size(self, x: torch.Tensor) -> tuple:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (x.shape[0], self.out_channels, (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    def _apply_transform(self, op, x: torch.Tensor, residual: Optional[torch.Tensor], *args) -> torch.Tensor:
        dtype, table = x.dtype, self._buffers
        # From the buffer table: nn.Module.__getattr__ per name costs ~0.5 us (a user's
        # parameter of the same name is found by getattr).
        scale, bias, threshold, prelu_weight, post_bias = [
            _as(table[n] if n in table else getattr(self, n), dtype) for n in _TRANSFORM_TENSORS]
        if residual is None or (residual.dim() == 4 and residual.shape == self._output_size(x)):
            if threshold is None and residual is None and prelu_weight is None and post_bias is None:
                return op(x, *args, scale, bias, *self._geometry_args())  # the plain op's schema
            return op(x, *args, scale, bias, *self._geometry_args(), threshold=threshold,
                      residual=residual, prelu_weight=prelu_weight, post_bias=post_bias)
        out = op(x, *args, scale, bias, *self._geometry_args(), threshold=threshold)
        out = out + residual
        if prelu_weight is not None:
            out = torch.where(out >= 0, out, prelu_weight[:, None, None] * out)
        return out if post_bias is None else out + post_bias[:, None, None]

    def _geometry_args(self) -> tuple:
        return self.stride, self.padding, self.dilation, self.groups, self.pad_value

    def extra_repr(self) -> str:
        parts = [name for name in FUSED_BUFFERS if getattr(self, name) is not None]
        return super().extra_repr() + (f", fused={'+'.join(parts)}" if parts else "")


def most_frequent_codebook(weight: torch.Tensor, n_codewords: int) -> torch.Tensor:
    """The ``n_codewords`` most frequent binary kernels of ``weight`` (C_out, C_in/g, kh, kw)
    after sign binarization, as a {-1,+1} (n, kh, kw) float tensor, most frequent first; ties
    (and kernels never used, if fewer are distinct) are taken in codeword-id order."""
    kh, kw = weight.shape[-2:]
    total = 2 ** (kh * kw)
    n_codewords = check_n_codewords(n_codewords, (kh, kw))
    counts = torch.bincount(kernels_to_ids(weight.detach()).reshape(-1).cpu(), minlength=total)
    order = torch.sort(-counts, stable=True).indices[:n_codewords]
    return ids_to_kernels(order, kh, kw).to(weight.device)


def nearest_codeword(weight: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """For each kernel of ``weight`` (C_out, C_in/g, kh, kw), the index of the codeword with the
    largest inner product (first on ties), as int64 (C_out, C_in/g)."""
    scores = torch.einsum("oikl,nkl->oin", weight.detach().float(), codebook.float())
    return scores.argmax(dim=-1)


class CodebookConv2d(FusedTransform, InferenceCodebookConv):
    r"""Inference convolution whose kernels are indices into a small binary codebook.

    ``forward(x) = sparks_ext.conv2d(x, codebook, indices, scale, bias, ...)``: the input is
    binarized by sign, each kernel (co, ci) is ``codebook[indices[co, ci]]``, and each output
    channel is multiplied by ``scale[co]`` and offset by ``bias[co]``.

    Buffers: ``codebook`` int8 (n, kh, kw) in {-1, 0, +1}; ``indices`` (C_out, C_in/groups),
    uint8 for n <= 256 (else int32), stored transposed (the kernel's layout; ``copy_`` into it
    keeps that); ``scale`` and ``bias`` float32 (C_out,) (cast to the input's dtype in
    ``forward``). Build one from a trained ``nn.Conv2d`` with :meth:`from_conv2d`.

    ``forward(x, residual=None)``: the optional fused input threshold and output transform
    (``threshold``, ``residual``, ``prelu_weight``, ``post_bias``) are described in
    :class:`FusedTransform`; :func:`sparks_ext.convert` sets them.
    """

    FILE_ARGS = ("in_channels", "out_channels", "kernel_size", "n_codewords", "stride", "padding",
                 "dilation", "groups", "bias", "pad_value")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair = 3,
                 n_codewords: int = 32, stride: IntOrPair = 1, padding: IntOrPair = 0,
                 dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 pad_value: float = 0.0):
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        n_codewords = check_n_codewords(n_codewords)
        kh, kw = self.kernel_size
        self.pad_value = float(pad_value)
        self.register_buffer("codebook", torch.ones(n_codewords, kh, kw, dtype=torch.int8))
        # Indices live in the CPU kernel's native table: uint8 (int32 past 256 codewords) stored
        # (C_in/groups, C_out) row-major and exposed transposed as (C_out, C_in/groups), so a call
        # reads them without a per-call conversion (its cost: benchmarks/RESULTS.md).
        index_dtype = torch.uint8 if n_codewords <= 256 else torch.int32
        self.register_buffer("indices", torch.zeros(in_channels // groups, out_channels, dtype=index_dtype).t())
        self._init_epilogue(out_channels, bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._apply_transform(conv2d, x, residual, self.codebook, self.indices)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, n_codewords: int, pad_value: float = 0.0) -> "CodebookConv2d":
        """Turns a trained ``nn.Conv2d`` into a codebook layer.

        Weights are binarized by sign, ``scale = mean |W|`` per output channel, the codebook is
        the ``n_codewords`` most frequent binary kernels, and every kernel maps to its nearest
        codeword (largest inner product with its real-valued weights). The conv's bias is kept.
        """
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if isinstance(conv.padding, str):
            if conv.padding != "valid":
                raise ValueError(f"conv.padding={conv.padding!r} is not supported; use explicit integers")
            padding = (0, 0)
        else:
            padding = conv.padding
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode={conv.padding_mode!r} is not supported; only 'zeros'")
        weight = conv.weight.detach()
        codebook = most_frequent_codebook(weight, n_codewords)
        geometry = dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                        kernel_size=conv.kernel_size, stride=conv.stride, padding=padding,
                        dilation=conv.dilation, groups=conv.groups)
        tensors = dict(codebook=codebook, indices=nearest_codeword(weight, codebook),
                       scale=weight.abs().mean(dim=(1, 2, 3)), bias=conv.bias)
        return cls._holding(geometry, tensors, n_codewords=n_codewords, pad_value=pad_value)
