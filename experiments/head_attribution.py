"""Attributing heads to data: the head x token-type table of one SGLD run against ablation.

For each zoo model and training seed: one localized SGLD run over all heads
(:func:`observables.one_run`), the head x token-type table of :func:`suscept.heads.head_table`
(mean susceptibility per head per token type of the zoo language, its within-layer contrast
and fluctuation, jackknife errors), and independent per-head ground truth on held-out
sequences of the language:

- mean-ablation effect of each head per token type (loss increase when the head's ``hook_z``
  is replaced by its mean over batch and positions);
- attention scores (previous-token, induction; :mod:`experiments.zoo.heads`);
- a cheaper signal a researcher would try first: attribution patching at w*, the first-order
  estimate of the mean-ablation effect, ``sum_{b,p} (mean_z - z) . dL/dz`` for the head's
  ``z`` (``L`` the mean loss on the token type's tokens).

Roles (ground truth for clustering): a head is ``induction`` when its induction score is at
least ``ROLE_SCORE`` (layer >= 1), else ``previous-token`` when its previous-token score is,
else ``other``; a role shared by all heads of the model is reported as it is.

Reported: the within-layer Spearman of each head's attribution to induction tokens
(``-chi[C, induction]``; within a layer the contrast gives the same ranks) against its
mean-ablation effect on them (and the same for the attention scores and attribution patching);
clusters of the standardized matrix and of the contrast z-scores against the roles (adjusted
Rand index); the PCA route (which PC separates which role); the top tokens of each head; the
split-half reliability of the run.

    python -m experiments.head_attribution [--quick] [--seeds 0 1 2] [--draws N]

``--quick``: the zoo's 2-layer attention-only model (4 heads per layer), one seed, 60 draws per
chain. Full mode: 8 heads per layer (2-layer attention-only, 3-layer attention-only, 2-layer
with MLPs), trained 3000 steps, seeds 0 1 2, 400 draws per chain. Writes
``results/head_attribution/``: ``figures.json``, ``config.json``, ``report.md``,
``heatmap.png``, ``dendrogram.png``, ``ablation.png`` and ``table_{variant}_seed{s}/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore", DeprecationWarning)

import observables as ob  # noqa: E402
import suscept  # noqa: E402
from experiments import circuit_recovery  # noqa: E402
from experiments.common import (  # noqa: E402
    results_dir,
    torch_threads,
    versions,
    write_json,
    write_results,
)
from experiments.zoo.heads import ablation_effects, head_scores, z_name  # noqa: E402
from experiments.zoo.language import Dataset, make_dataset  # noqa: E402
from experiments.zoo.train import TrainConfig, train_or_load  # noqa: E402
from suscept import heads  # noqa: E402

ROLE_SCORE = 0.3
TYPES = ("other", "bigram", "induction", "bracket_open", "bracket_close")


@dataclass(frozen=True)
class Settings(circuit_recovery.Settings):
    """Circuit recovery's sampler settings (n_beta 30, gamma 300, step 1e-3, 4 chains x 400
    draws, thin 4), plus the ablation set and the training length."""

    n_ablation: int = 256
    train_steps: int = 3000


QUICK = Settings(n_draws=60, thin=2, n_train=1024, n_probe=32, n_ablation=128,
                 train_steps=1500)
# name -> (zoo architecture, overrides); quick uses the zoo's own 4-head model
QUICK_VARIANTS = {"attn": ("attn", {})}
FULL_VARIANTS = {"attn8": ("attn", {"n_heads": 8, "d_head": 8}),
                 "attn8x3": ("attn", {"n_layers": 3, "n_heads": 8, "d_head": 8}),
                 "mlp8": ("mlp", {"n_heads": 8, "d_head": 8})}


def model_for(variant: tuple[str, dict], seed: int, s: Settings):
    arch, kw = variant
    return train_or_load(arch, seed=seed, config=TrainConfig(steps=s.train_steps),
                         model_kw=kw or None)


@torch.no_grad()
def _mean_z(model: nn.Module, tokens: Tensor) -> dict[str, Tensor]:
    names = {z_name(layer) for layer in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n].mean(dim=(0, 1)) for n in names}


def attribution_patching(model: nn.Module, data: Dataset, type_name: str) -> Tensor:
    """``[n_layers, n_heads]`` first-order estimate of the mean-ablation loss increase on the
    tokens of ``type_name``: ``sum_{b,p} (mean_z - z) . dL/dz`` (no parameter gradients are
    written; hooks only inside the call)."""
    means = _mean_z(model, data.tokens)
    mask = data.target_types == data.type_names.index(type_name)
    saved: dict[str, Tensor] = {}

    def keep(z, hook):
        saved[hook.name] = z
        return z

    hooks = [(z_name(layer), keep) for layer in range(model.cfg.n_layers)]
    logits = model.run_with_hooks(data.tokens, fwd_hooks=hooks)
    loss = ob.token_losses(logits, data.tokens)[mask].mean()
    names = [z_name(layer) for layer in range(model.cfg.n_layers)]
    zs = [saved.get(n) for n in names]
    if any(z is None for z in zs):  # a TransformerBridge names its hook_z by an alias
        zs = list(saved.values())
    grads = torch.autograd.grad(loss, zs)
    return torch.stack([((means[n] - z.detach()) * g).sum(dim=(0, 1, 3))
                        for n, z, g in zip(names, zs, grads)]).detach()


def roles_of(scores, layers: list[int], n_heads: int) -> list[str]:
    out = []
    for i, layer in enumerate(layers):
        h = i % n_heads
        if layer >= 1 and float(scores.induction[layer, h]) >= ROLE_SCORE:
            out.append("induction")
        elif float(scores.prev_token[layer, h]) >= ROLE_SCORE:
            out.append("previous-token")
        else:
            out.append("other")
    return out


def one(name: str, variant: tuple[str, dict], seed: int, s: Settings, out_dir) -> dict:
    t0 = time.perf_counter()
    trained = model_for(variant, seed, s)
    model = trained.model
    cfg = model.cfg
    train = make_dataset(s.n_train, seed=10_000 + seed).tokens
    probe = make_dataset(s.n_probe, seed=20_000 + seed)
    held = make_dataset(s.n_ablation, seed=60_000 + seed)
    t1 = time.perf_counter()
    run = ob.one_run(model, train, probe.tokens, "all heads", s.sampler(), progress=False)
    sgld_seconds = time.perf_counter() - t1
    comps = run.config["components"]
    layers = heads.layers_of(comps)
    labels = [probe.type_names[t] for t in probe.target_types.flatten().tolist()]
    table = heads.head_table(run, heads.token_groups(labels, names=[
        t for t in TYPES if t in labels]))
    table.save(out_dir / f"table_{name}_seed{seed}")
    chi = suscept.susceptibility(run)
    types = [t for t in TYPES if t in table.groups]
    ablation = {t: ablation_effects(model, held, t, mode="mean")[0].flatten() for t in types}
    atp = {t: attribution_patching(model, held, t).flatten() for t in ("induction", "bigram")}
    scores = head_scores(model)
    attention = torch.stack([scores.prev_token[l_, h] if l_ == 0 else scores.induction[l_, h]
                             for l_, h in ((v, i % cfg.n_heads) for i, v in enumerate(layers))])
    g = table.groups.index("induction")
    signals = {"susceptibility": -table.susceptibility.value[:, g],
               "susceptibility_z": -table.z_zero[:, g],
               "attribution_patching": atp["induction"], "attention_score": attention}
    spearman = {k: heads.within_layer_spearman(v, ablation["induction"], layers)
                for k, v in signals.items()}
    roles = roles_of(scores, layers, cfg.n_heads)
    n_roles = len(set(roles))
    clusters, ari = {}, {}
    if n_roles > 1:
        for key, vec in (("matrix", heads.head_vectors(chi)),
                         ("contrast", table.z_layer.nan_to_num())):
            clusters[key] = heads.cluster(vec, n_roles)
            ari[key] = heads.adjusted_rand(clusters[key]["labels"].tolist(), roles)
    route = heads.pca_roles(chi, roles) if n_roles > 1 else None
    top = heads.top_data(chi, 5, labels=heads.contexts(probe.tokens))
    rel = suscept.reliability(run)
    out = {"variant": name, "seed": seed, "components": comps, "layers": layers,
           "roles": roles, "loss_by_type": trained.final_loss_by_type(),
           "table": {"groups": table.groups, "n_tokens": table.n_tokens,
                     "chi": table.susceptibility.value, "chi_se": table.susceptibility.stderr,
                     "contrast": table.contrast.value, "contrast_se": table.contrast.stderr,
                     "fluctuation": table.fluctuation.value,
                     "fluctuation_se": table.fluctuation.stderr},
           "markdown": table.markdown("susceptibility"),
           "markdown_contrast": table.markdown("contrast"),
           "ablation": ablation, "attribution_patching": atp, "attention_score": attention,
           "within_layer_spearman": spearman, "ari": ari,
           "linkage": {k: v["linkage"] for k, v in clusters.items()},
           "cluster_labels": {k: v["labels"] for k, v in clusters.items()},
           "pca_best": route["best"] if route else None,
           "pca_explained": route["explained"] if route else None,
           "top_tokens": {c: top[c] for c in comps},
           "split_half_spearman": rel["split_half"]["spearman"],
           "loss_rise": rel.get("loss_rise"), "phi_iat": rel.get("phi_iat"),
           "sgld_seconds": sgld_seconds, "seconds": time.perf_counter() - t0}
    sp = spearman["susceptibility"]
    print(f"  {name} seed {seed}: within-layer Spearman (susceptibility vs mean ablation, "
          f"induction tokens) {[round(v, 2) for v in sp.values()]}; ARI {ari}; split-half "
          f"{float(rel['split_half']['spearman'].mean()):.2f}; SGLD {sgld_seconds:.0f} s",
          flush=True)
    return out


def plots(figures: dict, out) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster import hierarchy

    first = figures["runs"][0]
    t = first["table"]
    comps, groups = first["components"], t["groups"]
    z = (torch.as_tensor(t["contrast"]) / torch.as_tensor(t["contrast_se"])).nan_to_num()
    fig, ax = plt.subplots(figsize=(1.3 * len(groups) + 2, 0.35 * len(comps) + 1.5))
    lim = float(z.abs().max().clamp(min=1))
    im = ax.imshow(z.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(comps)):
        for j in range(len(groups)):
            stars = "**" if abs(z[i, j]) > 3 else "*" if abs(z[i, j]) > 2 else ""
            ax.text(j, i, f"{t['contrast'][i][j]:.2g}{stars}", ha="center", va="center",
                    fontsize=6)
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={n})" for g, n in zip(groups, t["n_tokens"])],
                  fontsize=7)
    ax.set_yticks(range(len(comps)), [f"{c} ({r})" for c, r in zip(comps, first["roles"])],
                  fontsize=7)
    ax.set_title(f"{first['variant']} seed {first['seed']}: chi minus layer mean "
                 "(colour: z; * |z|>2, ** |z|>3)", fontsize=8)
    fig.colorbar(im, ax=ax, label="z against the layer mean")
    fig.tight_layout()
    fig.savefig(out / "heatmap.png", dpi=130)
    plt.close(fig)
    files = ["heatmap.png"]
    if "matrix" in first["linkage"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, key in zip(axes, ("matrix", "contrast")):
            hierarchy.dendrogram(torch.as_tensor(first["linkage"][key]).numpy(), ax=ax,
                                 labels=[f"{c}:{r[:4]}" for c, r in zip(comps, first["roles"])],
                                 leaf_font_size=7)
            ax.set_title(f"clusters of the {key} (ARI {first['ari'][key]:.2f})", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "dendrogram.png", dpi=130)
        plt.close(fig)
        files.append("dendrogram.png")
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    layers = first["layers"]
    abl = torch.as_tensor(first["ablation"]["induction"])
    sus = -torch.as_tensor(t["chi"])[:, groups.index("induction")]
    for layer in sorted(set(layers)):
        idx = [i for i, v in enumerate(layers) if v == layer]
        ax.scatter(abl[idx].numpy(), sus[idx].numpy(), label=f"layer {layer}")
    ax.set(xlabel="mean-ablation loss increase on induction tokens",
           ylabel="-chi[head, induction]", title="attribution vs ablation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=130)
    plt.close(fig)
    return files + ["ablation.png"]


def report(figures: dict, files: list[str]) -> str:
    s = figures["settings"]
    lines = ["# Attributing heads to data", "",
             f"Regime: n_beta {s['n_beta']:g}, gamma {s['gamma']:g}, step size "
             f"{s['step_size']:g}, {s['n_chains']} chains x {s['n_draws']} draws (thin "
             f"{s['thin']}); probe {s['n_probe']} sequences; ablation on {s['n_ablation']} "
             "held-out sequences.", "",
             "| variant | seed | within-layer Spearman vs mean ablation (induction tokens), "
             "per layer: susceptibility / its z / attribution patching / attention score | "
             "ARI matrix / contrast | roles | split-half Spearman (mean) | loss rise | SGLD s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in figures["runs"]:
        sp = r["within_layer_spearman"]
        cell = " / ".join("[" + ", ".join(f"{v:.2f}" for v in sp[k].values()) + "]"
                          for k in ("susceptibility", "susceptibility_z",
                                    "attribution_patching", "attention_score"))
        ari = " / ".join(f"{r['ari'][k]:.2f}" for k in ("matrix", "contrast")) \
            if r["ari"] else "one role only"
        counts = {k: r["roles"].count(k) for k in sorted(set(r["roles"]))}
        rel = float(torch.as_tensor(r["split_half_spearman"]).mean())
        lines.append(f"| {r['variant']} | {r['seed']} | {cell} | {ari} | {counts} | {rel:.2f} "
                     f"| {r['loss_rise'] or float('nan'):.3f} | {r['sgld_seconds']:.0f} |")
    lines += ["", "Targets (every seed): within-layer Spearman >= 0.8 in every layer, ARI >= 0.8.",
              "", "| variant | seeds | min within-layer Spearman (susceptibility) | min ARI "
              "(matrix / contrast) |", "|---|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in figures["runs"]):
        runs = [r for r in figures["runs"] if r["variant"] == name]
        sp = min(v for r in runs for v in r["within_layer_spearman"]["susceptibility"].values())
        ari = " / ".join(f"{min(r['ari'][k] for r in runs if r['ari']):.2f}"
                         for k in ("matrix", "contrast")) if all(r["ari"] for r in runs) \
            else "n/a (one role)"
        lines.append(f"| {name} | {[r['seed'] for r in runs]} | {sp:.2f} | {ari} |")
    first = figures["runs"][0]
    lines += ["", f"Head x token-type table ({first['variant']} seed {first['seed']}): mean "
              "chi ± jackknife se (z against zero); chi < 0: the tokens lower the head's loss.",
              "", first["markdown"], "", "Within-layer contrast (chi minus the layer's mean):",
              "", first["markdown_contrast"], "", f"PCA route: best PC per role "
              f"{first['pca_best']} (index from 0, loadings AUROC)", "",
              "Top tokens (most negative chi) of each head:", ""]
    for c, rows in first["top_tokens"].items():
        lines.append(f"- {c}: " + "; ".join(f"`{x['label']}` {x['value']:.3g} (z {x['z']:.1f})"
                                            for x in rows[:3]))
    lines += ["", "Plots: " + ", ".join(files), "", f"Settings: {s}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one 4-head model, few draws (CI)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"full-mode variants, from {sorted(FULL_VARIANTS)}")
    parser.add_argument("--draws", type=int, default=None, help="draws per chain")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return run_all(args)


def run_all(args) -> dict:
    s = QUICK if args.quick else Settings()
    if args.draws:
        s = dataclasses.replace(s, n_draws=args.draws)
    variants = QUICK_VARIANTS if args.quick else {
        k: FULL_VARIANTS[k] for k in (args.variants or FULL_VARIANTS)}
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = results_dir("head_attribution", args.out)
    write_json(out / "config.json", {"settings": dataclasses.asdict(s), "seeds": seeds,
                                     "variants": variants, "quick": args.quick,
                                     "role_score": ROLE_SCORE, "versions": versions()})
    figures = {"settings": dataclasses.asdict(s), "runs": []}
    for name, variant in variants.items():
        for seed in seeds:
            figures["runs"].append(one(name, variant, seed, s, out))
    files = plots(figures, out)
    write_results(out, figures, report(figures, files))
    return figures


if __name__ == "__main__":
    main()
