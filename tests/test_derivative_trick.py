"""The derivative trick end to end (docs/theory.md sections 3, 4, 7).

Per-sample quadratic losses make the posterior exactly Gaussian for every re-weighting rho,
so ``E_rho[l_i]``, ``Var_rho(l_i)`` and leave-one-out are known in closed form. SGLD draws
feed the estimators, which must match finite-difference derivatives of the closed forms.

SGLD's stationary law is N(mu, Sigma_eps), not N(mu, P^-1) (docs/theory.md section 2): each target
is compared with a tolerance of 4.5 reported standard errors plus the discretization offset,
computed exactly from Sigma_eps, and that offset is asserted to be below one standard error
so the comparison keeps its power.
"""

import pytest
import torch

import suscept
from suscept.exact import (
    Point,
    expected_loss,
    posterior,
    quad_cov,
    quad_k3,
    quadratic_losses,
    sgld_covariance,
)

N, D, N_BETA, GAMMA = 4, 2, 8.0, 2.0
BETA = N_BETA / N
FD = 1e-5


def problem():
    g = torch.Generator().manual_seed(5)
    m = torch.randn(N, D, generator=g, dtype=torch.float64)
    b = torch.randn(N, D, D, generator=g, dtype=torch.float64)
    a = torch.eye(D, dtype=torch.float64) + 0.3 * b @ b.transpose(1, 2)
    wstar = torch.linalg.solve(a.mean(0), torch.einsum("ijk,ik->j", a, m) / N)
    return m, a, wstar


def gaussian(m, a, wstar, rho=None):
    mean, prec = posterior(m, a, N_BETA, GAMMA, wstar, rho=rho)
    return mean, torch.linalg.inv(prec), prec


def mean_losses(m, a, mean, cov):
    return torch.stack([expected_loss(mean, cov, m[i], a[i]) for i in range(N)])


def var_losses(m, a, mean, cov):
    return torch.stack([quad_cov(a[i] @ (mean - m[i]), a[i], a[i] @ (mean - m[i]), a[i], cov)
                        for i in range(N)])


def rho_derivative(fn, m, a, wstar):
    """``[j, i] = d fn(rho)_i / d rho_j`` at rho = 1 by central differences."""
    rows = []
    for j in range(N):
        e = torch.zeros(N, dtype=torch.float64)
        e[j] = FD
        up = fn(*gaussian(m, a, wstar, 1 + e)[:2])
        down = fn(*gaussian(m, a, wstar, 1 - e)[:2])
        rows.append((up - down) / (2 * FD))
    return torch.stack(rows)


def cumulants(m, a, mean, cov):
    """Exact Cov(l_j, l_i) [j, i], k3(l_i, l_j, l_j) [j, i], k3(l_i, l_i, l_j) [j, i]."""
    b = torch.stack([a[i] @ (mean - m[i]) for i in range(N)])
    cov_ll = torch.stack([torch.stack([quad_cov(b[j], a[j], b[i], a[i], cov) for i in range(N)])
                          for j in range(N)])
    k3_ijj = torch.stack([torch.stack([quad_k3(b, a, i, j, j, cov) for i in range(N)])
                          for j in range(N)])
    k3_iij = torch.stack([torch.stack([quad_k3(b, a, i, i, j, cov) for i in range(N)])
                          for j in range(N)])
    return cov_ll, k3_ijj, k3_iij


@pytest.fixture(scope="module")
def setup():
    m, a, wstar = problem()
    mean, cov, prec = gaussian(m, a, wstar)
    p = torch.linalg.eigvalsh(prec)
    eps = 0.05 / p.max().item()
    thin = int(1.0 / (eps * p.min().item()))  # about half the autocorrelation time of w
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=N_BETA, gamma=GAMMA, n_chains=4,
                                n_draws=1000, thin=thin, burn_in=5 * thin, seed=11)
    run = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg, probe=(m, a),
                         stream=[("loss", "loss")], third_order=True, progress=False)
    sigma_eps = sgld_covariance(prec, eps)
    return m, a, wstar, mean, cov, sigma_eps, run


def close(est, truth, offset):
    """|est - truth| < 4.5 se + |offset|, with the known offset below one se."""
    se = est.stderr
    assert (offset.abs() < se).all(), f"discretization offset {offset} vs se {se}"
    z = (est.value - truth).abs() / se
    assert ((est.value - truth).abs() < 4.5 * se + offset.abs()).all(), f"z = {z}"
    return z


def test_bif_is_the_derivative_of_the_expected_loss(setup):
    m, a, wstar, mean, cov, sigma_eps, run = setup
    exact = rho_derivative(lambda mu, c: mean_losses(m, a, mu, c), m, a, wstar)
    # the derivative trick holds exactly for the Gibbs posterior:
    torch.testing.assert_close(-BETA * cumulants(m, a, mean, cov)[0], exact, rtol=1e-6,
                               atol=1e-8)
    est = suscept.bif(run.moments_of("loss"), scale="derivative", beta=run.beta)
    assert est.dims == ("sample", "observable")
    offset = -BETA * cumulants(m, a, mean, sigma_eps)[0] - exact
    close(est, exact, offset)
    # raw and derivative scales differ by beta exactly; the sign is that of -Cov
    raw = suscept.bif(run.moments_of("loss"))
    torch.testing.assert_close(raw.value * run.beta, est.value)
    assert (raw.value.diagonal() < 0).all()  # up-weighting a sample lowers its own loss


def test_variance_response_is_the_derivative_of_the_variance(setup):
    m, a, wstar, mean, cov, sigma_eps, run = setup
    exact = rho_derivative(lambda mu, c: var_losses(m, a, mu, c), m, a, wstar)
    torch.testing.assert_close(-BETA * cumulants(m, a, mean, cov)[2], exact, rtol=1e-5,
                               atol=1e-8)
    est = suscept.variance_response(run.flat("loss"), scale="derivative", beta=run.beta)
    offset = -BETA * cumulants(m, a, mean, sigma_eps)[2] - exact
    close(est, exact, offset)


def tilted(m, a, mean, cov, j):
    """N(mean, cov) reweighted by exp(beta l_j): what reweighting SGLD draws estimates."""
    prec = torch.linalg.inv(cov) - BETA * a[j]
    mu = torch.linalg.solve(prec, torch.linalg.solve(cov, mean) - BETA * a[j] @ m[j])
    return mu, torch.linalg.inv(prec)


def test_loo_reweighted_and_expansion_match_exact_leave_one_out(setup):
    m, a, wstar, mean, cov, sigma_eps, run = setup
    base = mean_losses(m, a, mean, cov)
    drop = 1 - torch.eye(N, dtype=torch.float64)  # row j: rho with rho_j = 0
    exact = torch.stack([mean_losses(m, a, *gaussian(m, a, wstar, drop[j])[:2]) - base
                         for j in range(N)])  # [j, i]
    # reweighting the exact posterior is exact leave-one-out
    tilted_exact = torch.stack([mean_losses(m, a, *tilted(m, a, mean, cov, j)) - base
                                for j in range(N)])
    torch.testing.assert_close(tilted_exact, exact, rtol=1e-9, atol=1e-12)
    base_eps = mean_losses(m, a, mean, sigma_eps)
    target_eps = torch.stack([mean_losses(m, a, *tilted(m, a, mean, sigma_eps, j)) - base_eps
                              for j in range(N)])
    est = suscept.loo_reweighted(run.flat("loss"), beta=run.beta)
    assert est.meta["min_ess"] > 0.1 * 4 * 1000  # no single draw carries the weights
    close(est, exact, target_eps - exact)

    cov_ll, k3_ijj, _ = cumulants(m, a, mean, cov)
    first, second = BETA * cov_ll, BETA * cov_ll + 0.5 * BETA**2 * k3_ijj
    # the second-order expansion is closer to exact leave-one-out than the first
    assert (second - exact).abs().sum() < 0.5 * (first - exact).abs().sum()
    exp = suscept.influence_expansion(run.moments_of("loss"), beta=run.beta)
    cov_e, k3_e, _ = cumulants(m, a, mean, sigma_eps)
    close(exp.first, first, BETA * cov_e - first)
    close(exp.second, second, BETA * cov_e + 0.5 * BETA**2 * k3_e - second)
