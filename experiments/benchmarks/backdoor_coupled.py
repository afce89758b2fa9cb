"""The backdoor's susceptibility profile at equal CPU time: the plain one run against the
coupled estimator with the pathwise (or, ``--base interpolation``, the interpolation)
spring-only base.

The trigger organism of ``experiments.anomaly_kinds`` (the zoo model backdoored at ``--rate``,
its probe of trusted reference, calibration, clean test and triggered sequences, its full-mode
sampler: step 1e-3, n_beta 30, gamma 300, 4 chains x 200 draws, thin 2). A sequence's profile
is its mean row of ``chi[x, C] = -Cov(phi_C, l^C_x - Lbar_S(w^C))`` (docs/theory.md section 5;
``< 0``: the sequence lowers C's loss), i.e. the susceptibility of the sequence's mean loss
(``chi`` is linear in the token loss): every evaluation records ``phi [K]`` and
``l^C_i - Lbar_S(w^C) [K, N]`` per sequence ``i`` (:class:`CenteredSampleLoss`), which keeps the
pathwise base's token Jacobian at ``N x d`` floats. One process, CPU seconds of each part:

- ``plain``: the full-mode run, every draw (its CPU time is the budget);
- ``coupled``: ``-(C(run) - C(stationary twins)) + chi0`` (:func:`suscept.coupled_susceptibility`
  with the pathwise ``chi0``), from the first draws of the same run after the coupling skip and
  a prefix of a pathwise pool (seed + 1, ``--pool`` draws per chain), the split between them
  chosen from the per-part variances as in ``pathwise.py`` (``N_b / N_run = sqrt(V_b c_run /
  (V_d c_b))``) and scaled to the plain run's CPU seconds (each SGLD draw charged with its
  twin's evaluation, the skipped draws and the base's one-off Jacobian in full). Twins are
  evaluated for the skip plus a sixth of the draws; where the split asks for more SGLD draws or
  base pairs than there are, the budget left goes to the other part (``split`` in the output);
- ``added`` (``chi - chi0``, what the tempered loss adds) and ``chi0`` (the spring-only profile,
  blind to the loss) of that split, and ``chi0`` of the whole pool.

Each profile: split-half (per component, Spearman over sequences of chains {0,1} against
{2,3}, as ``anomaly_profiles.profile_split_half``), AUROC ± DeLong se of the Mahalanobis
detector (trigger vs clean test) and TPR at 5% FPR; the regime: ``eps * p_max``, the plain
run's agreement with the whole-pool ``chi0`` (:func:`suscept.regime.agreement`) and the
verdict.

    python experiments/benchmarks/backdoor_coupled.py [--quick] [--seed 0] [--rate 0.03]
        [--pool 220] [--grad-every 32] [--draws 200] [--base pathwise]
        [--out results/backdoor_coupled]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import suscept  # noqa: E402
from experiments import anomaly_kinds as ak  # noqa: E402
from experiments import anomaly_profiles as ap  # noqa: E402
from experiments import backdoor  # noqa: E402
from experiments.benchmarks import timing  # noqa: E402
from experiments.benchmarks.pathwise import allocation  # noqa: E402
from experiments.benchmarks.sweep import load  # noqa: E402
from experiments.benchmarks.variance import chi_plain, timed  # noqa: E402
from observables.lm import lm_loss, token_losses  # noqa: E402
from observables.plan import EvaluationPlan  # noqa: E402
from observables.registry import MeanLoss, Observable  # noqa: E402
from suscept.control_variates import block_sums, combine_se  # noqa: E402
from suscept.coupled import coupling_skip  # noqa: E402
from suscept.interpolation import InterpolationBase, MeanSums  # noqa: E402
from suscept.pathwise import PathwiseBase, Sums, split_half  # noqa: E402
from suscept.susceptibilities import PHI, RESTRICTED, spearman  # noqa: E402

HALVES = ([0, 1], [2, 3])
QUICK = dataclasses.replace(
    ak.Settings(), sgld=replace(ak.SAMPLER, n_draws=12), n_sgld_train=128, n_fit=24,
    n_calibrate=20, n_test=10, madfa_paper_regime=False)


@dataclass(frozen=True)
class CenteredSampleLoss(Observable):
    """``l_i - Lbar_S`` per probe sequence ``i`` at the same weights ``[n, batch]``: the mean
    over i's tokens of ``centered_token_loss`` (sequences of equal length)."""

    kind: ClassVar[str] = "centered_sample_loss"

    def reduce(self, losses, logits, tokens, anchor):
        return losses.mean(-1) - losses.flatten(1).mean(-1, keepdim=True)


def sequence_loss(module, tokens):
    """``[batch]`` per-sequence mean token loss (the pathwise base's ``token_loss``)."""
    return token_losses(module(tokens), tokens).mean(-1)


def organism(seed: int, rate: float, s: ak.Settings, quick: bool, cache: Path):
    """``(model, SGLD training sequences, probe)`` of ``anomaly_kinds.trigger_run``."""
    steps = {"train_steps": 10} if quick else {}
    model = backdoor.backdoored_model(seed, rate, cache_root=str(cache), **steps).model
    probe = ap.Probe.build(ak.clean_sets(seed, s), (s.n_fit, s.n_calibrate, s.n_test),
                           {"trigger": backdoor.triggered(s.n_test, seed)})
    return model, backdoor.sgld_data(s.n_sgld_train, seed, rate), probe


def base_chi0(terms: list[list], halves, n_pairs: int, law: dict) -> suscept.Estimate:
    """``chi0 [N, K]`` (``-Cov0``) from the first ``n_pairs`` pairs of the pool chains in
    ``halves`` (two lists), its ``meta["split_half"]`` between them (as
    :func:`suscept.pathwise_susceptibility`): pathwise pair terms, or the interpolation
    estimator's pair values ``Q [K, N]`` (:mod:`suscept.interpolation`)."""
    sums = MeanSums if torch.is_tensor(terms[0][0]) else Sums
    first = sums()
    for c in halves[0]:
        for t in terms[c][:n_pairs]:
            first.add(t)
    second = sums(first.shift)
    for c in halves[1]:
        for t in terms[c][:n_pairs]:
            second.add(t)
    value, se, parts = first.merge(second).result()
    what = "interpolation" if sums is MeanSums else "pathwise"
    return suscept.Estimate(-value.T, se.T, ("token", "component"), "susceptibility",
                            f"-Cov0(phi_C, l^C_i - Lbar_S(w^C)), {what}; < 0: lowers C's loss",
                            {**parts, "split_half": split_half(first, second), "law": law})


def coupled(d, twin, terms, chains, skip: int, ks: int, kb_pairs: int, cfg, law):
    """``(chi, added, chi0)`` Estimates ``[N, K]`` from SGLD chains ``chains`` (draws
    ``skip .. skip + ks``), their twins and the same pool chains (``kb_pairs`` pairs each)."""
    cut = slice(skip, skip + ks)
    run = {k: d[k][chains, cut] for k in (PHI, RESTRICTED)}
    tw = {k: twin[k][chains, cut] for k in (PHI, RESTRICTED)}
    half = len(chains) // 2
    chi0 = base_chi0(terms, (chains[:half], chains[half:]), kb_pairs, law)
    chi, added = suscept.coupled_susceptibility(run, tw, chi0, config=cfg,
                                                n_blocks=min(5, ks))
    return chi, added, chi0


def split(d, twin, skip, t_run, t_twin, n_twin, t_pool, t_jac, terms, budget) -> dict:
    """The split of ``budget`` CPU seconds between SGLD draws (with twins) and base draws,
    in the ratio of :func:`experiments.benchmarks.pathwise.allocation`, capped by the twins
    and the pool."""
    chains, draws = d[PHI].shape[:2]
    n_pool = 2 * sum(len(t) for t in terms)
    c_run = t_run / (chains * draws) + t_twin / (chains * n_twin)
    c_b = (t_pool - t_jac) / n_pool
    v_b = base_chi0(terms, HALVES, len(terms[0]), {}).stderr ** 2 * n_pool
    s_p, sizes, n = block_sums(d[PHI], d[RESTRICTED], True, 5)
    v_plain = combine_se(s_p, sizes, n) ** 2 * n
    short = {k: v[:, :n_twin] for k, v in d.items()}
    alloc = allocation(short, twin, skip, c_run * chains * n_twin, chains * n_twin, v_b, c_b,
                       v_plain, t_run / n)
    r = alloc["base_per_sgld_draw"]
    spend = budget - chains * skip * c_run - t_jac
    ks = min(n_twin - skip, max(2, int(spend / (c_run + r * c_b) / chains)))
    kb_pairs = min(len(terms[0]), max(2, int(r * ks / 2)))
    left = spend - chains * (ks * c_run + 2 * kb_pairs * c_b)
    if kb_pairs == len(terms[0]):  # the pool ran out: the rest to the SGLD draws
        ks = min(n_twin - skip, ks + max(0, int(left / c_run / chains)))
    elif ks == n_twin - skip:  # the twins ran out: the rest to the base
        kb_pairs = min(len(terms[0]), kb_pairs + max(0, int(left / c_b / chains / 2)))
    seconds = chains * ((skip + ks) * c_run + 2 * kb_pairs * c_b) + t_jac
    return {**alloc, "c_plain": t_run / n, "ks": ks, "kb_pairs": kb_pairs, "skip": skip,
            "seconds": seconds, "over_budget": seconds > budget, "sgld_fraction": ks / draws,
            "base_draws_per_sgld_draw": 2 * kb_pairs / ks}


def profile_figures(chi: torch.Tensor, halves: tuple, probe: ap.Probe, names
                    ) -> tuple[dict, torch.Tensor]:
    """Split-half (per component; mean, min, max) and detection of one profile ``[N, K]``;
    and the detector's scores ``[N]``."""
    r = spearman(*halves)
    scores, _ = ap.detector(chi, probe, names)
    got = ap.evaluate(scores, probe, probe.part_of("trigger"))
    return {"split_half": r.tolist(), "split_half_mean": float(r.mean()),
            "split_half_range": [float(r.min()), float(r.max())], **got}, scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny end-to-end smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.03)
    parser.add_argument("--pool", type=int, help="pathwise pool draws per chain (default 240, "
                        "quick 8)")
    parser.add_argument("--grad-every", type=int, help="default 32, quick 4")
    parser.add_argument("--base", choices=("pathwise", "interpolation"), default="pathwise",
                        help="the spring-only base's estimator (interpolation: a draw costs "
                        "about 10 evaluations or more; give a smaller --pool)")
    parser.add_argument("--draws", type=int, help="SGLD draws per chain (default: full mode's "
                        "200; quick 12)")
    parser.add_argument("--out", default=str(ROOT / "results" / "backdoor_coupled"))
    timing.add_arguments(parser, clock="cpu")
    args = parser.parse_args(argv)
    args.threads = args.threads or 1
    timing.configure(args)
    s = QUICK if args.quick else ak.Settings()
    if args.draws:
        s = dataclasses.replace(s, sgld=replace(s.sgld, n_draws=args.draws))
    pool = args.pool or (8 if args.quick else 220)
    grad_every = args.grad_every or (4 if args.quick else 32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "zoo" if args.quick else ROOT / "results" / "backdoor_zoo"
    model, train, probe = organism(args.seed, args.rate, s, args.quick, cache)
    cfg, names = s.sgld, list(ap.COMPONENTS)
    plan = EvaluationPlan(model, probe.tokens, [
        MeanLoss(tuple(names), name=PHI, relative=True),
        CenteredSampleLoss(tuple(names), name=RESTRICTED)])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), cpu clock; load "
          f"{load():.2f}; seed {args.seed}, rate {args.rate}; {cfg.n_chains} x {cfg.n_draws} "
          f"draws, thin {cfg.thin}; probe {tuple(probe.tokens.shape)}; pool {pool} per chain")
    run, t_run, l_run = timed(lambda: suscept.sample(
        model, lm_loss, train, cfg, observables=plan, stream=[suscept.Paired(PHI, RESTRICTED)],
        store_draws=[PHI, RESTRICTED], progress=False))
    d = {k: run.draws[k] for k in (PHI, RESTRICTED)}
    skip = coupling_skip(cfg)
    n_twin = min(cfg.n_draws, skip + max(cfg.n_draws // 6, 5))  # 5 blocks for V_d
    twin, t_twin, _ = timed(lambda: suscept.spring_draws(
        model, replace(cfg, n_draws=n_twin), plan, start="stationary"))
    pool_cfg = replace(cfg, n_draws=pool, seed=cfg.seed + 1)
    law = {k: getattr(pool_cfg, k) for k in ("step_size", "gamma", "weight_decay", "seed")}

    def pathwise_pool():
        masks = [c.mask() for c in plan.components.values()]
        if args.base == "interpolation":
            base = InterpolationBase(model, pool_cfg, sequence_loss, probe.tokens, masks)
            return [list(base.pairs(c, pool // 2)) for c in range(cfg.n_chains)], base.seconds
        base = PathwiseBase(model, pool_cfg, plan, sequence_loss, probe.tokens, masks)
        terms = [list(base.pairs(c, pool // 2, grad_every)) for c in range(cfg.n_chains)]
        return terms, base.seconds

    (terms, parts), t_pool, l_pool = timed(pathwise_pool)
    spectrum, t_spec, _ = timed(lambda: suscept.regime.hessian_spectrum(
        model, lm_loss, train[:256], **({"n_probes": 1, "n_lanczos": 3} if args.quick else {})))
    print(f"CPU s: SGLD {t_run:.1f} (load {l_run[0]:.1f}/{l_run[1]:.1f}), twins {t_twin:.1f} "
          f"({n_twin} draws per chain), {args.base} pool {t_pool:.1f} "
          f"({', '.join(f'{k} {v:.1f}' for k, v in parts.items())}; load {l_pool[1]:.1f}), "
          f"Hessian spectrum {t_spec:.1f}")
    sp = split(d, twin, skip, t_run, t_twin, n_twin, t_pool, parts.get("jacobian", 0.0), terms,
               t_run)
    ks, kb = sp["ks"], sp["kb_pairs"]
    print("split: " + ", ".join(f"{k} {v:.3g}" for k, v in sp.items() if not isinstance(v, dict))
          + "".join(f"; {k}: " + ", ".join(f"{a} {b:.3g}" for a, b in sp[k].items())
                    for k in ("median", "mean")))
    every = list(range(cfg.n_chains))
    chi, added, chi0 = coupled(d, twin, terms, every, skip, ks, kb, cfg, law)
    halves = [coupled(d, twin, terms, h, skip, ks, kb, cfg, law) for h in HALVES]
    full0 = base_chi0(terms, HALVES, pool // 2, law)
    full0_halves = [base_chi0(terms, ([h[0]], [h[1]]), pool // 2, law) for h in HALVES]
    profiles = {
        "plain": (chi_plain(d, every), [chi_plain(d, h) for h in HALVES], t_run),
        "coupled": (chi.value, [h[0].value for h in halves], sp["seconds"]),
        "added (chi - chi0)": (added.value, [h[1].value for h in halves], None),
        "chi0 of the coupled split": (chi0.value, [h[2].value for h in halves], None),
        "chi0, whole pool": (full0.value, [h.value for h in full0_halves],
                             t_pool + 0.0)}
    draws = {"plain": cfg.n_chains * cfg.n_draws, "coupled": f"{cfg.n_chains * ks} SGLD + "
             f"{cfg.n_chains * 2 * kb} base", "chi0, whole pool": cfg.n_chains * pool}
    figures, scores = {}, {}
    print(f"\n{'profile':<28}{'draws':>22}{'CPU s':>8}{'split-half mean (range)':>28}"
          f"{'AUROC ± se':>14}{'TPR@5%':>8}")
    for name, (value, hv, sec) in profiles.items():
        f, scores[name] = profile_figures(value, hv, probe, names)
        figures[name] = {**f, "cpu_seconds": sec, "draws": draws.get(name)}
        lo, hi = f["split_half_range"]
        print(f"{name:<28}{str(draws.get(name, '')):>22}{sec or float('nan'):>8.1f}"
              f"{f['split_half_mean']:>12.2f} ({lo:+.2f} to {hi:+.2f})"
              f"{f['auroc']:>8.2f} ± {f['auroc_se']:.2f}{f['tpr_at_5fpr']:>8.2f}")
    pairs = (("coupled", "plain"), ("chi0 of the coupled split", "plain"),
             ("coupled", "chi0 of the coupled split"))
    diffs = {f"{a} - {b}": ap.difference(scores, probe, probe.part_of("trigger"), a, b)
             for a, b in pairs}
    print("AUROC differences (paired DeLong): " + "; ".join(
        f"{k} {v['value']:+.2f} ± {v['stderr']:.2f}" for k, v in diffs.items()))
    agree = suscept.regime.agreement(run, full0)
    regime = suscept.regime.assess(cfg, spectrum.d, spectrum=spectrum, agreement=agree)
    norms = {"added_over_chi0": float(added.value.norm() / chi0.value.norm()),
             "added_over_chi": float(added.value.norm() / chi.value.norm()),
             "added_median_abs_z": float((added.value / added.stderr).abs().median()),
             "chi_vs_chi0_profile_spearman": spearman(chi.value, chi0.value).tolist()}
    print(f"\n{regime}\nagreement of the plain profile with chi0 (whole pool): "
          f"{agree['spearman']:.3f} (ceiling {agree['ceiling']:.3f}, ratio {agree['ratio']:.2f})"
          f"\n|added| / |chi0| = {norms['added_over_chi0']:.3f}, |added| / |chi| = "
          f"{norms['added_over_chi']:.3f}, median |added / se| = "
          f"{norms['added_median_abs_z']:.2f}; load {load():.2f}")
    report = {"settings": vars(args) | {"sampler": dataclasses.asdict(cfg), "pool": pool,
                                        "grad_every": grad_every, "components": names,
                                        "observable": "per-sequence centered loss"},
              "seconds": {"run": t_run, "twin": t_twin, "twin_draws_per_chain": n_twin,
                          "pool": t_pool, "pool_parts": parts, "spectrum": t_spec},
              "load": {"run": l_run, "pool": l_pool, "end": load()},
              "split": sp, "profiles": figures, "auroc_differences": diffs, "norms": norms,
              "pool_variances": {k: full0.meta[k] for k in ("var_pair", "var_path", "n_pairs",
                                                             "n_gradient_pairs")
                                 if k in full0.meta},
              "regime": regime.as_dict() | {"agreement_detail": agree}}
    tag = (f"{'quick_' if args.quick else ''}rate{args.rate:g}_seed{args.seed}"
           + ("_interpolation" if args.base == "interpolation" else ""))
    (out / f"backdoor_coupled_{tag}.json").write_text(json.dumps(report, indent=1, default=str))
    torch.save({"part": probe.part, "chi": chi.value, "added": added.value, "chi0": chi0.value,
                "plain": profiles["plain"][0], "chi0_pool": full0.value},
               out / f"profiles_{tag}.pt")
    print(f"wrote {out / f'backdoor_coupled_{tag}.json'}")
    return report


if __name__ == "__main__":
    main()
