"""The pathwise spring-only susceptibility (suscept.pathwise) against an exact answer.

Token losses are cubic polynomials of three parameters, so the spring-only covariances are
exact by Gauss-Hermite quadrature (8 nodes per coordinate integrate degree <= 15 exactly).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import suscept
from suscept import pathwise
from suscept.errors import ConfigError
from suscept.pathwise import PathwiseBase, combine, pathwise_susceptibility
from suscept.spring import stationary

P, X = 3, 6
G = torch.Generator().manual_seed(3)
B = 2.0 + torch.randn(X, P, generator=G, dtype=torch.float64)    # linear terms (mean != 0)
A = torch.randn(X, P, P, generator=G, dtype=torch.float64)
A = 0.5 * (A + A.transpose(1, 2))                                         # quadratic terms
C = 0.5 * torch.randn(X, P, generator=G, dtype=torch.float64)      # cubic terms
W_STAR = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
MASKS = [{"w": torch.tensor([True, True, False])}, {"w": torch.tensor([False, False, True])}]
CFG = suscept.SamplerConfig(step_size=0.02, n_beta=1.0, gamma=10.0, n_chains=4, n_draws=400,
                            thin=1, seed=5)


class Poly(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(W_STAR.clone())


def losses(w: torch.Tensor, idx=slice(None)) -> torch.Tensor:
    """``l_i(w) = b_i . w + 1/2 w^T A_i w + c_i . w^3`` for ``w [..., P]``: ``[..., n]``."""
    return (torch.einsum("ip,...p->...i", B[idx], w)
            + 0.5 * torch.einsum("...p,ipq,...q->...i", w, A[idx], w)
            + torch.einsum("ip,...p->...i", C[idx], w**3))


def token_loss(module, batch):
    return losses(module.w, batch)


def restricted(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi [..., K]`` and ``y [..., K, X]`` at ``w [..., P]`` (module docstring of pathwise)."""
    base = losses(W_STAR).mean()
    phis, ys = [], []
    for m in MASKS:
        l = losses(W_STAR + m["w"].double() * (w - W_STAR))
        phis.append(l.mean(-1) - base)
        ys.append(l - l.mean(-1, keepdim=True))
    return torch.stack(phis, -1), torch.stack(ys, -2)


def evaluate(module):
    phi, y = restricted(module.w.detach())
    return {"phi": phi, "restricted_token_loss": y}


def exact_cov0(cfg=CFG) -> torch.Tensor:
    """``Cov0(phi_k, y_kx) [K, X]`` under ``N(mu, s^2 I)`` (the spring-only law of ``cfg``) by
    Gauss-Hermite quadrature."""
    z, wt = np.polynomial.hermite_e.hermegauss(8)
    z, wt = torch.tensor(z), torch.tensor(wt / wt.sum())
    grid = torch.stack(torch.meshgrid(*[z] * P, indexing="ij"), -1).reshape(-1, P)
    weight = torch.stack(torch.meshgrid(*[wt] * P, indexing="ij"), -1).reshape(-1, P).prod(-1)
    mu, sd = stationary(cfg, W_STAR)
    phi, y = restricted(mu + sd * grid)
    e_phi, e_y = weight @ phi, torch.einsum("n,nkx->kx", weight, y)
    return torch.einsum("n,nk,nkx->kx", weight, phi - e_phi, y - e_y)


def test_unbiased_and_less_noisy_than_the_antithetic_base():
    """Every entry within 4.5 of its own standard error of the exact Cov0; the plain antithetic
    estimator on the very same pairs (spring_sample shares the noise stream) is noisier; and
    dropping the Stein gradient term would be caught (power)."""
    truth = exact_cov0()
    base = PathwiseBase(Poly(), CFG, evaluate, token_loss, torch.arange(X), MASKS)
    terms = [t for c in range(CFG.n_chains) for t in base.pairs(c, CFG.n_draws // 2, 4)]
    value, se, parts = combine(terms)
    z = (value - truth) / se
    assert z.abs().max() < 4.5, z
    plain = suscept.spring_sample(Poly(), token_loss, torch.arange(X), CFG,
                                  observables=evaluate, stream=[], antithetic=True,
                                  progress=False)
    from suscept.control_variates import combine_se
    from suscept.coupled import base_sums
    s, sizes, n = base_sums(plain.draws["phi"], plain.draws["restricted_token_loss"], True,
                            True, 5)
    se_plain = combine_se(s, sizes, n)
    assert ((s.sum(0) / (n - 1) - truth) / se_plain).abs().max() < 4.5  # same estimand
    assert float((se / se_plain).median()) < 0.5, (se / se_plain)
    p = torch.stack([t.path for t in terms if t.path is not None])
    assert parts["n_gradient_pairs"] == len(p) == CFG.n_chains * math.ceil(200 / 4)
    without = (value - p.mean(0) - truth) / se
    assert without.abs().max() > 10  # the gradient term carries a large part of Cov0


def test_public_call_sign_orientation_and_model_untouched():
    model = Poly()
    before = model.w.detach().clone()
    chi = pathwise_susceptibility(model, CFG, evaluate, token_loss, torch.arange(X), MASKS,
                                  grad_every=8, progress=False)
    assert chi.dims == ("token", "component") and chi.shape == (X, len(MASKS))
    z = (chi.value + exact_cov0().T) / chi.stderr   # chi = -Cov0
    assert z.abs().max() < 4.5, z
    assert torch.equal(model.w.detach(), before) and model.w.grad is None
    assert chi.meta["n_gradient_pairs"] == CFG.n_chains * 25
    assert set(chi.meta["seconds"]) == {"jacobian", "evaluate", "linear", "gradient"}
    half = chi.meta["split_half"]  # two chains against two: the columns are reliable here
    assert len(half) == len(MASKS) and min(half) > 0.8, half


def test_bad_input_is_refused(monkeypatch):
    from dataclasses import replace

    args = (evaluate, token_loss, torch.arange(X), MASKS)
    with pytest.raises(ConfigError, match="plain SGLD"):
        pathwise_susceptibility(Poly(), replace(CFG, precondition="rmsprop"), *args,
                                progress=False)
    with pytest.raises(ConfigError, match="must be even"):
        pathwise_susceptibility(Poly(), replace(CFG, n_draws=7), *args, progress=False)
    with pytest.raises(ConfigError, match="grad_every"):
        pathwise_susceptibility(Poly(), CFG, *args, grad_every=0, progress=False)
    monkeypatch.setattr(pathwise, "MAX_JACOBIAN", 10)
    with pytest.raises(ConfigError, match="fewer probe tokens"):
        pathwise_susceptibility(Poly(), CFG, *args, progress=False)


def test_as_the_base_of_the_coupled_estimator():
    """coupled_susceptibility with the pathwise chi0 as base: the coupled difference plus chi0,
    errors in quadrature; it agrees with the antithetic spring_sample base on the same run and
    twins; a base of another law or of the run's own seed is refused."""
    from dataclasses import replace

    from suscept.coupled import coupled_susceptibility, spring_draws

    cfg = replace(CFG, n_draws=100, thin=2, burn_in=50, seed=0)
    run = suscept.sample(Poly(), token_loss, torch.arange(X), cfg, observables=evaluate,
                         stream=[], store_draws=True, progress=False)
    twin = spring_draws(Poly(), cfg, evaluate, start="stationary")
    chi0 = pathwise_susceptibility(Poly(), replace(cfg, n_draws=400, seed=1), evaluate,
                                   token_loss, torch.arange(X), MASKS, grad_every=4,
                                   progress=False)
    chi, added = coupled_susceptibility(run.draws, twin, chi0, config=cfg)
    torch.testing.assert_close(chi.value, added.value + chi0.value)
    torch.testing.assert_close(chi.stderr**2, added.stderr**2 + chi0.stderr**2)
    anti = suscept.spring_sample(Poly(), token_loss, torch.arange(X), replace(cfg, n_draws=400,
                                 seed=2), observables=evaluate, stream=[], antithetic=True,
                                 progress=False)
    ref, _ = coupled_susceptibility(run.draws, twin, anti, config=cfg)
    z = (chi.value - ref.value) / (chi0.stderr**2 + ref.stderr**2 - added.stderr**2).sqrt()
    assert z.abs().max() < 4.5, z
    with pytest.raises(ConfigError, match="another seed"):
        coupled_susceptibility(run.draws, twin, chi0, config=replace(cfg, seed=1))
    with pytest.raises(ConfigError, match="gamma"):
        coupled_susceptibility(run.draws, twin, chi0, config=replace(cfg, gamma=11.0))
    with pytest.raises(ConfigError, match="config="):
        coupled_susceptibility(run.draws, twin, chi0)


def test_streamed_sums_equal_the_formula_on_stored_terms():
    """Sums (raw moments about the first pair, two halves merged) give the estimate and the
    i.i.d. standard error of the stored-term formula to rounding: nothing per pair is kept;
    halves with different shifts are not merged."""
    from suscept.pathwise import PairTerms, Sums

    g = torch.Generator().manual_seed(0)

    def r(*shape, loc=0.0, scale=1.0):
        return loc + scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    terms = [PairTerms(r(3, loc=0.3, scale=0.1), r(3, scale=0.1), r(3, 5, loc=2.0, scale=0.05),
                       r(3, 5, scale=0.05), r(3, 5, scale=0.01) if j % 3 == 0 else None)
             for j in range(50)]
    e_phi, e_y = torch.stack([t.e_phi for t in terms]), torch.stack([t.e_y for t in terms])
    q = ((e_phi - e_phi.mean(0))[..., None] * (e_y - e_y.mean(0)) * 50 / 49
         + torch.stack([t.o_phi[..., None] * t.r for t in terms]))
    p = torch.stack([t.path for t in terms if t.path is not None])
    want, want_se = q.mean(0) + p.mean(0), (q.var(0) / 50 + p.var(0) / len(p)).sqrt()
    a = Sums()
    for t in terms[:20]:
        a.add(t)
    b = Sums(a.shift)
    for t in terms[20:]:
        b.add(t)
    for got, se, _ in (combine(terms), a.merge(b).result()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(se, want_se, rtol=1e-10, atol=0)
    with pytest.raises(ConfigError, match="share their shift"):
        a.merge(Sums())


def test_first_order_term_exact_and_leading():
    """chi1 equals the hand-computed -(s^2 M_k grad Lbar_S) . a_x (gradients of the cubic
    losses in closed form) to float32 precision; and it is the leading term of the exact Cov0:
    the relative error ||Cov0 + chi1^T|| / ||chi1|| falls like s^2 (16x from gamma 10 to 160 at
    a small step)."""
    from dataclasses import replace

    model, probe = Poly(), torch.arange(X)
    rel = []
    for gamma in (10.0, 160.0):
        cfg = replace(CFG, step_size=1e-4, gamma=gamma)
        chi1 = suscept.first_order_susceptibility(model, cfg, token_loss, probe, MASKS)
        assert chi1.dims == ("token", "component") and (chi1.stderr == 0).all()
        grads = B + torch.einsum("ipq,q->ip", A, W_STAR) + 3 * C * W_STAR**2  # [X, P]
        s2 = float(stationary(cfg, W_STAR)[1][0] ** 2)
        want = torch.stack([-(grads - grads.mean(0)) @ (m["w"].double() * s2 * grads.mean(0))
                            for m in MASKS], 1)
        # the token Jacobian is kept in float32 (suscept.pathwise.token_jacobian)
        torch.testing.assert_close(chi1.value, want, rtol=1e-6, atol=0)
        rel.append(float((exact_cov0(cfg) + chi1.value.T).norm() / chi1.value.norm()))
    assert 0.01 < rel[0] < 1  # at gamma 10 the higher orders are visible
    assert 14 < rel[0] / rel[1] < 18  # s^2 ratio 16 (measured 16.04)
    assert all(torch.equal(p, W_STAR) for p in model.parameters())


def test_first_order_term_refuses_what_it_cannot_expand():
    from dataclasses import replace

    for bad in (replace(CFG, weight_decay=0.1), replace(CFG, precondition="rmsprop")):
        with pytest.raises(ConfigError):
            suscept.first_order_susceptibility(Poly(), bad, token_loss, torch.arange(X), MASKS)


def test_interpolation_estimator_exact_and_less_noisy():
    """The interpolation estimator (suscept.interpolation) on the cubic losses: every entry
    within 4.5 of its own standard error of the exact Cov0 (Gauss-Hermite), its standard errors
    honest (mean z^2 near 1 over the entries of four independent seeds), smaller than the
    pathwise estimator's at the same number of draws, and the model untouched."""
    from dataclasses import replace

    from suscept.interpolation import interpolation_susceptibility

    truth = exact_cov0().T
    model = Poly()
    before = model.w.detach().clone()
    z2 = []
    for seed in range(4):
        chi = interpolation_susceptibility(model, replace(CFG, seed=seed, n_draws=100),
                                           token_loss, torch.arange(X), MASKS, progress=False)
        z = (chi.value + truth) / chi.stderr                  # chi = -Cov0
        assert z.abs().max() < 4.5, z
        z2.append(z**2)
    mean_z2 = float(torch.stack(z2).mean())
    # honest errors: z^2 is chi2_1, so the mean of 48 has sd sqrt(2 / 48) = 0.20; 3 sd each side
    assert 0.4 < mean_z2 < 1.6, mean_z2
    assert chi.dims == ("token", "component") and chi.shape == (X, len(MASKS))
    assert chi.meta["n_pairs"] == CFG.n_chains * 50 and chi.meta["n_draws"] == CFG.n_chains * 100
    assert set(chi.meta["seconds"]) == {"gradient", "jvp"}
    assert torch.equal(model.w.detach(), before) and model.w.grad is None
    path = pathwise_susceptibility(model, replace(CFG, seed=3, n_draws=100), evaluate,
                                   token_loss, torch.arange(X), MASKS, grad_every=1,
                                   progress=False)
    assert float((chi.stderr / path.stderr).median()) < 0.5, chi.stderr / path.stderr


def test_interpolation_estimator_with_weight_decay():
    """With weight decay the spring-only law's mean moves off w* (mu = gamma / (gamma +
    lambda) w*) while the restricted points stay anchored at w*: still the exact Cov0 (drawing
    around w* instead of mu puts the largest entry about 20 standard errors off; checked)."""
    from dataclasses import replace

    from suscept.interpolation import interpolation_susceptibility

    cfg = replace(CFG, weight_decay=5.0, n_draws=100, seed=11)
    mu, _ = stationary(cfg, W_STAR)
    assert (mu - W_STAR).abs().max() > 0.01
    chi = interpolation_susceptibility(Poly(), cfg, token_loss, torch.arange(X), MASKS,
                                       progress=False)
    z = (chi.value + exact_cov0(cfg).T) / chi.stderr
    assert z.abs().max() < 4.5, z


def test_interpolation_estimator_identity_is_needed(monkeypatch):
    """Power, where the covariance is all second order: quadratic token losses with their
    minimum at w* (b_i = -A_i w*, no cubic term), so grad f and grad g vanish at w* and the
    first-order term is 0. The estimator with t ~ U(0, 1) agrees with the exact Cov0; with t
    fixed at 1 (both gradients at one draw) it estimates twice Cov0 (for quadratics
    E[grad f . S grad g(z_t)] = t Cov0 x 2), and the test sees it."""
    import sys

    from suscept import interpolation

    here = sys.modules[__name__]
    monkeypatch.setattr(here, "B", -torch.einsum("ipq,q->ip", A, W_STAR))
    monkeypatch.setattr(here, "C", torch.zeros_like(C))
    truth = exact_cov0()
    assert truth.abs().max() > 1e-3  # s^4 tr(...) with s^2 about 0.1
    base = interpolation.InterpolationBase(Poly(), CFG, token_loss, torch.arange(X), MASKS)
    noise = torch.Generator().manual_seed(0)
    right, fixed = interpolation.MeanSums(), interpolation.MeanSums()
    for _ in range(1600):  # z of the t = 1 bias about sqrt(1600 / 8) = 14 on component 2
        d, d2 = (base.sd * torch.randn(P, generator=noise, dtype=torch.float64)
                 for _ in range(2))
        t = float(torch.rand((), generator=noise))
        z = t * d + (1 - t * t) ** 0.5 * d2
        right.add((base.q(d, z) + base.q(-d, -z)) / 2)
        fixed.add((base.q(d, d) + base.q(-d, -d)) / 2)
    value, se, _ = right.result()
    assert ((value - truth) / se).abs().max() < 4.5
    value, se, _ = fixed.result()
    assert ((value - truth) / se).abs().max() > 8
    assert ((value - 2 * truth) / se).abs().max() < 4.5


def test_interpolation_estimator_refuses_bad_input():
    from dataclasses import replace

    from suscept.interpolation import interpolation_susceptibility

    args = (token_loss, torch.arange(X), MASKS)
    with pytest.raises(ConfigError, match="plain SGLD"):
        interpolation_susceptibility(Poly(), replace(CFG, precondition="rmsprop"), *args,
                                     progress=False)
    with pytest.raises(ConfigError, match="must be even"):
        interpolation_susceptibility(Poly(), replace(CFG, n_draws=7), *args, progress=False)
