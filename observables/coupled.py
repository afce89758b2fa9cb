"""The one-run susceptibility by coupled differences with a spring-only base, in one call: the
fastest estimator of the one-run matrix measured here (docs/efficiency.md).

    chi = -(C(SGLD run) - C(stationary spring-only twins)) + chi0

``C`` the paired sample covariance of ``phi_C`` and ``l^C_x - Lbar_S(w^C)`` (docs/theory.md
section 5); the twins run on the SGLD chains' own noise with the loss switched off
(:func:`suscept.spring_moments`, ``start="stationary"``); ``chi0`` is the spring-only matrix
by the pathwise or the interpolation estimator (:func:`suscept.pathwise_susceptibility`,
:func:`suscept.interpolation_susceptibility`; another seed). Its
expectation is the plain one-run estimator's up to the twins' ``O(1/N)`` finite-run term
(:mod:`suscept.coupled`). Plain SGLD only. Run and twins are streamed (per-segment Moments,
:class:`suscept.streams.Paired`): memory ``O(segments x K x X)``, not ``O(draws x K x X)``.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

from torch import Tensor, nn

from observables.lm import check_tokens, lm_loss
from observables.runs import _token_loss, lean_plan
from observables.text import TextData
from suscept.coupled import coupled_susceptibility, coupling_steps, spring_moments
from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.interpolation import interpolation_susceptibility
from suscept.pathwise import pathwise_susceptibility
from suscept.sample import SamplerConfig, sample
from suscept.streams import Paired
from suscept.susceptibilities import PHI, RESTRICTED


def coupled_run(model: nn.Module, train: Tensor | TextData, probe: Tensor | TextData,
                components: str | list[str], config: SamplerConfig, *, base_draws: int,
                base_seed: int | None = None, base: str = "interpolation", grad_every: int = 16,
                progress: bool = True) -> tuple[Estimate, Estimate, Estimate]:
    """``(chi, added, chi0)``, Estimates ``[token, component]`` (sign of docs/conventions.md:
    ``< 0``: token x lowers C's loss): the one-run matrix, what the tempered loss adds to the
    spring-only matrix (``chi - chi0``, the coupled difference) and the spring-only matrix.

    Args:
        config: the SGLD run (plain SGLD: ``precondition=None``); give it a burn-in of at least
            ``4 / (step_size (gamma + weight_decay))`` steps, the time the chain needs to
            couple with its stationary twin (a shorter one only adds variance).
        base_draws: draws per chain of the base (even). The measured best split on the zoo
            model (docs/efficiency.md): 0.4-0.6 base draws per SGLD draw with the
            interpolation base (a draw costs 11-14 evaluations), 6-8 with the pathwise one.
        base_seed: the base's seed (default ``config.seed + 1``).
        base: ``"interpolation"`` (the faster on the zoo model) or ``"pathwise"``, the
            estimator of ``chi0`` (:func:`observables.spring_susceptibility`).
    """
    if base not in ("pathwise", "interpolation"):
        raise ConfigError(f"base={base!r}: use 'pathwise' or 'interpolation'")
    if config.precondition is not None:
        raise ConfigError("coupled_run needs plain SGLD (precondition=None)")
    couple = coupling_steps(config)
    if config.burn_in < couple:
        warnings.warn(f"burn_in={config.burn_in} is shorter than the {couple} steps the chain "
                      "needs to couple with its stationary twin: the first draws add variance",
                      stacklevel=2)
    plan, probe, comps, meta = lean_plan(model, probe, components)
    train = getattr(train, "tokens", train)
    check_tokens(train, model, "train")
    stream = Paired(PHI, RESTRICTED)  # streamed: no [chain, draw, K, X] draws are kept
    run = sample(model, lm_loss, train, config, observables=plan, stream=[stream],
                 store_draws=[PHI], progress=progress)
    if len(run.valid_chains) < config.n_chains:
        raise ConfigError(f"chains {sorted(set(range(config.n_chains)) - set(run.valid_chains))}"
                          " diverged; lower step_size (the twins need every chain)")
    twin = spring_moments(model, config, plan, stream, progress=progress)
    seed = config.seed + 1 if base_seed is None else base_seed
    base_cfg = replace(config, n_draws=base_draws, seed=seed)
    if base == "interpolation":
        chi0 = interpolation_susceptibility(model, base_cfg, _token_loss, probe,
                                            [c.mask() for c in comps], progress=progress)
    else:
        chi0 = pathwise_susceptibility(model, base_cfg, plan, _token_loss, probe,
                                       [c.mask() for c in comps], grad_every=grad_every,
                                       progress=progress)
    chi, added = coupled_susceptibility(run.paired(PHI, RESTRICTED), twin, chi0, config=config)
    return tuple(replace(e, meta={**e.meta, **meta}) for e in (chi, added, chi0))
