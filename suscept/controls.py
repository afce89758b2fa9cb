"""The regime and the spring-only controls of a ``suscept run`` (docs/regime.md).

:func:`spring_controls` draws one spring-only control (``n_beta -> 0``: exact i.i.d. draws of
the chain's own stationary law, :func:`suscept.spring_sample`, on ``seed + 1``) and sets the
run's susceptibility matrix and its BIF against it (:func:`suscept.regime.agreement`,
:func:`suscept.regime.bif_agreement`): per-column Spearman of the standardized matrices, its
ceiling from both runs' split-half reliabilities, their ratio. :func:`run_regime` gives the
verdict (:func:`suscept.regime.assess`) from ``2 x LLC``, ``eps * p_max`` (top Hessian
eigenvalue of the training loss on its first :func:`hessian_samples` samples) and the
agreement. :func:`first_order_control` sets the susceptibility against its deterministic
first-order term (a restricted gradient alignment at w*, docs/efficiency.md).
"""

from __future__ import annotations

from dataclasses import replace

from suscept import config as config_mod
from suscept.calibrate import top_hessian_eigenvalue
from suscept.errors import SusceptError
from suscept.estimate import Estimate
from suscept.estimators import as_moments
from suscept.inputs import SMALL
from suscept.regime import Regime, agreement, assess, bif_agreement_moments
from suscept.run import Run
from suscept.spring import spring_sample
from suscept.streams import Cross

HESSIAN_SAMPLES = 64  # at least this many training samples for lambda_max (or one minibatch)


def spring_controls(cfg: dict, model, loss_fn, train, probe, plan, streams, run: Run,
                    store, wanted: list[str], progress: bool) -> dict:
    """The agreement of each of ``wanted`` (``"susceptibility"``, ``"bif"``) with the
    spring-only control: ``{name: agreement dict or {"skipped": why}}``; each agreement
    also carries the control's cost, ``control_seconds`` (wall seconds of its draws and
    evaluation plan), beside ``run_seconds`` (the sampled run's, this process).

    The BIF's columns are the draws of ``token_loss`` (per-token BIF; read from the run's
    ``store``) or of ``loss`` (sample BIF); its rows the probe losses ``loss``."""
    sampler = config_mod.sampler_config(cfg)
    if not wanted:
        return {}
    if sampler.n_chains < 2:
        return {w: {"skipped": "the control's agreement needs n_chains >= 2 (split halves)"}
                for w in wanted}
    out, keep = {}, [k for k in SMALL if k in run.draws]
    y = "token_loss" if cfg["observables"]["token_loss"] else "loss"
    if "bif" in wanted and y != "loss" and store is None:
        out["bif"] = {"skipped": f"the per-token BIF's control reads the run's {y} draws from "
                                 "the draw store ([output] store = true)"}
        wanted = [w for w in wanted if w != "bif"]
    if not wanted:
        return out
    cross = [Cross("loss", y, third=False)] if "bif" in wanted else []
    try:
        control = spring_sample(model, loss_fn, train, replace(sampler, seed=sampler.seed + 1),
                                probe=probe, observables=plan, stream=[*streams, *cross],
                                store_draws=keep, progress=progress)
    except SusceptError as e:  # e.g. gamma = 0: no spring, no control
        return {**out, **{w: {"skipped": str(e)} for w in wanted}}
    control.config["components"] = run.config.get("components")
    cost = {"control_seconds": control.wall_s, "run_seconds": run.wall_s}
    if "susceptibility" in wanted:
        out["susceptibility"] = {**agreement(run, control), **cost,
                                 "components": run.config.get("components")}
    if "bif" in wanted:  # streamed: one segment per chain of the run, the control's segments
        if y == "loss":
            xs = run.flat("loss")[run.valid_chains]
            ma = as_moments(xs, xs, n_blocks=1)
        else:
            ma = store.moments("loss", y, n_blocks=1)
        out["bif"] = {**bif_agreement_moments(ma, ma.n_segments, control.moments_of("loss", y),
                                              sampler.n_chains), "columns": y, **cost}
    return out


def first_order_control(first_order, model, probe, run: Run, sampler) -> dict:
    """The run's susceptibility against ``first_order(model, probe, components, sampler)``, the
    first-order term of its spring-only matrix (``chi1 = -(s^2 M_C grad Lbar_S) . a_x``, no
    draws): :func:`suscept.regime.agreement` (the ceiling is the run's own, ``chi1`` has no
    noise) plus ``norm_ratio = ||chi1|| / ||chi||``, or ``{"skipped": why}`` (a builder without
    the term, RMSprop, weight decay, a token Jacobian too large)."""
    from suscept.susceptibilities import susceptibility

    if first_order is None:
        return {"skipped": "this model kind's builders give no first-order term"}
    if len(run.valid_chains) < 2:
        return {"skipped": "the agreement needs n_chains >= 2 (split halves)"}
    try:
        chi1 = first_order(model, probe, run.config.get("components"), sampler)
    except SusceptError as e:
        return {"skipped": str(e)}
    chi = susceptibility(run)
    return {**agreement(run, chi1),
            "norm_ratio": float(chi1.value.norm() / chi.value.norm())}


def hessian_samples(n: int, batch_size: int | None) -> int:
    """The training samples ``train[:K]`` whose mean loss's Hessian gives ``lambda_max``:
    ``K = min(n, max(batch_size, HESSIAN_SAMPLES))`` (the whole set under full batch)."""
    return n if not batch_size else min(n, max(batch_size, HESSIAN_SAMPLES))


def run_regime(model, loss_fn, train, run: Run, llc_est: Estimate | None,
               control: dict | None = None) -> tuple[Regime, dict]:
    """The run's regime (:func:`suscept.regime.assess`) and how ``eps * p_max`` was measured:
    ``lambda_max`` by 20 power iterations on the Hessian of the mean training loss over
    ``train[:K]`` (:func:`hessian_samples`); ``2 x LLC`` of the sampled loss; the agreement
    with the spring-only control (the susceptibility's, else the BIF's) when given."""
    k = hessian_samples(len(train), run.config.get("batch_size"))
    device = next(model.parameters()).device
    lam = top_hessian_eigenvalue(model, loss_fn, train[:k].to(device), n_iter=20)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    agree = next((c for c in (control or {}).values() if "spearman" in c), None)
    regime = assess(run.config, n_params, lambda_max=lam, agreement=agree,
                    llc=None if llc_est is None else float(llc_est.value))
    return regime, {"lambda_max": lam, "lambda_max_data": f"train[:{k}]",
                    "lambda_max_samples": k}
