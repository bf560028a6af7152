"""The layer contract (sparks_ext.nn.base): every layer of sparks_ext.nn honours it, and the
questions the library asks (binary? trainable? inference form? file config?) get the contract's
answers."""
import inspect

import pytest
import torch
from torch import nn

import sparks_ext
from sparks_ext.nn import (BinaryConv2d, CodebookConv2d, ExpertBinaryConv2d, ExpertCodebookConv2d,
                           SignedBinaryConv2d, SignedCodebookConv2d, SparksConv2d, XnorConv2d)
from sparks_ext.nn.base import (BinaryConvLayer, InferenceBinaryConv, TrainableBinaryConv,
                                check_n_codewords, inference_form, is_binary_layer, is_trainable_layer)
from tests.helpers.cases import train_steps

pytestmark = pytest.mark.usefixtures("one_thread")

# Each trainable layer class, how to make one, and the class of its inference form.
TRAINABLE = [
    (lambda **g: BinaryConv2d(kernel_size=3, **g), XnorConv2d),
    (lambda **g: SparksConv2d(kernel_size=3, n_codewords=8, hungarian_every=2, **g), CodebookConv2d),
    (lambda **g: SignedBinaryConv2d(kernel_size=3, **g), SignedCodebookConv2d),
    (lambda **g: SignedBinaryConv2d(kernel_size=3, n_codewords=8, hungarian_every=2, **g), SignedCodebookConv2d),
    (lambda **g: ExpertBinaryConv2d(kernel_size=3, n_experts=2, **g), ExpertCodebookConv2d),
    (lambda **g: ExpertBinaryConv2d(kernel_size=3, n_experts=3, n_codewords=4, **g), ExpertCodebookConv2d),
]
TRAINABLE_IDS = ["binary", "sparks", "signed", "signed-codebook", "expert", "expert-codebook"]


def test_every_layer_of_sparks_ext_nn_is_a_binary_conv_layer():
    layers = [v for v in vars(sparks_ext.nn).values() if isinstance(v, type) and issubclass(v, nn.Module)]
    assert len(layers) == 8
    for cls in layers:
        assert issubclass(cls, BinaryConvLayer)
        assert issubclass(cls, TrainableBinaryConv) != issubclass(cls, InferenceBinaryConv), cls
        assert cls.trainable == issubclass(cls, TrainableBinaryConv)


@pytest.mark.parametrize("make, inference_cls", TRAINABLE, ids=TRAINABLE_IDS)
def test_trainable_layer_and_its_inference_form(make, inference_cls, geom):
    torch.manual_seed(0)
    layer = make(**geom)
    x = torch.randn(4, geom["in_channels"], 7, 7)
    train_steps(layer, x)
    layer.eval()
    assert is_binary_layer(layer) and is_trainable_layer(layer) and layer.trainable
    inference = inference_form(layer)
    assert type(inference) is inference_cls and not is_trainable_layer(inference)
    assert inference_form(inference) is inference and inference.to_inference() is inference
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "n_experts"):
        assert getattr(inference, name) == getattr(layer, name), name
    assert (inference.bias is None) == (layer.bias is None)
    with torch.no_grad():
        assert torch.equal(inference(x), layer(x))
    # The kernels it applies: {-1, 0, +1} int8 of the weight's shape (per expert for experts).
    kernels = inference.kernels()
    shape = (layer.out_channels, layer.in_channels // layer.groups, 3, 3)
    assert kernels.dtype == torch.int8 and kernels.shape == (shape if layer.n_experts == 1
                                                             else (layer.n_experts, *shape))
    assert set(kernels.unique().tolist()) <= {-1, 0, 1}
    if isinstance(layer, (BinaryConv2d, SparksConv2d)):
        assert set(kernels.unique().tolist()) <= {-1, 1}
        with torch.no_grad():
            expected = sparks_ext.binary_conv2d(x, kernels, inference.scale, inference.bias,
                                                *inference._geometry())
        assert torch.equal(expected, inference(x))


@pytest.mark.parametrize("make, inference_cls", TRAINABLE, ids=TRAINABLE_IDS)
def test_file_config_rebuilds_the_inference_layer(make, inference_cls, geom):
    torch.manual_seed(0)
    inference = make(**geom).eval().to_inference()
    config = inference.file_config()
    assert list(config) == list(inference_cls.FILE_ARGS)
    assert all(isinstance(v, (bool, int, float, str, list)) for v in config.values())
    rebuilt = inference_cls.from_file_config(config)
    assert rebuilt.file_config() == config
    assert {k: (v.shape, v.dtype) for k, v in rebuilt.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in inference.state_dict().items()}
    rebuilt.load_state_dict(inference.state_dict())
    x = torch.randn(2, geom["in_channels"], 6, 6)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), inference(x))
    with pytest.raises(ValueError, match="takes no argument 'n_bits'"):
        inference_cls.from_file_config({**config, "n_bits": 3})


@pytest.mark.parametrize("cls", [CodebookConv2d, SignedCodebookConv2d, XnorConv2d, ExpertCodebookConv2d])
def test_file_args_are_every_constructor_argument_in_order(cls):
    # An argument added to a constructor but not recorded would be lost by save/load.
    assert tuple(inspect.signature(cls).parameters) == cls.FILE_ARGS


def test_pad_value_is_part_of_the_codebook_layer_config():
    layer = CodebookConv2d(4, 4, 3, n_codewords=5, padding=1, pad_value=-1.0, bias=False)
    config = layer.file_config()
    assert config == {"in_channels": 4, "out_channels": 4, "kernel_size": [3, 3], "n_codewords": 5,
                      "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1,
                      "bias": False, "pad_value": -1.0}
    assert CodebookConv2d.from_file_config(config).pad_value == -1.0
    assert "pad_value=-1" in repr(layer) and "bias=False" in repr(layer)


def test_questions_about_other_modules():
    conv = nn.Conv2d(2, 2, 3)
    assert not is_binary_layer(conv) and not is_trainable_layer(conv)

    class OwnTrainable(nn.Module):  # a layer of one's own that follows the conversion contract
        def to_inference(self):
            return nn.Identity()

    assert is_trainable_layer(OwnTrainable()) and not is_binary_layer(OwnTrainable())


@pytest.mark.parametrize("n, kernel_size, learned, match", [
    (0, None, False, r"n_codewords must be an int >= 1, got 0"),
    (True, None, False, r"an int >= 1, got True"),
    (2.0, None, False, r"an int >= 1, got 2.0"),
    ("4", None, False, r"an int >= 1, got '4'"),
    (513, (3, 3), False, r"n_codewords must be in \[1, 512\] for 3x3 kernels, got 513"),
    (0, (1, 2), False, r"in \[1, 4\] for 1x2 kernels, got 0"),
    (2.5, (3, 3), True, r"in \[1, 512\] for 3x3 kernels, got 2.5"),
    (4, (5, 5), True, r"kernel_size \(5, 5\): learning a selection among the 2\^25 binary kernels "
                      r"needs at most 12 taps"),
])
def test_check_n_codewords_refuses(n, kernel_size, learned, match):
    with pytest.raises(ValueError, match=match):
        check_n_codewords(n, kernel_size, learned)


def test_check_n_codewords_accepts():
    assert check_n_codewords(3 ** 9) == 3 ** 9  # a ternary inference codebook may be larger
    assert check_n_codewords(512, (3, 3)) == 512 and check_n_codewords(2 ** 25, (5, 5)) == 2 ** 25
    assert check_n_codewords(torch.tensor(16), (3, 3), learned=True) == 16
    value = check_n_codewords(torch.tensor(16))
    assert value == 16 and type(value) is int


@pytest.mark.parametrize("make", [
    lambda: SparksConv2d(4, 4, 3, n_codewords=0),
    lambda: SignedBinaryConv2d(4, 4, 3, n_codewords=513),
    lambda: CodebookConv2d(4, 4, 3, n_codewords=0),
    lambda: ExpertCodebookConv2d(4, 4, 3, n_codewords=-1),
    lambda: ExpertBinaryConv2d(4, 4, 3, n_codewords=600),
    lambda: CodebookConv2d.from_conv2d(nn.Conv2d(4, 4, 3), 513),
], ids=["sparks", "signed", "codebook", "expert-codebook", "expert", "from_conv2d"])
def test_every_layer_checks_n_codewords_the_same_way(make):
    with pytest.raises(ValueError, match=r"^n_codewords must be (an int >= 1|in \[1, 512\] for 3x3 kernels), got"):
        make()


@pytest.mark.parametrize("cls", [CodebookConv2d, XnorConv2d, BinaryConv2d, SparksConv2d,
                                 ExpertBinaryConv2d, ExpertCodebookConv2d, SignedBinaryConv2d])
@pytest.mark.parametrize("geometry, match", [
    (dict(kernel_size=0), "kernel_size"), (dict(stride=0), "stride"), (dict(dilation=(1, 0)), "dilation"),
    (dict(padding=-1), "padding"), (dict(groups=3), "groups"), (dict(out_channels=0), "out_channels"),
])
def test_every_layer_checks_its_geometry_the_same_way(cls, geometry, match):
    with pytest.raises(ValueError, match=match):
        cls(**{"in_channels": 4, "out_channels": 4, "kernel_size": 3, **geometry})
