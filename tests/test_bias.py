"""The step-size bias (suscept.bias) on quadratic problems whose chain and posterior are exact."""

import pytest
import torch

import suscept
from suscept.bias import debias, inflation, posterior_covariance, richardson
from suscept.exact import (
    Point,
    expected_loss,
    posterior,
    quad_cov,
    quadratic_losses,
    random_problem,
    sgld_covariance,
)
from suscept.spring import odd_even, spring_sample


def kernel(m, a, mean, cov, parts=("gradient", "curvature")):
    """Exact Cov(l_i, l_j) under N(mean, cov), or one of its two parts."""
    b = torch.einsum("ijk,ik->ij", a, mean[None] - m)
    n = len(m)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            zero = torch.zeros_like(a[i])
            out[i, j] = quad_cov(b[i] if "gradient" in parts else 0 * b[i],
                                 a[i] if "curvature" in parts else zero,
                                 b[j] if "gradient" in parts else 0 * b[j],
                                 a[j] if "curvature" in parts else zero, cov)
    return out


def test_chain_response_follows_the_derived_factors():
    """In 1-D, dE_eps[l_q]/drho_j = -beta [(1 - x) grad_eps + (1 - 2x) curv_eps] and the
    posterior's is -beta [(1 - x) grad_eps + (1 - x)^2 curv_eps], x = eps p / 4 (exact)."""
    m = torch.tensor([[0.7], [-1.2], [0.3]], dtype=torch.float64)
    a = torch.tensor([[[2.0]], [[0.5]], [[1.5]]], dtype=torch.float64)
    t, gamma, eps, wstar, j, q = 30.0, 4.0, 0.05, torch.zeros(1, dtype=torch.float64), 0, 2
    beta = t / 3

    def e_q(rho_j, chain):
        rho = torch.ones(3, dtype=torch.float64)
        rho[j] = rho_j
        mean, prec = posterior(m, a, t, gamma, wstar, rho)
        cov = sgld_covariance(prec, eps) if chain else torch.linalg.inv(prec)
        return expected_loss(mean, cov, m[q], a[q])

    h = 1e-5
    response = {c: float((e_q(1 + h, c) - e_q(1 - h, c)) / (2 * h)) for c in (True, False)}
    mean, prec = posterior(m, a, t, gamma, wstar)
    s_eps = sgld_covariance(prec, eps)
    grad = float(kernel(m, a, mean, s_eps, ("gradient",))[q, j])
    curv = float(kernel(m, a, mean, s_eps, ("curvature",))[q, j])
    f = inflation(eps, float(prec))
    x = eps * float(prec) / 4
    assert x > 0.1  # a visible bias
    chain = -beta * (f["response_gradient"] * grad + f["response_curvature"] * curv)
    post = -beta * (grad / f["covariance_gradient"] + curv / f["covariance_curvature"])
    assert abs(response[True] - float(chain)) < 1e-6 * abs(response[True])
    assert abs(response[False] - float(post)) < 1e-6 * abs(response[False])
    assert abs(response[True] + beta * (grad + curv)) > 0.1 * abs(response[True])


def test_posterior_covariance_inverts_sigma_eps():
    m, a = random_problem(5, 4, seed=9)
    _, prec = posterior(m, a, 10.0, 2.0, torch.zeros(4, dtype=torch.float64))
    eps = 1.5 / torch.linalg.eigvalsh(prec).max().item()  # valid below eps p_max = 2
    back = posterior_covariance(sgld_covariance(prec, eps), eps)
    torch.testing.assert_close(back, torch.linalg.inv(prec), rtol=1e-9, atol=1e-12)


def test_richardson_removes_the_first_order_bias_of_sampled_kernels():
    m, a = random_problem(4, 3, seed=1)
    wstar = torch.linalg.solve(a.mean(0), torch.einsum("ijk,ik->j", a, m) / 4)
    mean, prec = posterior(m, a, 20.0, 5.0, wstar)
    eps = 1.0 / torch.linalg.eigvalsh(prec).max().item()  # eps p_max = 1
    ests = []
    for h, seed in ((eps / 2, 1), (eps, 2)):
        cfg = suscept.SamplerConfig(step_size=h, n_beta=20.0, gamma=5.0, n_chains=4,
                                    n_draws=1000, thin=2, burn_in=100, seed=seed)
        run = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg, probe=(m, a),
                             stream=[("loss", "loss")], progress=False)
        ests.append(suscept.loss_kernel(run.moments_of("loss")))
    truth = kernel(m, a, mean, torch.linalg.inv(prec))
    exact = [kernel(m, a, mean, sgld_covariance(prec, h)) for h in (eps / 2, eps)]
    remainder = (2 * exact[0] - exact[1] - truth).abs()  # O(x_1 x_2), computed exactly
    assert remainder.norm() < 0.15 * (exact[1] - truth).norm()
    rich = richardson(ests[0], ests[1], eps / 2, eps)
    assert ((rich.value - truth).abs() < 4.5 * rich.stderr + remainder).all()
    assert ests[1].z(truth).abs().max() > 5  # the uncorrected coarse chain is rejected
    assert "Richardson" in rich.convention


def test_debias_makes_the_spring_control_the_continuous_posterior():
    m, a = random_problem(4, 3, seed=3)
    wstar = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    cfg = suscept.SamplerConfig(step_size=0.4, n_beta=1.0, gamma=4.0, n_chains=4,
                                n_draws=2000, seed=5)
    run = spring_sample(Point(wstar), quadratic_losses, (m, a), cfg, probe=(m, a),
                        antithetic=True, progress=False)
    even, odd = odd_even(run.flat("loss"))
    cont = torch.eye(3, dtype=torch.float64) / 4.0
    for draws, part in ((odd, "gradient"), (even, "curvature")):
        est = suscept.loss_kernel(draws)
        truth = kernel(m, a, wstar, cont, (part,))
        assert debias(est, 0.4, 4.0, part).z(truth).abs().max() < 4.5
        assert est.z(truth).abs().max() > 5


def test_derivative_scale_susceptibility():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(4, 30, 2, generator=g, dtype=torch.float64)
    y = phi[..., None] + torch.randn(4, 30, 2, 5, generator=g, dtype=torch.float64)
    moments = suscept.susceptibilities.from_draws(phi, y)
    raw = suscept.susceptibility(moments)
    der = suscept.susceptibility(moments, scale="derivative", beta=0.25)
    torch.testing.assert_close(der.value, 0.25 * raw.value)
    torch.testing.assert_close(der.stderr, 0.25 * raw.stderr)
    assert der.convention.startswith("beta") and der.meta["scale"] == "derivative"
    with pytest.raises(suscept.ConfigError, match="beta"):
        suscept.susceptibility(moments, scale="derivative")
