"""Control variates from the score: zero-mean Stein features and a cross-fitted covariance.

**Stein features** (zero-variance control variates, Mira et al. 2013; Assaraf & Caffarel
1999), in the discrete form that is exact for the SGLD chain itself. With ``x = w - w*``, the
drift ``D = t g + gamma x + lambda_wd w`` that the step uses (minibatch gradient ``g``; the
score of the tempered posterior is ``-D``), the step ``x' = x - (eps/2) D + sqrt(eps) xi`` and
directions ``v_1..v_r`` (``u = V x``, ``q = V D``), the conditional means of ``u'`` and
``u'_i u'_j`` given the current state give, divided by ``eps/2``::

    h1_i  = -q_i                                                      (= v_i . score)
    h2_ij = -(u_i q_j + u_j q_i) + (eps/2) q_i q_j + 2 v_i . v_j      (i <= j)

Both have expectation exactly 0 under the chain's stationary law (``E[f(w_{k+1})] =
E[f(w_k)]``), for any loss, minibatch noise and step size: the ``(eps/2) q q`` term is what the
continuous-time identity (``E_p[v . score] = 0``, ``E_p[F . score + div F] = 0``) lacks, so these
features never move the estimand to the continuous posterior. :class:`suscept.batched.Batched`
records their mean over each thinning window as the observable ``"stein"``
``[chain, draw, r (r + 3) / 2]``.

**Cross-fitted covariance** (:func:`cv_covariance`): with per-draw products
``p_n = (x_n - xbar)(y_n - ybar)`` and zero-mean features ``F_n``, chain ``c``'s draws use
coefficients ``beta_{-c}`` fitted by least squares of ``p`` on ``F`` over the *other* chains::

    Cov_cv = (1 / (N - 1)) sum_c sum_{n in c} ( p_n - beta_{-c}^T F_n )

Chains are independent, so ``E[beta_{-c}^T F_n] = E[beta_{-c}]^T E[F_n] = 0`` and
``E[Cov_cv] = E[Cov_plain]``: the same estimand, never a different one. The variance drops by
about ``1 - R^2`` of the regression of the products on the features.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from suscept.errors import ConfigError, ShapeError
from suscept.estimate import Estimate


def stein_features(directions: Float[Tensor, "r d"], x: Float[Tensor, " d"],
                   drift: Float[Tensor, " d"], step_size: float) -> Float[Tensor, " m"]:
    """``[h1 (r), h2 (r (r + 1) / 2, upper triangle row-major)]`` of one step, float64."""
    v = directions.to(x.dtype)
    u, q = (v @ x).double(), (v @ drift).double()
    gram = (v @ v.T).double()
    i, j = torch.triu_indices(len(u), len(u))
    h2 = -(u[i] * q[j] + u[j] * q[i]) + step_size / 2 * q[i] * q[j] + 2 * gram[i, j]
    return torch.cat([-q, h2])


def _products(paired: bool) -> str:
    return "nk,nkx->nkx" if paired else "nk,nl->nkl"


def block_sums(x: Tensor, y: Tensor, paired: bool, n_blocks: int
               ) -> tuple[Tensor, Tensor, int]:
    """Per-block sums of the products ``(x - xbar)(y - ybar)`` (means over all draws).

    ``x [chain, draw, kx]``, ``y [chain, draw, ky]`` (or ``[chain, draw, kx, X]`` paired).
    Returns sums ``[chain * n_blocks, *entry]`` (chain-major), block sizes and ``N``; the
    k-statistic covariance is ``sums.sum(0) / (N - 1)``.
    """
    x, y = x.double(), y.double()
    dx, dy = x - x.mean((0, 1)), y - y.mean((0, 1))
    eq = _products(paired).replace("->n", "->")
    blocks = torch.tensor_split(torch.arange(x.shape[1]), n_blocks)
    sums = torch.stack([torch.einsum(eq, dx[c, b], dy[c, b]) for c in range(x.shape[0])
                        for b in blocks])
    sizes = torch.tensor([float(len(b)) for _ in range(x.shape[0]) for b in blocks],
                         dtype=torch.float64)
    return sums, sizes, x.shape[0] * x.shape[1]


def cv_covariance(x: Float[Tensor, "chain draw kx"], y: Tensor,
                  features: Float[Tensor, "chain draw m"], *, paired: bool = False,
                  n_blocks: int = 5, ridge: float = 1e-8) -> tuple[Estimate, Estimate]:
    """Plain and control-variate covariance of ``x`` against ``y``, same draws, same errors.

    Args:
        x: ``[chain, draw, kx]``; y: ``[chain, draw, ky]``, or with ``paired=True``
            ``[chain, draw, kx, X]`` (entry ``k`` of x against row ``k`` of y, as for
            susceptibilities: ``x = phi``, ``y`` = restricted centered token losses).
        features: ``[chain, draw, m]`` with expectation exactly 0 (e.g. the ``"stein"`` draws).
        n_blocks: blocks per chain for the batch-means standard error.
        ridge: relative ridge on the features' Gram matrix (numerical safety only).

    Returns:
        ``(plain, cv)`` Estimates of ``Cov(x, y)`` (unbiased k-statistic scale ``1/(N-1)``),
        shape ``[kx, ky]`` or ``[kx, X]``; standard errors from batch means over
        ``chain * n_blocks`` blocks, computed the same way for both. ``cv.meta`` holds the
        variance factor ``(se_cv / se_plain)^2`` (median over entries).
    """
    if x.ndim != 3 or features.ndim != 3 or x.shape[:2] != features.shape[:2] \
            or y.shape[:2] != x.shape[:2] or y.ndim != (4 if paired else 3):
        raise ShapeError(f"need x [chain, draw, k], y [chain, draw, {'k, X' if paired else 'k'}]"
                         f" and features [chain, draw, m] from the same draws; got "
                         f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(features.shape)}")
    n_chains, n_draws = x.shape[:2]
    if n_chains < 2:
        raise ConfigError("cross-fitted control variates need at least 2 chains")
    if not 1 <= n_blocks <= n_draws:
        raise ConfigError(f"n_blocks={n_blocks} must be in [1, draws per chain = {n_draws}]")
    plain_s, sizes, n_total = block_sums(x, y, paired, n_blocks)
    x, y, f = x.double(), y.double(), features.double()
    eq = _products(paired)
    blocks = torch.tensor_split(torch.arange(n_draws), n_blocks)
    corr = []
    for c in range(n_chains):
        beta = _fit_without(c, x, y, f, eq, ridge)  # [m, *entry]
        corr += [torch.einsum("m,m...->...", f[c, b].sum(0), beta) for b in blocks]
    cv_s = plain_s - torch.stack(corr)
    ests = []
    for sums, name in ((plain_s, "plain"), (cv_s, "control variates")):
        value = sums.sum(0) / (n_total - 1)
        ests.append(Estimate(value, combine_se(sums, sizes, n_total), _dims(paired),
                             "covariance", f"Cov(x, y), {name}",
                             {"n_draws": n_total, "n_segments": len(sizes)}))
    plain, cv = ests
    factor = float(((cv.stderr / plain.stderr) ** 2).nanmedian())
    cv.meta["variance_factor"] = factor
    return plain, cv


def _dims(paired: bool) -> tuple[str, str]:
    return ("component", "token") if paired else ("x", "y")


def _fit_without(c: int, x, y, f, eq: str, ridge: float) -> Tensor:
    """Least-squares coefficients ``[m, *entry]`` of the products on the features, fitted on
    every chain but ``c`` (centred with those chains' own means, so independent of chain c)."""
    keep = [k for k in range(x.shape[0]) if k != c]
    xs, ys, fs = (t[keep].flatten(0, 1) for t in (x, y, f))
    dx, dy, df = xs - xs.mean(0), ys - ys.mean(0), fs - fs.mean(0)
    gram = df.T @ df
    gram = gram + ridge * gram.diagonal().mean().clamp(min=1e-300) * torch.eye(
        len(gram), dtype=gram.dtype)
    rhs = torch.einsum(eq.replace("nk,", "nm,nk,").replace("->n", "->m"), df, dx, dy)
    return torch.linalg.solve(gram, rhs.reshape(len(gram), -1)).reshape(rhs.shape)


def combine_se(sums: Tensor, sizes: Tensor, n_total: int) -> Tensor:
    """Batch-means standard error of ``sum / (N - 1)`` from per-block sums ``[S, ...]``."""
    s = len(sizes)
    means = sums / sizes.reshape(-1, *[1] * (sums.ndim - 1))
    var_mean = means.var(0) / s  # variance of the mean of the block means
    return (var_mean * (n_total / (n_total - 1)) ** 2).sqrt()
