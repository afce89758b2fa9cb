"""Coupled differences (suscept.coupled) on an exactly Gaussian posterior."""

import math

import pytest
import torch

import suscept
from suscept.coupled import coupled_covariance, spring_draws
from suscept.exact import Point, posterior, quadratic_losses, random_problem, sgld_covariance

N, D, GAMMA = 5, 4, 20.0


def setup(n_beta):
    m, a = random_problem(N, D, seed=4)
    wstar = torch.zeros(D, dtype=torch.float64)
    mean, prec = posterior(m, a, n_beta, GAMMA, wstar)
    eps = 0.5 / torch.linalg.eigvalsh(prec).max().item()
    return m, a, wstar, mean, prec, eps


def observe(model):
    return {"w": model.w.detach().clone()}


def test_spring_chain_shares_the_sgld_noise():
    """With the loss switched off (n_beta -> 0) the SGLD chain is its spring-only twin."""
    m, a, wstar, _, _, eps = setup(1e-12)
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=1e-12, gamma=GAMMA, n_chains=2,
                                n_draws=30, thin=3, burn_in=5, seed=9)
    run = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg, observables=observe,
                         progress=False)
    model = Point(wstar)
    twin = spring_draws(model, cfg, observe)["w"]
    assert torch.equal(model.w.detach(), wstar)  # the user's model is untouched
    torch.testing.assert_close(twin, run.draws["w"], rtol=0, atol=1e-9)
    other = spring_draws(Point(wstar), cfg, observe, chains=[2, 3])["w"]
    assert (other - run.draws["w"]).abs().max() > 0.1  # independent chains: other noise


@pytest.mark.parametrize("n_beta, max_ratio", [(2.0, 0.6), (40.0, None)])
def test_coupled_covariance_unbiased_on_exact_gaussian(n_beta, max_ratio):
    """Agrees with the exact Sigma_eps within its error; beats the plain estimator's error
    where the loss reshapes the posterior little (n_beta lambda_max / gamma small)."""
    m, a, wstar, mean, prec, eps = setup(n_beta)
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=n_beta, gamma=GAMMA, n_chains=4,
                                n_draws=300, thin=4, burn_in=60, seed=0)
    run = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg, observables=observe,
                         progress=False)
    w = run.draws["w"]
    w0 = spring_draws(Point(wstar), cfg, observe)["w"]
    wb = spring_draws(Point(wstar), cfg, observe, chains=range(4, 36))["w"]
    est = coupled_covariance((w, w), (w0, w0), (wb, wb), n_blocks=5)
    truth = sgld_covariance(prec, eps)
    z = est.z(truth)
    assert z.abs().max() < 4.5 and (z**2).mean() < 3.0, z
    plain = suscept.loss_kernel(w)
    ratio = float((est.stderr / plain.stderr).median())
    lam = float(torch.linalg.eigvalsh(a.mean(0)).max())
    assert (n_beta * lam / GAMMA < 0.3) == (max_ratio is not None)  # 0.19 vs 3.9
    assert math.isfinite(ratio) and (max_ratio is None or ratio < max_ratio), ratio


def test_coupled_susceptibility_orientation_and_sign():
    """With twin and independent draws identical, the coupled matrix is the plain one (same
    sign and [token, component] orientation as suscept.susceptibility), and the added part
    is the plain matrix minus the spring-only one."""
    from suscept.coupled import coupled_susceptibility
    from suscept.susceptibilities import from_draws

    g = torch.Generator().manual_seed(0)
    phi = torch.randn(4, 50, 3, generator=g, dtype=torch.float64)
    y = 0.5 * phi[..., None] + torch.randn(4, 50, 3, 7, generator=g, dtype=torch.float64)
    run = {"phi": phi, "restricted_token_loss": y}
    phi0 = torch.randn(4, 50, 3, generator=g, dtype=torch.float64)
    y0 = torch.randn(4, 50, 3, 7, generator=g, dtype=torch.float64)
    spring = {"phi": phi0, "restricted_token_loss": y0}
    chi, added = coupled_susceptibility(run, spring, spring)
    plain = suscept.susceptibility(from_draws(phi, y))
    torch.testing.assert_close(chi.value, plain.value)
    assert chi.dims == plain.dims and (chi.value < 0).all()  # y rises with phi: chi < 0
    torch.testing.assert_close(added.value, plain.value - suscept.susceptibility(
        from_draws(phi0, y0)).value)
