"""Exact ground truths of docs/theory.md section 7 and the quadratic toy problem they describe.

Used by the tests, the demo and anyone checking the estimators on a known answer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Point(nn.Module):
    """A model that is just a parameter vector ``w``."""

    def __init__(self, w0: Tensor):
        super().__init__()
        self.w = nn.Parameter(w0.clone())


def quadratic_losses(model: Point, batch) -> Tensor:
    """``l_i(w) = 1/2 (w - m_i)^T A_i (w - m_i)`` for a batch ``(m [b, d], A [b, d, d])``."""
    m, a = batch
    r = model.w - m
    return 0.5 * torch.einsum("bi,bij,bj->b", r, a, r)


def random_problem(n: int, d: int, seed: int, scale: float = 1.0):
    """Per-sample centres ``m [n, d]`` and PSD curvatures ``A [n, d, d]`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, d, generator=g, dtype=torch.float64) / d**0.5
    a = scale * (b @ b.transpose(1, 2) + 0.3 * torch.eye(d, dtype=torch.float64))
    return m, a


def posterior(m: Tensor, a: Tensor, n_beta: float, gamma: float, anchor: Tensor,
              rho: Tensor | None = None, weight_decay: float = 0.0):
    """Exact Gaussian posterior ``(mean, precision)`` of the re-weighted quadratic loss.

    ``p(w) ∝ exp(-n_beta (1/n) sum_i rho_i l_i(w) - gamma/2 |w - w*|^2 - wd/2 |w|^2)``.
    """
    n, d = m.shape
    rho = torch.ones(n, dtype=torch.float64) if rho is None else rho
    h = torch.einsum("i,ijk->jk", rho, a) / n
    hm = torch.einsum("i,ijk,ik->j", rho, a, m) / n
    eye = torch.eye(d, dtype=torch.float64)
    prec = n_beta * h + (gamma + weight_decay) * eye
    mean = torch.linalg.solve(prec, n_beta * hm + gamma * anchor)
    return mean, prec


def sgld_covariance(prec: Tensor, step_size: float) -> Tensor:
    """Stationary covariance of full-batch SGLD on a Gaussian: ``(P - (eps/4) P^2)^-1``."""
    return torch.linalg.inv(prec - step_size / 4 * prec @ prec)


def quadratic_form_iat(h: Tensor, prec: Tensor, step_size: float, thin: int = 1) -> float:
    """IAT in SGLD steps, ``thin x (1 + 2 sum_j rho(thin j))``, of ``q = 1/2 x^T H x`` along
    full-batch SGLD on a Gaussian, ``x' = R x + sqrt(eps) xi`` with ``R = I - (eps/2) P``
    (``P`` symmetric, stationary ``S`` of :func:`sgld_covariance`): ``Cov(x_0, x_k) = R^k S``,
    so ``Cov(q_0, q_k) = 1/2 tr(H R^k S H S R^k)``. A chain's probe loss is such a ``q`` when
    the chain's mean is the loss's minimum."""
    s = sgld_covariance(prec, step_size)
    r = torch.eye(len(h), dtype=h.dtype) - step_size / 2 * prec
    r_thin = torch.linalg.matrix_power(r, thin)
    rk, v0 = torch.eye(len(h), dtype=h.dtype), float(torch.trace(h @ s @ h @ s))
    total = 0.0
    while True:
        rk = rk @ r_thin
        rho = float(torch.trace(h @ rk @ s @ h @ s @ rk)) / v0
        if rho < 1e-14:
            return thin * (1 + 2 * total)
        total += rho


def expected_loss(mean: Tensor, cov: Tensor, m_i: Tensor, a_i: Tensor) -> Tensor:
    """``E[l_i] = 1/2 tr(A_i S) + 1/2 (mu - m_i)^T A_i (mu - m_i)`` under ``N(mu, S)``."""
    r = mean - m_i
    return 0.5 * torch.trace(a_i @ cov) + 0.5 * r @ a_i @ r


def quad_cov(b_i, a_i, b_j, a_j, cov) -> Tensor:
    """``Cov(Q_i, Q_j) = b_i^T S b_j + 1/2 tr(A_i S A_j S)`` (centred at the mean)."""
    return b_i @ cov @ b_j + 0.5 * torch.trace(a_i @ cov @ a_j @ cov)


def quad_k3(b, a, i, j, k, cov) -> Tensor:
    """Joint third cumulant of quadratic forms ``Q = b^T x + 1/2 x^T A x`` under ``N(0, S)``."""
    s = cov
    return (torch.trace(a[i] @ s @ a[j] @ s @ a[k] @ s)
            + b[i] @ s @ a[k] @ s @ b[j] + b[i] @ s @ a[j] @ s @ b[k]
            + b[j] @ s @ a[i] @ s @ b[k])
