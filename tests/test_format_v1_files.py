"""Files written by earlier code still load: tests/data holds format-1 files of every layer kind
(written once by tests/data/make_format_v1_files.py, never refreshed) with each model's output
on a recorded input, and what that code wrote when it saved the loaded model again."""
import json
from pathlib import Path

import pytest
import torch

import sparks_ext
from sparks_ext.models import SmallCNN
from sparks_ext.serialization import read_header

DATA = Path(__file__).resolve().parent / "data"
FILES = sorted(DATA.glob("format_v1_*.spk"))
KINDS = ("codebook", "xnor", "sparks", "signed", "expert", "small_cnn_sparks_fused",
         "small_cnn_binary_fused", "small_cnn_sparks_bfloat16")
# The trained architectures of the SmallCNN files, for load(path, model=...).
ARCHITECTURES = {"small_cnn_sparks_fused": dict(conv="sparks", n_codewords=16, width=8),
                 "small_cnn_binary_fused": dict(conv="binary", width=8),
                 "small_cnn_sparks_bfloat16": dict(conv="sparks", n_codewords=16, width=8)}


def _kind(path: Path) -> str:
    return path.stem.removeprefix("format_v1_")


@pytest.fixture(scope="module")
def recorded():
    return torch.load(DATA / "format_v1_outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def resaved():
    with open(DATA / "format_v1_resaved.json") as f:
        return json.load(f)


def test_every_layer_kind_has_a_file_and_an_output(recorded, resaved):
    assert sorted(map(_kind, FILES)) == sorted(KINDS)
    assert sorted(recorded) == sorted(KINDS) and sorted(resaved) == sorted(KINDS)


@pytest.mark.parametrize("path", FILES, ids=_kind)
def test_file_loads_and_gives_its_recorded_output(path, recorded, resaved, tmp_path):
    record = recorded[_kind(path)]
    model = sparks_ext.load(path, sha256=True)
    with torch.no_grad():
        assert torch.equal(model(record["input"]), record["output"])
    # Saved again, the loaded model is described exactly as the code that wrote the file
    # described it: the layers still write the header schema that earlier code wrote. (Compared
    # with that code's own re-save, not with the file: loading gives XnorConv2d weights the
    # default layout and a rebuilt graph's tensors its call order, which a re-save records.)
    again = tmp_path / "again.spk"
    sparks_ext.save(model, again)
    header, expected = read_header(again), resaved[_kind(path)]
    for field in expected:
        assert header[field] == expected[field], field
    assert sparks_ext.load(again).state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_file_loads_into_its_trained_architecture(kind, recorded):
    record = recorded[kind]
    model = sparks_ext.load(DATA / f"format_v1_{kind}.spk", SmallCNN(**ARCHITECTURES[kind]))
    with torch.no_grad():
        assert torch.equal(model(record["input"]), record["output"])
