"""The picture behind it all: a localized SGLD cloud on a singular potential vs the Laplace
ellipse.

Potential ``L(w) = w1^2 w2^2 + c (w1^2 + w2^2)``: two degenerate valleys (the axes) crossing at
the origin. ``c = 0`` by default, so every point of the valleys is a minimum and the spring
``gamma/2 |w - w*|^2`` is the only quadratic (a ``c`` comparable to ``gamma / n_beta`` would pull
the chain off an anchor on the valley toward the origin). The localized posterior around an
anchor w* is ``p(w) ~ exp(-n_beta L(w) - gamma/2 |w - w*|^2)``; the Laplace (Gaussian) picture
replaces it with ``N(w*, (n_beta H + gamma I)^-1)``, ``H`` the Hessian of ``L`` at w*. Two anchors:

- the crossing ``w* = (0, 0)``: ``H = 2c I`` is zero, so the ellipse is a wide circle,
  while the chain's cloud is a cross along the valleys;
- a point on one valley, ``w* = (1.5, 0)``: the ellipse is thin across the valley, while the
  cloud is a funnel that widens where the valley meets the other one.

Per anchor the script reports the cloud's covariance beside the Laplace one, the fraction of
draws outside the ellipse's 95% contour (5% if the Gaussian picture were right), the excess
kurtosis per axis, and the LLC estimate (``suscept.llc``).

    python -m experiments.singular_picture [--quick]

Writes ``results/singular_picture/``: ``singular_picture.png`` (also copied to
``docs/img/singular_picture.png`` with ``--docs``), ``figures.json``, ``report.md``.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

import suscept
from experiments.common import results_dir, versions, write_json, write_results

C, N_BETA, GAMMA = 0.0, 100.0, 1.0
ANCHORS = {"crossing": (0.0, 0.0), "valley": (1.5, 0.0)}


class Point(nn.Module):
    def __init__(self, w: tuple[float, float]):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


def potential(w: Tensor) -> Tensor:
    """``L(w) = w1^2 w2^2 + c |w|^2`` for ``w [..., 2]``."""
    return w[..., 0] ** 2 * w[..., 1] ** 2 + C * (w ** 2).sum(-1)


def loss_fn(model: Point, batch: Tensor) -> Tensor:
    """One "sample" whose loss is the potential: shape ``[batch]``."""
    return potential(model.w).expand(batch.shape[0])


def laplace(anchor: Tensor) -> Tensor:
    """``(n_beta H + gamma I)^-1`` with ``H`` the Hessian of ``L`` at the anchor, ``[2, 2]``."""
    h = torch.autograd.functional.hessian(potential, anchor)
    return torch.linalg.inv(N_BETA * h + GAMMA * torch.eye(2, dtype=torch.float64))


def cloud(anchor: tuple[float, float], n_draws: int) -> tuple[Tensor, suscept.Run]:
    config = suscept.SamplerConfig(step_size=1e-3, n_beta=N_BETA, gamma=GAMMA, n_chains=4,
                                   n_draws=n_draws, thin=20, burn_in=200)
    model = Point(anchor)
    positions = lambda m: {"w": m.w.detach().clone()}  # noqa: E731
    run = suscept.sample(model, loss_fn, torch.zeros(1), config, probe=torch.zeros(1),
                         observables=positions,
                         progress=False)
    return run.flat("w").reshape(-1, 2), run


def summarize(name: str, draws: Tensor, run: suscept.Run) -> dict:
    anchor = torch.tensor(ANCHORS[name], dtype=torch.float64)
    lap = laplace(anchor)
    d = draws - anchor
    maha = torch.einsum("ni,ij,nj->n", d, torch.linalg.inv(lap), d)
    centred = draws - draws.mean(0)
    kurt = (centred ** 4).mean(0) / (centred ** 2).mean(0) ** 2 - 3
    llc = suscept.llc(run.flat("loss"), run.anchor_values["loss"], n_beta=N_BETA)
    return {"anchor": list(ANCHORS[name]), "laplace_cov": lap, "cloud_cov": d.T @ d / len(d),
            "outside_95": float((maha > -2 * math.log(0.05)).double().mean()),
            "excess_kurtosis": kurt, "llc": float(llc.value), "llc_se": float(llc.stderr),
            "n_draws": len(draws)}


def plot(clouds: dict[str, Tensor], figures: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.3))
    for ax, (name, draws) in zip(axes, clouds.items()):
        anchor = torch.tensor(ANCHORS[name], dtype=torch.float64)
        lo, hi = anchor - 2.2, anchor + 2.2
        g1, g2 = torch.meshgrid(torch.linspace(lo[0], hi[0], 200),
                                torch.linspace(lo[1], hi[1], 200), indexing="ij")
        ax.contour(g1, g2, potential(torch.stack([g1, g2], -1)), levels=[0.01, 0.05, 0.2, 1],
                   colors="0.7", linewidths=0.8)
        ax.scatter(draws[:, 0], draws[:, 1], s=2, alpha=0.3, label="localized SGLD draws")
        evals, evecs = torch.linalg.eigh(figures[name]["laplace_cov"])
        t = torch.linspace(0, 2 * math.pi, 200, dtype=torch.float64)
        r = math.sqrt(-2 * math.log(0.05))
        ring = anchor + (r * evecs @ (evals.sqrt()[:, None] * torch.stack([t.cos(), t.sin()])))\
            .T
        ax.plot(ring[:, 0], ring[:, 1], "r-", lw=1.5, label="Laplace 95% ellipse")
        ax.plot(*anchor.tolist(), "k+", ms=12)
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), aspect="equal", xlabel="w1",
               ylabel="w2", title=f"w* = {ANCHORS[name]}: "
               f"{100 * figures[name]['outside_95']:.0f}% outside (Gaussian: 5%)")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"L = w1^2 w2^2 + {C} |w|^2, n_beta {N_BETA:g}, gamma {GAMMA:g}", fontsize=9)
    fig.tight_layout()
    path = out / "singular_picture.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(figures: dict) -> str:
    lines = ["# Localized SGLD on a singular potential vs the Laplace ellipse", "",
             "| anchor | Laplace cov | cloud cov | outside 95% ellipse | excess kurtosis "
             "(w1, w2) | LLC |", "|---|---|---|---|---|---|"]
    for name in ANCHORS:
        f = figures[name]
        fmt = lambda m: "[" + "; ".join(" ".join(f"{v:.3g}" for v in r) for r in m) + "]"  # noqa
        lines.append(f"| {f['anchor']} | {fmt(f['laplace_cov'].tolist())} | "
                     f"{fmt(f['cloud_cov'].tolist())} | {100 * f['outside_95']:.1f}% | "
                     f"{f['excess_kurtosis'][0]:.2f}, {f['excess_kurtosis'][1]:.2f} | "
                     f"{f['llc']:.3f} ± {f['llc_se']:.3f} |")
    lines += ["", "A Gaussian posterior has 5% of its mass outside its 95% ellipse and zero "
              "excess kurtosis; the regular LLC of a 2-parameter model is d/2 = 1, and the "
              "learning coefficient of w1^2 w2^2 is 1/2 at the crossing and on the valley "
              "(localization moves the finite-n_beta estimate). The cloud "
              "follows the valleys the ellipse cannot represent, which is why suscept "
              "estimates covariances from draws instead of inverting H.", "",
              "Plot: singular_picture.png"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer draws (CI)")
    parser.add_argument("--docs", action="store_true", help="copy the PNG to docs/img/")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    n_draws = 300 if args.quick else 3000
    out = results_dir("singular_picture", args.out)
    write_json(out / "config.json", {"c": C, "n_beta": N_BETA, "gamma": GAMMA,
                                     "anchors": ANCHORS, "n_draws": n_draws,
                                     "quick": args.quick, "versions": versions()})
    clouds, figures = {}, {}
    for name, anchor in ANCHORS.items():
        clouds[name], run = cloud(anchor, n_draws)
        figures[name] = summarize(name, clouds[name], run)
        f = figures[name]
        print(f"w* = {anchor}: {100 * f['outside_95']:.1f}% of draws outside the Laplace 95% "
              f"ellipse; excess kurtosis {f['excess_kurtosis'].tolist()}; LLC {f['llc']:.3f} "
              f"± {f['llc_se']:.3f}")
    png = plot(clouds, figures, out)
    if args.docs:
        img = Path(__file__).resolve().parents[1] / "docs" / "img"
        img.mkdir(exist_ok=True)
        shutil.copy(png, img / png.name)
    write_results(out, figures, report(figures))
    return figures


if __name__ == "__main__":
    main()
