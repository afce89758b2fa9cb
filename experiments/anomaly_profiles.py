"""Every anomaly score of one localized SGLD run, shared by the anomaly organisms.

A *probe* holds trusted clean sequences (part 0: the reference set detectors are fitted on;
part 1: the calibration set their split-conformal thresholds come from), held-out clean test
sequences (part 2) and one part per kind of anomalous input (3, 4, ...). One SGLD run evaluates,
at every draw, the restricted losses of all probe sequences over ``COMPONENTS`` (8 heads,
embed, unembed) and the full model's per-sequence and per-token losses; :func:`all_scores`
turns these same draws into one score per sequence for each method of ``METHODS`` (larger =
more anomalous):

- susceptibility profile: the sequence's mean row of ``chi[x, C] = -Cov(phi_C, l^C_x -
  Lbar_S(w^C))`` (docs/theory.md section 5; exact, chi is linear in the token loss), scored by
  a Mahalanobis (Ledoit-Wolf) detector; per token, a sequence scored by its largest token;
- fluctuation profile: the restricted singular fluctuation ``log (n_beta/2) Var(l^C)``
  (docs/theory.md section 3 restricted to C as in section 5), per sequence and per token (a
  per-token detector's scores pooled by max, top-3 mean, mean; and the mean and standard
  deviation over a sequence's tokens of the per-token profiles, ``[2K]``, as one profile);
- MAD-FA (Lyons Keenan, Leckie & Erfani 2026): mean and class-wise correlation of the loss
  trace with the trusted part-0 traces, per sequence and per token with sequence pooling;
- baselines at w* (no draws): sequence loss, smallest / largest token loss, Mahalanobis on the
  final residual stream (mean over positions, and per position pooled by max).

:func:`evaluate` scores one anomalous part against the clean test part: AUROC with DeLong's
error, TPR at 5% FPR (threshold on the clean test scores) and split-conformal TPR / FPR
(threshold from the trusted part-1 scores), all from :mod:`suscept.anomaly`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import observables as ob
import suscept
from suscept import anomaly
from suscept.moments import Moments
from suscept.susceptibilities import PHI, RESTRICTED, spearman

COMPONENTS = [f"L{l}H{h}" for l in range(2) for h in range(4)] + ["embed", "unembed"]
# MAD-FA's published sampler (Lyons Keenan et al. 2026): RMSprop-SGLD, gamma 1e4, n_beta 100,
# step 1e-6
PAPER_REGIME = dict(precondition="rmsprop", gamma=1e4, n_beta=100.0, step_size=1e-6)
FPR = 0.05


@dataclass(frozen=True)
class Probe:
    """Probe sequences ``tokens [N, pos]``; ``part [N]``: 0 fit (trusted), 1 calibrate
    (trusted), 2 clean test, ``3 + k`` anomalous inputs of kind ``kinds[k]``."""

    tokens: Tensor
    part: Tensor
    kinds: tuple[str, ...]

    def rows(self, part: int) -> Tensor:
        return (self.part == part).nonzero().flatten()

    def part_of(self, kind: str) -> int:
        return 3 + self.kinds.index(kind)

    @staticmethod
    def build(clean: Tensor, sizes: tuple[int, int, int], anomalous: dict[str, Tensor]) -> Probe:
        """``clean [sum(sizes), pos]`` split into parts 0, 1, 2; then each anomalous set."""
        tokens = torch.cat([clean, *anomalous.values()])
        counts = list(sizes) + [len(t) for t in anomalous.values()]
        part = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
        return Probe(tokens, part, tuple(anomalous))


@torch.no_grad()
def at_anchor(model: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token losses ``[N, pos-1]`` and the final residual stream ``[N, pos, d_model]``."""
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    return ob.token_losses(logits, tokens), cache[name]


def sgld_run(model: nn.Module, train: Tensor, probe: Tensor, config: suscept.SamplerConfig,
             components: list[str] | None = None) -> suscept.Run:
    """:func:`observables.one_run`'s streams over ``components`` (K names) plus stored draws:
    ``phi``, the restricted per-sample losses ``[K, N]``, the full model's per-sample ``[N]``
    and per-token losses. ``components`` default: ``COMPONENTS``."""
    components = list(components or COMPONENTS)
    specs, streams = ob.susceptibility_observables(components)
    specs += [ob.SampleLoss(tuple(components), name="restricted_sample_loss"),
              ob.SampleLoss(None, name="sample_loss"), ob.TokenLoss(None, name="full_token_loss")]
    plan = ob.EvaluationPlan(model, probe, specs)
    run = suscept.sample(model, ob.lm_loss, train, config, observables=plan, stream=streams,
                         progress=False, store_draws=["phi", "mean_loss", "restricted_sample_loss",
                                                      "sample_loss", "full_token_loss"])
    run.config["components"] = list(components)
    return run


def paper_regime_run(model: nn.Module, train: Tensor, probe: Tensor,
                     config: suscept.SamplerConfig, n_draws: int) -> suscept.Run:
    """A run in MAD-FA's published regime recording only the full model's per-sequence and
    per-token losses (one forward per draw)."""
    config = dataclasses.replace(config, n_draws=n_draws, thin=1, **PAPER_REGIME)
    plan = ob.EvaluationPlan(model, probe, [ob.SampleLoss(None, name="sample_loss"),
                                            ob.TokenLoss(None, name="full_token_loss")])
    return suscept.sample(model, ob.lm_loss, train, config, observables=plan, progress=False,
                          store_draws=["sample_loss", "full_token_loss"])


def madfa(run: suscept.Run, probe: Probe, prefix: str = "madfa") -> dict[str, Tensor]:
    """MAD-FA scores ``[N]`` from the run's draws: each sequence's loss trace against the
    trusted part-0 sequences' (mean correlation), and each token's against the trusted tokens'
    (mean; class-wise with the class = the predicted token id), pooled over a sequence's
    tokens by max and top-3 mean."""
    chains = run.valid_chains
    seq = run.flat("sample_loss")[chains]  # [chain, draw, N]
    out = {f"{prefix}_mean": anomaly.madfa_scores(seq, seq[..., probe.rows(0)])["mean"]}
    tok = run.flat("full_token_loss")[chains]  # [chain, draw, N * (pos - 1)]
    n, pos = probe.tokens.shape
    ref = (probe.part[:, None] == 0).expand(n, pos - 1).flatten().nonzero().flatten()
    classes = probe.tokens[:, 1:].flatten()[ref]
    s = anomaly.madfa_scores(tok, tok[..., ref], classes)
    for key in ("mean", "classwise"):
        per_token = s[key].reshape(n, pos - 1)
        out[f"{prefix}_token_{key}_max"] = anomaly.pool(per_token, "max")
        out[f"{prefix}_token_{key}_top3"] = anomaly.pool(per_token, "topk", k=3)
    return out


def detector(features: Tensor, probe: Probe, components=None) -> tuple[Tensor, anomaly.Detector]:
    """Mahalanobis (Ledoit-Wolf) fitted on part 0, calibrated on part 1; scores ``[N]``."""
    det = anomaly.fit(features[probe.rows(0)], features[probe.rows(1)], fpr=FPR,
                      components=components)
    return det.score(features), det


def token_scores(per_token: Tensor, probe: Probe) -> Tensor:
    """Per-token profiles ``[N, T, K]`` scored by a detector fitted on the trusted sequences'
    tokens: ``[N, T]``."""
    det = anomaly.fit(per_token[probe.rows(0)].flatten(0, 1),
                      per_token[probe.rows(1)].flatten(0, 1), fpr=FPR)
    return det.score(per_token.flatten(0, 1)).reshape(per_token.shape[:2])


def profile_split_half(run: suscept.Run, n_sequences: int) -> Tensor:
    """Split-half reliability ``[K]`` of the sequence susceptibility profile: Spearman, over
    sequences, of each component's mean-chi profile from the first half of the chains against
    the second half's."""
    source = run.paired(PHI, RESTRICTED)
    segs = source[0].n_segments
    cut = (len(run.valid_chains) // 2) * (segs // len(run.valid_chains))

    def half(lo, hi):
        part = [Moments.cat([m.segment(s) for s in range(lo, hi)]) for m in source]
        chi = suscept.susceptibility(part).value
        return chi.reshape(n_sequences, -1, len(source)).mean(1)

    return spearman(half(0, cut), half(cut, segs))


def all_scores(model: nn.Module, run: suscept.Run, probe: Probe, n_beta: float) -> dict:
    """``{"scores": {method: [N]}, "seconds": {method: post-processing CPU s}, "profiles": ...}``
    for every method of ``METHODS`` from one run's draws (and the model at w*)."""
    names = run.config["components"]
    scores, seconds, n, K = {}, {}, len(probe.tokens), len(names)

    def timed(names, fn):  # CPU seconds of the post-processing, shared among ``names``
        t0 = time.process_time()
        out = fn()
        for name, value in (out.items() if isinstance(out, dict) else zip(names, out)):
            scores[name] = value.double()
            seconds[name] = (time.process_time() - t0) / max(1, len(names))

    chi = suscept.susceptibility(run).value.reshape(n, -1, K)  # [N, T, K]
    fluct = suscept.singular_fluctuation(run.flat("restricted_sample_loss"), n_beta,
                                         per_sample=True).value.reshape(K, n).T.log()  # [N, K]
    token_var = torch.stack([m.total().var_y()[0] for m in run.paired(PHI, RESTRICTED)], 1)
    token_fluct = (0.5 * n_beta * token_var).log().reshape(n, -1, K)  # [N, T, K]
    timed(["susceptibility"], lambda: [detector(chi.mean(1), probe, names)[0]])
    timed(["susceptibility_max_token"], lambda: [token_scores(chi, probe).max(1).values])
    timed(["fluctuation"], lambda: [detector(fluct, probe, names)[0]])
    timed(["fluctuation_total"], lambda: [suscept.singular_fluctuation(
        run.flat("sample_loss"), n_beta, per_sample=True).value])

    def per_token_fluct():
        t = token_scores(token_fluct, probe)
        return [anomaly.pool(t, "max"), anomaly.pool(t, "topk", k=3), anomaly.pool(t, "mean")]

    timed(["fluctuation_max_token", "fluctuation_top3_token", "fluctuation_mean_token"],
          per_token_fluct)
    summary = torch.cat([token_fluct.mean(1), token_fluct.std(1)], 1)  # [N, 2K]
    timed(["fluctuation_token_summary"], lambda: [detector(summary, probe)[0]])
    timed(list(MADFA), lambda: madfa(run, probe))
    losses, resid = at_anchor(model, probe.tokens)
    timed(["loss_baseline", "min_token_loss_baseline", "max_token_loss_baseline"],
          lambda: [losses.mean(1), -losses.min(1).values, losses.max(1).values])
    timed(["activation_baseline"], lambda: [detector(resid.mean(1).double(), probe)[0]])
    timed(["activation_max_token"], lambda: [token_scores(resid.double(), probe).max(1).values])
    return {"scores": scores, "seconds": seconds,
            "profiles": {"chi_per_token": chi, "sample_fluctuation": fluct,
                         "token_fluctuation": token_fluct, "losses": losses}}


def evaluate(scores: Tensor, probe: Probe, part: int) -> dict:
    """Part ``part`` (anomalous) against part 2 (clean test): AUROC ± DeLong se, detection
    rate at 5% FPR (threshold on the clean test scores) ± binomial se, and split-conformal
    TPR / FPR with the threshold from the trusted part-1 scores."""
    test = torch.cat([probe.rows(2), probe.rows(part)])
    positive = probe.part[test] == part
    r = anomaly.evaluate(scores[test], positive, calibration=scores[probe.rows(1)], fpr=FPR)
    c = r["conformal"]
    return {"auroc": r["auroc"].value, "auroc_se": r["auroc"].stderr,
            "tpr_at_5fpr": r["detection_rate"].value,
            "tpr_at_5fpr_se": r["detection_rate"].stderr,
            "conformal": {"tpr": c["tpr"]._asdict(), "fpr": c["fpr"]._asdict(),
                          "threshold": c["threshold"], "expected_fpr": c["expected_fpr"]}}


def two_sided(scores: Tensor, probe: Probe) -> Tensor:
    """``|s - median| / MAD`` with the median and median absolute deviation of the trusted
    part-0 scores: flags inputs that score unusually low as well as high (for scalar scores
    whose anomalous direction is not known in advance)."""
    ref = scores[probe.rows(0)].double()
    med = ref.median()
    return (scores.double() - med).abs() / (ref - med).abs().median()


def difference(scores: dict[str, Tensor], probe: Probe, part: int, a: str, b: str) -> dict:
    """``AUROC(a) - AUROC(b)`` on part ``part`` vs clean test, DeLong paired se."""
    test = torch.cat([probe.rows(2), probe.rows(part)])
    diff = anomaly.auroc_difference(scores[a][test], scores[b][test], probe.part[test] == part)
    return {"a": a, "b": b, **diff._asdict()}


PROFILE_METHODS = {
    "susceptibility": "susceptibility profile, mean chi row (Mahalanobis)",
    "susceptibility_max_token": "per-token susceptibility profiles, sequence max",
    "fluctuation": "fluctuation profile log (n_beta/2) Var(l^C_i) (Mahalanobis)",
    "fluctuation_max_token": "per-token fluctuation profiles, sequence max",
    "fluctuation_top3_token": "per-token fluctuation profiles, top-3 mean",
    "fluctuation_mean_token": "per-token fluctuation profiles, mean over tokens",
    "fluctuation_token_summary": "mean and sd over tokens of the per-token fluctuation "
                                 "profiles (Mahalanobis)"}
MADFA = {
    "madfa_mean": "MAD-FA, sequence traces, mean Corr",
    "madfa_token_mean_max": "MAD-FA, token traces, mean Corr, sequence max",
    "madfa_token_mean_top3": "MAD-FA, token traces, mean Corr, top-3 mean",
    "madfa_token_classwise_max": "MAD-FA, token traces, class-wise, sequence max",
    "madfa_token_classwise_top3": "MAD-FA, token traces, class-wise, top-3 mean"}
BASELINES = {
    "fluctuation_total": "full-model fluctuation (n_beta/2) Var(l_i) alone",
    "loss_baseline": "sequence loss at w*",
    "min_token_loss_baseline": "smallest token loss, negated",
    "max_token_loss_baseline": "largest token loss",
    "activation_baseline": "final residual, mean over positions (Mahalanobis)",
    "activation_max_token": "final residual per position (Mahalanobis), sequence max"}
METHODS = {**PROFILE_METHODS, **MADFA, **BASELINES}
# scalar scores whose anomalous direction the trusted data cannot tell: also scored two-sided
TWO_SIDED = ("fluctuation_mean_token", "fluctuation_total", "madfa_mean",
             "madfa_token_classwise_top3", "loss_baseline", "min_token_loss_baseline")
