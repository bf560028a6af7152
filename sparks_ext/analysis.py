"""Power-law analysis: how often each of the 2^(kh*kw) binary kernels occurs in a layer.

Trained binary networks use a few 3x3 kernels very often and most of the 512 rarely: the
rank/frequency curve is close to a straight line on log-log axes (a power law). This is what
makes a small per-layer codebook (Sparks) lose little accuracy.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import nn

from .nn.base import inference_form, is_binary_layer
from .packing import kernels_to_ids

__all__ = ["codeword_histogram", "binary_kernels", "power_law_exponent", "plot_rank_frequency"]


def binary_kernels(layer: nn.Module) -> torch.Tensor:
    """The (C_out, C_in/g, kh, kw) {-1,0,+1} kernels, as float, that a binary layer of this
    library applies (``kernels()`` of its inference form: ``codebook[indices]`` for codebook
    layers, the bool weight as +-1 for an XnorConv2d; an expert layer's have a leading expert
    dimension); for any other module with a 4-D weight (an ``nn.Conv2d``), the sign of it."""
    if is_binary_layer(layer):
        return inference_form(layer).kernels().float()
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{type(layer).__name__} is not a binary layer of sparks_ext and has no 4-D weight")
    if weight.dtype == torch.bool:
        return weight.float() * 2 - 1
    return torch.where(weight.detach() >= 0, 1.0, -1.0)


def _histogram(kernels: torch.Tensor, name: str) -> torch.Tensor:
    if kernels.dim() < 2:
        raise ValueError(f"{name}: kernels must end in (kh, kw), got shape {tuple(kernels.shape)}")
    kh, kw = kernels.shape[-2:]
    if kh * kw > 16:
        raise ValueError(f"{name}: {kh}x{kw} kernels have 2^{kh * kw} possible values; "
                         f"a histogram needs kh*kw <= 16")
    return torch.bincount(kernels_to_ids(kernels.detach().cpu()).reshape(-1), minlength=2 ** (kh * kw))


def codeword_histogram(model_or_weights: Union[nn.Module, torch.Tensor, Mapping[str, torch.Tensor]]
                       ) -> dict[str, torch.Tensor]:
    """Frequency of each binary kernel, per layer.

    ``model_or_weights`` is a model (every binary layer of this library is counted, trainable or
    inference), a weight tensor (..., kh, kw) binarized by sign, or a dict of such tensors.
    Returns ``{layer name: int64 tensor of 2^(kh*kw) counts}``; entry k counts codeword id k
    (tap t = i*kw + j is bit t, set = +1; see :mod:`sparks_ext.packing`).
    """
    if isinstance(model_or_weights, torch.Tensor):
        return {"weight": _histogram(model_or_weights, "weight")}
    if isinstance(model_or_weights, Mapping):
        return {name: _histogram(w, name) for name, w in model_or_weights.items()}
    if not isinstance(model_or_weights, nn.Module):
        raise ValueError("model_or_weights must be an nn.Module, a tensor or a dict of tensors, "
                         f"got {type(model_or_weights).__name__}")
    result = {}
    for name, module in model_or_weights.named_modules():
        if is_binary_layer(module):
            result[name or type(module).__name__] = _histogram(binary_kernels(module), name)
    if not result:
        raise ValueError(f"{type(model_or_weights).__name__} has no binary layer of sparks_ext; "
                         "pass its weights (a tensor or a dict of tensors) instead")
    return result


def _rank_frequency(counts: torch.Tensor) -> torch.Tensor:
    """Relative frequencies sorted in decreasing order, zeros dropped."""
    freq = counts.double() / counts.sum()
    freq = freq.sort(descending=True).values
    return freq[freq > 0]


def power_law_exponent(counts: torch.Tensor, top: Optional[int] = None) -> float:
    """Slope s of the least-squares line log f = s log r + c over the ``top`` most frequent
    kernels (all used ones by default); f ~ r^s, so a Zipf law gives s = -1."""
    freq = _rank_frequency(counts)
    if top is not None:
        freq = freq[:top]
    if freq.numel() < 2:
        raise ValueError("power_law_exponent needs at least two distinct kernels in use")
    x = torch.arange(1, freq.numel() + 1, dtype=torch.float64).log()
    y = freq.log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def plot_rank_frequency(histograms: Mapping[str, torch.Tensor], path=None, title: Optional[str] = None,
                        max_layers: int = 12):
    """Log-log rank/frequency plot of :func:`codeword_histogram` output, one line per layer
    (at most ``max_layers``, evenly spread over the layers). Saves a PNG to ``path`` if given;
    returns the matplotlib Figure. Needs matplotlib (``pip install matplotlib``)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot_rank_frequency needs matplotlib: pip install matplotlib "
                          "(or pip install 'sparks_ext[plot]')") from None
    if not histograms:
        raise ValueError("histograms is empty")
    names = list(histograms)
    if len(names) > max_layers:
        step = (len(names) - 1) / (max_layers - 1)
        names = [names[round(i * step)] for i in range(max_layers)]
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.add_subplot()
    for name in names:
        freq = _rank_frequency(histograms[name])
        ax.loglog(range(1, freq.numel() + 1), freq.numpy(), marker=".", markersize=3, linewidth=1,
                  label=f"{name} (slope {power_law_exponent(histograms[name]):.2f})"
                  if freq.numel() > 1 else name)
    ax.set_xlabel("rank of the binary kernel")
    ax.set_ylabel("frequency")
    ax.set_title(title or "Binary kernel rank/frequency per layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
