"""Chain diagnostics: effective sample size, integrated autocorrelation time, R-hat.

Thin wrappers over arviz-stats' array functions (rank-normalized split R-hat, Vehtari et al.
2021; split-chain ESS) for draws shaped ``[chain, draw, ...]``. The integrated autocorrelation
time is ``IAT = chains * draws / ESS``, in units of draws (multiply by ``thin`` for steps).

The ESS is the one of the *mean* (``method="mean"``: the draws themselves, split chains, no
rank normalization): ``Var(mean) = Var(x) / ESS``, the quantity every standard error, block
length and schedule here needs. The bulk ESS (``method="bulk"``) is that of the rank-normalized
draws; for a skewed observable such as a loss it is larger, and its IAT smaller than the
draws' own (by 7% for the quadratic probe loss of a Gaussian chain,
``tests/test_diagnostics.py``), so error bars built on it would be too small.
"""

from __future__ import annotations

import numpy as np
import torch
from arviz_stats.base import array_stats
from torch import Tensor

from suscept.errors import ShapeError


def _to_numpy(draws: Tensor) -> np.ndarray:
    if draws.ndim < 2:
        raise ShapeError(f"diagnostics need draws [chain, draw, ...]; got {tuple(draws.shape)}")
    if draws.shape[1] < 4:
        raise ShapeError(f"diagnostics need at least 4 draws per chain; got {draws.shape[1]}")
    x = draws.detach().to("cpu", torch.float64).numpy()
    return np.moveaxis(x, (0, 1), (-2, -1))  # [..., chain, draw]


def ess(draws: Tensor, method: str = "mean") -> Tensor:
    """Effective sample size per entry, of the mean (default) or ``"bulk"``; shape
    ``draws.shape[2:]``."""
    return torch.as_tensor(np.asarray(array_stats.ess(_to_numpy(draws), method=method)))


def iat(draws: Tensor) -> Tensor:
    """Integrated autocorrelation time in draws, ``chains * draws / ESS``; shape ``[...]``."""
    n = draws.shape[0] * draws.shape[1]
    return n / ess(draws)


def rhat(draws: Tensor) -> Tensor:
    """Rank-normalized split R-hat per entry (needs >= 2 chains or >= 4 draws); ``[...]``."""
    return torch.as_tensor(np.asarray(array_stats.rhat(_to_numpy(draws))))


def summary(draws: Tensor) -> dict[str, float]:
    """Median and worst ESS / IAT / R-hat over the entries of ``draws [chain, draw, ...]``."""
    finite = torch.isfinite(draws.flatten(2)).all(-1).all(-1)
    draws = draws[finite]
    if draws.shape[0] == 0:
        return {}
    e, r = ess(draws).flatten(), rhat(draws).flatten()
    n = draws.shape[0] * draws.shape[1]
    return {"ess_median": float(e.median()), "ess_min": float(e.min()),
            "iat_median": float(n / e.median()), "iat_max": float(n / e.min()),
            "rhat_max": float(r.max())}


def iat_batch_means(m) -> Tensor:
    """Integrated autocorrelation time in draws from segment moments (batch means):
    ``IAT_k ≈ L Var_s(mean_sk) / mean_s(var_sk)`` with ``L`` the mean segment length, for every
    x and y entry of a :class:`~suscept.moments.Moments` ``[kx + ky]`` (NaN with < 2 segments
    or a constant entry). Works on streamed moments, where no draws are kept."""
    n = m.n.to(torch.float64)
    if len(n) < 2 or bool((n < 2).any()):
        return torch.full((m.mean_x.shape[1] + m.mean_y.shape[1],), float("nan"),
                          dtype=torch.float64)
    means = torch.cat([m.mean_x, m.mean_y], 1)
    within = (torch.cat([m.m2_x, m.m2_y], 1) / (n[:, None] - 1)).mean(0)
    out = n.mean() * means.var(0) / within
    return torch.where(within > 0, out, torch.full_like(out, float("nan")))


def pareto_k(log_weights: Tensor) -> Tensor:
    """Pareto shape ``k`` of importance weights, per entry of ``log_weights [chain, draw, k]``:
    a generalized Pareto fitted to the largest weights (as PSIS, Vehtari et al. 2024, "Pareto
    smoothed importance sampling", JMLR, via arviz-stats). ``k < 0.5``: finite variance;
    ``k > 0.7``: the weighted estimate is unreliable whatever its reported error."""
    lw = log_weights.detach().to("cpu", torch.float64)
    lw = lw - lw.amax((0, 1), keepdim=True)
    x = np.moveaxis(np.exp(lw.numpy()), (0, 1), (-2, -1))  # [k, chain, draw]
    try:
        return torch.as_tensor(np.asarray(array_stats.pareto_khat(x, tail="right")))
    except ValueError:  # too few draws for a tail fit, or a constant entry: NaN there
        return torch.as_tensor([_one_k(col) for col in x.reshape(-1, *x.shape[-2:])],
                               dtype=torch.float64).reshape(x.shape[:-2])


def _one_k(x: np.ndarray) -> float:
    try:
        return float(array_stats.pareto_khat(x, tail="right"))
    except ValueError:
        return float("nan")
