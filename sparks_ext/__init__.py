"""sparks_ext: sub-bit binary neural networks for PyTorch.

A binary kh x kw kernel has only 2^(kh*kw) possible values; sparks_ext stores each kernel as an
index into a small per-layer codebook and convolves by computing each codeword's XNOR-popcount
response once per input patch and gathering the responses by index.
"""
from . import analysis, datasets, models, nn, optim, packing, quantizers, reference, selection
from .convert import convert
from .ops import binary_conv2d, conv2d
from .serialization import load, save
from .summary import summary

__version__ = "0.1.0"

__all__ = ["conv2d", "binary_conv2d", "nn", "packing", "reference", "quantizers", "selection", "models",
           "convert", "summary", "save", "load", "analysis", "optim", "datasets"]
