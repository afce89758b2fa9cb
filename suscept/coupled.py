"""Coupled differences: the SGLD chain minus a spring-only chain on the same noise, plus the
spring-only covariance from many cheap chains.

The spring-only chain (``n_beta = 0``: the loss is ignored) of chain ``c`` takes the plain
SGLD step (docs/theory.md section 2) with the *same* noise ``xi_k`` as the SGLD chain ``c``
(drawn from the noise generator of :func:`suscept.sample.chain_generators` ``(seed, c)``,
one ``randn(d)`` per step, as the kernel does)::

    x0_{k+1} = x0_k - (eps/2) [gamma x0_k + lambda_wd (w* + x0_k)] + sqrt(eps) xi_k,   x0_0 = 0

It needs no gradient: a step is a few vector operations; only its draws' observables cost. With
``C`` the sample covariance of a chain's draws (k-statistic, same layout: burn-in, thin,
draws), the coupled estimator of ``Cov(x, y)`` under the tempered posterior is::

    C_coupled = C(SGLD chains) - C(their coupled spring chains) + C(independent spring chains)

The coupled and the independent spring chains run the same kernel from the same start with the
same layout and differ only in their noise seeds, so the two spring terms have the same
expectation and ``E[C_coupled] = E[C(SGLD chains)]`` exactly: the plain estimator's
expectation, finite-chain and burn-in bias included. The variance drops when the loss moves
the chain little away from its spring-only twin (``n_beta lambda_max / gamma`` small) and the
independent spring chains are many (they cost only evaluations).

Plain SGLD only (no preconditioner, no mask): the coupling needs the same noise scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from suscept.control_variates import block_sums, combine_se
from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.model import private_copy


def spring_draws(model: nn.Module, config, observables, *, chains: list[int] | None = None,
                 anchor: Mapping[str, Tensor] | None = None, progress: bool = False
                 ) -> dict[str, Tensor]:
    """Observables at the draws of the spring-only chains ``chains`` (default all).

    Args:
        model: the user's module at w* (copied, never modified).
        config: the :class:`~suscept.sample.SamplerConfig` of the SGLD run to couple with
            (its seed, step size, gamma, weight decay, burn-in, thin and draws; plain SGLD).
        observables: ``f(module) -> {name: Tensor}`` (e.g. an evaluation plan).
        chains: chain indices; chain ``c`` uses the noise of SGLD chain ``c`` (coupled); use
            indices ``>= config.n_chains`` for independent spring-only chains.
    Returns:
        ``{name: [len(chains), n_draws, *shape]}``, draw ``d`` at step
        ``burn_in + (d + 1) * thin`` as in :func:`suscept.sample`.
    """
    from suscept.sample import chain_generators

    if config.precondition is not None:
        raise ConfigError("coupled spring-only chains need plain SGLD (precondition=None)")
    if not callable(observables):
        raise ConfigError("observables must be a callable f(module) -> {name: tensor}")
    chains = list(range(config.n_chains)) if chains is None else list(chains)
    fm = private_copy(model)
    w_star = fm.params.clone() if anchor is None else fm.flatten(anchor, "anchor")
    eps, gamma, wd = config.step_size, config.gamma, config.weight_decay
    out: dict[str, list] = {}
    with torch.no_grad(), tqdm(total=len(chains) * config.n_steps, disable=not progress,
                               desc="spring-only chains", unit="step") as bar:
        for c in chains:
            noise = chain_generators(config.seed, c, w_star.device)[0]
            x = torch.zeros_like(w_star)
            rows: list[dict] = []
            for step in range(config.n_steps):
                xi = torch.randn(x.shape, generator=noise, dtype=x.dtype, device=x.device)
                drift = x * gamma + (w_star + x) * wd if wd else x * gamma
                x = x - drift * (eps / 2) + xi * math.sqrt(eps)
                done = step + 1 - config.burn_in
                if done > 0 and done % config.thin == 0:
                    fm.params.copy_(w_star + x)
                    rows.append({k: v.detach().clone() for k, v in observables(fm.module).items()})
            bar.update(config.n_steps)
            for k in rows[0]:
                out.setdefault(k, []).append(torch.stack([r[k] for r in rows]))
    return {k: torch.stack(v) for k, v in out.items()}


def coupled_covariance(run: tuple[Tensor, Tensor], coupled: tuple[Tensor, Tensor],
                       independent: tuple[Tensor, Tensor], *, paired: bool = False,
                       n_blocks: int = 5) -> Estimate:
    """``C(run) - C(coupled) + C(independent)`` of ``Cov(x, y)`` with its standard error.

    Args:
        run: ``(x [chain, draw, kx], y)`` draws of the SGLD chains; ``y`` is ``[chain, draw,
            ky]`` or, with ``paired``, ``[chain, draw, kx, X]`` (x's entry k against y's row k).
        coupled: the same observables at the coupled spring-only chains' draws (same shape).
        independent: the same at independent spring-only chains (any number of chains, same
            draws per chain and layout).
    Returns:
        An Estimate ``[kx, ky]`` (or ``[kx, X]``); stderr from batch means of the coupled
        difference (chain blocks, the two chains of a pair in the same block) combined with
        the independent part's, as independent errors. ``meta`` holds both parts' errors.
    """
    (x, y), (x0, y0), (xb, yb) = run, coupled, independent
    if x.shape != x0.shape or y.shape != y0.shape or xb.shape[1:] != x.shape[1:]:
        raise ConfigError(f"run, coupled and independent draws must share [draw, ...] shapes "
                          f"(and run/coupled their chains): {tuple(x.shape)}, "
                          f"{tuple(x0.shape)}, {tuple(xb.shape)}")
    s_run, sizes, n = block_sums(x, y, paired, n_blocks)
    s_cpl, _, _ = block_sums(x0, y0, paired, n_blocks)
    s_ind, sizes_b, n_b = block_sums(xb, yb, paired, n_blocks)
    diff = (s_run - s_cpl).sum(0) / (n - 1)
    base = s_ind.sum(0) / (n_b - 1)
    se_diff = combine_se(s_run - s_cpl, sizes, n)
    se_base = combine_se(s_ind, sizes_b, n_b)
    dims = ("component", "token") if paired else ("x", "y")
    return Estimate(diff + base, (se_diff**2 + se_base**2).sqrt(), dims, "covariance",
                    "Cov(x, y), coupled: SGLD - coupled spring-only + independent spring-only",
                    {"n_draws": n, "n_independent_draws": n_b,
                     "se_difference_median": float(se_diff.median()),
                     "se_independent_median": float(se_base.median())})


def coupled_susceptibility(run: dict[str, Tensor], twin: dict[str, Tensor],
                           independent: dict[str, Tensor], *, n_blocks: int = 5
                           ) -> tuple[Estimate, Estimate]:
    """The one-run susceptibility (docs/theory.md section 5) by coupled differences, and what
    the loss adds.

    Args:
        run, twin, independent: draws ``{"phi": [chain, draw, K], "restricted_token_loss":
            [chain, draw, K, X]}`` of the SGLD chains, their spring-only twins
            (:func:`spring_draws` with the run's config) and independent spring-only chains.
    Returns:
        ``(chi, added)``, Estimates ``[token, component]``: ``chi = -Cov(phi_C, l^C_x -
        Lbar_S(w^C))`` (< 0: token x lowers C's loss) with the plain estimator's expectation,
        and ``added = chi - chi_0``, the part the tempered loss adds to the spring-only
        (``n_beta -> 0``) matrix, ``-(C(run) - C(twin))``, with its batch-means error.
    """
    phi, y = "phi", "restricted_token_loss"
    parts = [(d[phi], d[y]) for d in (run, twin, independent)]
    est = coupled_covariance(*parts, paired=True, n_blocks=n_blocks)
    s_run, sizes, n = block_sums(*parts[0], True, n_blocks)
    s_twin, _, _ = block_sums(*parts[1], True, n_blocks)
    added = -(s_run - s_twin).sum(0) / (n - 1)
    dims = ("token", "component")
    chi = Estimate(-est.value.T, est.stderr.T, dims, "susceptibility",
                   "-Cov(phi_C, l^C_x - Lbar_S(w^C)), coupled; < 0: token x lowers C's loss",
                   est.meta)
    return chi, Estimate(added.T, combine_se(s_run - s_twin, sizes, n).T, dims,
                         "susceptibility", "chi - chi_0 (n_beta -> 0), coupled difference",
                         {"n_draws": n})
