r"""Signed binarization (Kuhar et al., "the repetition-sparsity trade-off"): binary locally,
ternary globally.

Each *region* of the weight (an output channel by default, or a single kh x kw kernel) gets a
sign s in {-1, +1}, and its weights are quantized to {0, s}:

    s     = sign(mean of the region's latent weights)           (sign(0) = +1)
    delta = threshold * mean |W| over the region,  0 <= threshold < 1
    q     = s * [s * W > delta]

so a weight is kept (as s) where it points the region's way by more than delta and is zero
otherwise. Kernels are then {0,+1}- or {0,-1}-patterns: they repeat often (few distinct
kernels, like binary ones) and are sparse. At inference the distinct kernels form a ternary
codebook for :func:`sparks_ext.conv2d`, whose response is a masked XNOR-popcount.

Gradients reach the latent weights through a surrogate of q (the forward values stay exact):
- ``gradient="ste"``: the clipped straight-through estimator, d q / d W = 1 where |W| <= 1;
- ``gradient="ede"``: IR-Net's error decay estimator on the step at the threshold,
  q ~ s * (1 + k tanh(t (s W - delta))) / 2, so d q / d W = k t (1 - tanh^2(t (s W - delta))) / 2,
  with t = t_min * 10^(p * log10(t_max / t_min)) and k = max(1 / t, 1) at training progress p in
  [0, 1] (t_min = 0.1, t_max = 10): early on a wide, identity-like gradient, late a sharp one
  near the threshold. Set p with :func:`set_ede_progress`.

With ``n_codewords=n`` the layer also learns a Sparks sub-codebook: n distinct {0,1} masks out of
the 2^(kh*kw) (Gumbel-Sinkhorn + Hungarian + PSTE, as :class:`~sparks_ext.nn.SparksConv2d`), and
every kernel is s times the mask that best fits it, i.e. maximising <mask, s W - delta> (with
all 2^(kh*kw) masks this is exactly the threshold rule above).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops import IntOrPair, conv2d
from ..packing import full_codebook
from ..quantizers import sign, sign_ste
from ..selection import add_selection_state, select_codewords
from .base import check_n_codewords
from .binary import _LatentBinaryConv
from .codebook import CodebookConv2d

__all__ = ["SignedBinaryConv2d", "SignedCodebookConv2d", "signed_binarize", "ede_parameters",
           "set_ede_progress"]

REGIONS = ("channel", "kernel")
GRADIENTS = ("ste", "ede")


def _region_dims(region: str):
    return (1, 2, 3) if region == "channel" else (2, 3)


def signed_binarize(weight: torch.Tensor, threshold: float = 0.5, region: str = "channel"):
    """The signed-binary quantization of ``weight`` (C_out, C_in/g, kh, kw), without gradient.

    Returns ``(q, s, delta)``: q in {-1, 0, +1} of weight's shape, and the region sign s and
    threshold delta, broadcastable to it ((C_out, 1, 1, 1) per channel, (C_out, C_in/g, 1, 1)
    per kernel).
    """
    _check_threshold(threshold)
    _check_choice(region, REGIONS, "region")
    w = weight.detach()
    dims = _region_dims(region)
    s = sign(w.mean(dim=dims, keepdim=True))
    delta = threshold * w.abs().mean(dim=dims, keepdim=True)
    return s * (s * w > delta).to(w.dtype), s, delta


def ede_parameters(progress: float, t_min: float = 0.1, t_max: float = 10.0):
    """IR-Net's EDE schedule: ``(t, k)`` at training progress in [0, 1]."""
    if not 0 <= progress <= 1:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if not 0 < t_min <= t_max:
        raise ValueError(f"need 0 < t_min <= t_max, got {t_min}, {t_max}")
    t = t_min * 10 ** (progress * math.log10(t_max / t_min))
    return t, max(1.0 / t, 1.0)


def set_ede_progress(module: torch.nn.Module, progress: float, t_min: float = 0.1,
                     t_max: float = 10.0) -> None:
    """Sets the EDE temperature of every :class:`SignedBinaryConv2d` in ``module`` for training
    progress ``progress`` in [0, 1] (e.g. ``step / total_steps``)."""
    t, _ = ede_parameters(progress, t_min, t_max)
    for m in module.modules():
        if isinstance(m, SignedBinaryConv2d):
            m.ede_t.fill_(t)


class SignedBinaryConv2d(_LatentBinaryConv):
    r"""Trainable signed-binary convolution: ``conv(sign(x), q(W)) * mean|W| + bias`` with q the
    signed-binary quantizer (module docstring).

    Args: as ``nn.Conv2d`` (``bias=False`` by default), plus
        threshold: the fraction of mean |W| a weight must exceed (in the region's direction) to
            be kept; 0 <= threshold < 1. Larger means sparser.
        region: ``"channel"`` (one sign per output channel) or ``"kernel"`` (one per kernel).
        gradient: ``"ste"`` or ``"ede"`` (see :func:`set_ede_progress`).
        n_codewords: None (every {0, s} pattern allowed) or n, to learn a sub-codebook of n
            masks (1 <= n <= 2^(kh*kw)); ``sinkhorn_iters``, ``hungarian_every``,
            ``gumbel_scale``, ``logit_scale`` and ``auto_tau_steps`` as for
            :class:`~sparks_ext.nn.SparksConv2d`.

    ``density`` is the fraction of non-zero quantized weights. Training mode runs a dense float
    convolution of the binarized input; eval mode runs :func:`sparks_ext.conv2d` on the ternary
    codebook of the distinct kernels, exactly as ``to_inference()``'s layer does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair = 3,
                 stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                 groups: int = 1, bias: bool = False, threshold: float = 0.5,
                 region: str = "channel", gradient: str = "ste", n_codewords: Optional[int] = None,
                 sinkhorn_iters: int = 20, hungarian_every: int = 10, gumbel_scale: float = 1.0,
                 logit_scale: float = 50.0, auto_tau_steps: int = 500):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, "dense")
        _check_threshold(threshold)
        self.threshold = float(threshold)
        self.region = _check_choice(region, REGIONS, "region")
        self.gradient = _check_choice(gradient, GRADIENTS, "gradient")
        self.register_buffer("ede_t", torch.tensor(0.1))
        self.n_codewords = None if n_codewords is None else check_n_codewords(
            n_codewords, self.kernel_size, learned=True)
        if n_codewords is None:
            return
        kh, kw = self.kernel_size
        total = 2 ** (kh * kw)
        add_selection_state(self, self.n_codewords, total, sinkhorn_iters, hungarian_every, gumbel_scale,
                            logit_scale, auto_tau_steps)
        masks = (full_codebook(kh, kw).reshape(total, kh * kw) > 0).float()
        self.register_buffer("masks", masks, persistent=False)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: a mask bit per weight (or a log2(n)-bit mask index per kernel
        with a learned sub-codebook) plus one sign bit per region."""
        kh, kw = self.kernel_size
        per_region = kh * kw * (self.in_channels // self.groups if self.region == "channel" else 1)
        mask_bits = 1.0 if self.n_codewords is None else math.log2(self.n_codewords) / (kh * kw)
        return mask_bits + 1.0 / per_region

    @property
    def density(self) -> float:
        """Fraction of non-zero weights in the quantized kernels."""
        q = self.quantized_weight()
        return int(q.count_nonzero()) / q.numel()

    def _selection(self) -> torch.Tensor:
        """(n, M) selection of masks: hard 0/1 rows; in training with the Gumbel-Sinkhorn
        gradient (PSTE). Same schedule and DDP-safe noise as SparksConv2d."""
        return select_codewords(self)

    def _quantize(self, codebook_masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Quantized kernels in {-1,0,+1}. ``codebook_masks`` (n, kh*kw), possibly carrying
        gradient to the selection logits, restricts kernels to s times one of its rows."""
        q, s, delta = signed_binarize(self.weight, self.threshold, self.region)
        if codebook_masks is None:
            return q
        w = self.weight.detach()
        target = (s * w - delta).flatten(2)  # (C_out, C_in/g, kh*kw): the gain of keeping each tap
        best = (target @ codebook_masks.detach().t().to(w.dtype)).argmax(dim=-1)
        return s * codebook_masks.to(w.dtype)[best].reshape(w.shape)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The {-1, 0, +1} kernels used in eval mode, (C_out, C_in/g, kh, kw)."""
        masks = None if self.n_codewords is None else self.masks[self.selected]
        return self._quantize(masks)

    def _surrogate(self) -> torch.Tensor:
        w = self.weight
        if self.gradient == "ste":
            return w.clamp(-1, 1)
        _, s, delta = signed_binarize(w, self.threshold, self.region)
        t = float(self.ede_t)
        k = max(1.0 / t, 1.0)
        return s * (k / 2) * torch.tanh(t * (s * w - delta))

    def codebook_and_indices(self):
        """The ternary codebook of the distinct quantized kernels (n, kh, kw), in order of their
        ternary pattern, and each kernel's index (C_out, C_in/g), int64."""
        q = self.quantized_weight()
        kh, kw = self.kernel_size
        codebook, indices = torch.unique(q.reshape(-1, kh * kw), dim=0, return_inverse=True)
        return codebook.reshape(-1, kh, kw), indices.reshape(q.shape[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.scale().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.training:
            codebook, indices = self.codebook_and_indices()
            return conv2d(x, codebook.to(torch.int8), indices, alpha, bias, *self._geometry())
        masks = None if self.n_codewords is None else self._selection() @ self.masks
        surrogate = self._surrogate()
        weight = (self._quantize(masks) + (surrogate - surrogate.detach())).to(x.dtype)
        out = F.conv2d(sign_ste(x), weight, None, self.stride, self.padding, self.dilation, self.groups)
        out = out * alpha[None, :, None, None]
        return out if bias is None else out + bias[None, :, None, None]

    @torch.no_grad()
    def to_inference(self) -> "SignedCodebookConv2d":
        """The :class:`SignedCodebookConv2d` whose output equals this layer's eval output."""
        return self._codebook_layer(*self.codebook_and_indices(), cls=SignedCodebookConv2d)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", threshold={self.threshold:g}, region={self.region!r}, "
                f"gradient={self.gradient!r}")


class SignedCodebookConv2d(CodebookConv2d):
    """A :class:`~sparks_ext.nn.CodebookConv2d` holding a ternary (signed-binary) codebook; it
    adds ``density``, the fraction of non-zero weights of its decoded kernels."""

    @property
    def density(self) -> float:
        nonzero = (self.codebook != 0).flatten(1).sum(dim=1)
        return int(nonzero[self.indices.long()].sum()) / (self.indices.numel() * self.codebook[0].numel())


def _check_threshold(threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
