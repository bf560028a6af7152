"""CodebookConv2d: conversion from nn.Conv2d, exactness against the reference, state dicts,
torch.export."""
import io

import pytest
import torch
from torch import nn

import sparks_ext
from sparks_ext.nn import CodebookConv2d, most_frequent_codebook, nearest_codeword
from sparks_ext.packing import kernels_to_ids
from sparks_ext.reference import binary_conv2d_reference, conv2d_reference
from tests.helpers.cases import Case


def _conv(device, **kw):
    torch.manual_seed(0)
    args = dict(in_channels=16, out_channels=24, kernel_size=3, padding=1, bias=True)
    args.update(kw)
    return nn.Conv2d(**args).to(device)


def test_most_frequent_codebook_counts_kernels():
    weight = torch.ones(4, 2, 3, 3)
    weight[0, 0, 0, 0] = -1  # one kernel differs from the seven all-ones kernels
    cb = most_frequent_codebook(weight, 2)
    assert torch.equal(cb[0], torch.ones(3, 3))
    expected = torch.ones(3, 3)
    expected[0, 0] = -1
    assert torch.equal(cb[1], expected)
    ids = kernels_to_ids(most_frequent_codebook(torch.randn(8, 8, 3, 3), 64))
    assert ids.unique().numel() == 64  # distinct even when fewer kernels are used


def test_nearest_codeword_maximises_inner_product():
    torch.manual_seed(0)
    weight, codebook = torch.randn(5, 3, 3, 3), most_frequent_codebook(torch.randn(9, 9, 3, 3), 16)
    idx = nearest_codeword(weight, codebook)
    scores = torch.einsum("oikl,nkl->oin", weight, codebook)
    assert torch.equal(scores.gather(-1, idx[..., None])[..., 0], scores.max(-1).values)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2), dict(groups=4), dict(groups=16, out_channels=16),
                                dict(kernel_size=(1, 5), padding=(0, 2), dilation=2), dict(bias=False)],
                         ids=["plain", "stride2", "groups4", "depthwise", "1x5-dil2", "nobias"])
def test_full_codebook_reproduces_binarized_conv(kw, device):
    """With all 2^(kh*kw) codewords available no kernel is approximated: the layer computes
    scale * conv(sign(x), sign(W)) + bias."""
    conv = _conv(device, **kw)
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    layer = CodebookConv2d.from_conv2d(conv, 2 ** taps)
    x = torch.randn(2, 16, 10, 10, device=device)
    w = conv.weight.detach()
    scale = w.abs().mean(dim=(1, 2, 3))
    ref = binary_conv2d_reference(x, torch.where(w >= 0, 1.0, -1.0), scale,
                                  None if conv.bias is None else conv.bias.detach(),
                                  conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("n", [1, 16, 32, 64])
def test_layer_is_exactly_the_op(n, device):
    conv = _conv(device)
    layer = CodebookConv2d.from_conv2d(conv, n)
    assert layer.codebook.shape == (n, 3, 3) and layer.indices.shape == (24, 16)
    assert kernels_to_ids(layer.codebook).unique().numel() == n
    x = torch.randn(3, 16, 7, 7, device=device)
    out = layer(x)
    ref = conv2d_reference(x, layer.codebook, layer.indices, layer.scale, layer.bias, padding=1)
    torch.testing.assert_close(out, ref)
    raw = sparks_ext.conv2d(x, layer.codebook, layer.indices, padding=1)
    assert torch.equal(raw, conv2d_reference(x, layer.codebook, layer.indices, padding=1))


def test_bits_per_weight_and_repr():
    layer = CodebookConv2d(8, 8, 3, n_codewords=32)
    assert layer.bits_per_weight == pytest.approx(5 / 9)
    assert "0.56 bits/weight" in repr(layer)


def test_state_dict_round_trip(device):
    layer = CodebookConv2d.from_conv2d(_conv(device, stride=2), 32)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = CodebookConv2d(16, 24, 3, n_codewords=32, stride=2, padding=1).to(device)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 16, 9, 9, device=device)
    assert torch.equal(fresh(x), layer(x))
    for name in ("codebook", "indices", "scale", "bias"):
        assert torch.equal(getattr(fresh, name), getattr(layer, name))
    # Loading keeps the kernel's index layout: uint8 (C_in/groups, C_out) row-major.
    assert fresh.indices.dtype == torch.uint8 and fresh.indices.t().is_contiguous()


def test_dtype_conversion_of_the_module(device):
    layer = CodebookConv2d.from_conv2d(_conv(device), 16)
    x = torch.randn(1, 16, 6, 6, device=device)
    for dtype in (torch.float64, torch.bfloat16):
        out = layer.to(dtype)(x.to(dtype))
        assert out.dtype == dtype
        assert layer.codebook.dtype == torch.int8 and layer.indices.dtype == torch.uint8
        assert layer.indices.t().is_contiguous()


def test_from_conv2d_rejects_what_it_cannot_represent():
    with pytest.raises(ValueError, match="n_codewords must be in"):
        CodebookConv2d.from_conv2d(nn.Conv2d(4, 4, 3), 513)
    with pytest.raises(ValueError, match="padding='same'"):
        CodebookConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding="same"), 16)
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        CodebookConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 16)
    with pytest.raises(ValueError, match="conv must be an nn.Conv2d"):
        CodebookConv2d.from_conv2d(nn.Linear(4, 4), 16)
    with pytest.raises(ValueError, match="groups"):
        CodebookConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="n_codewords"):
        CodebookConv2d(4, 4, 3, n_codewords=0)


def test_torch_export_of_the_layer(device):
    layer = sparks_ext.nn.CodebookConv2d(8, 16, 3, n_codewords=16, padding=1).to(device)
    case = Case()
    layer.codebook.copy_(case.make_codebook(device))
    layer.indices.copy_(case.make_indices(device))
    x = case.make_input(device)
    exported = torch.export.export(layer, (x,))
    assert any("sparks.conv2d" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), layer(x), rtol=0, atol=0)
    x2 = case.make_input(device, seed=7)
    torch.testing.assert_close(exported.module()(x2), layer(x2), rtol=0, atol=0)
