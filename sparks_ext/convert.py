"""convert: replace every trained layer of this library by its inference layer."""
from __future__ import annotations

import copy

from torch import nn

__all__ = ["convert", "is_trainable_layer"]


def is_trainable_layer(module: nn.Module) -> bool:
    """True for the library's trainable layers (SparksConv2d, BinaryConv2d, ...): they know
    their inference form through ``to_inference()``."""
    return callable(getattr(module, "to_inference", None))


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns ``model`` with every trainable layer replaced by ``layer.to_inference()``
    (SparksConv2d -> CodebookConv2d, BinaryConv2d -> XnorConv2d, ...).

    The converted model computes what the trained model computes in eval mode, with packed
    binary weights and the library's XNOR-popcount kernels. Each inference layer keeps the
    train/eval mode of the layer it replaces. With ``inplace=False`` (the default) the model is
    deep-copied first and left untouched.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    return _convert(model)


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
