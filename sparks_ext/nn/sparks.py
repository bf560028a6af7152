"""SparksConv2d: a binary convolution that learns its own sub-codebook of n codewords.

The full codebook holds all M = 2^(kh*kw) binary kernels. The layer learns which n of them to
keep by permutation learning (see :mod:`sparks_ext.selection`): logits X (n, M) plus Gumbel
noise, divided by the temperature tau, go through Sinkhorn to a soft selection P; the Hungarian
algorithm turns P into n distinct codewords; the forward pass uses the hard selection and the
backward pass the soft one (PSTE). So the selected codewords never repeat.

Every kernel is the selected codeword with the largest inner product with its latent weights;
the latent weights get the straight-through gradient of their kernel (clipped to |W| <= 1), the
selected codewords the summed gradient of the kernels that use them (which reaches X through P).
Output channel o is scaled by alpha_o = mean |W_o|.

Keeping the selection cheap and identical on every DDP rank:
- The Hungarian step runs every ``hungarian_every`` training steps (steps 0, k, 2k, ...); in
  between the cached hard selection (buffer ``selected``) is used, while P is recomputed every
  step for the gradient. Sinkhorn on (n + 1) x M entries is far cheaper than the convolution.
- The Gumbel noise comes from a generator seeded by the buffers ``noise_seed`` and ``step``;
  DDP broadcasts buffers from rank 0, so all ranks draw the same noise, compute the same P from
  the same (all-reduced) X, and pick the same codewords.
"""
from __future__ import annotations

import torch

from ..ops import IntOrPair, conv2d
from ..packing import full_codebook
from ..selection import add_selection_state, select_codewords
from .base import check_n_codewords, codebook_bits_per_weight
from .binary import _LatentBinaryConv
from .codebook import CodebookConv2d

__all__ = ["SparksConv2d"]


class SparksConv2d(_LatentBinaryConv):
    r"""Trainable sub-bit convolution with a learned codebook of ``n_codewords`` binary kernels.

    Args: as ``nn.Conv2d`` (``bias=False`` by default), plus
        n_codewords: n, the codebook size (1 <= n <= 2^(kh*kw)); log2(n)/(kh*kw) bits per weight.
        sinkhorn_iters: Sinkhorn iterations per training step.
        hungarian_every: training steps between recomputations of the hard selection.
        gumbel_scale: multiplier of the Gumbel noise, which is also scaled by the temperature
            (0 turns it off).
        logit_scale: the selection uses ``logit_scale * logits``, so that an ordinary optimizer
            step on ``logits`` moves the selection fast enough (see :mod:`sparks_ext.selection`).
        auto_tau_steps: without :func:`~sparks_ext.selection.set_temperature`, the temperature
            decays from 1 to 0.05 over this many training steps of the layer.
        backend: training forward, ``"dense"`` (F.conv2d on the binarized input) or ``"op"``
            (:func:`sparks_ext.binary_conv2d` with its autograd; the codebook op cannot carry the
            per-kernel gradient the latent weights need). Eval mode always runs
            :func:`sparks_ext.conv2d` with the selected codebook, exactly as the inference layer.

    The Sinkhorn temperature is the buffer ``temperature`` (set it with
    :func:`sparks_ext.selection.set_temperature`, e.g. from a ``TemperatureSchedule`` over the
    run; until then the layer follows its own schedule, which suits runs of ~500+ steps).
    ``to_inference()`` returns the :class:`~sparks_ext.nn.CodebookConv2d` whose output equals
    this layer's eval-mode output exactly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair = 3,
                 n_codewords: int = 32, stride: IntOrPair = 1, padding: IntOrPair = 0,
                 dilation: IntOrPair = 1, groups: int = 1, bias: bool = False,
                 sinkhorn_iters: int = 20, hungarian_every: int = 10, gumbel_scale: float = 1.0,
                 backend: str = "dense", logit_scale: float = 50.0, auto_tau_steps: int = 500):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, backend)
        kh, kw = self.kernel_size
        total = 2 ** (kh * kw)
        self.n_codewords = n_codewords = check_n_codewords(n_codewords, self.kernel_size, learned=True)
        add_selection_state(self, n_codewords, total, sinkhorn_iters, hungarian_every, gumbel_scale,
                            logit_scale, auto_tau_steps)
        self.register_buffer("full_codebook", full_codebook(kh, kw).reshape(total, kh * kw), persistent=False)

    @property
    def bits_per_weight(self) -> float:
        return codebook_bits_per_weight(self.n_codewords, self.kernel_size)

    def _selection(self) -> torch.Tensor:
        """(n, M) selection matrix: hard 0/1 rows in the forward pass; in training, with the
        gradient of the Gumbel-Sinkhorn soft selection (PSTE)."""
        return select_codewords(self)

    def codebook(self) -> torch.Tensor:
        """The selected codewords (n, kh, kw), {-1,+1}, without gradient (as in eval mode)."""
        return self.full_codebook[self.selected].reshape(-1, *self.kernel_size)

    def indices(self, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Each kernel's nearest selected codeword (largest inner product with its latent
        weights, first on ties), int64 (C_out, C_in/groups)."""
        codebook = self.codebook() if codebook is None else codebook
        scores = torch.einsum("oikl,nkl->oin", self.weight.detach(), codebook.detach().to(self.weight.dtype))
        return scores.argmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codebook = (self._selection() @ self.full_codebook).reshape(-1, *self.kernel_size)
        indices = self.indices(codebook)
        if not self.training:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return conv2d(x, codebook.to(x.dtype), indices, self.scale().to(x.dtype), bias, *self._geometry())
        return self._conv(x, self._ste(codebook[indices]))

    @torch.no_grad()
    def to_inference(self) -> CodebookConv2d:
        return self._codebook_layer(self.codebook(), self.indices())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", hungarian_every={self.hungarian_every}"
