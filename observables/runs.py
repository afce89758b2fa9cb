"""Susceptibility runs on TransformerLens models: one run for all components, or the
restricted-posterior runs of the literature (one masked run per component) for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from observables.adapter import Adapter
from observables.components import expand
from observables.lm import check_tokens, lm_loss, token_losses
from observables.plan import EvaluationPlan
from observables.registry import CenteredTokenLoss, MeanLoss, Observable
from observables.text import TextData, token_coords
from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.estimators import jackknife
from suscept.interpolation import interpolation_susceptibility
from suscept.pathwise import first_order_susceptibility as suscept_first_order
from suscept.pathwise import pathwise_susceptibility
from suscept.run import Run
from suscept.sample import SamplerConfig, sample
from suscept.spring import spring_sample
from suscept.streams import Cross, Paired, Stream
from suscept.susceptibilities import FULL, PHI, RESTRICTED


def susceptibility_observables(components: list[str], *, cross: bool = False
                               ) -> tuple[list[Observable], list[Stream]]:
    """The observables and streams of a one-run susceptibility over ``components``.

    ``phi [K]`` (``Lbar_S(w^C) - Lbar_S(w*)``), ``restricted_token_loss [K, X]``
    (``l^C_x - Lbar_S(w^C)``), ``mean_loss []`` (``Lbar_S(w)``, for the loss-rise diagnostic)
    and, with ``cross``, ``token_loss [X]`` (``l_x(w) - Lbar_S(w)``).
    """
    comps = tuple(components)
    specs: list[Observable] = [MeanLoss(comps, name=PHI, relative=True),
                               CenteredTokenLoss(comps, name=RESTRICTED),
                               MeanLoss(None, name="mean_loss")]
    streams: list[Stream] = [Paired(PHI, RESTRICTED)]
    if cross:
        specs.append(CenteredTokenLoss(None, name=FULL))
        streams.append(Cross(PHI, FULL, third=False))
    return specs, streams


def one_run(model: nn.Module, train: Tensor | TextData, probe: Tensor | TextData,
            components: str | list[str],
            config: SamplerConfig, *, cross: bool = False, mask=None,
            draws: str = "sgld", progress: bool = True) -> Run:
    """One localized SGLD run feeding every component's restricted losses.

    Args:
        model: a TransformerLens model at the anchor w* (never modified).
        train: training token ids ``[n, pos]`` (the SGLD loss is their per-sequence mean
            token loss); probe: token ids ``[batch, pos]`` evaluated at every draw. Either may
            be a :class:`~observables.text.TextData` (its ``tokens`` are used).
        components: names (``"all heads"``, ``["L0H1", "L1.mlp", "L0H1+L1H2"]`` ...).
        cross: also stream the cross variant.
        mask: optional restricted run (``Component.mask()`` or a union of them).
        draws: ``"sgld"`` (the chain) or ``"spring"``: the spring-only control from exact
            i.i.d. draws of the ``n_beta = 0`` chain's stationary law (:mod:`suscept.spring`;
            give it its own ``config.seed``).
    Returns:
        A Run with ``run.config["components"]`` naming the columns and
        ``run.config["coords"]["token"]`` the probe's per-token metadata
        (:func:`observables.text.token_coords`), which :func:`suscept.susceptibility` puts on
        its ``token`` dim; feed it to :func:`suscept.susceptibility` and
        :func:`suscept.reliability`.
    """
    adapter = Adapter.of(model)  # a TransformerLens model, or a ConfigError naming it
    coords = token_coords(probe)
    train, probe = getattr(train, "tokens", train), getattr(probe, "tokens", probe)
    check_tokens(train, model, "train")
    _check_components(components)
    names = [c.name for c in expand(components, adapter)]
    specs, streams = susceptibility_observables(names, cross=cross)
    plan = EvaluationPlan(model, probe, specs)
    if draws not in ("sgld", "spring"):
        raise ConfigError(f"draws={draws!r} must be 'sgld' or 'spring'")
    source = sample if draws == "sgld" else spring_sample
    run = source(model, lm_loss, train, config, observables=plan, stream=streams,
                 store_draws=[PHI, "mean_loss"], mask=mask, progress=progress)
    run.config["components"] = names
    run.config["coords"] = {"token": coords}
    return run


def spring_susceptibility(model: nn.Module, probe: Tensor | TextData,
                          components: str | list[str], config: SamplerConfig, *,
                          method: str = "interpolation", grad_every: int = 16,
                          progress: bool = True) -> Estimate:
    """The spring-only (``n_beta -> 0``) susceptibility ``chi0 [token, component]``.

    ``chi0 = -Cov0(phi_C, l^C_x - Lbar_S(w^C))`` (docs/theory.md sections 2 and 5; ``< 0``: token
    x lowers C's loss); the control of a run with ``config`` (give it another seed), with less
    noise per CPU second than ``one_run(..., draws="spring")``. ``method`` (the default was the
faster of the two on the zoo model, docs/efficiency.md):

    - ``"interpolation"`` (:func:`suscept.interpolation.interpolation_susceptibility`): the
      Gaussian interpolation identity, gradients and forward-mode derivatives at mirrored
      pairs of draws (a draw costs 11-14 evaluations on the zoo model); memory
      ``O(parameters + tokens)``.
    - ``"pathwise"`` (:func:`suscept.pathwise.pathwise_susceptibility`): antithetic i.i.d. draws
      of the spring-only law, a linear control variate and its Stein gradient term (one in
      ``grad_every`` pairs); needs the probe's token Jacobian (tokens x parameters floats).

    Both estimate the same ``chi0``. ``meta["components"]`` names the columns and
    ``meta["coords"]["token"]`` describes the probe's tokens.
    """
    if method == "interpolation":
        probe, comps, meta = _probe_components(model, probe, components)
        chi = interpolation_susceptibility(model, config, _token_loss, probe,
                                           [c.mask() for c in comps], progress=progress)
    elif method == "pathwise":
        plan, probe, comps, meta = lean_plan(model, probe, components)
        chi = pathwise_susceptibility(model, config, plan, _token_loss, probe,
                                      [c.mask() for c in comps], grad_every=grad_every,
                                      progress=progress)
    else:
        raise ConfigError(f"method={method!r}: use 'pathwise' or 'interpolation'")
    return replace(chi, meta={**chi.meta, **meta})


def first_order_susceptibility(model: nn.Module, probe: Tensor | TextData,
                               components: str | list[str], config: SamplerConfig) -> Estimate:
    """The first-order term of the spring-only susceptibility, ``chi1 [token, component] =
    -(s^2 M_C grad Lbar_S(w*)) . grad (l_x - Lbar_S)(w*)`` (:func:`suscept.pathwise.
    first_order_susceptibility`; sign of chi): deterministic, one token Jacobian. Set beside
    a run's matrix or :func:`spring_susceptibility`, it says how much of the matrix is
    first-order geometry at w* (a restricted gradient alignment). Plain SGLD, no weight
    decay; ``meta`` as :func:`spring_susceptibility`'s."""
    probe, comps, meta = _probe_components(model, probe, components)
    chi = suscept_first_order(model, config, _token_loss, probe, [c.mask() for c in comps])
    return replace(chi, meta={**chi.meta, **meta})


def _probe_components(model: nn.Module, probe: Tensor | TextData,
                      components: str | list[str]):
    """``(probe tokens, expanded components, meta)``, meta naming the columns and tokens."""
    coords = token_coords(probe)
    probe = getattr(probe, "tokens", probe)
    check_tokens(probe, model, "probe")
    _check_components(components)
    comps = expand(components, Adapter.of(model))
    return probe, comps, {"components": [c.name for c in comps], "coords": {"token": coords}}


def lean_plan(model: nn.Module, probe: Tensor | TextData, components: str | list[str]):
    """``(plan, probe tokens, components, meta)``: an evaluation plan of ``phi`` and
    ``restricted_token_loss`` only (no full-model forward), the expanded components and the
    ``meta`` naming the columns and the probe's tokens."""
    probe, comps, meta = _probe_components(model, probe, components)
    specs, _ = susceptibility_observables(meta["components"])
    return EvaluationPlan(model, probe, specs[:2]), probe, comps, meta


def _token_loss(module: nn.Module, tokens: Tensor) -> Tensor:
    return token_losses(module(tokens), tokens)


def _check_components(components: object) -> None:
    if isinstance(components, str):
        return
    if not isinstance(components, list | tuple) or not all(isinstance(c, str)
                                                           for c in components):
        raise ConfigError(f"components must be a name or a list of names (e.g. 'all heads', "
                          f"['L0H1', 'L1.mlp']); got {components!r}")


@dataclass(frozen=True)
class RestrictedResult:
    """The two-chain estimator ``chi~ = covariance part + mean-shift part``
    (docs/theory.md section 5).

    All three are Estimates ``[token, component]``; ``full_run`` is the unrestricted run (full
    model observables only) and ``seconds`` the wall-clock of each run (full run first).
    """

    covariance: Estimate
    shift: Estimate
    total: Estimate
    full_run: Run
    seconds: list[float]


def restricted_runs(model: nn.Module, train: Tensor | TextData, probe: Tensor | TextData,
                    components: str | list[str], config: SamplerConfig, *,
                    progress: bool = True) -> RestrictedResult:
    """Restricted-posterior susceptibilities: one masked run per component + one full run.

    With ``g = Lbar_S(w) - Lbar_S(w*)`` and ``y_x = l_x - Lbar_S`` under the run restricted to C:
    covariance part ``-Cov_C(g, y_x)``, mean-shift part ``-E_C[g] (E_C[y_x] - E_full[y_x])``,
    total ``-(E_C[g y_x] - E_C[g] E_full[y_x])``. Only standardized matrices compare across
    methods (the scale differs per component). The ``token`` dim carries the probe's per-token
    metadata (:func:`observables.text.token_coords`).
    The full run uses ``config.seed``, component
    ``k``'s run ``config.seed + 1 + k``; the total's error is one jackknife of the total over
    the restricted run's segments (its two parts share those draws), plus
    ``|E_C[g]| x SE(E_full[y_x])`` from the independent full run, added in quadrature.
    """
    adapter = Adapter.of(model)
    meta = {"coords": {"token": token_coords(probe)}}
    train, probe = getattr(train, "tokens", train), getattr(probe, "tokens", probe)
    check_tokens(train, model, "train")
    _check_components(components)
    comps = expand(components, adapter)
    specs = [MeanLoss(None, name=PHI, relative=True), CenteredTokenLoss(None, name=FULL),
             MeanLoss(None, name="mean_loss")]
    plan = EvaluationPlan(model, probe, specs)
    # the unrestricted run only has to give E_full[y_x]: the full model, no components
    full = sample(model, lm_loss, train, config, observables=plan,
                  stream=[Cross(PHI, FULL, third=False)], store_draws=[PHI, "mean_loss"],
                  progress=progress)
    m_full = full.moments_of(PHI, FULL)
    e_full, e_full_se = jackknife(m_full, lambda t: t.mean_y)  # E_full[y_x] [1, X]
    parts, seconds = [], [full.wall_s]
    for k, c in enumerate(comps):  # each run its own seed: no noise shared with the others
        run = sample(model, lm_loss, train, replace(config, seed=config.seed + 1 + k),
                     observables=plan, stream=[Cross(PHI, FULL, third=False)],
                     store_draws=[PHI], mask=c.mask(), progress=progress)
        seconds.append(run.wall_s)
        m = run.moments_of(PHI, FULL)
        g = m.total().mean_x[0, 0]
        total, total_se = jackknife(m, lambda t: -(t.cov()[:, 0] + t.mean_x[:, :1]
                                                   * (t.mean_y - e_full)))
        parts.append((jackknife(m, lambda t: -t.cov()[:, 0]),
                      jackknife(m, lambda t: -(t.mean_x[:, :1] * (t.mean_y - e_full))),
                      (total, (total_se**2 + (g * e_full_se[0]) ** 2).sqrt())))
    names = [c.name for c in comps]

    def est(which: int, conv: str) -> Estimate:
        value = torch.stack([p[which][0] for p in parts], 1)
        se = torch.stack([p[which][1] for p in parts], 1)
        return Estimate(value, se, ("token", "component"), "restricted_susceptibility", conv,
                        {"components": names, **meta, "seeds": [config.seed + 1 + k
                                                                for k in range(len(comps))]})

    cov = est(0, "-Cov_C(g, l_x - Lbar_S)")
    shift = est(1, "-E_C[g] (E_C[y_x] - E_full[y_x])")
    total = est(2, "-(E_C[g y_x] - E_C[g] E_full[y_x]) (jackknifed jointly over the "
                   "restricted run; E_full's error added, its run independent)")
    return RestrictedResult(cov, shift, total, full, seconds)
