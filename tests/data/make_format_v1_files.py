"""Writes the format-1 files of tests/data that tests/test_format_v1_files.py loads.

The files were written once, by the code of the commit that added this script, and are kept as
they are: they are what earlier releases wrote, so a change to the layers or to the file format
that cannot read them fails that test. Rerun this script only to add a file, from a checkout
of that commit (``git show <commit>:tests/data/make_format_v1_files.py``); never to refresh
the files with newer code.

    PYTHONPATH=. python tests/data/make_format_v1_files.py    # from the repository root, built

Each file holds a small converted model of one layer kind; ``format_v1_outputs.pt`` holds an
input per file and the model's output on it (``torch.load(..., weights_only=True)`` reads it).
"""
from pathlib import Path

import torch
from torch import nn

import sparks_ext
from sparks_ext.models import SmallCNN
from sparks_ext.nn import (BinaryConv2d, CodebookConv2d, ExpertBinaryConv2d, SignedBinaryConv2d,
                           SparksConv2d)

HERE = Path(__file__).resolve().parent


def _randomise_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _train_selection(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """A few steps, so that learned selections and latent weights are not their initial ones."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()


def models():
    """(file stem, model to save, input, converted model whose output is recorded)."""
    torch.manual_seed(0)
    x8 = torch.randn(2, 8, 6, 6)

    conv = nn.Conv2d(8, 16, 3, padding=1)
    codebook = nn.Sequential(CodebookConv2d.from_conv2d(conv, 16, pad_value=1.0), nn.BatchNorm2d(16),
                             nn.Hardtanh())
    _randomise_batchnorm(codebook)
    yield "codebook", codebook.eval(), x8

    xnor = nn.Sequential(BinaryConv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=True), nn.ReLU())
    yield "xnor", xnor.eval(), x8

    sparks = nn.Sequential(SparksConv2d(8, 12, 3, n_codewords=8, padding=2, dilation=2, bias=True))
    _train_selection(sparks, x8)
    yield "sparks", sparks, x8

    signed = nn.Sequential(SignedBinaryConv2d(8, 8, 3, padding=1, threshold=0.3, region="kernel"),
                           SignedBinaryConv2d(8, 8, 3, padding=1, n_codewords=8, bias=True))
    _train_selection(signed, x8)
    yield "signed", signed, x8

    experts = nn.Sequential(ExpertBinaryConv2d(8, 8, 3, padding=1, n_experts=3),
                            ExpertBinaryConv2d(8, 8, 3, padding=1, n_experts=2, n_codewords=4,
                                               gate_activation="sigmoid", bias=True))
    _train_selection(experts, x8)
    yield "expert", experts, x8

    x1 = torch.randn(3, 1, 8, 8)
    for conv_type, n in (("sparks", 16), ("binary", None)):
        cnn = SmallCNN(conv=conv_type, n_codewords=n, width=8)
        _randomise_batchnorm(cnn)
        _train_selection(cnn, x1)
        _randomise_batchnorm(cnn)
        yield f"small_cnn_{conv_type}_fused", cnn.eval(), x1
    cnn = SmallCNN(conv="sparks", n_codewords=16, width=8)
    _randomise_batchnorm(cnn)
    yield "small_cnn_sparks_bfloat16", cnn.eval(), x1


def main() -> None:
    outputs = {}
    for stem, model, x in models():
        path = HERE / f"format_v1_{stem}.spk"
        dtype = torch.bfloat16 if stem.endswith("bfloat16") else None
        converted = sparks_ext.convert(model, fuse=stem.endswith(("fused", "bfloat16")), dtype=dtype)
        sparks_ext.save(converted, path)
        with torch.no_grad():
            outputs[stem] = {"input": x, "output": converted(x)}
            loaded = sparks_ext.load(path)
            assert torch.equal(loaded(x), outputs[stem]["output"]), stem
        print(f"{path.name}: {path.stat().st_size} bytes")
    torch.save(outputs, HERE / "format_v1_outputs.pt")


if __name__ == "__main__":
    main()
