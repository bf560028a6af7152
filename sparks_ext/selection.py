"""Learning which n of the 2^(kh*kw) binary kernels a layer may use (docs/design.md, section 6).

The selection is a permutation of the full codebook whose first n rows name the chosen
codewords. Only those n rows matter, so a layer keeps logits ``X`` of shape (n, M), M = 2^(kh*kw),
rather than (M, M): the rows of a permutation matrix that pick the codewords. Sinkhorn balances
them against one *slack* row of capacity M - n (the M - n codewords left out, whose order does not
matter), i.e. the (n + 1) x M entropic transport problem whose hard solution is exactly the first
n rows of a permutation. For n = M it is plain square Sinkhorn (doubly stochastic output).
This costs O(n * M) per iteration instead of O(M^2): 16.9k entries instead of 262k for n = 32
on 3x3 kernels.

- :func:`sinkhorn`: log-domain Sinkhorn iterations -> soft (n, M) selection.
- :func:`gumbel_noise`: noise from an explicit generator, so every DDP rank draws the same.
- :func:`hungarian`: the hard selection, n distinct columns (scipy's ``linear_sum_assignment``).
- :func:`pste`: the Permutation Straight-Through Estimator: hard forward, soft backward.
- :class:`TemperatureSchedule`: exponential decay of the Sinkhorn temperature tau.

Defaults that work in a plain training loop (one optimizer, its usual learning rate, no
schedule): the selection logits enter scaled by ``logit_scale`` (50), so that an optimizer step
of 1e-3 on the parameter moves the effective logit by 0.05, enough to outgrow the Gumbel noise and
the random initialisation within a few hundred steps; the noise is scaled by the temperature, so
exploration fades as tau falls; and a layer whose temperature is never set (by
:func:`set_temperature`) follows its own schedule, tau = 1 -> 0.05 over ``auto_tau_steps``
(500) of its training steps, then 0.05. Without these, a loop that never touches the temperature
keeps tau = 1 and logits that move 1e-3 per step under O(1) noise: every Hungarian refresh then
draws a new, essentially random set of codewords, and the trained network keeps the last draw.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["sinkhorn", "gumbel_noise", "hungarian", "pste", "TemperatureSchedule",
           "set_temperature", "current_temperature"]


def sinkhorn(log_alpha: torch.Tensor, n_iters: int = 20) -> torch.Tensor:
    """Soft selection from logits ``log_alpha`` (n, M), n <= M, by log-domain Sinkhorn.

    Returns P (n, M) with rows summing to 1 and columns summing to at most 1 (exactly 1 when
    n = M: a doubly stochastic matrix). For n < M the logits are balanced against a slack row of
    zeros with row marginal M - n, which absorbs the unselected columns.
    """
    if log_alpha.dim() != 2 or log_alpha.shape[0] > log_alpha.shape[1]:
        raise ValueError(f"log_alpha must be (n, M) with n <= M, got {tuple(log_alpha.shape)}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be at least 1, got {n_iters}")
    n, m = log_alpha.shape
    log_p = log_alpha
    log_rows = None
    if n < m:
        log_p = torch.cat([log_alpha, log_alpha.new_zeros(1, m)])
        log_rows = torch.zeros(n + 1, 1, dtype=log_alpha.dtype, device=log_alpha.device)
        log_rows[n] = math.log(m - n)
    for _ in range(n_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        if log_rows is not None:
            log_p = log_p + log_rows
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
    return log_p[:n].exp()


def gumbel_noise(shape, generator: torch.Generator, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)`` drawn from ``generator``."""
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    tiny = torch.finfo(dtype).tiny
    return -torch.log((-torch.log(u.clamp_min(tiny))).clamp_min(tiny))


def hungarian(soft: torch.Tensor) -> torch.Tensor:
    """The hard selection that best matches the soft one: for P (n, M), the n distinct column
    indices (row i -> column cols[i]) maximising sum_i log P[i, cols[i]], as int64 on P's device."""
    from scipy.optimize import linear_sum_assignment  # imported here: keeps `import sparks_ext` light

    score = soft.detach().double().clamp_min(1e-300).log().cpu().numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    out = np.empty(soft.shape[0], dtype=np.int64)
    out[rows] = cols
    return torch.from_numpy(out).to(soft.device)


def pste(soft: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Permutation Straight-Through Estimator: the hard one-hot rows ``cols`` in the forward pass,
    the gradient of ``soft`` in the backward pass. The forward values are exactly 0/1."""
    hard = torch.nn.functional.one_hot(cols, soft.shape[1]).to(soft.dtype)
    return hard + (soft - soft.detach())


class TemperatureSchedule:
    """tau(step) decays exponentially from ``start`` to ``end`` over ``steps`` steps, then stays."""

    def __init__(self, start: float = 1.0, end: float = 0.05, steps: int = 1000):
        if not (start > 0 and end > 0 and steps >= 1):
            raise ValueError(f"need start > 0, end > 0, steps >= 1; got {start}, {end}, {steps}")
        self.start, self.end, self.steps = start, end, steps

    def __call__(self, step: int) -> float:
        t = min(max(step, 0), self.steps) / self.steps
        return self.start * (self.end / self.start) ** t


def set_temperature(module: torch.nn.Module, tau: float) -> None:
    """Sets the Sinkhorn temperature of every layer in ``module`` that learns a selection (from
    then on the layer uses it instead of its automatic schedule)."""
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    for m in module.modules():
        if hasattr(m, "temperature") and isinstance(getattr(m, "temperature"), torch.Tensor):
            m.temperature.fill_(tau)
            if isinstance(getattr(m, "temperature_set", None), torch.Tensor):
                m.temperature_set.fill_(True)


def current_temperature(layer: torch.nn.Module) -> float:
    """The temperature ``layer``'s next training step uses: the one set by
    :func:`set_temperature`, or else its automatic schedule at its step count."""
    if bool(layer.temperature_set):
        return float(layer.temperature)
    return TemperatureSchedule(1.0, AUTO_TAU_END, layer.auto_tau_steps)(int(layer.step))


AUTO_TAU_END = 0.05


def add_selection_state(layer: torch.nn.Module, n_codewords: int, total: int, sinkhorn_iters: int,
                        hungarian_every: int, gumbel_scale: float, logit_scale: float = 50.0,
                        auto_tau_steps: int = 500) -> None:
    """Gives ``layer`` the state :func:`select_codewords` reads, for n_codewords of total
    codewords: the ``logits`` parameter and the ``temperature``, ``temperature_set``, ``step``,
    ``noise_seed`` and ``selected`` buffers, and the settings ``logit_scale`` and
    ``auto_tau_steps`` (module docstring). Raises ValueError for sinkhorn_iters,
    hungarian_every or auto_tau_steps below 1, a negative gumbel_scale or a logit_scale <= 0."""
    if sinkhorn_iters < 1 or hungarian_every < 1:
        raise ValueError(f"sinkhorn_iters ({sinkhorn_iters}) and hungarian_every ({hungarian_every}) must be >= 1")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive number, got {logit_scale!r}")
    if not (isinstance(gumbel_scale, (int, float)) and math.isfinite(gumbel_scale) and gumbel_scale >= 0):
        raise ValueError(f"gumbel_scale must be a non-negative number, got {gumbel_scale!r}")
    if isinstance(auto_tau_steps, bool) or not isinstance(auto_tau_steps, int) or auto_tau_steps < 1:
        raise ValueError(f"auto_tau_steps must be a positive integer, got {auto_tau_steps!r}")
    layer.sinkhorn_iters, layer.hungarian_every = sinkhorn_iters, hungarian_every
    layer.gumbel_scale, layer.logit_scale = float(gumbel_scale), float(logit_scale)
    layer.auto_tau_steps = auto_tau_steps
    # Effective logits logit_scale * X start with std 0.01, as before the scale existed.
    layer.logits = torch.nn.Parameter((0.01 / layer.logit_scale) * torch.randn(n_codewords, total))
    layer.register_buffer("temperature", torch.tensor(1.0))
    layer.register_buffer("temperature_set", torch.tensor(False))
    layer.register_buffer("step", torch.tensor(0, dtype=torch.int64))
    layer.register_buffer("noise_seed", torch.randint(0, 2 ** 31 - 1, (), dtype=torch.int64))
    layer.register_buffer("selected", hungarian(sinkhorn(layer.logit_scale * layer.logits.detach(), sinkhorn_iters)))


def select_codewords(layer: torch.nn.Module) -> torch.Tensor:
    """The (n, M) selection matrix of a layer that learns n of M codewords.

    ``layer`` holds ``logits`` (n, M) and the buffers of :func:`add_selection_state`. In eval
    mode the rows are the cached one-hot selection. In training the soft selection is
    ``sinkhorn((logit_scale * X + gumbel_scale * tau * G) / tau)`` with Gumbel noise G and tau
    from :func:`current_temperature`; the forward value is the hard selection, refreshed by the
    Hungarian algorithm every ``hungarian_every`` steps, and the gradient is the soft one's (PSTE).
    The Gumbel noise comes from a generator seeded by (noise_seed, step) buffers, so every
    DistributedDataParallel rank draws the same noise and selects the same codewords.
    """
    logits = layer.logits
    if not layer.training:
        return torch.nn.functional.one_hot(layer.selected, logits.shape[-1]).to(logits.dtype)
    step = int(layer.step)
    generator = torch.Generator(device=logits.device)
    generator.manual_seed((int(layer.noise_seed) * 1_000_003 + step) % (2 ** 63))
    noise = gumbel_noise(logits.shape, generator, logits.dtype, logits.device)
    tau = current_temperature(layer)
    soft = sinkhorn((layer.logit_scale * logits + (layer.gumbel_scale * tau) * noise) / tau, layer.sinkhorn_iters)
    if step % layer.hungarian_every == 0:
        layer.selected.copy_(hungarian(soft))
    layer.step.add_(1)
    return pste(soft, layer.selected)
