"""The loader refuses every malformed file with a ValueError saying what is wrong, in memory and
time proportional to the file, and returns models in eval mode; files can be checked against a
SHA-256 of their payload.

The malformed files have valid framing and checksums (a crafted file, not a damaged one): the
header is edited and the CRC recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import pytest
import torch
from torch import nn

import sparks_ext
from sparks_ext import serialization
from sparks_ext.nn import CodebookConv2d

PREAMBLE = 24
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split(data: bytes):
    _, _, hlen, plen = struct.unpack_from("<8sIIQ", data)
    return data[PREAMBLE:PREAMBLE + hlen], data[PREAMBLE + hlen:PREAMBLE + hlen + plen]


def _frame(header_bytes: bytes, payload: bytes) -> bytes:
    body = struct.pack("<8sIIQ", b"SPARKSX\x00", 1, len(header_bytes), len(payload)) + header_bytes + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _write(path, header=None, payload=b"", header_text=None):
    """A file with a valid frame and checksum around `header` (a dict, or raw JSON text)."""
    text = header_text if header_text is not None else json.dumps(header)
    path.write_bytes(_frame(zlib.compress(text.encode()), payload))


def _codebook_model():
    torch.manual_seed(0)
    return nn.Sequential(CodebookConv2d.from_conv2d(nn.Conv2d(8, 8, 3, padding=1), 4),
                         nn.BatchNorm2d(8)).eval()


def _saved(tmp_path, model=None):
    path = tmp_path / "m.spk"
    sparks_ext.save(_codebook_model() if model is None else model, path)
    header_bytes, payload = _split(path.read_bytes())
    return path, json.loads(zlib.decompress(header_bytes)), payload


def _edited(tmp_path, edit, model=None):
    path, header, payload = _saved(tmp_path, model)
    edit(header)
    _write(path, header, payload)
    return path


def _entry(header, name):
    return next(e for e in header["tensors"] if e[0] == name)


# --- Exceptions other than ValueError once escaped -----------------------------------------------

MALFORMED_ENTRIES = [
    ("a tensor name that is a list", lambda e: e.__setitem__(0, ["0", "codebook"]), "the name is not a string"),
    ("a float byte count", lambda e: e.__setitem__(4, float(e[4])), "the byte count is not an int"),
    ("a bool byte count", lambda e: e.__setitem__(4, True), "the byte count is not an int"),
    ("a negative dimension", lambda e: e.__setitem__(3, [-4, 3, 3]), "the shape must be"),
    ("a float dimension", lambda e: e.__setitem__(3, [4.0, 3, 3]), "the shape must be"),
    ("a dimension past int64", lambda e: e.__setitem__(3, [2 ** 63, 1, 1]), "the shape must be"),
    ("an unhashable encoding", lambda e: e.__setitem__(1, ["pm1"]), "unknown encoding"),
    ("an unknown dtype", lambda e: e.__setitem__(2, "complex64"), "unknown dtype"),
    ("five fields", lambda e: e.pop(), "not a list of 6 fields"),
]


@pytest.mark.parametrize("what,edit,message", MALFORMED_ENTRIES, ids=[m[0] for m in MALFORMED_ENTRIES])
def test_malformed_tensor_entries(tmp_path, what, edit, message):
    path = _edited(tmp_path, lambda h: edit(_entry(h, "0.codebook")))
    with pytest.raises(ValueError, match=message):
        sparks_ext.load(path)


def test_shape_of_infinity(tmp_path):
    # Once: OverflowError (int(inf)). JSON's Infinity / NaN are refused while parsing.
    path, header, payload = _saved(tmp_path)
    text = json.dumps(header).replace('[4, 3, 3]', '[Infinity]', 1)
    assert "Infinity" in text
    _write(path, header_text=text, payload=payload)
    with pytest.raises(ValueError, match="unreadable header .*Infinity is not a number"):
        sparks_ext.load(path)


def test_deeply_nested_header(tmp_path):
    # Once: RecursionError.
    path = tmp_path / "m.spk"
    _write(path, header_text='{"tensors": [], "architecture": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nested too deeply"):
        sparks_ext.load(path)
    deep = spec = {"class": "torch.nn.Sequential", "children": []}
    for _ in range(200):  # within JSON's limits, past the architecture's
        child = {"class": "torch.nn.Sequential", "children": []}
        spec["children"].append(["0", child])
        spec = child
    _write(path, {"tensors": [], "architecture": deep})
    with pytest.raises(ValueError, match="nested deeper than 64"):
        sparks_ext.load(path)


@pytest.mark.parametrize("config,error", [
    ({"in_features": -5, "out_features": 3}, "RuntimeError"),
    ({"in_features": 2 ** 70, "out_features": 3}, ""),
    ({"in_features": "four", "out_features": 3}, "TypeError"),
    ({"in_features": 4}, "TypeError"),
])
def test_constructor_errors_are_value_errors(tmp_path, config, error):
    path = tmp_path / "m.spk"
    _write(path, {"tensors": [], "architecture": {"class": "torch.nn.Linear", "config": config}})
    with pytest.raises(ValueError, match=f"cannot rebuild its architecture \\({error}"):
        sparks_ext.load(path)


@pytest.mark.parametrize("spec", [
    {"class": "torch.nn.Linear"},
    {"class": "torch.nn.Linear", "config": {"in_features": {"a": 1}}},
    {"class": "torch.nn.Sequential", "children": [["0"]]},
    {"class": "torch.nn.Sequential", "children": [[0, {"class": "torch.nn.ReLU", "config": {}}]]},
    {"class": ["torch.nn.ReLU"], "config": {}},
    ["torch.nn.ReLU"],
])
def test_malformed_architecture(tmp_path, spec):
    path = tmp_path / "m.spk"
    _write(path, {"tensors": [], "architecture": spec})
    with pytest.raises(ValueError, match="malformed architecture"):
        sparks_ext.load(path)


# --- Memory: bounded header, sizes checked before anything is built for real ---------------------

def _peak_mb_of_load(path) -> tuple[str, float]:
    """Loads `path` in a child process; returns (error message, extra peak RSS in MB)."""
    code = textwrap.dedent(f"""
        import resource, sparks_ext
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            sparks_ext.load({str(path)!r})
            message = "loaded"
        except ValueError as e:
            message = "ValueError: " + str(e)[:300]
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        print(message)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    peak, message = out.stdout.split("\n", 1)
    return message.strip(), float(peak)


def test_zlib_bomb_header(tmp_path):
    # Once: a 2 MB header inflated to 2.3 GB before failing. Now inflation stops at 16 MiB.
    path = tmp_path / "bomb.spk"
    deflate = zlib.compressobj(9)
    spaces = b" " * (1 << 20)
    bomb = deflate.compress(b'{"tensors": [') + b"".join(deflate.compress(spaces) for _ in range(64))
    bomb += deflate.compress(b"]}") + deflate.flush()  # 64 MiB of JSON in about 65 KB
    path.write_bytes(_frame(bomb, b""))
    message, peak = _peak_mb_of_load(path)
    assert "inflates past 16777216 bytes" in message
    assert peak < 200, f"{peak} MB"


def test_architecture_far_larger_than_the_file(tmp_path):
    # Once: a 2.7 KB file naming 80 Linear(4096, 4096) reached 3.7 GB, and Linear(30000, 30000)
    # spent 7 s in random initialisation before the size check. Now built on the meta device and
    # checked against the file's tensors first.
    path = tmp_path / "m.spk"
    linear = {"class": "torch.nn.Linear", "config": {"in_features": 4096, "out_features": 4096, "bias": True}}
    _write(path, {"tensors": [], "architecture": {"class": "torch.nn.Sequential",
                                                  "children": [[str(i), linear] for i in range(80)]}})
    assert path.stat().st_size < 3000
    message, peak = _peak_mb_of_load(path)
    assert "does not match the model: missing tensors ['0.weight'" in message
    assert peak < 200, f"{peak} MB"
    _write(path, {"tensors": [], "architecture": {"class": "torch.nn.Linear",
                                                  "config": {"in_features": 30000, "out_features": 30000}}})
    start = time.perf_counter()
    with pytest.raises(ValueError, match="does not match the model"):
        sparks_ext.load(path)
    assert time.perf_counter() - start < 2


def test_loaded_modules_are_not_randomly_initialised(tmp_path, monkeypatch):
    path = tmp_path / "m.spk"
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32)).eval()
    sparks_ext.save(model, path)

    def forbidden(tensor, *args, **kwargs):  # on the meta device an init costs nothing
        if not tensor.is_meta:
            raise AssertionError("random initialisation on load")
        return tensor

    monkeypatch.setattr(nn.init, "kaiming_uniform_", forbidden)
    monkeypatch.setattr(nn.init, "uniform_", forbidden)
    loaded = sparks_ext.load(path)
    assert all(not t.is_meta for t in loaded.state_dict().values())
    assert torch.equal(loaded[0].weight, model[0].weight) and loaded[0].weight.requires_grad


def test_modules_with_buffers_outside_the_state_dict_are_rebuilt(tmp_path):
    # ExpertCodebookConv2d counts expert usage in a buffer that is not saved: the meta-built
    # module cannot take it from the file, so it is built for real once the file matches it.
    torch.manual_seed(0)
    layer = sparks_ext.nn.ExpertCodebookConv2d(4, 4, 3, n_codewords=4, padding=1).eval()
    assert "usage" not in layer.state_dict()
    path = tmp_path / "m.spk"
    sparks_ext.save(nn.Sequential(layer), path)
    loaded = sparks_ext.load(path)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(loaded(x), layer(x))


# --- Values the ops would refuse at the first forward --------------------------------------------

def test_duplicate_tensor_entry(tmp_path):
    path, header, payload = _saved(tmp_path)
    first = header["tensors"][0]
    header["tensors"].append(list(first))
    _write(path, header, payload + payload[:first[4]])
    with pytest.raises(ValueError, match=f"tensor '{first[0]}' is listed twice"):
        sparks_ext.load(path)


def test_indices_beyond_the_codebook(tmp_path):
    # The index entry says 4 codewords (2 bits: 3 fits), the stored codebook has 3 rows.
    model = _codebook_model()
    model[0].indices.fill_(3)
    path, header, payload = _saved(tmp_path, model)
    codebook = _entry(header, "0.codebook")
    assert codebook[1] == "pm1" and codebook[3] == [4, 3, 3]
    codebook[3], codebook[4] = [3, 3, 3], 4  # ceil(27 / 8): the same first 4 bytes
    payload = payload[:codebook[4]] + payload[5:]
    layer = header["architecture"]["children"][0][1]["config"]
    assert layer["n_codewords"] == 4
    layer["n_codewords"] = 3
    _write(path, header, payload)
    with pytest.raises(ValueError, match=r"'0.indices' has indices outside \[0, 3\)"):
        sparks_ext.load(path)


def test_codebook_values_outside_minus_one_zero_one(tmp_path):
    model = _codebook_model()
    model[0].codebook = model[0].codebook.float()
    path = tmp_path / "m.spk"
    sparks_ext.save(model, path)
    header_bytes, payload = _split(path.read_bytes())
    header = json.loads(zlib.decompress(header_bytes))
    entry = _entry(header, "0.codebook")
    assert entry[1] == "raw" and entry[2] == "float32"
    offset = sum(e[4] for e in header["tensors"][:header["tensors"].index(entry)])
    payload = payload[:offset] + struct.pack("<f", 2.0) + payload[offset + 4:]
    _write(path, header, payload)
    with pytest.raises(ValueError, match=r"'0.codebook' has entries outside \{-1, 0, \+1\}"):
        sparks_ext.load(path, model)


# --- Integrity -----------------------------------------------------------------------------------

def test_sha256_of_the_payload(tmp_path):
    path, header, payload = _saved(tmp_path)
    digest = hashlib.sha256(payload).hexdigest()
    assert serialization.read_header(path)["payload_sha256"] == digest
    assert isinstance(sparks_ext.load(path, sha256=True), nn.Sequential)
    assert isinstance(sparks_ext.load(path, sha256=digest.upper()), nn.Sequential)
    # A payload edited with the CRC recomputed: the CRC cannot tell, the digests can.
    tampered = bytearray(payload)
    tampered[-1] ^= 0x01  # BatchNorm's last running-variance byte: a valid, different file
    _write(path, header, bytes(tampered))
    sparks_ext.load(path)
    with pytest.raises(ValueError, match="fails its SHA-256 check"):
        sparks_ext.load(path, sha256=True)
    with pytest.raises(ValueError, match="fails its SHA-256 check"):
        sparks_ext.load(path, sha256=digest)
    with pytest.raises(ValueError, match="sha256 must be True or a hex SHA-256 digest"):
        sparks_ext.load(path, sha256="abc")
    del header["payload_sha256"]
    _write(path, header, payload)
    with pytest.raises(ValueError, match="records no payload SHA-256"):
        sparks_ext.load(path, sha256=True)
    assert isinstance(sparks_ext.load(path, sha256=digest), nn.Sequential)


# --- Eval mode -----------------------------------------------------------------------------------

def test_load_into_a_model_returns_it_in_eval_mode(tmp_path):
    model = _codebook_model()
    model[1].running_mean.uniform_(-1, 1)
    path = tmp_path / "m.spk"
    sparks_ext.save(model, path)
    fresh = _codebook_model().train()
    loaded = sparks_ext.load(path, fresh)
    assert loaded is fresh and not any(m.training for m in loaded.modules())
    x = torch.randn(4, 8, 6, 6)
    stats = loaded[1].running_mean.clone()
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[1].running_mean, stats)  # BatchNorm statistics untouched
    assert not sparks_ext.load(path).training


def _buffers(**tensors):
    module = nn.Module()
    for name, t in tensors.items():
        module.register_buffer(name, t)
    return module


def test_raw_bool_bytes_load_as_bools(tmp_path):
    # A crafted raw bool tensor may hold any byte: it loads as a proper bool (nonzero is True).
    path = tmp_path / "m.spk"
    _write(path, {"tensors": [["mask", "raw", "bool", [4], 4, None]]}, bytes([0, 1, 2, 255]))
    loaded = sparks_ext.load(path, _buffers(mask=torch.zeros(4, dtype=torch.bool)))
    assert loaded.mask.view(torch.uint8).tolist() == [0, 1, 1, 1]


def test_uint8_codebook_entries_are_compared_as_numbers(tmp_path):
    path = tmp_path / "m.spk"
    _write(path, {"tensors": [["codebook", "raw", "uint8", [1, 1, 2], 2, None]]}, bytes([1, 255]))
    with pytest.raises(ValueError, match=r"'codebook' has entries outside \{-1, 0, \+1\}"):
        sparks_ext.load(path, _buffers(codebook=torch.zeros(1, 1, 2, dtype=torch.uint8)))
