"""Packing helpers: bit conventions and round trips."""
import math

import pytest
import torch

from sparks_ext import packing


def test_codeword_ids_follow_the_bit_convention():
    kernel = -torch.ones(3, 3)
    kernel[0, 0] = 1   # tap 0
    kernel[2, 1] = 1   # tap 7
    assert packing.kernels_to_ids(kernel).item() == 1 + 2 ** 7
    full = packing.full_codebook(3, 3)
    assert full.shape == (512, 3, 3)
    assert torch.equal(packing.kernels_to_ids(full), torch.arange(512))
    assert torch.equal(packing.ids_to_kernels(torch.arange(512), 3, 3), full)


def test_pm1_bits_round_trip():
    x = torch.tensor([-2.0, -0.0, 0.0, 0.5, -1.0])
    bits = packing.pm1_to_bits(x)
    assert bits.tolist() == [False, True, True, True, False]  # sign(0) = +1
    assert packing.bits_to_pm1(bits).tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0]


@pytest.mark.parametrize("n", [2, 3, 16, 32, 64, 100, 512])
def test_index_packing_round_trip_and_size(n):
    torch.manual_seed(n)
    idx = torch.randint(0, n, (37, 29))
    packed = packing.pack_indices(idx, n)
    bits = packing.index_bits(n)
    assert bits == math.ceil(math.log2(n))
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(idx.numel() * bits / 8)
    assert torch.equal(packing.unpack_indices(packed, n, idx.shape), idx)


def test_packing_errors():
    with pytest.raises(ValueError, match=r"values must lie in \[0, 2\^4\)"):
        packing.pack_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="at least 2 bytes"):
        packing.unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)
    with pytest.raises(ValueError, match="n must be at least 1"):
        packing.index_bits(0)
    with pytest.raises(ValueError, match="ids must lie in"):
        packing.ids_to_kernels(torch.tensor([512]), 3, 3)
