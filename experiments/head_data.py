"""Which training data does a head's loss depend on? The susceptibility against fine-tuning.

:mod:`experiments.head_tokens` showed that a head's susceptibility column does not say which
tokens *need* the head (ablation's question). The question the susceptibility is about is the
other direction: if the model trains more on some data, how does head C's loss move? This
experiment measures that directly, by fine-tuning, and sets the predictions against it.

**Ground truth.** For each data group ``g`` (one per probe sequence, and one per token type)
the weights ``W[x, g] = 1/|g|`` on the group's probe tokens minus ``1/X`` on every probe
token (weight shifted from the probe's mean to the group). From w*, ``K`` steps of full-batch
gradient descent (learning rate ``lr``) on

    L_anchor(w) + a sum_x W[x, g] l_x(w)

(``L_anchor``: the mean loss of ``n_anchor`` training sequences, which holds the model near
its training optimum) give weights ``w_{+a}``; the same with ``-a`` gives ``w_{-a}``. The
response of each head's restricted probe loss, per unit of ``a``, is the central difference

    Delta[g, C] = (phi_C(w_{+a}) - phi_C(w_{-a})) / 2a,   phi_C(w) = Lbar_S(w^C) - Lbar_S(w*)

(``w^C``: head C's weights from ``w``, all others from w*; > 0: training more on ``g`` raises
C's loss; the central difference cancels the even orders in ``a``, so this is the derivative
up to ``O(a^2)``, checked against ``a / 2`` on the type groups: ``ratio`` 1 when linear).
Two lengths from one trajectory: ``lr K = n_beta / gamma`` (the localization's matched
length: the posterior mean of the re-weighted loss moves like gradient descent stopped
there, a ridge of strength ``gamma / n_beta``) and 10 times longer. Deterministic: the ground
truth has no sampling noise.

**Predictions** ``[g, C]``, all oriented as ``Delta`` (> 0 raises C's loss):

- ``cross``: the cross susceptibility's group mean ``-Cov(phi_C, sum_x W[x, g] l_x(w))``
  (:func:`suscept.heads.cross_table`), ``1/beta`` times the exact derivative of the
  posterior's ``E[phi_C]`` in ``a``: the estimand this ground truth tests;
- ``restricted``: the restricted susceptibility's (``l^C_x`` for ``l_x``,
  :func:`suscept.heads.head_table`), the one-run matrix of the rest of the toolkit;
- ``spring_control``: the restricted spring-only ``chi0`` (interpolation estimator, seed 100),
  the regime control: what the geometry of the localization alone predicts;
- ``gradient_dot``: ``-grad_C Lbar_S(w*) . grad_C f_g(w*)``, ``f_g = sum_x W[x, g] l_x``,
  the first-order change of ``phi_C`` under a short gradient step on ``f_g`` (exact for
  ``K -> 0``; no sampling; one backward pass per group);
- ``unrolled``: the same gradient descent linearized at w* (:func:`unrolled`; ``H`` of
  ``L_anchor`` at w*, ``K`` Hessian-vector products per head): the classical first order
  with the fine-tuning's own horizon, between ``gradient_dot`` (``K -> 0``) and the influence
  function (``K -> inf``);
- ``ablation``: the heuristic "training on data a head helps improves that head", minus the
  group mean of each token's own mean-ablation effect
  (:func:`experiments.head_signals.token_ablation`, held-out means), centred like ``W``.

**Scores** per layer, for each fine-tuning length:

- ``sequences``: per head, Spearman over the probe sequences between prediction and
  ``Delta`` (which data a head depends on; median over the layer's heads);
- ``heads``: per sequence, Spearman across the layer's heads (which heads a sequence moves;
  mean over sequences);
- ``types``: per token type, Spearman across the layer's heads (mean over types);
- ``pearson``: Pearson over all (sequence, head) cells of the layer (scale-free agreement
  including signs).

The sampled predictions' noise ceiling per head is ``sqrt(1 - mean se^2 / Var)`` over the
sequences (as :mod:`experiments.head_tokens`). Regime: ``eps * p_max`` from the Hessian
spectrum at w*, the LLC of the run, and each head's Spearman between the restricted
prediction and its spring-only control.

    python -m experiments.head_data --variant attn8 [--seeds 0 1 2] [--draws 400]
        [--chi0-draws 60] [--quick] [--out results/head_data]
        [--rescore]      # analyses again from the saved values, no sampling or fine-tuning
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import observables as ob  # noqa: E402
import suscept  # noqa: E402
from experiments import head_attribution as ha  # noqa: E402
from experiments.common import results_dir, versions, write_results  # noqa: E402
from experiments.head_signals import mean_z, token_ablation  # noqa: E402
from experiments.head_tokens import (  # noqa: E402
    VARIANTS,
    by_layer,
    ceiling,
    run_parser,
    settings_of,
    spearman,
)
from observables.adapter import Adapter  # noqa: E402
from observables.components import expand  # noqa: E402
from suscept import classical, heads  # noqa: E402

SAMPLED = ("cross", "restricted", "spring_control")
SIGNALS = SAMPLED + ("gradient_dot", "unrolled", "ablation")
SCORES = ("sequences", "heads", "types", "pearson")


@dataclass(frozen=True)
class FineTune:
    """The fine-tuning ground truth: ``lr``, the recorded lengths (steps; the first is
    ``lr K = n_beta / gamma = 0.1`` at the default sampler), the group's weight ``a`` (and
    ``a_check``, a second weight on the type groups for the linearity check) and the number
    of training sequences in the anchor loss."""

    lr: float = 0.05
    steps: tuple[int, ...] = (2, 20)
    a: float = 0.25
    a_check: float = 0.125
    n_anchor: int = 512


QUICK_FT = FineTune(steps=(2, 4), n_anchor=64)


def group_weights(n_seq: int, n_pos: int, types: Tensor, type_names
                  ) -> tuple[heads.Groups, Tensor]:
    """The groups (one per sequence, then one per token type present) over the ``X`` probe
    tokens and ``W [X, G]``: ``1/|g|`` on members minus ``1/X`` everywhere (each column sums
    to 0: weight moved from the probe's mean to the group)."""
    present = [i for i in range(len(type_names)) if bool((types == i).any())]
    members = torch.cat([heads.sequence_groups(n_seq, n_pos).members,
                         types[:, None] == torch.tensor(present)[None]], 1)
    groups = heads.Groups([f"seq{i}" for i in range(n_seq)] + [type_names[i] for i in present],
                          members)
    return groups, groups.weights - 1.0 / members.shape[0]


def token_loss(model: nn.Module, tokens: Tensor, params: dict | None = None) -> Tensor:
    """``[X]``: every probe token's loss, rows in ``(sequence, position)`` order."""
    logits = model(tokens) if params is None else functional_call(model, params, (tokens,))
    return ob.token_losses(logits, tokens).flatten()


def finetune(model: nn.Module, anchor: Tensor, probe: Tensor, w: Tensor | None, a: float,
             ft: FineTune) -> dict[int, dict[str, Tensor]]:
    """Parameters after each of ``ft.steps`` steps of gradient descent on
    ``L_anchor + a w . l(probe)`` from the model's weights (a copy; the model is untouched)."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=ft.lr)
    out = {}
    for step in range(1, max(ft.steps) + 1):
        opt.zero_grad()
        loss = ob.lm_loss(m, anchor).mean()
        if w is not None and a:
            loss = loss + a * (token_loss(m, probe) * w).sum()
        loss.backward()
        opt.step()
        if step in ft.steps:
            out[step] = {n: p.detach().clone() for n, p in m.named_parameters()}
    return out


@torch.no_grad()
def head_losses(model: nn.Module, params: dict[str, Tensor], masks: list[dict], probe: Tensor
                ) -> Tensor:
    """``[K]``: ``Lbar_S(w^C)`` with head C's entries from ``params``, the rest from the model."""
    base = dict(model.named_parameters())
    out = []
    for mask in masks:
        mixed = {n: torch.where(mask[n], params[n], p) if n in mask else p
                 for n, p in base.items()}
        out.append(token_loss(model, probe, mixed).mean())
    return torch.stack(out).double()


def head_gradients(model: nn.Module, probe: Tensor, w: Tensor, masks: list[dict],
                   names: list[str]) -> tuple[Tensor, Tensor]:
    """``b [K, d]``: ``M_C grad Lbar_S(w*)`` per head, and ``grad f_g(w*) [G, d]``,
    ``f_g = w[:, g] . l(probe)``; flat over the parameters ``names`` in that order, float64."""
    params = dict(model.named_parameters())
    ps = [params[n] for n in names]

    def flat_grad(weights: Tensor) -> Tensor:
        g = torch.autograd.grad((token_loss(model, probe) * weights).sum(), ps)
        return torch.cat([t.reshape(-1) for t in g]).double()

    keep = torch.stack([torch.cat([(m[n] if n in m else torch.zeros_like(p, dtype=torch.bool))
                                   .reshape(-1) for n, p in zip(names, ps)]) for m in masks])
    b = flat_grad(torch.full((w.shape[0],), 1.0 / w.shape[0])) * keep
    return b, torch.stack([flat_grad(w[:, g]) for g in range(w.shape[1])])


def gradient_dot(model: nn.Module, probe: Tensor, w: Tensor, masks: list[dict]) -> Tensor:
    """``[G, K]``: ``-grad_C Lbar_S(w*) . grad_C f_g(w*)``, ``f_g = w[:, g] . l(probe)``
    (> 0: a short descent on ``f_g`` raises C's restricted loss)."""
    b, g_f = head_gradients(model, probe, w, masks, [n for n, _ in model.named_parameters()])
    return -(g_f @ b.T)


def fine_tuning_truth(model: nn.Module, train: Tensor, probe: Tensor, w: Tensor,
                      masks: list[dict], n_seq: int, ft: FineTune
                      ) -> tuple[dict[int, Tensor], Tensor]:
    """The ground truth of the module docstring: ``{length: Delta [G, K]}`` and the check at
    ``ft.a_check`` on the type groups ``[G - n_seq, K]`` (longest length)."""
    anchor = train[:ft.n_anchor]

    def response(g: int, a: float) -> dict[int, Tensor]:
        """``(phi(w_{+a}) - phi(w_{-a})) / 2a`` per recorded length ``[K]``."""
        up, down = (finetune(model, anchor, probe, w[:, g], sign * a, ft)
                    for sign in (1.0, -1.0))
        return {k: (head_losses(model, up[k], masks, probe)
                    - head_losses(model, down[k], masks, probe)) / (2 * a)
                for k in ft.steps}

    truth = {k: torch.zeros(w.shape[1], len(masks), dtype=torch.float64) for k in ft.steps}
    for g in range(w.shape[1]):
        for k, v in response(g, ft.a).items():
            truth[k][g] = v
    long = max(ft.steps)
    check = torch.stack([response(g, ft.a_check)[long] for g in range(n_seq, w.shape[1])])
    return truth, check


def reused_truth(path: Path, groups: heads.Groups, w: Tensor, ft: FineTune
                 ) -> tuple[dict[int, Tensor], Tensor, FineTune]:
    """The fine-tuning ground truth saved by an earlier run of the same model, seed and probe
    (the fine-tuning does not depend on the sampler), checked to have the same groups and
    weights; its fine-tuning settings when it recorded them."""
    if not path.exists():
        raise FileNotFoundError(f"--truth-from: no {path}; run the same variant and seed "
                                "without --truth-from first")
    saved = torch.load(path)
    if saved["groups"] != groups.names or not torch.equal(saved["weights"], w):
        raise ValueError(f"--truth-from: {path} was made with other groups or weights")
    done = saved.get("meta", {}).get("finetune")
    return saved["truth"], saved["check"], FineTune(**{**done, "steps": tuple(
        done["steps"])}) if done else ft


def unrolled(model: nn.Module, anchor: Tensor, probe: Tensor, w: Tensor, masks: list[dict],
             ft: FineTune) -> dict[int, Tensor]:
    """``{length: [G, K]}``: the ground truth's gradient descent linearized at w*.

    ``d w / d a`` after ``k`` steps obeys ``v_k = v_{k-1} - lr (H v_{k-1} + grad f_g)`` with
    ``H`` the Hessian of ``L_anchor`` at w* (the classical, exact-horizon first order; ``H``
    held at w* along the trajectory), so ``Delta[g, C] ~ b_C . v_K = -grad f_g . u_K(C)`` with
    ``u_k = u_{k-1} + lr (b_C - H u_{k-1})``, ``b_C = M_C grad Lbar_S(w*)`` (``H`` symmetric):
    ``K`` Hessian-vector products per head (:func:`suscept.classical.hvp`), none per group.
    ``K -> 0`` gives ``lr K`` times :func:`gradient_dot`; ``K -> inf`` the influence function
    ``-grad f_g^T H^-1 b_C``."""
    fn = classical.Functional(model, ob.lm_loss)
    apply = classical.hvp(fn, anchor, batch_size=128)
    b, g_f = head_gradients(model, probe, w, masks, fn.names)  # [K, d], [G, d]
    u, out = torch.zeros_like(b), {}
    for step in range(1, max(ft.steps) + 1):
        u = u + ft.lr * (b - apply(u))
        if step in ft.steps:
            out[step] = -(g_f @ u.T)
    return out


def scores(signal: Tensor, truth: Tensor, layers: list[int], n_seq: int) -> dict:
    """The module docstring's scores of ``signal`` against ``truth`` ``[G, K]`` (the first
    ``n_seq`` groups are sequences, the rest token types): per head ``[K]`` for
    ``sequences``, per layer for every score."""
    s, t = signal.double(), truth.double()
    seq = spearman(s[:n_seq], t[:n_seq])
    out = {"sequences": {"per_head": seq, "layer": by_layer(seq, layers)},
           "heads": {}, "types": {}, "pearson": {}}
    for layer in sorted(set(layers)):
        idx = [i for i, v in enumerate(layers) if v == layer]
        out["heads"][layer] = float(spearman(s[:n_seq, idx].T, t[:n_seq, idx].T).nanmean())
        out["types"][layer] = float(spearman(s[n_seq:, idx].T, t[n_seq:, idx].T).nanmean())
        a, b = s[:n_seq, idx].flatten(), t[:n_seq, idx].flatten()
        out["pearson"][layer] = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return out


def analyse(saved: dict, layers: list[int]) -> dict:
    """Scores, noise ceilings and health of one run's saved values (the dict of
    ``data_{variant}_seed{s}.pt``): per fine-tuning length and signal the scores of
    :func:`scores`; the ground truth's size, its agreement between the two lengths and its
    linearity in ``a``; the restricted prediction's agreement with its spring-only control;
    and each sampled prediction's Spearman with ``gradient_dot`` over sequences (how much of
    it is the first-order term)."""
    truth, check, values = saved["truth"], saved["check"], saved["values"]
    n_seq = sum(g.startswith("seq") for g in saved["groups"])
    short, long = min(truth), max(truth)
    per_seq = lambda a, b: by_layer(spearman(a[:n_seq], b[:n_seq]), layers)  # noqa: E731
    out = {"truth": {str(k): {"mean_abs": v.abs().mean(0), "rms": v.pow(2).mean().sqrt().item()}
                     for k, v in truth.items()},
           "truth_lengths_spearman": per_seq(truth[short], truth[long]),
           "truth_linearity": {
               "spearman_types": float(spearman(check.flatten()[:, None],
                                                truth[long][n_seq:].flatten()[:, None])[0]),
               "ratio": float((check * truth[long][n_seq:]).sum()
                              / truth[long][n_seq:].pow(2).sum()),
               "expected_ratio": 1.0},
           "control_agreement": per_seq(values["restricted"][0], values["spring_control"][0]),
           "vs_gradient_dot": {n: per_seq(values[n][0], values["gradient_dot"][0])
                               for n in SAMPLED},
           "scores": {str(k): {n: scores(v[k] if isinstance(v, dict) else v, t, layers, n_seq)
                               for n, (v, _) in values.items()} for k, t in truth.items()},
           "ceiling": {}}
    for n, (v, se) in values.items():
        if se is not None:
            c = ceiling(v[:n_seq], se[:n_seq])
            out["ceiling"][n] = {"per_head": c, "layer": by_layer(c, layers)}
    return out


def _regime(run, model, train, s: ha.Settings) -> dict:
    spectrum = suscept.regime.hessian_spectrum(model, ob.lm_loss, train[:s.n_hessian],
                                               n_probes=2, n_lanczos=s.n_lanczos)
    with torch.no_grad():
        anchor = float(torch.cat([ob.lm_loss(model, t) for t in train.split(512)]).mean())
    reg = suscept.regime.of_run(run, model, ob.lm_loss, train[:s.n_hessian], spectrum=spectrum,
                                anchor_loss=anchor).as_dict()
    return {k: reg[k] for k in ("verdict", "stability", "constrained_from_llc", "constrained",
                                "n_params")}


def one(variant: str, seed: int, s: ha.Settings, ft: FineTune, chi0_draws: int,
        out_dir: Path, truth_from: Path | None = None) -> dict:
    """Every figure of the module docstring for one model and seed."""
    t0 = time.process_time()
    model = ha.model_for(VARIANTS[variant], seed, s).model
    train, probe, held = ha.data_for(seed, s)
    n_seq, n_pos = probe.tokens.shape[0], probe.tokens.shape[1] - 1
    types = probe.target_types.flatten()
    groups, w = group_weights(n_seq, n_pos, types, probe.type_names)
    names = groups.names

    run = ob.one_run(model, train, probe.tokens, "all heads", s.sampler(seed=0), cross=True,
                     progress=False)
    sgld = time.process_time() - t0
    comps = run.config["components"]
    layers = heads.layers_of(comps)
    cross = heads.cross_table(run, groups)
    restricted = heads.head_table(run, groups).susceptibility
    chi0 = ob.spring_susceptibility(
        model, probe.tokens, "all heads",
        replace(s.sampler(seed=0), n_chains=2, n_draws=chi0_draws, seed=100), progress=False)
    # the weights W differ from the groups' means by the probe mean, which the centred token
    # losses already subtract: chi[g] = mean over g of chi[x] = W[:, g] . chi[x] exactly
    chi0_g = (chi0.value.double().T @ groups.weights).T
    regime = _regime(run, model, train, s)
    t1 = time.process_time()

    parts = expand("all heads", Adapter.of(model))
    masks = [c.mask() for c in parts]
    if [c.name for c in parts] != comps:
        raise ValueError("head masks and the run's components are in different orders")
    if truth_from is not None:
        truth, check, ft = reused_truth(truth_from / f"data_{variant}_seed{seed}.pt", groups, w,
                                        ft)
    else:
        truth, check = fine_tuning_truth(model, train, probe.tokens, w, masks, n_seq, ft)
    finetune_s = time.process_time() - t1

    t2 = time.process_time()
    grad_dot = gradient_dot(model, probe.tokens, w, masks)
    linear = unrolled(model, train[:ft.n_anchor], probe.tokens, w, masks, ft)
    per_token = token_ablation(model, probe, mean_z(model, held.tokens)).flatten(0, 1).flatten(1)
    ablation = -(per_token.double().T @ w).T
    deterministic = time.process_time() - t2

    values = {"cross": (cross.value.T, cross.stderr.T),
              "restricted": (restricted.value.T, restricted.stderr.T),
              "spring_control": (chi0_g, None), "gradient_dot": (grad_dot, None),
              "unrolled": (linear, None), "ablation": (ablation, None)}
    meta = {"variant": variant, "seed": seed, "components": comps, "layers": layers,
            "groups": names, "n_sequences": n_seq, "regime": regime,
            "eps_p_max": regime["stability"], "n_draws": cross.meta["n_draws"],
            "chi0_draws": 2 * chi0_draws, "finetune": asdict(ft),
            "sampler": {k: getattr(s, k) for k in ("n_beta", "gamma", "step_size", "n_chains",
                                                   "n_draws", "thin", "burn_in")},
            "truth_from": None if truth_from is None else str(truth_from),
            "cpu_seconds": {"sgld": sgld, "chi0_tables_regime": t1 - t0 - sgld,
                            "finetune": finetune_s, "deterministic": deterministic,
                            "all": time.process_time() - t0}}
    saved = {"truth": truth, "check": check, "groups": names, "components": comps,
             "values": values, "weights": w, "meta": meta}
    torch.save(saved, out_dir / f"data_{variant}_seed{seed}.pt")
    return {**meta, **analyse(saved, layers)}


def _at(d: dict, layer: int):
    """``d[layer]``, also after a JSON round trip (string keys)."""
    return d[layer] if layer in d else d[str(layer)]


def _rounded(d: dict) -> dict:
    return {str(a): round(float(b), 2) for a, b in d.items()}


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:+.2f}" if abs(hi - lo) < 0.005 else f"{lo:+.2f} to {hi:+.2f}"


def report(runs: list[dict]) -> str:
    """Markdown: per fine-tuning length, signal and layer, the range over seeds."""
    r0 = runs[0]
    layers = sorted(set(r0["layers"]))
    lines = [f"# Which data a head's loss depends on: {r0['variant']}, seeds "
             f"{[r['seed'] for r in runs]}", "",
             "Ranges over seeds. Ground truth: the change of each head's restricted probe loss "
             "after fine-tuning with one group up-weighted (experiments/head_data.py). Scores: "
             "Spearman (`sequences`: per head over sequences, median of the layer; `heads`: "
             "per sequence across the layer's heads; `types`: per token type across heads), "
             "`pearson` over all cells.", ""]
    ft = r0.get("finetune")
    how = f"lr {ft['lr']}, a {ft['a']}" if ft else "lr and a not recorded in the first file"
    for k in runs[0]["scores"]:
        lines += [f"## {k} fine-tuning steps ({how})", "",
                  "| signal | " + " | ".join(f"{sc} L{l}" for sc in SCORES for l in layers)
                  + " |", "|---" * (1 + len(SCORES) * len(layers)) + "|"]
        for n in SIGNALS:
            cells = [_range([float(_at(r["scores"][k][n][sc]["layer"] if sc == "sequences"
                                       else r["scores"][k][n][sc], l)) for r in runs])
                     for sc in SCORES for l in layers]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Health", ""]
    for r in runs:
        ceil = {n: {str(a): round(float(b), 2) for a, b in c["layer"].items()}
                for n, c in r["ceiling"].items()}
        regime = ("regime not recorded in this file" if not r.get("regime") else
                  f"regime {r['regime']['verdict']} (eps * p_max {r['eps_p_max']:.2f}, "
                  f"constrained from the LLC {r['regime']['constrained_from_llc']:.0f} of "
                  f"{r['regime']['n_params']})")
        lines.append(
            f"- seed {r['seed']}: {regime}; "
            f"noise ceiling per layer {ceil}; restricted vs spring-only control (Spearman "
            f"over sequences, median per layer) "
            f"{ {str(a): round(float(b), 2) for a, b in r['control_agreement'].items()} }; "
            f"sampled predictions vs gradient_dot (Spearman over sequences, median per layer) "
            f"{ {n: _rounded(v) for n, v in r['vs_gradient_dot'].items()} }; "
            f"truth at the two lengths agree at "
            f"{ {str(a): round(float(b), 2) for a, b in r['truth_lengths_spearman'].items()} }; "
            f"linearity in a: ratio {r['truth_linearity']['ratio']:.3f} (expected "
            f"{r['truth_linearity']['expected_ratio']:.3f}), Spearman "
            f"{r['truth_linearity']['spearman_types']:.3f}; CPU s "
            f"{ {a: round(b) for a, b in r.get('cpu_seconds', {}).items()} }")
    return "\n".join(lines) + "\n"


def plot(r: dict, out: Path) -> str:
    """Bar charts, one panel per fine-tuning length: per signal, the per-head Spearman over
    sequences against the fine-tuning response (layer medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(set(r["layers"]))
    lengths = list(r["scores"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.2), sharey=True)
    width = 0.8 / len(layers)
    for ax, k in zip(axes, lengths):
        for j, layer in enumerate(layers):
            vals = [_at(r["scores"][k][n]["sequences"]["layer"], layer) for n in SIGNALS]
            ax.bar([i + j * width for i in range(len(SIGNALS))], vals, width,
                   label=f"layer {layer}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(SIGNALS))], SIGNALS, fontsize=7,
                      rotation=20)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{r['variant']} seed {r['seed']}: {k} steps", fontsize=9)
    axes[0].set_ylabel("per-head Spearman over sequences\nagainst fine-tuning (median)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    name = f"data_{r['variant']}_seed{r['seed']}.png"
    fig.savefig(out / name, dpi=130)
    plt.close(fig)
    return name


def main(argv: list[str] | None = None) -> dict:
    parser = run_parser(__doc__, "results/head_data")
    parser.add_argument("--n-beta", type=float, help="SGLD n_beta (default: the settings' 30; "
                        "give a step size that keeps eps * p_max below 1)")
    parser.add_argument("--truth-from", type=Path, help="reuse the fine-tuning ground truth "
                        "of an earlier --out of the same variant and seeds (it does not depend "
                        "on the sampler)")
    parser.add_argument("--rescore", action="store_true", help="score again from the "
                        "figures.json and saved values in --out (no sampling, no fine-tuning)")
    args = parser.parse_args(argv)
    s = settings_of(args)
    if args.n_beta:
        s = replace(s, n_beta=args.n_beta)
    ft = QUICK_FT if args.quick else FineTune()
    out = results_dir("", args.out)
    if args.rescore:
        return rescore(out, s)
    missing = [args.truth_from / f"data_{args.variant}_seed{seed}.pt" for seed in args.seeds
               if args.truth_from and not (args.truth_from /
                                           f"data_{args.variant}_seed{seed}.pt").exists()]
    if missing:  # before any training or sampling
        raise FileNotFoundError(f"--truth-from: no {[str(m) for m in missing]}; run the same "
                                "variant and seeds without --truth-from first")
    runs = []
    for seed in args.seeds:  # written after every seed: an interrupted run keeps its seeds
        runs.append(one(args.variant, seed, s, ft, args.chi0_draws, out, args.truth_from))
        long = str(max(ft.steps))
        print(f"{args.variant} seed {seed}, {long} steps: " + "; ".join(
            f"{n} " + ", ".join(f"L{k} {v:+.2f}" for k, v in
                                runs[-1]["scores"][long][n]["sequences"]["layer"].items())
            for n in SIGNALS), flush=True)
        figures = {"runs": runs, "settings": asdict(s), "finetune": asdict(ft),
                   "versions": versions(), "files": [plot(r, out) for r in runs]}
        write_results(out, figures, report(runs))
    return figures


def _unrolled_of(saved: dict, r: dict, s: ha.Settings) -> dict[int, Tensor]:
    """:func:`unrolled` for a saved run (its model, probe and fine-tuning settings)."""
    model = ha.model_for(VARIANTS[r["variant"]], int(r["seed"]), s).model
    train, probe, _ = ha.data_for(int(r["seed"]), s)
    masks = [c.mask() for c in expand("all heads", Adapter.of(model))]
    done = (r.get("finetune") or saved.get("meta", {}).get("finetune")
            or asdict(QUICK_FT if s == ha.QUICK else FineTune()))
    ft = FineTune(**{**done, "steps": tuple(done["steps"])})
    if set(ft.steps) != set(saved["truth"]):
        raise ValueError(f"fine-tuning lengths {ft.steps} differ from the saved truth's")
    return unrolled(model, train[:ft.n_anchor], probe.tokens, saved["weights"], masks, ft)


def rescore(out: Path, s: ha.Settings) -> dict:
    """Every run in ``out`` analysed again from its saved values: those of ``figures.json``
    and any ``data_{variant}_seed{s}.pt`` it lacks (a run stopped before it wrote them; files
    without their settings record report no regime). Rewrites figures.json and report.md."""
    path = out / "figures.json"
    figures = json.loads(path.read_text()) if path.exists() else {"runs": []}
    have = {(r["variant"], int(r["seed"])) for r in figures["runs"]}
    for f in sorted(out.glob("data_*_seed*.pt")):
        variant, seed = re.fullmatch(r"data_(.+)_seed(\d+)\.pt", f.name).groups()
        if (variant, int(seed)) not in have:
            saved = torch.load(f)
            comps = saved["components"]
            figures["runs"].append(saved.get("meta") or {
                "variant": variant, "seed": int(seed), "components": comps,
                "layers": heads.layers_of(comps), "groups": saved["groups"],
                "n_sequences": sum(g.startswith("seq") for g in saved["groups"])})
    if not figures["runs"]:
        raise FileNotFoundError(f"no figures.json and no data_*_seed*.pt in {out}")
    figures["runs"].sort(key=lambda r: (r["variant"], int(r["seed"])))
    for r in figures["runs"]:
        path = out / f"data_{r['variant']}_seed{r['seed']}.pt"
        saved = torch.load(path)
        if "unrolled" not in saved["values"]:  # made before it was a signal: add it
            saved["values"]["unrolled"] = (_unrolled_of(saved, r, s), None)
            torch.save(saved, path)
        r["layers"] = [int(v) for v in r["layers"]]
        r.update(analyse(saved, r["layers"]))
    figures["files"] = [plot(r, out) for r in figures["runs"]]
    write_results(out, figures, report(figures["runs"]))
    return figures


if __name__ == "__main__":
    main()
