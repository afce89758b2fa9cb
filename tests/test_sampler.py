"""The SGLD sampler against exact answers (docs/theory.md sections 2 and 7), full batch."""

import math

import pytest
import torch

import suscept
from suscept.exact import Point, posterior, quadratic_losses, random_problem, sgld_covariance

N, D, N_BETA, GAMMA = 4, 3, 20.0, 5.0


def minimum(m, a):
    """w* at the minimum of L_n, so the localized posterior is centred on it."""
    n = m.shape[0]
    return torch.linalg.solve(a.sum(0) / n, torch.einsum("ijk,ik->j", a, m) / n)


@pytest.fixture(scope="module")
def problem():
    m, a = random_problem(N, D, seed=1)
    wstar = minimum(m, a)
    mean, prec = posterior(m, a, N_BETA, GAMMA, wstar)
    eps = 1.0 / torch.linalg.eigvalsh(prec).max().item()  # eps * p_max = 1: Sigma_eps != P^-1
    return m, a, wstar, mean, prec, eps


def run_point(problem, *, mask=None, n_draws=1500, thin=6, seed=0, **kw):
    m, a, wstar, _, _, eps = problem
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=N_BETA, gamma=GAMMA, n_chains=4,
                                n_draws=n_draws, thin=thin, burn_in=200, seed=seed, **kw)
    return suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg, probe=(m, a),
                          observables={"w": lambda model: model.w}, mask=mask,
                          stream=[("w", "w"), ("loss", "loss")], progress=False)


def check_z(est, truth, max_abs=4.5, max_mean_sq=3.0):
    z = est.z(truth).flatten()
    assert z.abs().max() < max_abs, f"z = {z}"
    assert (z**2).mean() < max_mean_sq, f"z = {z}"
    return z


def test_plain_sgld_covariance_is_sigma_eps(problem):
    _, _, _, mean, prec, eps = problem
    run = run_point(problem)
    sigma_eps = sgld_covariance(prec, eps)
    cov = suscept.loss_kernel(run.moments_of("w"))
    check_z(cov, sigma_eps)
    # the test has power: the continuous-time answer P^-1 is rejected along p_max
    assert cov.z(torch.linalg.inv(prec)).abs().max() > 5
    draws = run.flat("w")
    se = draws.std((0, 1)) / suscept.diagnostics.ess(draws).sqrt()
    assert ((draws.mean((0, 1)) - mean).abs() / se).max() < 4.5


def test_masked_run_moves_only_the_mask(problem):
    m, a, wstar, mean, prec, eps = problem
    keep = torch.tensor([True, False, True])
    run = run_point(problem, mask={"w": keep}, n_draws=1000)
    draws = run.flat("w")
    assert torch.equal(draws[:, :, 1], wstar[1].expand_as(draws[:, :, 1]))  # frozen bitwise
    idx = keep.nonzero().flatten()
    p_mm = prec[idx][:, idx]
    cov = suscept.loss_kernel(draws[:, :, idx])
    check_z(cov, sgld_covariance(p_mm, eps))


def test_llc_of_quadratic_matches_closed_form(problem):
    m, a, wstar, _, prec, eps = problem
    run = run_point(problem, n_draws=1000)
    h = a.mean(0)
    lam = torch.linalg.eigvalsh(h)
    p = N_BETA * lam + GAMMA
    truth = 0.5 * (N_BETA * lam / (p * (1 - eps * p / 4))).sum()
    est = suscept.llc(run.moments_of("loss"), run.anchor_values["loss"], N_BETA)
    assert abs(est.z(truth)) < 4.5, est
    # the same from the stored draws
    est2 = suscept.llc(run.flat("loss"), run.anchor_values["loss"], N_BETA)
    assert torch.allclose(est.value, est2.value, rtol=1e-12)


def test_rmsprop_update_is_the_equation():
    """One RMSprop-SGLD step equals docs/theory.md section 2 written out by hand."""
    torch.manual_seed(0)
    d = 7
    hyper = suscept.sgld.SGLDHyper(step_size=1e-2, n_beta=30.0, gamma=4.0, weight_decay=0.5,
                                   precondition="rmsprop")
    init, update = suscept.sgld.build(hyper)
    w0, anchor = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    grads = [torch.randn(d, dtype=torch.float64) for _ in range(3)]
    state = init(w0.clone())
    gen = torch.Generator().manual_seed(3)
    ref_gen = torch.Generator().manual_seed(3)
    w, v = w0.clone(), torch.zeros(d, dtype=torch.float64)
    for g in grads:
        state = update(state, g, anchor, gen)
        v = 0.99 * v + 0.01 * g**2
        big_g = 1 / (v.sqrt() + 0.1)
        xi = torch.randn(d, generator=ref_gen, dtype=torch.float64)
        drift = 30.0 * g + 4.0 * (w - anchor) + 0.5 * w
        w = w - 0.005 * big_g * drift + math.sqrt(1e-2) * big_g.sqrt() * xi
    assert state.step == 3
    torch.testing.assert_close(state.params, w, rtol=1e-12, atol=1e-12)


def test_rmsprop_samples_close_to_posterior(problem):
    """RMSprop-SGLD has no closed-form stationary law (its preconditioner moves with the
    state). Its discretization bias is at most about eps * G_max * p_max / 4 with
    G_max = 1/delta; beyond that bound the covariance must match P^-1 within 4 standard errors."""
    m, a, wstar, _, prec, _ = problem
    eps = 1e-3
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=N_BETA, gamma=GAMMA, n_chains=4,
                                n_draws=600, thin=15, burn_in=300, precondition="rmsprop")
    run = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg,
                         observables={"w": lambda model: model.w}, stream=[("w", "w")],
                         progress=False)
    cov = suscept.loss_kernel(run.moments_of("w"))
    target = torch.linalg.inv(prec).diagonal()
    bias_bound = eps * torch.linalg.eigvalsh(prec).max() / (4 * cfg.rmsprop_delta)
    rel = (cov.value.diagonal() / target - 1).abs()
    rel_se = cov.stderr.diagonal() / target
    assert (rel < bias_bound + 4 * rel_se).all(), (rel, bias_bound, rel_se)


def test_same_seed_same_draws_and_chains_independent_of_count(problem):
    r1 = run_point(problem, n_draws=50, thin=2, seed=7)
    r2 = run_point(problem, n_draws=50, thin=2, seed=7)
    assert torch.equal(r1.draws["w"], r2.draws["w"])
    assert torch.equal(r1.loss_trace, r2.loss_trace)
    r3 = run_point(problem, n_draws=50, thin=2, seed=8)
    assert not torch.equal(r1.draws["w"], r3.draws["w"])
    m, a, wstar, _, _, eps = problem
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=N_BETA, gamma=GAMMA, n_chains=2,
                                n_draws=50, thin=2, burn_in=200, seed=7)
    r4 = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg,
                        observables={"w": lambda model: model.w}, progress=False)
    assert torch.equal(r4.draws["w"], r1.draws["w"][:2])


def test_global_rng_untouched_and_minibatches_reproducible(problem):
    m, a, wstar, _, _, eps = problem
    m8, a8 = m.repeat(4, 1), a.repeat(4, 1, 1)
    before = torch.get_rng_state()
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=N_BETA, gamma=GAMMA, n_chains=2,
                                n_draws=20, batch_size=5, seed=1)
    runs = [suscept.sample(Point(wstar), quadratic_losses, (m8, a8), cfg, probe=(m, a),
                           progress=False) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(runs[0].draws["loss"], runs[1].draws["loss"])


def test_run_save_load_roundtrip(problem, tmp_path):
    run = run_point(problem, n_draws=30, thin=1)
    run.save(tmp_path / "run")
    back = suscept.Run.load(tmp_path / "run")
    assert back.config == run.config and back.shapes == run.shapes
    assert torch.equal(back.draws["w"], run.draws["w"])
    a = suscept.loss_kernel(run.moments_of("w"))
    b = suscept.loss_kernel(back.moments_of("w"))
    assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
    est = suscept.bif(run.flat("loss"))
    est.save(tmp_path / "bif.pt")
    est2 = suscept.Estimate.load(tmp_path / "bif.pt")
    assert torch.equal(est2.value, est.value) and est2.dims == est.dims
