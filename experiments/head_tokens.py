"""Per-token attribution against per-token ablation: does the susceptibility say *which data*
a head carries, token by token?

The head-level comparison (:mod:`experiments.head_attribution`) gives one number per head
and token type. Ablation gives one per head and *token* too, and cheaply: the per-token
ground truth here is each probe token's own mean-ablation effect

    Delta[x, C] = l_x(z_C -> mean z_C) - l_x          (nats; > 0: token x needs head C)

(:func:`experiments.head_signals.token_ablation`, means from the held-out ablation set). It
is set against per-token signals over the same ``X`` probe tokens and ``K`` heads:

- ``susceptibility``: ``-chi[x, C] = Cov(phi_C, l^C_x - Lbar_S(w^C))`` of the run (the run of
  ``head_attribution``: same model, probe, settings and seed), ``> 0``: head C expresses x;
- ``fluctuation``: ``(n_beta/2) Var(l^C_x - Lbar_S(w^C))`` of the run (how much x's loss
  moves when only C moves);
- ``spring_control``: ``-chi0[x, C]``, the spring-only susceptibility by the interpolation
  estimator (:func:`observables.spring_susceptibility`, seed 100);
- ``token_fisher``: ``|| d l_x / d theta_C ||^2`` at w*, and ``attribution_patching``:
  ``sum_p (mean z - z_p) . d l_x / d z_p``, the first-order estimate of ``Delta[x, C]``
  (:func:`experiments.head_signals.per_token_gradients`; no sampling);
- ``type_ablation``: the per-type answer broadcast to tokens, each token given its type's
  mean-ablation effect on the held-out set (:func:`experiments.zoo.heads.ablation_effects`):
  what a signal that knows only a token's type scores (ties share their rank);
- ``susceptibility_magnitude``: ``|chi[x, C]|``, for a reader who would rank by size whatever
  the sign (layer-1 heads have the opposite sign to layer-0 heads on induction tokens).

Both directions of "which data does this head depend on / which heads does this token depend
on" are scored, per layer (medians over its heads) and per seed:

- ``tokens``: per head, Spearman over all probe tokens between the signal's column and
  ``Delta``'s (the head's data attribution, ranked);
- ``induction``: the same over the induction tokens only;
- ``sequences``: per head, Spearman over sequences of the sequence means;
- ``top``: per head, the share of the ``X / 20`` tokens with the largest signal that are among
  the ``X / 20`` with the largest ``Delta`` (chance 0.05);
- ``heads``: per induction token, Spearman across the layer's heads (which heads it needs),
  averaged over the induction tokens;
- ``own_loss`` (not a score against ablation): per head, Spearman over the induction tokens
  between the signal and the token's own clean loss ``l_x(w*)`` (how much of the signal is
  the model's uncertainty on the token rather than the head).

For the sampled signals the noise's ceiling per head is ``sqrt(R)``, ``R = 1 - mean_x se^2 /
Var_x(value)`` (the share of the column's variance over tokens that is not Monte Carlo noise;
a Spearman against an exact ground truth is attenuated about that much). Spearman gives ties
their average rank. Per-token values (truth and signals, with standard errors) are saved to
``tokens_{variant}_seed{s}.pt`` (:func:`torch.load`).

    python -m experiments.head_tokens --variant attn8 [--seeds 0 1 2] [--draws 400]
        [--step-size 1e-3] [--chi0-draws 40] [--quick] [--out results/head_tokens]
        [--rescore]      # scores again from the saved per-token values, no sampling
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import observables as ob  # noqa: E402
import suscept  # noqa: E402
from experiments import head_attribution as ha  # noqa: E402
from experiments.common import average_ranks, results_dir, versions, write_results  # noqa: E402
from experiments.head_signals import mean_z, per_token_gradients, token_ablation  # noqa: E402
from experiments.zoo.heads import ablation_effects  # noqa: E402
from suscept import heads  # noqa: E402

VARIANTS = {**ha.QUICK_VARIANTS, **ha.FULL_VARIANTS}
SAMPLED = ("susceptibility", "fluctuation", "spring_control")
SIGNALS = SAMPLED + ("token_fisher", "attribution_patching", "type_ablation",
                     "susceptibility_magnitude")
SCORES = ("tokens", "induction", "sequences", "top", "heads", "own_loss")


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """``[K]``: Spearman rank correlation of the columns of ``a`` and ``b`` ``[n, K]``, ties at
    their average rank (NaN for a constant column)."""
    ra = torch.stack([average_ranks(c) for c in a.double().T], 1)
    rb = torch.stack([average_ranks(c) for c in b.double().T], 1)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    return (ra * rb).sum(0) / (ra.norm(dim=0) * rb.norm(dim=0))


def top_share(signal: Tensor, truth: Tensor, k: int) -> Tensor:
    """``[K]``: per column, the share of the ``k`` largest ``signal`` rows among the ``k``
    largest ``truth`` rows (1: the same top set; ``k / X`` by chance; ties at the cut are
    taken by :func:`torch.topk`'s order, i.e. as a random pick within a tie)."""
    a = torch.zeros_like(signal, dtype=torch.bool).scatter_(0, signal.topk(k, 0).indices, True)
    b = torch.zeros_like(truth, dtype=torch.bool).scatter_(0, truth.topk(k, 0).indices, True)
    return (a & b).sum(0).double() / k


def across_heads(signal: Tensor, truth: Tensor, layers: list[int]) -> dict[int, Tensor]:
    """Per layer ``[X]``: each row's Spearman across that layer's heads (columns); NaN for a
    row constant across them (left out of the ``heads`` score's mean)."""
    out = {}
    for layer in sorted(set(layers)):
        idx = [i for i, v in enumerate(layers) if v == layer]
        out[layer] = spearman(signal[:, idx].T.double(), truth[:, idx].T.double())
    return out


def scores(signal: Tensor, truth: Tensor, layers: list[int], n_seq: int, induction: Tensor,
           loss: Tensor | None = None) -> dict[str, Tensor | dict[int, float]]:
    """The scores of the module docstring for ``signal`` and ``truth`` ``[X, K]`` (rows in
    ``(sequence, position)`` order, ``n_seq`` sequences): per head ``[K]``, and per layer the
    mean over the induction tokens of the across-heads Spearman; with the clean token losses
    ``loss [X]`` also ``own_loss``."""
    s, t = signal.double(), truth.double()
    x = s.shape[0]
    seq = lambda v: v.reshape(n_seq, x // n_seq, -1).mean(1)  # noqa: E731
    per_token = across_heads(s[induction], t[induction], layers)
    return {"tokens": spearman(s, t), "induction": spearman(s[induction], t[induction]),
            "sequences": spearman(seq(s), seq(t)), "top": top_share(s, t, max(1, x // 20)),
            "heads": {k: float(v.nanmean()) for k, v in per_token.items()},
            **({} if loss is None else {"own_loss": spearman(
                s[induction], loss.double()[induction, None].expand(-1, s.shape[1]))})}


def score(saved: dict, layers: list[int], n_seq: int) -> tuple[dict, dict]:
    """``(scores, ceilings)`` per signal from the per-token values ``saved`` (the dict of
    ``tokens_{variant}_seed{s}.pt``): per head ``[K]`` and per layer (medians)."""
    truth, loss = saved["truth"], saved.get("loss")
    induction = saved["types"] == saved["type_names"].index("induction")
    out, ceilings = {}, {}
    chi = saved["values"]["susceptibility"][0]
    signals = {**saved["values"], "susceptibility_magnitude": (chi.abs(), None)}
    for name, (value, stderr) in signals.items():
        sc = scores(value, truth, layers, n_seq, induction, loss)
        out[name] = {k: (v if k == "heads" else {"per_head": v, "layer": by_layer(v, layers)})
                     for k, v in sc.items()}
        if stderr is not None:
            c = ceiling(value, stderr)
            ceilings[name] = {"per_head": c, "layer": by_layer(c, layers)}
    return out, ceilings


@torch.no_grad()
def clean_loss(model, probe) -> Tensor:
    """``[X]``: each probe token's loss at w*."""
    return ob.token_losses(model(probe.tokens), probe.tokens).flatten()


def ceiling(value: Tensor, stderr: Tensor) -> Tensor:
    """``[K]``: ``sqrt(max(0, 1 - mean_x se^2 / Var_x value))`` per column of ``[X, K]``."""
    r = 1 - stderr.double().pow(2).mean(0) / value.double().var(0)
    return r.clamp(min=0).sqrt()


def by_layer(per_head: Tensor, layers: list[int]) -> dict[int, float]:
    """Median over each layer's heads."""
    return {k: float(per_head[[i for i, v in enumerate(layers) if v == k]].nanmedian())
            for k in sorted(set(layers))}


def one(variant: str, seed: int, s: ha.Settings, chi0_draws: int, out_dir: Path) -> dict:
    """Every figure of the module docstring for one model and seed."""
    t0 = time.process_time()
    model = ha.model_for(VARIANTS[variant], seed, s).model
    train, probe, held = ha.data_for(seed, s)
    induction = probe.target_types.flatten() == probe.type_names.index("induction")
    n_seq = probe.tokens.shape[0]

    run = ob.one_run(model, train, probe.tokens, "all heads", s.sampler(seed=0), progress=False)
    sgld = time.process_time() - t0
    comps = run.config["components"]
    layers = heads.layers_of(comps)
    x = int(induction.numel())
    single = heads.head_table(run, None)  # per token, joint jackknife errors
    chi0 = ob.spring_susceptibility(
        model, probe.tokens, "all heads",
        replace(s.sampler(seed=0), n_chains=2, n_draws=chi0_draws, seed=100), progress=False)
    if chi0.meta["components"] != comps:
        raise ValueError(f"chi0's components {chi0.meta['components']} differ from {comps}")
    t1 = time.process_time()
    means = mean_z(model, held.tokens)
    truth = token_ablation(model, probe, means).flatten(0, 1).flatten(1)  # [X, K]
    grads = per_token_gradients(model, probe, means=means)
    types = probe.target_types.flatten()
    by_type = torch.zeros(len(probe.type_names), len(comps))
    for i, name in enumerate(probe.type_names):
        if (types == i).any() and (held.target_types == i).any():
            by_type[i] = ablation_effects(model, held, name, mode="mean")[0].flatten()
    deterministic = time.process_time() - t1
    values = {"susceptibility": (-single.susceptibility.value.T,
                                 single.susceptibility.stderr.T),
              "fluctuation": (single.fluctuation.value.T, single.fluctuation.stderr.T),
              "spring_control": (-chi0.value, chi0.stderr),
              "token_fisher": (grads["fisher"].flatten(1), None),
              "attribution_patching": (grads["patching"].flatten(1), None),
              "type_ablation": (by_type[types], None)}
    out = {"variant": variant, "seed": seed, "components": comps, "layers": layers,
           "n_tokens": x, "n_induction": int(induction.sum()),
           "n_draws": single.susceptibility.meta["n_draws"], "chi0_draws": 2 * chi0_draws,
           "truth": {"mean_abs": truth.abs().mean(0), "induction_mean": truth[induction].mean(0),
                     "share_positive": (truth > 0).double().mean(0)},
           "split_half": suscept.reliability(run)["split_half"]["spearman"]}
    saved = {"truth": truth, "types": types, "type_names": probe.type_names,
             "components": comps, "values": values, "loss": clean_loss(model, probe)}
    out["scores"], out["ceiling"] = score(saved, layers, n_seq)
    torch.save(saved, out_dir / f"tokens_{variant}_seed{seed}.pt")
    out["cpu_seconds"] = {"sgld": sgld, "chi0_and_tables": t1 - t0 - sgld,
                          "deterministic": deterministic, "all": time.process_time() - t0}
    return out


def report(runs: list[dict]) -> str:
    """Markdown: per signal and score, layer medians per seed."""
    lines = ["# Per-token attribution against per-token mean ablation", "",
             "Per head: Spearman over probe tokens (`tokens`), over induction tokens "
             "(`induction`), over sequence means (`sequences`), the top-5% overlap (`top`, "
             "chance 0.05); per induction token: Spearman across the layer's heads (`heads`). "
             "Layer medians over heads; seeds in columns. `ceiling`: the sampled signal's "
             "noise ceiling sqrt(R) per head (median).", ""]
    for r in runs:
        lines.append(f"- {r['variant']} seed {r['seed']}: {r['n_tokens']} tokens "
                     f"({r['n_induction']} induction), {r['n_draws']} draws, chi0 "
                     f"{r['chi0_draws']} draws; split-half of the heads' columns median "
                     f"{float(torch.as_tensor(r['split_half']).median()):.2f}; CPU s "
                     + ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_seconds"].items()))
    lines.append("")
    layers = sorted(set(runs[0]["layers"]))
    head = "| signal | score | " + " | ".join(f"layer {k}" for k in layers) + " |"
    lines += [head, "|" + "---|" * (2 + len(layers))]
    for name in SIGNALS:
        for score in SCORES + ("ceiling",):
            if score == "ceiling":
                if name not in runs[0]["ceiling"]:
                    continue
                cells = [[r["ceiling"][name]["layer"][k] for r in runs] for k in layers]
            elif score == "heads":
                cells = [[r["scores"][name]["heads"][k] for r in runs] for k in layers]
            elif score not in runs[0]["scores"][name]:
                continue
            else:
                cells = [[r["scores"][name][score]["layer"][k] for r in runs] for k in layers]
            lines.append(f"| {name} | {score} | " + " | ".join(
                " / ".join(f"{v:.2f}" for v in c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(r: dict, out: Path) -> str:
    """Bar chart: per signal, the per-head token Spearman against ablation (layer medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(set(r["layers"]))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(layers)
    for j, layer in enumerate(layers):
        vals = [r["scores"][n]["tokens"]["layer"][layer] for n in SIGNALS]
        ax.bar([i + j * width for i in range(len(SIGNALS))], vals, width, label=f"layer {layer}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(SIGNALS))], SIGNALS, fontsize=7,
                  rotation=15)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(ylabel="per-head Spearman over tokens\nagainst per-token ablation (median)",
           title=f"{r['variant']} seed {r['seed']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"tokens_{r['variant']}_seed{r['seed']}.png"
    fig.savefig(out / name, dpi=130)
    plt.close(fig)
    return name


def run_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options shared with :mod:`experiments.head_data`: model, seeds, sampler, output."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--variant", default="attn8", choices=sorted(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--draws", type=int, help="SGLD draws per chain (default: the "
                        "settings', as head_attribution)")
    parser.add_argument("--step-size", type=float, help="SGLD step (default: the settings'; "
                        "head_attribution runs attn8x3 at 6e-4)")
    parser.add_argument("--chi0-draws", type=int, default=40,
                        help="interpolation draws per chain of the spring control (2 chains)")
    parser.add_argument("--quick", action="store_true",
                        help="head_attribution's quick settings (use --variant attn)")
    parser.add_argument("--out", default=out)
    return parser


def settings_of(args) -> ha.Settings:
    """head_attribution's settings (quick or full) with ``--draws`` / ``--step-size``; one
    thread (the experiments run two at a time on two cores)."""
    s = ha.QUICK if args.quick else ha.Settings()
    if args.draws:
        s = replace(s, n_draws=args.draws)
    if args.step_size:
        s = replace(s, step_size=args.step_size)
    torch.set_num_threads(1)
    return s


def main(argv: list[str] | None = None) -> dict:
    parser = run_parser(__doc__, "results/head_tokens")
    parser.add_argument("--rescore", action="store_true", help="score again from the "
                        "figures.json and per-token values in --out (no sampling)")
    args = parser.parse_args(argv)
    s = settings_of(args)
    out = results_dir("", args.out)
    if args.rescore:
        return rescore(out, s)
    runs = []
    for seed in args.seeds:
        runs.append(one(args.variant, seed, s, args.chi0_draws, out))
        print(f"{args.variant} seed {seed}: " + "; ".join(
            f"{n} " + ", ".join(f"L{k} {v:+.2f}" for k, v in
                                runs[-1]["scores"][n]["tokens"]["layer"].items())
            for n in SIGNALS), flush=True)
    figures = {"runs": runs, "settings": asdict(s),
               "versions": versions(), "files": [plot(r, out) for r in runs]}
    write_results(out, figures, report(runs))
    return figures


def rescore(out: Path, s: ha.Settings) -> dict:
    """Every run of ``out/figures.json`` scored again from its saved per-token values (adds
    the clean token losses when they were not saved); rewrites figures.json and report.md."""
    figures = json.loads((out / "figures.json").read_text())
    for r in figures["runs"]:
        saved = torch.load(out / f"tokens_{r['variant']}_seed{r['seed']}.pt")
        if saved.get("loss") is None:
            saved["loss"] = clean_loss(ha.model_for(VARIANTS[r["variant"]], r["seed"], s).model,
                                       ha.data_for(r["seed"], s)[1])
        n_seq = s.n_probe  # the probe of one()
        r["layers"] = [int(v) for v in r["layers"]]
        r["scores"], r["ceiling"] = score(saved, r["layers"], n_seq)
    write_results(out, figures, report(figures["runs"]))
    return figures


if __name__ == "__main__":
    main()
