"""The classical influence ladder against exact answers, and its regular-limit link to the BIF.

Deterministic rungs are checked against closed forms or independent autograd computations to
float64 precision; the random projection against its Johnson-Lindenstrauss variance; the BIF
at large gamma against the damped influence function within its reported standard error plus
the exactly computed Gaussian corrections (docs/theory.md section 3).
"""

import math

import pytest
import torch
from torch import nn

import suscept
from suscept import classical
from suscept.errors import ConfigError, ShapeError, SusceptError

F64 = torch.float64


def bce(model, batch):
    x, y = batch
    return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y,
                                                          reduction="none")


def logistic_problem(n=64, d=3, seed=0):
    """Binary logistic regression (float64), trained to its minimum by L-BFGS."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 8, d, generator=g, dtype=F64)
    y = (torch.rand(n + 8, generator=g, dtype=F64) < torch.sigmoid(
        x @ torch.tensor([1.0, -1.0, 0.5][:d], dtype=F64))).double()
    torch.manual_seed(seed)
    model = nn.Linear(d, 1).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-13,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = bce(model, (x[:n], y[:n])).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return model, (x[:n], y[:n]), (x[n:], y[n:])


def closed_form(model, data, queries):
    """Per-sample gradients and the Hessian of logistic regression in closed form.

    With ``z = (x, 1)`` and ``p = sigmoid(w.z)``: ``g_i = (p_i - y_i) z_i``,
    ``H = mean_i p_i (1 - p_i) z_i z_i^T``.
    """
    w = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])

    def parts(batch):
        x, y = batch
        z = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
        p = torch.sigmoid(z @ w)
        return z, p, (p - y)[:, None] * z

    z, p, g = parts(data)
    h = torch.einsum("i,ij,ik->jk", p * (1 - p), z, z) / len(z)
    return g, parts(queries)[2], h


@pytest.fixture(scope="module")
def logistic():
    return logistic_problem()


def test_gradients_hessian_and_influence_match_closed_form(logistic):
    model, data, queries = logistic
    g, gq, h = closed_form(model, data, queries)
    fn = classical.Functional(model, bce)
    assert torch.allclose(classical.per_sample_grads(fn, data), g, rtol=0, atol=1e-13)
    assert torch.allclose(classical.hessian(fn, data), h, rtol=0, atol=1e-13)
    est = classical.influence(model, bce, data, queries, damping=0.05)
    exact = -(g @ torch.linalg.solve(h + 0.05 * torch.eye(4, dtype=F64), gq.T)) / 64
    assert est.dims == ("sample", "observable") and est.shape == (64, 8)
    assert torch.allclose(est.value, exact, rtol=1e-10, atol=1e-15)
    assert (est.stderr == 0).all() and est.meta["solver"] == "explicit"
    # the rest of the ladder, each against its formula
    eye = torch.eye(4, dtype=F64)
    diag = classical.diagonal(model, bce, data, queries, damping=0.05)
    assert torch.allclose(diag.value, -(g / (h.diagonal() + 0.05)) @ gq.T / 64, rtol=1e-10)
    fisher = classical.diagonal(model, bce, data, queries, damping=0.05, curvature="fisher")
    assert torch.allclose(fisher.value, -(g / ((g ** 2).mean(0) + 0.05)) @ gq.T / 64,
                          rtol=1e-10)
    sim = classical.gradsim(model, bce, data, queries)
    assert torch.allclose(sim.value, -(g @ gq.T) / 64, rtol=1e-12)
    cos = classical.gradsim(model, bce, data, data, normalize=True).value
    assert torch.allclose(cos.diagonal(), -torch.ones(64, dtype=F64))
    # a query given as a function of the model: its gradient enters like a query loss
    obs = classical.influence(model, bce, data, lambda m: bce(m, queries).sum(), damping=0.05)
    assert torch.allclose(obs.value[:, 0], exact.sum(1), rtol=1e-10)
    assert not torch.allclose(exact, -(g @ torch.linalg.solve(h + eye, gq.T)) / 64, rtol=1e-3)


def test_cg_matches_explicit_solve():
    """CG stops when every residual is below tol |b|; then |x - x*| <= tol |b| / lambda_min
    of the damped Hessian, which bounds the relative error of tau by about
    tol * cond(H + damping). Checked on a 2-layer MLP (indefinite Hessian, damped)."""
    torch.manual_seed(0)
    x, y = torch.randn(48, 5, dtype=F64), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def ce(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    data, queries = (x[:40], y[:40]), (x[40:], y[40:])
    fn = classical.Functional(model, ce)
    lam = torch.linalg.eigvalsh(classical.hessian(fn, data))
    damping = float(lam[-1]) * 0.05 + max(0.0, -float(lam[0]))
    explicit = classical.influence(model, ce, data, queries, damping=damping)
    tol = 1e-10
    cg = classical.influence(model, ce, data, queries, damping=damping, solver="cg", tol=tol,
                             max_iter=2000)
    cond = (float(lam[-1]) + damping) / (float(lam[0]) + damping)
    err = (cg.value - explicit.value).abs().max() / explicit.value.abs().max()
    assert err < 10 * tol * cond, (err, cond)
    assert cg.meta["max_relative_residual"] <= tol
    # a truncated CG (2 iterations) is detectably worse: the comparison can fail
    with pytest.warns(suscept.EstimatorWarning, match="conjugate gradients stopped"):
        short = classical.influence(model, ce, data, queries, damping=damping, solver="cg",
                                    max_iter=2)
    assert (short.value - explicit.value).abs().max() / explicit.value.abs().max() > 1e-3


def test_hessian_diagonal_exact_and_hutchinson(logistic):
    model, data, _ = logistic
    fn = classical.Functional(model, bce)
    h = classical.hessian(fn, data)
    assert torch.allclose(classical.hessian_diagonal(fn, data, block=3), h.diagonal(),
                          rtol=0, atol=1e-14)
    # Hutchinson: each probe gives H_kk + sum_{l != k} v_k v_l H_kl, variance sum_{l!=k} H_kl^2
    k = 4000
    est = classical.hessian_diagonal(fn, data, n_probes=k, seed=1)
    se = ((h ** 2).sum(1) - h.diagonal() ** 2).sqrt() / math.sqrt(k)
    z = (est - h.diagonal()) / se
    assert z.abs().max() < 4, z


def test_projection_converges_to_gradsim_at_the_jl_rate(logistic):
    """``(P a)^T (P b)`` with ``P_ab ~ N(0, 1/dim)``: mean ``a^T b``, variance
    ``((a^T b)^2 + |a|^2 |b|^2) / dim``. Every entry lies within 5 of its standard deviations
    (a sum of ``dim`` iid products, near Gaussian), and the mean squared z-score over
    entries and seeds is 1 within the spread of a chi-square (checked over 4 seeds)."""
    model, data, queries = logistic
    g, gq, _ = closed_form(model, data, queries)
    exact = classical.gradsim(model, bce, data, queries).value
    var = ((g @ gq.T) ** 2 + (g.norm(dim=1)[:, None] * gq.norm(dim=1)[None]) ** 2) / 64 ** 2
    rms = {}
    for dim in (16, 256, 4096):
        zs = torch.stack([(classical.projected_gradsim(model, bce, data, queries, dim=dim,
                                                       seed=s).value - exact) / (var / dim).sqrt()
                          for s in range(4)])
        assert zs.abs().max() < 5 + 3 * (dim == 16), (dim, zs.abs().max())
        assert 0.6 < float((zs ** 2).mean()) < 1.5, (dim, float((zs ** 2).mean()))
        rms[dim] = float(((zs * (var / dim).sqrt()) ** 2).mean().sqrt())
    assert 2 < rms[16] / rms[256] < 8 and 2 < rms[256] / rms[4096] < 8  # sqrt(16) = 4
    # TRAK's projected Gauss-Newton: with dim >= d the projection is invertible and it equals
    # the exact influence with the empirical Fisher in place of H
    trak = classical.projected_gradsim(model, bce, data, queries, dim=64, damping=0.05)
    fisher = g.T @ g / 64
    exact_gn = -(g @ torch.linalg.solve(fisher + 0.05 * torch.eye(4, dtype=F64), gq.T)) / 64
    rel = (trak.value - exact_gn).abs().max() / exact_gn.abs().max()
    assert rel < 0.2, rel  # damping acts in the projected space, not exactly the same


def test_cg_on_a_transformer_matches_explicit():
    """The vmap / forward-over-reverse path on a TransformerLens model (tiny, 1 layer)."""
    pytest.importorskip("transformer_lens")
    import observables as ob

    lm = ob.build(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=12, n_ctx=8, seed=0)
    for p in lm.parameters():
        p.data = p.data.double()
    tok = torch.randint(0, 12, (24, 8), generator=torch.Generator().manual_seed(0))

    def loss(m, b):
        return ob.lm_loss(m, b[0])

    data, queries = (tok[:20],), (tok[20:],)
    fn = classical.Functional(lm, loss)
    g = classical.per_sample_grads(fn, data)
    ref = torch.autograd.grad(loss(lm, (tok[3:4],)).sum(), list(lm.parameters()))
    assert torch.allclose(g[3], torch.cat([r.reshape(-1) for r in ref]), atol=1e-12)
    lam = torch.linalg.eigvalsh(classical.hessian(fn, data))
    damping = max(0.0, -float(lam[0])) + 0.1
    explicit = classical.influence(lm, loss, data, queries, damping=damping)
    cg = classical.influence(lm, loss, data, queries, damping=damping, solver="cg", tol=1e-10,
                             max_iter=3000)
    assert torch.allclose(cg.value, explicit.value, rtol=0,
                          atol=1e-6 * float(explicit.value.abs().max()))


def test_model_unchanged_and_errors(logistic):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, data, queries = logistic
    for call in (lambda: classical.influence(model, bce, data, queries, damping=10.0),
                 lambda: classical.influence(model, bce, data, queries, damping=10.0,
                                             solver="cg"),
                 lambda: classical.diagonal(model, bce, data, queries, damping=1.0),
                 lambda: classical.projected_gradsim(model, bce, data, queries, dim=8)):
        call()
        assert model.training and all(m.training for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    def broken(m, b):
        if m.training is False and len(b[0]) < 60:
            raise RuntimeError("boom")
        return bce(m, b)

    with pytest.raises(RuntimeError, match="boom"):
        classical.influence(model, broken, data, queries, damping=1.0)
    assert model.training and all(torch.equal(before[k], v)
                                  for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="damping"):
        classical.influence(model, bce, data, queries, damping=-1.0)
    with pytest.raises(ConfigError, match="solver"):
        classical.influence(model, bce, data, queries, damping=1.0, solver="lu")
    with pytest.raises(ShapeError, match="per-sample losses"):
        classical.gradsim(model, lambda m, b: bce(m, b).mean(), data, queries)
    with pytest.raises(ShapeError, match="probe must be a batch like data"):
        classical.gradsim(model, bce, data, (queries[0][:, :2], queries[1]))
    with pytest.raises(ConfigError, match="dim"):
        classical.projected_gradsim(model, bce, data, queries, dim=0)
    with pytest.raises(SusceptError, match="not positive definite"):
        classical.influence(model, bce, data, queries, damping=0.0)  # random init: indefinite H


def test_ekfac_is_exact_when_kfac_is():
    """With a constant input, a linear layer's per-sample gradient is ``a ⊗ g_i`` with ``a``
    fixed, so its Fisher ``a a^T ⊗ E[g g^T]`` is exactly Kronecker-factored and EK-FAC equals
    the damped Fisher influence ``-(1/n) g_j^T (F + damping)^-1 g_q`` (float32 inside
    kronfluence: relative 1e-3)."""
    if classical.ekfac_available():
        pytest.skip(classical.ekfac_available())
    g = torch.Generator().manual_seed(0)
    x = torch.ones(40, 1, dtype=torch.float32)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(1, 3)

    def ce(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    data, queries = (x[:32], y[:32]), (x[32:], y[32:])
    est = classical.ekfac(model, ce, data, queries, damping=0.01)
    fn = classical.Functional(model, ce)
    gt, gq = classical.per_sample_grads(fn, data), classical.per_sample_grads(fn, queries)
    fisher = gt.T @ gt / 32
    exact = -(gt @ torch.linalg.solve(fisher + 0.01 * torch.eye(6, dtype=F64), gq.T)) / 32
    assert est.shape == (32, 8)
    assert torch.allclose(est.value, exact, rtol=0, atol=1e-3 * float(exact.abs().max()))
    wrong = -(gt @ torch.linalg.solve(fisher + 0.1 * torch.eye(6, dtype=F64), gq.T)) / 32
    assert not torch.allclose(est.value, wrong, rtol=0, atol=1e-3 * float(exact.abs().max()))


def test_bif_regular_limit_is_the_damped_influence_function():
    """docs/theory.md section 3: for a concentrated posterior, ``Cov(l_j, l_q) = g_j^T S g_q
    + 1/2 tr(H_j S H_q S) + ...`` and ``beta S = (1/n) (H + gamma / n_beta)^-1``, so the
    derivative-scale BIF ``-beta Cov`` is the influence function at damping
    ``gamma / n_beta`` plus known corrections, both computed exactly here:

    - SGLD discretization: the chain's covariance is ``S_eps = (P - eps/4 P^2)^-1`` with
      ``P = n_beta H + gamma I`` (docs/theory.md section 2), not ``S = P^-1`` (here ``eps p_max =
      0.1``: 2.5%);
    - the second-order Gaussian term ``-beta/2 tr(H_j S_eps H_q S_eps)``, per-sample Hessians
      ``H_j = p_j (1 - p_j) z_j z_j^T``.

    What remains is the non-Gaussian part (third and fourth derivatives of the logistic loss
    and of the potential), of relative size ``|z|^2 ||S|| ~ 4 / 600 < 1%``; the tolerance per
    entry is 4 jackknife standard errors plus 2% of the prediction for it. The damping must be
    the right one: the undamped influence function and the one at twice the damping are
    rejected by the same test."""
    model, data, queries = logistic_problem()
    n, n_beta, gamma = 64, 2000.0, 500.0
    g, gq, h = closed_form(model, data, queries)
    p_mat = n_beta * h + gamma * torch.eye(4, dtype=F64)
    p_max = float(torch.linalg.eigvalsh(p_mat)[-1])
    eps = 0.1 / p_max
    cfg = suscept.SamplerConfig(step_size=eps, n_beta=n_beta, gamma=gamma, n_chains=4,
                                n_draws=500, thin=10, burn_in=200, seed=3)
    run = suscept.sample(model, bce, data, cfg, probe=data,
                         observables={"query": lambda m: bce(m, queries)}, stream=[],
                         progress=False)
    est = suscept.bif(run.flat("loss"), run.flat("query"), scale="derivative", beta=run.beta)
    beta = n_beta / n

    def influence(damping):
        return classical.influence(model, bce, data, queries, damping=damping).value

    s_eps = torch.linalg.inv(p_mat - eps / 4 * p_mat @ p_mat)
    s = torch.linalg.inv(p_mat)
    disc = -beta * g @ (s_eps - s) @ gq.T

    def hess(batch):
        x, _ = batch
        z = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
        w = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
        p = torch.sigmoid(z @ w)
        return (p * (1 - p))[:, None, None] * z[:, :, None] * z[:, None, :]

    a, b = hess(data) @ s_eps, hess(queries) @ s_eps
    second = -beta / 2 * torch.einsum("jkl,qlk->jq", a, b)

    def check(damping):
        pred = influence(damping) + disc + second
        miss = (est.value - pred).abs() > 4 * est.stderr + 0.02 * pred.abs()
        return float(miss.double().mean()), float((((est.value - pred) / est.stderr) ** 2).mean())

    right = gamma / n_beta
    assert torch.allclose(influence(right), -beta * g @ s @ gq.T, rtol=1e-9)  # same scale
    miss, z2 = check(right)
    print(f"right damping: misses {miss:.4f}, mean z^2 {z2:.3f}")
    assert miss < 0.01 and 0.4 < z2 < 2.5, (miss, z2)  # mean z^2 near 1: errors as reported
    for wrong in (0.0, 2 * right):
        miss, z2 = check(wrong)
        assert miss > 0.2 and z2 > 8, (wrong, miss, z2)  # measured: 0.88/517, 0.41/18


def test_ekfac_missing_or_unsupported_says_why(monkeypatch):
    from suscept.exact import Point, quadratic_losses, random_problem

    m, a = random_problem(8, 3, seed=0)
    point = Point(torch.zeros(3, dtype=F64))
    if classical.ekfac_available() is None:  # installed: a model with no Linear is refused
        with pytest.raises(SusceptError, match="nn.Linear"):
            classical.ekfac(point, quadratic_losses, (m, a), (m[:2], a[:2]))
    monkeypatch.setitem(__import__("sys").modules, "kronfluence", None)
    assert "pip install" in classical.ekfac_available()
    with pytest.raises(SusceptError, match="kronfluence is not installed"):
        classical.ekfac(point, quadratic_losses, (m, a), (m[:2], a[:2]))
