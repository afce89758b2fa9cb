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

**I.i.d. base.** The independent spring-only chains can be replaced by exact i.i.d. draws of
their stationary law ``N(mu, sigma^2 I)`` (:func:`suscept.spring_sample`, ``match_chain=True``;
antithetic pairs allowed), which cost one evaluation each and carry no autocorrelation::

    C_iid = C(SGLD chains) - C(stationary twins) + C(i.i.d. spring-only draws)

The twins must then have that law at every draw: :func:`spring_draws` with
``start="stationary"`` starts each twin from it (a twin started at ``w*`` reaches it only after
a burn-in of several ``2 / (eps gamma_eff)`` steps). ``E[C(i.i.d.)] = Cov_0`` exactly (the
k-statistic of i.i.d. draws; with antithetic pairs ``C(even) + mean(odd x odd)``). A stationary
but autocorrelated twin has ``E[C(twins)] = Cov_0 - b_0`` with the k-statistic's finite-run
bias ``b_0 = (N Cov(xbar_0, ybar_0) - Cov_0) / (N - 1)``, ``N`` draws in all, which is
``(tau_0 - 1) Cov_0 / (N - 1)`` for an integrated autocorrelation time ``tau_0`` (in draws). So
``E[C_iid] = E[C(SGLD chains)] + b_0``: the plain estimator's expectation plus ``b_0``; against
the stationary covariance of the SGLD chain (the estimand) its bias is ``b_0 - b`` where ``-b``
is the plain estimator's own finite-run bias, which ``b_0`` partly cancels (equal when the
loss leaves the chain's autocorrelation unchanged). Both vanish as ``1/N``.
:func:`check_base` refuses a base whose law is not the twins' (RMSprop, a mask, the
continuous-time variance, other constants or the run's seed).

Plain SGLD only (no preconditioner, no mask): the coupling needs the same noise scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from suscept.control_variates import block_sums, combine_se
from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.estimators import default_blocks
from suscept.model import private_copy
from suscept.moments import Moments
from suscept.spring import odd_even, stationary
from suscept.streams import Paired

START_KEY = 0x5EED  # third entry of the SeedSequence of a twin's stationary start


def coupling_steps(config) -> float:
    """SGLD steps a stationary twin needs to couple with its chain (started at w*): their gap
    shrinks by ``1 - a`` per step, ``a = eps gamma_eff / 2``, so after ``2 / a = 4 / (eps
    gamma_eff)`` steps its variance is ``e^-4`` of the start's (``inf`` without a spring)."""
    g_eff = config.gamma + config.weight_decay
    return math.ceil(4 / (config.step_size * g_eff)) if g_eff > 0 else math.inf


def coupling_skip(config) -> int:
    """Draws to drop from the SGLD chains and their stationary twins: the steps of
    :func:`coupling_steps` that the burn-in does not already cover, in draws (a longer burn-in
    of the same run: the estimand is unchanged)."""
    steps = coupling_steps(config)
    if math.isinf(steps):
        raise ConfigError("gamma + weight_decay = 0: no spring, so a twin never couples")
    return max(0, math.ceil((steps - config.burn_in) / config.thin))


def spring_draws(model: nn.Module, config, observables, *, chains: list[int] | None = None,
                 anchor: Mapping[str, Tensor] | None = None, start: str = "anchor",
                 progress: bool = False) -> dict[str, Tensor]:
    """Observables at the draws of the spring-only chains ``chains`` (default all).

    Args:
        model: the user's module at w* (copied, never modified).
        config: the :class:`~suscept.sample.SamplerConfig` of the SGLD run to couple with
            (its seed, step size, gamma, weight decay, burn-in, thin and draws; plain SGLD).
        observables: ``f(module) -> {name: Tensor}`` (e.g. an evaluation plan).
        chains: chain indices; chain ``c`` uses the noise of SGLD chain ``c`` (coupled); use
            indices ``>= config.n_chains`` for independent spring-only chains.
        start: ``"anchor"`` (``x0_0 = 0``, as the SGLD chain starts) or ``"stationary"``
            (``x0_0`` drawn from the chain's own stationary law, :func:`suscept.spring.stationary`,
            with a generator of ``(seed, c)`` separate from the noise): every draw of such a
            twin has exactly the law of :func:`suscept.spring_sample` (``match_chain=True``),
            whatever the burn-in, which an i.i.d. base (:func:`coupled_covariance` with a
            spring_sample base) needs. Such a twin starts away from its chain (which starts
            at ``w*``); the gap shrinks by ``1 - a`` per step, ``a = eps gamma_eff / 2``: give
            the run a burn-in of about ``2 / a`` steps (or drop those draws from both), else the
            first draws' gap inflates the difference part's variance (measured: doubled).
    Returns:
        ``{name: [len(chains), n_draws, *shape]}``, draw ``d`` at step
        ``burn_in + (d + 1) * thin`` as in :func:`suscept.sample`.
    """
    out: dict[str, list] = {}
    rows: list[dict] = []
    for _, d, values in _twin_draws(model, config, observables, chains, anchor, start,
                                    progress):
        rows.append(values)
        if d + 1 == config.n_draws:  # the chain's last draw
            for k in rows[0]:
                out.setdefault(k, []).append(torch.stack([r[k] for r in rows]))
            rows = []
    return {k: torch.stack(v) for k, v in out.items()}


def spring_moments(model: nn.Module, config, observables, stream: Paired, *,
                   start: str = "stationary", progress: bool = False) -> list[Moments]:
    """The twins of :func:`spring_draws` (chains ``0 .. n_chains - 1``), streamed: per
    component ``k``, the :class:`~suscept.moments.Moments` of ``stream.x[k]`` against
    ``stream.y[k]`` (``x [K]``, ``y [K, X]`` per draw) over the same segments, in the same
    order (chain-major, ``config.n_blocks`` blocks per chain) as the SGLD run's
    ``run.paired(stream.x, stream.y)``; only one block of draws is held at a time. Feed both
    to :func:`coupled_susceptibility`."""
    blocks = config.n_blocks or default_blocks(config.n_chains, config.n_draws)
    ends = set(torch.tensor_split(torch.arange(config.n_draws), blocks)[b][-1].item()
               for b in range(blocks))
    parts: list[list[Moments]] = []
    rows: list[dict] = []
    for _, d, values in _twin_draws(model, config, observables, None, None, start, progress):
        rows.append({k: values[k] for k in stream.names})
        if d in ends:
            parts.append(stream.block({k: torch.stack([r[k] for r in rows]) for k in rows[0]}))
            rows = []
    return stream.combine(parts)


def _twin_draws(model, config, observables, chains, anchor, start, progress):
    """Yield ``(c, d, values)``: draw ``d`` of spring-only chain ``c``, chain after chain
    (the loop of :func:`spring_draws`)."""
    from suscept.sample import chain_generators

    if config.precondition is not None:
        raise ConfigError("coupled spring-only chains need plain SGLD (precondition=None)")
    if not callable(observables):
        raise ConfigError("observables must be a callable f(module) -> {name: tensor}")
    if start not in ("anchor", "stationary"):
        raise ConfigError(f"start={start!r} must be 'anchor' or 'stationary'")
    chains = list(range(config.n_chains)) if chains is None else list(chains)
    fm = private_copy(model)
    w_star = (fm.params if anchor is None else fm.flatten(anchor, "anchor")).detach().clone()
    mu, sd = stationary(config, w_star)
    eps, gamma, wd = config.step_size, config.gamma, config.weight_decay
    # grad mode is switched off per step, never across a yield: the caller's code between
    # draws (or after an interruption) runs in its own grad mode
    with tqdm(total=len(chains) * config.n_steps, disable=not progress,
              desc="spring-only chains", unit="step") as bar:
        for c in chains:
            noise = chain_generators(config.seed, c, w_star.device)[0]
            x = torch.zeros_like(w_star)
            if start == "stationary":
                seed = np.random.SeedSequence([config.seed, c, START_KEY]).generate_state(1)
                gen = torch.Generator(device=w_star.device).manual_seed(int(seed[0]))
                x = mu - w_star + sd * torch.randn(x.shape, generator=gen, dtype=x.dtype,
                                                   device=x.device)
            d = 0
            for step in range(config.n_steps):
                with torch.no_grad():
                    xi = torch.randn(x.shape, generator=noise, dtype=x.dtype, device=x.device)
                    drift = x * gamma + (w_star + x) * wd if wd else x * gamma
                    x = x - drift * (eps / 2) + xi * math.sqrt(eps)
                    done = step + 1 - config.burn_in
                    if done <= 0 or done % config.thin:
                        continue
                    fm.params.copy_(w_star + x)
                    values = {k: v.detach().clone() for k, v in observables(fm.module).items()}
                yield c, d, values
                d += 1
            bar.update(config.n_steps)


def coupled_covariance(run: tuple[Tensor, Tensor], coupled: tuple[Tensor, Tensor],
                       independent: tuple[Tensor, Tensor], *, paired: bool = False,
                       antithetic: bool = False, n_blocks: int = 5) -> Estimate:
    """``C(run) - C(coupled) + C(independent)`` of ``Cov(x, y)`` with its standard error.

    Args:
        run: ``(x [chain, draw, kx], y)`` draws of the SGLD chains; ``y`` is ``[chain, draw,
            ky]`` or, with ``paired``, ``[chain, draw, kx, X]`` (x's entry k against y's row k).
        coupled: the same observables at the coupled spring-only chains' draws (same shape).
        independent: the same at independent spring-only draws (any number of chains and
            draws): spring-only chains of the run's layout, or i.i.d. draws of their stationary
            law (:func:`suscept.spring_sample`; then the twins must be stationary too,
            :func:`spring_draws` with ``start="stationary"``).
        antithetic: ``independent`` holds antithetic pairs (draws ``2k, 2k + 1`` = ``mu + d,
            mu - d``); its part is then ``C(even parts) + mean(odd x odd)``
            (:func:`suscept.spring.odd_even`), unbiased since ``E[odd] = 0`` and the even and
            odd parts are uncorrelated under the symmetric law.
    Returns:
        An Estimate ``[kx, ky]`` (or ``[kx, X]``); stderr from batch means of the coupled
        difference (chain blocks, the two chains of a pair in the same block) combined with
        the independent part's, as independent errors. ``meta`` holds both parts' errors.
    """
    (x, y), (x0, y0), (xb, yb) = run, coupled, independent
    if x.shape != x0.shape or y.shape != y0.shape or xb.shape[2:] != x.shape[2:] \
            or yb.shape[2:] != y.shape[2:]:
        raise ConfigError(f"run, coupled and independent draws must share [..., entry] shapes "
                          f"(and run/coupled their chains and draws): {tuple(x.shape)}, "
                          f"{tuple(x0.shape)}, {tuple(xb.shape)}")
    s_run, sizes, n = block_sums(x, y, paired, n_blocks)
    s_cpl, _, _ = block_sums(x0, y0, paired, n_blocks)
    s_ind, sizes_b, n_b = base_sums(xb, yb, paired, antithetic, n_blocks)
    diff = (s_run - s_cpl).sum(0) / (n - 1)
    base = s_ind.sum(0) / (n_b - 1)
    se_diff = combine_se(s_run - s_cpl, sizes, n)
    se_base = combine_se(s_ind, sizes_b, n_b)
    dims = ("component", "token") if paired else ("x", "y")
    return Estimate(diff + base, (se_diff**2 + se_base**2).sqrt(), dims, "covariance",
                    "Cov(x, y), coupled: SGLD - coupled spring-only + independent spring-only",
                    {"n_draws": n, "n_independent_draws": xb.shape[0] * xb.shape[1],
                     "antithetic": antithetic,
                     "se_difference_median": float(se_diff.median()),
                     "se_independent_median": float(se_base.median())})


def base_sums(x: Tensor, y: Tensor, paired: bool, antithetic: bool, n_blocks: int
              ) -> tuple[Tensor, Tensor, int]:
    """Block sums ``s`` with ``C = s.sum(0) / (N - 1)`` for the independent part (as
    :func:`~suscept.control_variates.block_sums`); with ``antithetic`` over ``N`` pairs:
    ``C = C(even) + (1 / N) sum odd_x odd_y``."""
    if not antithetic:
        return block_sums(x, y, paired, min(n_blocks, x.shape[1]))
    (ex, ox), (ey, oy) = odd_even(x.double()), odd_even(y.double())
    s_even, sizes, n = block_sums(ex, ey, paired, min(n_blocks, ex.shape[1]))
    eq = "nk,nkx->kx" if paired else "nk,nl->kl"
    blocks = torch.tensor_split(torch.arange(ex.shape[1]), min(n_blocks, ex.shape[1]))
    s_odd = torch.stack([torch.einsum(eq, ox[c, b], oy[c, b]) for c in range(ox.shape[0])
                         for b in blocks])
    return s_even + s_odd * ((n - 1) / n), sizes, n


def check_base(config, base) -> bool:
    """Refuse a :func:`suscept.spring_sample` Run whose law is not the twins' stationary law;
    return whether its draws are antithetic pairs.

    The twin of a plain SGLD chain (any minibatch: the twin ignores the loss) has the law
    ``N(mu, sigma^2)`` of :func:`suscept.spring.stationary` with ``match_chain=True``. With
    RMSprop the twin's noise scale follows the SGLD chain's preconditioner, driven by the loss,
    and spring_sample's ``G`` is only its first-order approximation: refused, as are a
    continuous-time law (``match_chain=False``), a mask (a zero ``sigma``), other step size,
    gamma or weight decay, and the run's own seed (the base must be independent of the twins).
    """
    from suscept.run import Run

    if not isinstance(base, Run) or base.config.get("draw_source") != "spring":
        raise ConfigError("the i.i.d. base must be the Run of suscept.spring_sample")
    cfg = base.config
    if config.precondition is not None or cfg.get("precondition") is not None:
        raise ConfigError("coupled differences need plain SGLD (precondition=None) for both "
                          "the run and the spring_sample base: with RMSprop the twin's law is "
                          "not the i.i.d. base's")
    if not cfg.get("match_chain", False):
        raise ConfigError("the i.i.d. base must have the chain's own variance: call "
                          "spring_sample with match_chain=True")
    if min(cfg["spring_sd"]) <= 0:
        raise ConfigError("the i.i.d. base was drawn with a mask; the twins move every "
                          "coordinate: call spring_sample without mask")
    _check_law(cfg, config, "the i.i.d. base")
    return bool(cfg.get("antithetic", False))


def _check_law(law: Mapping, config, what: str) -> None:
    """The base's spring-only law is the run's (step size, gamma, weight decay) and its seed
    is another one (its noise independent of the twins')."""
    for key in ("step_size", "gamma", "weight_decay"):
        if float(law[key]) != float(getattr(config, key)):
            raise ConfigError(f"{what} has {key}={law[key]} but the run "
                              f"{getattr(config, key)}: make it with the run's config")
    if int(law["seed"]) == int(config.seed):
        raise ConfigError(f"{what} shares the run's seed, hence its noise: give it another "
                          "seed")


def coupled_susceptibility(run: dict[str, Tensor], twin: dict[str, Tensor],
                           independent, *, config=None, n_blocks: int = 5
                           ) -> tuple[Estimate, Estimate]:
    """The one-run susceptibility (docs/theory.md section 5) by coupled differences, and what
    the loss adds.

    Args:
        run, twin: draws ``{"phi": [chain, draw, K], "restricted_token_loss": [chain, draw, K,
            X]}`` of the SGLD chains and their spring-only twins (:func:`spring_draws` with the
            run's config; ``start="stationary"`` with an i.i.d. base); or, with a ``chi0``
            base, their streamed paired Moments (``run.paired("phi", "restricted_token_loss")``
            and :func:`spring_moments`; the batch-means blocks are then their segments).
        independent: the same draws of independent spring-only chains, or the Run of
            :func:`suscept.spring_sample` (exact i.i.d. draws, antithetic or not; then
            ``config``, the run's SamplerConfig, is required and checked by :func:`check_base`),
            or the spring-only matrix itself, ``chi0`` of
            :func:`suscept.pathwise.pathwise_susceptibility` (``config`` required and checked
            against its law; the twins must then be stationary).
    Returns:
        ``(chi, added)``, Estimates ``[token, component]``: ``chi = -Cov(phi_C, l^C_x -
        Lbar_S(w^C))`` (< 0: token x lowers C's loss) with the plain estimator's expectation,
        and ``added = chi - chi_0``, the part the tempered loss adds to the spring-only
        (``n_beta -> 0``) matrix, ``-(C(run) - C(twin))``, with its batch-means error.
    """
    phi, y = "phi", "restricted_token_loss"
    antithetic = False
    if isinstance(independent, Estimate):
        return _with_estimated_base(run, twin, independent, config, n_blocks)
    if not (isinstance(run, dict) and isinstance(twin, dict)):
        raise ConfigError("streamed run and twins (paired Moments) need the spring-only matrix "
                          "chi0 as base (suscept.pathwise_susceptibility); pass draws otherwise")
    if not isinstance(independent, dict):
        if config is None:
            raise ConfigError("a spring_sample base needs config=, the run's SamplerConfig")
        antithetic = check_base(config, independent)
        independent = independent.draws
    missing = [k for k in (phi, y) if k not in independent]
    if missing:
        raise ConfigError(f"the independent draws lack {missing}: store them (store_draws)")
    parts = [(d[phi], d[y]) for d in (run, twin, independent)]
    est = coupled_covariance(*parts, paired=True, antithetic=antithetic, n_blocks=n_blocks)
    chi = Estimate(-est.value.T, est.stderr.T, ("token", "component"), "susceptibility",
                   "-Cov(phi_C, l^C_x - Lbar_S(w^C)), coupled; < 0: token x lowers C's loss",
                   est.meta)
    return chi, _difference(run, twin, n_blocks)


def _difference(run, twin, n_blocks: int) -> Estimate:
    """``added = -(C(run) - C(twin))`` ``[token, component]`` with its batch-means error."""
    s_run, sizes, n = _paired_sums(run, n_blocks)
    s_twin, twin_sizes, _ = _paired_sums(twin, n_blocks)
    if s_twin.shape != s_run.shape or not torch.equal(sizes, twin_sizes):
        raise ConfigError(f"the run and its twins differ in layout: segments x entries "
                          f"{tuple(s_run.shape)} vs {tuple(s_twin.shape)}; make the twins with "
                          "the run's config")
    return Estimate(-(s_run - s_twin).sum(0).T / (n - 1), combine_se(s_run - s_twin, sizes, n).T,
                    ("token", "component"), "susceptibility",
                    "chi - chi_0 (n_beta -> 0), coupled difference", {"n_draws": n})


def _paired_sums(source, n_blocks: int) -> tuple[Tensor, Tensor, int]:
    """Per-block sums ``[S, K, X]`` of ``(phi_k - mean)(y_kx - mean)`` (means over all draws),
    block sizes ``[S]`` and ``N``: from draws ``{"phi", "restricted_token_loss"}`` in
    ``n_blocks`` blocks per chain, or from paired Moments (their own segments), where
    ``sum_b (x - X)(y - Y) = cxy_b + n_b (xbar_b - X)(ybar_b - Y)`` exactly."""
    if isinstance(source, dict):
        return block_sums(source["phi"], source["restricted_token_loss"], True, n_blocks)
    sums = []
    for m in source:
        t = m.total()
        sums.append(m.cxy[:, 0] + m.n[:, None] * (m.mean_x[:, :1] - t.mean_x[:, :1])
                    * (m.mean_y - t.mean_y))
    return torch.stack(sums, 1), source[0].n, int(source[0].n.sum())


def _with_estimated_base(run, twin, chi0: Estimate, config, n_blocks: int
                         ) -> tuple[Estimate, Estimate]:
    """``chi = -(C(run) - C(twin)) + chi0``: the coupled difference plus a spring-only matrix
    estimated on its own (independent errors add in quadrature)."""
    law = chi0.meta.get("law")
    if config is None or law is None:
        raise ConfigError("a chi0 base needs config=, the run's SamplerConfig, and an Estimate "
                          "of suscept.pathwise_susceptibility (its meta['law'])")
    if config.precondition is not None:
        raise ConfigError("coupled differences need plain SGLD (precondition=None)")
    _check_law(law, config, "the chi0 base")
    added = _difference(run, twin, n_blocks)
    if chi0.shape != added.shape:
        raise ConfigError(f"chi0 has shape {chi0.shape} but the run's matrix is "
                          f"[token, component] = {added.shape}")
    chi = Estimate(added.value + chi0.value, (added.stderr**2 + chi0.stderr**2).sqrt(),
                   added.dims, "susceptibility", "-Cov(phi_C, l^C_x - Lbar_S(w^C)), coupled "
                   "with a pathwise spring-only base; < 0: token x lowers C's loss",
                   {**added.meta, "se_difference_median": float(added.stderr.median()),
                    "se_independent_median": float(chi0.stderr.median())})
    return chi, added
