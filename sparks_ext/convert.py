"""convert: replace every trained layer of this library by its inference layer, then fuse."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .nn.base import is_trainable_layer

__all__ = ["convert", "is_trainable_layer", "DEPLOY_DTYPES"]

DEPLOY_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def convert(model: nn.Module, inplace: bool = False, fuse: bool = True,
            dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Returns ``model`` ready for inference: every trainable layer replaced by
    ``layer.to_inference()`` (SparksConv2d -> CodebookConv2d, BinaryConv2d -> XnorConv2d, ...),
    then, with ``fuse=True`` (the default), fused so that each binary conv is one op call.

    Conversion: the converted model computes what the trained model computes in eval mode, with
    packed binary weights and the library's XNOR-popcount kernels. Each inference layer keeps the
    train/eval mode of the layer it replaces. With ``inplace=False`` (the default) the model is
    deep-copied first and left untouched; with ``inplace=True`` its layers are replaced in place
    (the unfused conversion) and the fused model is returned beside it.

    Fusion (``fuse=True``; :mod:`sparks_ext.fuse` has the details) traces the model with
    torch.fx and rewrites it by structure, whatever classes the pieces come from:

    - an eval-mode ``nn.BatchNorm2d`` directly after a binary conv is folded into the conv's
      scale and bias, one directly after an ``nn.Conv2d`` into that conv's weight and bias;
    - what follows a binary conv up to the next binarization, i.e. per-channel constant adds
      and multiplies (``LearnableBias``), one residual add, one ``nn.PReLU`` and the constant
      adds after it (ReActNet's RPReLU), becomes the conv's output transform (``bias``,
      ``forward(x, residual)``, ``prelu_weight``, ``post_bias``), applied by the op;
    - a sign with a per-channel shift in front of a binary conv (ReActNet's RSign,
      ``LearnableBias`` + a binarizer) becomes the conv's input ``threshold``; a plain sign-like
      binarizer in front of one (``BinaryActivation``, ``torch.sign``, ...) is dropped, since
      the op binarizes its input with the same ``x >= 0``;
    - ``nn.Identity`` and eval-mode ``nn.Dropout`` are dropped.

    Anything else is left as it is. The result is a ``torch.fx.GraphModule`` (the layers keep
    their names) unless nothing was fused; it gives the unfused model's outputs up to float
    rounding (folded BatchNorm and shifts sum in another order) and runs under
    ``torch.compile(fullgraph=True)``, ``torch.export``, :func:`sparks_ext.save` and
    :func:`sparks_ext.summary`.

    ``dtype`` (``torch.bfloat16``, ``torch.float16``, ``torch.float32``, ``torch.float64`` or
    None to keep the model's): deploy in that dtype: every floating parameter and buffer is cast
    (the real stem, shortcuts and classifier too), 4-D weights are made channels_last, and the
    model casts each floating input to ``dtype`` and channels_last first, so binary convs read
    and write ``dtype`` channels_last. Outputs come in ``dtype``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, flag in (("inplace", inplace), ("fuse", fuse)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if dtype is not None and dtype not in DEPLOY_DTYPES:
        raise ValueError(f"dtype must be None or one of {', '.join(map(str, DEPLOY_DTYPES))}, "
                         f"got {dtype!r}")
    if not inplace:
        model = copy.deepcopy(model)
    model = _convert(model)
    if fuse or dtype is not None:
        from . import fuse as fusion
        if fuse:
            model = fusion.fuse(model)
        if dtype is not None:
            model = fusion.deploy(model, dtype)
    return model


def _convert(module: nn.Module) -> nn.Module:
    if is_trainable_layer(module):
        return _inference_form(module)
    for name, child in list(module.named_children()):
        converted = _convert(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _inference_form(layer: nn.Module) -> nn.Module:
    inference = layer.to_inference()
    if not isinstance(inference, nn.Module):
        raise ValueError(f"{type(layer).__name__}.to_inference() returned "
                         f"{type(inference).__name__}, not an nn.Module")
    return inference.train(layer.training)
