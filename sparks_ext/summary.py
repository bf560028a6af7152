"""Per-layer size and cost table of a model, like ``larq.models.summary``.

``summary(model, input_size)`` runs one forward pass (eval mode, no gradient, batch of one) to
learn every layer's output shape, then counts per layer, per sample:

- binary weights and the bits each one costs on disk (``bits_per_weight`` of the layer: 1 for a
  plain binary conv, log2(n)/(kh*kw) for a codebook of n codewords), plus the codebook itself;
- real-valued parameters (and floating buffers such as BatchNorm statistics) at their dtype's
  width;
- BOPs of binary convolutions, with the convention that reproduces the published numbers
  (docs/design.md, section 7; ResNet-18 at 224: 1.676e9 for 1-bit, 0.884e9 / 0.501e9 / 0.297e9 for
  n = 64 / 32 / 16)::

      plain binary:  C_out * (C_in/g) * K*K * H_out*W_out
      codebook (n):  C_in * min(n, C_out/g) * K*K * H_out*W_out          (codeword responses)
                     + [n < C_out/g] * C_out * (C_in/g) * H_out*W_out / 2  (gathering them)

  With g = 1 these are exactly the published formulas; with groups, each input channel only
  needs responses for the C_out/g output channels of its group;
- FLOPs: multiply-accumulates of real-valued convolutions and linear layers (the BNN
  literature's convention; BatchNorm, activations and pooling are not counted);
- OPs = BOPs / 64 + FLOPs;
- density: the fraction of non-zero binary weights (signed-binary layers quantize to {0, s},
  so some of their weights are zero; every other binary layer has density 1), and the
  *effectual* binary weights ("effectual parameters"), the non-zero ones (density x binary
  weights): those that contribute to an output. Memory and BOPs are not scaled by density (the
  codebook stores every tap, and the masked XNOR-popcount of a codeword response covers them
  all).

A binary layer is one of the library's binary convs, trainable or inference (a
:class:`~sparks_ext.nn.base.BinaryConvLayer`, whose contract gives the numbers: geometry,
``n_codewords``, ``bits_per_weight``, ``n_experts``, the applied ``kernels()``). A trainable
layer is described by its inference form (``to_inference()``, what :func:`sparks_ext.convert`
deploys: for a signed-binary layer the ternary codebook of its distinct kernels, for 1-bit
experts the codebook of theirs), so a trained model and its converted form give the same table.

Expert layers (``ExpertBinaryConv2d`` / ``ExpertCodebookConv2d``, N experts): binary weights,
real parameters and memory count what is stored, i.e. all N experts' kernels (indices), their
N x C_out scales (and biases) and the gate's Linear, with one shared codebook; BOPs count what
runs per sample, i.e. the one expert the winner-take-all gate picks, and FLOPs add the gate's
C_in x N multiply-accumulates (the global average pool, like all pooling, is not counted).

The result is data (:class:`Summary`); ``print`` it for the table.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from .nn.base import BinaryConvLayer, inference_form, is_binary_layer

__all__ = ["summary", "Summary", "LayerSummary", "is_binary_layer", "binary_conv_bops", "deployed_form"]


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
    effectual_weights: int = 0  # non-zero binary weights ("effectual parameters")
    n_experts: int = 1  # > 1: an expert layer (stores n_experts kernels per weight position)

    @property
    def density(self) -> Optional[float]:
        """Fraction of the binary weights that are non-zero (None for a layer without any)."""
        return self.effectual_weights / self.binary_weights if self.binary_weights else None

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
    effectual_weights = property(lambda self: sum(r.effectual_weights for r in self.rows))
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
    def density(self) -> Optional[float]:
        """Non-zero fraction of all binary weights (None for a model without any)."""
        return self.effectual_weights / self.binary_weights if self.binary_weights else None

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
        return {"binary_weights": self.binary_weights, "effectual_weights": self.effectual_weights,
                "density": self.density, "real_params": self.real_params,
                "memory_bytes": self.memory_bytes, "float32_bytes": self.float32_bytes,
                "compression_ratio": self.compression_ratio, "bops": self.bops,
                "flops": self.flops, "ops": self.ops}

    def __str__(self) -> str:
        # The Density column only appears where it says something: some layer has zeros.
        sparse = any(r.density is not None and r.density < 1 for r in self.rows)
        header = ("Layer", "Type", "Output shape", "Binary w.", "Real params", "Bits/w",
                  *(("Density",) if sparse else ()), "Memory", "BOPs", "FLOPs")

        def density(d):
            return () if not sparse else ("" if d is None else f"{100 * d:.1f}%",)

        lines = [header]
        for r in self.rows:
            lines.append((r.name, r.type, "-" if r.output_shape is None else "x".join(map(str, r.output_shape)),
                          _count(r.binary_weights), _count(r.real_params),
                          "" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}",
                          *density(r.density), _bytes(r.memory_bytes), _count(r.bops), _count(r.flops)))
        lines.append(("Total", "", "", _count(self.binary_weights), _count(self.real_params),
                      "", *density(self.density), _bytes(self.memory_bytes), _count(self.bops),
                      _count(self.flops)))
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
        if self.binary_weights:
            out.append(f"Effectual binary weights (non-zero): {self.effectual_weights:,} of "
                       f"{self.binary_weights:,} (density {100 * self.density:.1f}%)")
        out.append(f"Real-valued parameters: {self.real_params:,}")
        out.append(f"Memory: {_bytes(self.memory_bytes)} vs {_bytes(self.float32_bytes)} in "
                   f"float32 (compression {self.compression_ratio:.1f}x)")
        out.append(f"BOPs: {self.bops:.4g}   FLOPs: {self.flops:.4g}   "
                   f"OPs = BOPs/64 + FLOPs: {self.ops:.4g}")
        experts = [r for r in self.rows if r.n_experts > 1]
        if experts:
            names = ", ".join(f"{r.name} ({r.n_experts} experts)" for r in experts)
            out.append(f"Expert layers {names}: weights, parameters and memory count every expert "
                       f"and the gate; BOPs count the one expert each sample runs (winner-take-all), "
                       f"FLOPs include the gate")
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


def _real_tensors(module: nn.Module, recurse: bool = False):
    """Parameters and floating buffers of ``module`` itself (and of its children with
    ``recurse``)."""
    for t in list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse)):
        if t is not None and t.is_floating_point():
            yield t


deployed_form = inference_form  # the name this module has always exported


def _binary_row(layer: BinaryConvLayer, row: LayerSummary) -> None:
    """Fills ``row`` from ``layer``, the deployed form (:func:`deployed_form`) of a binary layer."""
    kh, kw = layer.kernel_size
    c_in, c_out, groups = layer.in_channels, layer.out_channels, layer.groups
    n = layer.n_codewords
    row.n_experts = layer.n_experts
    # Every expert stores its own kernels (C_out x C_in/g of them); the codebook is shared.
    row.binary_weights = row.n_experts * c_out * (c_in // groups) * kh * kw
    row.effectual_weights = int(layer.kernels().count_nonzero())
    row.n_codewords = n
    codebook_bits = 0
    if n is not None:
        ternary = bool((layer.codebook == 0).any())
        codebook_bits = n * kh * kw * (2 if ternary else 1)
    row.bits_per_weight = float(layer.bits_per_weight)
    row.codebook_bits = codebook_bits
    row.memory_bits = row.binary_weights * row.bits_per_weight + codebook_bits
    # Real parameters of the deployed layer: one scale per output channel (per expert; BatchNorm
    # folds into it), the bias, an expert layer's gate. Codebooks, indices and bits are integer
    # tensors, counted above; the latent weights of a trainable layer are not deployed.
    for t in _real_tensors(layer, recurse=True):
        row.real_params += t.numel()
        row.memory_bits += 8 * t.numel() * t.element_size()


def _new_row(name: str, module: nn.Module, output_shape: Optional[tuple],
             deployed: dict) -> LayerSummary:
    row = LayerSummary(name, type(module).__name__, output_shape)
    if is_binary_layer(module):
        _binary_row(deployed[id(module)], row)
    else:
        for t in _real_tensors(module):
            row.real_params += t.numel()
            row.memory_bits += 8 * t.numel() * t.element_size()
    return row


def _layer_work(module: nn.Module, shape: torch.Size, deployed: dict) -> tuple[float, float]:
    """(BOPs, FLOPs) of one call on one sample, from the output shape. A binary layer is counted
    in its deployed form; an expert layer runs one expert per sample (the winner-take-all
    forward: one conv of C_out channels, whichever expert wins) after its gate, a Linear of
    C_in -> N on the pooled input."""
    if is_binary_layer(module):
        layer = deployed[id(module)]
        kh, kw = layer.kernel_size
        bops = binary_conv_bops(layer.in_channels, layer.out_channels, kh, kw,
                                shape[-2], shape[-1], layer.n_codewords, layer.groups)
        gate = getattr(layer, "gate", None)
        return bops, float(gate.in_features * gate.out_features) if isinstance(gate, nn.Linear) else 0.0
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
    # A real run may update buffers (an expert layer counts its samples in ``usage``): keep
    # them, so that the summary leaves the model as it found it.
    saved = [] if device == "meta" else [(b, b.clone()) for b in model.buffers()]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, copy_ in saved:
                b.copy_(copy_)
    return calls


def _expected_input(model: nn.Module) -> str:
    """What the model's first layer with a channel count takes, as a hint for input_size."""
    for name, module in model.named_modules():
        channels = getattr(module, "in_channels", None)
        if isinstance(channels, int):
            return (f"; its first layer, {name or type(model).__name__} ({type(module).__name__}), "
                    f"takes {channels} input channel{'s' if channels != 1 else ''}: input_size "
                    f"({channels}, H, W) or (N, {channels}, H, W)")
        features = getattr(module, "in_features", None)
        if isinstance(features, int):
            return (f"; its first layer, {name or type(model).__name__} ({type(module).__name__}), "
                    f"takes {features} input features")
    return ""


def _input_shape(model: nn.Module, input_size) -> tuple:
    """(1, C, H, W) from (C, H, W) or (N, C, H, W): counts are per sample."""
    original = input_size
    try:
        if isinstance(input_size, (str, bytes)) or any(isinstance(s, bool) for s in input_size):
            raise TypeError
        input_size = tuple(operator.index(s) for s in input_size)
    except TypeError:  # an int, a string, a float size: not a shape
        input_size = None
    if not isinstance(input_size, tuple) or len(input_size) not in (3, 4):
        raise ValueError(f"input_size must be a shape (C, H, W) or (N, C, H, W) of ints, got "
                         f"{original!r}{_expected_input(model)}")
    if any(s <= 0 for s in input_size):
        raise ValueError(f"input_size must be a shape of positive sizes, got {tuple(input_size)}")
    return (1,) + tuple(input_size[-3:])


def summary(model: nn.Module, input_size: Sequence[int], name: Optional[str] = None) -> Summary:
    """Per-layer table of ``model`` for an input of ``input_size`` ((C, H, W) or (N, C, H, W);
    counts are per sample). Rows are the binary layers and every other leaf module that the
    forward pass calls, in call order. ``print`` the result for the table; its fields and
    :meth:`Summary.totals` give the numbers.

    Output shapes come from one forward pass on a copy of the model on the ``meta`` device
    (shapes only, no arithmetic, so a ResNet-18 at 224 costs nothing); a model that cannot run
    on ``meta`` (data-dependent Python code) runs once for real on a batch of one.
    """
    size = _input_shape(model, input_size)
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    try:
        calls = _trace(copy.deepcopy(model).to("meta"), size, "meta", dtype)
    except (NotImplementedError, RuntimeError, ValueError):
        try:
            calls = _trace(model, size, first.device if first is not None else "cpu", dtype)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"input_size {tuple(input_size)} does not fit the model: its forward "
                             f"pass on a {tuple(size)} input failed ({str(e).splitlines()[0]})"
                             f"{_expected_input(model)}") from e

    modules = _traced_modules(model)
    deployed = {id(m): deployed_form(m) for m in modules.values() if is_binary_layer(m)}
    rows: dict[str, LayerSummary] = {}
    for module_name, shape in calls:
        row = rows.get(module_name)
        if row is None:
            row = rows[module_name] = _new_row(module_name or type(model).__name__,
                                               modules[module_name], tuple(shape[1:]), deployed)
        bops, flops = _layer_work(modules[module_name], shape, deployed)
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
            row = rows[module_name] = _new_row(module_name, module, None, deployed)
            ordered.insert(ordered.index(previous) + 1 if previous is not None else 0, row)
            previous = row
    result = Summary(name or type(model).__name__, size[1:])
    result.rows = ordered
    return result
