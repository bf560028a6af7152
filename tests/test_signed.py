"""Signed binarization: the quantizer rule, STE / EDE gradients, the learned sub-codebook, and
the ternary-codebook inference layer (exact against the eval forward and the reference)."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from sparks_ext.nn import SignedBinaryConv2d, SignedCodebookConv2d
from sparks_ext.nn.signed import ede_parameters, set_ede_progress, signed_binarize
from sparks_ext.quantizers import sign
from sparks_ext.reference import conv2d_reference
from tests.helpers.cases import train_steps
from tests.helpers.training import accuracy, fit, small_cnn


pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = [
    dict(),
    dict(region="kernel", threshold=0.3),
    dict(gradient="ede", threshold=0.0),
    dict(n_codewords=16, hungarian_every=2),
    dict(n_codewords=8, region="kernel", gradient="ede"),
]


def test_signed_binarize_hand_computed():
    # Channel 0: mean 0.25 > 0 -> s = +1; mean|W| = 0.45, delta = 0.225 -> keep 0.9 and 0.5 only.
    # Channel 1: mean -0.3 -> s = -1; mean|W| = 0.5, delta = 0.25 -> keep -1.0 and -0.6 only.
    w = torch.tensor([[0.9, -0.4, 0.5, 0.0], [-1.0, 0.2, -0.6, 0.2]]).reshape(2, 1, 2, 2)
    q, s, delta = signed_binarize(w, threshold=0.5)
    assert s.flatten().tolist() == [1.0, -1.0]
    torch.testing.assert_close(delta.flatten(), torch.tensor([0.225, 0.25]))
    assert q.reshape(2, 4).tolist() == [[1, 0, 1, 0], [-1, 0, -1, 0]]
    # Per kernel with one input channel the regions coincide; threshold 0 keeps every weight of
    # the region's sign (a zero weight is not kept: the rule is s * W > delta).
    q0, _, _ = signed_binarize(w, threshold=0.0, region="kernel")
    assert q0.reshape(2, 4).tolist() == [[1, 0, 1, 0], [-1, 0, -1, 0]]


@pytest.mark.parametrize("region", ["channel", "kernel"])
def test_binary_locally_ternary_globally(region):
    torch.manual_seed(0)
    layer = SignedBinaryConv2d(16, 32, 3, region=region, threshold=0.4)
    q = layer.quantized_weight()
    assert set(q.unique().tolist()) == {-1.0, 0.0, 1.0}
    per_region = q.flatten(1) if region == "channel" else q.flatten(2)
    # every region holds values of one sign only
    assert not ((per_region > 0).any(-1) & (per_region < 0).any(-1)).any()
    assert layer.density == pytest.approx(float((q != 0).float().mean()))


def test_density_falls_as_the_threshold_rises():
    torch.manual_seed(0)
    layer = SignedBinaryConv2d(16, 16, 3)
    densities = []
    for t in (0.0, 0.3, 0.6, 0.9):
        layer.threshold = t
        densities.append(layer.density)
    assert densities == sorted(densities, reverse=True) and densities[0] > densities[-1]
    assert 0.4 < densities[0] < 0.6  # about half the weights share their channel's sign


@pytest.mark.parametrize("variant", VARIANTS)
def test_to_inference_is_exact(geom, variant):
    torch.manual_seed(0)
    layer = SignedBinaryConv2d(kernel_size=3, **geom, **variant)
    x = torch.randn(2, geom["in_channels"], 9, 9)
    train_steps(layer, x)
    layer.eval()
    inference = layer.to_inference()
    assert isinstance(inference, SignedCodebookConv2d)
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out, inference(x))
        q = layer.quantized_weight()
        assert torch.equal(inference.codebook[inference.indices.long()].float(), q)
        ref = conv2d_reference(x, inference.codebook, inference.indices, layer.scale(), layer.bias,
                               layer.stride, layer.padding, layer.dilation, layer.groups)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        # without scale and bias the op's integer sums are exact
        raw = conv2d_reference(x, inference.codebook, inference.indices, None, None, layer.stride,
                               layer.padding, layer.dilation, layer.groups)
        inference.scale.fill_(1.0)
        if inference.bias is not None:
            inference.bias.zero_()
        assert torch.equal(inference(x), raw)
    assert inference.density == layer.density
    assert torch.unique(inference.codebook.flatten(1), dim=0).shape[0] == inference.n_codewords
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(inference, name) == getattr(layer, name)


def test_training_forward_matches_eval_forward():
    torch.manual_seed(0)
    layer = SignedBinaryConv2d(8, 12, 3, padding=1, bias=True)
    x = torch.randn(3, 8, 7, 7)
    train_out = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(train_out, layer.eval()(x), rtol=1e-6, atol=1e-6)


def _dense_grad(layer, x):
    """Gradient of the loss with respect to the quantized kernels, and the loss's upstream."""
    q = layer.quantized_weight().clone().requires_grad_(True)
    out = F.conv2d(sign(x), q, None, layer.stride, layer.padding) * layer.scale().detach()[None, :, None, None]
    out.square().sum().backward()
    return q.grad


def test_ste_gradient_is_clipped_identity():
    torch.manual_seed(0)
    layer = SignedBinaryConv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        layer.weight.mul_(8)  # some latent weights beyond |W| = 1
    layer.scale = lambda: torch.full((6,), 0.5)  # a constant scale isolates the kernel gradient
    x = torch.randn(2, 4, 5, 5)
    layer(x).square().sum().backward()
    expected = _dense_grad(layer, x) * (layer.weight.detach().abs() <= 1)
    torch.testing.assert_close(layer.weight.grad, expected)
    assert (layer.weight.detach().abs() > 1).any()


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_ede_gradient_follows_its_schedule(progress):
    torch.manual_seed(0)
    layer = SignedBinaryConv2d(4, 6, 3, padding=1, gradient="ede", region="kernel")
    set_ede_progress(layer, progress)
    t, k = ede_parameters(progress)
    assert float(layer.ede_t) == pytest.approx(t)
    layer.scale = lambda: torch.full((6,), 0.5)
    x = torch.randn(2, 4, 5, 5)
    layer(x).square().sum().backward()
    _, s, delta = signed_binarize(layer.weight, layer.threshold, "kernel")
    u = s * layer.weight.detach() - delta
    expected = _dense_grad(layer, x) * k * t * (1 - torch.tanh(t * u) ** 2) / 2
    torch.testing.assert_close(layer.weight.grad, expected)


def test_ede_schedule_values():
    assert ede_parameters(0.0) == pytest.approx((0.1, 10.0))
    assert ede_parameters(0.5) == pytest.approx((1.0, 1.0))
    assert ede_parameters(1.0) == pytest.approx((10.0, 1.0))


def test_full_selection_reproduces_the_threshold_rule():
    # With every mask available, the best mask for a kernel is exactly [s W > delta].
    torch.manual_seed(0)
    layer = SignedBinaryConv2d(8, 8, 3, n_codewords=512, region="kernel")
    plain, _, _ = signed_binarize(layer.weight, layer.threshold, "kernel")
    assert torch.equal(layer.eval().quantized_weight(), plain)


def test_learned_subcodebook_limits_the_distinct_kernels_and_trains_the_logits():
    torch.manual_seed(0)
    layer = SignedBinaryConv2d(16, 16, 3, padding=1, n_codewords=8)
    x = torch.randn(2, 16, 6, 6)
    layer(x).square().mean().backward()
    assert layer.logits.grad is not None and layer.logits.grad.abs().sum() > 0
    q = layer.quantized_weight().abs().reshape(-1, 9)
    assert torch.unique(q, dim=0).shape[0] <= 8
    assert layer.to_inference().n_codewords <= 16  # +mask and -mask for each of the 8
    assert layer.bits_per_weight == pytest.approx(math.log2(8) / 9 + 1 / (16 * 9))


def test_state_dict_round_trip_of_the_inference_layer():
    torch.manual_seed(0)
    layer = SignedBinaryConv2d(8, 8, 3, padding=1, bias=True).eval()
    inference = layer.to_inference()
    buffer = io.BytesIO()
    torch.save(inference.state_dict(), buffer)
    buffer.seek(0)
    fresh = SignedCodebookConv2d(8, 8, 3, inference.n_codewords, padding=1)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(fresh(x), inference(x))
    assert fresh.density == inference.density


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=-0.1), "threshold"), (dict(threshold=1.0), "threshold"),
    (dict(threshold=1.5), "threshold"), (dict(threshold=float("nan")), "threshold"),
    (dict(threshold=True), "threshold"), (dict(region="layer"), "region"),
    (dict(gradient="tanh"), "gradient"), (dict(n_codewords=0), "n_codewords"),
    (dict(n_codewords=513), "n_codewords"), (dict(n_codewords=2.5), "n_codewords"),
    (dict(n_codewords=4, hungarian_every=0), "hungarian_every"),
    (dict(kernel_size=5, n_codewords=4), "12 taps"), (dict(groups=3), "groups"),
])
def test_bad_configurations_raise(kwargs, match):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SignedBinaryConv2d(**args)


def test_bad_schedule_arguments_raise():
    with pytest.raises(ValueError, match="progress"):
        set_ede_progress(SignedBinaryConv2d(2, 2), 1.5)
    with pytest.raises(ValueError, match="t_min"):
        ede_parameters(0.5, t_min=0.0)
    with pytest.raises(ValueError, match="threshold"):
        signed_binarize(torch.randn(2, 2, 3, 3), threshold=2.0)


def test_short_digits_training_beats_chance_and_deploys_exactly(digits):
    torch.manual_seed(0)
    data = digits
    model = small_cnn(lambda *g: SignedBinaryConv2d(*g, gradient="ede"))
    fit(model, torch.optim.Adam(model.parameters(), lr=1e-2), data,
        on_step=lambda p: set_ede_progress(model, p))
    acc = accuracy(model, data)
    assert acc > 0.6  # chance is 0.1
    for block in model.layers:
        assert 0.05 < block.conv1.density < 0.95
        block.conv1, block.conv2 = block.conv1.to_inference(), block.conv2.to_inference()
    assert accuracy(model, data) == acc
