"""summary: per-layer shapes, parameter counts by precision, memory, BOPs / FLOPs / OPs."""
import math

import pytest
import torch
from torch import nn

import sparks_ext
from sparks_ext.nn import CodebookConv2d
from sparks_ext.summary import LayerSummary, Summary, binary_conv_bops, is_binary_layer


def _published_bops(c_in, c_out, k, h, w, n=None):
    """docs/design.md, section 7, written out for groups = 1."""
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


@pytest.mark.parametrize("input_size, says", [
    ((3, 8, 8), r"input_size \(3, 8, 8\) does not fit the model: .*3 channels.*takes 1 input channel"),
    ((8, 8), r"must be a shape \(C, H, W\) or \(N, C, H, W\) of ints, got \(8, 8\)"),
    (8, r"must be a shape .* got 8;"),
    ((1, 8.0, 8), r"must be a shape .* of ints"),
])
def test_input_size_that_does_not_fit_says_what_the_model_takes(input_size, says):
    from sparks_ext.models import SmallCNN

    with pytest.raises(ValueError, match=says) as error:
        sparks_ext.summary(SmallCNN(conv="sparks", n_codewords=32), input_size)
    assert "stem.0 (Conv2d), takes 1 input channel: input_size (1, H, W) or (N, 1, H, W)" in str(error.value)


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
    converted = sparks_ext.summary(sparks_ext.convert(model, fuse=False), (1, 8, 8))
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


# --- Signed-binary layers: density and effectual weights; expert layers: every expert --------

from sparks_ext.nn import (ExpertBinaryConv2d, ExpertCodebookConv2d, SignedBinaryConv2d,  # noqa: E402
                           SignedCodebookConv2d)


def _signed_expert_model():
    """A signed layer whose quantization is known by hand, then a 4-expert layer sharing a
    Sparks codebook of 4 codewords."""
    torch.manual_seed(0)
    signed = SignedBinaryConv2d(1, 2, 3, padding=1, threshold=0.5)
    with torch.no_grad():
        signed.weight.zero_()
        # channel 0: s = +1, mean|W| = 3/9, delta = 1/6: the 3 ones are kept
        signed.weight[0, 0, 0] = 1.0
        # channel 1: s = -1, mean|W| = 6/9, delta = 1/3: the 6 minus-ones are kept
        signed.weight[1, 0, :2] = -1.0
    expert = ExpertBinaryConv2d(2, 3, 3, padding=1, n_experts=4, n_codewords=4)
    return nn.Sequential(signed, nn.BatchNorm2d(2), expert, nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def test_signed_and_expert_rows_by_hand():
    model = _signed_expert_model()
    assert model[0].density == 0.5
    s = sparks_ext.summary(model, (1, 4, 4))
    signed, bn, expert, _, fc = s.rows
    # signed: 2 x 1 x 9 = 18 weights, 9 non-zero; 2 distinct kernels -> a ternary codebook of 2
    # codewords (2 bits per tap), indices at log2(2)/9 bits per weight, one scale per channel
    assert (signed.binary_weights, signed.effectual_weights, signed.density) == (18, 9, 0.5)
    assert signed.n_codewords == 2 and signed.bits_per_weight == pytest.approx(1 / 9)
    assert signed.codebook_bits == 2 * 9 * 2 and signed.real_params == 2
    assert signed.memory_bits == pytest.approx(18 / 9 + 36 + 2 * 32)
    assert signed.bops == 1 * 2 * 9 * 16 and signed.flops == 0  # min(n, C_out) = 2, no gather
    assert signed.n_experts == 1
    # expert: 4 experts x 3 x 2 x 9 = 216 weights (all non-zero), one shared codebook of 4,
    # 4 x 3 scales and the gate Linear(2, 4): 8 + 4
    assert (expert.binary_weights, expert.effectual_weights, expert.density) == (216, 216, 1.0)
    assert expert.n_experts == 4 and expert.n_codewords == 4
    assert expert.bits_per_weight == pytest.approx(2 / 9) and expert.codebook_bits == 36
    assert expert.real_params == 12 + 12
    assert expert.memory_bits == pytest.approx(216 * 2 / 9 + 36 + 24 * 32)
    # per sample: one expert runs (C_in 2, C_out 3, n = 4 >= 3: no gather), gate 2 x 4 MACs
    assert expert.bops == 2 * 3 * 9 * 16 and expert.flops == 2 * 4
    assert (bn.density, fc.density, bn.effectual_weights) == (None, None, 0)
    t = s.totals()
    assert (t["binary_weights"], t["effectual_weights"]) == (234, 225)
    assert t["density"] == pytest.approx(225 / 234)
    assert t["real_params"] == 2 + 4 * 2 + 24 + 48 * 5 + 5
    assert t["bops"] == 288 + 864 and t["flops"] == 8 + 240
    assert t["float32_bytes"] == 4 * (234 + 279)
    assert t["memory_bytes"] == pytest.approx(sum(r.memory_bits for r in s.rows) / 8)


def test_table_shows_density_and_experts():
    s = sparks_ext.summary(_signed_expert_model(), (1, 4, 4), name="tiny")
    lines = str(s).splitlines()
    header = lines[2].split()
    assert header[header.index("Bits/w") + 1] == "Density"
    signed = next(line.split() for line in lines if line.startswith("0 "))
    assert signed[1] == "SignedBinaryConv2d" and signed[5:7] == ["0.11", "50.0%"]
    expert = next(line.split() for line in lines if line.startswith("2 "))
    assert expert[3] == "216" and expert[6] == "100.0%"
    total = next(line.split() for line in lines if line.startswith("Total"))
    assert total[1:4] == ["234", "279", f"{100 * 225 / 234:.1f}%"]
    assert "Effectual binary weights (non-zero): 225 of 234 (density 96.2%)" in lines
    assert any(line.startswith("Expert layers 2 (4 experts):") and "winner-take-all" in line
               for line in lines)
    # a model without zeros has no Density column, but still the effectual line; no expert line
    plain = str(sparks_ext.summary(_model(), (1, 8, 8)))
    assert "Density" not in plain.splitlines()[2] and "Expert layers" not in plain
    assert "Effectual binary weights (non-zero): 4,608 of 4,608 (density 100.0%)" in plain
    assert "Effectual" not in str(sparks_ext.summary(nn.Conv2d(1, 2, 3), (1, 4, 4)))


def test_summary_leaves_expert_usage_alone():
    model = _signed_expert_model()
    sparks_ext.summary(model, (1, 4, 4))
    assert model[2].usage.sum() == 0
    deployed = sparks_ext.convert(model)
    sparks_ext.summary(deployed, (1, 4, 4))
    assert deployed[2].usage.sum() == 0


def _signed_model(region, n_codewords, expert_codewords, groups):
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
        SignedBinaryConv2d(8, 8, 3, padding=1, threshold=0.6, region=region, n_codewords=n_codewords),
        nn.BatchNorm2d(8), nn.ReLU(),
        ExpertBinaryConv2d(8, 16, 3, stride=2, padding=1, groups=groups, n_experts=3,
                           n_codewords=expert_codewords, bias=True),
        SignedBinaryConv2d(16, 16, 3, padding=1, groups=groups, threshold=0.3, bias=True),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


@pytest.mark.parametrize("region,n_codewords,expert_codewords,groups",
                         [("channel", None, None, 1), ("kernel", 16, 8, 2), ("channel", 8, 32, 1)])
def test_trained_and_converted_signed_and_expert_models_have_the_same_summary(
        region, n_codewords, expert_codewords, groups):
    model = _signed_model(region, n_codewords, expert_codewords, groups)
    trained = sparks_ext.summary(model, (1, 8, 8))
    deployed = sparks_ext.convert(model)
    assert isinstance(deployed[2], SignedCodebookConv2d) and isinstance(deployed[5], ExpertCodebookConv2d)
    converted = sparks_ext.summary(deployed, (1, 8, 8))
    assert trained.totals() == converted.totals()
    fields = ("name", "output_shape", "binary_weights", "effectual_weights", "bits_per_weight",
              "n_codewords", "codebook_bits", "real_params", "memory_bits", "bops", "flops", "n_experts")
    assert [tuple(getattr(r, f) for f in fields) for r in trained.rows] == \
        [tuple(getattr(r, f) for f in fields) for r in converted.rows]
    strip = {"SignedBinaryConv2d": "SignedCodebookConv2d", "ExpertBinaryConv2d": "ExpertCodebookConv2d"}
    text = str(trained)
    for a, b in strip.items():
        text = text.replace(a, b)
    words = lambda t: [line.split() for line in t.splitlines()[1:] if not line.startswith("---")]  # noqa: E731
    assert words(text) == words(str(converted))  # the same table (columns as wide as the types)

    signed, expert, last = trained.rows[2], trained.rows[5], trained.rows[6]
    assert signed.density == pytest.approx(model[2].density) == pytest.approx(deployed[2].density)
    assert last.density == pytest.approx(model[6].density) and last.density < 1
    assert signed.effectual_weights == int(model[2].quantized_weight().count_nonzero())
    assert trained.effectual_weights == sum(r.effectual_weights for r in trained.rows)
    # every expert's kernels are stored, one expert's work is counted per sample
    assert expert.binary_weights == 3 * 16 * (8 // groups) * 9 == deployed[5].indices.numel() * 9
    assert expert.effectual_weights == expert.binary_weights
    assert expert.real_params == 3 * 16 * 2 + (8 * 3 + 3)  # scales, biases, gate
    assert expert.flops == 8 * 3
    assert expert.bops == binary_conv_bops(8, 16, 3, 3, 4, 4, deployed[5].n_codewords, groups)
    assert deployed[5].n_codewords == (expert_codewords or deployed[5].codebook.shape[0])
    assert "Density" in text.splitlines()[2]
