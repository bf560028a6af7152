"""Packing helpers: {-1,+1} <-> bits, kernels <-> codeword ids, indices at ceil(log2 n) bits.

Bit convention (shared with the C++ kernels, csrc/cpu/codebook_packing.h): tap t = i * kw + j of a
kh x kw kernel is bit t of its codeword id; a set bit means +1. So the 512 binary 3x3 kernels
are the ids 0..511, and ``ids_to_kernels(torch.arange(2 ** (kh * kw)), kh, kw)`` is the full
codebook.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "pm1_to_bits", "bits_to_pm1", "kernels_to_ids", "ids_to_kernels", "full_codebook",
    "index_bits", "pack_bits", "unpack_bits", "pack_indices", "unpack_indices",
]


def pm1_to_bits(x: torch.Tensor) -> torch.Tensor:
    """{-1,+1} (or any real tensor, by sign with sign(0) = +1) to a bool tensor (True = +1)."""
    return x >= 0


def bits_to_pm1(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool (or 0/1) tensor to {-1, +1} of ``dtype``."""
    return bits.to(dtype) * 2 - 1


def kernels_to_ids(kernels: torch.Tensor) -> torch.Tensor:
    """(..., kh, kw) binary kernels (by sign) to int64 codeword ids in [0, 2^(kh*kw))."""
    kh, kw = kernels.shape[-2:]
    if kh * kw > 63:
        raise ValueError(f"kernels: {kh}x{kw} has more than 63 taps; ids would overflow int64")
    bits = pm1_to_bits(kernels).reshape(*kernels.shape[:-2], kh * kw).long()
    weights = 2 ** torch.arange(kh * kw, device=kernels.device)
    return (bits * weights).sum(-1)


def ids_to_kernels(ids: torch.Tensor, kh: int, kw: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codeword ids to (..., kh, kw) kernels with entries in {-1, +1}."""
    if kh * kw > 63:
        raise ValueError(f"kh*kw = {kh * kw} taps exceed the 63 an int64 id can hold")
    ids = ids.long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= 2 ** (kh * kw)):
        raise ValueError(f"ids must lie in [0, {2 ** (kh * kw)}) for a {kh}x{kw} kernel")
    taps = torch.arange(kh * kw, device=ids.device)
    bits = (ids[..., None] >> taps) & 1
    return bits_to_pm1(bits, dtype).reshape(*ids.shape, kh, kw)


def full_codebook(kh: int = 3, kw: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All 2^(kh*kw) binary kernels, (2^(kh*kw), kh, kw), row k being codeword id k."""
    if kh * kw > 16:
        raise ValueError(f"a full codebook of {kh}x{kw} kernels would hold 2^{kh * kw} entries")
    return ids_to_kernels(torch.arange(2 ** (kh * kw)), kh, kw, dtype)


def index_bits(n: int) -> int:
    """Bits per stored index for a codebook of n codewords: ceil(log2 n), at least 1."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return max(1, math.ceil(math.log2(n)))


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs non-negative integers < 2^bits, flattened, at ``bits`` bits each (LSB first) into a
    uint8 tensor of ceil(numel * bits / 8) bytes."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    flat = values.reshape(-1).long().cpu()
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(f"values must lie in [0, 2^{bits}) to pack at {bits} bits")
    planes = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    pad = (-planes.numel()) % 8
    planes = torch.cat([planes, planes.new_zeros(pad)]).reshape(-1, 8)
    return (planes << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values as int64."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    needed = math.ceil(count * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() < needed:
        raise ValueError(f"packed must be a 1-D uint8 tensor of at least {needed} bytes "
                         f"to hold {count} values at {bits} bits")
    planes = ((packed[:needed].long()[:, None] >> torch.arange(8)) & 1).reshape(-1)
    planes = planes[: count * bits].reshape(count, bits)
    return (planes << torch.arange(bits)).sum(1)


def pack_indices(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Bit-packs a codebook's indices at ceil(log2 n) bits each."""
    return pack_bits(indices, index_bits(n))


def unpack_indices(packed: torch.Tensor, n: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack_indices`, reshaped to ``shape``."""
    shape = tuple(shape)
    return unpack_bits(packed, index_bits(n), math.prod(shape)).reshape(shape)
