"""Time to split-half 0.8 of the zoo 8-head matrix with the pathwise spring-only base.

Same model, data, probe and sampler settings as ``variance.py`` (zoo ``attn`` seed 0, SGLD step
1e-3, n_beta 30, gamma 300, 4 chains, minibatch 64, thin 4), every evaluation by the lean plan
(``phi`` and ``restricted_token_loss`` only). One process, CPU seconds of each part, then:

- ``plain, sequential``: the one-run matrix ``chi`` (reference);
- ``coupled, antithetic base``: ``C(run) - C(stationary twins) + C_anti(i.i.d. pool)``
  (:func:`suscept.coupled.coupled_covariance`), at the split the per-part variances call for;
- ``coupled, pathwise base``: the same with the base of :mod:`suscept.pathwise` (antithetic
  pairs, linear control variate, Stein gradient term every ``--grad-every`` pairs);
- ``coupled, interpolation base``: the same with the base of :mod:`suscept.interpolation`
  (mirrored pairs, a restricted gradient and a JVP per component), ``--interp-pool`` draws;
- and the spring-only matrix ``chi0`` alone (a different estimand, the ``n_beta -> 0``
  control): antithetic i.i.d. against pathwise and interpolation.

Split-half halves: SGLD chains {0, 1} / {2, 3} with pool groups 0-3 / 4-7. Seconds of a row at
``k`` of the ``draws``: its SGLD fraction of the run and twins, the skipped coupling draws and
``k / draws`` of its base (the pathwise base's one-off token Jacobian included in that share).

    python experiments/benchmarks/pathwise.py [--quick] [--draws 160] [--pool 960]
        [--interp-pool 320] [--grad-every 16] [--n-heads 4] [--fractions 0.15 0.4]
        [--seed 0] [--cuts 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import observables as ob  # noqa: E402
import suscept  # noqa: E402
from experiments.benchmarks import timing  # noqa: E402
from experiments.benchmarks.sweep import CHAINS, HALVES, config, load, split_half_r  # noqa: E402
from experiments.benchmarks.variance import (  # noqa: E402
    POOL_CHAINS,
    chi_plain,
    iid_row,
    pool_groups,
    prefix,
    table,
    timed,
)
from experiments.zoo.language import make_dataset  # noqa: E402
from experiments.zoo.train import EVAL_SEED, train_or_load  # noqa: E402
from observables.adapter import Adapter  # noqa: E402
from observables.components import expand  # noqa: E402
from observables.lm import lm_loss, token_losses  # noqa: E402
from suscept.control_variates import block_sums, combine_se  # noqa: E402
from suscept.coupled import (  # noqa: E402
    base_sums,
    coupling_skip,
    spring_draws,
)
from suscept.interpolation import InterpolationBase  # noqa: E402
from suscept.pathwise import PathwiseBase, combine  # noqa: E402
from suscept.susceptibilities import PHI, RESTRICTED  # noqa: E402


def token_loss(module, tokens):
    return token_losses(module(tokens), tokens)


def pathwise_pool(model, cfg, plan, probe, comps, n_pool: int, grad_every: int):
    """Pair terms per pool group ``[POOL_CHAINS][pairs]`` and the base's CPU seconds."""
    pool_cfg = replace(cfg, n_chains=POOL_CHAINS, n_draws=n_pool // POOL_CHAINS,
                       seed=2000 + cfg.seed)
    base = PathwiseBase(model, pool_cfg, plan, token_loss, probe, [c.mask() for c in comps])
    terms = [list(base.pairs(c, pool_cfg.n_draws // 2, grad_every)) for c in range(POOL_CHAINS)]
    return terms, base.seconds


def phi_linear(model, cfg, probe, comps, n_pool: int) -> torch.Tensor:
    """``ell [pairs, K]``: the linear part ``(M_k grad Lbar_S(w*)) . d`` of each pool pair's
    ``o_phi`` (``mu = w*``: no weight decay), from the same pairs' ``d`` (regenerated from the
    pool's noise, in order), for :func:`pair_parts`. Not timed."""
    from suscept.model import build_mask, private_copy
    from suscept.sample import chain_generators
    from suscept.spring import stationary

    pool_cfg = replace(cfg, n_chains=POOL_CHAINS, n_draws=n_pool // POOL_CHAINS,
                       seed=2000 + cfg.seed)
    fm = private_copy(model)
    anchor = fm.params.detach().clone()
    _, sd = stationary(pool_cfg, anchor)
    fm.grad.zero_()
    token_loss(fm.module, probe).mean().backward()
    g = torch.stack([build_mask(fm, c.mask()) for c in comps]).double() * fm.grad.double()
    out = []
    for chain in range(POOL_CHAINS):
        noise, _ = chain_generators(pool_cfg.seed, chain, anchor.device)
        for _ in range(pool_cfg.n_draws // 2):
            d = sd * torch.randn(anchor.shape, generator=noise, dtype=anchor.dtype,
                                 device=anchor.device)
            out.append(g @ d.double())
    return torch.stack(out)


def base_cov(terms, groups, k: int, draws: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Cov0 ``[K, X]`` from the first ``k / draws`` of each group's pairs."""
    kp = max(2, round(len(terms[0]) * k / draws))
    return combine([t for g in groups for t in terms[g][:kp]])


def pathwise_row(d, twin, base_value, fraction, draws, skip, t_run, t_base):
    """(matrix(h, k), seconds) of the coupled estimator with a spring-only matrix as base:
    ``base_value(h, k)``, ``Cov0 [K, X]`` from the pool groups of chains ``h`` at ``k`` of the
    ``draws``."""
    def matrix(h, k):
        ks = max(2, round(fraction * k))
        run = slice(skip, skip + ks)
        s_run, _, n = block_sums(d[PHI][h, run], d[RESTRICTED][h, run], True, 1)
        s_twin, _, _ = block_sums(twin[PHI][h, run], twin[RESTRICTED][h, run], True, 1)
        return -((s_run - s_twin).sum(0) / (n - 1) + base_value(h, k)).T
    return matrix, (fraction + skip / draws) * t_run + t_base


def interpolation_pool(model, cfg, probe, comps, n_pool: int):
    """Mirrored-pair values ``Q [K, X]`` per pool group ``[POOL_CHAINS][pairs]``
    (:mod:`suscept.interpolation`) and the base's CPU seconds."""
    pool_cfg = replace(cfg, n_chains=POOL_CHAINS, n_draws=n_pool // POOL_CHAINS,
                       seed=3000 + cfg.seed)
    base = InterpolationBase(model, pool_cfg, token_loss, probe, [c.mask() for c in comps])
    qs = [list(base.pairs(c, pool_cfg.n_draws // 2)) for c in range(POOL_CHAINS)]
    return qs, base.seconds


def interpolation_cov(qs, groups, k: int, draws: int) -> torch.Tensor:
    """Cov0 ``[K, X]``: the mean of the first ``k / draws`` of each group's pair values."""
    kp = max(1, round(len(qs[0]) * k / draws))
    return torch.stack([q for g in groups for q in qs[g][:kp]]).mean(0)


def allocation(d, twin, skip, t_run, n_all, v_base, c_base, v_plain, c_plain) -> dict:
    """Best split and predicted time factor (as ``variance.allocation``) for a base of
    per-draw variances ``v_base [K, X]`` and cost ``c_base``, against the plain estimator's
    per-draw variances ``v_plain [K, X]`` and cost ``c_plain``; each variance summarised over
    the entries by its median and by its mean (the split-half reliability of a column follows
    the mean noise over its tokens, so the median-based factor is optimistic where the
    base's variance is concentrated on a few entries)."""
    d, twin = ({k: v[:, skip:] for k, v in x.items()} for x in (d, twin))
    s_run, sizes, n = block_sums(d[PHI], d[RESTRICTED], True, 5)
    s_twin, _, _ = block_sums(twin[PHI], twin[RESTRICTED], True, 5)
    v_diff = combine_se(s_run - s_twin, sizes, n) ** 2 * n
    c_run = t_run / n_all
    out = {"c_run_and_twin": c_run, "c_base": c_base}
    for stat in ("median", "mean"):
        v_d, v_b, v_p = (float(getattr(v, stat)()) for v in (v_diff, v_base, v_plain))
        factor = ((v_d * c_run) ** 0.5 + (v_b * c_base) ** 0.5) ** 2 / (v_p * c_plain)
        out[stat] = {"V_difference": v_d / v_p, "V_base": v_b / v_p,
                     "base_per_sgld_draw": (v_b * c_run / (v_d * c_base)) ** 0.5,
                     "predicted_x_plain": factor}
    out["base_per_sgld_draw"] = out["median"]["base_per_sgld_draw"]
    return out


def pair_parts(terms, v_plain, layers, ell) -> dict:
    """Where the pathwise base's pair-term variance lies, per layer: the mean over its heads'
    entries of ``Var(C(e_phi, e_y))`` (curvature products) and ``Var(o_phi r)`` (the odd
    parts beyond the linear control variate), per pair, relative to the plain per-draw
    variance ``v_plain [K, X]``; and how much of ``o_phi`` is linear: ``corr(o_phi, ell)``
    (``ell [pairs, K]``, :func:`phi_linear`) and ``Var((o_phi - ell) r) / Var(o_phi r)``, what a
    second linear control variate (on ``phi``) with its Stein term would leave."""
    ts = [t for g in terms for t in g]
    ep, ey = torch.stack([t.e_phi for t in ts]), torch.stack([t.e_y for t in ts])
    op, r = torch.stack([t.o_phi for t in ts]), torch.stack([t.r for t in ts])
    even = (ep - ep.mean(0))[..., None] * (ey - ey.mean(0))
    odd, rest = op[..., None] * r, (op - ell)[..., None] * r
    out = {}
    for layer in sorted(set(layers)):
        k = [i for i, v in enumerate(layers) if v == layer]
        vp = float(v_plain[k].mean())
        corr = [float(torch.corrcoef(torch.stack([op[:, i], ell[:, i]]))[0, 1]) for i in k]
        out[f"layer {layer}"] = {
            "even x even": float(even[:, k].var(0).mean()) / vp,
            "odd x odd beyond linear": float(odd[:, k].var(0).mean()) / vp,
            "corr(o_phi, linear) min": min(corr), "corr(o_phi, linear) max": max(corr),
            "left by a linear phi control variate":
                float(rest[:, k].var(0).mean() / odd[:, k].var(0).mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (a few draws)")
    ap.add_argument("--draws", type=int, help="SGLD draws per chain (default 160, quick 8)")
    ap.add_argument("--thin", type=int, default=4)
    ap.add_argument("--pool", type=int, help="spring-only draws per base (default 6 x draws)")
    ap.add_argument("--grad-every", type=int, default=16)
    ap.add_argument("--interp-pool", type=int, help="draws of the interpolation base "
                    "(default half the SGLD draws of all chains; 0: leave it out)")
    ap.add_argument("--fractions", type=float, nargs="*", default=[],
                    help="also the pathwise coupled rows at these fractions of the SGLD draws")
    ap.add_argument("--seed", type=int, default=0, help="the SGLD run's seed; the pools' are "
                    "1000, 2000 and 3000 more")
    ap.add_argument("--cuts", type=int, default=4, help="points of each split-half curve")
    ap.add_argument("--n-heads", type=int, default=4, help="heads per layer (2 layers): the "
                    "zoo variant of sweep.py --n-heads, trained if not cached")
    timing.add_arguments(ap, clock="cpu")
    ap.add_argument("--out", default=str(ROOT / "results" / "pathwise"))
    args = ap.parse_args()
    args.threads = args.threads or 1
    timing.configure(args)
    draws = args.draws or (8 if args.quick else 160)
    n_pool = args.pool or 6 * draws
    n_pool -= n_pool % (2 * POOL_CHAINS)
    variant = None if args.n_heads == 4 else {"n_heads": args.n_heads,
                                               "d_head": 64 // args.n_heads}
    model = train_or_load("attn", seed=0, cache_dir=ROOT / "results" / "zoo",
                          model_kw=variant).model
    train = make_dataset(1024 if args.quick else 4096, seed=0).tokens
    probe = make_dataset(16 if args.quick else 64, seed=EVAL_SEED).tokens
    comps = expand("all heads", Adapter.of(model))
    specs, streams = ob.runs.susceptibility_observables([c.name for c in comps])
    plan = ob.EvaluationPlan(model, probe, specs[:2])
    cfg = replace(config(draws, args.thin, 1), seed=args.seed)
    keep = [PHI, RESTRICTED]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock;"
          f" load {load():.2f}; {CHAINS} chains x {draws} draws, thin {args.thin}, pool "
          f"{n_pool}, grad_every {args.grad_every}")
    run, t_run, l_run = timed(lambda: suscept.sample(
        model, lm_loss, train, cfg, observables=plan, stream=streams, store_draws=keep,
        progress=False))
    d = {k: run.draws[k] for k in keep}
    twin, t_twin, _ = timed(lambda: spring_draws(model, cfg, plan, start="stationary"))
    anti_cfg = replace(cfg, n_chains=POOL_CHAINS, n_draws=n_pool // POOL_CHAINS,
                       seed=1000 + cfg.seed)
    anti_run, t_anti, _ = timed(lambda: suscept.spring_sample(
        model, lm_loss, train, anti_cfg, observables=plan, stream=[], store_draws=keep,
        antithetic=True, progress=False))
    anti = {k: anti_run.draws[k] for k in keep}
    (terms, parts), t_path, l_path = timed(lambda: pathwise_pool(
        model, cfg, plan, probe, comps, n_pool, args.grad_every))
    n_interp = CHAINS * draws // 2 if args.interp_pool is None else args.interp_pool
    n_interp -= n_interp % (2 * POOL_CHAINS)
    if n_interp:
        (qs, interp_parts), t_interp, _ = timed(lambda: interpolation_pool(
            model, cfg, probe, comps, n_interp))
        print(f"CPU s: interpolation pool of {n_interp} draws {t_interp:.1f} ("
              + ", ".join(f"{k} {v:.1f}" for k, v in interp_parts.items()) + ")")
    print(f"CPU s: SGLD {t_run:.1f} (load {l_run[0]:.1f}/{l_run[1]:.1f}), twins {t_twin:.1f}, "
          f"antithetic pool {t_anti:.1f}, pathwise pool {t_path:.1f} "
          f"({', '.join(f'{k} {v:.1f}' for k, v in parts.items())}; load {l_path[1]:.1f})")
    skip = coupling_skip(cfg)
    n_all = CHAINS * draws
    s_plain, sizes, n = block_sums(d[PHI], d[RESTRICTED], True, 5)
    v_plain = combine_se(s_plain, sizes, n) ** 2 * n  # [K, X] per draw
    s_anti, sizes_b, n_b = base_sums(anti[PHI], anti[RESTRICTED], True, True, 5)
    v_anti = combine_se(s_anti, sizes_b, n_b) ** 2 * n_pool  # [K, X] per draw
    _, se_path, path_parts = combine([t for g in terms for t in g])
    v_path = se_path ** 2 * n_pool
    alloc = {"antithetic": allocation(d, twin, skip, t_run + t_twin, n_all, v_anti,
                                      t_anti / n_pool, v_plain, t_run / n_all),
             "pathwise": allocation(d, twin, skip, t_run + t_twin, n_all, v_path,
                                    t_path / n_pool, v_plain, t_run / n_all)}
    if n_interp:
        q_all = torch.stack([q for g in qs for q in g])
        v_interp = q_all.var(0) * 2  # per draw: a pair is two draws
        alloc["interpolation"] = allocation(d, twin, skip, t_run + t_twin, n_all, v_interp,
                                            t_interp / n_interp, v_plain, t_run / n_all)
    layers = [c.head[0] for c in comps]
    ell = phi_linear(model, cfg, probe, comps, n_pool)
    chi_lin = suscept.first_order_susceptibility(model, cfg, token_loss, probe,
                                                 [c.mask() for c in comps]).value
    parts_by_layer = pair_parts(terms, v_plain, layers, ell)
    print(f"per-draw variances (median / mean over entries): plain "
          f"{float(v_plain.median()):.3g} / {float(v_plain.mean()):.3g}; pathwise pair term "
          f"{path_parts['var_pair']:.3g} per pair (median), gradient term "
          f"{path_parts['var_path']:.3g} per gradient pair")
    for label, a in alloc.items():
        print(f"  {label}: c_run_and_twin {a['c_run_and_twin']:.3g}, c_base {a['c_base']:.3g}"
              + "".join(f"; {stat}: " + ", ".join(f"{k} {v:.3g}" for k, v in a[stat].items())
                        for stat in ("median", "mean")))
    print("  pathwise pair term per pair, mean over entries / plain per-draw variance: "
          + "; ".join(f"{k}: " + ", ".join(f"{p} {v:.3f}" for p, v in parts.items())
                      for k, parts in parts_by_layer.items()))
    frac = {k: min(1.0, max(1 / 16, n_pool / alloc[k]["base_per_sgld_draw"] / n_all))
            for k in ("antithetic", "pathwise")}
    methods = {"plain, sequential": (lambda h, k: chi_plain(prefix(d, k), h), t_run)}
    methods[f"coupled, {frac['antithetic']:.3g} SGLD, antithetic base"] = iid_row(
        d, twin, anti, True, frac["antithetic"], draws, skip, t_run + t_twin, t_anti)
    def path_value(h, k):
        return base_cov(terms, pool_groups(h), k, draws)[0]

    def interp_value(h, k):
        return interpolation_cov(qs, pool_groups(h), k, draws)
    methods[f"coupled, {frac['pathwise']:.3g} SGLD, pathwise base"] = pathwise_row(
        d, twin, path_value, frac["pathwise"], draws, skip, t_run + t_twin, t_path)
    for f in args.fractions:
        methods[f"coupled, {f:.3g} SGLD, pathwise base"] = pathwise_row(
            d, twin, path_value, f, draws, skip, t_run + t_twin, t_path)
    if n_interp:
        frac["interpolation"] = min(1.0, max(1 / 16, n_interp / alloc["interpolation"][
            "base_per_sgld_draw"] / n_all))
        methods[f"coupled, {frac['interpolation']:.3g} SGLD, interpolation base"] = \
            pathwise_row(d, twin, interp_value, frac["interpolation"], draws, skip,
                         t_run + t_twin, t_interp)
    cuts = sorted({max(2, draws * i // args.cuts) for i in range(1, args.cuts + 1)})
    report = {"settings": vars(args) | {"draws": draws, "pool": n_pool, "skip": skip},
              "seconds": {"run": t_run, "twin": t_twin, "antithetic": t_anti,
                          "pathwise": t_path, "pathwise_parts": parts,
                          **({"interpolation": t_interp, "interpolation_parts": interp_parts,
                              "interpolation_draws": n_interp} if n_interp else {})},
              "allocation": alloc, "pair_parts": parts_by_layer,
              "methods": table(methods, draws, cuts, n_all)}

    def spring_only(which):
        def matrix(h, k):
            g = pool_groups(h)
            if which == "pathwise":
                return -base_cov(terms, g, k, draws)[0].T
            if which == "interpolation":
                return -interpolation_cov(qs, g, k, draws).T
            kb = max(2, 2 * round(anti[PHI].shape[1] * k / draws / 2))
            s, _, n = base_sums(anti[PHI][g, :kb], anti[RESTRICTED][g, :kb], True, True, 1)
            return -(s.sum(0) / (n - 1)).T
        return matrix
    print("\nthe spring-only matrix chi0 alone (the n_beta -> 0 control; another estimand):")
    rows = {"spring-only, antithetic i.i.d.": (spring_only("anti"), t_anti),
            "spring-only, pathwise": (spring_only("pathwise"), t_path)}
    if n_interp:
        rows["spring-only, interpolation"] = (spring_only("interpolation"), t_interp)
    report["spring_only"] = table(rows, draws, cuts, n_all)
    a, b = (split_half_r(spring_only(w)(list(range(CHAINS)), draws), chi_plain(d, range(CHAINS)))
            for w in ("anti", "pathwise"))
    print(f"agreement of chi0 with the run's chi: antithetic {a:.3f}, pathwise {b:.3f}; "
          f"load {load():.2f}")
    report["chi0_vs_run"] = {"antithetic": a, "pathwise": b, "halves": HALVES}
    if n_interp:
        v_path_all, se_path_all, _ = combine([t for g in terms for t in g])
        q_all = torch.stack([q for g in qs for q in g])
        z = (q_all.mean(0) - v_path_all) / (q_all.var(0) / len(q_all) + se_path_all**2).sqrt()
        same = {"mean_z2": float((z**2).mean()), "share_above_3": float((z.abs() > 3).double()
                                                                        .mean()),
                "max_abs_z": float(z.abs().max()), "entries": z.numel()}
        print(f"chi0 by interpolation against pathwise, entry by entry (the same estimand): "
              f"mean z^2 {same['mean_z2']:.3f}, |z| > 3 in {same['share_above_3']:.4f} of "
              f"{same['entries']} entries, max |z| {same['max_abs_z']:.2f}")
        report["interpolation_vs_pathwise"] = same
    chi0 = spring_only("pathwise")(list(range(CHAINS)), draws)
    r_run = split_half_r(chi_plain(d, list(HALVES[0])), chi_plain(d, list(HALVES[1])))
    first = {"agreement_with_run": split_half_r(chi_lin, chi_plain(d, range(CHAINS))),
             "run_ceiling": (2 * r_run / (1 + r_run)) ** 0.5,
             "norm_vs_chi0": float(chi_lin.norm() / chi0.norm()),
             "norm_vs_chi0_per_head": (chi_lin.norm(dim=0) / chi0.norm(dim=0)).tolist()}
    print(f"first-order term chi_lin = -s^2 grad Lbar_S . grad y (deterministic): agreement with "
          f"the run's chi {first['agreement_with_run']:.3f} (the run's ceiling about "
          f"{first['run_ceiling']:.3f}); ||chi_lin|| / ||chi0|| {first['norm_vs_chi0']:.3f}, "
          "per head " + ", ".join(f"{v:.2f}" for v in first["norm_vs_chi0_per_head"]))
    report["first_order"] = first
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"pathwise{'_quick' if args.quick else ''}_heads{2 * args.n_heads}.json")
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
