"""Susceptibilities ``[token, component]`` and their analysis (docs/theory.md section 5).

One-run susceptibility: ``chi[x, C] = -Cov(phi_C(w), l^C_x(w) - Lbar_S(w^C))`` with
``phi_C(w) = Lbar_S(w^C) - Lbar_S(w*)``. Cross variant: ``-Cov(phi_C(w), l_x(w) - Lbar_S(w))``.
Sign: ``chi < 0`` means up-weighting token x lowers C's loss (C "expresses" x).

Inputs are the streamed moments of a run (``Paired("phi", "restricted_token_loss")`` for
the one-run matrix, ``Cross("phi", "token_loss")`` for the cross variant), or draws
``phi [chain, draw, K]`` and ``y [chain, draw, K, X]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from suscept.errors import ConfigError, ShapeError
from suscept.estimate import Estimate
from suscept.estimators import as_moments, block_meta, jackknife
from suscept.moments import Moments
from suscept.run import Run

PHI, RESTRICTED, FULL = "phi", "restricted_token_loss", "token_loss"


def susceptibility(source: Run | list[Moments] | Moments, *, cross: bool = False,
                   components: list[str] | None = None, scale: str = "raw",
                   beta: float | None = None) -> Estimate:
    """The susceptibility matrix with jackknife standard errors; dims ``("token", "component")``.

    Args:
        source: a :class:`~suscept.run.Run` that streamed ``phi`` against the restricted (or,
            with ``cross=True``, the full) centered token losses; or the per-component list of
            Moments (x = ``phi_C``, y = ``l^C_x - Lbar_S(w^C)``); or, for the cross variant, one
            Moments of ``phi [K]`` against the full token losses ``[X]``.
        cross: the cross variant (full-model token losses).
        components: names for ``meta["components"]`` (default: the run's, if it has them).
            A Run's ``config["coords"]["token"]`` (per-token metadata) goes to
            ``meta["coords"]`` (see :mod:`suscept.tables`).
        scale: ``"raw"`` (``-Cov``) or ``"derivative"`` (``-beta Cov``, the literature's
            factor: ``d E_rho[phi_C] / d rho_x`` for up-weighting token x, docs/theory.md
            section 3),
            with ``beta = n_beta / n`` (``run.beta`` when ``source`` is a Run).
    """
    if scale not in ("raw", "derivative"):
        raise ConfigError(f"scale={scale!r} must be 'raw' or 'derivative'")
    factor = 1.0
    if scale == "derivative":
        beta = source.beta if beta is None and isinstance(source, Run) else beta
        if beta is None or not (math.isfinite(beta) and beta > 0):
            raise ConfigError(f"scale='derivative' needs beta = n_beta / n > 0 (got {beta!r}); "
                              "pass beta= or a Run (a spring-only control has n_beta 0)")
        factor = float(beta)
    coords = {}
    if isinstance(source, Run):
        coords = {"token": source.config["coords"]["token"]} if "coords" in source.config else {}
        components = components or source.config.get("components")
        source = source.moments_of(PHI, FULL) if cross else source.paired(PHI, RESTRICTED)
    if cross:
        if not isinstance(source, Moments):
            raise ConfigError("the cross variant needs the Moments of phi [K] against the full "
                              "model's centered token losses [X]")
        value, se = jackknife(source, lambda t: -factor * t.cov())
        value, se = value.T, se.T
    else:
        if isinstance(source, Moments) or not source:
            raise ConfigError("the one-run susceptibility needs a list of per-component Moments")
        cols = [jackknife(m, lambda t: -factor * t.cov()[:, 0]) for m in source]
        value = torch.stack([v for v, _ in cols], 1)
        se = torch.stack([s for _, s in cols], 1)
    conv = ("-Cov(phi_C, l_x(w) - Lbar_S(w))" if cross
            else "-Cov(phi_C, l^C_x - Lbar_S(w^C))") + "; < 0: token x lowers C's loss"
    if scale == "derivative":
        conv = "beta x " + conv
    meta = {"cross": cross, "components": list(components) if components else None,
            "scale": scale, "beta": beta, **block_meta(source)}
    return Estimate(value, se, ("token", "component"), "susceptibility", conv,
                    {**meta, "coords": coords})


def from_draws(phi: Tensor, y: Tensor, n_blocks: int | None = None) -> list[Moments]:
    """Per-component Moments from draws ``phi [chain, draw, K]``, ``y [chain, draw, K, X]``."""
    if phi.ndim != 3 or y.ndim != 4 or y.shape[:3] != phi.shape:
        raise ShapeError(f"need phi [chain, draw, K] and y [chain, draw, K, X]; got "
                         f"{tuple(phi.shape)} and {tuple(y.shape)}")
    return [as_moments(phi[:, :, k:k + 1], y[:, :, k], n_blocks=n_blocks)
            for k in range(phi.shape[2])]


def standardize(x: Tensor | Estimate) -> Tensor:
    """Gordon et al.'s convention: z-score each column, then subtract each row's mean."""
    x = (x.value if isinstance(x, Estimate) else x).double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ShapeError(f"standardize needs a [token, component] matrix; got {tuple(x.shape)}")
    std = x.std(0, keepdim=True)
    if bool((std == 0).any()) or not bool(torch.isfinite(x).all()):
        bad = (std[0] == 0).nonzero().flatten().tolist()
        raise ShapeError(f"cannot z-score: columns {bad} are constant (frozen component?) or "
                         "the matrix holds NaN; drop them first")
    z = (x - x.mean(0, keepdim=True)) / std
    return z - z.mean(1, keepdim=True)


def pca(x: Tensor, n_components: int | None = None) -> dict[str, Tensor]:
    """PCA of a ``[token, component]`` matrix (columns centered).

    Returns ``loadings [pc, component]`` (unit vectors, sign fixed so the largest |entry| is
    positive), ``scores [token, pc]`` and ``explained`` (fraction of variance per pc).
    """
    x = x.double()
    xc = x - x.mean(0, keepdim=True)
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    k = n_components or vh.shape[0]
    signs = torch.sign(vh[torch.arange(vh.shape[0]), vh.abs().argmax(1)])
    vh, u = vh * signs[:, None], u * signs[None]
    var = s**2
    return {"loadings": vh[:k], "scores": (u * s)[:, :k], "explained": (var / var.sum())[:k]}


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of the columns of ``a`` and ``b`` ``[n, k]`` -> ``[k]``."""
    ra = a.argsort(0).argsort(0).double()
    rb = b.argsort(0).argsort(0).double()
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    return (ra * rb).sum(0) / (ra.norm(dim=0) * rb.norm(dim=0))


def split_half(run: Run, *, cross: bool = False, n_pcs: int = 3) -> dict:
    """Agreement of the standardized matrix between the two halves of the chains.

    Returns per-column Spearman ``[K]`` and the |cos| of the first ``n_pcs`` PCA loadings.
    """
    n_valid = len(run.valid_chains)
    if n_valid < 2:
        raise ConfigError("split-half reliability needs at least 2 chains that did not diverge")
    source = run.moments_of(PHI, FULL) if cross else run.paired(PHI, RESTRICTED)
    segs = (source if cross else source[0]).n_segments
    per_chain = segs // n_valid
    cut = (n_valid // 2) * per_chain

    def half(lo, hi):
        if cross:
            return susceptibility(source._slice(lo, hi), cross=True).value
        return susceptibility([m._slice(lo, hi) for m in source]).value

    a, b = standardize(half(0, cut)), standardize(half(cut, segs))
    pa, pb = pca(a, n_pcs), pca(b, n_pcs)
    cos = (pa["loadings"] * pb["loadings"]).sum(1).abs()
    return {"spearman": spearman(a, b), "pc_cos": cos,
            "chains": (run.valid_chains[: n_valid // 2], run.valid_chains[n_valid // 2:])}


def agreement_ceiling(r_a: Tensor, r_b: Tensor) -> Tensor:
    """Highest agreement two independent estimates of one matrix can reach through their noise.

    ``r_a, r_b [K]``: each method's split-half Spearman per column (:func:`split_half`).
    Stepped up to the whole run by Spearman-Brown, ``R = 2 r / (1 + r)`` (``r < 0`` counts as
    0); the attenuation ceiling of their per-column agreement is ``sqrt(R_a R_b)`` ``[K]``.
    Agreement near the ceiling: the two estimate the same matrix. Agreement above it: they
    share their noise (e.g. the same sampler seed), and the comparison says nothing.
    """
    ra, rb = (r.double().clamp(min=0) for r in (r_a, r_b))
    return (2 * ra / (1 + ra) * 2 * rb / (1 + rb)).sqrt()


def reliability(run: Run, *, cross: bool = False) -> dict:
    """Everything that says whether a susceptibility matrix means anything
    (docs/theory.md section 5)."""
    from suscept import diagnostics

    out = {"split_half": split_half(run, cross=cross)}
    if PHI in run.draws:
        phi = run.flat(PHI)[run.valid_chains]
        out["phi_mean"] = phi.double().mean((0, 1))
        if phi.shape[1] >= 4:
            out["phi_iat"] = diagnostics.iat(phi)
            out["phi_ess"] = diagnostics.ess(phi)
    good = run.probe_loss[run.valid_chains]
    if "loss" in run.anchor_values:
        out["loss_rise"] = float(good.mean() - run.anchor_values["loss"].double().mean())
    elif "mean_loss" in run.anchor_values:
        out["loss_rise"] = float(run.flat("mean_loss")[run.valid_chains].double().mean()
                                 - run.anchor_values["mean_loss"].double())
    out["n_draws"] = int(run.config["n_draws"]) * len(run.valid_chains)
    out["thin"] = run.config["thin"]
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
