"""Files written by earlier code still load: tests/data holds format-1 files of every layer kind
(written once by tests/data/make_format_v1_files.py, never refreshed) with each model's output
on a recorded input."""
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
# What the file's header records of the model (read_header adds sizes of its own).
HEADER_FIELDS = ("format", "version", "model", "architecture", "tensors", "deploy", "payload_sha256")
# The trained architectures of the SmallCNN files, for load(path, model=...).
ARCHITECTURES = {"small_cnn_sparks_fused": dict(conv="sparks", n_codewords=16, width=8),
                 "small_cnn_binary_fused": dict(conv="binary", width=8),
                 "small_cnn_sparks_bfloat16": dict(conv="sparks", n_codewords=16, width=8)}


def _kind(path: Path) -> str:
    return path.stem.removeprefix("format_v1_")


@pytest.fixture(scope="module")
def recorded():
    return torch.load(DATA / "format_v1_outputs.pt", weights_only=True)


def test_every_layer_kind_has_a_file_and_an_output(recorded):
    assert sorted(map(_kind, FILES)) == sorted(KINDS)
    assert sorted(recorded) == sorted(KINDS)


@pytest.mark.parametrize("path", FILES, ids=_kind)
def test_file_loads_and_gives_its_recorded_output(path, recorded, tmp_path):
    record = recorded[_kind(path)]
    model = sparks_ext.load(path, sha256=True)
    with torch.no_grad():
        assert torch.equal(model(record["input"]), record["output"])
    # Saved again, the loaded model is described exactly as the file describes it: the layers
    # still write the header schema that earlier code wrote, and loading kept every tensor's
    # dtype and layout. A rebuilt graph lists its tensors in call order, so the tensor table
    # (and the payload digest with it) may come in another order.
    again = tmp_path / "again.spk"
    sparks_ext.save(model, again)
    header, original = read_header(again), read_header(path)
    for field in HEADER_FIELDS:
        if field == "tensors":
            assert sorted(map(repr, header[field])) == sorted(map(repr, original[field]))
        elif field != "payload_sha256" or header["tensors"] == original["tensors"]:
            assert header[field] == original[field], field
    assert sparks_ext.load(again).state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_file_loads_into_its_trained_architecture(kind, recorded):
    record = recorded[kind]
    model = sparks_ext.load(DATA / f"format_v1_{kind}.spk", SmallCNN(**ARCHITECTURES[kind]))
    with torch.no_grad():
        assert torch.equal(model(record["input"]), record["output"])
