"""Per-layer size and cost table of a model, like ``larq.models.summary``.

``summary(model, input_size)`` runs one forward pass (eval mode, no gradient, batch of one) to
learn every layer's output shape, then counts per layer, per sample:

- binary weights and the bits each one costs on disk (``bits_per_weight`` of the layer: 1 for a
  plain binary conv, log2(n)/(kh*kw) for a codebook of n codewords), plus the codebook itself;
- real-valued parameters (and floating buffers such as BatchNorm statistics) at their dtype's
  width;
- BOPs of binary convolutions, with the convention that reproduces the published numbers
  (DESIGN.md section 3; ResNet-18 at 224: 1.676e9 for 1-bit, 0.884e9 / 0.501e9 / 0.297e9 for
  n = 64 / 32 / 16)::

      plain binary:  C_out * (C_in/g) * K*K * H_out*W_out
      codebook (n):  C_in * min(n, C_out/g) * K*K * H_out*W_out          (codeword responses)
                     + [n < C_out/g] * C_out * (C_in/g) * H_out*W_out / 2  (gathering them)

  With g = 1 these are exactly the published formulas; with groups, each input channel only
  needs responses for the C_out/g output channels of its group;
- FLOPs: multiply-accumulates of real-valued convolutions and linear layers (the BNN
  literature's convention; BatchNorm, activations and pooling are not counted);
- OPs = BOPs / 64 + FLOPs.

A binary layer is any module exposing ``bits_per_weight`` and ``n_codewords`` (the contract of
every binary conv of this library, trainable or inference), so a trained model and its converted
form give the same table. The result is data (:class:`Summary`); ``print`` it for the table.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["summary", "Summary", "LayerSummary", "is_binary_layer", "binary_conv_bops"]


def is_binary_layer(module: nn.Module) -> bool:
    """True for the library's binary convolutions (trainable or inference)."""
    return hasattr(module, "bits_per_weight") and hasattr(module, "n_codewords")


def binary_conv_bops(c_in: int, c_out: int, kh: int, kw: int, h_out: int, w_out: int,
                     n_codewords: Optional[int] = None, groups: int = 1) -> float:
    """BOPs of one binary convolution for one sample (see the module docstring)."""
    taps, pixels, per_group_out = kh * kw, h_out * w_out, c_out // groups
    if n_codewords is None:
        return float(c_out * (c_in // groups) * taps * pixels)
    responses = c_in * min(n_codewords, per_group_out) * taps * pixels
    gather = c_out * (c_in // groups) * pixels / 2 if n_codewords < per_group_out else 0
    return float(responses + gather)


@dataclass
class LayerSummary:
    """One row: what a layer stores and computes for one sample."""
    name: str
    type: str
    output_shape: Optional[tuple]  # None: never called by the forward pass
    binary_weights: int = 0
    bits_per_weight: Optional[float] = None
    n_codewords: Optional[int] = None
    codebook_bits: int = 0
    real_params: int = 0
    memory_bits: float = 0.0
    bops: float = 0.0
    flops: float = 0.0

    @property
    def memory_bytes(self) -> float:
        return self.memory_bits / 8

    @property
    def float32_bytes(self) -> int:
        """What the same parameters take as float32."""
        return 4 * (self.binary_weights + self.real_params)


@dataclass
class Summary:
    """The table: ``rows`` (one :class:`LayerSummary` per layer, in call order) and totals."""
    model_name: str
    input_size: tuple
    rows: list = field(default_factory=list)

    binary_weights = property(lambda self: sum(r.binary_weights for r in self.rows))
    real_params = property(lambda self: sum(r.real_params for r in self.rows))
    memory_bytes = property(lambda self: sum(r.memory_bits for r in self.rows) / 8)
    float32_bytes = property(lambda self: sum(r.float32_bytes for r in self.rows))
    bops = property(lambda self: sum(r.bops for r in self.rows))
    flops = property(lambda self: sum(r.flops for r in self.rows))

    @property
    def ops(self) -> float:
        """OPs = BOPs / 64 + FLOPs."""
        return self.bops / 64 + self.flops

    @property
    def compression_ratio(self) -> float:
        """float32 size of every parameter / the size stored here."""
        return self.float32_bytes / self.memory_bytes if self.memory_bytes else float("nan")

    @property
    def binary_bits_per_weight(self) -> float:
        """Bits per binary weight over the binary layers, codebooks included."""
        rows = [r for r in self.rows if r.binary_weights]
        weights = sum(r.binary_weights for r in rows)
        if not weights:
            return float("nan")
        return sum(r.binary_weights * r.bits_per_weight + r.codebook_bits for r in rows) / weights

    def totals(self) -> dict:
        """The totals as a plain dict."""
        return {"binary_weights": self.binary_weights, "real_params": self.real_params,
                "memory_bytes": self.memory_bytes, "float32_bytes": self.float32_bytes,
                "compression_ratio": self.compression_ratio, "bops": self.bops,
                "flops": self.flops, "ops": self.ops}

    def __str__(self) -> str:
        header = ("Layer", "Type", "Output shape", "Binary w.", "Real params", "Bits/w",
                  "Memory", "BOPs", "FLOPs")
        lines = [header]
        for r in self.rows:
            lines.append((r.name, r.type, "-" if r.output_shape is None else "x".join(map(str, r.output_shape)),
                          _count(r.binary_weights), _count(r.real_params),
                          "" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}",
                          _bytes(r.memory_bytes), _count(r.bops), _count(r.flops)))
        lines.append(("Total", "", "", _count(self.binary_weights), _count(self.real_params),
                      "", _bytes(self.memory_bytes), _count(self.bops), _count(self.flops)))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        left = {0, 1, 2}

        def fmt(row):
            return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()

        rule = "-" * len(fmt(header))
        out = [f"{self.model_name} summary, input {tuple(self.input_size)}, per sample", rule,
               fmt(header), rule, *map(fmt, lines[1:-1]), rule, fmt(lines[-1]), rule]
        out.append(f"Binary weights: {self.binary_weights:,} at {self.binary_bits_per_weight:.3f} "
                   f"bits each (codebooks included)")
        out.append(f"Real-valued parameters: {self.real_params:,}")
        out.append(f"Memory: {_bytes(self.memory_bytes)} vs {_bytes(self.float32_bytes)} in "
                   f"float32 (compression {self.compression_ratio:.1f}x)")
        out.append(f"BOPs: {self.bops:.4g}   FLOPs: {self.flops:.4g}   "
                   f"OPs = BOPs/64 + FLOPs: {self.ops:.4g}")
        return "\n".join(out)


def _count(x: float) -> str:
    if not x:
        return "0"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:g}"


def _bytes(x: float) -> str:
    for unit, size in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def _real_tensors(module: nn.Module):
    """Parameters and floating buffers of ``module`` itself (not its children)."""
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t is not None and t.is_floating_point():
            yield t


def _binary_row(module: nn.Module, row: LayerSummary) -> None:
    kh, kw = _pair(module.kernel_size)
    c_in, c_out, groups = module.in_channels, module.out_channels, module.groups
    n = module.n_codewords
    row.binary_weights = c_out * (c_in // groups) * kh * kw
    row.n_codewords = n
    codebook_bits = 0
    if n is not None:
        codebook = getattr(module, "codebook", None)
        ternary = isinstance(codebook, torch.Tensor) and bool((codebook == 0).any())
        codebook_bits = n * kh * kw * (2 if ternary else 1)
    row.bits_per_weight = float(module.bits_per_weight)
    row.codebook_bits = codebook_bits
    # Deployed real parameters: one scale per output channel (BatchNorm folds into it) and the
    # bias; a trainable layer's latent weights and selection state are not deployed.
    bias = getattr(module, "bias", None)
    row.real_params = c_out + (bias.numel() if isinstance(bias, torch.Tensor) else 0)
    row.memory_bits = row.binary_weights * row.bits_per_weight + codebook_bits + 32 * row.real_params


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def _new_row(name: str, module: nn.Module, output_shape: Optional[tuple]) -> LayerSummary:
    row = LayerSummary(name, type(module).__name__, output_shape)
    if is_binary_layer(module):
        _binary_row(module, row)
    else:
        for t in _real_tensors(module):
            row.real_params += t.numel()
            row.memory_bits += 8 * t.numel() * t.element_size()
    return row


def _layer_work(module: nn.Module, shape: torch.Size) -> tuple[float, float]:
    """(BOPs, FLOPs) of one call on one sample, from the output shape."""
    if is_binary_layer(module):
        kh, kw = _pair(module.kernel_size)
        return binary_conv_bops(module.in_channels, module.out_channels, kh, kw,
                                shape[-2], shape[-1], module.n_codewords, module.groups), 0.0
    per_sample = math.prod(shape[1:])
    if isinstance(module, nn.modules.conv._ConvNd):
        return 0.0, float(per_sample * (module.in_channels // module.groups) * math.prod(module.kernel_size))
    if isinstance(module, nn.Linear):
        return 0.0, float(per_sample * module.in_features)
    return 0.0, 0.0


def _traced_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that get a row: binary layers (as a whole), every other leaf, and any module
    owning real tensors itself (ReActNet's RSign keeps its threshold beside a child)."""
    inside_binary = set()
    for module in model.modules():
        if is_binary_layer(module):
            inside_binary.update(id(m) for m in module.modules() if m is not module)
    return {name: m for name, m in model.named_modules()
            if id(m) not in inside_binary and (is_binary_layer(m) or next(m.children(), None) is None
                                               or next(_real_tensors(m), None) is not None)}


def _trace(model: nn.Module, size: tuple, device, dtype) -> list[tuple[str, torch.Size]]:
    """(module name, output shape) of every call of a traced module, in call order, from one
    forward pass of ``model`` in eval mode."""
    calls, handles = [], []
    for name, module in _traced_modules(model).items():
        def hook(module, args, output, name=name):
            if isinstance(output, torch.Tensor):
                calls.append((name, output.shape))
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def summary(model: nn.Module, input_size: Sequence[int], name: Optional[str] = None) -> Summary:
    """Per-layer table of ``model`` for an input of ``input_size`` ((C, H, W) or (N, C, H, W);
    counts are per sample). Rows are the binary layers and every other leaf module that the
    forward pass calls, in call order. ``print`` the result for the table; its fields and
    :meth:`Summary.totals` give the numbers.

    Output shapes come from one forward pass on a copy of the model on the ``meta`` device
    (shapes only, no arithmetic, so a ResNet-18 at 224 costs nothing); a model that cannot run
    on ``meta`` (data-dependent Python code) runs once for real on a batch of one.
    """
    size = tuple(int(s) for s in input_size)
    if len(size) < 1 or any(s <= 0 for s in size):
        raise ValueError(f"input_size must be a shape of positive sizes, got {tuple(input_size)}")
    if len(size) == 3:
        size = (1,) + size
    size = (1,) + size[1:]
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    try:
        calls = _trace(copy.deepcopy(model).to("meta"), size, "meta", dtype)
    except (NotImplementedError, RuntimeError):
        calls = _trace(model, size, first.device if first is not None else "cpu", dtype)

    modules = _traced_modules(model)
    rows: dict[str, LayerSummary] = {}
    for module_name, shape in calls:
        row = rows.get(module_name)
        if row is None:
            row = rows[module_name] = _new_row(module_name or type(model).__name__,
                                               modules[module_name], tuple(shape[1:]))
        bops, flops = _layer_work(modules[module_name], shape)
        row.bops += bops
        row.flops += flops
    # Tensors of modules the forward pass never calls (a layer whose parameter another module
    # reads directly) are still stored: they get a row without output shape, after the row of
    # the module before them.
    ordered = list(rows.values())  # first-call order
    previous = None
    for module_name, module in modules.items():
        if module_name in rows:
            previous = rows[module_name]
        elif is_binary_layer(module) or next(_real_tensors(module), None) is not None:
            row = rows[module_name] = _new_row(module_name, module, None)
            ordered.insert(ordered.index(previous) + 1 if previous is not None else 0, row)
            previous = row
    result = Summary(name or type(model).__name__, size[1:])
    result.rows = ordered
    return result
