"""summary: per-layer shapes, parameter counts by precision, memory, BOPs / FLOPs / OPs."""
import math

import pytest
import torch
from torch import nn

import sparks_ext
from sparks_ext.nn import CodebookConv2d
from sparks_ext.summary import LayerSummary, Summary, binary_conv_bops, is_binary_layer


def _published_bops(c_in, c_out, k, h, w, n=None):
    """DESIGN.md section 3, written out for groups = 1."""
    if n is None:
        return c_out * c_in * k * k * h * w
    return min(n, c_out) * c_in * k * k * h * w + (n < c_out) * c_out * c_in * h * w / 2


@pytest.mark.parametrize("c_in,c_out,hw", [(64, 64, 56), (64, 128, 28), (256, 512, 7), (3, 16, 8)])
@pytest.mark.parametrize("n", [None, 16, 32, 64, 512])
def test_bops_formula(c_in, c_out, hw, n):
    assert binary_conv_bops(c_in, c_out, 3, 3, hw, hw, n) == _published_bops(c_in, c_out, 3, hw, hw, n)


def test_grouped_bops_count_responses_per_group():
    # depthwise: every input channel meets one output channel; a codebook cannot save work
    assert binary_conv_bops(32, 32, 3, 3, 10, 10, 16, groups=32) == 32 * 9 * 100
    assert binary_conv_bops(32, 32, 3, 3, 10, 10, None, groups=32) == 32 * 9 * 100
    # 2 groups of 32 -> 64 channels, n = 8 < 32 outputs per group
    assert binary_conv_bops(64, 64, 3, 3, 5, 5, 8, groups=2) == 64 * 8 * 9 * 25 + 64 * 32 * 25 / 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
        CodebookConv2d.from_conv2d(nn.Conv2d(16, 32, 3, stride=2, padding=1), 32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def test_rows_of_a_small_model():
    s = sparks_ext.summary(_model(), (1, 8, 8))
    assert isinstance(s, Summary) and all(isinstance(r, LayerSummary) for r in s.rows)
    assert [r.name for r in s.rows] == ["0", "1", "2", "3", "4", "5"]
    assert [r.type for r in s.rows] == ["Conv2d", "BatchNorm2d", "CodebookConv2d", "ReLU", "Flatten", "Linear"]
    assert [r.output_shape for r in s.rows] == [(16, 8, 8), (16, 8, 8), (32, 4, 4), (32, 4, 4), (512,), (10,)]
    stem, bn, sparks, _, _, fc = s.rows
    assert (stem.real_params, stem.flops, stem.bops) == (144, 144 * 64, 0)
    assert bn.real_params == 4 * 16 and bn.flops == 0  # weight, bias, running mean and var
    assert sparks.binary_weights == 32 * 16 * 9 and sparks.real_params == 32 + 32  # scale + bias
    assert sparks.bits_per_weight == pytest.approx(5 / 9) and sparks.n_codewords == 32
    assert sparks.codebook_bits == 32 * 9
    assert sparks.memory_bits == pytest.approx(32 * 16 * 5 + 32 * 9 + 64 * 32)
    assert sparks.bops == _published_bops(16, 32, 3, 4, 4, 32) and sparks.flops == 0
    assert fc.flops == 512 * 10 and fc.real_params == 5130
    assert s.bops == sparks.bops and s.flops == stem.flops + fc.flops
    assert s.ops == pytest.approx(s.bops / 64 + s.flops)
    assert s.binary_weights == 4608 and s.real_params == 144 + 64 + 64 + 5130
    assert s.float32_bytes == 4 * (s.binary_weights + s.real_params)
    assert s.memory_bytes == pytest.approx(sum(r.memory_bits for r in s.rows) / 8)
    assert s.compression_ratio == pytest.approx(s.float32_bytes / s.memory_bytes)
    assert s.binary_bits_per_weight == pytest.approx((4608 * 5 / 9 + 288) / 4608)
    assert s.totals()["bops"] == s.bops


def test_summary_counts_per_sample_and_restores_the_mode():
    model = _model().train()
    one = sparks_ext.summary(model, (1, 8, 8))
    many = sparks_ext.summary(model, (7, 1, 8, 8))
    assert model.training
    assert one.totals() == many.totals()
    assert [r.output_shape for r in one.rows] == [r.output_shape for r in many.rows]


def test_reused_module_counts_every_call():
    conv = CodebookConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding=1), 8)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(self.conv(x))

    s = sparks_ext.summary(Twice(), (4, 6, 6))
    assert len(s.rows) == 1 and s.rows[0].bops == 2 * _published_bops(4, 4, 3, 6, 6, 8)
    assert s.binary_weights == 4 * 4 * 9  # stored once


def test_printed_table():
    s = sparks_ext.summary(_model(), (1, 8, 8), name="tiny")
    text = str(s)
    lines = text.splitlines()
    assert lines[0] == "tiny summary, input (1, 8, 8), per sample"
    assert any(line.startswith("2 ") and "CodebookConv2d" in line and "32x4x4" in line and "0.56" in line
               for line in lines)
    assert any(line.startswith("Total") for line in lines)
    assert f"BOPs: {s.bops:.4g}" in text and f"OPs = BOPs/64 + FLOPs: {s.ops:.4g}" in text
    assert f"(compression {s.compression_ratio:.1f}x)" in text


def test_bad_input_size():
    with pytest.raises(ValueError, match="input_size"):
        sparks_ext.summary(_model(), (1, 0, 8))
    with pytest.raises(ValueError, match="input_size"):
        sparks_ext.summary(_model(), ())


def test_data_dependent_model_runs_for_real():
    class Gate(nn.Module):  # Python control flow on values: cannot run on the meta device
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)

        def forward(self, x):
            return self.conv(x) if x.abs().sum().item() >= 0 else x

    s = sparks_ext.summary(Gate(), (2, 5, 5))
    assert [(r.name, r.output_shape, r.flops) for r in s.rows] == [("conv", (3, 3, 3), 3 * 9 * 2 * 9)]


# --- The binary ResNet-18 of sparks_ext.models: the published BOPs ---------------------------

from sparks_ext.models import SmallCNN, resnet18  # noqa: E402


@pytest.mark.parametrize("kw,bops", [(dict(conv="binary"), 1.676e9),
                                     (dict(conv="sparks", n_codewords=64), 0.884e9),
                                     (dict(conv="sparks", n_codewords=32), 0.501e9),
                                     (dict(conv="sparks", n_codewords=16), 0.297e9)],
                         ids=["1-bit", "n64", "n32", "n16"])
def test_resnet18_reproduces_the_published_bops(kw, bops):
    s = sparks_ext.summary(resnet18(**kw), (3, 224, 224))
    assert round(s.bops / 1e9, 3) == pytest.approx(bops / 1e9)
    binary = [r for r in s.rows if r.binary_weights]
    assert len(binary) == 16 and s.binary_weights == 10_985_472  # 16 binary 3x3 convs
    # stem 7x7 conv + three 1x1 downsampling convs + classifier, in MACs (Bi-Real Net: 1.39e8)
    assert s.flops == 64 * 3 * 49 * 112 * 112 + 3 * 64 * 128 * 28 * 28 + 512 * 1000
    assert s.ops == pytest.approx(s.bops / 64 + s.flops)
    assert s.rows[-1].output_shape == (1000,)
    n = kw.get("n_codewords")
    bits = 1.0 if n is None else math.log2(n) / 9
    assert all(r.bits_per_weight == pytest.approx(bits) for r in binary)


def test_float_resnet18_has_no_bops():
    s = sparks_ext.summary(resnet18(conv="float"), (3, 224, 224))
    assert s.bops == 0 and s.binary_weights == 0
    assert s.flops == pytest.approx(1.814e9, rel=1e-3)  # the usual ResNet-18 MACs
    assert s.compression_ratio == pytest.approx(1.0)


@pytest.mark.parametrize("conv", ["sparks", "binary"])
def test_trained_and_converted_models_have_the_same_summary(conv):
    torch.manual_seed(0)
    model = SmallCNN(conv=conv, n_codewords=32 if conv == "sparks" else None)
    trained = sparks_ext.summary(model, (1, 8, 8))
    converted = sparks_ext.summary(sparks_ext.convert(model), (1, 8, 8))
    assert trained.totals() == converted.totals()
    assert [(r.name, r.output_shape, r.bops) for r in trained.rows] == \
        [(r.name, r.output_shape, r.bops) for r in converted.rows]


def test_every_stored_tensor_is_counted():
    """RSign keeps its threshold beside a child module, RPReLU reads shift_in's bias without
    calling it: both are stored, so both are counted."""
    model = SmallCNN(conv="sparks", n_codewords=32)
    s = sparks_ext.summary(model, (1, 8, 8))
    names = [r.name for r in s.rows]
    assert "layers.0.binarize1" in names and "layers.0.act1.shift_in" in names
    assert names.index("layers.0.act1.shift_in") == names.index("layers.0.bn1") + 1  # module order
    shift_in = s.rows[names.index("layers.0.act1.shift_in")]
    assert shift_in.output_shape is None and shift_in.real_params == 32
    # every floating tensor except the latent weights and selection state of the trainable
    # binary layers (not deployed: replaced by bits, indices and one scale per channel)
    binary = [m for m in model.modules() if is_binary_layer(m)]
    inside = {id(t) for m in binary for t in list(m.parameters()) + list(m.buffers())}
    real = sum(t.numel() for t in list(model.parameters()) + list(model.buffers())
               if t.is_floating_point() and id(t) not in inside)
    assert s.real_params == real + sum(m.out_channels for m in binary)
    line = next(x for x in str(s).splitlines() if x.startswith("layers.0.act1.shift_in "))
    assert line.split()[1:3] == ["LearnableBias", "-"]
