"""convert: every trainable layer becomes its inference layer; outputs, modes and copies kept;
the converted model runs under torch.compile(fullgraph=True) and torch.export."""
import pytest
import torch
from torch import nn

import sparks_ext
from sparks_ext.nn import CodebookConv2d


class _Trainable(nn.Module):
    """The smallest layer honouring the trainable-layer contract (to_inference)."""

    def __init__(self, c_in, c_out, n=16):
        super().__init__()
        self.conv, self.n = nn.Conv2d(c_in, c_out, 3, padding=1), n

    def forward(self, x):
        return self.to_inference()(x)

    def to_inference(self):
        return CodebookConv2d.from_conv2d(self.conv, self.n)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Trainable(8, 8),
                         nn.Sequential(nn.BatchNorm2d(8), _Trainable(8, 16, 32)), nn.Flatten())


def test_generic_pass_replaces_nested_layers_on_a_copy():
    model = _net().eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    converted = sparks_ext.convert(model, fuse=False)
    assert converted is not model and isinstance(model[1], _Trainable)  # original untouched
    assert isinstance(converted[1], CodebookConv2d) and isinstance(converted[2][1], CodebookConv2d)
    assert converted[2][1].n_codewords == 32
    assert not any(isinstance(m, _Trainable) for m in converted.modules())
    assert torch.equal(converted(x), expected)


def test_inplace_and_modes():
    model = _net()
    model[2].eval()
    out = sparks_ext.convert(model, inplace=True, fuse=False)
    assert out is model and isinstance(model[1], CodebookConv2d)
    assert model[1].training and not model[2][1].training  # each layer keeps its mode
    layer = _Trainable(4, 4)
    assert isinstance(sparks_ext.convert(layer), CodebookConv2d)  # a trainable root is replaced


def test_errors():
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        sparks_ext.convert(lambda x: x)

    class Broken(nn.Module):
        def to_inference(self):
            return "not a module"

    with pytest.raises(ValueError, match="Broken.to_inference\\(\\) returned str"):
        sparks_ext.convert(nn.Sequential(Broken()))


def test_converted_generic_model_compiles_and_exports():
    converted = sparks_ext.convert(_net().eval())
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), converted(x))
    torch.compiler.reset()
    exported = torch.export.export(converted, (x,))
    assert sum("sparks.conv2d" in str(n.target) for n in exported.graph.nodes) == 2
    assert torch.equal(exported.module()(x), converted(x))


# --- The library's trainable layers in its models ---------------------------------------------

from sparks_ext.models import SmallCNN  # noqa: E402
from sparks_ext.nn import BinaryConv2d, SparksConv2d, XnorConv2d  # noqa: E402
from tests.helpers import DEVICES  # noqa: E402
from tests.helpers.training import trained_small_cnn  # noqa: E402

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv,layer,inference", [("sparks", SparksConv2d, CodebookConv2d),
                                                  ("binary", BinaryConv2d, XnorConv2d)])
def test_converted_model_matches_trained_eval(conv, layer, inference, device):
    model = trained_small_cnn(conv, device)
    x = torch.randn(64, 1, 8, 8, device=device)
    with torch.no_grad():
        expected = model(x)
        converted = sparks_ext.convert(model)
        got = converted(x)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(inference) == 4 and layer not in kinds
    assert sum(isinstance(m, layer) for m in model.modules()) == 4  # the trained model is kept
    # Same integer sums; only the order of the float scale/bias arithmetic may differ.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    for trained, conv_layer in zip(
            [m for m in model.modules() if isinstance(m, layer)],
            [m for m in converted.modules() if isinstance(m, inference)]):
        packed = conv_layer.weight if inference is XnorConv2d else conv_layer.indices
        assert packed.device.type == device
        # the integer part is exact: raw sums of the inference layer equal the reference
        xin = torch.randn(2, trained.in_channels, 8, 8, device=device)
        if inference is CodebookConv2d:
            raw = sparks_ext.conv2d(xin, conv_layer.codebook, conv_layer.indices, padding=1)
            ref = sparks_ext.reference.conv2d_reference(xin, conv_layer.codebook, conv_layer.indices, padding=1)
        else:
            raw = sparks_ext.binary_conv2d(xin, conv_layer.weight, padding=1)
            ref = sparks_ext.reference.binary_conv2d_reference(
                xin, torch.where(trained.weight >= 0, 1.0, -1.0), padding=1)
        assert torch.equal(raw, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv", ["sparks", "binary"])
def test_converted_model_compiles_and_exports(conv, device):
    converted = sparks_ext.convert(trained_small_cnn(conv, device, steps=1))
    x = torch.randn(4, 1, 8, 8, device=device)
    with torch.no_grad():
        eager = converted(x)
        compiled = torch.compile(converted, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager)
    torch.compiler.reset()
    exported = torch.export.export(converted, (x,))
    op = "sparks.conv2d" if conv == "sparks" else "sparks.binary_conv2d"
    assert sum(op in str(n.target) for n in exported.graph.nodes) == 4
    assert torch.equal(exported.module()(x), eager)
