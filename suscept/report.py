"""Summaries and plots of a ``suscept run`` results folder: ``summary.txt``, ``summary.json``,
``trace.png``, ``bif.png``, ``susceptibility.png``. :func:`report` re-renders them from the
folder's saved :class:`~suscept.run.Run` and estimates without sampling.
"""

from __future__ import annotations

from pathlib import Path

from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.run import Run
from suscept.store import write_json
from suscept.tables import write_top_couplings


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


def format_table(run: Run, rows: list[dict]) -> str:
    cfg = run.config
    head = (f"{cfg['n_chains']} chains x {cfg['n_draws']} draws (thin {cfg['thin']}), "
            f"{len(run.divergences)} diverged, {run.wall_s:.1f} s sampling")
    lines = [head, f"{'estimate':<16}{'shape':>12}{'value':>13}{'stderr':>12}{'|z|>2':>8}"
             "  convention (matrices: mean |value|, mean stderr)"]
    for r in rows:
        lines.append(f"{r['estimate']:<16}{r['shape']:>12}{r['value']:>13.5g}{r['stderr']:>12.3g}"
                     f"{r['frac |z|>2']:>8.2f}  {r['convention']}")
    return "\n".join(lines)


def report(folder: str | Path, *, plots: bool = True) -> str:
    """Re-render ``summary.txt``, ``summary.json`` and plots from a folder's saved results."""
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "run" / "run.json").exists():
        raise ConfigError(f"{folder} holds no finished suscept run (config.json and run/ "
                          "are written by suscept run)")
    run = Run.load(folder / "run")
    estimates = {p.stem: Estimate.load(p) for p in sorted((folder / "estimates").glob("*.pt"))}
    rows = summary_rows(run, estimates)
    table = format_table(run, rows)
    (folder / "summary.txt").write_text(table + "\n")
    write_json(folder / "summary.json", {"rows": rows, "divergences": len(run.divergences),
                                         "wall_s": run.wall_s})
    write_top_couplings(folder, estimates)  # top_NAME.csv per matrix estimate, by |z|
    if plots:
        _plots(folder, run, estimates)
    print(table)
    return table


def _plots(folder: Path, run: Run, estimates: dict[str, Estimate]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3))
    for c in range(run.probe_loss.shape[0]):
        ax.plot(run.probe_loss[c].numpy(), label=f"chain {c}", lw=0.8)
    ax.set(xlabel="draw", ylabel="mean probe loss", title="probe loss per chain")
    fig.tight_layout()
    fig.savefig(folder / "trace.png", dpi=100)
    plt.close(fig)
    for name in ("susceptibility", "bif"):
        if name in estimates and estimates[name].value.ndim == 2:
            est = estimates[name]
            fig, ax = plt.subplots(figsize=(6, 4))
            im = ax.imshow(est.value.T.numpy() if name == "susceptibility" else est.value.numpy(),
                           aspect="auto", cmap="RdBu_r")
            ax.set(title=f"{name}: {est.convention}"[:80], xlabel=est.dims[0],
                   ylabel=est.dims[1])
            fig.colorbar(im)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=100)
            plt.close(fig)
