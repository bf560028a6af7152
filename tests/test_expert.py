"""Expert binary convolution: winner-take-all forward, straight-through gate gradient, shared
codebook, routed inference through conv2d (exact against the eval forward and the reference)."""
import io

import pytest
import torch

from sparks_ext.nn import ExpertBinaryConv2d, ExpertCodebookConv2d
from sparks_ext.reference import conv2d_reference
from tests.helpers.cases import train_steps
from tests.helpers.training import accuracy, fit, small_cnn


pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = [
    dict(),
    dict(n_experts=3, gate_activation="sigmoid"),
    dict(n_codewords=16, hungarian_every=2),
]


def _expert_outputs(layer, x):
    """Every expert's training-mode output, (B, N, C_out, H, W)."""
    y = layer.experts(x)
    return y.reshape(y.shape[0], layer.out_channels, layer.n_experts, *y.shape[2:]).transpose(1, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_to_inference_is_exact_and_routes_each_sample(geom, variant):
    torch.manual_seed(0)
    layer = ExpertBinaryConv2d(kernel_size=3, **geom, **variant)
    x = torch.randn(12, geom["in_channels"], 9, 9)
    train_steps(layer, x)
    layer.eval()
    inference = layer.to_inference()
    assert isinstance(inference, ExpertCodebookConv2d)
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out, inference(x))
        winners = layer.gate_logits(x).argmax(1)
        codebook, indices, scale, bias = layer.inference_parts()
        for b in range(x.shape[0]):
            e = winners[b]
            ref = conv2d_reference(x[b:b + 1], codebook, indices[e], scale[e],
                                   None if bias is None else bias[e], layer.stride, layer.padding,
                                   layer.dilation, layer.groups)
            torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-6, atol=1e-6)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "n_experts"):
        assert getattr(inference, name) == getattr(layer, name)
    if layer.n_codewords is not None:
        assert inference.n_codewords == layer.n_codewords
        assert torch.equal(inference.codebook.float(), layer.experts.codebook())


def test_training_forward_is_the_winners_output_and_matches_eval():
    torch.manual_seed(0)
    layer = ExpertBinaryConv2d(8, 12, 3, padding=1, bias=True)
    x = torch.randn(16, 8, 6, 6)
    out = layer(x)
    winners = layer.gate_logits(x).argmax(1)
    with torch.no_grad():
        experts = _expert_outputs(layer, x)
        assert torch.equal(out, experts[torch.arange(16), winners])
        torch.testing.assert_close(out, layer.eval()(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_gate_gets_the_straight_through_gradient(gate):
    torch.manual_seed(0)
    layer = ExpertBinaryConv2d(6, 5, 3, padding=1, n_experts=3, gate_activation=gate)
    x = torch.randn(7, 6, 5, 5)
    layer(x).square().sum().backward()
    with torch.no_grad():
        logits = layer.gate_logits(x)
        winners = logits.argmax(1)
        experts = _expert_outputs(layer, x)
        out = experts[torch.arange(7), winners]
        d_gates = (2 * out[:, None] * experts).sum(dim=(2, 3, 4))  # dL/dg_e per sample
    logits = logits.clone().requires_grad_(True)
    probs = logits.softmax(1) if gate == "softmax" else logits.sigmoid()
    (d_logits,) = torch.autograd.grad(probs, logits, d_gates)
    torch.testing.assert_close(layer.gate.bias.grad, d_logits.sum(0), rtol=1e-4, atol=1e-4)


def test_unused_experts_get_no_weight_gradient_and_usage_counts():
    torch.manual_seed(0)
    layer = ExpertBinaryConv2d(4, 6, 3, padding=1, n_experts=4)
    with torch.no_grad():
        layer.gate.bias.copy_(torch.tensor([0.0, 100.0, 0.0, 0.0]))  # everyone picks expert 1
    x = torch.randn(5, 4, 5, 5)
    layer(x).square().sum().backward()
    grad = layer._per_expert(layer.experts.weight.grad)
    assert grad[1].abs().sum() > 0
    assert grad[[0, 2, 3]].abs().sum() == 0
    assert layer.usage.tolist() == [0, 5, 0, 0]
    layer.eval()(x[:3])
    assert layer.usage.tolist() == [0, 8, 0, 0]
    layer.reset_usage()
    assert layer.usage.sum() == 0
    assert "usage" not in layer.state_dict()


def test_experts_share_one_codebook_with_their_own_indices():
    torch.manual_seed(0)
    layer = ExpertBinaryConv2d(16, 16, 3, padding=1, n_codewords=8, n_experts=4)
    _, indices, _, _ = layer.inference_parts()
    assert indices.shape == (4, 16, 16)
    assert indices.max() < 8
    assert not all(torch.equal(indices[0], indices[e]) for e in range(1, 4))


def test_empty_batch_channels_last_and_state_dict_round_trip():
    torch.manual_seed(0)
    layer = ExpertBinaryConv2d(8, 8, 3, padding=1, bias=True).eval()
    inference = layer.to_inference()
    x = torch.randn(6, 8, 5, 5)
    assert inference(x[:0]).shape == (0, 8, 5, 5)
    assert torch.equal(inference(x.to(memory_format=torch.channels_last)), inference(x))
    buffer = io.BytesIO()
    torch.save(inference.state_dict(), buffer)
    buffer.seek(0)
    fresh = ExpertCodebookConv2d(8, 8, 3, inference.n_codewords, padding=1, n_experts=4)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh(x), inference(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_experts=0), "n_experts"), (dict(n_experts=-2), "n_experts"),
    (dict(n_experts=2.5), "n_experts"), (dict(n_experts=True), "n_experts"),
    (dict(gate_activation="relu"), "gate_activation"), (dict(n_codewords=0), "n_codewords"),
    (dict(groups=3), "groups"), (dict(backend="cuda"), "backend"),
])
def test_bad_configurations_raise(kwargs, match):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ExpertBinaryConv2d(**args)
    if "backend" not in kwargs and "n_codewords" not in kwargs:
        with pytest.raises(ValueError, match=match):
            ExpertCodebookConv2d(**args)


def test_short_digits_training_beats_chance_and_deploys_exactly(digits):
    torch.manual_seed(0)
    data = digits
    model = small_cnn(lambda *g: ExpertBinaryConv2d(*g, n_experts=4))
    fit(model, torch.optim.Adam(model.parameters(), lr=1e-2), data)
    acc = accuracy(model, data)
    assert acc > 0.6  # chance is 0.1
    for block in model.layers:
        block.conv1, block.conv2 = block.conv1.to_inference(), block.conv2.to_inference()
    assert accuracy(model, data) == acc
    usage = model.layers[0].conv1.usage
    assert usage.sum() == 450


def test_convert_summary_and_file_round_trip_with_signed_and_expert_layers(tmp_path):
    import sparks_ext
    from sparks_ext.nn import SignedBinaryConv2d, SignedCodebookConv2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(SignedBinaryConv2d(4, 8, 3, 1, 1, n_codewords=16), torch.nn.BatchNorm2d(8),
                                ExpertBinaryConv2d(8, 8, 3, 1, 1, n_codewords=16, bias=True)).eval()
    x = torch.randn(5, 4, 8, 8)
    with torch.no_grad():
        expected = model(x)
        deployed = sparks_ext.convert(model)
        assert isinstance(deployed[0], SignedCodebookConv2d) and isinstance(deployed[2], ExpertCodebookConv2d)
        assert torch.equal(deployed(x), expected)
        assert "SignedCodebookConv2d" in str(sparks_ext.summary(deployed, (1, 4, 8, 8)))
        sparks_ext.save(deployed, tmp_path / "m.sparks")
        loaded = sparks_ext.load(tmp_path / "m.sparks")  # architecture rebuilt from the file
        assert torch.equal(loaded(x), expected)
        assert loaded[0].density == deployed[0].density
