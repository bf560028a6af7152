"""Bop, the latent-free optimizer for binary weights (Helwegen et al., NeurIPS 2019).

A binary weight w in {-1, +1} has no latent real value to nudge; Bop keeps an exponential moving
average m of its gradient and flips w when the average pushes against it consistently enough:

    m <- (1 - gamma) * m + gamma * g
    w <- -w   where  w * m > tau

(gradient descent wants to move w along -g, so a flip is due when g, hence m, has w's sign).
Real-valued parameters (BatchNorm, biases, scales, the first and last layers) still need an
ordinary optimizer; like larq's ``CaseOptimizer``, :class:`Bop` owns one and steps it too, so a
training loop sees a single optimizer.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

__all__ = ["Bop"]


class Bop(torch.optim.Optimizer):
    r"""Bop for the binary parameters, plus an ordinary optimizer for everything else.

    Args:
        binary_params: the parameters holding {-1, +1} weights (an iterable of tensors or of
            param-group dicts, as for any torch optimizer). They are checked to be exactly +-1.
        real_optimizer: optional optimizer over the real-valued parameters; it must not hold
            any of ``binary_params``. ``step``, ``zero_grad`` and ``state_dict`` cover it too.
        gamma: adaptivity rate of the gradient moving average, in (0, 1].
        tau: flip threshold, >= 0.

    Per-group ``gamma`` and ``tau`` may be given in param-group dicts. The moving average
    lives in ``state[p]["m"]`` (zeros at the start), so ``state_dict`` / ``load_state_dict``
    round-trip it with the real optimizer's state.

    Layers used with Bop must store their weights as {-1, +1} (sign(+-1) = +-1, so a layer that
    binarizes with sign passes them through unchanged) and be initialised that way, e.g.
    ``with torch.no_grad(): w.copy_(torch.where(w >= 0, 1.0, -1.0))``.
    """

    def __init__(self, binary_params: Iterable, real_optimizer: Optional[torch.optim.Optimizer] = None,
                 gamma: float = 1e-4, tau: float = 1e-8):
        _check_hyper(gamma, tau)
        super().__init__(binary_params, dict(gamma=gamma, tau=tau))
        if real_optimizer is not None and not isinstance(real_optimizer, torch.optim.Optimizer):
            raise ValueError(f"real_optimizer must be a torch.optim.Optimizer, got {type(real_optimizer).__name__}")
        self.real_optimizer = real_optimizer
        binary = {id(p) for g in self.param_groups for p in g["params"]}
        for group in self.param_groups:
            _check_hyper(group["gamma"], group["tau"])
            for p in group["params"]:
                if p.is_complex() or not p.is_floating_point():
                    raise ValueError(f"binary_params must be floating tensors, got {p.dtype}")
                if not bool(((p == 1) | (p == -1)).all()):
                    raise ValueError("binary_params must hold exactly -1 or +1 (initialise them with sign)")
        if real_optimizer is not None:
            shared = [p for g in real_optimizer.param_groups for p in g["params"] if id(p) in binary]
            if shared:
                raise ValueError(f"{len(shared)} parameter(s) are both binary and in real_optimizer")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            gamma, tau = group["gamma"], group["tau"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "m" not in state:
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["m"]
                m.mul_(1 - gamma).add_(p.grad, alpha=gamma)
                p.copy_(torch.where(p * m > tau, -p, p))
        if self.real_optimizer is not None:
            self.real_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        if self.real_optimizer is not None:
            self.real_optimizer.zero_grad(set_to_none)

    def state_dict(self):
        return {"bop": super().state_dict(),
                "real": None if self.real_optimizer is None else self.real_optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        if set(state_dict) != {"bop", "real"}:
            raise ValueError("state_dict must come from Bop.state_dict() (keys 'bop' and 'real')")
        if (state_dict["real"] is None) != (self.real_optimizer is None):
            raise ValueError("state_dict and this Bop disagree on having a real_optimizer")
        super().load_state_dict(state_dict["bop"])
        if self.real_optimizer is not None:
            self.real_optimizer.load_state_dict(state_dict["real"])


def _check_hyper(gamma, tau):
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not tau >= 0:
        raise ValueError(f"tau must be non-negative, got {tau}")
