"""sparks_ext: sub-bit binary neural networks for PyTorch.

A binary kh x kw kernel has only 2^(kh*kw) possible values; sparks_ext stores each kernel as an
index into a small per-layer codebook and convolves by computing each codeword's XNOR-popcount
response once per input patch and gathering the responses by index.

The C++ extension is the prebuilt one when it matches the running torch, otherwise it is compiled
for that torch at first import (cached; announced on stderr); :func:`build_info` says which.
"""
from ._build import build_info, load_extension as _load_extension

_C = _load_extension()  # before the modules below: ops.py imports it as `from . import _C`

from . import analysis, datasets, models, nn, optim, packing, quantizers, reference, selection
from .convert import convert
from .ops import binary_conv2d, conv2d
from .serialization import load, save
from .summary import summary

__version__ = "0.1.0"

__all__ = ["conv2d", "binary_conv2d", "nn", "packing", "reference", "quantizers", "selection", "models",
           "convert", "summary", "save", "load", "analysis", "optim", "datasets", "build_info"]
