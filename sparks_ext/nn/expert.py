r"""Expert binary convolution (EBConv, Bulat et al., "High-capacity expert binary networks").

N binary convolutions (the experts) share one layer; a gate picks one expert per sample from the
global average pool of the input:

    p      = softmax(Linear(mean_hw(x)))      (or sigmoid)
    onehot = one_hot(argmax Linear(mean_hw(x)))
    y      = sum_e g_e * expert_e(x),  g = onehot + p - p.detach()

so the forward pass runs exactly one expert per sample (winner-take-all) while the backward pass
trains the gate through p (straight-through). Capacity grows N-fold at the cost of one binary
conv per sample plus a tiny gate.

The experts are stored as one trainable layer with N * C_out output channels, expert e owning
channels ``e, e + N, e + 2N, ...`` (this interleaving keeps every expert's channels in the right
group when ``groups > 1``): a :class:`~sparks_ext.nn.BinaryConv2d`, or with ``n_codewords=n``
a :class:`~sparks_ext.nn.SparksConv2d` whose one learned codebook all experts share, each expert
keeping its own indices. At inference (:class:`ExpertCodebookConv2d`) the samples are grouped by
their expert and each group runs :func:`sparks_ext.conv2d` with that expert's indices only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import IntOrPair, conv2d
from ..packing import ids_to_kernels, kernels_to_ids
from .base import BinaryConvLayer, InferenceCodebookConv, TrainableBinaryConv, check_n_codewords
from .binary import BinaryConv2d
from .sparks import SparksConv2d

__all__ = ["ExpertBinaryConv2d", "ExpertCodebookConv2d"]

GATE_ACTIVATIONS = ("softmax", "sigmoid")


class _Experts(BinaryConvLayer):
    """What both expert layers share: the gate, the expert counter and the routed forward."""

    def _init_experts(self, n_experts: int, gate_activation: str):
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        if gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {gate_activation!r}")
        self.n_experts, self.gate_activation = n_experts, gate_activation
        self.gate = nn.Linear(self.in_channels, n_experts)
        # How many samples each expert has received since the last reset_usage(); not saved.
        self.register_buffer("usage", torch.zeros(n_experts, dtype=torch.int64), persistent=False)

    def reset_usage(self) -> None:
        self.usage.zero_()

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_experts) gate logits from the global average pool of x."""
        return self.gate(x.mean(dim=(2, 3)).to(self.gate.weight.dtype))

    def _count(self, winners: torch.Tensor) -> None:
        self.usage.add_(torch.bincount(winners.detach(), minlength=self.n_experts).to(self.usage.device))

    def _routed(self, x, winners, codebook, indices, scale, bias):
        """Each sample through its expert only: samples grouped by expert, one
        :func:`sparks_ext.conv2d` per used expert. ``indices`` (E, C_out, C_in/g), ``scale`` and
        ``bias`` (E, C_out)."""
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        scale = scale.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)

        def run(e, xs):
            return conv2d(xs, codebook, indices[e], scale[e], None if bias is None else bias[e], *geometry)

        if x.shape[0] == 0:
            return run(0, x)
        out = None
        for e in winners.unique().tolist():
            rows = (winners == e).nonzero().squeeze(1)
            y = run(e, x.index_select(0, rows))
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out[rows] = y
        return out

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, gate_activation={self.gate_activation!r}, " + super().extra_repr()


class ExpertBinaryConv2d(_Experts, TrainableBinaryConv):
    r"""Trainable expert binary convolution (module docstring).

    Args: as ``nn.Conv2d`` (``bias=False`` by default), plus
        n_experts: number of experts N >= 1 (default 4).
        gate_activation: ``"softmax"`` or ``"sigmoid"`` after the gate (it shapes the backward
            pass; the forward is one-hot either way).
        n_codewords: None for 1-bit experts, or n for a Sparks codebook of n codewords shared by
            all experts; further keyword arguments go to the experts' layer
            (:class:`~sparks_ext.nn.SparksConv2d` or :class:`~sparks_ext.nn.BinaryConv2d`).

    Training mode evaluates every expert on every sample (one conv with N * C_out channels)
    and mixes them with the straight-through gate; eval mode and ``to_inference()`` run each
    sample through its expert only, via :func:`sparks_ext.conv2d`, with identical results.
    ``usage`` counts the samples routed to each expert (``reset_usage()`` clears it).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair = 3,
                 stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                 groups: int = 1, bias: bool = False, n_experts: int = 4,
                 gate_activation: str = "softmax",
                 n_codewords: Optional[int] = None, **expert_kwargs):
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self._init_experts(n_experts, gate_activation)
        geometry = (self.stride, self.padding, self.dilation, groups)
        if n_codewords is None:
            self.experts = BinaryConv2d(in_channels, n_experts * out_channels, self.kernel_size,
                                        *geometry, bias=bias, **expert_kwargs)
        else:
            self.experts = SparksConv2d(in_channels, n_experts * out_channels, self.kernel_size,
                                        n_codewords, *geometry, bias=bias, **expert_kwargs)

    @property
    def bias(self):
        return self.experts.bias

    @property
    def n_codewords(self) -> Optional[int]:
        return self.experts.n_codewords

    @property
    def bits_per_weight(self) -> float:
        return self.experts.bits_per_weight

    def _per_expert(self, t: torch.Tensor) -> torch.Tensor:
        """(N * C_out, ...) -> (N, C_out, ...): expert e owns rows e, e + N, ..."""
        return t.reshape(self.out_channels, self.n_experts, *t.shape[1:]).transpose(0, 1)

    @torch.no_grad()
    def inference_parts(self):
        """The shared codebook (n, kh, kw) and the per-expert indices (N, C_out, C_in/g),
        scale and bias (N, C_out): exactly what eval mode and the inference layer use."""
        if isinstance(self.experts, SparksConv2d):
            codebook, indices = self.experts.codebook(), self.experts.indices()
        else:  # 1-bit experts: the codebook of their distinct kernels represents them exactly
            kh, kw = self.kernel_size
            ids, indices = torch.unique(kernels_to_ids(self.experts.weight), return_inverse=True)
            codebook = ids_to_kernels(ids, kh, kw)
        scale = self.experts.scale()
        bias = None if self.bias is None else self._per_expert(self.bias)
        return codebook, self._per_expert(indices), self._per_expert(scale), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate_logits(x)
        winners = logits.argmax(dim=1)
        self._count(winners)
        if not self.training:
            codebook, indices, scale, bias = self.inference_parts()
            return self._routed(x, winners, codebook.to(torch.int8), indices, scale, bias)
        probs = logits.softmax(dim=1) if self.gate_activation == "softmax" else logits.sigmoid()
        gates = F.one_hot(winners, self.n_experts).to(probs.dtype) + (probs - probs.detach())
        y = self.experts(x)  # (B, C_out * N, H, W), channel c * N + e from expert e
        y = y.reshape(y.shape[0], self.out_channels, self.n_experts, *y.shape[2:])
        return (y * gates.to(y.dtype)[:, None, :, None, None]).sum(dim=2)

    @torch.no_grad()
    def to_inference(self) -> "ExpertCodebookConv2d":
        codebook, indices, scale, bias = self.inference_parts()
        gate = {f"gate.{name}": t for name, t in self.gate.state_dict().items()}
        return ExpertCodebookConv2d._holding(
            self.geometry_config(), dict(gate, codebook=codebook, indices=indices, scale=scale, bias=bias),
            n_codewords=codebook.shape[0], n_experts=self.n_experts, gate_activation=self.gate_activation)


class ExpertCodebookConv2d(_Experts, InferenceCodebookConv):
    r"""Inference expert convolution: a gate (``nn.Linear`` on the global average pool) picks
    one expert per sample; samples are grouped by expert and each group runs
    :func:`sparks_ext.conv2d` with the shared ``codebook`` and that expert's ``indices``.

    Buffers: ``codebook`` int8 (n, kh, kw); ``indices`` int32 (N, C_out, C_in/groups);
    ``scale`` and ``bias`` float32 (N, C_out). ``usage`` counts samples per expert.
    """

    FILE_ARGS = ("in_channels", "out_channels", "kernel_size", "n_codewords", "stride", "padding",
                 "dilation", "groups", "bias", "n_experts", "gate_activation")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair = 3,
                 n_codewords: int = 32, stride: IntOrPair = 1, padding: IntOrPair = 0,
                 dilation: IntOrPair = 1, groups: int = 1, bias: bool = True, n_experts: int = 4,
                 gate_activation: str = "softmax"):
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self._init_experts(n_experts, gate_activation)
        n_codewords = check_n_codewords(n_codewords)
        kh, kw = self.kernel_size
        self.register_buffer("codebook", torch.ones(n_codewords, kh, kw, dtype=torch.int8))
        self.register_buffer("indices", torch.zeros(n_experts, out_channels, in_channels // groups,
                                                    dtype=torch.int32))
        self.register_buffer("scale", torch.ones(n_experts, out_channels))
        self.register_buffer("bias", torch.zeros(n_experts, out_channels) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        winners = self.gate_logits(x).argmax(dim=1)
        self._count(winners)
        return self._routed(x, winners, self.codebook, self.indices, self.scale, self.bias)
