"""Figures of a run: chain traces and ``[row, column]`` estimate matrices, ready for a paper.

Each function returns a ``matplotlib.figure.Figure`` built without pyplot (no global state,
no backend switch; ``fig.savefig`` renders with Agg), so callers and tests can read back its
axes: labels, tick labels, the image array and its colour scale.

- :func:`trace_figure`: mean probe loss and ``||w - w*||`` per chain against the SGLD step,
  with the probe loss at the anchor w* as a dashed line and a legend.
- :func:`matrix_figure`: a 2-D :class:`~suscept.estimate.Estimate` as two heatmaps, its value
  on a diverging scale centred on zero (``vmin = -vmax = max |value|``) and ``z = value /
  stderr`` on ``[-4, 4]``; token axes on x, named components (``L0H1``) or samples on y.
"""

from __future__ import annotations

import textwrap

import numpy as np

from suscept.estimate import Estimate
from suscept.run import Run

Z_MAX = 4.0  # colour range of the z-score panel


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def trace_figure(run: Run):
    """Probe loss (top) and distance from w* (bottom) per chain against the SGLD step.

    Draw ``d`` is plotted at step ``burn_in + (d + 1) * thin``; the dashed line is the mean
    probe loss at the anchor w*; diverged chains are named with the step they stopped at.
    """
    cfg = run.config
    steps = cfg["burn_in"] + (np.arange(run.probe_loss.shape[1]) + 1) * cfg["thin"]
    stopped = {d.chain: d.step for d in run.divergences}
    fig = _figure(7, 5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for c in range(run.probe_loss.shape[0]):
        label = f"chain {c}" + (f" (diverged at step {stopped[c]})" if c in stopped else "")
        top.plot(steps, run.probe_loss[c].numpy(), lw=0.8, label=label)
        bottom.plot(steps, run.distance[c].numpy(), lw=0.8)
    anchor = run.anchor_values.get("loss", run.anchor_values.get("mean_loss"))
    if anchor is not None:
        top.axhline(float(anchor.double().mean()), color="black", ls="--", lw=1.2,
                    label="anchor w*: L(w*)")
    top.set(ylabel="mean probe loss (nats)")
    top.legend(fontsize=8, ncols=2)
    bottom.set(xlabel="SGLD step", ylabel="||w - w*||")
    fig.suptitle(f"SGLD traces: step_size {cfg['step_size']:g}, n_beta {cfg['n_beta']:g}, "
                 f"gamma {cfg['gamma']:g}, {cfg['n_chains']} chains", fontsize=10)
    return fig


def axis_names(dim: str, n: int, components: list[str] | None = None,
               data: dict | None = None) -> tuple[str, list[int] | None, list[str] | None]:
    """``(axis label, tick positions, tick labels)`` for a dimension of length ``n``.

    ``components`` name the ``component`` axis; ``data`` (the run's ``[data]`` table: n_query,
    seq_len, n_probe) names a token axis of the query, ``n_query * (seq_len - 1)`` predicted
    tokens, with a tick at the first token of each query sequence. ``None`` ticks: automatic.
    """
    data = data or {}
    per_seq = int(data.get("seq_len", 0)) - 1
    if dim == "component" and components and len(components) == n:
        return "component", list(range(n)), list(components)
    if dim in ("token", "observable") and per_seq > 0 and n == data.get("n_query", 0) * per_seq:
        ticks = list(range(0, n, per_seq))
        return (f"query token x (sequence; {per_seq} predicted positions each)", ticks,
                [f"seq {k}" for k in range(len(ticks))])
    if dim in ("sample", "observable") and n == data.get("n_probe", -1):
        if dim == "sample":
            return "probe sequence j (the up-weighted training sample)", None, None
        return "probe sequence i (its loss is the observable)", None, None
    return f"{dim} index", None, None


def matrix_figure(est: Estimate, components: list[str] | None = None,
                  data: dict | None = None):
    """Value and z-score heatmaps of a 2-D estimate; the token-like axis runs along x.

    A ``("token", "component")`` estimate is drawn transposed (components as rows); any other
    is drawn as stored (``dims[0]`` as rows). Value colours: ``RdBu_r`` centred on 0.
    """
    from matplotlib.colors import Normalize

    components = components or est.meta.get("components")
    value, stderr = est.value.double().numpy(), est.stderr.double().numpy()
    rows, cols = est.dims
    if est.dims == ("token", "component"):
        value, stderr, rows, cols = value.T, stderr.T, cols, rows
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(stderr > 0, value / stderr, np.nan)
    vmax = float(np.nanmax(np.abs(value))) if np.isfinite(value).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    height = min(2.5 + 0.22 * value.shape[0], 9.0)
    fig = _figure(11, height)
    axes = fig.subplots(1, 2, sharey=True)
    panels = ((value, Normalize(-vmax, vmax), textwrap.fill(est.convention, 40)),
              (z, Normalize(-Z_MAX, Z_MAX), "z = value / stderr\n(|z| > 2: significant)"))
    for ax, (arr, norm, label) in zip(axes, panels):
        im = ax.imshow(arr, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        fig.colorbar(im, ax=ax, label=label, extend="both" if arr is z else "neither")
        xlabel, xt, xl = axis_names(cols, arr.shape[1], components, data)
        ax.set_xlabel(xlabel)
        if xt is not None:
            ax.set_xticks(xt, xl, rotation=90 if len(xt) > 12 else 0)
    ylabel, yt, yl = axis_names(rows, value.shape[0], components, data)
    axes[0].set_ylabel(ylabel)
    if yt is not None:
        axes[0].set_yticks(yt, yl)
    axes[0].set_title("estimate")
    axes[1].set_title("standard-error scale")
    sign = "; < 0: up-weighting sample j lowers O_q" if est.name == "bif" else ""
    fig.suptitle(textwrap.fill(f"{est.name} [{rows}, {cols}]: {est.convention}{sign}", 100),
                 fontsize=10)
    return fig
