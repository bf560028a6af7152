"""Trainable binary layers: SparksConv2d (learned codebook) and BinaryConv2d (1-bit), their
inference layers, gradients, the Hungarian schedule and state dicts."""
import copy
import io

import pytest
import torch
from torch import nn

import sparks_ext
from sparks_ext.nn import BinaryConv2d, CodebookConv2d, SparksConv2d, XnorConv2d
from sparks_ext.packing import kernels_to_ids
from sparks_ext.reference import binary_conv2d_reference, conv2d_reference
from tests.helpers.cases import train_steps

HAS_BINARY_OP = torch._C._dispatch_has_kernel_for_dispatch_key("sparks::binary_conv2d", "CPU")
needs_binary_op = pytest.mark.skipif(not HAS_BINARY_OP, reason="sparks::binary_conv2d has no CPU kernel yet")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sparks_to_inference_is_exact(geom):
    torch.manual_seed(0)
    layer = SparksConv2d(kernel_size=3, n_codewords=16, hungarian_every=2, **geom)
    x = torch.randn(2, geom["in_channels"], 9, 9)
    train_steps(layer, x)
    layer.eval()
    inference = layer.to_inference()
    assert isinstance(inference, CodebookConv2d) and inference.n_codewords == 16
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out, inference(x))
        # ... and it is the conv of sign(x) with the selected codewords, by the reference.
        ref = conv2d_reference(x, layer.codebook(), layer.indices(), layer.scale(), layer.bias,
                               layer.stride, layer.padding, layer.dilation, layer.groups)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert kernels_to_ids(inference.codebook).unique().numel() == 16


def test_training_forward_equals_eval_forward_with_the_same_selection():
    """The decode-to-dense training path gives the numbers of the conv2d op (eval path)."""
    torch.manual_seed(0)
    layer = SparksConv2d(8, 16, 3, n_codewords=8, padding=1, bias=True, hungarian_every=1000)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 8, 7, 7)
    layer.step.fill_(1)  # not a Hungarian step: training reuses the cached selection
    train_out = layer(x)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(train_out.detach(), layer(x), rtol=1e-6, atol=1e-6)
        unscaled = sparks_ext.conv2d(x, layer.codebook(), layer.indices(), padding=1)
        assert torch.equal(unscaled, conv2d_reference(x, layer.codebook(), layer.indices(), padding=1))


@needs_binary_op
@pytest.mark.parametrize("cls", [BinaryConv2d, SparksConv2d])
def test_dense_and_op_backends_agree(cls):
    torch.manual_seed(0)
    layer = cls(8, 16, 3, padding=1, bias=True)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    results = []
    for backend in ("dense", "op"):
        model = copy.deepcopy(layer)
        model.backend = backend
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), {k: p.grad.clone() for k, p in model.named_parameters()}))
        x.grad = None
    (o1, gx1, g1), (o2, gx2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx2)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-6)


def test_selected_codewords_stay_distinct_and_follow_the_schedule():
    torch.manual_seed(0)
    layer = SparksConv2d(8, 8, 3, n_codewords=32, padding=1, hungarian_every=3, gumbel_scale=2.0)
    x = torch.randn(2, 8, 5, 5)
    history = []
    for step in range(9):
        before = layer.selected.clone()
        layer(x)
        history.append(not torch.equal(before, layer.selected))
        assert layer.selected.unique().numel() == 32
        assert kernels_to_ids(layer.codebook()).unique().numel() == 32
    assert int(layer.step) == 9
    # Only steps 0, 3, 6 may change the hard selection; with strong noise they do.
    assert not any(changed for i, changed in enumerate(history) if i % 3)
    assert any(history[i] for i in (0, 3, 6))


def test_pste_gradient_reaches_the_logits_and_ste_the_latent_weights():
    torch.manual_seed(0)
    layer = SparksConv2d(4, 6, 3, n_codewords=8, padding=1)
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = 1.5  # outside the clip: only the scale's gradient there
    x = torch.randn(2, 4, 5, 5)
    g = torch.randn(2, 6, 5, 5)
    (layer(x) * g).sum().backward()
    assert layer.logits.grad is not None and layer.logits.grad.abs().sum() > 0
    # Straight-through: away from the scale term, the latent gradient is the dense kernel
    # gradient of conv(sign(x), W_binary) * alpha.
    codebook, idx = layer.codebook(), layer.indices()
    dense = codebook[idx].clone().requires_grad_(True)
    out = nn.functional.conv2d(torch.where(x >= 0, 1.0, -1.0), dense, padding=1)
    alpha = layer.weight.detach().abs().mean(dim=(1, 2, 3))
    (out * alpha[None, :, None, None] * g).sum().backward()
    w = layer.weight.detach().clone().requires_grad_(True)
    (w.abs().mean(dim=(1, 2, 3))[None, :, None, None] * out.detach() * g).sum().backward()
    expected = dense.grad * (layer.weight.detach().abs() <= 1) + w.grad
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_mid_training_resumes_identically():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(SparksConv2d(4, 8, 3, n_codewords=16, padding=1, hungarian_every=2),  # noqa: E731
                                 nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 25, 3))
    model = make()
    x, y = torch.randn(6, 4, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)

    def step(m, o):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(4):
        step(model, opt)
    buf.seek(0)
    saved = torch.load(buf)
    torch.manual_seed(123)  # a different global RNG state must not matter
    resumed = make()
    resumed.load_state_dict(saved["model"])
    opt2 = torch.optim.Adam(resumed.parameters(), lr=0.05)
    opt2.load_state_dict(saved["opt"])
    for _ in range(4):
        step(resumed, opt2)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_binary_conv_eval_matches_reference_and_frequency_baseline(geom):
    torch.manual_seed(0)
    layer = BinaryConv2d(kernel_size=3, **geom).eval()
    x = torch.randn(2, geom["in_channels"], 9, 9)
    with torch.no_grad():
        out = layer(x)
        ref = binary_conv2d_reference(x, torch.where(layer.weight >= 0, 1.0, -1.0), layer.scale(), layer.bias,
                                      layer.stride, layer.padding, layer.dilation, layer.groups)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        # Frequency baseline == CodebookConv2d.from_conv2d on the same weights.
        conv = nn.Conv2d(geom["in_channels"], geom["out_channels"], 3, layer.stride, layer.padding,
                         layer.dilation, layer.groups, bias=layer.bias is not None)
        conv.weight.copy_(layer.weight)
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
        freq, expected = layer.to_inference(n_codewords=4), CodebookConv2d.from_conv2d(conv, 4)
        assert isinstance(freq, CodebookConv2d)
        for k, v in expected.state_dict().items():
            assert torch.equal(freq.state_dict()[k], v), k


@needs_binary_op
def test_binary_conv_to_inference_is_xnor_conv(geom):
    torch.manual_seed(0)
    layer = BinaryConv2d(kernel_size=3, **geom)
    x = torch.randn(2, geom["in_channels"], 9, 9)
    train_steps(layer, x)
    layer.eval()
    inference = layer.to_inference()
    assert isinstance(inference, XnorConv2d) and inference.weight.dtype == torch.bool
    with torch.no_grad():
        torch.testing.assert_close(layer(x), inference(x), rtol=1e-6, atol=1e-6)


def test_layer_contract_attributes():
    s = SparksConv2d(8, 16, 3, n_codewords=32, stride=2, padding=1)
    b = BinaryConv2d(8, 16, 3, padding=1)
    for layer in (s, b, s.to_inference(), b.to_inference(), b.to_inference(n_codewords=16)):
        assert layer.in_channels == 8 and layer.out_channels == 16 and layer.kernel_size == (3, 3)
        assert len(layer.stride) == len(layer.padding) == len(layer.dilation) == 2 and layer.groups == 1
    assert s.n_codewords == 32 and abs(s.bits_per_weight - 5 / 9) < 1e-12
    assert b.n_codewords is None and b.bits_per_weight == 1.0
    assert b.to_inference().n_codewords is None and b.to_inference().bits_per_weight == 1.0


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="n_codewords"):
        SparksConv2d(4, 4, 3, n_codewords=513)
    with pytest.raises(ValueError, match="n_codewords"):
        SparksConv2d(4, 4, 3, n_codewords=0)
    with pytest.raises(ValueError, match="groups"):
        SparksConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="backend"):
        BinaryConv2d(4, 4, 3, backend="cuda")
    with pytest.raises(ValueError, match="kernel_size"):
        SparksConv2d(4, 4, 5)


def test_binary_conv_straight_through_gradients():
    torch.manual_seed(0)
    layer = BinaryConv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        layer.weight[1, 2, 0, 1] = -1.5  # outside the clip
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    g = torch.randn(2, 6, 5, 5)
    (layer(x) * g).sum().backward()
    w = layer.weight.detach()
    xb = torch.where(x.detach() >= 0, 1.0, -1.0).requires_grad_(True)
    dense = torch.where(w >= 0, 1.0, -1.0).requires_grad_(True)
    latent = w.clone().requires_grad_(True)
    alpha = latent.abs().mean(dim=(1, 2, 3))
    (nn.functional.conv2d(xb, dense, padding=1) * alpha[None, :, None, None] * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, dense.grad * (w.abs() <= 1) + latent.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xb.grad * (x.detach().abs() <= 1), rtol=1e-5, atol=1e-5)
