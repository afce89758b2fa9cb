"""Attributing heads to data: the head x token-type table of one SGLD run against ablation.

For each zoo model and training seed: one localized SGLD run over all heads
(:func:`observables.one_run`, with burn-in), its spring-only control (``draws="spring"``, the
``n_beta = 0`` law, seed 1), the head x token-type table of :func:`suscept.heads.head_table`
(mean susceptibility per head per token type of the zoo language, its within-layer contrast
and fluctuation, jackknife errors), the regime (:func:`suscept.regime.of_run`: ``eps *
p_max``, 2 x LLC, agreement with the control), and per-head ground truth and cheaper signals
on held-out sequences (:mod:`experiments.head_signals`): mean ablation per token type,
key-path patching (previous-token -> induction composition), attribution patching, gradient
norm, the token Fisher, attention scores (:mod:`experiments.zoo.heads`).

Roles (ground truth for clustering, :func:`experiments.head_signals.roles_of`): ``induction``,
``previous-token`` or ``other`` from the attention scores; a role shared by all heads of the
model is reported as it is.

Reported per signal (susceptibility ``-chi[C, induction]``, its z, the spring control; the
fluctuation ``(n_beta/2) mean_{x in induction} Var(l^C_x - Lbar_S(w^C))`` of the run and of
the control (on the run's n_beta scale); the token Fisher, attribution patching, gradient
norm, attention score): the within-layer Spearman against the mean-ablation effect on
induction tokens and against key-path patching; the ARI of its clusters against the roles; the
PCA route of the susceptibility and of the control; the top tokens of each head; the
split-half reliability of the run; the ground truth's own reliability over random halves of
the ablation set (:func:`experiments.head_signals.truth_reliability`); and what the loss adds
per head, the susceptibility minus its spring control (:func:`loss_added`, z with errors in
quadrature).

    python -m experiments.head_attribution [--quick] [--variants attn8 ...] [--seeds 0 1 2]
        [--draws N] [--n-beta B] [--gamma G] [--step-size E] [--thin T] [--burn-in B]
        [--combine FIGURES_JSON ...]

``--quick``: the zoo's 2-layer attention-only model (4 heads per layer), one seed, 60 draws per
chain. Full mode: 8 heads per layer (2-layer attention-only, 3-layer attention-only, 2-layer
with MLPs), trained 3000 steps, seeds 0 1 2, 400 draws per chain. Writes
``results/head_attribution/``: ``figures.json``, ``config.json``, ``report.md``,
``heatmap.png``, ``dendrogram.png``, ``ablation.png`` and ``table_{variant}_seed{s}/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore", DeprecationWarning)

import observables as ob  # noqa: E402
import suscept  # noqa: E402
from experiments import circuit_recovery, head_signals  # noqa: E402
from experiments.common import (  # noqa: E402
    results_dir,
    torch_threads,
    versions,
    write_json,
    write_results,
)
from experiments.head_signals import (  # noqa: E402
    attribution_patching,
    gradient_norm,
    key_path_patching,
    roles_of,
    token_fisher,
    truth_reliability,
)
from experiments.zoo.heads import ablation_effects, head_scores  # noqa: E402
from experiments.zoo.language import make_dataset  # noqa: E402
from experiments.zoo.train import TrainConfig, train_or_load  # noqa: E402
from suscept import heads  # noqa: E402
from suscept.estimate import Estimate  # noqa: E402

TYPES = ("other", "bigram", "induction", "bracket_open", "bracket_close")


@dataclass(frozen=True)
class Settings(circuit_recovery.Settings):
    """Circuit recovery's sampler settings (n_beta 30, gamma 300, step 1e-3, 4 chains x 400
    draws, thin 4) with a burn-in (the transient from w* biases every covariance), plus the
    ablation set, the training length and the Hessian spectrum's size (the regime)."""

    burn_in: int = 200
    n_ablation: int = 256
    train_steps: int = 3000
    n_hessian: int = 256  # training sequences for the Hessian spectrum
    n_lanczos: int = 20
    truth_splits: int = 20  # random halvings of the ablation set (ground truth's reliability)

    def sampler(self, seed: int = 0, **changes) -> suscept.SamplerConfig:
        s = dataclasses.replace(self, **changes)
        return dataclasses.replace(super().sampler(seed, **changes), burn_in=s.burn_in)


QUICK = Settings(n_draws=60, thin=2, burn_in=50, n_train=1024, n_probe=32, n_ablation=128,
                 train_steps=1500, n_hessian=64, n_lanczos=8, truth_splits=4)
# name -> (zoo architecture, overrides); quick uses the zoo's own 4-head model
QUICK_VARIANTS = {"attn": ("attn", {})}
FULL_VARIANTS = {"attn8": ("attn", {"n_heads": 8, "d_head": 8}),
                 "attn8x3": ("attn", {"n_layers": 3, "n_heads": 8, "d_head": 8}),
                 "mlp8": ("mlp", {"n_heads": 8, "d_head": 8})}


def model_for(variant: tuple[str, dict], seed: int, s: Settings):
    arch, kw = variant
    return train_or_load(arch, seed=seed, config=TrainConfig(steps=s.train_steps),
                         model_kw=kw or None)


SIGNALS = ("susceptibility", "susceptibility_z", "spring_control", "fluctuation",
           "spring_fluctuation", "token_fisher", "attribution_patching", "gradient_norm",
           "attention_score")



def data_for(seed: int, s: Settings):
    """``(train tokens, probe Dataset, held-out ablation Dataset)`` of a model's ``seed``."""
    return (make_dataset(s.n_train, seed=10_000 + seed).tokens,
            make_dataset(s.n_probe, seed=20_000 + seed),
            make_dataset(s.n_ablation, seed=60_000 + seed))


def key_path_layers(layers: list[int | None]) -> list[int | None]:
    """Each head's layer, or None in the last layer (no later keys: no key path)."""
    last = max(v for v in layers if v is not None)
    return [v if v is not None and v < last else None for v in layers]

def _profile(x: Tensor) -> Tensor:
    """``[K, T]`` per-head profiles over token types, each type z-scored across heads."""
    return (x - x.mean(0)) / x.std(0).clamp(min=1e-12)


def _clusters(vectors: dict[str, Tensor], roles: list[str]) -> tuple[dict, dict]:
    n_roles = len(set(roles))
    if n_roles < 2:
        return {}, {}
    clusters = {k: heads.cluster(v, n_roles) for k, v in vectors.items()}
    return clusters, {k: heads.adjusted_rand(c["labels"].tolist(), roles)
                      for k, c in clusters.items()}


def _sampled(model, train, probe, labels, s: Settings, draws: str):
    """One run (``draws="sgld"``, seed 0) or its spring-only control (seed 1), its table."""
    t0 = time.perf_counter()
    run = ob.one_run(model, train, probe.tokens, "all heads",
                     s.sampler(seed=0 if draws == "sgld" else 1), draws=draws, progress=False)
    seconds = time.perf_counter() - t0
    # the control's fluctuation on the run's scale (n_beta / 2) Var, so the two compare
    table = heads.head_table(run, heads.token_groups(labels, names=[
        t for t in TYPES if t in labels]), n_beta=s.sampler().n_beta)
    return run, table, suscept.susceptibility(run), seconds


def _regime(run, spring, model, train, s: Settings) -> dict:
    data = train[:s.n_hessian]
    spectrum = suscept.regime.hessian_spectrum(model, ob.lm_loss, data, n_probes=2,
                                               n_lanczos=s.n_lanczos)
    with torch.no_grad():
        anchor = float(torch.cat([ob.lm_loss(model, t) for t in train.split(512)]).mean())
    reg = suscept.regime.of_run(run, model, ob.lm_loss, data, control=spring,
                                spectrum=spectrum, anchor_loss=anchor)
    return {k: reg.as_dict()[k] for k in ("verdict", "stability", "constrained_from_llc",
                                          "constrained", "n_params", "agreement", "ceiling")}


def one(name: str, variant: tuple[str, dict], seed: int, s: Settings, out_dir) -> dict:
    t0 = time.perf_counter()
    trained = model_for(variant, seed, s)
    model = trained.model
    cfg = model.cfg
    train, probe, held = data_for(seed, s)
    labels = [probe.type_names[t] for t in probe.target_types.flatten().tolist()]
    run, table, chi, sgld_seconds = _sampled(model, train, probe, labels, s, "sgld")
    spring, spring_table, spring_chi, spring_seconds = _sampled(model, train, probe, labels, s,
                                                                "spring")
    table.save(out_dir / f"table_{name}_seed{seed}")
    comps = run.config["components"]
    layers = heads.layers_of(comps)
    types = [t for t in TYPES if t in table.groups]
    g = table.groups.index("induction")
    ablation = {t: ablation_effects(model, held, t, mode="mean")[0].flatten() for t in types}
    atp = {t: attribution_patching(model, held, t).flatten() for t in types}
    grad = {t: gradient_norm(model, held, t).flatten() for t in types}
    fisher = {t: token_fisher(model, held, t).flatten() for t in types}
    nan = torch.full((len(comps), len(types)), float("nan"))
    spring_fl = nan if spring_table.fluctuation is None else spring_table.fluctuation.value
    key_path = key_path_patching(model, held).flatten()
    scores = head_scores(model)
    attention = torch.stack([scores.prev_token[l_, h] if l_ == 0 else scores.induction[l_, h]
                             for l_, h in ((v, i % cfg.n_heads) for i, v in enumerate(layers))])
    signals = {"susceptibility": -table.susceptibility.value[:, g],
               "susceptibility_z": -table.z_zero[:, g],
               "spring_control": -spring_table.susceptibility.value[:, g],
               "fluctuation": table.fluctuation.value[:, g],
               "spring_fluctuation": spring_fl[:, g], "token_fisher": fisher["induction"],
               "attribution_patching": atp["induction"], "gradient_norm": grad["induction"],
               "attention_score": attention}
    spearman = {k: heads.within_layer_spearman(v, ablation["induction"], layers)
                for k, v in signals.items()}
    spearman_prev = {k: heads.within_layer_spearman(v, key_path, key_path_layers(layers))
                     for k, v in signals.items()}
    roles = roles_of(scores, layers, cfg.n_heads)
    stack = lambda d: _profile(torch.stack([d[t] for t in types], 1))  # noqa: E731
    clusters, ari = _clusters({"matrix": heads.head_vectors(chi),
                               "contrast": table.z_layer.nan_to_num(),
                               "spring_control": heads.head_vectors(spring_chi),
                               "fluctuation": _profile(table.fluctuation.value),
                               "spring_fluctuation": _profile(spring_fl),
                               "token_fisher": stack(fisher),
                               "attribution_patching": stack(atp),
                               "gradient_norm": stack(grad), "ablation": stack(ablation)},
                              roles)
    multi = len(set(roles)) > 1
    route = heads.pca_roles(chi, roles) if multi else None
    spring_route = heads.pca_roles(spring_chi, roles) if multi else None
    top = heads.top_data(chi, 5, labels=heads.contexts(probe.tokens))
    rel = suscept.reliability(run)
    regime = _regime(run, spring, model, train, s)
    truth = {"mean_ablation": truth_reliability(
                 lambda m, d: ablation_effects(m, d, "induction", mode="mean")[0], model, held,
                 s.truth_splits),
             "key_path": truth_reliability(key_path_patching, model, held, s.truth_splits)}
    out = {"variant": name, "seed": seed, "components": comps, "layers": layers,
           "roles": roles, "loss_by_type": trained.final_loss_by_type(),
           "induction_score": scores.induction.tolist(),
           "prev_token_score": scores.prev_token.tolist(),
           "table": {"groups": table.groups, "n_tokens": table.n_tokens,
                     "chi": table.susceptibility.value, "chi_se": table.susceptibility.stderr,
                     "contrast": table.contrast.value, "contrast_se": table.contrast.stderr,
                     "fluctuation": table.fluctuation.value,
                     "fluctuation_se": table.fluctuation.stderr},
           "spring_table": {"chi": spring_table.susceptibility.value,
                            "chi_se": spring_table.susceptibility.stderr,
                            "fluctuation": spring_fl,
                            "fluctuation_se": nan if spring_table.fluctuation is None else
                            spring_table.fluctuation.stderr},
           "markdown": table.markdown("susceptibility"),
           "markdown_contrast": table.markdown("contrast"),
           "ablation": ablation, "attribution_patching": atp, "gradient_norm": grad,
           "token_fisher": fisher, "truth_reliability": truth,
           "key_path": key_path, "attention_score": attention, "signals": signals,
           "within_layer_spearman": spearman, "prev_token_spearman": spearman_prev,
           "ari": ari, "linkage": {k: v["linkage"] for k, v in clusters.items()},
           "cluster_labels": {k: v["labels"] for k, v in clusters.items()},
           "pca_best": route["best"] if route else None,
           "pca_explained": route["explained"] if route else None,
           "spring_pca_best": spring_route["best"] if spring_route else None,
           "top_tokens": {c: top[c] for c in comps},
           "split_half_spearman": rel["split_half"]["spearman"],
           "spring_split_half_spearman":
               suscept.reliability(spring)["split_half"]["spearman"],
           "loss_rise": rel.get("loss_rise"), "phi_iat": rel.get("phi_iat"), "regime": regime,
           "sgld_seconds": sgld_seconds, "spring_seconds": spring_seconds,
           "seconds": time.perf_counter() - t0}
    sp = spearman["susceptibility"]
    print(f"  {name} seed {seed}: within-layer Spearman (susceptibility vs mean ablation, "
          f"induction tokens) {[round(v, 2) for v in sp.values()]}; ARI {ari}; split-half "
          f"{float(rel['split_half']['spearman'].mean()):.2f}; SGLD {sgld_seconds:.0f} s, "
          f"all {out['seconds']:.0f} s", flush=True)
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
            hierarchy.dendrogram(torch.as_tensor(first["linkage"][key]).double().numpy(), ax=ax,
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


LOSS_ADDED = "susceptibility minus spring control"
ARI_KEY = {"susceptibility": "matrix", "susceptibility_z": "contrast",
           "spring_control": "spring_control", "fluctuation": "fluctuation",
           "spring_fluctuation": "spring_fluctuation", "token_fisher": "token_fisher",
           "attribution_patching": "attribution_patching", "gradient_norm": "gradient_norm"}


def _fmt(d: dict) -> str:
    vals = [f"{v:.2f}" for v in d.values() if v == v]
    return "[" + ", ".join(vals) + "]" if vals else "n/a"


def _route(best: dict | None) -> str:
    return ", ".join(f"{k} PC{v[0]} {v[1]:.2f}" for k, v in best.items()) if best else "n/a"


def _worst(values) -> float:
    vals = [v for v in values if v == v]
    return min(vals) if vals else float("nan")


def _estimate(t: dict) -> Estimate:
    return Estimate(torch.as_tensor(t["chi"]).double(), torch.as_tensor(t["chi_se"]).double(),
                    ("component", "group"), "head_table", "mean chi over the group")


def _truth_line(r: dict, settings: dict) -> str:
    """The ground truth's own reproducibility, the fluctuation's agreements, and its size
    against its first-order spring-only value ``(n_beta/2) s^2 token_fisher`` (``s^2`` the
    spring-only variance per parameter, :func:`suscept.spring.stationary`)."""
    t = r.get("truth_reliability")
    if not t:
        return "Ground truth's reliability: not in these figures."
    cfg = suscept.SamplerConfig(step_size=settings["step_size"], n_beta=settings["n_beta"],
                                gamma=settings["gamma"],
                                weight_decay=settings.get("weight_decay", 0.0))
    s2 = float(suscept.spring.stationary(cfg, torch.zeros(1))[1] ** 2)
    ratio = (torch.as_tensor(r["signals"]["fluctuation"]).double()
             / (settings["n_beta"] / 2 * s2 * torch.as_tensor(r["signals"]["token_fisher"])))
    sig = {k: torch.as_tensor(v) for k, v in r["signals"].items()}
    parts = [f"{name} {_fmt({k: v['ceiling'] for k, v in t[name].items()})}"
             for name in ("mean_ablation", "key_path")]
    return ("Ground truth's own reliability (random halves of the ablation set, Spearman-Brown; "
            "the ceiling sqrt(R) bounds any signal's within-layer Spearman against it), per "
            "layer: " + "; ".join(parts) + ". Within-layer Spearman of the fluctuation "
            "against the spring control's fluctuation " + _fmt(heads.within_layer_spearman(
                sig["fluctuation"], sig["spring_fluctuation"], r["layers"]))
            + ", against the token Fisher " + _fmt(heads.within_layer_spearman(
                sig["fluctuation"], sig["token_fisher"], r["layers"])) + ". Fluctuation over "
            f"(n_beta/2) s^2 token Fisher (s^2 = {s2:.3g}): median {float(ratio.median()):.2f}"
            f" over heads, range {float(ratio.min()):.2f}-{float(ratio.max()):.2f}.")


def loss_added(r: dict) -> dict:
    """What the loss adds per head: ``-(chi - chi_spring)[head, induction]`` (positive: the
    loss makes the head express induction tokens more than the spring alone does;
    :func:`suscept.heads.against_control`), ``[K]``, its se (NaN for figures without the
    control's table), z, and its within-layer Spearman against mean ablation and key-path
    patching, as for the other signals."""
    g = r["table"]["groups"].index("induction")
    if "spring_table" in r:
        d = heads.against_control(_estimate(r["table"]), _estimate(r["spring_table"]))
        value, se = -d.value[:, g], d.stderr[:, g]
    else:
        value = (torch.as_tensor(r["signals"]["susceptibility"]).double()
                 - torch.as_tensor(r["signals"]["spring_control"]).double())
        se = torch.full_like(value, float("nan"))
    prev = key_path_layers(r["layers"])
    return {"value": value, "se": se, "z": value / se,
            "vs_ablation": heads.within_layer_spearman(
                value, torch.as_tensor(r["ablation"]["induction"]), r["layers"]),
            "vs_key_path": heads.within_layer_spearman(
                value, torch.as_tensor(r["key_path"]), prev)}


def comparison(r: dict) -> list[str]:
    """Markdown rows: one per signal, within-layer Spearman against mean ablation (induction
    tokens, per layer), against key-path patching (per layer with later keys), ARI; last the
    loss's share, susceptibility minus its spring control (:func:`loss_added`)."""
    lines = ["| signal | Spearman vs mean ablation, per layer | Spearman vs key-path patching, "
             "per layer | ARI of its clusters vs roles |", "|---|---|---|---|"]
    for k in SIGNALS:
        ari = r["ari"].get(ARI_KEY.get(k, ""), float("nan"))
        ari = "circular (roles come from it)" if k == "attention_score" else f"{ari:.2f}"
        lines.append(f"| {k} | {_fmt(r['within_layer_spearman'].get(k, {}))} | "
                     f"{_fmt(r['prev_token_spearman'].get(k, {}))} | {ari} |")
    added = loss_added(r)
    lines.append(f"| {LOSS_ADDED} | {_fmt(added['vs_ablation'])} | "
                 f"{_fmt(added['vs_key_path'])} | - |")
    if "ablation" in r["ari"]:
        lines.append(f"| (mean-ablation profiles) | 1 | - | {r['ari']['ablation']:.2f} |")
    return lines


def top_share(r: dict, n_probe: int) -> dict[str, float]:
    """Per role, the share of its heads' top tokens (most negative chi) that are induction
    tokens (the data-attribution check), and the probe's base rate under ``"all tokens"``."""
    kinds = make_dataset(n_probe, seed=20_000 + r["seed"])
    types = kinds.target_types.flatten()
    ind = kinds.type_names.index("induction")
    out = {}
    for role in dict.fromkeys(r["roles"]):
        idx = [x["index"] for c, rl in zip(r["components"], r["roles"]) if rl == role
               for x in r["top_tokens"][c]]
        out[role] = float((types[idx] == ind).double().mean())
    out["all tokens"] = float((types == ind).double().mean())
    return out


def _added_line(r: dict) -> str:
    a = loss_added(r)
    z = a["z"]
    has_se = not z.isnan().all()
    heads_z = ", ".join(f"{c} {v:.2g}" + (f" (z {zz:+.1f})" if has_se else "") for c, v, zz in
                        zip(r["components"], a["value"].tolist(), z.tolist()))
    count = (f"|z| > 2 on {int((z.abs() > 2).sum())} of {len(z)} heads" if has_se
             else "no se: these figures lack the control's table")
    return (f"Susceptibility minus spring control, -(chi - chi_spring)[head, induction] "
            f"(z, errors in quadrature): {count}; {heads_z}.")


def report(figures: dict, files: list[str]) -> str:
    s = figures["settings"]
    lines = ["# Attributing heads to data", "",
             f"Sampler: n_beta {s['n_beta']:g}, gamma {s['gamma']:g}, step size "
             f"{s['step_size']:g}, {s['n_chains']} chains x {s['n_draws']} draws (thin "
             f"{s['thin']}, burn-in {s['burn_in']}); spring-only control with the same draws; "
             f"probe {s['n_probe']} sequences; ablation on {s['n_ablation']} held-out sequences.",
             "", "Targets (every seed): within-layer Spearman >= 0.8 in every layer (against "
             "mean ablation on induction tokens; against key-path patching for the "
             "previous-token layer), ARI >= 0.8.", "",
             "## Worst seed per model (min over seeds and layers)", "",
             "| variant | seeds | signal | vs mean ablation | vs key-path patching | ARI |",
             "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in figures["runs"]):
        runs = [r for r in figures["runs"] if r["variant"] == name]
        for k in SIGNALS:
            sp = _worst(v for r in runs for v in r["within_layer_spearman"].get(k, {}).values())
            pp = _worst(v for r in runs for v in r["prev_token_spearman"].get(k, {}).values())
            ari = _worst(r["ari"].get(ARI_KEY.get(k, ""), float("nan")) for r in runs)
            lines.append(f"| {name} | {[r['seed'] for r in runs]} | {k} | {sp:.2f} | {pp:.2f} "
                         f"| {ari:.2f} |")
        added = [loss_added(r) for r in runs]
        sp = _worst(v for a in added for v in a["vs_ablation"].values())
        pp = _worst(v for a in added for v in a["vs_key_path"].values())
        lines.append(f"| {name} | {[r['seed'] for r in runs]} | {LOSS_ADDED} | {sp:.2f} | "
                     f"{pp:.2f} | - |")
    for r in figures["runs"]:
        counts = {k: r["roles"].count(k) for k in sorted(set(r["roles"]))}
        rel = torch.as_tensor(r["split_half_spearman"])
        srel = torch.as_tensor(r["spring_split_half_spearman"])
        reg = r["regime"]
        lines += ["", f"## {r['variant']} seed {r['seed']}", "",
                  f"Induction-token loss {r['loss_by_type']['induction']:.3f} (bigram "
                  f"{r['loss_by_type']['bigram']:.3f}); max induction score per layer "
                  f"{[round(max(v), 2) for v in r['induction_score']]}, max previous-token "
                  f"score {[round(max(v), 2) for v in r['prev_token_score']]}; roles {counts}; "
                  "split-half Spearman "
                  f"of the susceptibility per head mean {float(rel.mean()):.2f} (min "
                  f"{float(rel.min()):.2f}), of the spring control {float(srel.mean()):.2f}; "
                  f"loss rise {r['loss_rise'] or float('nan'):.3f}; regime {reg['verdict']}, "
                  f"eps*p_max {reg['stability'] or float('nan'):.3g}, 2 x LLC "
                  f"{reg['constrained_from_llc'] or float('nan'):.3g} of {reg['n_params']} "
                  f"parameters, agreement with the spring control "
                  f"{(reg['agreement'] or float('nan')):.3f} (ceiling "
                  f"{(reg['ceiling'] or float('nan')):.3f}); SGLD {r['sgld_seconds']:.0f} s, "
                  f"spring {r['spring_seconds']:.0f} s.", "", *comparison(r), "",
                  "Within-layer Spearman of the susceptibility against the spring control "
                  "(same signal, n_beta = 0): " + _fmt(heads.within_layer_spearman(
                      torch.as_tensor(r["signals"]["susceptibility"]),
                      torch.as_tensor(r["signals"]["spring_control"]), r["layers"])) + ". "
                  "Share of induction tokens among each role's top-5 tokens: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in top_share(r, s["n_probe"]).items())
                  + ".", "", _truth_line(r, s), "", _added_line(r), "",
                  "PCA route (per role, the PC whose loadings separate it best, from PC0, "
                  f"and their AUROC): susceptibility {_route(r['pca_best'])}; spring control "
                  f"{_route(r['spring_pca_best'])}."]
    first = figures["runs"][0]
    lines += ["", f"## Head x token-type table ({first['variant']} seed {first['seed']})", "",
              "Mean chi ± jackknife se (z against zero); chi < 0: the tokens lower the head's "
              "loss.", "", first["markdown"], "", "Within-layer contrast (chi minus the "
              "layer's mean):", "", first["markdown_contrast"], "",
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
    parser.add_argument("--n-beta", type=float, default=None)
    parser.add_argument("--gamma", type=float, default=None)
    parser.add_argument("--step-size", type=float, default=None)
    parser.add_argument("--thin", type=int, default=None, help="SGLD steps per draw")
    parser.add_argument("--burn-in", type=int, default=None, help="SGLD steps before draw 1")
    parser.add_argument("--out", default="results")
    parser.add_argument("--combine", nargs="+", default=None, metavar="FIGURES_JSON",
                        help="no runs: one report and plots from the runs of these figures.json")
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    with torch_threads(args.threads):
        return run_all(args)


def _backfill(r: dict) -> dict:
    """Figures made before the fluctuation was a signal: its within-layer Spearman from the
    stored table (the run's only; the control's fluctuation was not stored then)."""
    if "fluctuation" in r["signals"] or "fluctuation" not in r["table"]:
        return r
    g = r["table"]["groups"].index("induction")
    value = torch.as_tensor(r["table"]["fluctuation"])[:, g]
    prev = key_path_layers(r["layers"])
    r["signals"]["fluctuation"] = value.tolist()
    r["within_layer_spearman"]["fluctuation"] = heads.within_layer_spearman(
        value, torch.as_tensor(r["ablation"]["induction"]), r["layers"])
    r["prev_token_spearman"]["fluctuation"] = heads.within_layer_spearman(
        value, torch.as_tensor(r["key_path"]), prev)
    return r


def combine(paths: list[str], root: str) -> dict:
    """The report and plots of the runs in several ``figures.json`` (e.g. one per seed, run
    as separate processes); their settings must agree."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if any(p["settings"] != parts[0]["settings"] for p in parts):
        raise SystemExit("--combine: the figures.json were made with different settings")
    figures = {"settings": parts[0]["settings"],
               "runs": [_backfill(r) for p in parts for r in p["runs"]], "combined_from": paths}
    out = results_dir("head_attribution", root)
    write_results(out, figures, report(figures, plots(figures, out)))
    return figures


def run_all(args) -> dict:
    s = QUICK if args.quick else Settings()
    for key, value in (("n_draws", args.draws), ("n_beta", args.n_beta),
                       ("gamma", args.gamma), ("step_size", args.step_size),
                       ("thin", args.thin), ("burn_in", args.burn_in)):
        if value:
            s = dataclasses.replace(s, **{key: value})
    variants = QUICK_VARIANTS if args.quick else {
        k: FULL_VARIANTS[k] for k in (args.variants or FULL_VARIANTS)}
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = results_dir("head_attribution", args.out)
    write_json(out / "config.json", {"settings": dataclasses.asdict(s), "seeds": seeds,
                                     "variants": variants, "quick": args.quick,
                                     "role_score": head_signals.ROLE_SCORE, "versions": versions()})
    figures = {"settings": dataclasses.asdict(s), "runs": []}
    for name, variant in variants.items():
        for seed in seeds:
            figures["runs"].append(one(name, variant, seed, s, out))
    files = plots(figures, out)
    write_results(out, figures, report(figures, files))
    return figures


if __name__ == "__main__":
    main()
