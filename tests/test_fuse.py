"""convert(fuse=True): BatchNorm, RSign / sign thresholds, residual adds and RPReLU folded into
the binary convs, by structure; fused against unfused on every model and on hand-built blocks;
bf16 deployment; compile, export, save/load and summary of fused models.

Tolerances. Folding changes only the order of float arithmetic: a folded BatchNorm computes
acc * (s k) + ((b - m) k + beta) with folded constants rounded once, instead of normalizing
acc * s + b. Within one layer that is a few ulps of the largest term, so float32 single-layer
checks use 64 ulps of the output's largest magnitude. Across layers, a value within those ulps
of the next binarization's threshold can flip its sign, which is not a rounding-sized change;
so whole networks are compared in float64 (``_fused64``: the unfused model cast to float64,
then fused, so that the folded constants are float64 too), where a flip would need a value
within ~1e-15 of a threshold, with 1e-9 relative tolerance (a million float64 ulps of margin
for the sums), and in float32 by top-1 agreement, as deployed.
"""
import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparks_ext
from sparks_ext.fuse import fuse, is_fusable_conv
from sparks_ext.models import BasicBlock, SmallCNN, resnet18
from sparks_ext.nn import BinaryConv2d, CodebookConv2d, SparksConv2d, XnorConv2d
from sparks_ext.quantizers import BinaryActivation, LearnableBias, RPReLU, RSign

F32_ULPS = 64 * torch.finfo(torch.float32).eps
# The op a fused model's 1x1 conv (OneDnnConv2d) runs on a channels_last input with autograd off
REAL_CONV_OP = "mkldnn._convolution_pointwise" if sparks_ext.fuse._packed_path_works() else "aten.conv2d"


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, RSign thresholds, RPReLU shifts and
    slopes (and PReLU slopes of either sign), as after training; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
        for name, p in model.named_parameters():
            if name.endswith(("threshold", "shift_in.bias", "shift_out.bias")) or name.endswith(".b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _fused64(model: nn.Module):
    """(unfused, fused) float64 forms of a trained model."""
    unfused = sparks_ext.convert(model, fuse=False).double()
    return unfused, fuse(unfused)


def _assert_close64(got, expected):
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-9 * scale


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def ops_called(model, x) -> list:
    """The ATen / sparks ops one forward pass runs (metadata-only ops such as views left out)."""
    log = _OpLog()
    with torch.inference_mode(), log:
        model(x)
    views = {"view", "_unsafe_view", "t", "expand", "as_strided", "unsqueeze", "slice", "select",
             "detach", "alias", "reshape", "_to_copy", "permute", "transpose"}
    return [op for op in log.ops if op.removeprefix("aten.") not in views]


# --- hand-built blocks -------------------------------------------------------------------------

def _binary(kind, c_in, c_out, stride=1, groups=1, n=16, bias=False):
    if kind == "sparks":
        return SparksConv2d(c_in, c_out, 3, n, stride, 1, groups=groups, bias=bias)
    return BinaryConv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=bias)


KINDS = ["sparks", "binary"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stride,groups,bias", [(1, 1, False), (2, 1, True), (1, 4, False), (2, 2, True)])
def test_conv_batchnorm_rpre_lu_is_one_call(kind, stride, groups, bias):
    torch.manual_seed(0)
    model = randomize(nn.Sequential(RSign(8), _binary(kind, 8, 16, stride, groups, bias=bias),
                                    nn.BatchNorm2d(16), RPReLU(16)))
    x = torch.randn(4, 8, 9, 9)
    fused = sparks_ext.convert(model)
    assert isinstance(fused, nn.Sequential)  # still a chain of its layers
    assert [type(m) for m in fused] == [nn.Identity, CodebookConv2d if kind == "sparks" else XnorConv2d,
                                        nn.Identity, nn.Identity]
    conv = fused[1]
    assert conv.threshold is not None and conv.prelu_weight is not None and conv.post_bias is not None
    assert ops_called(fused, x) == ["sparks.conv2d" if kind == "sparks" else "sparks.binary_conv2d"]
    with torch.no_grad():
        expected = model(x)
        got = fused(x)
    # One layer, no binarization in between: only rounding of the folded constants.
    assert (got - expected).abs().max().item() <= F32_ULPS * expected.abs().max().item()
    unfused, fused64 = _fused64(model)
    _assert_close64(fused64(x.double()), unfused(x.double()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stride,c_in,c_out", [(1, 16, 16), (2, 16, 32), (1, 16, 32)])
def test_library_basic_block(kind, stride, c_in, c_out):
    torch.manual_seed(1)
    block = BasicBlock(c_in, c_out, stride, conv=kind, n_codewords=16 if kind == "sparks" else None)
    model = randomize(nn.Sequential(block))
    x = torch.randn(3, c_in, 8, 8)
    fused = sparks_ext.convert(model)
    assert isinstance(fused, fx.GraphModule)  # residuals: a graph
    ops = ops_called(fused, x)
    op = "sparks.conv2d" if kind == "sparks" else "sparks.binary_conv2d"
    # x is contiguous: the shortcut's OneDnnConv2d is the plain conv
    shortcut = [] if stride == 1 and c_in == c_out else (["aten.avg_pool2d"] if stride == 2 else []) + ["aten.conv2d"]
    assert sorted(ops) == sorted([op, op] + shortcut)  # one call per conv, BN folded in the shortcut
    convs = [m for m in fused.modules() if is_fusable_conv(m)]
    assert all(m.threshold is not None and m.prelu_weight is not None for m in convs)
    unfused, fused64 = _fused64(model)
    _assert_close64(fused64(x.double()), unfused(x.double()))
    with torch.no_grad():
        assert torch.equal(fused(x).argmax(1), model(x).argmax(1))


class Shift(nn.Module):
    """A user's LearnableBias: adds a per-channel parameter by broadcasting a view."""

    def __init__(self, c):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return x + self.b.view(1, -1, 1, 1)


class Sign(nn.Module):
    def forward(self, x):
        return torch.sign(x)


class UserBlock(nn.Module):
    """A user's own ReActNet block: their pieces, their forward."""

    def __init__(self, c, kind):
        super().__init__()
        self.move = Shift(c)
        self.conv = _binary(kind, c, c)
        self.norm = nn.BatchNorm2d(c)
        self.act = nn.PReLU(c)
        self.move_out = Shift(c)

    def forward(self, x):
        y = self.norm(self.conv(torch.sign(self.move(x))))
        return self.move_out(self.act(y + x))


@pytest.mark.parametrize("kind", KINDS)
def test_users_sequential_and_block_are_fused(kind):
    torch.manual_seed(2)
    seq = randomize(nn.Sequential(Shift(8), Sign(), _binary(kind, 8, 8), nn.BatchNorm2d(8), nn.PReLU(),
                                  Shift(8), BinaryActivation(), _binary(kind, 8, 8), nn.BatchNorm2d(8)))
    block = randomize(nn.Sequential(UserBlock(8, kind), UserBlock(8, kind)))
    op = "sparks.conv2d" if kind == "sparks" else "sparks.binary_conv2d"
    x = torch.randn(2, 8, 6, 6)
    for model in (seq, block):
        fused = sparks_ext.convert(model)
        assert ops_called(fused, x) == [op, op]
        unfused, fused64 = _fused64(model)
        _assert_close64(fused64(x.double()), unfused(x.double()))
    fused = sparks_ext.convert(seq)
    # Shift + sign -> threshold -b; PReLU() with one slope -> that slope on every channel; the
    # Shift after it is the first conv's post_bias (the output side is fused first), so the
    # second conv's input is a plain binarizer: dropped, threshold None (0).
    assert torch.allclose(fused[2].prelu_weight, seq[4].weight.expand(8))
    assert torch.allclose(fused[2].threshold, -seq[0].b.detach())
    assert torch.allclose(fused[2].post_bias, seq[5].b.detach())
    assert fused[7].threshold is None
    assert [type(m).__name__ for m in fused].count("Identity") == 7


@pytest.mark.parametrize("kind", KINDS)
def test_what_is_not_recognised_stays_and_stays_correct(kind):
    torch.manual_seed(3)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_relu, self.conv_bn_train, self.shared, self.conv_broadcast = (
                _binary(kind, 8, 8) for _ in range(4))
            self.bn_train, self.bn = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
            self.gate = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            a = F.relu(self.conv_relu(x))                  # ReLU: not a PReLU, stays
            b = self.bn_train(self.conv_bn_train(x))       # BatchNorm in training mode: stays
            c = self.shared(x) + self.shared(torch.sign(x))  # one conv called twice: not rewritten
            pooled = self.gate(x).mean((2, 3), keepdim=True)
            d = self.bn(self.conv_broadcast(x)) + pooled   # a broadcasting residual: added after the op
            e = torch.sign(x - 1.0)                        # a shifted sign that feeds no binary conv
            return a + b + c + d + e.mean()

    model = randomize(Odd())
    model.bn_train.train()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected = model(x)
        fused = sparks_ext.convert(model)
        got = fused(x)
    assert any(isinstance(m, nn.BatchNorm2d) and m.training for m in fused.modules())
    assert isinstance(fused, fx.GraphModule)
    assert fused.conv_broadcast.bias is not None and fused.conv_relu.bias is None
    assert fused.shared.threshold is None
    assert (got - expected).abs().max().item() <= F32_ULPS * expected.abs().max().item()


def test_residual_the_op_cannot_take_is_added_after_it():
    torch.manual_seed(4)
    layer = sparks_ext.convert(SparksConv2d(4, 6, 3, 8, 1, 1))
    layer.prelu_weight = torch.rand(6)
    layer.post_bias = torch.randn(6)
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 1, 1)
    plain = copy.deepcopy(layer)
    plain.prelu_weight = plain.post_bias = None
    y = plain(x) + r
    expected = torch.where(y >= 0, y, layer.prelu_weight[:, None, None] * y) + layer.post_bias[:, None, None]
    assert torch.equal(layer(x, r), expected)
    full = torch.randn(2, 6, 5, 5)
    y = plain(x) + full
    fused_ref = torch.where(y >= 0, y, layer.prelu_weight[:, None, None] * y) + layer.post_bias[:, None, None]
    torch.testing.assert_close(layer(x, full), fused_ref, rtol=0, atol=F32_ULPS * fused_ref.abs().max().item())


# --- real layers: OneDnnConv2d, ReLU behind the max-pool -----------------------------------------

def _conv_tolerance(conv: nn.Conv2d, x: torch.Tensor) -> float:
    """A float sum of K products, in any order, is within K ulps of the sum of the magnitudes:
    64 ulps of the largest |W| * |x| conv output (K <= 64 * 9 here, errors rarely add up)."""
    bound = F.conv2d(x.abs().double(), conv.weight.detach().abs().double(), None, conv.stride,
                     conv.padding, conv.dilation, conv.groups)
    return 64 * torch.finfo(x.dtype).eps * bound.max().item() * 8


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kernel,stride,padding,groups", [
    (1, 1, 0, 1), (1, 2, 0, 1), (1, 2, 0, 4), (1, (2, 1), 0, 1), (3, 2, 1, 2), (7, 2, 3, 1)])
def test_onednn_conv2d_equals_the_conv(kernel, stride, padding, groups, batch, layout):
    torch.manual_seed(11)
    conv = nn.Conv2d(8, 16, kernel, stride, padding, groups=groups, bias=groups != 4).eval()
    layer = sparks_ext.fuse.OneDnnConv2d.from_conv2d(conv)
    assert layer.weight is conv.weight and set(layer.state_dict()) == set(conv.state_dict())
    x = torch.randn(batch, 8, 11, 9)  # odd sizes: a stride-2 conv drops the last row / column
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = conv(x), layer(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= _conv_tolerance(conv, x)
        conv.double()  # the layer holds the conv's parameters: both float64, aten's conv
        assert torch.equal(layer(x.double()), conv(x.double()))
        conv.float()
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            xb = x.bfloat16()
            conv_b = copy.deepcopy(conv).bfloat16()
            got_b = sparks_ext.fuse.OneDnnConv2d.from_conv2d(conv_b)(xb)
            assert got_b.dtype == torch.bfloat16
            torch.testing.assert_close(got_b.float(), conv_b(xb).float(), rtol=2e-2, atol=2e-2)
    ops = ops_called(layer, x)
    real = REAL_CONV_OP if kernel == 1 and layout == "channels_last" else "aten.conv2d"
    assert ops[-1:] == [real] and set(ops[:-1]) <= {"mkldnn._reorder_convolution_weight"}
    assert ops_called(layer, x) == [real]  # a 1x1 weight packed once per input shape
    log = _OpLog()
    with log:
        layer(x)  # autograd on: the plain conv
    assert REAL_CONV_OP not in log.ops and "mkldnn._reorder_convolution_weight" not in log.ops
    # autograd: the same gradients as the conv's
    xg = x.clone().requires_grad_()
    layer(xg).square().sum().backward()
    grad_layer, grad_w = xg.grad.clone(), conv.weight.grad.clone()
    xg.grad = None
    conv.weight.grad = None
    conv(xg).square().sum().backward()
    torch.testing.assert_close(xg.grad, grad_layer, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.weight.grad, grad_w, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not sparks_ext.fuse._packed_path_works(), reason="no working oneDNN packed conv")
@pytest.mark.parametrize("batch,c_in,c_out,size,stride", [
    (1, 64, 128, 28, 1), (1, 256, 512, 14, 2), (16, 64, 128, 56, 2), (3, 8, 24, 9, 2), (2, 3, 5, 7, 1)])
def test_onednn_conv2d_packed_gives_the_unpacked_bits(batch, c_in, c_out, size, stride):
    """The packed-weight call (1x1, channels_last, autograd off) against oneDNN's plain one and,
    at batch 16 (where aten picks oneDNN too), against the conv."""
    torch.manual_seed(14)
    conv = nn.Conv2d(c_in, c_out, 1, stride).eval()
    layer = sparks_ext.fuse.OneDnnConv2d.from_conv2d(conv)
    x = torch.randn(batch, c_in, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        packed = layer(x)
        assert ops_called(layer, x) == [REAL_CONV_OP]
        plain = torch.mkldnn_convolution(x, conv.weight, conv.bias, [0, 0], [stride, stride], [1, 1], 1)
    assert torch.equal(packed, plain) and packed.is_contiguous(memory_format=torch.channels_last)
    if batch == 16:
        with torch.no_grad():
            assert torch.equal(packed, conv(x))


def test_onednn_conv2d_falls_back_where_the_private_ops_fail(monkeypatch):
    """A torch whose private oneDNN ops are gone or changed: the probe says no and the layer is
    nn.Conv2d's forward, with the same result."""
    def broken(*args, **kwargs):
        raise RuntimeError("changed signature")

    monkeypatch.setattr(sparks_ext.fuse, "_PACKED_PATH_WORKS", None)
    monkeypatch.setattr(sparks_ext.fuse, "_PACKED_CONVOLUTION", broken)
    assert not sparks_ext.fuse._packed_path_works()
    torch.manual_seed(14)
    conv = nn.Conv2d(16, 32, 1, stride=2).eval()
    layer = sparks_ext.fuse.OneDnnConv2d.from_conv2d(conv)
    x = torch.randn(1, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert ops_called(layer, x) == ["aten.conv2d"]
        torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)


def test_onednn_conv2d_repacks_its_weight_when_it_changes():
    """With autograd off the layer keeps its weight in oneDNN's layout per input shape: an
    in-place update, a new weight tensor, another shape or layout, a copy all give the conv."""
    torch.manual_seed(13)
    conv = nn.Conv2d(16, 32, 1).eval()
    layer = sparks_ext.fuse.OneDnnConv2d.from_conv2d(conv)
    x = torch.randn(1, 16, 7, 7).contiguous(memory_format=torch.channels_last)

    def check(inp):
        expected, got = conv(inp), layer(inp)
        assert (got - expected).abs().max().item() <= _conv_tolerance(conv, inp)

    with torch.inference_mode():
        check(x)
    with torch.no_grad():
        check(x)
        conv.weight.mul_(-3)  # in place: same storage, new version
        check(x)
        conv.weight.data = torch.randn(32, 16, 1, 1)  # another tensor
        check(x)
        conv.load_state_dict({"weight": torch.randn(32, 16, 1, 1), "bias": torch.randn(32)})
        check(x)
        check(torch.randn(4, 16, 9, 5).contiguous(memory_format=torch.channels_last))  # another shape
        check(torch.randn(4, 16, 9, 5))  # contiguous: unpacked
        check(x)
        twin = copy.deepcopy(layer)
        assert set(twin.state_dict()) == {"weight", "bias"}
        torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
        twin.weight.add_(1)  # the copy's own weight: the original keeps its packed one
        check(x)
        assert not torch.equal(twin(x), layer(x))
    with torch.inference_mode():  # a model made in inference mode: its weight has no version
        made = sparks_ext.fuse.OneDnnConv2d.from_conv2d(nn.Conv2d(16, 32, 1))
        made.weight.mul_(2)
        assert ops_called(made, x) == ["aten.conv2d"]
        torch.testing.assert_close(made(x), F.conv2d(x, made.weight, made.bias))


class _StridedShortcutBlock(nn.Module):
    """A binary conv whose residual is a 1x1 stride-2 real conv + BatchNorm (no avg-pool), groups
    optional, behind a stem with conv, BN, ReLU, max-pool."""

    def __init__(self, kind, groups):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        self.conv = _binary(kind, 8, 16, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, 2, groups=groups, bias=False), nn.BatchNorm2d(16))

    def forward(self, x):
        x = self.stem(x)
        return self.bn(self.conv(x)) + self.shortcut(x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_strided_shortcut_and_stem_deployed(kind, groups, batch, layout):
    torch.manual_seed(12)
    model = randomize(_StridedShortcutBlock(kind, groups))
    fused = sparks_ext.convert(model)
    assert isinstance(fused.get_submodule("shortcut.0"), sparks_ext.fuse.OneDnnConv2d)
    assert type(fused.get_submodule("stem.0")) is nn.Conv2d  # 3x3: aten picks oneDNN itself
    order = [n.target for n in fused.graph.nodes if n.op == "call_module"]
    assert order.index("stem.3") < order.index("stem.2")  # the ReLU runs on the pooled tensor
    x = torch.randn(batch, 3, 13, 11)  # odd: 13x11 -> pooled 7x6 -> strided 4x3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused(x)  # packs the shortcut's weight
    ops = ops_called(fused, x)
    shortcut = REAL_CONV_OP if layout == "channels_last" else "aten.conv2d"
    assert sorted(op for op in ops if op in (REAL_CONV_OP, "aten.conv2d")) == sorted(["aten.conv2d", shortcut])
    assert "batch_norm" not in " ".join(ops)
    pool = next(i for i, op in enumerate(ops) if op.startswith("aten.max_pool2d"))
    assert pool < ops.index("aten.relu_")
    with torch.no_grad():
        assert torch.equal(fused(x).argmax(1), model(x).argmax(1))
        got, expected = fused(x), model(x)
    scale = expected.abs().max().item()
    # float32, BN folded: rounding-sized; a flipped binarization would move a value by ~2 * scale
    assert (got - expected).abs().max().item() <= 1e-4 * scale
    unfused, fused64 = _fused64(model)
    _assert_close64(fused64(x.double()), unfused(x.double()))


@pytest.mark.parametrize("reads", ["output", "input"])
def test_relu_with_other_readers_stays_in_front_of_the_max_pool(reads):
    class TwoReaders(nn.Module):
        """The ReLU's output (or, for an in-place ReLU, its input) is read by another node."""

        def __init__(self):
            super().__init__()
            self.conv = _binary("sparks", 4, 4)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=reads == "input")
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            z = self.bn(self.conv(x))
            y = self.relu(z)
            return self.pool(y).sum() + (y if reads == "output" else z).sum()

    model = randomize(TwoReaders())
    fused = sparks_ext.convert(model)
    order = [n.target for n in fused.graph.nodes if n.op == "call_module"]
    assert order.index("relu") < order.index("pool")
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


# --- every model ---------------------------------------------------------------------------------

MODELS = {
    "resnet18-imagenet": (lambda conv: resnet18(conv=conv, n_codewords=32 if conv == "sparks" else None), (3, 64, 64)),
    "resnet18-cifar": (lambda conv: resnet18(num_classes=10, conv=conv, n_codewords=32 if conv == "sparks" else None,
                                             stem="cifar"), (3, 32, 32)),
    "smallcnn": (lambda conv: SmallCNN(conv=conv, n_codewords=32 if conv == "sparks" else None, width=16), (1, 8, 8)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_fused_against_unfused(name, kind):
    torch.manual_seed(5)
    build, shape = MODELS[name]
    model = randomize(build(kind))
    batch = 4 if name == "resnet18-imagenet" else 32
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        trained = model(x)
        fused = sparks_ext.convert(model)
        got = fused(x)
    # top-1 of the trained model (eval mode) on every input, as deployed (float32)
    assert torch.equal(got.argmax(1), trained.argmax(1))
    binary = [m for m in fused.modules() if is_fusable_conv(m)]
    assert len(binary) == 16 if name.startswith("resnet") else 4
    ops = ops_called(fused, x)
    assert ops.count("sparks.conv2d" if kind == "sparks" else "sparks.binary_conv2d") == len(binary)
    assert "batch_norm" not in " ".join(ops) and "prelu" not in " ".join(ops) and "sign" not in ops
    unfused, fused64 = _fused64(model)
    _assert_close64(fused64(x.double()), unfused(x.double()))


def test_digits_top1_and_bf16_deploy(digits):
    from tests.helpers.training import accuracy, fit

    data = digits
    torch.manual_seed(0)
    model = SmallCNN(conv="sparks", n_codewords=32, width=16, conv_kwargs=dict(sinkhorn_iters=5))
    fit(model, torch.optim.Adam(model.parameters(), lr=2e-2), data, epochs=2)
    x_test = data[2]
    with torch.no_grad():
        trained = model(x_test)
        fused = sparks_ext.convert(model)(x_test)
        bf16_model = sparks_ext.convert(model, dtype=torch.bfloat16)
        bf16 = bf16_model(x_test)
    assert torch.equal(fused.argmax(1), trained.argmax(1))  # 100% of the test set
    assert bf16.dtype == torch.bfloat16
    acc, acc_bf16 = accuracy(model, data), (bf16.argmax(1) == data[3]).float().mean().item()
    assert acc > 0.5
    # bf16 rounds activations (8 bits of mantissa) before each binarization: a few test images
    # may change class; the accuracy moves by at most a few of the 450 images.
    assert abs(acc_bf16 - acc) <= 0.02


def test_bf16_deploy_runs_binary_convs_in_bf16_channels_last():
    torch.manual_seed(6)
    model = randomize(resnet18(num_classes=10, conv="sparks", n_codewords=32, stem="cifar"))
    deployed = sparks_ext.convert(model, dtype=torch.bfloat16)
    seen = []

    def hook(module, args, output):
        x = args[0]
        seen.append(("binary" if is_fusable_conv(module) else type(module).__name__, x.dtype,
                     x.is_contiguous(memory_format=torch.channels_last), output.dtype))

    for m in deployed.modules():
        if is_fusable_conv(m) or isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    x = torch.randn(8, 3, 32, 32)  # float32 NCHW: the model casts it
    with torch.no_grad():
        out = deployed(x)
        ref = model(x)
    assert out.dtype == torch.bfloat16
    # the 1x1 shortcut convs deployed on oneDNN, the stem's conv as it was
    assert sorted(k for k, *_ in seen) == sorted(["binary"] * 16 + ["Conv2d"] + ["OneDnnConv2d"] * 3 + ["Linear"])
    assert all(d == torch.bfloat16 and o == torch.bfloat16 for _, d, _, o in seen)
    assert all(cl for k, _, cl, _ in seen if k != "Linear")  # convs read channels_last
    assert all(t.dtype == torch.bfloat16 for t in deployed.state_dict().values() if t.is_floating_point())
    # Not a rounding-sized difference (bf16 activations flip binarizations), but the same network:
    rel = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert rel < 0.5


# --- arguments, compile, export, save/load, summary ---------------------------------------------

def test_bad_arguments():
    model = SmallCNN(conv="sparks", n_codewords=32, width=8)
    with pytest.raises(ValueError, match="fuse must be True or False"):
        sparks_ext.convert(model, fuse="yes")
    with pytest.raises(ValueError, match="inplace must be True or False"):
        sparks_ext.convert(model, inplace=1)
    with pytest.raises(ValueError, match="dtype must be None or one of"):
        sparks_ext.convert(model, dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype must be None or one of"):
        sparks_ext.convert(model, dtype="bfloat16")
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        sparks_ext.convert(torch.zeros(3))


def test_inplace_keeps_the_callers_model_correct():
    torch.manual_seed(7)
    model = randomize(SmallCNN(conv="sparks", n_codewords=32, width=8))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        fused = sparks_ext.convert(model, inplace=True)
        # model now holds the (unfused) inference layers; the fused model copied what it rewrote
        assert isinstance(model.layers[0].conv1, CodebookConv2d) and model.layers[0].conv1.threshold is None
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(fused(x).argmax(1), expected.argmax(1))


def _small_fused(kind="sparks", dtype=None):
    torch.manual_seed(8)
    model = randomize(SmallCNN(conv=kind, n_codewords=32 if kind == "sparks" else None, width=16))
    return model, sparks_ext.convert(model, dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_model_compiles_and_exports(kind):
    _, fused = _small_fused(kind)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = fused(x)
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), expected)
        torch.compiler.reset()
        exported = torch.export.export(fused, (x,))
    op = "sparks.conv2d" if kind == "sparks" else "sparks.binary_conv2d"
    assert sum(op in str(n.target) for n in exported.graph.nodes) == 4
    with torch.no_grad():
        assert torch.equal(exported.module()(x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_model_with_a_real_shortcut_compiles_and_exports(kind):
    """The 1x1 shortcut's OneDnnConv2d under torch.compile(fullgraph=True) and torch.export, on
    the channels_last input that takes its packed path in eager mode."""
    torch.manual_seed(15)
    fused = sparks_ext.convert(randomize(_StridedShortcutBlock(kind, 1)))
    x = torch.randn(2, 3, 13, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = fused(x)
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, rtol=0, atol=F32_ULPS * expected.abs().max().item())
        torch.compiler.reset()
        exported = torch.export.export(fused, (x,))
        torch.testing.assert_close(exported.module()(x), expected, rtol=0,
                                   atol=F32_ULPS * expected.abs().max().item())


def test_fused_model_compiles_with_inductor():
    _, fused = _small_fused()
    x = torch.randn(2, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        compiled = torch.compile(fused, fullgraph=True)
        torch.testing.assert_close(compiled(x), fused(x), rtol=0, atol=F32_ULPS * fused(x).abs().max().item())
    torch.compiler.reset()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fused_model_save_load(tmp_path, dtype):
    from sparks_ext import serialization

    model, fused = _small_fused(dtype=dtype)
    path = tmp_path / "fused.spk"
    size = sparks_ext.save(fused, path)
    header = serialization.read_header(path)
    assert header["architecture"]["class"] == "torch.fx.GraphModule"
    assert header["architecture"]["modules"]["layers.1.shortcut.1"]["class"] == "sparks_ext.fuse.OneDnnConv2d"
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = fused(x)
        loaded = sparks_ext.load(path)  # the graph is rebuilt from the file, no model= needed
        assert torch.equal(loaded(x), expected)
        into = sparks_ext.load(path, SmallCNN(conv="sparks", n_codewords=32, width=16))
        assert torch.equal(into(x), expected)
    unfused_size = sparks_ext.save(sparks_ext.convert(model, fuse=False, dtype=dtype), tmp_path / "u.spk")
    assert size < unfused_size  # BatchNorms and RSign/RPReLU tensors folded away


def test_stored_graph_calls_only_listed_targets(tmp_path):
    import json
    import struct
    import zlib

    from sparks_ext import serialization

    _, fused = _small_fused()
    path = tmp_path / "fused.spk"
    sparks_ext.save(fused, path)
    data = path.read_bytes()
    magic, version, header_len, payload_len = struct.unpack_from("<8sIIQ", data)
    header = json.loads(zlib.decompress(data[24:24 + header_len]))
    for target, message in [("os.system", "not on the list of functions"),
                            ("builtins.eval", "not on the list of functions")]:
        bad = copy.deepcopy(header)
        node = next(n for n in bad["architecture"]["graph"] if n[1] == "call_method")
        node[1], node[2] = "call_function", target
        blob = zlib.compress(json.dumps(bad).encode())
        body = struct.pack("<8sIIQ", magic, version, len(blob), payload_len) + blob + data[24 + header_len:-4]
        path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
        with pytest.raises(ValueError, match=message):
            sparks_ext.load(path)
    bad = copy.deepcopy(header)
    next(n for n in bad["architecture"]["graph"] if n[1] == "call_method")[2] = "__reduce__"
    blob = zlib.compress(json.dumps(bad).encode())
    body = struct.pack("<8sIIQ", magic, version, len(blob), payload_len) + blob + data[24 + header_len:-4]
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(ValueError, match="not on the list of methods"):
        sparks_ext.load(path)
    assert serialization._graph_functions()  # the allow-list is data, never the file's names


def test_summary_of_fused_model():
    model, fused = _small_fused()
    s = sparks_ext.summary(fused, (1, 8, 8))
    unfused = sparks_ext.summary(sparks_ext.convert(model, fuse=False), (1, 8, 8))
    assert s.bops == unfused.bops and s.binary_weights == unfused.binary_weights
    assert not any(r.type == "BatchNorm2d" for r in s.rows)
    # Folded: each conv keeps scale, bias, threshold, PReLU slope and post-bias per channel
    assert s.real_params < unfused.real_params
    rows = {r.name: r for r in s.rows}
    assert rows["layers.0.conv1"].output_shape == (16, 8, 8)
    assert rows["layers.0.conv1"].real_params == 16 + 16 + 16 + 16 + 16
