"""The compact file format: exact round trips, sizes at the theoretical bound, no pickle, and
clear errors for truncated, corrupted and mismatched files."""
import io
import json
import math
import pickle
import struct
import zlib

import pytest
import torch
from torch import nn

import sparks_ext
from sparks_ext import serialization
from sparks_ext.nn import CodebookConv2d
from tests.helpers.training import trained_small_cnn

PREAMBLE, CRC = 24, 4  # magic + version + header_len + payload_len; crc32


def _codebook_layer(c_in, c_out, n, seed, **kw):
    torch.manual_seed(seed)
    return CodebookConv2d.from_conv2d(nn.Conv2d(c_in, c_out, 3, padding=1, **kw), n)


def _model(n=32, device="cpu"):
    """A small digits-sized network: float stem, two codebook convs, float head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32),
        _codebook_layer(32, 64, n, 1), nn.BatchNorm2d(64), nn.Hardtanh(),
        _codebook_layer(64, 64, n, 2, bias=False), nn.BatchNorm2d(64), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return model.eval().to(device)


def _theoretical_bytes(model):
    """Bits a 0.56-bit model needs, counted from its structure: log2(n) bits per kernel index,
    one bit per codebook entry, every other tensor at its dtype's width."""
    bits = 0
    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if isinstance(module, CodebookConv2d) and name == "indices":
                bits += t.numel() * math.log2(module.n_codewords)
            elif isinstance(module, CodebookConv2d) and name == "codebook":
                bits += t.numel()
            else:
                bits += 8 * t.numel() * t.element_size()
    return bits / 8


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].cpu(), sb[k].cpu()), k


def test_round_trip_is_exact_and_rebuilds_the_architecture(tmp_path):
    model = _model()
    path = tmp_path / "model.spk"
    size = sparks_ext.save(model, path)
    assert size == path.stat().st_size
    loaded = sparks_ext.load(path)
    assert isinstance(loaded, nn.Sequential) and not loaded.training
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert loaded[5].bias is None and loaded[2].n_codewords == 32
    _assert_same_state(model, loaded)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_load_into_a_given_architecture(tmp_path):
    path = tmp_path / "model.spk"
    model = _model()
    sparks_ext.save(model, path)
    fresh = _model()
    for t in fresh.state_dict().values():
        t.zero_()
    out = sparks_ext.load(path, fresh)
    assert out is fresh
    _assert_same_state(model, fresh)


@pytest.mark.parametrize("n", [32, 16, 64])
def test_file_size_is_the_theoretical_size_plus_a_small_header(tmp_path, n):
    model = _model(n)
    path = tmp_path / "model.spk"
    size = sparks_ext.save(model, path)
    header = serialization.read_header(path)
    theoretical = _theoretical_bytes(model)
    n_tensors = len(model.state_dict())
    # Each tensor is rounded up to whole bytes; the rest is the framing and the header.
    assert theoretical <= size <= theoretical + PREAMBLE + CRC + header["header_bytes"] + n_tensors
    assert header["header_bytes"] < 1024
    indices = [e for e in header["tensors"] if e[0].endswith("indices")]
    assert [e[1] for e in indices] == ["index", "index"]
    assert indices[0][4] == math.ceil(64 * 32 * math.log2(n) / 8)
    # torch.save of the same state dict stores indices as uint8 (8 bits) and codebooks as int8.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert size < buffer.tell()


def test_indices_use_ceil_log2_n_bits(tmp_path):
    model = nn.Sequential(_codebook_layer(8, 8, 5, 0))  # 5 codewords -> 3 bits per index
    path = tmp_path / "m.spk"
    sparks_ext.save(model, path)
    entry = {e[0]: e for e in serialization.read_header(path)["tensors"]}
    assert entry["0.indices"][1:] == ["index", "uint8", [8, 8], math.ceil(64 * 3 / 8), 5]
    assert entry["0.codebook"][1] == "pm1" and entry["0.codebook"][4] == math.ceil(5 * 9 / 8)
    _assert_same_state(model, sparks_ext.load(path))


class _MaskedBinary(nn.Module):
    """Not a library layer: a ternary codebook, a bool weight and an int64 counter."""

    def __init__(self):
        super().__init__()
        self.register_buffer("codebook", torch.tensor([[[1, 0, -1], [0, 0, 1], [-1, -1, 0]]] * 3, dtype=torch.int8))
        self.register_buffer("indices", torch.tensor([[0, 2], [1, 1], [2, 0]], dtype=torch.int32))
        self.register_buffer("weight", torch.rand(4, 3, 3, 3) > 0.5)
        self.register_buffer("steps", torch.tensor(123456789012, dtype=torch.int64))
        self.scale = nn.Parameter(torch.randn(4, dtype=torch.float64))
        self.low = nn.Parameter(torch.randn(3, dtype=torch.bfloat16))

    def forward(self, x):
        return x


def test_ternary_bool_and_other_dtypes_round_trip(tmp_path):
    model = _MaskedBinary()
    path = tmp_path / "m.spk"
    sparks_ext.save(model, path)
    encodings = {e[0]: e[1] for e in serialization.read_header(path)["tensors"]}
    assert encodings == {"codebook": "ternary", "indices": "index", "weight": "bits", "steps": "raw",
                         "scale": "raw", "low": "raw"}
    with pytest.raises(ValueError, match="pass model="):
        sparks_ext.load(path)  # a custom class: its architecture cannot be rebuilt from the file
    fresh = _MaskedBinary()
    _assert_same_state(model, sparks_ext.load(path, fresh))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = tmp_path / "m.spk"
    model = _model()
    sparks_ext.save(model, path)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    _assert_same_state(model, sparks_ext.load(path))


def _rewrite(path, edit_header=None, payload=None):
    """Rewrites a file with an edited header and/or payload and a valid checksum."""
    data = path.read_bytes()
    magic, version, hlen, plen = struct.unpack_from("<8sIIQ", data)
    header = json.loads(zlib.decompress(data[PREAMBLE:PREAMBLE + hlen]))
    payload = data[PREAMBLE + hlen:PREAMBLE + hlen + plen] if payload is None else payload
    if edit_header:
        edit_header(header)
    hbytes = zlib.compress(json.dumps(header).encode())
    body = struct.pack("<8sIIQ", magic, version, len(hbytes), len(payload)) + hbytes + payload
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))


def test_architecture_names_outside_the_allowed_namespaces_are_refused(tmp_path):
    path = tmp_path / "m.spk"
    sparks_ext.save(nn.Sequential(nn.ReLU()), path)
    marker = tmp_path / "pwned"

    def evil(header):
        header["architecture"] = {"class": "os.system", "config": {"command": f"touch {marker}"}}

    _rewrite(path, evil)
    with pytest.raises(ValueError, match="'os.system', which is not a layer"):
        sparks_ext.load(path)
    assert not marker.exists()


def test_malformed_header_with_valid_checksum(tmp_path):
    path = tmp_path / "m.spk"
    sparks_ext.save(nn.Sequential(nn.ReLU()), path)
    good = path.read_bytes()
    _rewrite(path, lambda h: h.pop("tensors"))
    with pytest.raises(ValueError, match="corrupted: the header lists no tensors"):
        sparks_ext.load(path)
    path.write_bytes(good)
    _rewrite(path, lambda h: h.__setitem__("architecture", {"class": "torch.nn.ReLU"}))
    with pytest.raises(ValueError, match="corrupted: cannot rebuild its architecture"):
        sparks_ext.load(path)
    path.write_bytes(good)
    _rewrite(path, lambda h: h.__setitem__("architecture", {"class": "torch.nn.Linear",
                                                            "config": {"in_feature": 3}}))
    with pytest.raises(ValueError, match="corrupted: cannot rebuild its architecture"):
        sparks_ext.load(path)


def test_sequential_of_library_layers_is_rebuilt(tmp_path):
    xnor = next(m for m in sparks_ext.convert(trained_small_cnn("binary", steps=1)).modules()
                if isinstance(m, sparks_ext.nn.XnorConv2d))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), xnor, nn.PReLU(16),
                          _codebook_layer(16, 8, 8, 0, stride=2), nn.Hardtanh(-2, 2)).eval()
    path = tmp_path / "m.spk"
    sparks_ext.save(model, path)
    loaded = sparks_ext.load(path)
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert loaded[3].stride == (2, 2) and loaded[4].min_val == -2
    _assert_same_state(model, loaded)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("fuse", [False, True])
def test_rebuilt_tensors_keep_their_memory_format(tmp_path, fuse):
    """A rebuilt model holds each tensor in the layout it was saved in (XnorConv2d's bool weight
    channels_last: the layout binary_conv2d packs without a copy per call)."""
    trained = trained_small_cnn("binary", steps=1)
    if fuse:
        model, x = sparks_ext.convert(trained), torch.randn(2, 1, 8, 8)
    else:
        xnor = [m for m in sparks_ext.convert(trained, fuse=False).modules() if isinstance(m, sparks_ext.nn.XnorConv2d)]
        model, x = nn.Sequential(xnor[0], nn.ReLU(), xnor[1]).eval(), torch.randn(2, 16, 8, 8)
    path = tmp_path / "m.spk"
    sparks_ext.save(model, path)
    loaded = sparks_ext.load(path)
    saved = dict(model.state_dict())
    assert any(t.dtype == torch.bool and t.dim() == 4 and not t.is_contiguous() for t in saved.values())
    for name, t in loaded.state_dict().items():
        assert t.stride() == saved[name].stride(), name
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("keep", [0, 5, 20, 60, -1])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "m.spk"
    sparks_ext.save(_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(ValueError, match="truncated"):
        sparks_ext.load(path)


@pytest.mark.parametrize("where", ["header", "payload", "checksum"])
def test_corrupted_file(tmp_path, where):
    path = tmp_path / "m.spk"
    sparks_ext.save(_model(), path)
    data = bytearray(path.read_bytes())
    hlen = struct.unpack_from("<I", data, 12)[0]
    pos = {"header": PREAMBLE + 3, "payload": PREAMBLE + hlen + 10, "checksum": len(data) - 2}[where]
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted: checksum mismatch"):
        sparks_ext.load(path)


def test_other_framing_errors(tmp_path):
    path = tmp_path / "m.spk"
    sparks_ext.save(_model(), path)
    good = path.read_bytes()
    path.write_bytes(good + b"\0")
    with pytest.raises(ValueError, match="1 unexpected bytes after the end"):
        sparks_ext.load(path)
    path.write_bytes(b"PK\x03\x04" + good[4:])
    with pytest.raises(ValueError, match="not a sparks_ext model file"):
        sparks_ext.load(path)
    path.write_bytes(good[:8] + struct.pack("<I", 99) + good[12:])
    with pytest.raises(ValueError, match="format version 99"):
        sparks_ext.load(path)


def test_inconsistent_header_with_valid_checksum(tmp_path):
    path = tmp_path / "m.spk"
    model = nn.Sequential(_codebook_layer(8, 8, 4, 0))  # 2-bit indices
    sparks_ext.save(model, path)
    good = path.read_bytes()
    _rewrite(path, lambda h: h["tensors"][0].__setitem__(4, 1))
    with pytest.raises(ValueError, match="tensor '0.codebook' has a wrong byte count"):
        sparks_ext.load(path)

    def three_codewords(header):  # same 2-bit packing, but index 3 is now out of range
        for e in header["tensors"]:
            if e[0] == "0.indices":
                e[5] = 3

    path.write_bytes(good)
    model[0].indices.fill_(3)
    sparks_ext.save(model, path)
    _rewrite(path, three_codewords)
    with pytest.raises(ValueError, match="'0.indices' has an index >= its codebook size 3"):
        sparks_ext.load(path)


def test_mismatched_architecture(tmp_path):
    path = tmp_path / "m.spk"
    sparks_ext.save(_model(), path)
    wider = _model()
    wider[2] = _codebook_layer(32, 48, 32, 1)
    with pytest.raises(ValueError, match=r"tensor '2.indices' is \(64, 32\) torch.uint8 in the file, "
                                         r"\(48, 32\) torch.uint8 in the model"):
        sparks_ext.load(path, wider)
    shorter = nn.Sequential(*list(_model())[:4])
    with pytest.raises(ValueError, match=r"does not match the model: missing tensors \[\], "
                                         r"unexpected tensors \['5.codebook'"):
        sparks_ext.load(path, shorter)
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        sparks_ext.load(path, "resnet")


def test_save_rejects_what_it_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        sparks_ext.save({"w": torch.zeros(1)}, tmp_path / "m.spk")
    model = nn.Module()
    model.register_buffer("phase", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="'phase' has dtype torch.complex64"):
        sparks_ext.save(model, tmp_path / "m.spk")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_round_trip(tmp_path):
    model = _model(device="cuda")
    path = tmp_path / "m.spk"
    sparks_ext.save(model, path)
    loaded = sparks_ext.load(path, _model(device="cuda"))
    assert loaded[2].indices.is_cuda
    _assert_same_state(model, loaded)
    x = torch.randn(2, 1, 8, 8, device="cuda")
    assert torch.equal(loaded(x), model(x))


# --- The library's models -----------------------------------------------------------------------

from sparks_ext.models import SmallCNN  # noqa: E402


@pytest.mark.parametrize("conv", ["sparks", "binary"])
def test_trained_model_round_trip_into_its_architecture(tmp_path, conv):
    model = trained_small_cnn(conv)
    path = tmp_path / "m.spk"
    sparks_ext.save(model, path)  # converts a copy first
    assert any(isinstance(m, (sparks_ext.nn.SparksConv2d, sparks_ext.nn.BinaryConv2d)) for m in model.modules())
    encodings = {e[1] for e in serialization.read_header(path)["tensors"]}
    assert ({"index", "pm1"} if conv == "sparks" else {"bits"}) <= encodings
    loaded = sparks_ext.load(path, SmallCNN(conv=conv, n_codewords=32 if conv == "sparks" else None,
                                            width=16)).eval()
    converted = sparks_ext.convert(model)
    _assert_same_state(converted, loaded)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
        # The fused model is a graph, which the file stores as data: it rebuilds without model=.
        assert torch.equal(sparks_ext.load(path)(x), converted(x))
    unfused = tmp_path / "unfused.spk"
    sparks_ext.save(sparks_ext.convert(model, fuse=False), unfused)
    with pytest.raises(ValueError, match="pass model="):
        sparks_ext.load(unfused)  # SmallCNN's forward is code: the file cannot rebuild it
    with pytest.raises(ValueError, match="does not match the model"):
        sparks_ext.load(path, SmallCNN(conv=conv, n_codewords=32 if conv == "sparks" else None, width=8))
