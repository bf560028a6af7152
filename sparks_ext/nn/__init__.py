"""Layers: inference layers that run the library's ops, and trainable layers that learn them."""
from .codebook import CodebookConv2d, most_frequent_codebook, nearest_codeword
from .binary import BinaryConv2d, XnorConv2d
from .sparks import SparksConv2d
from .signed import SignedBinaryConv2d, SignedCodebookConv2d
from .expert import ExpertBinaryConv2d, ExpertCodebookConv2d

__all__ = ["CodebookConv2d", "most_frequent_codebook", "nearest_codeword",
           "BinaryConv2d", "XnorConv2d", "SparksConv2d",
           "SignedBinaryConv2d", "SignedCodebookConv2d",
           "ExpertBinaryConv2d", "ExpertCodebookConv2d"]
