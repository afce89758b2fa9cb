"""The localized SGLD kernel (docs/theory.md section 2), as a ``build -> (init, update)`` pair.

Plain SGLD, with ``t = n_beta``, anchor ``w*``, minibatch mean-loss gradient ``g_k``::

    w_{k+1} = w_k - (eps/2) [t g_k + gamma (w_k - w*) + lambda_wd w_k] + sqrt(eps) xi_k

RMSprop-preconditioned SGLD (devinterp 2.x constants)::

    V_k = alpha V_{k-1} + (1 - alpha) g_k^2        (V_{-1} = 0, alpha = 0.99)
    G_k = 1 / (sqrt(V_k) + delta)                   (delta = 0.1)
    drift multiplied elementwise by G_k, noise by sqrt(G_k)

A restricted run multiplies drift and noise by a 0/1 mask ``M_C`` so only component C moves.

The kernel works on one flat float vector of parameters (shape ``[d]``); :func:`suscept.sample`
makes that vector the storage of a private copy of the user's module. Randomness comes only
from the ``generator`` passed to ``update``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from suscept.errors import ConfigError

PRECONDITIONERS = (None, "rmsprop")


class SGLDState(NamedTuple):
    """Per-chain state. ``params`` is updated in place (it is the model copy's storage)."""

    params: Float[Tensor, " d"]
    step: int
    sq_avg: Float[Tensor, " d"] | None  # RMSprop V_k; None for plain SGLD


@dataclass(frozen=True)
class SGLDHyper:
    """Hyperparameters of the kernel; ``validate`` names any bad argument."""

    step_size: float
    n_beta: float
    gamma: float = 0.0
    weight_decay: float = 0.0
    precondition: str | None = None
    rmsprop_alpha: float = 0.99
    rmsprop_delta: float = 0.1

    def validate(self) -> None:
        def bad(name: str, value: object, need: str) -> ConfigError:
            return ConfigError(f"{name}={value!r} is invalid: it must be {need}.")

        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise bad("step_size", self.step_size, "a positive finite number (try 1e-4)")
        if not (math.isfinite(self.n_beta) and self.n_beta > 0):
            raise bad("n_beta", self.n_beta, "a positive finite number (n times beta, e.g. 10)")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise bad("gamma", self.gamma, "a finite number >= 0 (the spring to the anchor)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", self.weight_decay, "a finite number >= 0")
        if self.precondition not in PRECONDITIONERS:
            raise bad("precondition", self.precondition, f"one of {PRECONDITIONERS}")
        if not 0 <= self.rmsprop_alpha < 1:
            raise bad("rmsprop_alpha", self.rmsprop_alpha, "in [0, 1)")
        if not self.rmsprop_delta > 0:
            raise bad("rmsprop_delta", self.rmsprop_delta, "positive")


Init = Callable[[Tensor], SGLDState]
Update = Callable[[SGLDState, Tensor, Tensor, torch.Generator], SGLDState]


def build(hyper: SGLDHyper, mask: Float[Tensor, " d"] | None = None) -> tuple[Init, Update]:
    """Build the SGLD kernel.

    Args:
        hyper: step size ``eps``, ``n_beta`` (= t), ``gamma``, ``weight_decay``, preconditioner.
        mask: optional 0/1 vector ``[d]``; entries with 0 never move (restricted run).

    Returns:
        ``init(params) -> SGLDState`` and ``update(state, grad, anchor, generator) -> SGLDState``,
        where ``grad`` is the gradient of the minibatch *mean* loss at ``state.params`` and
        ``anchor`` is w*. ``update`` writes ``w_{k+1}`` into ``state.params`` in place.
    """
    hyper.validate()
    eps, t, gamma, wd = hyper.step_size, hyper.n_beta, hyper.gamma, hyper.weight_decay
    rms = hyper.precondition == "rmsprop"
    alpha, delta = hyper.rmsprop_alpha, hyper.rmsprop_delta
    sqrt_eps = math.sqrt(eps)

    def init(params: Tensor) -> SGLDState:
        sq_avg = torch.zeros_like(params) if rms else None
        return SGLDState(params=params, step=0, sq_avg=sq_avg)

    def update(state: SGLDState, grad: Tensor, anchor: Tensor, generator: torch.Generator):
        w = state.params
        # drift = t g + gamma (w - w*) + lambda_wd w, all at w_k
        drift = torch.mul(grad, t)
        if gamma:
            drift.add_(w - anchor, alpha=gamma)
        if wd:
            drift.add_(w, alpha=wd)
        noise = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device)
        sq_avg = state.sq_avg
        if rms:
            sq_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
            precond = sq_avg.sqrt().add_(delta).reciprocal_()
            drift.mul_(precond)
            noise.mul_(precond.sqrt_())
        # delta_w = -(eps/2) drift + sqrt(eps) xi, masked
        drift.mul_(-eps / 2).add_(noise, alpha=sqrt_eps)
        if mask is not None:
            drift.mul_(mask)
        w.add_(drift)
        return SGLDState(params=w, step=state.step + 1, sq_avg=sq_avg)

    return init, update
