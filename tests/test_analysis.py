"""Power-law analysis: codeword histograms, the fitted exponent, the rank/frequency plot."""
import sys

import pytest
import torch
from torch import nn

from sparks_ext import analysis
from sparks_ext.nn import CodebookConv2d
from tests.helpers.training import trained_small_cnn


def _ids(kernels):
    """Codeword ids computed tap by tap (tap t = i*kw + j is bit t, +1 = set)."""
    kh, kw = kernels.shape[-2:]
    ids = torch.zeros(kernels.shape[:-2], dtype=torch.long)
    for i in range(kh):
        for j in range(kw):
            ids += (kernels[..., i, j] >= 0).long() << (i * kw + j)
    return ids


def test_histogram_of_a_weight_tensor():
    w = -torch.ones(4, 1, 3, 3)
    w[:3] = 1           # three all-(+1) kernels: id 511
    w[3, 0, 0, 1] = 0.5  # one all-(-1) kernel but tap 1: id 2
    hist = analysis.codeword_histogram(w)["weight"]
    assert hist.shape == (512,) and hist.dtype == torch.int64
    assert hist[511] == 3 and hist[2] == 1 and hist.sum() == 4


def test_histogram_of_a_model_counts_decoded_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(CodebookConv2d.from_conv2d(nn.Conv2d(8, 16, 3), 16), nn.ReLU(),
                          CodebookConv2d.from_conv2d(nn.Conv2d(16, 4, (1, 2)), 3), nn.Conv2d(4, 4, 3))
    hists = analysis.codeword_histogram(model)
    assert list(hists) == ["0", "2"]  # the float conv is not a binary layer
    for name, layer in (("0", model[0]), ("2", model[2])):
        expected = torch.bincount(_ids(layer.codebook.float()[layer.indices.long()]).reshape(-1),
                                  minlength=2 ** layer.codebook[0].numel())
        assert torch.equal(hists[name], expected)
    assert hists["0"].shape == (512,) and hists["2"].shape == (4,)
    assert (hists["0"] > 0).sum() <= 16 and hists["0"].sum() == 16 * 8


def test_histogram_of_a_dict_and_errors():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    hists = analysis.codeword_histogram({"a": w, "b": w[:2]})
    assert torch.equal(hists["a"], torch.bincount(_ids(w).reshape(-1), minlength=512))
    assert hists["b"].sum() == 10
    with pytest.raises(ValueError, match="no binary layer"):
        analysis.codeword_histogram(nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match="kh\\*kw <= 16"):
        analysis.codeword_histogram(torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match="must be an nn.Module, a tensor or a dict"):
        analysis.codeword_histogram([w])


def test_power_law_exponent_recovers_a_zipf_law():
    ranks = torch.arange(1, 513, dtype=torch.float64)
    for s in (1.0, 1.7):
        counts = torch.round(1e9 * ranks ** -s).long()[torch.randperm(512)]
        assert analysis.power_law_exponent(counts) == pytest.approx(-s, abs=1e-3)
    uniform = torch.full((512,), 7)
    assert analysis.power_law_exponent(uniform) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least two"):
        analysis.power_law_exponent(torch.tensor([0, 5, 0]))


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    hists = analysis.codeword_histogram({f"layer{i}": torch.randn(32, 32, 3, 3) for i in range(20)})
    path = tmp_path / "power_law.png"
    fig = analysis.plot_rank_frequency(hists, path, max_layers=5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.get_lines()) == 5
    with pytest.raises(ValueError, match="empty"):
        analysis.plot_rank_frequency({})


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        analysis.plot_rank_frequency({"a": torch.ones(512, dtype=torch.long)})


def test_histograms_of_the_library_models():
    import sparks_ext
    sparks = trained_small_cnn("sparks", steps=1)
    hists = analysis.codeword_histogram(sparks)
    layers = [m for m in sparks.modules() if isinstance(m, sparks_ext.nn.SparksConv2d)]
    assert len(hists) == 4
    for (name, hist), layer in zip(hists.items(), layers):
        assert (hist > 0).sum() <= 32 and hist.sum() == layer.out_channels * layer.in_channels
        expected = torch.bincount(_ids(layer.codebook()[layer.indices()]).reshape(-1), minlength=512)
        assert torch.equal(hist, expected)
    binary = trained_small_cnn("binary", steps=1)
    trained = analysis.codeword_histogram(binary)
    converted = analysis.codeword_histogram(sparks_ext.convert(binary))  # XnorConv2d: bool weights
    assert list(trained) == list(converted)
    for name, layer in binary.named_modules():
        if isinstance(layer, sparks_ext.nn.BinaryConv2d):
            expected = torch.bincount(_ids(layer.weight.detach()).reshape(-1), minlength=512)
            assert torch.equal(trained[name], expected) and torch.equal(converted[name], expected)
