"""A compact, pickle-free file format for converted models.

``save(model, path)`` stores the converted model's state dict with every tensor in its smallest
exact form:

- codebook indices (an ``indices`` tensor beside a ``codebook``) at ceil(log2 n) bits each;
- binary int8 tensors (codebooks with entries in {-1,+1}) at 1 bit per entry, ternary ones
  ({-1,0,+1}, signed-binary codebooks and masks) as a mask bit plane plus a sign bit plane;
- bool tensors (XnorConv2d weights) at 1 bit per entry;
- everything else (real parameters, BatchNorm statistics) raw, in its own dtype.

So a 0.56-bit model takes its theoretical size plus a small header. Layout::

    b"SPARKSX\\x00"  magic                      8 bytes
    version        uint32 little-endian        4
    header_len     uint32                      4
    payload_len    uint64                      8
    header         zlib-compressed JSON        header_len
    payload        the tensors, in order       payload_len
    crc32          of all the bytes above      4

The header lists each tensor (name, encoding, dtype, shape, byte count) and, when the model is
built only from ``torch.nn`` and ``sparks_ext`` layers, a description of the architecture, so
that ``load(path)`` can rebuild it; otherwise pass the architecture: ``load(path, model)``.
Loading parses JSON and bytes only and never runs code named by the file: classes are looked
up by name in ``torch.nn``, ``sparks_ext.nn`` and ``sparks_ext.models`` only. A truncated,
corrupted or mismatched file raises ``ValueError`` saying what is wrong, and loading a file
costs memory in proportion to the file: the decompressed header is bounded (16 MiB), every
tensor entry is checked against the payload before anything is decoded, and an architecture is
built on the meta device (no allocation, no random initialisation) and checked against the
file's tensors before the tensors are decoded into it. Codebook entries must be -1, 0 or +1 and
indices must name a codeword of their codebook, or the file is refused.

Integrity: the CRC32 guards against accidents (a truncated download, a flipped bit), not against
tampering; whoever edits a file can recompute it. The header also records the SHA-256 of the
payload (``payload_sha256``): ``load(path, sha256=True)`` verifies it (again only against
accidents), and ``load(path, sha256=<hex digest>)`` checks the payload against a digest you
obtained from a source you trust, which detects a changed payload. The header is covered by the
CRC only; to protect the whole file, compare its own digest (``sha256sum``) with a trusted one.
"""
from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import math
import os
import struct
import zlib
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from . import packing
from .convert import convert
from .nn.base import InferenceBinaryConv, is_trainable_layer

__all__ = ["save", "load", "read_header"]

MAGIC = b"SPARKSX\x00"
VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQ")
_CRC = struct.Struct("<I")

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}

PathLike = Union[str, os.PathLike]

# Loading limits: what a well-formed file never exceeds.
_MAX_HEADER_BYTES = 16 << 20  # decompressed JSON (about 150,000 tensor entries)
_MAX_DEPTH = 64               # nesting of the architecture description
_MAX_DIMS = 64                # dimensions of a tensor
_MAX_NUMEL = 2 ** 62          # elements of a tensor (torch counts them in int64)
_MAX_CODEWORDS = 2 ** 32      # an index takes at most 32 bits
_ENCODINGS = ("raw", "index", "bits", "pm1", "ternary")


# ---------------------------------------------------------------------------------------------
# Tensor encodings. Each returns the bytes and the header fields needed to decode them.

def _encoding_of(name: str, t: torch.Tensor, state: dict) -> tuple[str, Optional[int]]:
    prefix = name[: len(name) - len("indices")]
    if name.endswith("indices") and isinstance(state.get(prefix + "codebook"), torch.Tensor):
        return "index", state[prefix + "codebook"].shape[0]
    if t.dtype == torch.bool:
        return "bits", None
    if t.dtype == torch.int8 and t.numel():
        values = set(t.unique().tolist())
        if values <= {-1, 1}:
            return "pm1", None
        if values <= {-1, 0, 1}:
            return "ternary", None
    return "raw", None


def _encode(t: torch.Tensor, encoding: str, n: Optional[int]) -> bytes:
    t = t.detach().cpu().contiguous()
    if encoding == "index":
        return packing.pack_indices(t, n).numpy().tobytes()
    if encoding == "bits":
        return packing.pack_bits(t, 1).numpy().tobytes()
    if encoding == "pm1":
        return packing.pack_bits(t > 0, 1).numpy().tobytes()
    if encoding == "ternary":
        return (packing.pack_bits(t != 0, 1).numpy().tobytes()
                + packing.pack_bits(t > 0, 1).numpy().tobytes())
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _expected_nbytes(encoding: str, dtype: torch.dtype, numel: int, n: Optional[int]) -> int:
    if encoding == "index":
        return math.ceil(numel * packing.index_bits(n) / 8)
    if encoding in ("bits", "pm1"):
        return math.ceil(numel / 8)
    if encoding == "ternary":
        return 2 * math.ceil(numel / 8)
    return numel * torch.empty((), dtype=dtype).element_size()


def _decode(name: str, blob: bytes, encoding: str, dtype: torch.dtype, shape: tuple,
            n: Optional[int]) -> torch.Tensor:
    numel = math.prod(shape)
    raw = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)
    if encoding == "raw" and dtype == torch.bool:  # any nonzero byte is True, as a stored 1
        return (raw != 0).reshape(shape)
    if encoding == "raw":
        return raw.view(dtype).reshape(shape).clone()
    if encoding == "index":
        values = packing.unpack_bits(raw, packing.index_bits(n), numel)
        if numel and values.max() >= n:
            raise ValueError(f"corrupted file: tensor {name!r} has an index >= its codebook size {n}")
        return values.reshape(shape).to(dtype)
    if encoding == "bits":
        return packing.unpack_bits(raw, 1, numel).reshape(shape).to(dtype)
    if encoding == "pm1":
        return (packing.unpack_bits(raw, 1, numel) * 2 - 1).reshape(shape).to(dtype)
    half = len(blob) // 2
    mask = packing.unpack_bits(raw[:half], 1, numel)
    sign = packing.unpack_bits(raw[half:], 1, numel) * 2 - 1
    return (mask * sign).reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# Architecture description: a tree of classes found by name in torch.nn / sparks_ext.nn /
# sparks_ext.models, with constructor arguments: the library's inference layers' own
# (file_config), other modules' read back from their attributes.

def _namespaces() -> dict:
    from . import fuse, nn as sparks_nn
    # sparks_ext.fuse: the real layers a fused model deploys (OneDnnConv2d)
    spaces = {"torch.nn": nn, "sparks_ext.nn": sparks_nn, "sparks_ext.fuse": fuse}
    try:
        from . import models
        spaces["sparks_ext.models"] = models
    except ImportError:
        pass
    return spaces


def _class_name(module: nn.Module) -> Optional[str]:
    cls = type(module)
    for prefix, space in _namespaces().items():
        if getattr(space, cls.__name__, None) is cls:
            return f"{prefix}.{cls.__name__}"
    return None


class _NotAllowed(ValueError):
    """A class outside the allow-list: reported as it is, not as a failed rebuild."""


def _resolve(name: str) -> type:
    prefix, _, cls_name = name.rpartition(".")
    space = _namespaces().get(prefix)
    cls = getattr(space, cls_name, None) if space is not None else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise _NotAllowed(f"the file's architecture names {name!r}, which is not a layer of "
                         f"torch.nn, sparks_ext.nn, sparks_ext.fuse or sparks_ext.models; pass model= to load into")
    return cls


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    raise TypeError


def _config(module: nn.Module) -> Optional[dict]:
    """The constructor arguments of ``module``: the library's inference layers give theirs
    (``file_config()``); for other classes they are read back from the attributes of the same
    names, or None if one that has no default is not kept."""
    if isinstance(module, InferenceBinaryConv):
        return module.file_config()
    config = {}
    for p in list(inspect.signature(type(module).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if hasattr(module, p.name):
            value = getattr(module, p.name)
            if isinstance(value, torch.Tensor) or (value is None and p.name == "bias"):
                value = value is not None  # `bias: bool` constructor flags
            try:
                config[p.name] = _jsonable(value)
            except TypeError:
                return None
        elif p.default is p.empty:
            return None
    return config


def _describe(module: nn.Module) -> Optional[dict]:
    if _is_graph_module(module):
        return _describe_graph(module)
    name = _class_name(module)
    if name is None:
        return None
    if type(module) is nn.Sequential:
        children = [(n, _describe(c)) for n, c in module.named_children()]
        if any(spec is None for _, spec in children):
            return None
        return {"class": name, "children": children}
    config = _config(module)
    if config is None:
        return None
    spec = {"class": name, "config": config}
    overrides = _tensor_overrides(module)
    return {**spec, "tensors": overrides} if overrides else spec


def _build(spec: dict) -> nn.Module:
    if spec.get("class") == GRAPH_CLASS:
        return _build_graph(spec)
    cls = _resolve(spec["class"])
    if "children" in spec:
        model = cls()
        for name, child in spec["children"]:
            model.add_module(name, _build(child))
        return model
    if issubclass(cls, InferenceBinaryConv):
        module = cls.from_file_config(spec["config"])
    else:
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()}
        module = convert(cls(**config), inplace=True, fuse=False)
    for name, tensor_spec in spec.get("tensors", {}).items():
        _place(module, name, _empty_tensor(tensor_spec))
    return module


def _signature(state: dict) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _architecture(model: nn.Module, state: dict) -> Optional[dict]:
    """The description of ``model``, kept only if rebuilding it (on the meta device, as
    :func:`load` does) gives the same state layout."""
    spec = _describe(model)
    if spec is None:
        return None
    try:
        with torch.device("meta"):
            rebuilt = _build(json.loads(json.dumps(spec)))
    except Exception:
        return None
    return spec if _signature(rebuilt.state_dict()) == _signature(state) else None


def _check_spec(spec, where: str, depth: int = 0) -> None:
    """The architecture description's shape, before any class is looked up: a tree of
    {"class": str, "children": [[name, spec], ...]} and {"class": str, "config": {str: value}}
    nodes (a layer's node may add "tensors": {path: tensor spec}, the tensors a fused or deployed
    layer holds beyond its constructor's), and fused graphs' {"class": GRAPH_CLASS, "name",
    "training", "modules": {target: spec}, "attrs": {target: tensor spec}, "graph": [node, ...]};
    values JSON scalars or lists of them, at most _MAX_DEPTH deep."""
    bad = f"{where} is corrupted: cannot rebuild its architecture (malformed architecture)"
    if depth > _MAX_DEPTH:
        raise ValueError(f"{bad}: nested deeper than {_MAX_DEPTH}")
    if isinstance(spec, dict) and spec.get("class") == GRAPH_CLASS:
        _check_graph_spec(spec, where, depth, bad)
        return
    keys = set(spec) if isinstance(spec, dict) else set()
    if not (isinstance(spec, dict) and isinstance(spec.get("class"), str)
            and keys in ({"class", "children"}, {"class", "config"}, {"class", "config", "tensors"})):
        raise ValueError(f"{bad}: a node must be {{'class': name, 'children' or 'config': ...}}")
    if "children" in spec:
        children = spec["children"]
        if not (isinstance(children, list)
                and all(isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) for c in children)):
            raise ValueError(f"{bad}: 'children' must be a list of [name, node] pairs")
        for _, child in children:
            _check_spec(child, where, depth + 1)
        return
    config = spec["config"]
    scalar = (bool, int, float, str, type(None))
    if not (isinstance(config, dict) and all(
            isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(i, scalar) for i in v))
            for v in config.values())):
        raise ValueError(f"{bad}: 'config' must map argument names to JSON scalars or lists")
    tensors = spec.get("tensors", {})
    if not (isinstance(tensors, dict) and all(_is_tensor_spec(t) for t in tensors.values())):
        raise ValueError(f"{bad}: 'tensors' must map names to [dtype, shape, channels_last, is_parameter]")


def _is_tensor_spec(t) -> bool:
    return (isinstance(t, list) and len(t) == 4 and t[0] in _DTYPES and isinstance(t[1], list)
            and len(t[1]) <= 8 and all(_is_int(d) and d >= 0 for d in t[1])
            and isinstance(t[2], bool) and isinstance(t[3], bool))


def _check_graph_spec(spec: dict, where: str, depth: int, bad: str) -> None:
    if set(spec) != {"class", "name", "training", "modules", "attrs", "graph"}:
        raise ValueError(f"{bad}: a graph node must have exactly class, name, training, modules, attrs and graph")
    modules, attrs, graph = spec["modules"], spec["attrs"], spec["graph"]
    if not (isinstance(spec["name"], str) and isinstance(spec["training"], bool)
            and isinstance(modules, dict) and isinstance(attrs, dict) and isinstance(graph, list)):
        raise ValueError(f"{bad}: a graph's name, training, modules, attrs or graph has the wrong type")
    if not all(_is_tensor_spec(t) for t in attrs.values()):
        raise ValueError(f"{bad}: a graph's 'attrs' must map names to tensor specs")
    if not all(isinstance(n, list) and len(n) == 5 and all(isinstance(v, str) for v in n[:3])
               and isinstance(n[4], dict) for n in graph):
        raise ValueError(f"{bad}: a graph node must be [name, op, target, args, kwargs]")
    for child in modules.values():
        _check_spec(child, where, depth + 1)


def _build_on_meta(spec, where: str) -> nn.Module:
    """The architecture on the meta device: no memory and no random initialisation, whatever the
    sizes the file names; a constructor's own error becomes a ValueError."""
    _check_spec(spec, where)
    try:
        with torch.device("meta"):
            return _build(spec)
    except _NotAllowed:
        raise
    except Exception as e:  # the constructors' own checks: TypeError, ValueError, RuntimeError...
        raise ValueError(f"{where} is corrupted: cannot rebuild its architecture "
                         f"({type(e).__name__}: {e})") from None


def _materialise(model: nn.Module, spec: dict, state: dict) -> nn.Module:
    """The meta-built ``model`` holding ``state``'s tensors. A module with tensors that are not
    in the state dict (non-persistent buffers a constructor computes) is built for real instead:
    by now the file's tensors are known to match it, so its size is the file's."""
    # assign=True takes the decoded (contiguous) tensors as they are: give the channels_last
    # ones the layout the model was built with, which the kernels read without a copy.
    built = model.state_dict()
    for name, t in state.items():
        like = built.get(name)
        if like is not None and like.dim() == 4 and not like.is_contiguous() \
                and like.is_contiguous(memory_format=torch.channels_last):
            state[name] = t.contiguous(memory_format=torch.channels_last)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = _build(spec)
        model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------------------------

def save(model: nn.Module, path: PathLike) -> int:
    """Writes ``model`` (converted first if it still holds trainable layers) to ``path`` in the
    compact format; returns the file size in bytes."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(is_trainable_layer(m) for m in model.modules()):
        model = convert(model)
    state = model.state_dict()
    entries, blobs = [], []
    for name, t in state.items():
        if t.dtype not in _DTYPES.values():
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which the format does not store")
        encoding, n = _encoding_of(name, t, state)
        blob = _encode(t, encoding, n)
        entries.append([name, encoding, str(t.dtype).removeprefix("torch."), list(t.shape), len(blob), n])
        blobs.append(blob)
    payload = b"".join(blobs)
    header = {"format": "sparks_ext", "version": VERSION, "model": type(model).__name__,
              "architecture": _architecture(model, state), "tensors": entries,
              "deploy": _deploy_options(model), "payload_sha256": hashlib.sha256(payload).hexdigest()}
    header_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = _PREAMBLE.pack(MAGIC, VERSION, len(header_bytes), len(payload)) + header_bytes + payload
    data = body + _CRC.pack(zlib.crc32(body))
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def _read(path: PathLike) -> tuple[dict, bytes, int]:
    """Checks the file's framing and checksum; returns (header, payload, header_len)."""
    with open(path, "rb") as f:
        data = f.read()
    where = f"{os.fspath(path)!r}"
    if len(data) < _PREAMBLE.size:
        if MAGIC.startswith(data[: len(MAGIC)]):
            raise ValueError(f"{where} is truncated: {len(data)} bytes, shorter than the preamble")
        raise ValueError(f"{where} is not a sparks_ext model file (bad magic)")
    magic, version, header_len, payload_len = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{where} is not a sparks_ext model file (bad magic)")
    if version != VERSION:
        raise ValueError(f"{where} has format version {version}; this sparks_ext reads version {VERSION}")
    expected = _PREAMBLE.size + header_len + payload_len + _CRC.size
    if len(data) < expected:
        raise ValueError(f"{where} is truncated: {len(data)} bytes, its preamble announces {expected}")
    if len(data) > expected:
        raise ValueError(f"{where} is corrupted: {len(data) - expected} unexpected bytes after the end")
    (crc,) = _CRC.unpack_from(data, expected - _CRC.size)
    if zlib.crc32(data[: expected - _CRC.size]) != crc:
        raise ValueError(f"{where} is corrupted: checksum mismatch")
    start = _PREAMBLE.size
    header = _parse_header(data[start: start + header_len], where)
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise ValueError(f"{where} is corrupted: the header lists no tensors")
    return header, data[start + header_len: start + header_len + payload_len], header_len


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a file may hold")


def _parse_header(compressed: bytes, where: str):
    """The header's JSON, decompressed to at most _MAX_HEADER_BYTES (a zlib bomb stops there)."""
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(compressed, _MAX_HEADER_BYTES)
        if inflater.unconsumed_tail:
            raise ValueError(f"its header inflates past {_MAX_HEADER_BYTES} bytes")
        if not inflater.eof:
            raise ValueError("its compressed header is incomplete")
        return json.loads(text, parse_constant=_no_constant)
    except (zlib.error, ValueError) as e:  # json's errors and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{where} is corrupted: unreadable header ({e})") from None
    except RecursionError:
        raise ValueError(f"{where} is corrupted: unreadable header (nested too deeply)") from None


def read_header(path: PathLike) -> dict:
    """The file's header (tensor list, architecture) after checking the framing and checksum;
    ``header_bytes`` gives the compressed header's size."""
    header, _, header_len = _read(path)
    return {**header, "header_bytes": header_len}


class _Entry(NamedTuple):
    name: str
    encoding: str
    dtype: torch.dtype
    shape: tuple
    offset: int
    nbytes: int
    n: Optional[int]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entries(header: dict, payload_len: int, where: str) -> list:
    """The header's tensor list, every field checked (types, ranges, unique names, byte counts
    that tile the payload exactly) before anything is allocated."""
    entries, offset = {}, 0
    for entry in header["tensors"]:
        what = repr(entry)
        bad = f"{where} is corrupted: bad tensor entry {what[:200]}"
        if not (isinstance(entry, list) and len(entry) == 6):
            raise ValueError(f"{bad}: not a list of 6 fields")
        name, encoding, dtype_name, shape, nbytes, n = entry
        if not isinstance(name, str):
            raise ValueError(f"{bad}: the name is not a string")
        if name in entries:
            raise ValueError(f"{where} is corrupted: tensor {name!r} is listed twice")
        if not (isinstance(encoding, str) and encoding in _ENCODINGS):
            raise ValueError(f"{bad}: unknown encoding")
        if not (isinstance(dtype_name, str) and dtype_name in _DTYPES):
            raise ValueError(f"{bad}: unknown dtype")
        dtype = _DTYPES[dtype_name]
        if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
                and all(_is_int(d) and d >= 0 for d in shape)
                and math.prod(d for d in shape if d) <= _MAX_NUMEL):
            raise ValueError(f"{bad}: the shape must be at most {_MAX_DIMS} non-negative ints "
                             f"of at most 2^62 elements")
        if not _is_int(nbytes):
            raise ValueError(f"{bad}: the byte count is not an int")
        if encoding == "index":
            if not (_is_int(n) and 1 <= n <= _MAX_CODEWORDS):
                raise ValueError(f"{bad}: an index entry needs a codebook size in [1, 2^32]")
            if dtype.is_floating_point or dtype == torch.bool:
                raise ValueError(f"{bad}: indices must have an integer dtype")
        elif n is not None:
            raise ValueError(f"{bad}: only index entries have a codebook size")
        shape = tuple(shape)
        if (nbytes != _expected_nbytes(encoding, dtype, math.prod(shape), n)
                or offset + nbytes > payload_len):
            raise ValueError(f"{where} is corrupted: tensor {name!r} has a wrong byte count")
        entries[name] = _Entry(name, encoding, dtype, shape, offset, nbytes, n)
        offset += nbytes
    if offset != payload_len:
        raise ValueError(f"{where} is corrupted: {payload_len - offset} payload bytes belong to no tensor")
    return list(entries.values())


def _decode_all(entries: list, payload: bytes, where: str) -> dict:
    state = {e.name: _decode(e.name, payload[e.offset: e.offset + e.nbytes], e.encoding, e.dtype,
                             e.shape, e.n) for e in entries}
    _check_values(state, where)
    return state


def _check_values(state: dict, where: str) -> None:
    """What the ops would refuse at the first forward, refused at load time instead: codebook
    entries outside {-1, 0, +1} and indices that name no codeword of their codebook."""
    for name, t in state.items():
        if name == "codebook" or name.endswith(".codebook"):
            v = t.double()  # in its own dtype, uint8 would compare 255 equal to -1
            if t.dtype == torch.bool or not ((v == 0) | (v == 1) | (v == -1)).all():
                raise ValueError(f"{where} is corrupted: tensor {name!r} has entries outside "
                                 f"{{-1, 0, +1}}")
            indices = state.get(name[: len(name) - len("codebook")] + "indices")
            if indices is None:
                continue
            n = t.shape[0] if t.dim() else 0
            if indices.dtype.is_floating_point or indices.dtype == torch.bool:
                raise ValueError(f"{where} is corrupted: tensor {name[:-8] + 'indices'!r} is not "
                                 f"an integer tensor")
            if indices.numel() and (indices.min() < 0 or indices.max() >= n):
                raise ValueError(f"{where} is corrupted: tensor {name[:-8] + 'indices'!r} has "
                                 f"indices outside [0, {n}), the codewords of {name!r}")


def _check_match(entries: list, target: dict, where: str) -> None:
    """The file's tensor list against the model's state dict (shapes and dtypes only)."""
    stored = {e.name: e for e in entries}
    missing = [k for k in target if k not in stored]
    unexpected = [k for k in stored if k not in target]
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model: missing tensors {missing}, "
                         f"unexpected tensors {unexpected}")
    for k, t in target.items():
        if stored[k].shape != tuple(t.shape) or stored[k].dtype != t.dtype:
            raise ValueError(f"{where} does not match the model: tensor {k!r} is "
                             f"{stored[k].shape} {stored[k].dtype} in the file, "
                             f"{tuple(t.shape)} {t.dtype} in the model")


def _check_sha256(header: dict, payload: bytes, sha256, where: str) -> None:
    if sha256 is True:
        expected = header.get("payload_sha256")
        if not isinstance(expected, str):
            raise ValueError(f"{where} records no payload SHA-256 to verify")
    elif isinstance(sha256, str) and len(sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha256):
        expected = sha256
    else:
        raise ValueError(f"sha256 must be True or a hex SHA-256 digest (64 characters), got {sha256!r}")
    digest = hashlib.sha256(payload).hexdigest()
    if not hmac.compare_digest(digest, expected.lower()):
        raise ValueError(f"{where} fails its SHA-256 check: the payload's digest is {digest}, "
                         f"expected {expected.lower()}")


def load(path: PathLike, model: Optional[nn.Module] = None, *,
         sha256: Union[bool, str, None] = None) -> nn.Module:
    """Reads a file written by :func:`save` and returns the model in eval mode (the file holds an
    inference model: BatchNorm uses its stored statistics; call ``.train()`` to fine-tune).

    With ``model`` (the architecture, trained or not), loads into it, converting it in place
    first if it holds trainable layers, as the saved model was (fused in eval mode and in the
    deployed dtype, if it was), and returns it (the fused form, if so); tensors keep the model's
    devices. Without
    it, rebuilds the architecture recorded in the file (models made of ``torch.nn`` and
    ``sparks_ext`` layers) on the CPU.

    ``sha256=True`` verifies the payload against the SHA-256 recorded in the file;
    ``sha256="<hex>"`` against a digest from a source you trust (see the module's notes on
    integrity). Every malformed file raises ``ValueError``.
    """
    where = f"{os.fspath(path)!r}"
    header, payload, _ = _read(path)
    if sha256 is not None and sha256 is not False:
        _check_sha256(header, payload, sha256, where)
    entries = _entries(header, len(payload), where)
    spec = None
    if model is None:
        spec = header.get("architecture")
        if spec is None:
            raise ValueError(f"{where} holds a {str(header.get('model'))[:100]} that the file cannot "
                             f"rebuild (a forward of its own, or constructor arguments not kept as "
                             f"attributes); pass model= to load into it")
        model = _build_on_meta(spec, where)
    elif not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    elif any(is_trainable_layer(m) for m in model.modules()):
        model = _convert_like(model, header.get("deploy"))
    _check_match(entries, model.state_dict(), where)
    state = _decode_all(entries, payload, where)
    if spec is not None:
        model = _materialise(model, spec, state)
    else:
        model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Fused models (sparks_ext.convert(..., fuse=True) returns a torch.fx.GraphModule): the graph is
# stored as data, a list of nodes whose call targets come from the allow-lists below (and whose
# called modules are described like any other layer); loading builds the graph from them and
# never imports or runs anything the file names.

GRAPH_CLASS = "torch.fx.GraphModule"


def _is_graph_module(module: nn.Module) -> bool:
    import torch.fx as fx
    return isinstance(module, fx.GraphModule)


def _graph_functions() -> dict:
    import operator
    import torch.nn.functional as F
    from . import fuse, quantizers
    functions = {
        "getattr": getattr,
        **{f"operator.{n}": getattr(operator, n) for n in (
            "add", "sub", "mul", "truediv", "floordiv", "neg", "getitem", "iadd", "isub", "imul",
            "matmul", "pow")},
        **{f"torch.{n}": getattr(torch, n) for n in (
            "add", "sub", "mul", "div", "neg", "flatten", "reshape", "cat", "stack", "relu",
            "sigmoid", "tanh", "sign", "where", "clamp", "mean", "sum", "squeeze", "unsqueeze",
            "transpose", "permute", "matmul", "softmax")},
        **{f"torch.nn.functional.{n}": getattr(F, n) for n in (
            "relu", "relu6", "hardtanh", "prelu", "leaky_relu", "gelu", "silu", "sigmoid",
            "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d", "linear", "conv2d", "batch_norm",
            "softmax", "log_softmax", "pad", "interpolate", "dropout")},
        "sparks_ext.fuse.deploy_input": fuse.deploy_input,
        "sparks_ext.quantizers.sign": quantizers.sign,
        "sparks_ext.quantizers.sign_ste": quantizers.sign_ste,
        "sparks_ext.quantizers.approx_sign": quantizers.approx_sign,
    }
    return functions


_GRAPH_METHODS = frozenset((
    "add", "sub", "mul", "div", "neg", "flatten", "view", "reshape", "to", "float", "contiguous",
    "size", "dim", "mean", "sum", "squeeze", "unsqueeze", "transpose", "permute", "expand",
    "expand_as", "type_as", "clamp", "sign", "relu", "sigmoid", "tanh", "detach", "clone",
    "chunk", "split", "softmax", "matmul", "pow"))
_MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous_format": torch.contiguous_format,
                   "preserve_format": torch.preserve_format}


def _encode_arg(arg):
    import torch.fx as fx
    if isinstance(arg, fx.Node):
        return {"node": arg.name}
    if isinstance(arg, bool) or arg is None or isinstance(arg, (int, float, str)):
        return arg
    if isinstance(arg, tuple):
        return {"tuple": [_encode_arg(a) for a in arg]}
    if isinstance(arg, list):
        return [_encode_arg(a) for a in arg]
    if isinstance(arg, slice):
        return {"slice": [_encode_arg(arg.start), _encode_arg(arg.stop), _encode_arg(arg.step)]}
    if isinstance(arg, torch.dtype) and arg in _DTYPES.values():
        return {"dtype": str(arg).removeprefix("torch.")}
    if isinstance(arg, torch.memory_format):
        return {"memory_format": next(k for k, v in _MEMORY_FORMATS.items() if v == arg)}
    if arg is Ellipsis:
        return {"ellipsis": True}
    raise TypeError(f"cannot store argument {arg!r}")


def _decode_arg(arg, nodes: dict):
    if isinstance(arg, bool) or arg is None or isinstance(arg, (int, float, str)):
        return arg
    if isinstance(arg, list):
        return [_decode_arg(a, nodes) for a in arg]
    if isinstance(arg, dict) and len(arg) == 1:
        (kind, value), = arg.items()
        if kind == "node" and value in nodes:
            return nodes[value]
        if kind == "tuple" and isinstance(value, list):
            return tuple(_decode_arg(a, nodes) for a in value)
        if kind == "slice" and isinstance(value, list) and len(value) == 3:
            return slice(*(_decode_arg(a, nodes) for a in value))
        if kind == "dtype" and value in _DTYPES:
            return _DTYPES[value]
        if kind == "memory_format" and value in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[value]
        if kind == "ellipsis" and value is True:
            return Ellipsis
    raise ValueError(f"bad graph argument {arg!r}")


def _tensor_spec(t: torch.Tensor) -> list:
    """[dtype, shape, channels_last, is_parameter]: what a rebuilt model needs to hold ``t``."""
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return [str(t.dtype).removeprefix("torch."), list(t.shape), channels_last, isinstance(t, nn.Parameter)]


def _tensor_overrides(module: nn.Module) -> dict:
    """The tensors of a layer that its constructor does not make as they are: the buffers a
    fused conv gained (threshold, prelu_weight, post_bias), floating tensors of a deployed
    dtype other than float32, channels_last weights. (A bias from a folded BatchNorm needs
    none: ``bias=True`` is read back from the layer.)"""
    from .nn.codebook import FUSED_BUFFERS
    overrides = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        spec = _tensor_spec(t)
        if name.rpartition(".")[2] in FUSED_BUFFERS or spec[2] or (t.is_floating_point() and t.dtype != torch.float32):
            overrides[name] = spec
    return overrides


def _describe_graph(gm) -> Optional[dict]:
    """The graph of a fused model as data, or None if a node calls something off the lists."""
    names = {fn: name for name, fn in _graph_functions().items()}
    nodes, modules, attrs = [], {}, {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function":
            if target not in names:
                return None
            target = names[target]
        elif node.op == "call_method" and target not in _GRAPH_METHODS:
            return None
        elif node.op == "call_module" and target not in modules:
            modules[target] = _describe(gm.get_submodule(target))
            if modules[target] is None:
                return None
        elif node.op == "get_attr":
            value = gm
            for part in target.split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                return None
            attrs[target] = _tensor_spec(value)
        try:
            nodes.append([node.name, node.op, target, _encode_arg(node.args),
                          {k: _encode_arg(v) for k, v in node.kwargs.items()}])
        except TypeError:
            return None
    return {"class": GRAPH_CLASS, "name": type(gm).__name__, "training": gm.training,
            "modules": modules, "attrs": attrs, "graph": nodes}


def _empty_tensor(spec) -> torch.Tensor:
    dtype_name, shape, channels_last, is_parameter = spec
    t = torch.zeros(tuple(int(s) for s in shape), dtype=_DTYPES[dtype_name])
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return nn.Parameter(t, requires_grad=t.is_floating_point()) if is_parameter else t


def _place(root: nn.Module, path: str, value) -> None:
    """Sets the module or tensor ``value`` at the dotted ``path`` under ``root``, creating
    empty parent modules; a tensor replaces what is there (a fused layer's optional buffers,
    a deployed dtype or layout)."""
    *parents, attr = path.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(value, nn.Module):
        owner.add_module(attr, value)
    elif isinstance(value, nn.Parameter):
        owner._buffers.pop(attr, None)
        owner.register_parameter(attr, value)
    else:
        owner._parameters.pop(attr, None)
        owner.register_buffer(attr, value)


def _build_graph(spec: dict) -> nn.Module:
    import torch.fx as fx
    functions = _graph_functions()
    root = nn.Module()
    for target, module_spec in spec["modules"].items():
        _place(root, target, _build(module_spec))
    for target, tensor_spec in spec["attrs"].items():
        _place(root, target, _empty_tensor(tensor_spec))
    graph, nodes = fx.Graph(), {}
    for name, op, target, args, kwargs in spec["graph"]:
        if op == "call_function":
            if target not in functions:
                raise ValueError(f"the file's graph calls {target!r}, which is not on the list of "
                                 f"functions a stored graph may call")
            target = functions[target]
        elif op == "call_method" and target not in _GRAPH_METHODS:
            raise ValueError(f"the file's graph calls the method {target!r}, which is not on the "
                             f"list of methods a stored graph may call")
        elif op == "call_module" and target not in spec["modules"]:
            raise ValueError(f"the file's graph calls the module {target!r}, which it does not describe")
        elif op == "get_attr" and target not in spec["attrs"]:
            raise ValueError(f"the file's graph reads {target!r}, which it does not describe")
        elif op not in ("placeholder", "output", "call_function", "call_method", "call_module", "get_attr"):
            raise ValueError(f"bad graph node kind {op!r}")
        if not isinstance(name, str) or name in nodes:
            raise ValueError(f"bad graph node name {name!r}")
        nodes[name] = graph.create_node(op, target, _decode_arg(args, nodes),
                                        {k: _decode_arg(v, nodes) for k, v in kwargs.items()}, name)
    graph.lint()
    gm = fx.GraphModule(root, graph, str(spec.get("name", "GraphModule")))
    gm.train(bool(spec.get("training", False)))
    return gm


def _deploy_options(model: nn.Module) -> dict:
    """How ``model`` was converted, for ``load(path, model=...)`` to convert a trained
    architecture the same way: fused (a graph inside), and the deployed dtype if not float32."""
    import torch.fx as fx
    fused = any(isinstance(m, fx.GraphModule) for m in model.modules())
    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    return {"fuse": fused, "dtype": None if dtype in (None, torch.float32) else str(dtype).removeprefix("torch.")}


def _convert_like(model: nn.Module, options: Optional[dict]) -> nn.Module:
    """Converts a trained ``model`` in place with the options recorded by :func:`_deploy_options`
    (files written before they were recorded: unfused)."""
    options = options if isinstance(options, dict) else {}
    dtype = _DTYPES.get(options.get("dtype")) if options.get("dtype") is not None else None
    fuse = options.get("fuse") is True
    if fuse:
        model.eval()  # the file holds an eval-mode fusion: BatchNorms folded with running stats
    return convert(model, inplace=True, fuse=fuse, dtype=dtype)
