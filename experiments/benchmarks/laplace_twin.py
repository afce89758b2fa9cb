"""A linear-Gaussian (Laplace) twin for the coupled estimator, where the loss shapes the
posterior too much for a spring-only twin.

The SGLD step (docs/theory.md section 2) with full-batch gradient ``g(w)`` of the mean loss is
``w' = w - (eps/2) [n_beta g(w) + gamma (w - w*) + lambda_wd w] + sqrt(eps) xi``. Replacing
``g`` by its linearization at w*, ``g0 + H x`` (``x = w - w*``, ``H`` the mean loss's Hessian
at w*), gives the linear chain

    x' = x - (eps/2) (b + P x) + sqrt(eps) xi,   b = n_beta g0 + lambda_wd w*,
    P = n_beta H + (gamma + lambda_wd) I = U diag(p) U^T,

which in the eigenbasis ``z = U^T x`` is an AR(1) per coordinate with the exact stationary law
``z_k ~ N(-c_k / p_k, 1 / (p_k (1 - eps p_k / 4)))`` (``c = U^T b``; stable iff
``eps p_k < 4``). Eigenvalues ``p_k`` below ``gamma + lambda_wd`` (negative curvature) are raised
to it: any positive ``p`` defines a valid linear chain, and the twin only has to share its law
with the base. The twin of SGLD chain ``c`` runs on that chain's own noise ``xi`` (the generator
of :func:`suscept.sample.chain_generators` ``(seed, c)``, one ``randn(d)`` per step) from a
draw of its stationary law, so every draw has exactly the law of :func:`laplace_pool`'s
i.i.d. (antithetic) draws, and ``C(SGLD) - C(twins) + C(base)`` has the plain estimator's
expectation up to the twins' ``O(1/N)`` finite-run bias, as with the spring-only twin
(docs/efficiency.md). On a quadratic loss the twin started at w* is the SGLD chain itself.
A twin step costs a ``d x d`` rotation of the noise; the Hessian is computed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from suscept import classical
from suscept.model import private_copy
from suscept.sample import chain_generators

START_KEY = 0x1A9


@dataclass
class Law:
    """Eigenbasis ``U [d, d]``, precisions ``p [d]``, drift offset ``c [d]`` (``U^T b``),
    stationary mean ``m [d]`` and sd ``sd [d]`` of ``z = U^T (w - w*)``, and ``w* [d]``."""

    u: Tensor
    p: Tensor
    c: Tensor
    m: Tensor
    sd: Tensor
    anchor: Tensor


def laplace_law(model, loss_fn, data, cfg) -> Law:
    """The linear chain's law at w* for the SGLD config ``cfg`` (plain SGLD, full batch)."""
    fn = classical.Functional(model, loss_fn)
    lam, u = torch.linalg.eigh(classical.hessian(fn, data))
    g0 = classical.per_sample_grads(fn, data).mean(0)
    w = fn.flat0.double()
    g_eff = cfg.gamma + cfg.weight_decay
    p = (cfg.n_beta * lam + g_eff).clamp_min(g_eff)
    if float(cfg.step_size * p.max()) >= 4:
        raise ValueError(f"eps p_max = {float(cfg.step_size * p.max()):.3g} >= 4: unstable")
    c = u.T @ (cfg.n_beta * g0 + cfg.weight_decay * w)
    sd = (1 / (p * (1 - cfg.step_size * p / 4))).sqrt()
    return Law(u, p, c, -c / p, sd, w)


def laplace_twins(model, cfg, law: Law, observe, start: str = "stationary") -> dict:
    """Observables ``{name: [chain, draw, ...]}`` at the draws of the linear twins of the
    ``cfg.n_chains`` SGLD chains (same noise, same layout: draw ``d`` at step ``burn_in + (d +
    1) thin``); ``start``: ``"stationary"`` or ``"anchor"`` (``x = 0``, as the SGLD chain)."""
    fm = private_copy(model)
    eps = cfg.step_size
    decay, shift = 1 - eps * law.p / 2, eps / 2 * law.c
    out: dict[str, list] = {}
    with torch.no_grad():
        for chain in range(cfg.n_chains):
            noise = chain_generators(cfg.seed, chain, law.anchor.device)[0]
            z = torch.zeros_like(law.m)
            if start == "stationary":
                seed = np.random.SeedSequence([cfg.seed, chain, START_KEY]).generate_state(1)
                gen = torch.Generator().manual_seed(int(seed[0]))
                z = law.m + law.sd * torch.randn(z.shape, generator=gen, dtype=z.dtype)
            rows = []
            for step in range(cfg.n_steps):
                xi = torch.randn(z.shape, generator=noise, dtype=fm.params.dtype)
                z = z * decay - shift + math.sqrt(eps) * (law.u.T @ xi.double())
                done = step + 1 - cfg.burn_in
                if done > 0 and done % cfg.thin == 0:
                    fm.params.copy_(law.anchor + law.u @ z)
                    rows.append({k: v.detach().clone() for k, v in observe(fm.module).items()})
            for k in rows[0]:
                out.setdefault(k, []).append(torch.stack([r[k] for r in rows]))
    return {k: torch.stack(v) for k, v in out.items()}


def laplace_pool(model, law: Law, observe, n_groups: int, n_draws: int, seed: int) -> dict:
    """I.i.d. antithetic draws ``w* + U (m +- sd zeta)`` of the twins' stationary law:
    ``{name: [group, n_draws, ...]}``, pairs at draws ``2k, 2k + 1``."""
    fm = private_copy(model)
    out: dict[str, list] = {}
    with torch.no_grad():
        for group in range(n_groups):
            gen = torch.Generator().manual_seed(seed + group)
            rows = []
            for k in range(n_draws):
                if k % 2 == 0:
                    d = law.sd * torch.randn(law.m.shape, generator=gen, dtype=law.m.dtype)
                fm.params.copy_(law.anchor + law.u @ (law.m + (d if k % 2 == 0 else -d)))
                rows.append({k2: v.detach().clone() for k2, v in observe(fm.module).items()})
            for k2 in rows[0]:
                out.setdefault(k2, []).append(torch.stack([r[k2] for r in rows]))
    return {k: torch.stack(v) for k, v in out.items()}
