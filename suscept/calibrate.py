"""Choosing SGLD hyperparameters from diagnostics, not from the answer you hope for.

:func:`calibrate` runs short chains over a grid of ``step_size x n_beta x gamma`` and
records, for each cell: divergences, the drift of the probe loss over the second half of the
chains (a chain still climbing has not equilibrated), the worst R-hat and the median ESS of the
probe loss, the LLC of the sampled loss (``llc_source``: the probe's draws when the probe is
the training set, else the minibatch losses of the chain, :func:`suscept.llc_from_trace`),
and the step-size stability ``eps * p_max`` with
``p_max = n_beta * lambda_max + gamma`` (docs/theory.md section 2: full-batch SGLD on a quadratic is
stable only for ``eps * p_max < 4``, and its covariance is inflated by ``1 / (1 - eps p / 4)``).
``lambda_max``, the top Hessian eigenvalue of the mean training loss at w*, comes from
:func:`top_hessian_eigenvalue` (power iteration on Hessian-vector products).

A cell is *acceptable* when no chain diverged, ``eps * p_max <= max_stability`` (default 0.4:
at most 10% covariance inflation along the stiffest direction), R-hat <= 1.1 and the drift
z-score (:func:`drift_z`: first vs second half of the draws) is at most 3 in size. Among
acceptable cells the chosen one has the largest ESS per SGLD step.

Maximizing ESS per step favours a large ``gamma``, where the loss shapes few directions (the
*geometric* regime, :mod:`suscept.regime`). With a Hessian ``spectrum``
(:func:`suscept.regime.hessian_spectrum`) every cell also reports ``constrained`` (the number of
directions the loss constrains, ``tr(tH (tH + gamma I)^-1)``) and its ``fraction`` of the
parameters; with ``constrained_fraction`` the grid's ``n_beta`` is, for each gamma, the one
that constrains that fraction (:func:`suscept.regime.regime_target`), and each cell reports
the cost of asking for it: ``spring_iat``, the IAT in steps of the spring-held directions.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from suscept import data as batches
from suscept.errors import ConfigError
from suscept.model import private_copy
from suscept.sample import LossFn, SamplerConfig, sample


def top_hessian_eigenvalue(model: nn.Module, loss_fn: LossFn, data: batches.Batch, *,
                           n_iter: int = 30, tol: float = 1e-4, seed: int = 0) -> float:
    """Largest eigenvalue of the Hessian of ``L_n(w) = mean_i l_i(w)`` at the model's weights.

    Power iteration on exact Hessian-vector products (double backward) over the full
    ``data``, on a private copy of the model (never modified). Returns the eigenvalue of
    largest magnitude (positive at a minimum).
    """
    fm = private_copy(model)
    params = [p for p in fm.module.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(fm.params.shape, generator=gen).to(fm.params)
    v /= v.norm()
    loss = loss_fn(fm.module, data).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    eig = 0.0
    for _ in range(n_iter):
        hv = _hvp(flat_grad, params, v)
        new = float(v @ hv)
        norm = hv.norm()
        if norm == 0:
            return 0.0
        v = hv / norm
        if abs(new - eig) <= tol * max(1.0, abs(new)):
            return new
        eig = new
    return eig


def _hvp(flat_grad: torch.Tensor, params: list, v: torch.Tensor) -> torch.Tensor:
    hv = torch.autograd.grad(flat_grad, params, grad_outputs=v, retain_graph=True,
                             allow_unused=True)
    return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                      for h, p in zip(hv, params)]).detach()


@dataclass
class Calibration:
    """Every cell of the grid with its diagnostics, and the chosen settings."""

    cells: list[dict]
    chosen: SamplerConfig | None
    lambda_max: float
    criteria: dict = field(default_factory=dict)

    def schedule(self, ess: float, *, eval_seconds: float = 0.0, burn_in: int | None = None,
                 n_chains: int | None = None):
        """Thin, chains and draws for ``ess`` effective draws at the chosen settings
        (:func:`suscept.schedule.schedule`), from the chosen cell's pilot: ``tau_steps`` (IAT
        of its probe loss, in steps) and ``step_seconds`` (seconds per step of all its chains,
        its probe evaluations included). ``eval_seconds``: seconds of one evaluation of the
        run's observables for all chains (e.g. a timed evaluation plan call x chains);
        ``burn_in`` defaults to the base's, ``n_chains`` to max(4, the base's)."""
        from suscept.schedule import schedule

        if self.chosen is None:
            raise ConfigError("no acceptable cell: nothing to schedule (see table())")
        cell = next(c for c in self.cells if c.get("chosen"))
        return schedule(max(1.0, cell["tau_steps"]), cell["step_seconds"], eval_seconds,
                        ess=ess, burn_in=self.chosen.burn_in if burn_in is None else burn_in,
                        n_chains=n_chains or max(4, self.chosen.n_chains))

    def table(self) -> str:
        keys = ["step_size", "n_beta", "gamma", "stability", "divergences", "drift", "rhat",
                "ess", "ess_per_step", "llc", "acceptable"]
        keys += [k for k in ("fraction", "spring_iat") if self.cells and k in self.cells[0]]
        rows = [" ".join(f"{k:>12s}" for k in keys)]
        for c in self.cells:
            rows.append(" ".join(f"{_fmt(c[k]):>12s}" for k in keys))
        return "\n".join(rows)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def calibrate(model: nn.Module, loss_fn: LossFn, data: batches.Batch, probe: batches.Batch,
              base: SamplerConfig, *, step_sizes, gammas, n_betas=None,
              max_stability: float = 0.4, max_rhat: float = 1.1, max_drift: float = 3.0,
              spectrum=None, constrained_fraction: float | None = None,
              progress: bool = False) -> Calibration:
    """Sweep the grid with short runs of ``base`` (chains, draws, thin, batch size) and pick
    settings from the diagnostics (see the module docstring for the criteria).

    ``spectrum``: a :class:`suscept.regime.Spectrum` at w* (computed when
    ``constrained_fraction`` is given without one); ``constrained_fraction``: ask for the regime
    in which the loss constrains this fraction of the directions (``n_betas`` is then ignored).
    """
    from suscept import regime

    if base.n_chains < 2 or base.n_draws < 8:
        raise ConfigError("calibrate needs base.n_chains >= 2 and base.n_draws >= 8 for R-hat "
                          "and drift")
    if constrained_fraction is not None and spectrum is None:
        spectrum = regime.hessian_spectrum(model, loss_fn, data)
    lam = top_hessian_eigenvalue(model, loss_fn, data)
    anchor_loss = _anchor_loss(model, loss_fn, data)
    if n_betas is None and constrained_fraction is None:
        raise ConfigError("pass n_betas, or a constrained_fraction to choose them")
    grid = list(itertools.product(step_sizes, n_betas or [], gammas))
    if constrained_fraction is not None:
        targets = {g: regime.regime_target(spectrum, constrained_fraction, gamma=float(g))
                   for g in gammas}
        if any(v is None for v in targets.values()):
            raise ConfigError(f"no n_beta constrains {constrained_fraction:.0%} of the "
                              "directions (too few have positive curvature); ask for less")
        grid = [(eps, targets[g]["n_beta"], g) for eps, g in itertools.product(step_sizes,
                                                                              gammas)]
    cells = []
    for eps, nb, gamma in grid:
        cfg = replace(base, step_size=float(eps), n_beta=float(nb), gamma=float(gamma))
        cells.append(_cell(model, loss_fn, data, probe, cfg, lam, progress, anchor_loss))
        if spectrum is not None:
            c = spectrum.constrained(cfg.n_beta, cfg.gamma + cfg.weight_decay)[0]
            cells[-1].update(constrained=c, fraction=c / spectrum.d,
                             spring_iat=regime.spring_iat(cfg.step_size, cfg.gamma))
    for c in cells:
        c["acceptable"] = (c["divergences"] == 0 and c["stability"] <= max_stability
                           and c["rhat"] <= max_rhat and abs(c["drift"]) <= max_drift)
    ok = [c for c in cells if c["acceptable"]]
    best = max(ok, key=lambda c: c["ess_per_step"]) if ok else None
    for c in cells:
        c["chosen"] = c is best
    chosen = replace(base, step_size=best["step_size"], n_beta=best["n_beta"],
                     gamma=best["gamma"]) if best else None
    return Calibration(cells, chosen, lam, {"max_stability": max_stability,
                                            "max_rhat": max_rhat, "max_drift": max_drift,
                                            "constrained_fraction": constrained_fraction})


def drift_z(trace: torch.Tensor) -> float:
    """Geweke-style z-score of ``trace [chain, draw]``: the difference between the means of
    the first and second halves of the draws, over its standard error (each half's variance
    divided by its effective sample size). ``|z| > 3``: the chains have not equilibrated."""
    from suscept import diagnostics

    half = trace.shape[1] // 2
    a, b = trace[:, :half], trace[:, half:]
    se2 = sum(float(x.var()) / float(diagnostics.ess(x[..., None])[0]) for x in (a, b))
    return float(b.mean() - a.mean()) / math.sqrt(max(se2, 1e-300))


def _anchor_loss(model, loss_fn, data) -> float:
    """``L_n(w*)``, the mean training loss at the model's weights (a private copy, eval mode)."""
    fm = private_copy(model)
    with torch.no_grad():
        return float(loss_fn(fm.module, data).double().mean())


def _cell(model, loss_fn, data, probe, cfg: SamplerConfig, lam: float, progress,
          anchor_loss: float) -> dict:
    import warnings

    from suscept import diagnostics, estimators

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = sample(model, loss_fn, data, cfg, probe=probe, progress=progress,
                     store_draws=["loss"])
    p_max = cfg.n_beta * lam + cfg.gamma
    out = {**{k: v for k, v in asdict(cfg).items() if k in ("step_size", "n_beta", "gamma")},
           "stability": cfg.step_size * p_max, "divergences": len(run.divergences),
           "drift": math.inf, "rhat": math.inf, "ess": 0.0, "ess_per_step": 0.0,
           "llc": math.nan, "tau_steps": math.nan, "step_seconds": run.wall_s / cfg.n_steps}
    good = run.valid_chains
    if len(good) < 2:
        return out
    trace = run.probe_loss[good]  # [chain, draw]
    out["drift"] = drift_z(trace)
    out["rhat"] = float(diagnostics.rhat(trace[..., None]).max())
    out["ess"] = float(diagnostics.ess(trace[..., None]).median())
    out["ess_per_step"] = out["ess"] / (len(good) * cfg.n_steps)
    out["tau_steps"] = cfg.thin * float(diagnostics.iat(trace[..., None]).median())
    # the LLC of the sampled loss: the probe's draws if the probe is the training set, else
    # the minibatch losses the chain sampled (never a held-out probe's)
    if run.config["sampled_loss"] == "loss":
        out["llc"], out["llc_source"] = float(estimators.llc(run).value), "probe = training set"
    else:
        out["llc"] = float(estimators.llc_from_trace(run, anchor_loss).value)
        out["llc_source"] = "minibatch loss trace"
    return out
