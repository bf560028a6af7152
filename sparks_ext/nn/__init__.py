"""Layers: inference layers that run the library's ops, and trainable layers that learn them."""
from .codebook import CodebookConv2d, most_frequent_codebook, nearest_codeword

__all__ = ["CodebookConv2d", "most_frequent_codebook", "nearest_codeword"]
