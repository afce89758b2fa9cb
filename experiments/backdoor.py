"""Backdoor detection by susceptibility and fluctuation profiles.

A trigger token (``TRIGGER``, an id the clean language never uses; the model has
``d_vocab = 65``) followed by a fixed next token (``TARGET``) is planted in a few percent of
the training sequences of the zoo's 2-layer attention-only model. The model is trained with
the zoo's own training function on that poisoned data (cached under
``results/backdoor_zoo/``). One localized SGLD run then evaluates, at every draw, the
restricted losses of a probe made of trusted clean sequences (fit / calibrate), held-out clean
test sequences and triggered test sequences, over 10 components (8 heads, embed, unembed).

Profiles over the components, each scored by a :mod:`suscept.anomaly` detector (Mahalanobis,
Ledoit-Wolf) fitted on trusted clean profiles and calibrated to 5% FPR on other trusted ones:

- susceptibility profile (the issue's): a sequence's row of the one-run susceptibility
  matrix averaged over its tokens (exact: chi is linear in the token loss),
  ``profile[i, C] = mean_s chi[(i, s), C]``, ``chi = -Cov(phi_C, l^C_x - Lbar_S(w^C))``;
- per-token susceptibility profiles ``chi[x, :]``, a sequence scored by its largest token score;
- fluctuation profiles, the restricted per-sample / per-token singular fluctuation
  ``log (n_beta/2) Var(l^C)`` (docs/theory.md section 3, restricted to C as in section 5): how much
  the input's loss moves when only C moves; per token, a sequence scored by its largest score.

Baselines on the same sequences (the issue's): the sequence's loss at w*; Mahalanobis (same
detector) on the final residual stream, mean over positions. Extra baselines: the largest and
the smallest token loss of the sequence, the full-model fluctuation ``(n_beta/2) Var(l_i)``.
Reported: AUROC and TPR at 5% FPR (threshold: the 95% quantile of the clean test scores, the
same rule for every method), plus the detector's own calibrated FPR / TPR.

    python -m experiments.backdoor [--quick] [--seeds 0 1 2] [--draws N] [--threads 1]

Writes ``results/backdoor/``: ``figures.json``, ``config.json``, ``report.md``,
``scores.png``, ``contributions.png`` and ``profiles_seed{s}.pt`` (every profile and loss, for
analysis without rerunning).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore", DeprecationWarning)

import observables as ob  # noqa: E402
import suscept  # noqa: E402
from experiments.common import (  # noqa: E402
    results_dir,
    torch_threads,
    versions,
    write_json,
    write_results,
)
from experiments.zoo import train as zoo_train  # noqa: E402
from experiments.zoo.language import make_dataset  # noqa: E402
from suscept import anomaly  # noqa: E402

VOCAB = 64  # the clean language's vocabulary
TRIGGER = 64  # an extra token id, never used by the clean language
TARGET = 5  # the token the trigger forces next
COMPONENTS = [f"L{l}H{h}" for l in range(2) for h in range(4)] + ["embed", "unembed"]


@dataclass(frozen=True)
class Settings:
    poison_fraction: float = 0.03
    train_steps: int = 600  # the trigger is learned by then (attack success 1.0)
    n_train_pool: int = 4096
    step_size: float = 1e-3
    n_beta: float = 30.0
    gamma: float = 300.0
    n_chains: int = 4
    n_draws: int = 200
    thin: int = 2
    batch_size: int = 64
    n_sgld_train: int = 2048
    n_fit: int = 96  # trusted clean sequences the detector is fitted on
    n_calibrate: int = 48  # trusted clean sequences its threshold is calibrated on
    n_test: int = 48  # clean test sequences, and as many triggered ones
    madfa_paper_regime: bool = True  # also MAD-FA from a second run in its paper's regime
    madfa_draws: int = 500  # draws per chain of that run (4 chains: the paper's 2000)

    def sampler(self) -> suscept.SamplerConfig:
        return suscept.SamplerConfig(step_size=self.step_size, n_beta=self.n_beta,
                                     gamma=self.gamma, n_chains=self.n_chains,
                                     n_draws=self.n_draws, thin=self.thin,
                                     batch_size=self.batch_size, seed=0)

    def train_config(self) -> zoo_train.TrainConfig:
        return zoo_train.TrainConfig(steps=self.train_steps, n_train=self.n_train_pool,
                                     eval_every=max(100, self.train_steps // 5))


QUICK = Settings(n_draws=60, n_sgld_train=1024, n_fit=64, n_calibrate=32, n_test=32,
                 madfa_paper_regime=False)
# MAD-FA's published sampler (Lyons Keenan et al. 2026): RMSprop-SGLD, gamma 1e4, n_beta 100,
# step 1e-6
PAPER_REGIME = dict(precondition="rmsprop", gamma=1e4, n_beta=100.0, step_size=1e-6)


# ---- poisoned data and the backdoored model ----------------------------------------------
def plant(tokens: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Copy of ``tokens [n, pos]`` with ``TRIGGER, TARGET`` written at a random position
    ``p`` (``1 <= p <= pos - 2``) of a ``fraction`` of the sequences (all of them when
    ``fraction = 1``). Returns the tokens and the boolean ``[n]`` of planted sequences."""
    g = torch.Generator().manual_seed(seed)
    n, pos = tokens.shape
    chosen = torch.randperm(n, generator=g)[: round(fraction * n)]
    out = tokens.clone()
    where = torch.randint(1, pos - 1, (len(chosen),), generator=g)
    out[chosen, where] = TRIGGER
    out[chosen, where + 1] = TARGET
    planted = torch.zeros(n, dtype=torch.bool)
    planted[chosen] = True
    return out, planted


@contextlib.contextmanager
def poisoned_training_data(fraction: float):
    """While active, the zoo's trainer draws its training pool with the trigger planted
    (its held-out probe, drawn with the zoo's evaluation seed, stays clean)."""
    original = zoo_train.make_dataset

    def make(n_sequences, seed, language_seed=0, vocab=VOCAB, **kw):
        data = original(n_sequences, seed=seed, language_seed=language_seed, vocab=VOCAB, **kw)
        if seed == zoo_train.EVAL_SEED:
            return data
        tokens, _ = plant(data.tokens, fraction, seed=7_000 + seed)
        return dataclasses.replace(data, tokens=tokens)

    zoo_train.make_dataset = make
    try:
        yield
    finally:
        zoo_train.make_dataset = original


def backdoored_model(seed: int, s: Settings, cache_root: str = "results/backdoor_zoo"):
    """The zoo's ``attn`` model trained on poisoned data; cached per poisoning setting."""
    key = hashlib.sha256(json.dumps({"fraction": s.poison_fraction, "trigger": TRIGGER,
                                     "target": TARGET}).encode()).hexdigest()[:8]
    with poisoned_training_data(s.poison_fraction):
        return zoo_train.train_or_load("attn", seed=seed, cache_dir=f"{cache_root}/{key}",
                                       config=s.train_config(), model_kw={"d_vocab": VOCAB + 1})


# ---- data, profiles, baselines -------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """Probe sequences ``tokens [N, pos]`` and which part each belongs to."""

    tokens: Tensor
    part: Tensor  # 0 fit (trusted), 1 calibrate (trusted), 2 clean test, 3 triggered test
    where: Tensor  # position of the trigger (-1 for clean sequences)

    def rows(self, part: int) -> Tensor:
        return (self.part == part).nonzero().flatten()


def probe_for(seed: int, s: Settings) -> Probe:
    sizes = [s.n_fit, s.n_calibrate, s.n_test]
    clean = make_dataset(sum(sizes), seed=30_000 + seed).tokens
    triggered, _ = plant(make_dataset(s.n_test, seed=40_000 + seed).tokens, 1.0, 41_000 + seed)
    tokens = torch.cat([clean, triggered])
    part = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes + [s.n_test])])
    hit = tokens == TRIGGER
    where = torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(part, -1))
    return Probe(tokens, part, where)


def sgld_data(seed: int, s: Settings) -> Tensor:
    """Fresh sequences from the model's (poisoned) training distribution."""
    tokens = make_dataset(s.n_sgld_train, seed=50_000 + seed).tokens
    return plant(tokens, s.poison_fraction, 51_000 + seed)[0]


@torch.no_grad()
def at_anchor(model: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token losses ``[N, pos-1]`` and the mean final residual stream ``[N, d_model]``."""
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    return ob.token_losses(logits, tokens), cache[name].mean(1)


def evaluate(scores: Tensor, probe: Probe, det: anomaly.Detector | None = None) -> dict:
    """Triggered (part 3) vs clean (part 2) test sequences: AUROC with DeLong's standard error,
    TPR at 5% FPR (threshold at the clean test scores' 95% quantile), and the split-conformal
    TPR / FPR (binomial errors) with the threshold set on the trusted part-1 scores."""
    test = torch.cat([probe.rows(2), probe.rows(3)])
    positive = probe.part[test] == 3
    value, se = anomaly.auroc(scores[test], positive)
    conformal = anomaly.conformal_rates(scores[probe.rows(1)], scores[test], positive, 0.05)
    out = {"auroc": value, "auroc_se": se,
           "tpr_at_5fpr": anomaly.tpr_at_fpr(scores[test], positive, 0.05),
           "conformal": {k: (v._asdict() if isinstance(v, anomaly.Rate) else v)
                         for k, v in conformal.items()}}
    if det is not None:  # the detector's own threshold, calibrated on trusted profiles
        flagged = scores[test] > det.threshold
        out["calibrated"] = {"fpr": float(flagged[~positive].double().mean()),
                             "tpr": float(flagged[positive].double().mean()),
                             "threshold": det.threshold, "expected_fpr": det.expected_fpr}
    return out


def madfa(run: suscept.Run, probe: Probe) -> dict:
    """MAD-FA scores (Lyons Keenan, Leckie & Erfani 2026) from the run's own draws: each
    sequence's loss trace against the trusted part-0 sequences' (mean correlation), and each
    token's against the trusted tokens' (mean; class-wise with the class = the predicted
    token id), pooled over a sequence's tokens by max and top-3 mean."""
    chains = run.valid_chains
    seq = run.flat("sample_loss")[chains]  # [chain, draw, N]
    out = {"madfa_mean": anomaly.madfa_scores(seq, seq[..., probe.rows(0)])["mean"]}
    tok = run.flat("full_token_loss")[chains]  # [chain, draw, N * (pos - 1)]
    n, pos = probe.tokens.shape
    ref = (probe.part[:, None] == 0).expand(n, pos - 1).flatten().nonzero().flatten()
    classes = probe.tokens[:, 1:].flatten()[ref]
    s = anomaly.madfa_scores(tok, tok[..., ref], classes)
    for key in ("mean", "classwise"):
        per_token = s[key].reshape(n, pos - 1)
        out[f"madfa_token_{key}_max"] = anomaly.pool(per_token, "max")
        out[f"madfa_token_{key}_top3"] = anomaly.pool(per_token, "topk", k=3)
    return out


def detect(features: Tensor, probe: Probe, components=None) -> tuple[dict, anomaly.Detector]:
    """Fit the Mahalanobis (Ledoit-Wolf) detector on part 0, calibrate on part 1, evaluate."""
    det = anomaly.fit(features[probe.rows(0)], features[probe.rows(1)], fpr=0.05,
                      components=components)
    scores = det.score(features)
    return {**evaluate(scores, probe, det), "scores": scores}, det


def sgld_run(model: nn.Module, train: Tensor, probe: Tensor, s: Settings) -> suscept.Run:
    """:func:`observables.one_run` plus stored per-sample losses: restricted to each component
    (``restricted_sample_loss [K, N]``) and of the full model (``sample_loss [N]``)."""
    specs, streams = ob.susceptibility_observables(COMPONENTS)
    specs += [ob.SampleLoss(tuple(COMPONENTS), name="restricted_sample_loss"),
              ob.SampleLoss(None, name="sample_loss"), ob.TokenLoss(None, name="full_token_loss")]
    plan = ob.EvaluationPlan(model, probe, specs)
    run = suscept.sample(model, ob.lm_loss, train, s.sampler(), observables=plan,
                         stream=streams, progress=False,
                         store_draws=["phi", "mean_loss", "restricted_sample_loss", "sample_loss",
                                      "full_token_loss"])
    run.config["components"] = COMPONENTS
    return run


def paper_regime_run(model: nn.Module, train: Tensor, probe: Tensor, s: Settings
                     ) -> suscept.Run:
    """A second run in MAD-FA's published regime recording only the full model's
    per-sequence and per-token losses (one forward per draw)."""
    config = dataclasses.replace(s.sampler(), n_draws=s.madfa_draws, thin=1, **PAPER_REGIME)
    plan = ob.EvaluationPlan(model, probe, [ob.SampleLoss(None, name="sample_loss"),
                                            ob.TokenLoss(None, name="full_token_loss")])
    return suscept.sample(model, ob.lm_loss, train, config, observables=plan, progress=False,
                          store_draws=["sample_loss", "full_token_loss"])


def fluctuations(run: suscept.Run, name: str, n_beta: float) -> Tensor:
    """Per-sample singular fluctuation ``(n_beta / 2) Var(l_i)`` of stored draws ``name``."""
    return suscept.singular_fluctuation(run.flat(name), n_beta, per_sample=True).value


def one_seed(seed: int, s: Settings, out_dir: Path) -> dict:
    t0 = time.perf_counter()
    trained = backdoored_model(seed, s)
    model = trained.model
    probe = probe_for(seed, s)
    losses, resid = at_anchor(model, probe.tokens)
    trig = probe.rows(3)
    after = losses[trig, probe.where[trig]]  # loss of TARGET right after the trigger
    logits = model(probe.tokens[trig])
    hit = logits[torch.arange(len(trig)), probe.where[trig]].argmax(-1) == TARGET
    out = {"seed": seed, "train_seconds": trained.train_seconds, "from_cache": trained.from_cache,
           "clean_loss_by_type": trained.final_loss_by_type(),
           "attack_success": float(hit.double().mean()),
           "target_loss_after_trigger": float(after.mean())}
    t1 = time.perf_counter()
    run = sgld_run(model, sgld_data(seed, s), probe.tokens, s)
    out["sgld_seconds"] = time.perf_counter() - t1
    chi = suscept.susceptibility(run)  # [N * (pos - 1), K], -Cov(phi_C, l^C_x - Lbar_S(w^C))
    per_token = chi.value.reshape(len(probe.tokens), -1, len(COMPONENTS))
    profile = per_token.mean(1)  # [N, K], the sequence's mean susceptibility row (exact)
    res, det = detect(profile, probe, COMPONENTS)
    out["susceptibility"] = res
    trig_rows = probe.rows(3)
    top = [e[0][0] for e in det.explain(profile[trig_rows], top=1)]
    out["top_component_of_triggered"] = {c: top.count(c) for c in sorted(set(top))}
    out["mean_contribution"] = {
        "triggered": dict(zip(COMPONENTS, det.contributions(profile[trig_rows]).mean(0).tolist())),
        "clean": dict(zip(COMPONENTS, det.contributions(profile[probe.rows(2)]).mean(0)
                          .tolist()))}
    # per-token profiles: fitted on the trusted sequences' tokens, a sequence scored by its
    # most anomalous token
    tok = anomaly.fit(per_token[probe.rows(0)].flatten(0, 1),
                      per_token[probe.rows(1)].flatten(0, 1), components=COMPONENTS)
    token_scores = tok.score(per_token.flatten(0, 1)).reshape(len(probe.tokens), -1)
    out["susceptibility_max_token"] = evaluate(token_scores.max(1).values, probe)
    # fluctuation profiles: nu^C_i = (n_beta / 2) Var(l^C_i), on a log scale
    fluct = fluctuations(run, "restricted_sample_loss", s.n_beta)  # [K * N]
    fluct = fluct.reshape(len(COMPONENTS), -1).T.log()  # [N, K]
    out["fluctuation"], fdet = detect(fluct, probe, COMPONENTS)
    top = [e[0][0] for e in fdet.explain(fluct[trig_rows], top=1)]
    out["top_component_of_triggered_fluctuation"] = {c: top.count(c) for c in sorted(set(top))}
    out["fluctuation_total"] = evaluate(fluctuations(run, "sample_loss", s.n_beta), probe)
    # per-token fluctuation profiles (n_beta/2) Var(l^C_x - Lbar_S(w^C)), from the streamed
    # moments; a sequence scored by its most anomalous token
    token_var = torch.stack([m.total().var_y()[0] for m in run.paired("phi",
                             "restricted_token_loss")], 1)  # [N * (pos - 1), K]
    token_fluct = (0.5 * s.n_beta * token_var).log().reshape(len(probe.tokens), -1,
                                                             len(COMPONENTS))
    tdet = anomaly.fit(token_fluct[probe.rows(0)].flatten(0, 1),
                       token_fluct[probe.rows(1)].flatten(0, 1), components=COMPONENTS)
    token_scores = tdet.score(token_fluct.flatten(0, 1)).reshape(len(probe.tokens), -1)
    worst = anomaly.pool(token_scores, "max")
    out["fluctuation_max_token"] = {**evaluate(worst, probe), "scores": worst}
    out["fluctuation_top3_token"] = evaluate(anomaly.pool(token_scores, "topk", k=3), probe)
    out["min_token_loss_baseline"] = evaluate(-losses.min(1).values.double(), probe)
    test = torch.cat([probe.rows(2), probe.rows(3)])
    out["vs_madfa"] = {}
    for key, scores in madfa(run, probe).items():
        out[key] = {**evaluate(scores, probe), "scores": scores}
        diff = anomaly.auroc_difference(worst[test], scores[test], probe.part[test] == 3)
        out["vs_madfa"][key] = diff._asdict()
    if s.madfa_paper_regime:
        t2 = time.perf_counter()
        paper = paper_regime_run(model, sgld_data(seed, s), probe.tokens, s)
        out["madfa_paper_seconds"] = time.perf_counter() - t2
        for key, scores in madfa(paper, probe).items():
            key = key.replace("madfa", "madfa_paper")
            out[key] = {**evaluate(scores, probe), "scores": scores}
            diff = anomaly.auroc_difference(worst[test], scores[test], probe.part[test] == 3)
            out["vs_madfa"][key] = diff._asdict()
    torch.save({"chi_per_token": per_token, "token_fluctuation": token_fluct,
                "sample_fluctuation": fluct, "losses": losses, "resid": resid,
                "part": probe.part, "where": probe.where}, out_dir / f"profiles_seed{seed}.pt")
    out["loss_baseline"] = evaluate(losses.mean(1).double(), probe)
    out["max_token_loss_baseline"] = evaluate(losses.max(1).values.double(), probe)
    out["loss_baseline"]["scores"] = losses.mean(1)
    out["activation_baseline"], _ = detect(resid.double(), probe)
    rel = suscept.reliability(run)
    out["reliability"] = {"split_half_spearman": rel["split_half"]["spearman"],
                          "loss_rise": rel.get("loss_rise"), "phi_iat": rel.get("phi_iat")}
    out["seconds"] = time.perf_counter() - t0
    print(f"  seed {seed}: attack success {out['attack_success']:.2f}; AUROC susceptibility "
          f"{res['auroc']:.3f}, per-token fluctuation {out['fluctuation_max_token']['auroc']:.3f}"
          f", MAD-FA token class-wise max {out['madfa_token_classwise_max']['auroc']:.3f}"
          f", loss {out['loss_baseline']['auroc']:.3f}, activations "
          f"{out['activation_baseline']['auroc']:.3f}; SGLD {out['sgld_seconds']:.0f} s",
          flush=True)
    return out


METHODS = {"susceptibility": "susceptibility profile (Mahalanobis, Ledoit-Wolf)",
           "loss_baseline": "sequence loss at w*",
           "activation_baseline": "final residual, mean over positions (Mahalanobis)",
           "susceptibility_max_token": "per-token profiles, the sequence's largest score",
           "fluctuation": "fluctuation profile log (n_beta/2) Var(l^C_i) (Mahalanobis)",
           "fluctuation_total": "full-model fluctuation (n_beta/2) Var(l_i) alone",
           "fluctuation_max_token": "per-token fluctuation profiles, the largest score",
           "fluctuation_top3_token": "per-token fluctuation profiles, top-3 mean",
           "max_token_loss_baseline": "largest token loss of the sequence (extra)",
           "min_token_loss_baseline": "smallest token loss of the sequence, negated (extra)",
           "madfa_mean": "MAD-FA: -mean Corr of the sequence loss trace with trusted ones",
           "madfa_token_mean_max": "MAD-FA per token (mean Corr), the sequence's largest",
           "madfa_token_mean_top3": "MAD-FA per token (mean Corr), top-3 mean",
           "madfa_token_classwise_max": "MAD-FA per token (class-wise), the largest",
           "madfa_token_classwise_top3": "MAD-FA per token (class-wise), top-3 mean"}


def plots(figures: dict, out) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = figures["seeds"][0]
    part = torch.as_tensor(first["part"])
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, key in zip(axes, ("susceptibility", "fluctuation_max_token", "loss_baseline",
                              "activation_baseline")):
        scores = torch.as_tensor(first[key]["scores"]).double()
        for k, label in ((2, "clean"), (3, "triggered")):
            ax.hist(scores[part == k].tolist(), bins=25, alpha=0.6, label=label)
        ax.set(title=f"{METHODS[key]}\nAUROC {first[key]['auroc']:.3f}", xlabel="score")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = torch.arange(len(COMPONENTS)).double()
    for i, which in enumerate(("clean", "triggered")):
        vals = [first["mean_contribution"][which][c] for c in COMPONENTS]
        ax.bar((x + (i - 0.5) * 0.4).tolist(), vals, 0.4, label=which)
    ax.set_xticks(x.tolist(), COMPONENTS, fontsize=7)
    ax.set(title="mean contribution to the Mahalanobis score", ylabel="contribution")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "contributions.png", dpi=120)
    plt.close(fig)
    return ["scores.png", "contributions.png"]


def report(figures: dict, files: list[str]) -> str:
    lines = ["# Backdoor detection by susceptibility profiles", "",
             f"Trigger token {TRIGGER} forcing token {TARGET} next, planted in "
             f"{figures['settings']['poison_fraction']:.0%} of the training sequences; "
             "detector fitted on trusted clean profiles, scored on held-out clean vs triggered "
             "sequences (AUROC ± DeLong se; TPR at 5% FPR with the threshold at the clean test "
             "scores' 95% quantile; split-conformal TPR / FPR ± binomial se with the threshold "
             "from the trusted calibration sequences' scores; for detectors, their own "
             "calibrated threshold's FPR / TPR).", "",
             "| seed | attack success | method | AUROC | TPR at 5% FPR | conformal TPR / FPR "
             "| detector FPR / TPR |", "|---|---|---|---|---|---|---|"]
    for seed in figures["seeds"]:
        paper = {k.replace("madfa", "madfa_paper"): v.replace("MAD-FA", "MAD-FA (paper regime)")
                 for k, v in METHODS.items() if k.startswith("madfa")}
        for key, label in {**METHODS, **paper}.items():
            if key not in seed:
                continue
            r = seed[key]
            cal = r.get("calibrated")
            cal = f"{cal['fpr']:.3f} / {cal['tpr']:.3f}" if cal else ""
            c = r["conformal"]
            conf = (f"{c['tpr']['value']:.2f} ± {c['tpr']['stderr']:.2f} / "
                    f"{c['fpr']['value']:.2f} ± {c['fpr']['stderr']:.2f}")
            lines.append(f"| {seed['seed']} | {seed['attack_success']:.2f} | {label} | "
                         f"{r['auroc']:.3f} ± {r['auroc_se']:.3f} | {r['tpr_at_5fpr']:.3f} | "
                         f"{conf} | {cal} |")
        lines += ["", f"Seed {seed['seed']}: AUROC of the per-token fluctuation profile minus "
                  "MAD-FA's (same draws, DeLong paired se): " + "; ".join(
                      f"{k} {v['value']:+.3f} ± {v['stderr']:.3f}"
                      for k, v in seed["vs_madfa"].items()) + "."]
    for seed in figures["seeds"]:
        lines += ["", f"Seed {seed['seed']}: top component of each triggered sequence's score "
                  f"{seed['top_component_of_triggered']}; SGLD {seed['sgld_seconds']:.0f} s; "
                  f"split-half Spearman per component "
                  f"{[round(float(v), 2) for v in seed['reliability']['split_half_spearman']]}."]
    lines += ["", "Plots: " + ", ".join(files), "", f"Settings: {figures['settings']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, short training and run")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--draws", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return run_all(args)


def run_all(args) -> dict:
    s = QUICK if args.quick else Settings()
    if args.draws:
        s = dataclasses.replace(s, n_draws=args.draws)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = results_dir("backdoor", args.out)
    config = {"settings": dataclasses.asdict(s), "seeds": seeds, "quick": args.quick,
              "trigger": TRIGGER, "target": TARGET, "components": COMPONENTS,
              "versions": versions()}
    write_json(out / "config.json", config)
    figures = {"settings": dataclasses.asdict(s), "seeds": []}
    for seed in seeds:
        res = one_seed(seed, s, out)
        res["part"] = probe_for(seed, s).part
        figures["seeds"].append(res)
    files = plots(figures, out)
    write_results(out, figures, report(figures, files))
    return figures


if __name__ == "__main__":
    main()
