"""The contract of the library's binary convolutions, written once.

Every binary conv layer of :mod:`sparks_ext.nn` is a :class:`BinaryConvLayer`, as larq's
quantized layers share one base. What summary, convert, analysis and the file format need to
know about a layer they ask it here, instead of probing its attributes:

- geometry: ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
  ``dilation`` (pairs) and ``groups``, checked once by ``_init_geometry``;
- ``n_codewords`` (None for a plain 1-bit layer), ``bits_per_weight`` (the stored bits of one
  binary weight), ``n_experts`` (1 except for expert layers, which store that many kernels per
  weight position) and ``pad_value`` (what padding adds to the binarized input: 0);
- ``trainable``: True for the layers that train (:class:`TrainableBinaryConv`), False for the
  inference layers that run the ops (:class:`InferenceBinaryConv`);
- ``to_inference()``: the inference layer computing this layer's eval-mode output (a new layer
  for a trainable one; an inference layer is its own);
- inference layers only: ``kernels()``, the {-1, 0, +1} kernels applied, and ``file_config()``
  / ``from_file_config(config)``, the constructor arguments the compact file format records
  and rebuilds the layer from; those that hold a ``codebook`` and ``indices``
  (:class:`InferenceCodebookConv`) derive ``n_codewords`` and ``bits_per_weight`` from them.

:func:`is_binary_layer`, :func:`is_trainable_layer` and :func:`inference_form` are the
questions the rest of the library asks; :func:`check_n_codewords` is the one check of a codebook
size.
"""
from __future__ import annotations

import math
import operator
from typing import ClassVar, Optional

import torch
from torch import nn

from ..ops import _pair

__all__ = ["BinaryConvLayer", "TrainableBinaryConv", "InferenceBinaryConv", "InferenceCodebookConv",
           "is_binary_layer", "is_trainable_layer", "inference_form", "check_n_codewords",
           "codebook_bits_per_weight", "MAX_LEARNED_TAPS"]

# A layer that learns its codebook keeps logits over all 2^(kh*kw) binary kernels.
MAX_LEARNED_TAPS = 12


def check_n_codewords(n_codewords, kernel_size: Optional[tuple] = None, learned: bool = False) -> int:
    """``n_codewords`` as an int >= 1 (any number for an inference codebook, which may be
    ternary); with ``kernel_size`` (kh, kw), a codebook chosen among the 2^(kh*kw) binary kernels
    of that size, so at most that many; with ``learned``, chosen by a learned selection, which
    also needs kh*kw <= 12. Raises ValueError naming the argument."""
    taps = None if kernel_size is None else kernel_size[0] * kernel_size[1]
    if learned and taps > MAX_LEARNED_TAPS:
        raise ValueError(f"kernel_size {tuple(kernel_size)}: learning a selection among the 2^{taps} binary "
                         f"kernels needs at most {MAX_LEARNED_TAPS} taps")
    try:
        n = None if isinstance(n_codewords, bool) else operator.index(n_codewords)
    except TypeError:
        n = None
    if taps is None:
        if n is None or n < 1:
            raise ValueError(f"n_codewords must be an int >= 1, got {n_codewords!r}")
    elif n is None or not 1 <= n <= 2 ** taps:
        raise ValueError(f"n_codewords must be in [1, {2 ** taps}] for {kernel_size[0]}x{kernel_size[1]} "
                         f"kernels, got {n_codewords!r}")
    return n


class BinaryConvLayer(nn.Module):
    """Base of every binary convolution of the library (module docstring)."""

    trainable: ClassVar[bool] = False
    n_codewords: Optional[int] = None
    n_experts: int = 1
    pad_value: float = 0.0  # the binarized input's padding (only a CodebookConv2d takes another)

    def _init_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups):
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups ({groups}) must divide in_channels ({in_channels}) and out_channels ({out_channels})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(_pair(kernel_size, "kernel_size"))
        self.stride, self.padding = tuple(_pair(stride, "stride")), tuple(_pair(padding, "padding"))
        self.dilation, self.groups = tuple(_pair(dilation, "dilation")), groups
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError("kernel_size, stride and dilation must be positive and padding non-negative")

    def _geometry(self) -> tuple:
        return self.stride, self.padding, self.dilation, self.groups

    def geometry_config(self) -> dict:
        """The geometry as constructor keyword arguments (every layer's constructor takes them)."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, groups=self.groups)

    @property
    def bits_per_weight(self) -> float:
        raise NotImplementedError

    def to_inference(self) -> "InferenceBinaryConv":
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.n_codewords is not None:
            s += f", n_codewords={self.n_codewords}"
        s += f" ({self.bits_per_weight:.2f} bits/weight)"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.pad_value != 0.0:
            s += f", pad_value={self.pad_value:g}"
        if getattr(self, "bias", None) is None:
            s += ", bias=False"
        return s


class TrainableBinaryConv(BinaryConvLayer):
    """A layer that trains; ``to_inference()`` builds its inference layer (what
    :func:`sparks_ext.convert` puts in its place). Files never hold one: :func:`sparks_ext.save`
    converts first."""

    trainable = True


class InferenceBinaryConv(BinaryConvLayer):
    """A layer that runs the library's ops. ``FILE_ARGS`` names its constructor arguments, in
    the constructor's order, that :meth:`file_config` records (tensors aside: a ``bias``
    argument is recorded as whether the layer has one)."""

    FILE_ARGS: ClassVar[tuple] = ()

    def to_inference(self) -> "InferenceBinaryConv":
        return self

    def kernels(self) -> torch.Tensor:
        """The {-1, 0, +1} kernels this layer applies, int8, (C_out, C_in/groups, kh, kw), for an
        expert layer (n_experts, C_out, C_in/groups, kh, kw)."""
        raise NotImplementedError

    def file_config(self) -> dict:
        """The constructor arguments that rebuild this layer (its tensors loaded afterwards), as
        JSON values: what the compact file format records."""
        config = {}
        for name in self.FILE_ARGS:
            value = getattr(self, name)
            if name == "bias":
                value = value is not None
            config[name] = list(value) if isinstance(value, tuple) else value
        return config

    @classmethod
    def from_file_config(cls, config: dict) -> "InferenceBinaryConv":
        """The layer :meth:`file_config` describes, with freshly initialised tensors."""
        unknown = sorted(set(config) - set(cls.FILE_ARGS))
        if unknown:
            raise ValueError(f"{cls.__name__} takes no argument {', '.join(map(repr, unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})

    @classmethod
    @torch.no_grad()
    def _holding(cls, geometry: dict, tensors: dict, **config) -> "InferenceBinaryConv":
        """A layer of ``geometry`` (constructor keyword arguments) and ``config`` holding
        ``tensors`` (name, dotted for a submodule's, -> value, converted to the buffer's dtype;
        ``"bias": None`` for a layer without bias), on the device of ``tensors["scale"]``."""
        layer = cls(**geometry, bias=tensors.get("bias") is not None, **config)
        for name, value in tensors.items():
            if value is not None:
                owner, _, attr = name.rpartition(".")
                getattr(layer.get_submodule(owner), attr).copy_(value.detach())
        return layer.to(tensors["scale"].device)


class InferenceCodebookConv(InferenceBinaryConv):
    """An inference layer whose kernels are ``codebook[indices]``: buffers ``codebook``
    (n, kh, kw) and ``indices``."""

    @property
    def n_codewords(self) -> int:
        return self.codebook.shape[0]

    @property
    def bits_per_weight(self) -> float:
        return codebook_bits_per_weight(self.n_codewords, self.kernel_size)

    def kernels(self) -> torch.Tensor:
        return self.codebook[self.indices.long()]


def codebook_bits_per_weight(n_codewords: int, kernel_size: tuple) -> float:
    """Index storage per weight of a codebook of n kh x kw kernels: log2(n) / (kh * kw) (0.56
    for n = 32, 3x3)."""
    return math.log2(n_codewords) / (kernel_size[0] * kernel_size[1])


def is_binary_layer(module: nn.Module) -> bool:
    """True for the library's binary convolutions, trainable or inference."""
    return isinstance(module, BinaryConvLayer)


def is_trainable_layer(module: nn.Module) -> bool:
    """True for the library's trainable layers, and for any other module with a
    ``to_inference()`` method (a layer of one's own that follows the contract's conversion)."""
    if isinstance(module, BinaryConvLayer):
        return module.trainable
    return callable(getattr(module, "to_inference", None))


@torch.no_grad()
def inference_form(module: BinaryConvLayer) -> InferenceBinaryConv:
    """What a binary layer deploys as: exactly what :func:`sparks_ext.convert` puts in place of
    a trainable layer, the layer itself for an inference one."""
    return module.to_inference()
