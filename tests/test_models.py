"""Binary ResNet-18 and the small CNN: structure per conv type, shapes, inference conversion."""
import pytest
import torch
from torch import nn

from sparks_ext.models import SmallCNN, make_conv, resnet18
from sparks_ext.nn import BinaryConv2d, CodebookConv2d, SparksConv2d


pytestmark = pytest.mark.usefixtures("one_thread")


def _count(model, cls):
    return sum(type(m) is cls for m in model.modules())


@pytest.mark.parametrize("conv,cls", [("float", nn.Conv2d), ("binary", BinaryConv2d), ("sparks", SparksConv2d)])
def test_resnet18_has_16_block_convs_of_the_requested_type(conv, cls):
    model = resnet18(num_classes=10, conv=conv, n_codewords=32, stem="cifar")
    threes = [m for m in model.layers.modules() if getattr(m, "kernel_size", None) == (3, 3)]
    assert len(threes) == 16 and all(type(m) is cls for m in threes)
    # Stem, 1x1 shortcuts and classifier stay real-valued.
    assert type(model.stem[0]) is nn.Conv2d and type(model.fc) is nn.Linear
    ones = [m for m in model.modules() if getattr(m, "kernel_size", None) == (1, 1)]
    assert len(ones) == 3 and all(type(m) is nn.Conv2d for m in ones)
    if conv == "sparks":
        assert all(m.n_codewords == 32 for m in threes)
    strides = [m.stride for m in threes]
    assert strides.count((2, 2)) == 3


def test_resnet18_forward_shapes_for_both_stems():
    torch.manual_seed(0)
    cifar = resnet18(num_classes=10, conv="sparks", n_codewords=16, stem="cifar")
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    imagenet = resnet18(conv="binary", stem="imagenet").eval()
    with torch.no_grad():
        assert imagenet(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("image_size", [8, 28])
@pytest.mark.parametrize("conv", ["float", "binary", "sparks"])
def test_small_cnn_shapes_and_backward(conv, image_size):
    torch.manual_seed(0)
    model = SmallCNN(conv=conv, n_codewords=8, width=8, image_size=image_size)
    out = model(torch.randn(4, 1, image_size, image_size))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sparks_model_deploys_exactly_with_codebook_layers():
    torch.manual_seed(0)
    model = SmallCNN(conv="sparks", n_codewords=16, width=8)
    x = torch.randn(8, 1, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        for block in model.layers:
            block.conv1, block.conv2 = block.conv1.to_inference(), block.conv2.to_inference()
        assert _count(model, CodebookConv2d) == 4 and _count(model, SparksConv2d) == 0
        assert torch.equal(model(x), expected)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="conv"):
        make_conv("ternary", 4, 4)
    with pytest.raises(ValueError, match="n_codewords"):
        make_conv("sparks", 4, 4)
    with pytest.raises(ValueError, match="stem"):
        resnet18(stem="mnist")
    with pytest.raises(ValueError, match="image_size"):
        SmallCNN(image_size=32)
