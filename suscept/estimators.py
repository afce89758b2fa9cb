"""Estimators of posterior covariances, cumulants and their derived influence quantities.

Every function takes draws shaped ``[chain, draw, k]`` (or, where stated, a streaming
:class:`~suscept.moments.Moments` accumulated from such draws) and returns an
:class:`~suscept.estimate.Estimate` with a standard error. Conventions (docs/theory.md section 3):

=========================  =====================================  ===========================
quantity                   value                                  sign
=========================  =====================================  ===========================
``bif`` scale="raw"        ``-Cov(l_j, O_q)``                     > 0: up-weighting j raises O_q
``bif`` scale="derivative" ``-beta Cov(l_j, O_q)`` = dE[O_q]/drho_j
``bif`` scale="normalized" ``-Corr(l_j, O_q)``
``loss_kernel``            ``Cov(l_i, l_j)`` (or ``Corr``)
``per_sample_llc``         ``n_beta (E[l_i] - l_i(w*))``
``singular_fluctuation``   ``(n_beta / 2) Var(l_i)``
``variance_response``      ``-k3(O_q, O_q, l_j)`` (x beta: derivative) = dVar(O_q)/drho_j
``influence_expansion``    ``E_{-j}[O_q] - E[O_q]`` to 1st/2nd order
``loo_reweighted``         ``E_{-j}[O_q] - E[O_q]`` exactly, by reweighting the draws
=========================  =====================================  ===========================

Statistics pool all draws of all (finite) chains around one mean. Standard errors are
leave-one-segment-out jackknife errors, a segment being a block of consecutive draws of one
chain (``n_blocks`` blocks per chain; blocks much longer than the autocorrelation time make
segments nearly independent). Chains with any non-finite draw are dropped with a warning.

Every estimate's ``meta`` says whether that holds: ``block_length`` (draws per segment),
``iat`` (median integrated autocorrelation time of the inputs, in draws, by batch means over
the segments, :func:`suscept.diagnostics.iat_batch_means`) and ``block_iats`` = block length /
IAT. Below ``BLOCK_IATS_MIN`` = 3 an :class:`EstimatorWarning` says the errors are too small.
Measured on AR(1) chains of IAT 5 and 20 (``tests/test_iat_coverage.py``, 4 chains x 5 blocks,
2000 series per cell), coverage of the +-1.96 SE interval (0.935 is the most 20 segments give):

==================  ===========  ===========  ===========  ===========  ===========
blocks / IAT        0.5          1            2            4            16
mean                0.76-0.77    0.86         0.90         0.91-0.93    0.93
variance            0.74-0.76    0.83-0.86    0.88-0.89    0.89-0.90    0.93-0.94
==================  ===========  ===========  ===========  ===========  ===========
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from suscept.errors import ConfigError, EstimatorWarning, ShapeError
from suscept.estimate import Estimate
from suscept.moments import DTYPE, Moments
from suscept.run import Run

Draws = Float[Tensor, "chain draw k"]
DrawsOrMoments = Draws | Moments
TARGET_SEGMENTS = 20
BLOCK_IATS_MIN = 3.0  # warn below: see the module docstring and tests/test_iat_coverage.py
PARETO_K_MAX = 0.7  # loo_reweighted warns above (PSIS's threshold)
SCALES = ("raw", "derivative", "normalized")


# ---- input handling ---------------------------------------------------------------------
def _check_draws(name: str, x: Tensor) -> Tensor:
    if isinstance(x, Moments):
        raise ShapeError(f"{name}: this estimator needs stored draws [chain, draw, k], not "
                         "streamed Moments (sample with store_draws=True)")
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name} must be a tensor [chain, draw, k]; got {type(x).__name__}")
    if x.ndim != 3:
        raise ShapeError(f"{name} must have shape [chain, draw, k]; got {tuple(x.shape)} "
                         "(for a single chain use x[None]; for scalars use x[..., None])")
    if x.shape[1] < 2:
        raise ShapeError(f"{name} has {x.shape[1]} draws per chain; at least 2 are needed")
    return x


def _finite_chains(named: dict[str, Tensor]) -> list[int]:
    """Indices of chains whose draws are finite in every tensor; warns about the rest."""
    n_chains = next(iter(named.values())).shape[0]
    ok = torch.ones(n_chains, dtype=torch.bool)
    for x in named.values():
        ok &= torch.isfinite(x).flatten(1).all(1).cpu()
    keep = [c for c in range(n_chains) if ok[c]]
    if not keep:
        raise ShapeError("every chain contains NaN/inf draws; nothing to estimate from "
                         "(lower step_size or check run.divergences)")
    if len(keep) < n_chains:
        dropped = [c for c in range(n_chains) if not ok[c]]
        warnings.warn(f"chains {dropped} contain NaN/inf draws (diverged) and are excluded "
                      "from this estimate", EstimatorWarning, stacklevel=3)
    return keep


def default_blocks(n_chains: int, n_draws: int) -> int:
    """Blocks per chain so that there are about 20 segments of at least 10 draws."""
    return max(1, min(math.ceil(TARGET_SEGMENTS / n_chains), n_draws // 10))


def segments(x: Tensor, n_blocks: int | None) -> list[Tensor]:
    """Split ``[chain, draw, k]`` into ``chain * n_blocks`` blocks of consecutive draws."""
    blocks = default_blocks(x.shape[0], x.shape[1]) if n_blocks is None else n_blocks
    if not isinstance(blocks, int) or isinstance(blocks, bool) or not 1 <= blocks <= x.shape[1]:
        raise ConfigError(f"n_blocks={n_blocks} must be between 1 and the number of draws "
                          f"per chain ({x.shape[1]})")
    return [blk for chain in x for blk in torch.tensor_split(chain, blocks)]


def as_moments(x: DrawsOrMoments, y: Tensor | None = None, *, third: bool = False,
               n_blocks: int | None = None, cross: bool = True) -> Moments:
    """Segment moments of ``x`` (rows) against ``y`` (columns; default ``x``); ``cross``: the
    estimator needs the cross moments (refuses the means-and-variances ``Marginal`` stream)."""
    if isinstance(x, Moments):
        if y is not None:
            raise ConfigError("pass observables inside the Moments (accumulate x against y), "
                              "not beside it")
        if cross and x.cxy.shape[-1] == 0 and x.mean_x.shape[-1] > 0:
            raise ConfigError("these Moments hold means and variances only (the default O(n) "
                              "stream of sample): pass stream=[('loss', 'loss')] to sample "
                              "for the kernel and the BIF")
        if third and not x.has_third:
            raise ConfigError("these Moments have no third-order slices (third=False)")
        return x
    x = _check_draws("losses", x)
    named = {"losses": x}
    if y is not None:
        y = _check_draws("observables", y)
        if y.shape[:2] != x.shape[:2]:
            raise ShapeError(f"observables have [chain, draw] = {tuple(y.shape[:2])} but losses "
                             f"have {tuple(x.shape[:2])}; they must come from the same draws")
        named["observables"] = y
    keep = _finite_chains(named)
    xs = segments(x[keep], n_blocks)
    ys = segments(y[keep], n_blocks) if y is not None else [None] * len(xs)
    return Moments.cat([Moments.from_draws(a, b, third=third) for a, b in zip(xs, ys)])


def jackknife(m: Moments, stat: Callable[[Moments], Tensor]) -> tuple[Tensor, Tensor]:
    """``stat`` on all segments and its leave-one-segment-out jackknife standard error.

    ``stat`` maps a one-segment Moments to a tensor ``[1, ...]``.
    """
    total = m.total()
    value = stat(total)[0]
    s_count = m.n_segments
    if s_count < 2:
        _warn_one_segment()
        return value, torch.full_like(value, float("nan"))
    mean = torch.zeros_like(value)
    m2 = torch.zeros_like(value)
    for s in range(s_count):
        v = stat(total.remove(m.segment(s)))[0]
        d = v - mean
        mean += d / (s + 1)
        m2 += d * (v - mean)
    return value, (m2 * (s_count - 1) / s_count).sqrt()


def _warn_one_segment() -> None:
    warnings.warn("only one segment of draws: no standard error (use more chains or "
                  "n_blocks > 1)", EstimatorWarning, stacklevel=4)


def _meta(m: Moments, **kw) -> dict:
    return {"n_draws": int(m.n.sum().item()), "n_segments": m.n_segments, **block_meta(m), **kw}


def block_meta(m: Moments | list[Moments], warn: bool = True) -> dict:
    """``block_length``, ``iat`` and ``block_iats`` of segment moments (module docstring);
    warns when the blocks are shorter than ``BLOCK_IATS_MIN`` IATs."""
    from suscept.diagnostics import iat_batch_means

    ms = m if isinstance(m, list) else [m]
    iat = torch.cat([iat_batch_means(x) for x in ms])
    iat = iat[torch.isfinite(iat)]
    length = float(ms[0].n.double().mean())
    if not len(iat):
        return {"block_length": length, "iat": None, "block_iats": None}
    tau = max(float(iat.median()), 1.0)
    out = {"block_length": length, "iat": tau, "block_iats": length / tau}
    if warn and out["block_iats"] < BLOCK_IATS_MIN:
        warnings.warn(f"blocks of {length:.0f} draws are {out['block_iats']:.1f} "
                      f"autocorrelation times long (< {BLOCK_IATS_MIN:g}): standard errors are "
                      "too small (a +-1.96 SE interval covers about 0.85 at one IAT); run longer "
                      "chains or pass a smaller n_blocks", EstimatorWarning, stacklevel=4)
    return out


def _need_beta(beta: float | None, who: str) -> float:
    if beta is None or not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"{who} needs beta = n_beta / n > 0 (got {beta!r}); "
                          "a Run gives it as run.beta")
    return float(beta)


# ---- first order ------------------------------------------------------------------------
def loss_kernel(losses: DrawsOrMoments, *, correlation: bool = False,
                n_blocks: int | None = None) -> Estimate:
    """Loss kernel ``K[i, j] = Cov(l_i, l_j)`` (or ``R = Corr`` with ``correlation=True``).

    Args:
        losses: per-sample losses ``[chain, draw, n]``, or Moments of losses against losses.
    Returns:
        Estimate with dims ``("sample", "sample")``. ``K = -bif`` (raw).
    """
    m = as_moments(losses, n_blocks=n_blocks)
    if correlation:
        _warn_constant(m, "loss_kernel(correlation=True)")
    stat = _corr if correlation else (lambda t: t.cov())
    value, se = jackknife(m, stat)
    conv = "Corr(l_i, l_j)" if correlation else "Cov(l_i, l_j) = -raw BIF"
    return Estimate(value, se, ("sample", "sample"), "loss_kernel", conv, _meta(m))


def _corr(t: Moments) -> Tensor:
    sx, sy = t.m2_x.sqrt(), t.m2_y.sqrt()
    return t.cxy / (sx[:, :, None] * sy[:, None, :])


def _warn_constant(m: Moments, what: str) -> None:
    """Warn when a correlation is undefined: a column that never moved over all draws."""
    total = m.total()
    flat_x = (total.m2_x[0] == 0).nonzero().flatten().tolist()
    flat_y = (total.m2_y[0] == 0).nonzero().flatten().tolist()
    if flat_x or flat_y:
        warnings.warn(f"{what}: columns with zero variance over all draws (rows {flat_x[:10]}, "
                      f"columns {flat_y[:10]}) have no correlation; their entries are NaN. "
                      "Check that those observables depend on the sampled weights",
                      EstimatorWarning, stacklevel=3)


def bif(losses: DrawsOrMoments, observables: Draws | None = None, *, scale: str = "raw",
        beta: float | None = None, n_blocks: int | None = None) -> Estimate:
    """Bayesian influence function of train sample ``j`` on observable ``q``.

    ``raw``: ``-Cov(l_j, O_q)``; ``derivative``: ``-beta Cov(l_j, O_q) = dE_rho[O_q]/drho_j``;
    ``normalized``: ``-Corr(l_j, O_q)``. Positive: up-weighting sample j raises ``O_q``; when
    ``O_q`` is a query loss, "j helps q" means ``bif[j, q] < 0``.

    Args:
        losses: train losses ``l_j`` as draws ``[chain, draw, n]``, or Moments (x = train
            losses, y = observables).
        observables: ``O_q`` as draws ``[chain, draw, q]``; default the losses themselves.
        scale: ``"raw"``, ``"derivative"`` (needs ``beta = n_beta / n``) or ``"normalized"``.
    Returns:
        Estimate with dims ``("sample", "observable")``, shape ``[n, q]``.
    """
    if scale not in SCALES:
        raise ConfigError(f"scale={scale!r} must be one of {SCALES}")
    if beta is not None or scale == "derivative":
        beta = _need_beta(beta, "bif")
    factor = beta if scale == "derivative" else 1.0
    m = as_moments(losses, observables, n_blocks=n_blocks)
    if scale == "normalized":
        _warn_constant(m, "bif(scale='normalized')")
    stat = (lambda t: -_corr(t)) if scale == "normalized" else (lambda t: -factor * t.cov())
    value, se = jackknife(m, stat)
    conv = {"raw": "-Cov(l_j, O_q)", "derivative": "-beta Cov(l_j, O_q) = dE[O_q]/drho_j",
            "normalized": "-Corr(l_j, O_q)"}[scale]
    return Estimate(value, se, ("sample", "observable"), "bif", conv, _meta(m, scale=scale))


def per_sample_llc(losses: DrawsOrMoments, anchor_losses: Tensor, n_beta: float, *,
                   n_blocks: int | None = None) -> Estimate:
    """Per-sample learning coefficient ``lambda_i = n_beta (E[l_i] - l_i(w*))``; dims ``(sample,)``.

    Args:
        losses: ``[chain, draw, n]`` per-sample losses (or Moments with x = these losses).
        anchor_losses: ``[n]`` losses at the anchor w*.
    """
    m = as_moments(losses, n_blocks=n_blocks, cross=False)
    anchor = _anchor(anchor_losses, m, n_beta)
    value, se = jackknife(m, lambda t: n_beta * (t.mean_x - anchor))
    return Estimate(value, se, ("sample",), "per_sample_llc", "n_beta (E[l_i] - l_i(w*))",
                    _meta(m, n_beta=n_beta))


def llc(losses: DrawsOrMoments | Run, anchor_losses: Tensor | None = None,
        n_beta: float | None = None, *, observable: str = "loss",
        n_blocks: int | None = None) -> Estimate:
    """Local learning coefficient ``n_beta (E[L_n] - L_n(w*))``, the mean over samples of
    :func:`per_sample_llc`; scalar.

    It is the LLC only when the losses are those of the training set the chain samples
    (docs/theory.md section 1). Given draws or Moments that cannot be checked: pass the training
    losses. Given a :class:`~suscept.run.Run`, it takes ``observable``'s draws, anchor values
    and ``n_beta`` from the run and refuses (ConfigError) when that observable is not the
    sampled loss (the run's ``config["sampled_loss"]``: the probe's ``"loss"`` when the probe
    was the training set) or the run is a spring-only control; :func:`llc_from_trace` is the
    minibatch estimate from the losses the chain did sample.
    """
    if isinstance(losses, Run):
        run = losses
        if run.config.get("draw_source") == "spring":
            raise ConfigError("a spring-only control samples no loss (n_beta = 0): it has no LLC")
        if run.config.get("sampled_loss") != observable:
            raise ConfigError(f"{observable!r} is not the loss this run sampled (its probe is not "
                              "the training set): pass probe=data to sample, or use "
                              "suscept.llc_from_trace(run, anchor_loss) for the minibatch "
                              "estimate")
        n_beta = run.config["n_beta"]
        anchor_losses = run.anchor_values[observable]
        key = f"{observable}|{observable}"
        losses = run.moments[key] if key in run.moments else run.flat(observable)[
            run.valid_chains]
    if anchor_losses is None or n_beta is None:
        raise ConfigError("llc needs anchor_losses and n_beta (or a Run)")
    m = as_moments(losses, n_blocks=n_blocks, cross=False)
    anchor = _anchor(anchor_losses, m, n_beta)
    value, se = jackknife(m, lambda t: n_beta * (t.mean_x - anchor).mean(1, keepdim=True))
    return Estimate(value[0], se[0], (), "llc", "n_beta (E[L_n] - L_n(w*))",
                    _meta(m, n_beta=n_beta))


def llc_from_trace(run: Run, anchor_loss: float, *, n_blocks: int | None = None) -> Estimate:
    """The LLC from the losses the chain sampled: ``n_beta (mean_k L_{B_k}(w_k) - L_n(w*))``
    over the minibatch losses ``run.loss_trace`` after burn-in (every step; a minibatch loss is
    an unbiased estimate of ``L_n`` at ``w_k``, the devinterp estimate). ``anchor_loss`` is
    ``L_n(w*)`` on the whole training set. Full batch: the exact training loss at each step."""
    if run.loss_trace.shape[1] == 0:
        raise ConfigError("this run has no loss trace (a spring-only control samples no loss)")
    trace = run.loss_trace[run.valid_chains, run.config.get("burn_in", 0):]
    est = llc(trace[..., None].double(), torch.tensor([float(anchor_loss)]),
              run.config["n_beta"], n_blocks=n_blocks)
    return Estimate(est.value, est.stderr, (), "llc",
                    "n_beta (E[L_B(w)] - L_n(w*)) from the sampled minibatch losses",
                    {**est.meta, "source": "loss_trace"})


def singular_fluctuation(losses: DrawsOrMoments, n_beta: float, *, per_sample: bool = False,
                         n_blocks: int | None = None) -> Estimate:
    """Singular fluctuation ``nu_i = (n_beta / 2) Var(l_i)``; its mean over i, or per sample."""
    m = as_moments(losses, n_blocks=n_blocks, cross=False)
    if per_sample:
        value, se = jackknife(m, lambda t: 0.5 * n_beta * t.var_x())
        dims = ("sample",)
    else:
        value, se = jackknife(m, lambda t: 0.5 * n_beta * t.var_x().mean(1, keepdim=True))
        value, se, dims = value[0], se[0], ()
    return Estimate(value, se, dims, "singular_fluctuation", "(n_beta/2) Var(l_i)",
                    _meta(m, n_beta=n_beta))


def _anchor(anchor_losses: Tensor, m: Moments, n_beta: float) -> Tensor:
    try:
        ok = not isinstance(n_beta, bool) and math.isfinite(float(n_beta)) and n_beta > 0
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ConfigError(f"n_beta={n_beta!r} must be a positive finite number (the run's "
                          "run.config['n_beta'])")
    a = torch.as_tensor(anchor_losses, dtype=DTYPE, device=m.mean_x.device).reshape(-1)
    if a.shape[0] != m.mean_x.shape[1]:
        raise ShapeError(f"anchor_losses has {a.shape[0]} entries but the draws have "
                         f"{m.mean_x.shape[1]} samples")
    if not bool(torch.isfinite(a).all()):
        raise ConfigError("anchor_losses contain NaN/inf: the loss at w* must be finite "
                          "(check the checkpoint and the data)")
    return a[None]


# ---- higher order -----------------------------------------------------------------------
def third_cumulant(x: DrawsOrMoments, y: Draws | None = None, z: Draws | None = None, *,
                   slice: str = "xyy", n_blocks: int | None = None) -> Estimate:
    """Joint third cumulant (unbiased k-statistic, docs/theory.md section 4).

    With draws: the outer cumulant ``k3(x_a, y_b, z_c)`` of the three sets you pass, shape
    ``[a, b, c]`` (``y`` and ``z`` default to ``x``). Pass only the slices you need: the cost
    and memory are ``a * b * c``.

    With a streaming Moments (x against y): the stored slice ``"xyy"`` = ``k3(x_a, y_b, y_b)``
    or ``"xxy"`` = ``k3(x_a, x_a, y_b)``, shape ``[a, b]``.
    """
    if isinstance(x, Moments):
        if slice not in ("xyy", "xxy"):
            raise ConfigError(f"slice={slice!r} must be 'xyy' or 'xxy'")
        value, se = jackknife(as_moments(x, third=True), lambda t: t.k3(slice))
        return Estimate(value, se, ("x", "y"), "third_cumulant", f"k3 slice {slice}",
                        {"n_segments": x.n_segments, **block_meta(x)})
    x = _check_draws("x", x)
    y = x if y is None else _check_draws("y", y)
    z = x if z is None else _check_draws("z", z)
    if not (x.shape[:2] == y.shape[:2] == z.shape[:2]):
        raise ShapeError("x, y, z must share [chain, draw]; got "
                         f"{tuple(x.shape[:2])}, {tuple(y.shape[:2])}, {tuple(z.shape[:2])}")
    keep = _finite_chains({"x": x, "y": y, "z": z})
    segs = [segments(t[keep], n_blocks) for t in (x, y, z)]
    value = _k3_outer(*(torch.cat(s) for s in segs))
    s_count = len(segs[0])
    if s_count < 2:
        _warn_one_segment()
        se = torch.full_like(value, float("nan"))
    else:
        loo = [_k3_outer(*(torch.cat(s[:i] + s[i + 1:]) for s in segs)) for i in range(s_count)]
        se = torch.stack(loo).std(0, correction=0) * math.sqrt(s_count - 1)
    return Estimate(value, se, ("x", "y", "z"), "third_cumulant", "k3(x_a, y_b, z_c)",
                    {"n_segments": s_count, **_draws_block_meta(segs[0], segs[1])})


def _draws_block_meta(xs: list[Tensor], ys: list[Tensor]) -> dict:
    """:func:`block_meta` of segments of draws ``[N_s, k]`` (the x and y inputs)."""
    m = Moments.cat([Moments.from_draws(a.flatten(1), b.flatten(1), third=False)
                     for a, b in zip(xs, ys)])
    return block_meta(m)


def _k3_outer(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    n = x.shape[0]
    if n < 3:
        raise ShapeError("a third cumulant needs at least 3 draws")
    dx, dy, dz = (t.to(DTYPE) - t.to(DTYPE).mean(0) for t in (x, y, z))
    return torch.einsum("na,nb,nc->abc", dx, dy, dz) * (n / ((n - 1) * (n - 2)))


def variance_response(losses: DrawsOrMoments, observables: Draws | None = None, *,
                      scale: str = "raw", beta: float | None = None,
                      n_blocks: int | None = None) -> Estimate:
    """Response of ``Var(O_q)`` to up-weighting train sample j (docs/theory.md section 4).

    ``raw``: ``-k3(O_q, O_q, l_j)``; ``derivative``: ``-beta k3(O_q, O_q, l_j) =
    dVar_rho(O_q)/drho_j``. Dims ``("sample", "observable")``; > 0: up-weighting j widens O_q.
    """
    if scale not in ("raw", "derivative"):
        raise ConfigError(f"scale={scale!r} must be 'raw' or 'derivative'")
    factor = _need_beta(beta, "variance_response(scale='derivative')") \
        if scale == "derivative" else 1.0
    m = as_moments(losses, observables, third=True, n_blocks=n_blocks)
    value, se = jackknife(m, lambda t: -factor * t.k3("xyy"))
    conv = "-k3(O_q, O_q, l_j)" + (" * beta = dVar(O_q)/drho_j" if scale == "derivative" else "")
    return Estimate(value, se, ("sample", "observable"), "variance_response", conv,
                    _meta(m, scale=scale))


@dataclass(frozen=True)
class Expansion:
    """Leave-one-out shift ``E_{-j}[O_q] - E[O_q]`` to first and to second order."""

    first: Estimate
    second: Estimate


def influence_expansion(losses: DrawsOrMoments, observables: Draws | None = None, *,
                        beta: float, n_blocks: int | None = None) -> Expansion:
    """Leave-one-out influence expansion (docs/theory.md section 4), dims
    ``("sample", "observable")``.

    ``first  = beta Cov(O_q, l_j)``
    ``second = beta Cov(O_q, l_j) + (beta^2 / 2) k3(O_q, l_j, l_j)``
    Both approximate ``E_{-j}[O_q] - E[O_q]`` (removing sample j); compare with
    :func:`loo_reweighted`, the exact value from the same draws.
    """
    beta = _need_beta(beta, "influence_expansion")
    m = as_moments(losses, observables, third=True, n_blocks=n_blocks)
    v1, s1 = jackknife(m, lambda t: beta * t.cov())
    v2, s2 = jackknife(m, lambda t: beta * t.cov() + 0.5 * beta**2 * t.k3("xxy"))
    dims = ("sample", "observable")
    return Expansion(
        Estimate(v1, s1, dims, "influence_expansion", "first order of E_-j[O_q] - E[O_q]",
                 _meta(m, order=1)),
        Estimate(v2, s2, dims, "influence_expansion", "second order of E_-j[O_q] - E[O_q]",
                 _meta(m, order=2)),
    )


def loo_reweighted(losses: Draws, observables: Draws | None = None, *, beta: float,
                   n_blocks: int | None = None) -> Estimate:
    """Exact leave-one-out shift by reweighting the draws (docs/theory.md section 4):

    ``E_{-j}[O_q] - E[O_q]`` with ``E_{-j}[O] = E[O exp(beta l_j)] / E[exp(beta l_j)]``,
    computed with a log-sum-exp shift. Dims ``("sample", "observable")``. Needs stored draws.

    Reliable only when the weights have finite variance, ``E[exp(2 beta l_j)] < inf`` (for a
    Gaussian posterior: ``P - 2 beta A_j`` positive definite, i.e. the posterior with
    ``rho_j = -1`` is proper). Otherwise a few draws carry all the weight and even the
    reported standard error is too small. ``meta["pareto_k"] [n]`` diagnoses it per sample
    (:func:`suscept.diagnostics.pareto_k` of the weights ``exp(beta l_j)``: ``k < 0.5`` finite
    variance, ``k > 0.7`` unreliable, with an :class:`EstimatorWarning` naming the samples);
    ``meta["min_ess"]`` (the smallest effective number of draws of any weighting) does not.
    """
    beta = _need_beta(beta, "loo_reweighted")
    x = _check_draws("losses", losses)
    y = x if observables is None else _check_draws("observables", observables)
    if y.shape[:2] != x.shape[:2]:
        raise ShapeError(f"observables [chain, draw] {tuple(y.shape[:2])} != losses "
                         f"{tuple(x.shape[:2])}")
    keep = _finite_chains({"losses": x, "observables": y})
    xs = [s.to(DTYPE) for s in segments(x[keep], n_blocks)]
    ys = [s.to(DTYPE) for s in segments(y[keep], n_blocks)]
    shift = beta * torch.cat(xs).max(0).values  # [n], common log-sum-exp shift
    parts = []
    for a, o in zip(xs, ys):
        w = torch.exp(beta * a - shift)  # [N_s, n]
        parts.append((w.T @ o, w.sum(0), w.pow(2).sum(0), o.sum(0), a.shape[0]))
    num, den, den2, osum, cnt = (sum(p[i] for p in parts) for i in range(5))

    def shift_of(num, den, osum, cnt):
        return num / den[:, None] - (osum / cnt)[None]

    value = shift_of(num, den, osum, cnt)
    s_count = len(parts)
    if s_count < 2:
        _warn_one_segment()
        se = torch.full_like(value, float("nan"))
    else:
        loo = torch.stack([shift_of(num - p[0], den - p[1], osum - p[3], cnt - p[4])
                           for p in parts])
        se = loo.std(0, correction=0) * math.sqrt(s_count - 1)
    min_ess = float((den**2 / den2).min())
    k = _pareto_check(beta * x[keep].to(DTYPE))
    return Estimate(value, se, ("sample", "observable"), "loo_reweighted",
                    "E_-j[O_q] - E[O_q] (exact reweighting)",
                    {"n_segments": s_count, "min_ess": min_ess, "pareto_k": k.tolist(),
                     "pareto_k_max": float(k.max()), **_draws_block_meta(xs, ys)})


def _pareto_check(log_weights: Tensor) -> Tensor:
    from suscept.diagnostics import pareto_k

    k = pareto_k(log_weights)
    bad = (k > PARETO_K_MAX).nonzero().flatten().tolist()
    if bad:
        warnings.warn(f"loo_reweighted: the weights exp(beta l_j) of samples {bad[:10]} are "
                      f"heavy-tailed (Pareto k up to {float(k.max()):.2f} > {PARETO_K_MAX}): "
                      "their values and standard errors are unreliable; use the influence "
                      "expansion for them", EstimatorWarning, stacklevel=3)
    return k
