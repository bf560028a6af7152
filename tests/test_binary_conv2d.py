"""sparks_ext.binary_conv2d (dense XNOR-popcount) against the pure-PyTorch reference: exactness,
argument errors, autograd (straight-through estimator), opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import sparks_ext
from sparks_ext.reference import binary_conv2d_reference
from tests.helpers.cases import GRID, Case, SteSign


def _weight(case, device, kind):
    w = case.make_dense_weight(device)
    if kind == "bool":
        return w > 0
    if kind == "int8":
        return w.to(torch.int8)
    if kind == "channels_last":
        return w.contiguous(memory_format=torch.channels_last)
    return w


@pytest.mark.parametrize("kind", ["real", "bool"])
@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_matches_reference_bit_for_bit(case, kind, device):
    x, w = case.make_input(device), _weight(case, device, kind)
    out = sparks_ext.binary_conv2d(x, w, **case.conv_kwargs())
    ref = binary_conv2d_reference(x, w, **case.conv_kwargs())
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", ["int8", "channels_last"])
def test_weight_dtypes_and_layouts_agree(kind, device):
    case = Case(in_channels=70, out_channels=24)
    x = case.make_input(device)
    ref = binary_conv2d_reference(x, case.make_dense_weight(device), padding=1)
    for w in (_weight(case, device, kind), _weight(case, device, kind) > 0):
        assert torch.equal(sparks_ext.binary_conv2d(x, w, padding=1), ref)


@pytest.mark.parametrize("case", [c for c in GRID if c.pad_value == 0 and not c.ternary][:8], ids=lambda c: c.id)
def test_scale_and_bias(case, device):
    x, w = case.make_input(device), case.make_dense_weight(device)
    scale, bias = case.make_scale_bias(device)
    out = sparks_ext.binary_conv2d(x, w, scale, bias, **case.conv_kwargs())
    torch.testing.assert_close(out, binary_conv2d_reference(x, w, scale, bias, **case.conv_kwargs()))


def test_output_memory_format_follows_input(device):
    case = Case(layout="channels_last")
    x, w = case.make_input(device), case.make_dense_weight(device)
    assert sparks_ext.binary_conv2d(x, w, padding=1).is_contiguous(memory_format=torch.channels_last)
    assert sparks_ext.binary_conv2d(x.contiguous(), w, padding=1).is_contiguous()


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError that names the argument.

@pytest.mark.parametrize("bad", [0.0, 0.5, 2.0, -3.0, float("nan"), float("inf")])
def test_weight_values_outside_plus_minus_one(bad, device):
    case = Case()
    x = case.make_input(device)
    for layout in ("contiguous", "channels_last"):
        w = case.make_dense_weight(device)
        w[3, 5, 1, 2] = bad
        if layout == "channels_last":
            w = w.contiguous(memory_format=torch.channels_last)
        with pytest.raises(ValueError, match=r"weight.*-1 or \+1"):
            sparks_ext.binary_conv2d(x, w, padding=1)


def test_integer_weight_outside_plus_minus_one(device):
    case = Case()
    w = case.make_dense_weight(device).to(torch.int64)
    w[0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="weight"):
        sparks_ext.binary_conv2d(case.make_input(device), w)


@pytest.mark.parametrize("shape,match", [
    ((16, 8, 3), "weight must be 4-D"),
    ((16, 8, 3, 3, 1), "weight must be 4-D"),
    ((16, 5, 3, 3), "weight expects C_in/groups"),
    ((15, 4, 3, 3), "groups"),
])
def test_weight_shape_errors(shape, match, device):
    x = Case().make_input(device)
    w = torch.ones(shape, device=device)
    groups = 2 if shape == (15, 4, 3, 3) else 1
    with pytest.raises(ValueError, match=match):
        sparks_ext.binary_conv2d(x, w, groups=groups)


def test_other_argument_errors(device):
    case = Case()
    x, w = case.make_input(device), case.make_dense_weight(device)
    with pytest.raises(ValueError, match="input must be 4-D"):
        sparks_ext.binary_conv2d(x[0], w)
    with pytest.raises(ValueError, match="weight must be a bool"):
        sparks_ext.binary_conv2d(x, w.to(torch.complex64))
    with pytest.raises(ValueError, match="pad_value"):
        sparks_ext.binary_conv2d(x, w, pad_value=0.5)
    with pytest.raises(ValueError, match="stride"):
        sparks_ext.binary_conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="scale"):
        sparks_ext.binary_conv2d(x, w, torch.ones(3, device=device))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        sparks_ext.binary_conv2d(x, w, dilation=5)


# ---------------------------------------------------------------------------------------------
# Autograd: the registered formula against a hand-written straight-through estimator.

def _ste_reference(x, w, scale, bias, padding, pad_value, **kw):
    xb = F.pad(SteSign.apply(x), (padding, padding, padding, padding), value=pad_value)
    out = F.conv2d(xb, w, **kw)
    return out * scale[None, :, None, None] + bias[None, :, None, None]


@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
@pytest.mark.parametrize("geometry", [dict(stride=1, dilation=1, groups=1), dict(stride=2, dilation=1, groups=2),
                                      dict(stride=1, dilation=2, groups=4)], ids=["plain", "stride2-g2", "dil2-g4"])
def test_gradients_match_ste_reference(pad_value, geometry, device):
    torch.manual_seed(0)
    groups = geometry["groups"]
    x = (torch.randn(2, 8, 9, 9, dtype=torch.float64, device=device) * 1.5).requires_grad_()
    w = (torch.randint(0, 2, (8, 8 // groups, 3, 3), device=device) * 2 - 1).double().requires_grad_()
    scale = (torch.rand(8, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    bias = torch.randn(8, dtype=torch.float64, device=device).requires_grad_()
    pad = geometry["dilation"]
    out = sparks_ext.binary_conv2d(x, w, scale, bias, padding=pad, pad_value=pad_value, **geometry)
    ref = _ste_reference(x, w, scale, bias, pad, pad_value, **geometry)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, scale, bias), grad_out)
    want = torch.autograd.grad(ref, (x, w, scale, bias), grad_out)
    for g, e, name in zip(got, want, ("input", "weight", "scale", "bias")):
        torch.testing.assert_close(g, e, msg=lambda m: f"grad of {name}: {m}")


def test_gradcheck_scale_and_bias(device):
    """The op is linear in scale and bias: their analytic gradients must pass gradcheck."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=device)
    w = torch.randint(0, 2, (6, 4, 3, 3), device=device).double() * 2 - 1
    scale = torch.rand(6, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, b: sparks_ext.binary_conv2d(x, w, s, b, padding=1), (scale, bias))


def test_bool_weight_gets_no_gradient_but_input_does(device):
    case = Case(dtype=torch.float64)
    x = case.make_input(device).requires_grad_()
    w = case.make_dense_weight(device) > 0
    out = sparks_ext.binary_conv2d(x, w, padding=1)
    (grad_x,) = torch.autograd.grad(out.sum(), (x,))
    want = torch.nn.grad.conv2d_input(x.shape, w.double() * 2 - 1, torch.ones_like(out), padding=1)
    torch.testing.assert_close(grad_x, want * (x.abs() <= 1))


# ---------------------------------------------------------------------------------------------
# Custom-op machinery.

@pytest.mark.parametrize("case", [Case(), Case(stride=(2, 2), groups=2, pad_value=1.0), Case(dtype=torch.float64)],
                         ids=lambda c: c.id)
def test_opcheck(case, device):
    x = case.make_input(device).requires_grad_()
    w = case.make_dense_weight(device).requires_grad_()
    scale, bias = case.make_scale_bias(device)
    k = case.conv_kwargs()
    hyper = (list(k["stride"]), list(k["padding"]), list(k["dilation"]), k["groups"], k["pad_value"])
    torch.library.opcheck(torch.ops.sparks.binary_conv2d.default,
                          (x, w, scale.requires_grad_(), bias.requires_grad_(), *hyper))
    torch.library.opcheck(torch.ops.sparks.binary_conv2d.default,
                          (x.detach(), w.detach() > 0, None, None, *hyper))


def test_torch_compile_fullgraph(device):
    case = Case()
    x, w = case.make_input(device), case.make_dense_weight(device) > 0
    scale, bias = case.make_scale_bias(device)

    def block(x):
        return torch.relu(sparks_ext.binary_conv2d(x, w, scale, bias, padding=1)) + 1

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)
    torch.compiler.reset()
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))
