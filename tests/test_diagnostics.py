"""Chain diagnostics against an exact autocorrelation time (docs/theory.md section 7)."""

import torch

import suscept
from suscept.exact import posterior, quadratic_form_iat, random_problem


def _gaussian_chain(chains: int, steps: int, seed: int):
    """The probe loss ``q = 1/2 x^T H x`` along full-batch SGLD on a Gaussian (3 parameters),
    stationary from the start, ``[chain, step]``; and ``(H, P, eps)``. Simulated in the
    eigenbasis of ``P``, where ``R = I - (eps/2) P`` is diagonal."""
    m, a = random_problem(6, 3, seed=4)
    h = a.mean(0)
    wstar = torch.linalg.solve(h, torch.einsum("ijk,ik->j", a, m) / 6)
    prec = posterior(m, a, 10.0, 5.0, wstar)[1]
    eps = 0.3 / float(torch.linalg.eigvalsh(prec).max())
    p, u = torch.linalg.eigh(prec)
    r = 1 - eps / 2 * p
    g = torch.Generator().manual_seed(seed)
    noise = eps**0.5 * torch.randn(steps, chains, 3, generator=g, dtype=torch.float64)
    x = torch.empty(steps, chains, 3, dtype=torch.float64)
    x[0] = torch.randn(chains, 3, generator=g, dtype=torch.float64) * (eps / (1 - r**2)).sqrt()
    for k in range(1, steps):
        torch.addcmul(noise[k], x[k - 1], r, out=x[k])
    q = 0.5 * torch.einsum("sci,ij,scj->cs", x, u.T @ h @ u, x)
    return q, (h, prec, eps)


def test_iat_is_the_mean_iat_of_the_draws():
    """diagnostics.iat of the probe loss equals the exact IAT within 4.5 of the standard error
    of 64 per-chain estimates; the rank-normalized (bulk) ESS would not: for this skewed
    observable its IAT is ~7% smaller, too small for error bars."""
    q, (h, prec, eps) = _gaussian_chain(64, 25_000, seed=0)
    exact = quadratic_form_iat(h, prec, eps)
    for method, agrees in (("mean", True), ("bulk", False)):
        per_chain = torch.stack([q.shape[1] / suscept.diagnostics.ess(q[c:c + 1, :, None],
                                                                      method)[0]
                                 for c in range(q.shape[0])])
        se = float(per_chain.std() / q.shape[0] ** 0.5)
        assert (abs(float(per_chain.mean()) - exact) < 4.5 * se) == agrees, (method, se)
    pooled = float(suscept.diagnostics.iat(q[..., None])[0])
    assert abs(pooled - exact) < 4.5 * se
