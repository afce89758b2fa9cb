"""Choosing thin, chains and draws from the measured autocorrelation and costs.

An observable with integrated autocorrelation time ``tau`` (in SGLD steps) is modelled as an
AR(1) sequence with lag-one correlation ``rho = (tau - 1) / (tau + 1)`` (whose IAT is
``(1 + rho) / (1 - rho) = tau``). Keeping every ``thin``-th step gives a chain with IAT
``tau_thin = (1 + rho^thin) / (1 - rho^thin)`` in draws. With ``c_step`` seconds per SGLD step
(all chains, batched or not) and ``c_eval`` per evaluation of the observables, a draw costs
``thin c_step + c_eval`` and an *effective* draw costs

    cost(thin) = (thin c_step + c_eval) * tau_thin

:func:`schedule` minimizes it over ``thin``, then spreads the draws needed for ``ess`` effective
draws over ``chains`` chains (at least 4: split-half reliability and R-hat need two halves of
at least two chains) and adds the burn-in. It chooses; it does not change the estimand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from suscept.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """The chosen layout and what it is predicted to cost.

    Attributes:
        thin, n_chains, n_draws, burn_in: the :class:`~suscept.SamplerConfig` fields to use.
        tau_draws: predicted IAT of the thinned chain, in draws.
        seconds: predicted seconds (burn-in included) for ``ess`` effective draws.
        cost_per_effective_draw: seconds per effective draw at the chosen thin.
        table: ``{thin: cost per effective draw}`` for every thin tried.
    """

    thin: int
    n_chains: int
    n_draws: int
    burn_in: int
    tau_draws: float
    seconds: float
    cost_per_effective_draw: float
    table: dict


def thinned_iat(tau: float, thin: int) -> float:
    """IAT in draws after keeping every ``thin``-th step of an AR(1) chain of IAT ``tau``."""
    if tau <= 1:
        return 1.0
    rho = ((tau - 1) / (tau + 1)) ** thin
    return (1 + rho) / (1 - rho)


def schedule(tau_steps: float, step_seconds: float, eval_seconds: float, *, ess: float,
             burn_in: int = 0, n_chains: int = 4, max_thin: int = 64) -> Schedule:
    """The thin with the lowest cost per effective draw, and the draws for ``ess``.

    Args:
        tau_steps: IAT of the observable in SGLD steps (``diagnostics.iat`` of the draws of a
            pilot run times its ``thin``; the slowest observable that matters).
        step_seconds: seconds of one SGLD step of all chains (measured; batched or not).
        eval_seconds: seconds of one evaluation of the observables for all chains.
        ess: effective draws wanted in all (e.g. from a pilot's split-half reliability and
            Spearman-Brown).
        burn_in: steps per chain before the first draw.
        n_chains: chains (at least 4).
    """
    if not (tau_steps >= 1 and step_seconds > 0 and eval_seconds >= 0 and ess > 0):
        raise ConfigError(f"schedule needs tau_steps >= 1, step_seconds > 0, eval_seconds >= 0 "
                          f"and ess > 0; got {tau_steps}, {step_seconds}, {eval_seconds}, {ess}")
    if n_chains < 4:
        raise ConfigError(f"n_chains={n_chains}: use at least 4 (two halves of two chains)")
    table = {t: (t * step_seconds + eval_seconds) * thinned_iat(tau_steps, t)
             for t in range(1, max_thin + 1)}
    thin = min(table, key=table.get)
    tau_d = thinned_iat(tau_steps, thin)
    n_draws = max(2, math.ceil(ess * tau_d / n_chains))
    seconds = n_draws * (thin * step_seconds + eval_seconds) + burn_in * step_seconds
    return Schedule(thin, n_chains, n_draws, burn_in, tau_d, seconds, table[thin], table)
