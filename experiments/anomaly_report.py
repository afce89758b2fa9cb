"""Tables and figures of :mod:`experiments.anomaly_kinds` (``report.md``, ``auroc.png``,
``switch_losses.png``, ``scores.png``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from experiments import anomaly_profiles as ap
from experiments.common import write_results


def progress(run: dict) -> None:
    parts = []
    for kind, res in run["kinds"].items():
        parts.append(f"{kind}: fluct-token {res['fluctuation_max_token']['auroc']:.3f}, "
                     f"chi {res['susceptibility']['auroc']:.3f}, MAD-FA best "
                     f"{max(v['auroc'] for k, v in res.items() if k.startswith('madfa')):.3f}, "
                     f"loss {res['loss_baseline']['auroc']:.3f}")
    print(f"  {run['model']} seed {run['seed']}: " + "; ".join(parts)
          + f"; SGLD {run['cost']['sgld_seconds']:.0f} s", flush=True)


def rows(figures: dict) -> dict[str, list[dict]]:
    """Runs grouped by organism: ``"trigger 3%"``, ``"shift"``, ``"switch"``."""
    out: dict[str, list[dict]] = {}
    for run in figures["runs"]:
        for kind in run["kinds"]:
            name = f"trigger {run['rate']:.0%}" if kind == "trigger" else kind
            out.setdefault(name, []).append({**run, "kind": kind})
    order = sorted(out, key=lambda k: (not k.startswith("trigger"),
                                       float(k.split()[1][:-1]) if k.startswith("trigger")
                                       else 0.0, k != "shift"))
    return {k: out[k] for k in order}


def table(figures: dict) -> list[str]:
    methods = dict(ap.METHODS)
    methods.update({k.replace("madfa", "madfa_paper"): v.replace("MAD-FA", "MAD-FA paper regime")
                    for k, v in ap.MADFA.items()})
    lines = []
    for name, runs in rows(figures).items():
        seeds = " / ".join(str(r["seed"]) for r in runs)
        lines += ["", f"### {name} (seeds {seeds})", "",
                  "| method | AUROC ± se per seed | mean AUROC | conformal TPR at 5% FPR "
                  "per seed | conformal FPR per seed |", "|---|---|---|---|---|"]
        for key, label in methods.items():
            if key not in runs[0]["kinds"][runs[0]["kind"]]:
                continue
            res = [r["kinds"][r["kind"]][key] for r in runs]
            au = " / ".join(f"{x['auroc']:.3f} ± {x['auroc_se']:.3f}" for x in res)
            mean = sum(x["auroc"] for x in res) / len(res)
            tpr = " / ".join(f"{x['conformal']['tpr']['value']:.2f}" for x in res)
            fpr = " / ".join(f"{x['conformal']['fpr']['value']:.2f}" for x in res)
            lines.append(f"| {label} | {au} | {mean:.3f} | {tpr} | {fpr} |")
        lines += ["", "One-sided scalar scores scored two-sided, ``|s - median| / MAD`` of the "
                  "trusted scores (AUROC ± se per seed):", ""]
        for key in ap.TWO_SIDED:
            res = [two_sided(r, key) for r in runs]
            lines.append(f"- {methods[key]}: " + " / ".join(
                f"{x['auroc']:.3f} ± {x['auroc_se']:.3f}" for x in res))
        lines += [""]
        for r in runs:
            d = r["differences"][r["kind"]]
            split = torch.as_tensor(r["susceptibility_split_half"])
            lines.append(
                f"- seed {r['seed']}: per-token fluctuation minus {d['fixed']['b']} "
                f"{d['fixed']['value']:+.3f} ± {d['fixed']['stderr']:.3f}; best profile "
                f"({d['best']['a']}) minus best MAD-FA ({d['best']['b']}) "
                f"{d['best']['value']:+.3f} ± {d['best']['stderr']:.3f}; susceptibility profile "
                f"split-half Spearman {float(split.mean()):.2f} (range {float(split.min()):.2f} "
                f"to {float(split.max()):.2f}); SGLD {r['cost']['sgld_seconds']:.0f} s for "
                f"{r['cost']['draws']} draws" + (f"; attack success {r['attack_success']:.2f}"
                                                  if "attack_success" in r else ""))
    return lines


SUMMARY = ("susceptibility", "susceptibility_max_token", "fluctuation", "fluctuation_max_token",
           "fluctuation_top3_token", "fluctuation_token_summary", "madfa_mean",
           "madfa_token_mean_top3", "madfa_token_classwise_top3", "fluctuation_total",
           "loss_baseline", "min_token_loss_baseline", "max_token_loss_baseline",
           "activation_baseline", "activation_max_token")
PAIRS = (("fluctuation_max_token", "madfa_mean"),
         ("fluctuation_max_token", "madfa_token_classwise_top3"),
         ("fluctuation", "madfa_mean"), ("fluctuation_token_summary", "madfa_mean"))


def summary(figures: dict) -> list[str]:
    """Method x organism table (AUROC per seed, mean conformal TPR) and paired differences."""
    groups = rows(figures)
    lines = ["| method | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for key in SUMMARY:
        cells = []
        for runs in groups.values():
            res = [r["kinds"][r["kind"]][key] for r in runs]
            tpr = sum(x["conformal"]["tpr"]["value"] for x in res) / len(res)
            cells.append(" / ".join(f"{x['auroc']:.2f}" for x in res) + f" [{tpr:.2f}]")
        lines.append(f"| {ap.METHODS[key]} | " + " | ".join(cells) + " |")
    lines += ["", "| AUROC difference | " + " | ".join(groups) + " |",
              "|---|" + "---|" * len(groups)]
    for a, b in PAIRS:
        cells = []
        for runs in groups.values():
            d = []
            for r in runs:
                probe = ap.Probe(torch.empty(0), torch.as_tensor(r["part"]), tuple(r["kinds"]))
                scores = {k: torch.as_tensor(v) for k, v in r["scores"].items()}
                d.append(ap.difference(scores, probe, probe.part_of(r["kind"]), a, b))
            cells.append(" / ".join(f"{x['value']:+.2f} ± {x['stderr']:.2f}" for x in d))
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return lines


ROWS = ("susceptibility", "susceptibility_max_token", "fluctuation", "fluctuation_max_token",
        "fluctuation_token_summary", "madfa_mean", "madfa_paper_mean", "loss_baseline",
        "min_token_loss_baseline", "max_token_loss_baseline", "activation_max_token",
        "fluctuation_total")


def cell(x: dict) -> str:
    """``AUROC ± se / TPR at 5% FPR (clean-test threshold) ± se / conformal TPR ± se``."""
    c = x["conformal"]["tpr"]
    return (f"{x['auroc']:.2f} ± {x['auroc_se']:.2f} / {x['tpr_at_5fpr']:.2f} ± "
            f"{x['tpr_at_5fpr_se']:.2f} / {c['value']:.2f} ± {c['stderr']:.2f}")


def per_seed(figures: dict) -> list[str]:
    """One table per organism, one column per seed: the profile detectors, the best of each
    family (picked per seed on the test set, named), MAD-FA and the baselines; the best
    profile minus the best MAD-FA (paired DeLong) and the cost."""
    methods = dict(ap.METHODS)
    methods["madfa_paper_mean"] = "MAD-FA published regime, sequence traces, mean Corr"
    lines = []
    for name, runs in rows(figures).items():
        res = [r["kinds"][r["kind"]] for r in runs]
        lines += ["", f"**{name}** (cells: AUROC ± se / TPR at 5% FPR ± se / conformal TPR "
                  "at 5% FPR ± se)", "",
                  "| method | " + " | ".join(f"seed {r['seed']}" for r in runs)
                  + " | mean AUROC ± se over seeds |", "|---|" + "---|" * (len(runs) + 1)]
        families = (("best profile detector", ap.PROFILE_METHODS),
                    ("best MAD-FA, same draws", ap.MADFA),
                    ("best MAD-FA, published regime",
                     [k.replace("madfa", "madfa_paper") for k in ap.MADFA]))
        for label, keys in families:
            best = [max((k for k in keys if k in x), key=lambda k: x[k]["auroc"], default=None)
                    for x in res]
            if None not in best:
                lines.append(f"| {label} | " + " | ".join(
                    f"{cell(x[k])} ({k})" for x, k in zip(res, best))
                    + f" | {_mean([x[k] for x, k in zip(res, best)])} |")
        for key in ROWS:
            if all(key in x for x in res):
                extra = [""] * len(runs)
                if key == "susceptibility":
                    extra = [f"; split-half {_split(r)}" for r in runs]
                lines.append(f"| {methods[key]} | " + " | ".join(
                    cell(x[key]) + e for x, e in zip(res, extra))
                    + f" | {_mean([x[key] for x in res])} |")
        d = [r["differences"][r["kind"]]["best"] for r in runs]
        lines.append("| best profile minus best MAD-FA (AUROC, paired) | " + " | ".join(
            f"{x['value']:+.2f} ± {x['stderr']:.2f}" for x in d)
            + f" | {_mean([{'auroc': x['value']} for x in d], '+.2f')} |")
        lines.append("| cost: draws, SGLD CPU s (MAD-FA published regime: draws, CPU s) | "
                     + " | ".join(_cost(r["cost"]) for r in runs) + " | |")
    return lines


def _mean(res: list[dict], fmt: str = ".2f") -> str:
    """Mean of the per-seed AUROCs ± their standard deviation / sqrt(seeds) (with two or more)."""
    a = torch.tensor([x["auroc"] for x in res], dtype=torch.float64)
    se = f" ± {float(a.std() / len(a) ** 0.5):.2f}" if len(a) > 1 else " (one seed)"
    return f"{float(a.mean()):{fmt}}{se}"


def _split(run: dict) -> str:
    split = torch.as_tensor(run["susceptibility_split_half"])
    return f"{float(split.mean()):.2f} ({float(split.min()):.2f} to {float(split.max()):.2f})"


def _cost(c: dict) -> str:
    paper = (f" ({c['madfa_paper_draws']}, "
             + (f"{c['madfa_paper_cpu_seconds']:.0f}" if "madfa_paper_cpu_seconds" in c
                else f"wall {c['madfa_paper_seconds']:.0f}") + ")"
             if "madfa_paper_draws" in c else "")
    return f"{c['draws']}, {c['sgld_cpu_seconds']:.0f}{paper}"


def two_sided(run: dict, key: str) -> dict:
    """:func:`experiments.anomaly_profiles.evaluate` of the two-sided version of a score."""
    probe = ap.Probe(torch.empty(0), torch.as_tensor(run["part"]), tuple(run["kinds"]))
    scores = ap.two_sided(torch.as_tensor(run["scores"][key]), probe)
    return ap.evaluate(scores, probe, probe.part_of(run["kind"]))


def plots(figures: dict, out) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = rows(figures)
    keys = ["susceptibility", "fluctuation", "fluctuation_max_token",
            "fluctuation_token_summary", "madfa_mean", "madfa_token_classwise_top3",
            "loss_baseline", "min_token_loss_baseline", "activation_max_token"]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(groups)
    for g, (name, runs) in enumerate(groups.items()):
        for i, key in enumerate(keys):
            vals = [r["kinds"][r["kind"]][key]["auroc"] for r in runs]
            ax.scatter([i + (g - len(groups) / 2 + 0.5) * width] * len(vals), vals, s=12,
                       color=f"C{g}", label=name if i == 0 else None)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys], fontsize=7)
    ax.set(ylabel="AUROC (one dot per seed)", ylim=(0, 1.02))
    ax.legend(fontsize=7, ncol=len(groups))
    fig.tight_layout()
    fig.savefig(out / "auroc.png", dpi=120)
    plt.close(fig)
    files = ["auroc.png"]
    clean_runs = [r for r in figures["runs"] if r["rate"] is None]
    if clean_runs:
        files.append(loss_figure(clean_runs[0], out, plt))
    fig, axes = plt.subplots(len(groups), 4, figsize=(14, 2.8 * len(groups)), squeeze=False)
    for row, (name, runs) in zip(axes, groups.items()):
        r = runs[0]
        part = torch.as_tensor(r["part"])
        anomalous = 3 + list(r["kinds"]).index(r["kind"])
        for ax, key in zip(row, ("susceptibility", "fluctuation_max_token",
                                 "madfa_token_classwise_top3", "loss_baseline")):
            s = torch.as_tensor(r["scores"][key]).double()
            ax.hist(s[part == 2].tolist(), bins=20, alpha=0.6, label="clean test")
            ax.hist(s[part == anomalous].tolist(), bins=20, alpha=0.6, label=name)
            ax.set_title(f"{name}, seed {r['seed']}: {key}\nAUROC "
                         f"{r['kinds'][r['kind']][key]['auroc']:.3f}", fontsize=8)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=120)
    plt.close(fig)
    return files + ["scores.png"]


def loss_figure(run: dict, out, plt) -> str:
    """Sequence loss and smallest token loss at w*, clean test vs each kind of the run."""
    part = torch.as_tensor(run["part"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, label in ((axes[0], "loss_baseline", "sequence loss at w*"),
                           (axes[1], "min_token_loss_baseline", "smallest token loss at w*")):
        s = torch.as_tensor(run["scores"][key]).double().abs()
        ax.hist(s[part == 2].tolist(), bins=20, alpha=0.5, label="clean test")
        for k, kind in enumerate(run["kinds"]):
            au = run["kinds"][kind][key]["auroc"]
            ax.hist(s[part == 3 + k].tolist(), bins=20, alpha=0.5,
                    label=f"{kind} (AUROC {au:.2f})")
        ax.set(xlabel=label, title=f"seed {run['seed']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "switch_losses.png", dpi=120)
    plt.close(fig)
    return "switch_losses.png"


def merge(folders: list[str], out) -> dict:
    """One report from the ``figures.json`` of several runs of the runner (same settings)."""
    parts = [json.loads((Path(f) / "figures.json").read_text()) for f in folders]
    figures = {**parts[0], "runs": [r for p in parts for r in p["runs"]],
               "loadavg": [p["loadavg"] for p in parts]}
    if any(p["settings"] != parts[0]["settings"] for p in parts):
        raise ValueError("the folders hold runs with different settings")
    Path(out).mkdir(parents=True, exist_ok=True)
    write(figures, Path(out))
    return figures


def write(figures: dict, out) -> None:
    files = plots(figures, out)
    lines = ["# Anomaly detection on three organisms", "",
             "AUROC of each anomalous kind against held-out clean test sequences (DeLong se); "
             "conformal TPR / FPR: threshold from the trusted calibration scores at 5% FPR. "
             f"Load average at the end {figures['loadavg']}.", *table(figures), "",
             "## Summary", "", *summary(figures), "", "## Per seed", "", *per_seed(figures),
             "", "Plots: " + ", ".join(files), "",
             f"Settings: {figures['settings']}"]
    write_results(out, figures, "\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="merge runs of experiments.anomaly_kinds")
    parser.add_argument("folders", nargs="+", help="folders holding a figures.json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    merge(args.folders, args.out)
