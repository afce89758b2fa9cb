"""Stagewise attribution across the induction-head phase transition (docs/theory.md section 6).

At every checkpoint of the zoo's attention-only model (trained with more checkpoints than the
default): one localized SGLD run over all heads gives the LLC (of the loss it samples: the
minibatch training losses of the chain, :func:`suscept.llc_from_trace`; the same statistic on
the held-out probe is reported beside it as ``probe_llc``, which is not the LLC),
the susceptibility matrix and its induction-PC AUROC, and the per-sequence loss draws. The
phase transition is located from the LLC and the susceptibilities and set against the loss
curve and the induction score. Across it, the loss kernel of the two-phase mixture splits
exactly (law of total covariance) into within-phase and between-phase parts:

    Cov(l_i, l_j) = [pi Cov_U + (1 - pi) Cov_V] + pi (1 - pi) (mu_iU - mu_iV)(mu_jU - mu_jV)

    python -m experiments.stagewise [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore", DeprecationWarning)

import observables as ob  # noqa: E402
import suscept  # noqa: E402
from experiments.circuit_recovery import analyse  # noqa: E402
from experiments.common import results_dir, versions, write_json  # noqa: E402
from experiments.zoo.heads import head_scores  # noqa: E402
from experiments.zoo.language import make_dataset  # noqa: E402
from experiments.zoo.train import TrainConfig, train_or_load  # noqa: E402


@dataclass(frozen=True)
class Settings:
    n_checkpoints: int = 20
    step_size: float = 1e-3
    n_beta: float = 30.0
    gamma: float = 300.0
    n_chains: int = 4
    n_draws: int = 150
    thin: int = 2
    burn_in: int = 100  # leave the transient from w* out of the LLC and the covariances
    batch_size: int = 64
    n_train: int = 2048
    n_probe: int = 64
    every: int = 1  # analyse every k-th checkpoint


QUICK = Settings(n_checkpoints=10, n_draws=20, n_train=512, n_probe=32, every=2, burn_in=20)


def checkpoint_run(model, train: Tensor, probe, s: Settings) -> dict:
    specs, streams = ob.susceptibility_observables(["all heads"])
    specs.append(ob.SampleLoss(None, name="sample_loss"))
    plan = ob.EvaluationPlan(model, probe.tokens, specs)
    cfg = suscept.SamplerConfig(step_size=s.step_size, n_beta=s.n_beta, gamma=s.gamma,
                                n_chains=s.n_chains, n_draws=s.n_draws, thin=s.thin,
                                burn_in=s.burn_in,
                                batch_size=s.batch_size, seed=0)
    run = suscept.sample(model, ob.lm_loss, train, cfg, observables=plan, stream=streams,
                         store_draws=["phi", "mean_loss", "sample_loss"], progress=False)
    # the LLC of the loss the chain samples (minibatches of the training set), not of the probe
    with torch.no_grad():
        anchor = float(ob.lm_loss(model, train).double().mean())
    llc = suscept.llc_from_trace(run, anchor)
    probe_llc = suscept.llc(run.flat("mean_loss"), run.anchor_values["mean_loss"].reshape(1),
                            s.n_beta)
    chi = suscept.susceptibility(run)
    res = analyse(chi.value, probe)
    return {"llc": float(llc.value), "llc_se": float(llc.stderr),
            "probe_llc": float(probe_llc.value), "probe_llc_se": float(probe_llc.stderr),
            "auroc": res["auroc"],
            "loadings": res["loadings"], "sample_loss": run.flat("sample_loss").double(),
            "anchor_loss": float(run.anchor_values["mean_loss"])}


def decomposition(u: Tensor, v: Tensor, pis: list[float]) -> dict:
    """Within/between-phase split of the loss kernel of the mixture of draws ``u`` and ``v``
    ``[chain, draw, n]`` (plug-in moments, so the identity is exact), and its check against
    the covariance of the pooled, re-weighted draws."""
    u, v = u.flatten(0, 1), v.flatten(0, 1)
    mu_u, mu_v = u.mean(0), v.mean(0)
    cov_u = (u - mu_u).T @ (u - mu_u) / len(u)
    cov_v = (v - mu_v).T @ (v - mu_v) / len(v)
    d = mu_u - mu_v
    rows = []
    for pi in pis:
        within = pi * cov_u + (1 - pi) * cov_v
        between = pi * (1 - pi) * torch.outer(d, d)
        w = torch.cat([torch.full((len(u),), pi / len(u), dtype=torch.float64),
                       torch.full((len(v),), (1 - pi) / len(v), dtype=torch.float64)])
        x = torch.cat([u, v])
        mean = w @ x
        pooled = (x - mean).T @ ((x - mean) * w[:, None])
        rows.append({"pi": pi, "within": float(within.norm()), "between": float(between.norm()),
                     "identity_error": float((pooled - within - between).abs().max())})
    return {"rows": rows, "mean_shift": d}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--draws", type=int, default=None, help="draws per chain")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.draws:
        s = dataclasses.replace(s, n_draws=args.draws)
    out = results_dir("stagewise", args.out)
    write_json(out / "config.json", {"settings": dataclasses.asdict(s), "quick": args.quick,
                                     "versions": versions()})
    trained = train_or_load("attn", seed=0, config=TrainConfig(n_checkpoints=s.n_checkpoints))
    train = make_dataset(s.n_train, seed=50_000).tokens
    probe = make_dataset(s.n_probe, seed=60_000)
    steps = trained.checkpoints[1::s.every]
    if trained.checkpoints[-1] not in steps:
        steps.append(trained.checkpoints[-1])
    curve = trained.curve
    per = []
    for step in steps:
        t0 = time.perf_counter()
        model = trained.checkpoint(step)
        r = checkpoint_run(model, train, probe, s)
        r["step"] = step
        r["induction_score"] = float(head_scores(model).induction[1].max())
        i = curve["step"].index(step)
        r["loss_induction"] = curve["eval"]["induction"][i]
        r["loss_bigram"] = curve["eval"]["bigram"][i]
        per.append(r)
        print(f"  step {step:5d}: LLC (sampled loss) {r['llc']:7.2f} ± {r['llc_se']:.2f} "
              f"(held-out probe: {r['probe_llc']:.2f}), induction AUROC "
              f"{r['auroc']:.3f}, induction score {r['induction_score']:.2f}, induction loss "
              f"{r['loss_induction']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def biggest_change(key: str, sign: float) -> int:
        jumps = [sign * (b[key] - a[key]) for a, b in zip(per, per[1:])]
        k = max(range(len(jumps)), key=jumps.__getitem__)
        return per[k + 1]["step"]

    located = {"llc_rise": biggest_change("llc", 1.0),
               "induction_loss_drop": biggest_change("loss_induction", -1.0),
               "induction_score_rise": biggest_change("induction_score", 1.0),
               "auroc_rise": biggest_change("auroc", 1.0)}
    k = next(i for i, r in enumerate(per) if r["step"] == located["induction_loss_drop"])
    u, v = per[k - 1], per[k]  # just before and just after the transition
    dec = decomposition(u["sample_loss"], v["sample_loss"], [i / 10 for i in range(11)])
    ind_frac = (probe.target_types == probe.type_names.index("induction")).double().mean(1)
    shift_vs_induction = float(torch.corrcoef(torch.stack(
        [dec["mean_shift"].abs(), ind_frac]))[0, 1])
    print(f"transition located at: {located}")
    print(f"decomposition between steps {u['step']} and {v['step']}: between-phase norm peaks "
          f"at pi = {max(dec['rows'], key=lambda r: r['between'])['pi']}; |mean shift| of a "
          f"sequence vs its share of induction tokens: r = {shift_vs_induction:.2f}")
    figures = {"checkpoints": [{k2: v2 for k2, v2 in r.items() if k2 != "sample_loss"}
                               for r in per], "located": located,
               "decomposition": {"u_step": u["step"], "v_step": v["step"], **dec,
                                 "shift_vs_induction_share": shift_vs_induction}}
    write_json(out / "figures.json", figures)
    _plot(per, dec, out)
    (out / "report.md").write_text(
        "# Stagewise attribution\n\n"
        f"Checkpoints analysed: {[r['step'] for r in per]}\n\n"
        "LLC: of the sampled loss (minibatch training losses of the chain, "
        "suscept.llc_from_trace); per step (sampled loss / held-out probe): "
        + ", ".join(f"{r['step']}: {r['llc']:.1f} / {r['probe_llc']:.1f}" for r in per)
        + "\n\n"
        f"Transition located (step of the largest change between consecutive checkpoints): "
        f"{located}\n\n"
        f"Within/between-phase decomposition of the loss kernel between steps {u['step']} and "
        f"{v['step']}: the between-phase norm is "
        + ", ".join(f"{r['between']:.3g} at pi={r['pi']:.1f}" for r in dec["rows"][::5])
        + f"; identity error max {max(r['identity_error'] for r in dec['rows']):.2g}; "
        f"|mean shift| of a sequence vs its share of induction tokens: r = "
        f"{shift_vs_induction:.2f}.\n\nSettings: {dataclasses.asdict(s)}\n")
    print(f"wrote {out}")
    return figures


def _plot(per: list[dict], dec: dict, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [max(r["step"], 1) for r in per]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.errorbar(steps, [r["llc"] for r in per], yerr=[r["llc_se"] for r in per], fmt="o-",
                label="LLC")
    ax.set(xscale="log", xlabel="training step", ylabel="LLC", title="LLC along training")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["loss_induction"] for r in per], "r.--", label="induction loss")
    ax2.set_ylabel("induction-token loss", color="r")
    axes[1].plot(steps, [r["auroc"] for r in per], "o-", label="induction-PC AUROC")
    axes[1].plot(steps, [r["induction_score"] for r in per], "s-", label="max induction score")
    axes[1].set(xscale="log", xlabel="training step", ylim=(0, 1.02), title="susceptibilities")
    axes[1].legend(fontsize=8)
    rows = dec["rows"]
    axes[2].plot([r["pi"] for r in rows], [r["within"] for r in rows], "o-", label="within")
    axes[2].plot([r["pi"] for r in rows], [r["between"] for r in rows], "s-", label="between")
    axes[2].set(xlabel="pi (weight of the earlier phase)", ylabel="Frobenius norm",
                title="loss-kernel decomposition")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "stagewise.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
