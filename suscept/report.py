"""Summaries and plots of a ``suscept run`` results folder: ``summary.txt``, ``summary.json``,
``trace.png``, ``bif.png``, ``susceptibility.png``. :func:`report` re-renders them from the
folder's saved :class:`~suscept.run.Run` and estimates without sampling.

The summary states the sampler's settings and health before any estimate: worst R-hat and
smallest ESS (of the mean) of the probe loss (:mod:`suscept.diagnostics`), the loss rise
``mean probe loss over draws - probe loss at w*`` (nats; ``LLC = n_beta * loss rise`` when the
probe is the training set), divergences, and warnings that say what to change.

The figure functions (:func:`trace_figure`, :func:`matrix_figure`) return a
``matplotlib.figure.Figure`` without touching pyplot's global state, so they can be inspected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from suscept import diagnostics
from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.run import Run
from suscept.store import write_json
from suscept.tables import write_top_couplings

RISE_WARN = 0.5  # warn when the loss rise exceeds this fraction of the probe loss at w*
RHAT_WARN, ESS_WARN = 1.1, 100.0


def health(run: Run, estimates: dict[str, Estimate] | None = None) -> dict:
    """The sampler's health over the chains that did not diverge, with warnings.

    Returns a JSON-able dict: ``rhat_max`` (rank-normalized split R-hat) and ``ess_min`` (ESS of
    the mean) of the probe loss ``[chain, draw]``, ``anchor_loss`` (mean probe loss at w*),
    ``mean_loss`` (over draws), ``loss_rise = mean_loss - anchor_loss`` and
    ``relative_rise = loss_rise / anchor_loss``, ``divergences``, ``n_chains`` and
    ``warnings`` (sentences that say what to do).
    """
    estimates = estimates or {}
    good = run.probe_loss[run.valid_chains].double()
    out: dict = {"n_chains": int(run.config["n_chains"]), "divergences": len(run.divergences)}
    if good.numel():
        out["mean_loss"] = float(good.mean())
        if good.shape[1] >= 4:
            d = diagnostics.summary(good[..., None])  # one entry: min = median
            out.update(rhat_max=d["rhat_max"], ess_min=d["ess_min"])
    anchor = run.anchor_values.get("loss", run.anchor_values.get("mean_loss"))
    if anchor is not None and "mean_loss" in out:
        out["anchor_loss"] = float(anchor.double().mean())
        out["loss_rise"] = out["mean_loss"] - out["anchor_loss"]
        out["relative_rise"] = out["loss_rise"] / max(abs(out["anchor_loss"]), 1e-12)
    out["warnings"] = _warnings(out, run, estimates.get("llc"))
    return out


def _warnings(h: dict, run: Run, llc: Estimate | None) -> list[str]:
    cfg, w = run.config, []
    if h["divergences"]:
        w.append(f"{h['divergences']} of {h['n_chains']} chains diverged and were left out: "
                 "lower step_size.")
    negative = float(llc.value) < 0 if llc is not None else h.get("loss_rise", 0.0) < 0
    if negative:
        what = (f"LLC = {float(llc.value):.4g} ± {float(llc.stderr):.2g}" if llc is not None
                else f"loss rise {h['loss_rise']:.4g} nats")
        w.append(f"{what} is negative: the chains found lower loss near w*, so w* is not a "
                 "local minimum and the LLC, BIF and susceptibilities describe a point on a "
                 "slope. Train the checkpoint longer (to convergence) or raise gamma.")
    if h.get("relative_rise", 0.0) > RISE_WARN:
        w.append(f"large loss rise: the draws sit {h['loss_rise']:.3g} nats "
                 f"({h['relative_rise']:.0%}) above the probe loss at w* "
                 f"({h['anchor_loss']:.3g}); the chains have left w*'s basin. Lower step_size, "
                 f"raise gamma (now {cfg['gamma']:g}) or lower n_beta (now {cfg['n_beta']:g}).")
    if h.get("rhat_max", 1.0) > RHAT_WARN:
        w.append(f"R-hat {h['rhat_max']:.3f} > {RHAT_WARN}: the chains disagree; run more draws "
                 "(n_draws, burn_in) before trusting the estimates.")
    if h.get("ess_min", math.inf) < ESS_WARN:
        w.append(f"effective sample size {h['ess_min']:.0f} < {ESS_WARN:.0f}: standard errors "
                 "are rough; run more draws or chains.")
    return w


def summary_rows(run: Run, estimates: dict[str, Estimate]) -> list[dict]:
    rows = []
    for name, est in estimates.items():
        v, se = est.value.double(), est.stderr.double()
        z = (v / se).abs()
        rows.append({"estimate": name, "shape": "x".join(map(str, est.shape)) or "scalar",
                     "value": float(v) if v.numel() == 1 else float(v.abs().mean()),
                     "stderr": float(se) if se.numel() == 1 else float(se.mean()),
                     "frac |z|>2": float((z > 2).double().mean()),
                     "convention": est.convention})
    return rows


def format_table(run: Run, rows: list[dict], h: dict | None = None) -> str:
    """The text of ``summary.txt``: settings, sampler health, warnings, the estimates."""
    cfg = run.config
    h = h if h is not None else health(run)
    lines = [f"settings: step_size {cfg['step_size']:g}, n_beta {cfg['n_beta']:g}, gamma "
             f"{cfg['gamma']:g}; {cfg['n_chains']} chains x {cfg['n_draws']} draws (thin "
             f"{cfg['thin']}, burn_in {cfg['burn_in']}), {run.wall_s:.1f} s sampling"]
    parts = [f"R-hat {h['rhat_max']:.3f}, ESS {h['ess_min']:.0f}"] if "rhat_max" in h else []
    if "loss_rise" in h:
        parts.append(f"loss rise {h['loss_rise']:+.4g} nats ({h['relative_rise']:+.1%} of "
                     f"L(w*) = {h['anchor_loss']:.4g})")
    parts.append(f"divergences {h['divergences']}")
    lines.append("sampler health (probe loss): " + ", ".join(parts))
    if "regime" in h:
        lines.append(_regime_line(h["regime"]))
    lines += [f"WARNING: {w}" for w in h["warnings"]] or ["no warnings"]
    lines += [f"{'estimate':<16}{'shape':>12}{'value':>13}{'stderr':>12}{'|z|>2':>8}"
              "  convention (matrices: mean |value|, mean stderr)"]
    for r in rows:
        lines.append(f"{r['estimate']:<16}{r['shape']:>12}{r['value']:>13.5g}{r['stderr']:>12.3g}"
                     f"{r['frac |z|>2']:>8.2f}  {r['convention']}")
    return "\n".join(lines)


def _regime_line(r: dict) -> str:
    """One line: the verdict, ``2 x LLC`` of the constrained directions, ``eps * p_max``
    (``docs/regime.md``), the susceptibility's and the BIF's agreement with their spring-only
    control against its ceiling, and what to change to leave the geometric regime."""
    parts = [f"regime: {r['verdict']}"]
    if r.get("constrained_from_llc") is not None:
        parts.append(f"about {r['constrained_from_llc']:.3g} of {r['n_params']} directions "
                     "constrained by the loss (2 x LLC)")
    if r.get("stability") is not None:
        where = f" (lambda_max on {r['lambda_max_data']})" if r.get("lambda_max_data") else ""
        parts.append(f"eps * p_max {r['stability']:.3g}{where}")
    for key, name in (("spring_control", "susceptibility"), ("bif_spring_control", "BIF")):
        c = r.get(key) or {}
        if "spearman" in c:
            cost = (f" (control {c['control_seconds']:.3g} s beside the run's "
                    f"{c['run_seconds']:.3g} s)" if c.get("control_seconds") is not None
                    else "")
            parts.append(f"{name} vs its spring-only control (n_beta -> 0): Spearman "
                         f"{c['spearman']:.3f} against a ceiling of {c['ceiling']:.3f}{cost}"
                         + _least_like_control(c))
        elif c.get("skipped"):
            parts.append(f"no spring-only control of the {name} ({c['skipped']})")
    first = r.get("first_order_control") or {}
    if "spearman" in first:
        parts.append(f"susceptibility vs its first-order term (gradient alignment at w*): "
                     f"Spearman {first['spearman']:.3f} against the run's ceiling "
                     f"{first['ceiling']:.3f}, norm ratio {first['norm_ratio']:.3g}")
    elif first.get("skipped"):
        parts.append(f"no first-order term ({first['skipped']})")
    return "; ".join(parts) + (f". {r['advice']}" if r.get("advice") else "")


def _least_like_control(c: dict) -> str:
    """``, least like it: COMPONENT rho (ceiling r)``: the component whose column agrees
    least with the control relative to its ceiling (per-column agreement), or ``""``."""
    cols, names = c.get("per_column"), c.get("components")
    if not cols or not names or len(names) != len(cols["spearman"]):
        return ""
    rel = [r / max(t, 1e-12) for r, t in zip(cols["spearman"], cols["ceiling"])]
    k = min(range(len(rel)), key=rel.__getitem__)
    return (f", least like it: {names[k]} {cols['spearman'][k]:.3f} "
            f"(ceiling {cols['ceiling'][k]:.3f})")


def report(folder: str | Path, *, plots: bool = True) -> str:
    """Re-render ``summary.txt``, ``summary.json`` and plots from a folder's saved results."""
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "run" / "run.json").exists():
        raise ConfigError(f"{folder} holds no finished suscept run (config.json and run/ "
                          "are written by suscept run)")
    run = Run.load(folder / "run")
    estimates = {p.stem: Estimate.load(p) for p in sorted((folder / "estimates").glob("*.pt"))}
    rows = summary_rows(run, estimates)
    h = health(run, estimates)
    if (folder / "regime.json").exists():  # written by suscept run (suscept.regime)
        h["regime"] = json.loads((folder / "regime.json").read_text())
    table = format_table(run, rows, h)
    (folder / "summary.txt").write_text(table + "\n")
    write_json(folder / "summary.json", {"rows": rows, "health": h, "settings": run.config,
                                         "divergences": len(run.divergences),
                                         "wall_s": run.wall_s})
    write_top_couplings(folder, estimates)  # top_NAME.csv per matrix estimate, by |z|
    if plots:
        data_cfg = json.loads((folder / "config.json").read_text()).get("data", {})
        _plots(folder, run, estimates, data_cfg)
    print(table)
    return table


def _plots(folder: Path, run: Run, estimates: dict[str, Estimate], data_cfg: dict) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    from suscept.figures import matrix_figure, trace_figure

    trace_figure(run).savefig(folder / "trace.png", dpi=120)
    for name in ("susceptibility", "bif"):
        if name in estimates and estimates[name].value.ndim == 2:
            fig = matrix_figure(estimates[name], run.config.get("components"), data_cfg)
            fig.savefig(folder / f"{name}.png", dpi=120)
