"""Stein control variates (suscept.control_variates) on an exactly Gaussian posterior."""

import pytest
import torch

import suscept
from suscept.batched import Batched
from suscept.control_variates import cv_covariance
from suscept.exact import (
    Point,
    posterior,
    quad_cov,
    quadratic_losses,
    random_problem,
    sgld_covariance,
)

N, D, N_BETA, GAMMA = 5, 4, 20.0, 5.0


@pytest.fixture(scope="module")
def problem():
    m, a = random_problem(N, D, seed=3)
    wstar = torch.zeros(D, dtype=torch.float64)
    mean, prec = posterior(m, a, N_BETA, GAMMA, wstar)
    eps = 0.8 / torch.linalg.eigvalsh(prec).max().item()  # Sigma_eps far from P^-1
    evals, evecs = torch.linalg.eigh(prec)
    return m, a, wstar, mean, prec, eps, evecs.T  # directions: rows = eigenvectors


def run(problem, directions, *, n_draws, thin, seed=0, chains=4):
    m, a, wstar, _, _, eps, _ = problem
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=N_BETA, gamma=GAMMA, n_chains=chains,
                                n_draws=n_draws, thin=thin, burn_in=100, seed=seed)
    return suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg,
                          observables={"w": lambda model: model.w}, progress=False,
                          batched=Batched(directions=directions))


def block_z(values, n_blocks=30):
    """Mean of ``values [chain, draw, k]`` over its batch-means standard error."""
    blocks = torch.stack([b.mean(1) for b in values.tensor_split(n_blocks, 1)], 1).flatten(0, 1)
    return blocks.mean(0) / (blocks.std(0) / len(blocks) ** 0.5)


def test_stein_features_have_mean_zero_under_the_chain(problem):
    r = run(problem, problem[-1][2:], n_draws=1500, thin=1)  # the two stiffest directions
    f = r.draws["stein"]  # [chain, draw, 2 + 3]
    assert block_z(f).abs().max() < 4.5
    # power: the continuous-time identity (without the (eps/2) q_i q_j term) is biased here
    q = -f[..., :2]
    i, j = torch.triu_indices(2, 2)
    continuous = f[..., 2:] - problem[5] / 2 * q[..., i] * q[..., j]
    assert block_z(continuous).abs().max() > 6


def observables_of(problem, w):
    """x = a.(w - mu) [1]; y = [b.(w - mu), 1/2 (w - mu)^T A (w - mu)] [2], draws w [c, d, D]."""
    mean = problem[3]
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(
        D, generator=g, dtype=torch.float64)
    mat = torch.randn(D, D, generator=g, dtype=torch.float64)
    mat = mat + mat.T
    xw = w - mean
    x = (xw @ a)[..., None]
    y = torch.stack([xw @ b, 0.5 * torch.einsum("cni,ij,cnj->cn", xw, mat, xw)], -1)
    zero = torch.zeros(D, D, dtype=torch.float64)
    return x, y, (a, zero), [(b, zero), (torch.zeros(D, dtype=torch.float64), mat)]


def se_ratio(x, y, features, n_blocks=5):
    """``cv.stderr / plain.stderr`` and its jackknife standard error over the chains (the
    independent units; the two errors come from the same draws, so the ratio is paired)."""
    def ratio(idx):
        plain, cv = cv_covariance(x[idx], y[idx], features[idx], n_blocks=n_blocks)
        return cv.stderr / plain.stderr

    c = x.shape[0]
    loo = torch.stack([ratio([k for k in range(c) if k != i]) for i in range(c)])
    return ratio(list(range(c))), ((c - 1) / c * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()


def test_cv_covariance_is_unbiased_and_removes_the_spanned_noise(problem):
    r = run(problem, problem[-1], n_draws=300, thin=2, seed=1, chains=8)
    x, y, (a, za), ys = observables_of(problem, r.draws["w"])
    sigma = sgld_covariance(problem[4], problem[5])
    truth = torch.stack([quad_cov(a, za, b, mb, sigma) for b, mb in ys])[None]
    plain, cv = cv_covariance(x, y, r.draws["stein"], n_blocks=5)
    for est in (plain, cv):
        assert est.z(truth).abs().max() < 4.5, est.z(truth)
    # all directions given: the linear-linear product is a combination of the features, so
    # the error ratio is below 1 by more than 4.5 of its own standard errors
    ratio, se = se_ratio(x, y, r.draws["stein"])
    assert ratio[0, 0] + 4.5 * se[0, 0] < 1, (ratio, se)


def test_cv_with_unrelated_directions_changes_little(problem):
    """Directions orthogonal to the observables: the features are independent of the
    products (Gaussian), R^2 ~ 0, so the variance factor is ~1 (no harm, no gain)."""
    r = run(problem, problem[-1][:2], n_draws=300, thin=2, seed=2, chains=8)
    xw = r.draws["w"] - problem[3]
    rest = problem[-1][2:]  # the other two eigenvectors
    x, y = (xw @ rest[0])[..., None], (xw @ rest[1])[..., None]
    _, cv = cv_covariance(x, y, r.draws["stein"], n_blocks=5)
    # error ratio 1 within 4.5 of its jackknife errors (the cross-fitted coefficients' own
    # noise adds about m / N = 5 / 2100 to the variance: far below that resolution)
    ratio, se = se_ratio(x, y, r.draws["stein"])
    assert (ratio - 1).abs()[0, 0] < 4.5 * se[0, 0], (ratio, se)
    truth = rest[0] @ sgld_covariance(problem[4], problem[5]) @ rest[1]
    assert cv.z(truth[None, None]).abs().max() < 4.5
