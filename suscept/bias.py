"""The step-size bias of chain estimates, and how to remove it.

Full-batch SGLD on a quadratic loss has stationary covariance ``Sigma_eps = (P - (eps/4) P^2)^-1``
(docs/theory.md section 2), not the posterior's ``P^-1``; its mean is exact. Along an
eigendirection of ``P`` with precision ``p`` (``x = eps p / 4``), for quadratic observables
``Q = b^T (w - mu) + 1/2 (w - mu)^T A (w - mu)`` (docs/theory.md section 7):

=====================================  ==================================  =====================
quantity (chain / posterior)           gradient term ``b^T S b``            curvature term
                                                                            ``1/2 tr(A S A S)``
=====================================  ==================================  =====================
chain covariance ``Cov_eps(Q_i, Q_j)``  ``1 / (1 - x)``                     ``1 / (1 - x)^2``
chain response ``dE_eps[Q_q]/drho_j``   ``1``                               ``(1 - 2x) / (1 - x)^2``
response / chain prediction             ``1 - x``                           ``1 - 2x``
=====================================  ==================================  =====================

(the response: ``d/dp 1/(p (1 - eps p/4)) = -(1 - eps p/2) / (p (1 - eps p/4))^2`` against the
posterior's ``-1/p^2``; the mean, hence the gradient part of the response, is exact). So
covariances, BIFs and susceptibilities from chain draws overstate the posterior's by up to
``1/(1 - x)^2``, and a chain's measured response to re-weighting falls short of the BIF the same
chain predicts by ``1 - x`` to ``1 - 2x``.

Three ways out, each exact where stated:

- :func:`richardson`: estimates at two step sizes, extrapolated linearly to ``eps = 0``; removes
  the first-order bias of every estimand (the remainder is ``O(x_1 x_2)`` per direction).
- :func:`debias`: divide by the factor of one known ``p``; exact where every direction shares it,
  as in the spring-only control (``p = gamma + lambda_wd``, :mod:`suscept.spring`), which can also
  be drawn from the continuous law directly (``match_chain=False``).
- :func:`posterior_covariance`: ``P^-1`` from a Gaussian chain's parameter covariance
  ``Sigma_eps``, inverting ``Sigma_eps^-1 = P - (eps/4) P^2`` eigenvalue by eigenvalue.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from suscept.errors import ConfigError
from suscept.estimate import Estimate

PARTS = ("gradient", "curvature")


def inflation(step_size: float, p: float | Tensor) -> dict:
    """Factors of the table above for precision ``p``: ``covariance_gradient`` ``1/(1-x)``,
    ``covariance_curvature`` ``1/(1-x)^2``, ``response_gradient`` ``1 - x`` and
    ``response_curvature`` ``1 - 2x`` (response over the chain's own prediction)."""
    x = step_size * torch.as_tensor(p, dtype=torch.float64) / 4
    if bool((x >= 1).any()):
        raise ConfigError(f"eps * p = {float(4 * x.max()):.3g} >= 4: the chain is unstable")
    return {"covariance_gradient": 1 / (1 - x), "covariance_curvature": 1 / (1 - x) ** 2,
            "response_gradient": 1 - x, "response_curvature": 1 - 2 * x}


def debias(est: Estimate, step_size: float, p: float, part: str) -> Estimate:
    """``est`` (a chain covariance-type estimate) divided by its inflation at precision ``p``:
    ``x (1 - eps p/4)`` for the ``"gradient"`` part, ``x (1 - eps p/4)^2`` for ``"curvature"``.
    Exact when every direction the estimate involves has precision ``p``."""
    if part not in PARTS:
        raise ConfigError(f"part={part!r} must be one of {PARTS}")
    f = inflation(step_size, p)[f"covariance_{part}"]
    return Estimate(est.value / f, est.stderr / f, est.dims, est.name,
                    est.convention + f" (step-size bias removed at p = {p:g}, {part} part)",
                    {**est.meta, "debiased": {"step_size": step_size, "p": p, "part": part}})


def richardson(fine: Estimate, coarse: Estimate, step_fine: float,
               step_coarse: float) -> Estimate:
    """Linear extrapolation to ``eps = 0`` of one estimand measured by two independent runs
    at step sizes ``h_f < h_c``: ``(h_c v_f - h_f v_c) / (h_c - h_f)``, standard error
    ``sqrt((h_c s_f)^2 + (h_f s_c)^2) / (h_c - h_f)``. With ``h_c = 2 h_f``: ``2 v_f - v_c``."""
    if not 0 < step_fine < step_coarse:
        raise ConfigError(f"need 0 < step_fine < step_coarse; got {step_fine}, {step_coarse}")
    if fine.shape != coarse.shape or fine.dims != coarse.dims:
        raise ConfigError(f"the two estimates differ in shape: {fine.shape} vs {coarse.shape}")
    hf, hc = step_fine, step_coarse
    value = (hc * fine.value - hf * coarse.value) / (hc - hf)
    se = ((hc * fine.stderr) ** 2 + (hf * coarse.stderr) ** 2).sqrt() / (hc - hf)
    return Estimate(value, se, fine.dims, fine.name,
                    fine.convention + " (Richardson-extrapolated to step size 0)",
                    {**fine.meta, "richardson": {"steps": [hf, hc]}})


def posterior_covariance(chain_cov: Float[Tensor, "d d"], step_size: float) -> Tensor:
    """``P^-1`` from a Gaussian SGLD chain's covariance ``Sigma_eps`` of the parameters:
    per eigenvalue ``s`` of ``Sigma_eps``, ``p = (2/eps) (1 - sqrt(1 - eps/s))`` (the root of
    ``(eps/4) p^2 - p + 1/s = 0`` that tends to ``1/s``), returned as ``V diag(1/p) V^T``.
    Valid for chains with ``eps * p_max < 2``: beyond, ``1/s = p - eps p^2/4`` decreases in ``p``
    and the other root is the true one (no chain variance tells which)."""
    s, v = torch.linalg.eigh(chain_cov.double())
    if bool((s <= step_size).any()):
        raise ConfigError("a chain variance is <= step_size: no stable chain has it (too few "
                          "draws, or not a full-batch Gaussian chain)")
    p = 2 / (s * (1 + torch.sqrt(1 - step_size / s)))  # the same root, without cancellation
    return (v / p) @ v.T
