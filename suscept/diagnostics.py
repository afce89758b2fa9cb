"""Chain diagnostics: effective sample size, integrated autocorrelation time, R-hat.

Thin wrappers over arviz-stats' array functions (rank-normalized split R-hat and bulk ESS,
Vehtari et al. 2021) for draws shaped ``[chain, draw, ...]``. The integrated autocorrelation
time is ``IAT = chains * draws / ESS``, in units of draws (multiply by ``thin`` for steps).
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


def ess(draws: Tensor) -> Tensor:
    """Bulk effective sample size per entry; shape ``draws.shape[2:]``."""
    return torch.as_tensor(np.asarray(array_stats.ess(_to_numpy(draws), method="bulk")))


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
