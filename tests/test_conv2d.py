"""sparks_ext.conv2d against the pure-PyTorch reference: exactness, autograd, torch.compile (the
layer's torch.export is in test_codebook_layer.py)."""
import pytest
import torch
import torch.nn.functional as F

import sparks_ext
from sparks_ext.reference import conv2d_reference
from tests.helpers.cases import GRID, Case, SteSign


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_matches_reference_bit_for_bit(case, device):
    x = case.make_input(device)
    cb, idx = case.make_codebook(device), case.make_indices(device)
    out = sparks_ext.conv2d(x, cb, idx, **case.conv_kwargs())
    ref = conv2d_reference(x, cb, idx, **case.conv_kwargs())
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("case", [c for c in GRID if c.pad_value == 0 and not c.ternary], ids=lambda c: c.id)
def test_scale_and_bias(case, device):
    x = case.make_input(device)
    cb, idx = case.make_codebook(device), case.make_indices(device)
    scale, bias = case.make_scale_bias(device)
    out = sparks_ext.conv2d(x, cb, idx, scale, bias, **case.conv_kwargs())
    ref = conv2d_reference(x, cb, idx, scale, bias, **case.conv_kwargs())
    torch.testing.assert_close(out, ref)
    only_bias = sparks_ext.conv2d(x, cb, idx, None, bias, **case.conv_kwargs())
    torch.testing.assert_close(only_bias, conv2d_reference(x, cb, idx, None, bias, **case.conv_kwargs()))


def test_output_memory_format_follows_input(device):
    case = Case(layout="channels_last")
    x = case.make_input(device)
    out = sparks_ext.conv2d(x, case.make_codebook(device), case.make_indices(device), padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = sparks_ext.conv2d(x.contiguous(), case.make_codebook(device), case.make_indices(device), padding=1)
    assert out.is_contiguous()


def test_codebook_dtypes_agree(device):
    case = Case()
    x, cb, idx = case.make_input(device), case.make_codebook(device), case.make_indices(device)
    ref = conv2d_reference(x, cb, idx, padding=1)
    for cb_dtype in (torch.int8, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64):
        for idx_dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
            out = sparks_ext.conv2d(x, cb.to(cb_dtype), idx.to(idx_dtype), padding=1)
            assert torch.equal(out, ref), (cb_dtype, idx_dtype)


def test_int_and_pair_arguments_agree(device):
    case = Case()
    x, cb, idx = case.make_input(device), case.make_codebook(device), case.make_indices(device)
    a = sparks_ext.conv2d(x, cb, idx, stride=2, padding=1, dilation=1)
    b = sparks_ext.conv2d(x, cb, idx, stride=(2, 2), padding=[1, 1], dilation=(1, 1))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Autograd: straight-through estimator to the input (clipped to |x| <= 1), exact gradients to
# scale and bias, and the dense-weight gradient summed into a floating codebook.

def _reference_with_ste(x, codebook, indices, scale, bias, padding, pad_value, **kw):
    """Pure-PyTorch training-time formula: STE sign, pad, decode, float conv, scale, bias."""
    xb = F.pad(SteSign.apply(x), (padding, padding, padding, padding), value=pad_value)
    out = F.conv2d(xb, codebook[indices.long()], **kw)
    return out * scale[None, :, None, None] + bias[None, :, None, None]


@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
@pytest.mark.parametrize("geometry", [dict(stride=1, dilation=1, groups=1), dict(stride=2, dilation=1, groups=2),
                                      dict(stride=1, dilation=2, groups=4)], ids=["plain", "stride2-g2", "dil2-g4"])
def test_gradients_match_ste_reference(pad_value, geometry, device):
    torch.manual_seed(0)
    x = (torch.randn(2, 8, 9, 9, dtype=torch.float64, device=device) * 1.5).requires_grad_()
    codebook = (torch.randint(-1, 2, (12, 3, 3), device=device)).double().requires_grad_()
    indices = torch.randint(0, 12, (8, 8 // geometry["groups"]), device=device)
    scale = (torch.rand(8, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    bias = torch.randn(8, dtype=torch.float64, device=device).requires_grad_()
    grad_out = torch.randn(2, 8, 9 if geometry["stride"] == 1 else 5, 9 if geometry["stride"] == 1 else 5,
                           dtype=torch.float64, device=device)
    pad = geometry["dilation"]
    out = sparks_ext.conv2d(x, codebook, indices, scale, bias, padding=pad, pad_value=pad_value, **geometry)
    ref = _reference_with_ste(x, codebook, indices, scale, bias, pad, pad_value, **geometry)
    assert out.shape == grad_out.shape
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, (x, codebook, scale, bias), grad_out)
    want = torch.autograd.grad(ref, (x, codebook, scale, bias), grad_out)
    for g, w, name in zip(got, want, ("input", "codebook", "scale", "bias")):
        torch.testing.assert_close(g, w, msg=lambda m: f"grad of {name}: {m}")


def test_gradcheck_scale_and_bias(device):
    """The op is linear in scale and bias: their analytic gradients must pass gradcheck."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=device)
    codebook = torch.randint(0, 2, (5, 3, 3), device=device).double() * 2 - 1
    indices = torch.randint(0, 5, (6, 4), device=device)
    scale = torch.rand(6, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda s, b: sparks_ext.conv2d(x, codebook, indices, s, b, padding=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (scale, bias))


@pytest.mark.parametrize("case", [Case(), Case(stride=(2, 2), groups=2, pad_value=1.0), Case(ternary=True, n=64)],
                         ids=lambda c: c.id)
def test_opcheck(case, device):
    x = case.make_input(device).requires_grad_()
    cb, idx = case.make_codebook(device), case.make_indices(device)
    scale, bias = case.make_scale_bias(device)
    k = case.conv_kwargs()
    args = (x, cb, idx, scale.requires_grad_(), bias.requires_grad_(), list(k["stride"]), list(k["padding"]),
            list(k["dilation"]), k["groups"], k["pad_value"])
    torch.library.opcheck(torch.ops.sparks.conv2d.default, args)
    torch.library.opcheck(torch.ops.sparks.conv2d.default, (x.detach(), cb, idx, None, None, *args[5:]))


def test_torch_compile_fullgraph(device):
    case = Case(n=32)
    x, cb, idx = case.make_input(device), case.make_codebook(device), case.make_indices(device)
    scale, bias = case.make_scale_bias(device)

    def block(x):
        y = sparks_ext.conv2d(x, cb, idx, scale, bias, padding=1)
        return torch.relu(y) + 1

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)
    torch.compiler.reset()
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))


def test_torch_compile_backward(device):
    case = Case(n=16, dtype=torch.float32)
    cb, idx = case.make_codebook(device), case.make_indices(device)
    scale = torch.ones(case.out_channels, device=device, requires_grad=True)

    def loss(x, s):
        return sparks_ext.conv2d(x, cb, idx, s, None, padding=1).square().sum()

    x = case.make_input(device).requires_grad_()
    eager = torch.autograd.grad(loss(x, scale), (x, scale))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, scale), (x, scale))
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)

