"""Which regime a localized run samples in, and how far its result is the spring's.

The localized posterior ``p(w) ∝ exp(-t L_n(w) - gamma/2 |w - w*|^2)`` (docs/theory.md section 1,
``t = n_beta``) is shaped by the loss only along directions where ``t lambda_i`` is not small
against ``gamma`` (``lambda_i`` the Hessian eigenvalues of ``L_n`` at w*). The number of such
*constrained directions* is, in the quadratic picture,

    c(t, gamma) = sum_i t lambda_i / (t lambda_i + gamma) = tr( tH (tH + gamma I)^-1 )

(``lambda_i < 0`` count as 0), about ``2 x LLC`` there (docs/theory.md section 7 with eps -> 0).
It is estimated by stochastic Lanczos quadrature (:func:`hessian_spectrum`: Rademacher probes,
Lanczos on Hessian-vector products at w*, Ubaru, Chen & Saad 2017, "Fast estimation of tr(f(A))
via stochastic Lanczos quadrature", SIAM J. Matrix Anal. Appl.), which gives ``c`` for every
``(t, gamma)`` from one set of products. With ``eps * p_max`` (``p_max = t lambda_max + gamma``;
the chain's covariance along the stiffest direction is inflated by ``1 / (1 - eps p_max / 4)``)
and the agreement of the result with its spring-only control (:mod:`suscept.spring`) against
the control's reliability ceiling, :func:`assess` gives a verdict:

- **geometric**: the loss constrains under 1% of the directions, or the spring-only control
  reproduces the result within its ceiling (ratio >= 0.9): the result is a statistic of the
  local geometry at w* (gradients and curvatures seen through an isotropic Gaussian), not a
  response of the tempered posterior.
- **loss-shaped**: otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from suscept import data as batches
from suscept.calibrate import _hvp
from suscept.errors import ConfigError
from suscept.model import build_mask, private_copy
from suscept.run import Run
from suscept.sample import LossFn

GEOMETRIC_FRACTION = 0.01  # constrained directions below this fraction of d: geometric
AGREEMENT_RATIO = 0.9  # control agreement / ceiling at or above this: geometric


@dataclass(frozen=True)
class Spectrum:
    """Stochastic Lanczos quadrature of the Hessian of ``L_n`` at w*.

    ``nodes, weights [probe, m]``: Ritz values and squared first components per probe;
    ``tr f(H) ≈ d * mean_probe sum_k weights f(nodes)``; ``d`` the number of sampled entries.
    """

    nodes: Float[Tensor, "probe m"]
    weights: Float[Tensor, "probe m"]
    d: int

    def trace(self, f) -> tuple[float, float]:
        """``(estimate, standard error over probes)`` of ``tr f(H)``."""
        per = self.d * (self.weights * f(self.nodes)).sum(1)
        se = float(per.std() / math.sqrt(len(per))) if len(per) > 1 else math.nan
        return float(per.mean()), se

    def constrained(self, n_beta: float, gamma: float) -> tuple[float, float]:
        """``c(t, gamma) = tr(tH (tH + gamma I)^-1)`` with negative eigenvalues counted as 0."""
        if gamma <= 0:
            raise ConfigError("the constrained-direction count needs gamma > 0")

        def f(lam):
            x = n_beta * lam.clamp(min=0)
            return x / (x + gamma)

        return self.trace(f)

    @property
    def lambda_max(self) -> float:
        return float(self.nodes.max())


def hessian_spectrum(model: nn.Module, loss_fn: LossFn, data: batches.Batch, *,
                     n_probes: int = 4, n_lanczos: int = 30, mask=None,
                     seed: int = 0) -> Spectrum:
    """SLQ of the Hessian of ``L_n(w) = mean_i l_i(w)`` over ``data`` at the model's weights,
    ``n_probes * n_lanczos`` Hessian-vector products on a private copy (model untouched).
    ``mask`` (as in :func:`suscept.sample`) restricts to a component's block ``H_CC``."""
    if n_probes < 1 or n_lanczos < 1:
        raise ConfigError("n_probes and n_lanczos must be >= 1")
    fm = private_copy(model)
    keep = None if mask is None else build_mask(fm, mask)
    params = [p for p in fm.module.parameters() if p.requires_grad]
    loss = loss_fn(fm.module, data).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])

    def hvp(v: Tensor) -> Tensor:
        out = _hvp(flat_grad, params, v if keep is None else v * keep).double()
        return out if keep is None else out * keep

    d = fm.params.numel() if keep is None else int(keep.sum())
    m = min(n_lanczos, d)
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(n_probes):
        z = torch.randint(0, 2, fm.params.shape, generator=gen).double() * 2 - 1
        if keep is not None:
            z = z * keep.double()
        theta, tau = _lanczos(lambda v: hvp(v.to(fm.params)), z / z.norm(), m)
        nodes.append(torch.nn.functional.pad(theta, (0, m - len(theta))))
        weights.append(torch.nn.functional.pad(tau, (0, m - len(tau))))
    return Spectrum(torch.stack(nodes), torch.stack(weights), d)


def _lanczos(hvp, q: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Lanczos with full reorthogonalization from unit ``q``: Ritz values and ``U[0, k]^2``."""
    basis, alphas, betas = [q], [], []
    q_prev, beta = torch.zeros_like(q), 0.0
    for j in range(m):
        v = hvp(q)
        alpha = float(q @ v)
        v = v - alpha * q - beta * q_prev
        stack = torch.stack(basis)
        v = v - stack.T @ (stack @ v)
        alphas.append(alpha)
        beta = float(v.norm())
        if j == m - 1 or beta < 1e-10 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        q_prev, q = q, v / beta
        basis.append(q)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    theta, u = torch.linalg.eigh(t)
    return theta, u[0] ** 2


@dataclass(frozen=True)
class Regime:
    """The regime of one run: see the module docstring. ``as_dict()`` for summaries."""

    n_params: int
    n_beta: float
    gamma: float
    step_size: float
    constrained: float | None  # SLQ estimate of c(t, gamma)
    constrained_se: float | None
    constrained_from_llc: float | None  # 2 x LLC (quadratic picture)
    stability: float | None  # eps * p_max
    agreement: float | None  # mean per-column Spearman with the spring-only control
    ceiling: float | None
    verdict: str
    advice: str

    @property
    def fraction(self) -> float | None:
        c = self.constrained if self.constrained is not None else self.constrained_from_llc
        return None if c is None else c / self.n_params

    def as_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}

    def __str__(self) -> str:
        parts = [f"regime: {self.verdict}"]
        if self.constrained is not None:
            parts.append(f"constrained directions {self.constrained:.3g} ± "
                         f"{self.constrained_se:.2g} of {self.n_params}")
        if self.constrained_from_llc is not None:
            parts.append(f"2 x LLC {self.constrained_from_llc:.3g}")
        if self.stability is not None:
            parts.append(f"eps * p_max {self.stability:.3g}")
        if self.agreement is not None:
            parts.append(f"spring-only control agreement {self.agreement:.3f} (ceiling "
                         f"{self.ceiling:.3f})")
        return "; ".join(parts) + (f". {self.advice}" if self.advice else "")


def assess(config, n_params: int, *, spectrum: Spectrum | None = None,
           lambda_max: float | None = None, llc: float | None = None,
           agreement: dict | None = None, target_fraction: float = 0.1) -> Regime:
    """The :class:`Regime` of a run with sampler ``config`` (a SamplerConfig or its dict).

    Args:
        n_params: number of sampled parameter entries ``d``.
        spectrum: :func:`hessian_spectrum` at w* (gives the count and ``lambda_max``).
        lambda_max: top Hessian eigenvalue (:func:`suscept.top_hessian_eigenvalue`).
        llc: the run's LLC on its sampled loss (``2 x LLC`` approximates the count).
        agreement: :func:`agreement` of the result with its spring-only control.
        target_fraction: the constrained fraction the advice aims at.
    """
    cfg = config if isinstance(config, dict) else asdict(config)
    t, eps = float(cfg["n_beta"]), float(cfg["step_size"])
    gamma = float(cfg["gamma"]) + float(cfg.get("weight_decay", 0.0))
    c = se = None
    if spectrum is not None:
        c, se = spectrum.constrained(t, gamma)
        lambda_max = spectrum.lambda_max if lambda_max is None else lambda_max
    stability = None if lambda_max is None else eps * (t * lambda_max + gamma)
    from_llc = None if llc is None else 2 * float(llc)
    count = c if c is not None else from_llc
    ratio = None
    if agreement is not None and agreement.get("ceiling"):
        ratio = agreement["spearman"] / agreement["ceiling"]
    geometric = (count is not None and count < GEOMETRIC_FRACTION * n_params) or \
        (ratio is not None and ratio >= AGREEMENT_RATIO)
    if count is None and ratio is None:
        verdict = "unknown (pass a spectrum, an LLC or the spring-only agreement)"
    else:
        verdict = "geometric" if geometric else "loss-shaped"
    advice = _advice(spectrum, eps, gamma, target_fraction) if geometric else ""
    return Regime(n_params, t, float(cfg["gamma"]), eps, c, se, from_llc, stability,
                  None if agreement is None else agreement["spearman"],
                  None if agreement is None else agreement.get("ceiling"), verdict, advice)


def _advice(spectrum, eps, gamma, fraction) -> str:
    text = ("To let the loss shape the posterior raise n_beta / gamma (more n_beta or less "
            "gamma) and lower the step so that eps * p_max stays <= 0.4")
    if spectrum is None:
        return text + "."
    goal = regime_target(spectrum, fraction, gamma=gamma)
    if goal is None:
        return text + f"; no n_beta reaches {fraction:.0%} of the directions at gamma {gamma:g}."
    return (text + f": n_beta {goal['n_beta']:.3g} at gamma {gamma:g} constrains "
            f"{fraction:.0%} of them, with step <= {goal['step_size']:.2g} and about "
            f"{goal['relaxation_steps']:.0f} steps per independent draw along spring-held "
            f"directions (now {spring_iat(eps, gamma):.0f}).")


def spring_iat(step_size: float, gamma: float) -> float:
    """Integrated autocorrelation time in steps of a coordinate held by the spring alone: the
    AR(1) ``x' = (1 - eps gamma / 2) x + noise`` has IAT ``(1 + r) / (1 - r)``."""
    r = 1 - step_size * gamma / 2
    return (1 + r) / (1 - r)


def regime_target(spectrum: Spectrum, fraction: float, *, gamma: float,
                  max_stability: float = 0.4) -> dict | None:
    """The ``n_beta`` at which the loss constrains ``fraction`` of the directions at ``gamma``
    (bisection on :meth:`Spectrum.constrained`), the largest step with ``eps * p_max <=
    max_stability`` and its cost: ``relaxation_steps``, the IAT in steps of the spring-held
    directions (:func:`spring_iat`), the slowest ones. None when no ``n_beta`` reaches it
    (the positive-curvature directions are too few)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction={fraction!r} must be in (0, 1)")
    goal = fraction * spectrum.d
    if spectrum.constrained(1e15, gamma)[0] <= goal:
        return None
    lo, hi = -12.0, 15.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spectrum.constrained(10**mid, gamma)[0] < goal else (lo, mid)
    t = 10**hi
    step = max_stability / (t * max(spectrum.lambda_max, 0.0) + gamma)
    return {"n_beta": t, "gamma": gamma, "step_size": step,
            "constrained": spectrum.constrained(t, gamma)[0],
            "relaxation_steps": spring_iat(step, gamma)}


def agreement(run: Run, control, *, cross: bool = False, n_pcs: int = 3) -> dict:
    """Agreement of two runs' standardized susceptibility matrices, against its ceiling.

    Returns ``spearman`` (mean over columns of the per-column Spearman), ``ceiling`` (mean of
    :func:`suscept.agreement_ceiling` from both runs' split-half reliabilities), ``ratio``,
    ``pc_cos [n_pcs]`` (|cos| of PCA loadings) and ``per_column`` (``spearman`` and
    ``ceiling`` per column, i.e. per component of the susceptibility: where one component's
    response differs from the control's while the mean agrees). Give the control its own seed.
    ``control``: a Run (e.g. ``one_run(..., draws="spring")``), the spring-only matrix of
    :func:`suscept.pathwise_susceptibility` (its ``meta["split_half"]`` gives its reliability),
    or its deterministic first-order term :func:`suscept.first_order_susceptibility` (no noise:
    reliability 1, so the ceiling is the run's own ``sqrt(R)``).
    """
    from suscept import susceptibilities as sus
    from suscept.estimate import Estimate

    a = sus.standardize(sus.susceptibility(run, cross=cross))
    r_a = sus.split_half(run, cross=cross)["spearman"]
    if isinstance(control, Estimate):  # a chi0 of suscept.pathwise_susceptibility, or chi1
        law, half = control.meta.get("law"), control.meta.get("split_half")
        if cross:
            raise ConfigError("the pathwise control is the restricted matrix; compare it with "
                              "cross=False")
        if control.meta.get("order") == 1:  # deterministic: perfectly reliable, no seed
            return _compare(a, sus.standardize(control), r_a, torch.ones_like(r_a), n_pcs,
                            per_column=True)
        if law is None or half is None:
            raise ConfigError("an Estimate control must come from "
                              "suscept.pathwise_susceptibility with n_chains >= 2 or from "
                              "suscept.first_order_susceptibility")
        if int(law["seed"]) == int(run.config.get("seed", -1)):
            raise ConfigError("the pathwise control shares the run's seed, hence its noise; "
                              "give it another seed")
        return _compare(a, sus.standardize(control), r_a, torch.tensor(half), n_pcs,
                        per_column=True)
    _check_seeds(run, control)
    b = sus.standardize(sus.susceptibility(control, cross=cross))
    return _compare(a, b, r_a, sus.split_half(control, cross=cross)["spearman"], n_pcs,
                    per_column=True)


def bif_agreement(run: Run, control: Run, x: str = "loss", y: str | None = None, *,
                  n_pcs: int = 3) -> dict:
    """:func:`agreement` for BIF matrices ``-Cov(x_j, y_q)`` from stored draws (columns = the
    observables ``y``); split halves are the two halves of each run's valid chains."""
    _check_seeds(run, control)
    a, b = run.valid_chains, control.valid_chains
    return bif_agreement_draws(run.flat(x)[a], run.flat(y or x)[a], control.flat(x)[b],
                               control.flat(y or x)[b], n_pcs=n_pcs)


def bif_agreement_draws(xa: Tensor, ya: Tensor, xb: Tensor, yb: Tensor, *,
                        n_pcs: int = 3) -> dict:
    """:func:`bif_agreement` from draws ``[chain, draw, k]`` of the run (``xa, ya``) and of its
    control (``xb, yb``), valid chains only; each needs >= 2 chains (split halves)."""
    from suscept.estimators import as_moments

    ma, mb = as_moments(xa, ya, n_blocks=1), as_moments(xb, yb, n_blocks=1)
    return bif_agreement_moments(ma, ma.n_segments, mb, mb.n_segments, n_pcs=n_pcs)


def bif_agreement_moments(ma, chains_a: int, mb, chains_b: int, *, n_pcs: int = 3) -> dict:
    """:func:`bif_agreement` from segment Moments (x = losses, y = columns) of the run and of
    its control, their segments chain by chain over ``chains_a`` / ``chains_b`` valid chains
    (e.g. :meth:`suscept.store.DrawStore.moments`, read one segment at a time, or the Moments
    of a ``Cross`` stream): nothing of size draws x columns is held."""
    from suscept import susceptibilities as sus
    from suscept.estimators import bif

    def matrices(m, chains: int):
        if chains < 2:
            raise ConfigError("a BIF agreement needs at least 2 valid chains per run")
        cut = (chains // 2) * (m.n_segments // chains)
        return [sus.standardize(bif(part).value)
                for part in (m, m._slice(0, cut), m._slice(cut, m.n_segments))]

    a, a1, a2 = matrices(ma, chains_a)
    b, b1, b2 = matrices(mb, chains_b)
    return _compare(a, b, sus.spearman(a1, a2), sus.spearman(b1, b2), n_pcs)


def _check_seeds(run: Run, control: Run) -> None:
    if run.config.get("seed") == control.config.get("seed") and \
            control.config.get("draw_source") != "spring":
        raise ConfigError("run and control share a sampler seed: their noise is shared and the "
                          "agreement says nothing; give the control another seed")


def _compare(a: Tensor, b: Tensor, r_a: Tensor, r_b: Tensor, n_pcs: int,
             per_column: bool = False) -> dict:
    from suscept import susceptibilities as sus

    rhos, ceils = sus.spearman(a, b), sus.agreement_ceiling(r_a, r_b)
    rho, ceil = float(rhos.mean()), float(ceils.mean())
    n_pcs = min(n_pcs, a.shape[1])
    pa, pb = sus.pca(a, n_pcs), sus.pca(b, n_pcs)
    cos = (pa["loadings"] * pb["loadings"]).sum(1).abs()
    out = {"spearman": rho, "ceiling": ceil, "ratio": rho / ceil if ceil > 0 else math.nan,
           "pc_cos": cos.tolist()}
    if per_column:
        out["per_column"] = {"spearman": rhos.tolist(), "ceiling": ceils.tolist()}
    return out


def of_run(run: Run, model: nn.Module, loss_fn: LossFn, data: batches.Batch, *,
           control: Run | None = None, spectrum: Spectrum | None = None,
           anchor_loss: float | None = None, mask=None) -> Regime:
    """The :class:`Regime` of a finished run: the Hessian spectrum at w* (computed on ``data``
    unless given; pass a subset to save time), the LLC of the sampled loss when the run can
    give it (``suscept.llc(run)``, else :func:`suscept.llc_from_trace` with ``anchor_loss``),
    and the agreement with ``control`` (a spring-only control of a susceptibility run)."""
    from suscept.estimators import llc, llc_from_trace

    spectrum = spectrum or hessian_spectrum(model, loss_fn, data, mask=mask)
    value = None
    if run.config.get("sampled_loss") == "loss":
        value = float(llc(run).value)
    elif anchor_loss is not None and run.loss_trace.shape[1]:
        value = float(llc_from_trace(run, anchor_loss).value)
    agree = agreement(run, control) if control is not None else None
    return assess(run.config, spectrum.d, spectrum=spectrum, llc=value, agreement=agree)
