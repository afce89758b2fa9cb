"""The spring-only control (suscept.spring) against its closed form and against SGLD chains."""

import pytest
import torch

import suscept
from suscept.exact import Point, quad_cov, quadratic_losses, random_problem
from suscept.spring import odd_even, spring_sample

N, D = 4, 3


@pytest.fixture(scope="module")
def problem():
    m, a = random_problem(N, D, seed=3)
    wstar = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    return m, a, wstar


def config(**kw):
    base = dict(step_size=0.3, n_beta=1e-9, gamma=4.0, weight_decay=0.5, n_chains=4,
                n_draws=2000, seed=5)
    return suscept.SamplerConfig(**{**base, **kw})


def spring(problem, **kw):
    m, a, wstar = problem
    anti = kw.pop("antithetic", False)
    return spring_sample(Point(wstar), quadratic_losses, (m, a), config(**kw), probe=(m, a),
                         observables={"w": lambda model: model.w}, antithetic=anti,
                         stream=[("w", "w"), ("loss", "loss")], progress=False)


def truth(problem, cfg):
    """mu and Sigma of the spring-only SGLD chain (module docstring of suscept.spring)."""
    _, _, wstar = problem
    g = cfg.gamma + cfg.weight_decay
    mu = wstar * cfg.gamma / g
    return mu, torch.eye(D, dtype=torch.float64) / (g * (1 - cfg.step_size * g / 4))


def test_draws_follow_the_chains_stationary_law_exactly(problem):
    m, a, _ = problem
    cfg = config()
    run = spring(problem)
    mu, sigma = truth(problem, cfg)
    cov = suscept.loss_kernel(run.moments_of("w"))
    assert cov.z(sigma).abs().max() < 4.5
    assert cov.z(sigma * (1 - cfg.step_size * 4.5 / 4)).abs().max() > 5  # continuous law rejected
    w = run.flat("w")
    se = w.std((0, 1)) / (w.shape[0] * w.shape[1]) ** 0.5
    assert ((w.mean((0, 1)) - mu).abs() / se).max() < 4.5
    # the probe's loss kernel is the exact quadratic-form covariance under N(mu, Sigma)
    b = torch.einsum("ijk,ik->ij", a, mu[None] - m)
    k = torch.stack([torch.stack([quad_cov(b[i], a[i], b[j], a[j], sigma) for j in range(N)])
                     for i in range(N)])
    assert suscept.loss_kernel(run.moments_of("loss")).z(k).abs().max() < 4.5
    assert run.config["n_beta"] == 0.0 and run.config["draw_source"] == "spring"


def test_antithetic_pairs_split_gradient_and_curvature_terms(problem):
    m, a, _ = problem
    cfg = config()
    run = spring(problem, antithetic=True)
    mu, sigma = truth(problem, cfg)
    w = run.flat("w")
    assert torch.allclose(w[:, 0::2] + w[:, 1::2], 2 * mu.expand_as(w[:, 0::2]))
    even, odd = odd_even(run.flat("loss"))
    b = torch.einsum("ijk,ik->ij", a, mu[None] - m)
    grad_term = b @ sigma @ b.T
    curv_term = 0.5 * torch.einsum("iab,bc,jcd,da->ij", a, sigma, a, sigma)
    assert suscept.loss_kernel(even).z(curv_term).abs().max() < 4.5
    # E[O_odd l_odd] (mean known to be 0): the covariance estimator's centring costs O(1/N)
    assert suscept.loss_kernel(odd).z(grad_term).abs().max() < 4.5
    assert suscept.loss_kernel(odd).z(grad_term + curv_term).abs().max() > 5


@pytest.mark.parametrize("precondition", [None, "rmsprop"])
def test_matches_a_long_sgld_chain_at_n_beta_zero(problem, precondition):
    """The i.i.d. law equals what SGLD with n_beta ~ 0 samples, within both reported errors;
    with RMSprop the preconditioner enters through eps * G (here eps G gamma_eff ~ 0.4-0.6)."""
    m, a, wstar = problem
    eps = 0.3 if precondition is None else 0.25
    kw = dict(step_size=eps, precondition=precondition)
    cfg = config(burn_in=300, n_draws=1500, **kw)
    chain = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg,
                           observables={"w": lambda model: model.w}, stream=[("w", "w")],
                           progress=False)
    ctrl = spring(problem, n_draws=4000, **kw)
    c1, c2 = (suscept.loss_kernel(r.moments_of("w")) for r in (chain, ctrl))
    z = (c1.value - c2.value) / (c1.stderr**2 + c2.stderr**2).sqrt()
    assert z.diagonal().abs().max() < 4.5, z
    cont = 1 / (cfg.gamma + cfg.weight_decay)  # the continuous-time variance is rejected
    assert c1.z(torch.eye(D, dtype=torch.float64) * cont).diagonal().abs().max() > 5


def test_mask_freezes_the_rest_and_model_is_untouched(problem):
    m, a, wstar = problem
    model = Point(wstar)
    before = model.w.detach().clone()
    run = spring_sample(model, quadratic_losses, (m, a), config(n_draws=20), probe=(m, a),
                        observables={"w": lambda mod: mod.w},
                        mask={"w": torch.tensor([True, False, True])}, progress=False)
    assert torch.equal(model.w.detach(), before) and model.training
    w = run.flat("w")
    assert torch.equal(w[:, :, 1], wstar[1].expand_as(w[:, :, 1]))
    assert (w[:, :, 0] != wstar[0]).all()


def test_no_spring_is_refused(problem):
    m, a, wstar = problem
    with pytest.raises(suscept.ConfigError, match="gamma"):
        spring_sample(Point(wstar), quadratic_losses, (m, a),
                      config(gamma=0.0, weight_decay=0.0), probe=(m, a), progress=False)
