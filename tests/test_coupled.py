"""Coupled differences (suscept.coupled) on an exactly Gaussian posterior."""

import math
from dataclasses import replace

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


def error_ratio(w, w0, wb):
    """Median over elements of ``coupled.stderr / plain.stderr`` and its leave-one-chain-out
    jackknife standard error (chain c of the run goes with its twin c; the base's 32 chains
    are split into as many groups as the run has chains)."""
    def ratio(keep):
        est = coupled_covariance((w[keep], w[keep]), (w0[keep], w0[keep]),
                                 (wb[base[keep].flatten()],) * 2, n_blocks=5)
        return float((est.stderr / suscept.loss_kernel(w[keep]).stderr).median())

    c = w.shape[0]
    base = torch.arange(wb.shape[0]).reshape(c, -1)
    loo = torch.tensor([ratio([k for k in range(c) if k != i]) for i in range(c)])
    return ratio(list(range(c))), float(((c - 1) / c * ((loo - loo.mean()) ** 2).sum()).sqrt())


@pytest.mark.parametrize("n_beta, beats_plain", [(2.0, True), (40.0, False)])
def test_coupled_covariance_unbiased_on_exact_gaussian(n_beta, beats_plain):
    """Agrees with the exact Sigma_eps within its error; beats the plain estimator's error
    (ratio below 1 by 4.5 of its jackknife errors) where the loss reshapes the posterior
    little (n_beta lambda_max / gamma small)."""
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
    lam = float(torch.linalg.eigvalsh(a.mean(0)).max())
    assert (n_beta * lam / GAMMA < 0.3) == beats_plain  # 0.19 vs 3.9
    ratio, se = error_ratio(w, w0, wb)
    assert math.isfinite(ratio) and (ratio + 4.5 * se < 1) == beats_plain, (ratio, se)


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


def test_stationary_twin_has_the_spring_sample_law_and_couples():
    """start="stationary": every draw of a twin is N(mu, sigma^2) of suscept.spring.stationary
    (weight decay shifts mu); a twin started at the anchor is not (power); and the twin
    still couples with the SGLD chain: at n_beta -> 0 they meet, (1 - a)^k geometrically."""
    from suscept.spring import stationary

    wstar = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)
    cfg = suscept.SamplerConfig(step_size=0.025, n_beta=1e-12, gamma=GAMMA, weight_decay=4.0,
                                n_chains=400, n_draws=1, thin=1, burn_in=0, seed=3)
    mu, sd = stationary(cfg, wstar)
    for start, ok in (("stationary", True), ("anchor", False)):
        w = spring_draws(Point(wstar), cfg, observe, start=start)["w"][:, 0]  # [chain, D]
        n = len(w)
        z_mean = (w.mean(0) - mu) / (sd / n**0.5)
        z_var = (w.var(0) / sd**2 - 1) / (2 / (n - 1)) ** 0.5
        assert (max(z_mean.abs().max(), z_var.abs().max()) < 4.5) == ok, (start, z_var)
    m, a, _, _, _, _ = setup(1e-12)
    late = replace(cfg, n_chains=2, n_draws=2, thin=60)
    run = suscept.sample(Point(wstar), quadratic_losses, (m, a), late, observables=observe,
                         progress=False)
    twin = spring_draws(Point(wstar), late, observe, start="stationary")["w"]
    gap = (twin - run.draws["w"]).abs().amax((0, 2))
    contraction = (1 - 0.025 * (GAMMA + 4.0) / 2) ** 60
    assert gap[1] < 2 * contraction * gap[0] + 1e-9 and gap[0] < 1e-4


def quadratic_features(w, mean):
    """``[w, w^2]`` per draw, and their ``(b, A)`` in ``Q = b^T x + 1/2 x^T A x``, x = w - mean."""
    eye = torch.eye(D, dtype=torch.float64)
    zero = torch.zeros(D, D, dtype=torch.float64)
    coef = [(eye[j], zero) for j in range(D)]
    coef += [(2 * mean[j] * eye[j], 2 * torch.outer(eye[j], eye[j])) for j in range(D)]
    return torch.cat([w, w**2], -1), coef


@pytest.mark.parametrize("n_beta", [2.0, 40.0])
@pytest.mark.parametrize("antithetic", [False, True])
def test_coupled_with_iid_base_unbiased_on_exact_gaussian(n_beta, antithetic):
    """C(SGLD) - C(stationary twins) + C(i.i.d. spring_sample draws) of Cov([w, w^2]) agrees
    with the exact answer under Sigma_eps within its reported error, antithetic or not; the
    continuous-time base (match_chain=False, a different law) is caught (power) where the
    factor ``1 - eps gamma / 4`` is far enough from 1."""
    from suscept.exact import quad_cov

    m, a, wstar, mean, prec, eps = setup(n_beta)
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=n_beta, gamma=GAMMA, n_chains=4,
                                n_draws=300, thin=4, burn_in=60, seed=0)
    run = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg, observables=observe,
                         progress=False)
    x, coef = quadratic_features(run.draws["w"], mean)
    x0, _ = quadratic_features(spring_draws(Point(wstar), cfg, observe,
                                            start="stationary")["w"], mean)
    sigma = sgld_covariance(prec, eps)
    truth = torch.stack([torch.stack([quad_cov(bi, ai, bj, aj, sigma) for bj, aj in coef])
                         for bi, ai in coef])
    base_cfg = replace(cfg, n_draws=2000, seed=100)
    zs = {}
    for match in (True, False):
        base = suscept.spring_sample(Point(wstar), quadratic_losses, (m, a), base_cfg,
                                     observables=observe, antithetic=antithetic,
                                     match_chain=match, progress=False)
        xb, _ = quadratic_features(base.draws["w"], mean)
        est = coupled_covariance((x, x), (x0, x0), (xb, xb), antithetic=antithetic)
        zs[match] = est.z(truth)
    assert zs[True].abs().max() < 4.5 and (zs[True] ** 2).mean() < 3.0, zs[True]
    if eps * GAMMA / 4 > 0.1:  # n_beta 2: Sigma_0 off by 11%, enough draws to see it
        assert zs[False].abs().max() > 4.5


def test_antithetic_base_part_on_pairs():
    """Antithetic pairs (d, -d): Cov(odd, even) is exactly 0; for even functions the pair
    holds one value twice, and the antithetic part is the unbiased k-statistic of the m
    distinct values, where the naive k-statistic of all 2m draws is (2m - 2) / (2m - 1) of it
    (biased low)."""
    from suscept.coupled import base_sums

    g = torch.Generator().manual_seed(1)
    d = torch.randn(3, 20, 1, generator=g, dtype=torch.float64)
    w = torch.stack([d, -d], 2).flatten(1, 2)  # [chain, 40, 1]: pairs (d, -d)
    odd, even = w**3, w**2 + torch.cos(w)

    def cov(x, y, anti):
        s, _, n = base_sums(x, y, False, anti, 5)
        return s.sum(0) / (n - 1)

    assert float(cov(odd, even, True).abs().max()) < 1e-12
    distinct = even[:, 0::2].flatten()
    m = len(distinct)
    torch.testing.assert_close(cov(even, even, True)[0, 0], distinct.var())
    torch.testing.assert_close(cov(even, even, False)[0, 0],
                               distinct.var() * (2 * m - 2) / (2 * m - 1))


def test_iid_base_is_checked_against_the_run():
    """A spring_sample base is accepted only with the twins' law: same step size, gamma and
    weight decay, chain variance, no mask, plain SGLD, another seed."""
    from suscept.coupled import check_base, coupled_susceptibility

    m, a, wstar, _, _, eps = setup(2.0)
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=2.0, gamma=GAMMA, n_chains=2, n_draws=6,
                                thin=2, seed=0)

    def base(config=cfg, **kw):
        return suscept.spring_sample(Point(wstar), quadratic_losses, (m, a), config,
                                     observables=susc_observe, progress=False, **kw)

    good = replace(cfg, seed=5)
    assert check_base(cfg, base(good, antithetic=True)) is True
    bad = {"another gamma": base(replace(good, gamma=2 * GAMMA)),
           "continuous law": base(good, match_chain=False),
           "a mask": base(good, mask={"w": torch.tensor([True, False, True, True])}),
           "the run's seed": base(cfg),
           "RMSprop": base(replace(good, precondition="rmsprop"))}
    for b in bad.values():
        with pytest.raises(suscept.ConfigError):
            check_base(cfg, b)
    with pytest.raises(suscept.ConfigError):
        check_base(replace(cfg, precondition="rmsprop"), base(good))
    run = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg,
                         observables=susc_observe, progress=False)
    twin = spring_draws(Point(wstar), cfg, susc_observe, start="stationary")
    with pytest.raises(suscept.ConfigError):  # a Run base needs the run's config
        coupled_susceptibility(run.draws, twin, base(good))
    chi, added = coupled_susceptibility(run.draws, twin, base(good, antithetic=True),
                                        config=cfg, n_blocks=2)
    assert chi.dims == ("token", "component") and chi.value.shape == (3, 2)
    assert chi.meta["antithetic"] and torch.isfinite(chi.stderr).all()


def susc_observe(model):
    """phi [K = 2] and restricted token losses [K, X = 3] of a Point: smooth functions of w."""
    w = model.w.detach()
    phi = torch.stack([w[0] ** 2, w[1] * w[2]])
    y = torch.stack([torch.stack([w[0], w[0] ** 2 + w[3], torch.sin(w[1])]),
                     torch.stack([w[2], w[1] * w[2], w[3] ** 2])])
    return {"phi": phi.clone(), "restricted_token_loss": y.clone()}


def test_twin_k_statistic_has_the_documented_finite_run_bias():
    """The k-statistic of N stationary but autocorrelated twin draws has expectation
    Cov_0 - b_0, b_0 = (N Var(xbar) - Cov_0) / (N - 1) (AR(1), rho = 1 - eps gamma / 2 per
    step); that of N i.i.d. spring_sample draws has expectation Cov_0: the coupled estimator
    with an i.i.d. base is the plain one's expectation plus b_0 (suscept.coupled)."""
    from suscept.spring import stationary

    wstar = torch.zeros(2, dtype=torch.float64)
    cfg = suscept.SamplerConfig(step_size=0.02, n_beta=1.0, gamma=10.0, n_chains=4000,
                                n_draws=5, thin=1, seed=0)
    s = float(stationary(cfg, wstar)[1][0]) ** 2
    per_group, n = 4, 5  # groups of 4 chains x 5 draws: N = 20 (n_beta is ignored)
    w = spring_draws(Point(wstar), cfg, observe, start="stationary")["w"]
    groups = w.reshape(-1, per_group * n, 2)
    k = groups.var(1)  # [group, coordinate] k-statistics
    rho = 1 - cfg.step_size * cfg.gamma / 2
    idx = torch.arange(n, dtype=torch.float64)
    big_n = per_group * n
    var_mean = s * float((rho ** (idx[:, None] - idx[None, :]).abs()).sum()) / (per_group * n**2)
    b0 = (big_n * var_mean - s) / (big_n - 1)
    se = k.std(0) / len(k) ** 0.5
    assert ((k.mean(0) - (s - b0)) / se).abs().max() < 4.5
    assert ((k.mean(0) - s) / se).abs().min() > 4.5  # the bias is there (17% of Cov_0)
    iid = suscept.spring_sample(Point(wstar), quadratic_losses, (torch.zeros(1, 2, dtype=
                                torch.float64), torch.eye(2, dtype=torch.float64)[None]),
                                replace(cfg, n_chains=1000, n_draws=big_n), observables=observe,
                                progress=False).draws["w"]
    k_iid = iid.var(1)
    assert ((k_iid.mean(0) - s) / (k_iid.std(0) / len(k_iid) ** 0.5)).abs().max() < 4.5


def test_twin_generator_leaves_grad_mode_alone_between_draws():
    """The spring-only chains switch grad off per step, never across a draw handed to the
    caller: code run between draws, or after the caller stops early, keeps its grad mode."""
    from suscept.coupled import _twin_draws

    m, a = random_problem(4, 3, seed=0)
    cfg = suscept.SamplerConfig(step_size=0.01, n_beta=1.0, gamma=5.0, n_chains=2, n_draws=3,
                                thin=2, seed=0)
    draws = _twin_draws(Point(torch.zeros(3, dtype=torch.float64)),
                        cfg, lambda model: {"w": model.w}, None, None, "anchor", False)
    c, d, values = next(draws)
    assert (c, d) == (0, 0) and torch.is_grad_enabled()
    assert not values["w"].requires_grad
    draws.close()
    assert torch.is_grad_enabled()


def test_coupling_skip_counts_what_the_burn_in_leaves():
    """The twin's gap shrinks by 1 - eps gamma_eff / 2 per step: 4 / (eps gamma_eff) steps
    leave e^-4 of its variance; the draws dropped are the steps the burn-in does not cover."""
    from suscept.coupled import coupling_skip, coupling_steps

    cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=30.0, gamma=300.0, thin=2)
    assert coupling_steps(cfg) == 14  # ceil(13.3)
    assert (1 - 1e-3 * 300 / 2) ** (2 * 14) < math.exp(-4)
    assert coupling_skip(cfg) == 7 and coupling_skip(replace(cfg, burn_in=10)) == 2
    assert coupling_skip(replace(cfg, burn_in=200)) == 0
    with pytest.raises(suscept.ConfigError, match="no spring"):
        coupling_skip(replace(cfg, gamma=0.0))
