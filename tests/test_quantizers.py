"""Binarizers: sign(0) = +1 forward, and the documented straight-through gradients."""
import pytest
import torch

from sparks_ext.quantizers import (BinaryActivation, RPReLU, RSign, approx_sign, sign, sign_ste)


pytestmark = pytest.mark.usefixtures("one_thread")


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


X = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.5])


def test_sign_forward_maps_zero_to_plus_one():
    expected = torch.tensor([-1.0, -1, -1, 1, 1, 1, 1])
    for fn in (sign, sign_ste, approx_sign):
        assert torch.equal(fn(X), expected)


def test_ste_gradient_is_clipped_identity():
    assert torch.equal(_grad(sign_ste, X), torch.tensor([0.0, 1, 1, 1, 1, 1, 0]))


def test_approx_sign_gradient_is_bireal_polynomial():
    assert torch.allclose(_grad(approx_sign, X), torch.tensor([0.0, 0, 1, 2, 1.5, 0, 0]))


def test_binary_activation_module_and_errors():
    assert torch.equal(_grad(BinaryActivation("ste"), X), _grad(sign_ste, X))
    assert torch.equal(_grad(BinaryActivation("approx"), X), _grad(approx_sign, X))
    with pytest.raises(ValueError, match="gradient"):
        BinaryActivation("tanh")


def test_rsign_learns_a_threshold():
    rs = RSign(2)
    with torch.no_grad():
        rs.threshold.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([0.25, 0.75]).reshape(1, 1, 2, 1).expand(1, 2, 2, 1).contiguous()
    y = rs(x)
    assert torch.equal(y[0, 0, :, 0], torch.tensor([-1.0, 1.0]))  # threshold 0.5
    assert torch.equal(y[0, 1, :, 0], torch.tensor([1.0, 1.0]))   # threshold -0.5
    y.sum().backward()
    assert rs.threshold.grad is not None and rs.threshold.grad.abs().sum() > 0


def test_rprelu_matches_its_definition():
    torch.manual_seed(0)
    m = RPReLU(3)
    with torch.no_grad():
        m.shift_in.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        m.shift_out.bias.copy_(torch.tensor([1.0, 2.0, -1.0]))
    x = torch.randn(2, 3, 4, 4)
    gamma = m.shift_in.bias[None, :, None, None]
    zeta = m.shift_out.bias[None, :, None, None]
    slope = m.prelu.weight[None, :, None, None]
    shifted = x - gamma
    expected = torch.where(shifted >= 0, shifted, slope * shifted) + zeta
    assert torch.allclose(m(x), expected)
