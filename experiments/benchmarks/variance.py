"""Variance per unit of compute on the zoo 8-head susceptibility matrix: every lever, one run.

The zoo model, data, probe and sampler settings are those of ``experiments/benchmarks/sweep.py``
(``train_or_load("attn", seed=0)``, SGLD step 1e-3, n_beta 30, gamma 300, 4 chains, minibatch
64, seed 0, thin 4); the matrix is the one-run ``chi [token, head]`` (docs/theory.md section 5).
Methods, all from the same SGLD chains where they can be:

- ``plain, sequential``: ``suscept.sample`` (what ``observables.one_run`` runs);
- ``plain, batched``: the same chains with ``batched=Batched(directions=V)`` (one vmapped
  forward/backward per step for all chains; it also records the Stein features);
- ``control variates``: :func:`suscept.control_variates.cv_covariance` on the batched run's
  draws, directions ``V`` = the 8 heads' masked probe-loss gradients at w* (``M_C * grad
  Lbar_S(w*)``, the gradients of ``phi_C``), 8 + 36 features;
- ``coupled``: :func:`suscept.coupled.coupled_covariance`: the SGLD chains, their spring-only
  twins on the same noise and ``--independent`` independent spring-only chains (no gradients;
  only their evaluations cost).

For each: split-half reliability ``r`` (mean over heads of the Spearman between the standardized
matrices of chains {0, 1} and {2, 3}; ``sweep.split_half_r``) at 1/4, 1/2, 3/4 and all of the
draws, draws to ``r = 0.8`` (``sweep.draws_to_target``: measured, or Spearman-Brown extrapolated
from the last point, labelled ``extrap``), seconds = draws x the method's measured seconds per
draw, and the time ratio against the plain sequential run. Seconds are this process's CPU
time by default (``--clock cpu``, robust to other load on a shared machine; 1 thread). The
variance factor at equal compute is ``(time to 0.8 of the method) / (time of plain)``.
Also: batched chains-per-second against the sequential sampler on the zoo model and on an
MLP, and the schedule chosen from the plain run's IAT and measured costs
(:func:`suscept.schedule.schedule`).

    python experiments/benchmarks/variance.py [--quick] [--draws D] [--threads 1]
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
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import observables as ob  # noqa: E402
import suscept  # noqa: E402
from experiments.benchmarks import timing  # noqa: E402
from experiments.benchmarks.sweep import (  # noqa: E402
    CHAINS,
    GAMMA,
    HALVES,
    TARGET,
    config,
    draws_to_target,
    load,
    split_half_r,
)
from experiments.zoo.language import make_dataset  # noqa: E402
from experiments.zoo.train import EVAL_SEED, train_or_load  # noqa: E402
from observables.adapter import Adapter  # noqa: E402
from observables.components import expand  # noqa: E402
from observables.lm import lm_loss  # noqa: E402
from suscept.batched import STEIN, Batched  # noqa: E402
from suscept.control_variates import block_sums, combine_se, cv_covariance  # noqa: E402
from suscept.coupled import coupled_covariance, coupling_skip, spring_draws  # noqa: E402
from suscept.model import build_mask, private_copy  # noqa: E402
from suscept.schedule import schedule, thinned_iat  # noqa: E402
from suscept.susceptibilities import PHI, RESTRICTED  # noqa: E402


def head_directions(model, probe, comps) -> torch.Tensor:
    """``[K, d]`` unit rows ``M_C * grad Lbar_S(w*)``: the gradient of each ``phi_C`` at w*."""
    fm = private_copy(model)
    lm_loss(fm.module, probe).mean().backward()
    rows = torch.stack([build_mask(fm, c.mask()) * fm.grad for c in comps])
    return rows / rows.norm(dim=1, keepdim=True)


def chi_plain(d: dict, chains) -> torch.Tensor:
    s, _, n = block_sums(d[PHI][chains], d[RESTRICTED][chains], True, 1)
    return -(s.sum(0) / (n - 1)).T


def chi_cv(d: dict, chains) -> torch.Tensor:
    _, cv = cv_covariance(d[PHI][chains], d[RESTRICTED][chains], d[STEIN][chains],
                          paired=True, n_blocks=1)
    return -cv.value.T


def chi_coupled(d: dict, cpl: dict, ind: dict, chains, ind_chains) -> torch.Tensor:
    est = coupled_covariance((d[PHI][chains], d[RESTRICTED][chains]),
                             (cpl[PHI][chains], cpl[RESTRICTED][chains]),
                             (ind[PHI][ind_chains], ind[RESTRICTED][ind_chains]),
                             paired=True, n_blocks=1)
    return -est.value.T


POOL_CHAINS = 8  # the i.i.d. pool in 8 groups: groups 0-3 and 4-7 go with the two halves


def pool_groups(h) -> list[int]:
    """Pool groups for SGLD chains ``h``: all for all chains, else the half of ``h[0]``."""
    half = POOL_CHAINS // 2
    return list(range(POOL_CHAINS)) if len(h) == CHAINS else \
        list(range(half)) if h[0] == 0 else list(range(half, POOL_CHAINS))


def iid_row(d: dict, twin: dict, pool: dict, anti: bool, fraction: float, draws: int,
            skip: int, t_run: float, t_base: float):
    """(matrix(h, k), seconds) of the coupled estimator with an i.i.d. base: at ``k`` of the
    ``draws`` per chain, ``fraction k`` SGLD draws per chain (and their stationary twins) after
    the ``skip`` draws of :func:`coupling_skip`, and ``k / draws`` of the pool. Seconds: the
    whole budget (``fraction`` of the run plus the skipped draws, the pool)."""
    per_group = pool[PHI].shape[1]

    def matrix(h, k):
        ks = max(2, round(fraction * k))
        kb = max(2, 2 * round(per_group * k / draws / 2))
        g, run = pool_groups(h), slice(skip, skip + ks)
        est = coupled_covariance((d[PHI][h, run], d[RESTRICTED][h, run]),
                                 (twin[PHI][h, run], twin[RESTRICTED][h, run]),
                                 (pool[PHI][g, :kb], pool[RESTRICTED][g, :kb]),
                                 paired=True, antithetic=anti, n_blocks=1)
        return -est.value.T

    return matrix, (fraction + skip / draws) * t_run + t_base


def allocation(d: dict, twin: dict, pool: dict, t_run: float, t_twin: float, t_pool: dict,
               n_all: int, skip: int) -> dict:
    """Per-draw variances of the plain estimator (``V_p``), of the coupled difference (``V_d``,
    per SGLD draw) and of the base (``V_b``, per i.i.d. draw), median over entries of
    ``n se^2`` (5 batch-means blocks per chain); costs per draw; the budget split with the
    least variance per CPU second, ``N_b / N_run = sqrt(V_b c_run / (V_d c_b))``, and the
    predicted time factor against plain, ``(sqrt(V_d c_run) + sqrt(V_b c_b))^2 / (V_p c_p)``;
    ``fraction``: the SGLD draws, as a fraction of the run, that this split gives with the
    whole pool as base (clipped to [1/16, 1]). The difference part skips the first ``skip``
    draws (:func:`coupling_skip`)."""
    s_run, sizes, n = block_sums(d[PHI], d[RESTRICTED], True, 5)
    d, twin = ({k: v[:, skip:] for k, v in x.items()} for x in (d, twin))
    v_p = float((combine_se(s_run, sizes, n) ** 2 * n).median())
    c_p, c_run = t_run / n_all, (t_run + t_twin) / n_all
    out = {}
    for anti, label in ((False, "i.i.d."), (True, "antithetic")):
        n_b = pool[anti][PHI].shape[0] * pool[anti][PHI].shape[1]
        est = coupled_covariance((d[PHI], d[RESTRICTED]), (twin[PHI], twin[RESTRICTED]),
                                 (pool[anti][PHI], pool[anti][RESTRICTED]), paired=True,
                                 antithetic=anti, n_blocks=min(5, d[PHI].shape[1]))
        v_d = est.meta["se_difference_median"] ** 2 * est.meta["n_draws"]
        v_b = est.meta["se_independent_median"] ** 2 * n_b
        c_b = t_pool[anti] / n_b
        ratio = (v_b * c_run / (v_d * c_b)) ** 0.5
        factor = ((v_d * c_run) ** 0.5 + (v_b * c_b) ** 0.5) ** 2 / (v_p * c_p)
        out[label] = {"V_plain": v_p, "V_difference": v_d, "V_base": v_b,
                      "c_plain": c_p, "c_run_and_twin": c_run, "c_base": c_b,
                      "base_per_sgld_draw": ratio, "predicted_x_plain": factor,
                      "fraction": min(1.0, max(1 / 16, n_b / ratio / n_all))}
    return out


def curve(matrix, n_draws: int, cuts: list[int]) -> list[dict]:
    """Split-half r at the first ``k`` draws per chain, ``k`` in cuts; draws = all chains."""
    out = []
    for k in cuts:
        a, b = (matrix(list(h), k) for h in HALVES)
        out.append({"draws": CHAINS * k, "r": split_half_r(a, b)})
    return out


def prefix(d: dict, k: int) -> dict:
    return {name: v[:, :k] for name, v in d.items()}


def timed(fn):
    l0, t0 = load(), timing.now()
    out = fn()
    return out, timing.now() - t0, (l0, load())


# ---- batched chains per second on an MLP -----------------------------------------------------
def mlp_speed(n_chains: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g)
    y = x[:, :4] @ torch.randn(4, 1, generator=g) + 0.1 * torch.randn(2048, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean(-1)

    cfg = suscept.SamplerConfig(step_size=1e-4, n_beta=100.0, gamma=100.0, n_chains=n_chains,
                                n_draws=steps, thin=1, batch_size=32, seed=0)
    probe = (x[:256], y[:256])
    times = {"sequential": [], "batched": []}
    for _ in range(2):  # interleaved
        for name, kw in (("sequential", {}), ("batched", {"batched": True})):
            _, t, _ = timed(lambda kw=kw: suscept.sample(model, loss_fn, (x, y), cfg,
                                                          probe=probe, progress=False, **kw))
            times[name].append(t)
    best = {k: min(v) for k, v in times.items()}
    return {"chains": n_chains, "steps": steps, **best,
            "chain_steps_per_s": {k: n_chains * steps / v for k, v in best.items()},
            "speedup": best["sequential"] / best["batched"]}


def iid_rows(d: dict, twin: dict, pool: dict, t_run: float, t_twin: float, t_pool: dict,
             draws: int, skip: int) -> tuple[dict, dict]:
    """The allocation (:func:`allocation`, printed) and the rows of the coupled estimator with
    an i.i.d. base, plain and antithetic, at the chosen fraction of SGLD draws and at 1/4."""
    alloc = allocation(d, twin, pool, t_run, t_twin, t_pool, CHAINS * draws, skip)
    print("allocation from the per-part variances (median over entries, batch means) and "
          f"CPU costs per draw (difference part after {skip} draws):")
    for label, a in alloc.items():
        print(f"  {label}: " + ", ".join(f"{k} {v:.3g}" for k, v in a.items()))
    rows = {}
    for anti, label in ((False, "i.i.d."), (True, "antithetic")):
        for f in sorted({alloc[label]["fraction"], 0.25}):
            rows[f"coupled, {f:.3g} SGLD, {label} base"] = iid_row(
                d, twin, pool[anti], anti, f, draws, skip, t_run + t_twin, t_pool[anti])
    return alloc, rows


def spring_parts(model, train, cfg, plan, keep: list[str], n_pool: int):
    """Stationary twins of the run's chains and the i.i.d. pool (plain and antithetic, seed
    1000, POOL_CHAINS groups), with their CPU seconds: ``twin, t_twin, pool, t_pool``."""
    twin, t_twin, _ = timed(lambda: spring_draws(model, cfg, plan, start="stationary"))
    pool, t_pool = {}, {}
    for anti in (False, True):
        pool_cfg = replace(cfg, n_chains=POOL_CHAINS, n_draws=n_pool // POOL_CHAINS, seed=1000)
        r, t_pool[anti], _ = timed(lambda c=pool_cfg, a=anti: suscept.spring_sample(
            model, lm_loss, train, c, observables=plan, stream=[], store_draws=keep,
            antithetic=a, progress=False))
        pool[anti] = {k: r.draws[k] for k in keep}
    return twin, t_twin, pool, t_pool


def reanalyse(path: Path, lean: bool) -> None:
    """The plain and i.i.d.-base rows again from draws saved by ``--save-draws`` (the same
    run's draws and CPU seconds). With ``lean``: new stationary twins and pool (same seeds)
    evaluated by a plan without the unused full-model ``mean_loss`` forward, timed here; as a
    check of the clocks, 32 evaluations of the full plan are timed here too and printed beside
    the saved run's seconds per twin draw (one full-plan evaluation)."""
    saved = torch.load(path)
    run, twin, pool, sec = saved["run"], saved["twin"], saved["pool"], saved["seconds"]
    draws, thin = run[PHI].shape[1], saved.get("thin", 4)
    cfg = config(draws, thin, 1)
    skip = coupling_skip(cfg)
    n_pool = pool[False][PHI].shape[0] * pool[False][PHI].shape[1]
    print(f"re-analysis of {path}: {CHAINS} chains x {draws} draws, pool {n_pool}; load "
          f"{load():.2f}; seconds {sec}")
    if lean:
        model = train_or_load("attn", seed=0, cache_dir=ROOT / "results" / "zoo").model
        train = make_dataset(4096, seed=0).tokens
        probe = make_dataset(64, seed=EVAL_SEED).tokens
        names = [c.name for c in expand("all heads", Adapter.of(model))]
        specs, _ = ob.runs.susceptibility_observables(names)
        full_plan = ob.EvaluationPlan(model, probe, specs)
        fm = private_copy(model)
        fm.params.add_(torch.randn(fm.params.shape, generator=torch.Generator().manual_seed(0))
                       / GAMMA**0.5)
        _, t_check, _ = timed(lambda: [full_plan(fm.module) for _ in range(32)])
        twin, t_twin, pool, t_pool = spring_parts(
            model, train, cfg, ob.EvaluationPlan(model, probe, specs[:2]), [PHI, RESTRICTED],
            n_pool)
        sec = {**sec, "twin": t_twin, "pool": t_pool}
        print(f"full-plan evaluation here {t_check / 32:.4f} s, in the saved run "
              f"{saved['seconds']['twin'] / (CHAINS * draws):.4f} s; lean twins {t_twin:.1f} s, "
              f"lean pool {t_pool[False]:.1f} s / {t_pool[True]:.1f} s; load {load():.2f}")
    _, rows = iid_rows(run, twin, pool, sec["run"], sec["twin"], sec["pool"], draws, skip)
    methods = {"plain, sequential": (lambda h, k: chi_plain(prefix(run, k), h), sec["run"]),
               **rows}
    table(methods, draws, sorted({max(2, draws * i // 4) for i in range(1, 5)}),
          CHAINS * draws)


def table(methods: dict, draws: int, cuts: list[int], n_all: int) -> dict:
    """Print and return, per method, the split-half curve, the time to TARGET (x the first
    method's) and the agreement of the all-chains matrix with the first method's (plain)."""
    out: dict = {}
    print(f"\nsplit-half r (chains {{0,1}} vs {{2,3}}) against draws (all chains); time to "
          f"r = {TARGET}")
    print(f"  {'method':<44}{'curve':<40}{'to 0.8':>8}{'how':>7}{'s/draw':>8}{'seconds':>9}"
          f"{'x plain':>8}")
    base = None
    for name, (matrix, seconds) in methods.items():
        c = curve(matrix, draws, cuts)
        tt = draws_to_target(c)
        s_draw = seconds / n_all
        tt["seconds"] = tt["draws"] * s_draw
        base = base or tt["seconds"]
        ratio = tt["seconds"] / base
        out[name] = {"curve": c, "to_target": tt, "s_per_draw": s_draw, "time_ratio": ratio}
        shown = " ".join(f"{p['draws']}:{p['r']:+.2f}" for p in c)
        print(f"  {name:<44}{shown:<40}{tt['draws']:>8.0f}{tt['how']:>7}{s_draw:>8.3f}"
              f"{tt['seconds']:>9.0f}{ratio:>8.2f}")
    full = {name: m(list(range(CHAINS)), draws) for name, (m, _) in methods.items()}
    ref = suscept.standardize(full[next(iter(full))])
    print("\nagreement with the plain matrix (mean Spearman per head of standardized columns) "
          "and its ceiling sqrt(R_plain R_method), R = 2r / (1 + r) from the last split-half r"
          "\n(methods that share the plain run's draws share its noise and may exceed it):")
    r_plain = out[next(iter(out))]["curve"][-1]["r"]
    for name, chi in full.items():
        a = float(suscept.susceptibilities.spearman(ref, suscept.standardize(chi)).mean())
        r_m = out[name]["curve"][-1]["r"]
        ceil = float(suscept.agreement_ceiling(torch.tensor([r_plain]), torch.tensor([r_m]))[0])
        out[name].update(agreement_with_plain=a, ceiling=ceil)
        print(f"  {name:<44}{a:.3f} / {ceil:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (a few draws, ~1 min)")
    ap.add_argument("--draws", type=int, help="draws per chain (default 120, quick 8)")
    ap.add_argument("--thin", type=int, default=4)
    ap.add_argument("--independent", type=int, help="independent spring-only chains "
                    "(default 8, quick 4)")
    ap.add_argument("--pool", type=int, help="exact i.i.d. spring-only draws, plain and "
                    "antithetic each (default 8 x draws, quick 32)")
    timing.add_arguments(ap, clock="cpu")
    ap.add_argument("--save-draws", action="store_true", help="also save the SGLD, twin and "
                    "pool draws (torch.save, a few hundred MB) for re-analysis")
    ap.add_argument("--out", default=str(ROOT / "results" / "variance"))
    ap.add_argument("--from-draws", type=Path, help="only re-analyse the plain and i.i.d.-base "
                    "rows from a --save-draws file")
    ap.add_argument("--lean", action="store_true", help="with --from-draws: new twins and pool "
                    "from a plan without the full-model forward, timed")
    args = ap.parse_args()
    args.threads = args.threads or 1
    timing.configure(args)
    if args.from_draws:
        return reanalyse(args.from_draws, args.lean)
    draws = args.draws or (8 if args.quick else 120)
    n_ind = args.independent or (4 if args.quick else 8)
    trained = train_or_load("attn", seed=0, cache_dir=ROOT / "results" / "zoo")
    model = trained.model
    train = make_dataset(1024 if args.quick else 4096, seed=0).tokens
    probe = make_dataset(64, seed=EVAL_SEED).tokens
    comps = expand("all heads", Adapter.of(model))
    names = [c.name for c in comps]
    specs, streams = ob.runs.susceptibility_observables(names)
    plan = ob.EvaluationPlan(model, probe, specs)
    cfg = config(draws, args.thin, 1)
    directions = head_directions(model, probe, comps)
    keep = [PHI, RESTRICTED, "mean_loss"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock; "
          f"load {load():.2f}; "
          f"{CHAINS} chains x {draws} draws, thin {args.thin}, {len(names)} heads, "
          f"{n_ind} independent spring-only chains")

    def sgld(**kw):
        return suscept.sample(model, lm_loss, train, cfg, observables=plan, stream=streams,
                              store_draws=keep + ([STEIN] if "batched" in kw else []),
                              progress=False, **kw)

    seq, t_seq, l_seq = timed(sgld)
    bat, t_bat, l_bat = timed(lambda: sgld(batched=Batched(directions=directions)))
    cpl, t_cpl, l_cpl = timed(lambda: spring_draws(model, cfg, plan))
    ind, t_ind, l_ind = timed(lambda: spring_draws(model, cfg, plan,
                                                   chains=range(CHAINS, CHAINS + n_ind)))
    # the same number of draws from spring-only chains thinned 4x more (their steps need no
    # gradient): nearly independent draws, a stand-in for exact Gaussian draws
    sparse, t_sparse, _ = timed(lambda: spring_draws(
        model, replace(cfg, thin=4 * cfg.thin), plan, chains=range(CHAINS, CHAINS + n_ind)))
    same = float((bat.draws[PHI] - seq.draws[PHI]).abs().max())
    print(f"sampling: sequential {t_seq:.1f} s (load {l_seq[0]:.1f}/{l_seq[1]:.1f}), batched "
          f"{t_bat:.1f} s ({l_bat[0]:.1f}/{l_bat[1]:.1f}), coupled spring chains {t_cpl:.1f} s, "
          f"{n_ind} independent spring chains {t_ind:.1f} s; max |phi batched - sequential| "
          f"= {same:.2e}")
    # the allocation the variance split calls for: a quarter of the SGLD draws, the same number
    # of spring-only evaluations spread over 4x as many independent (short) chains
    short = max(2, draws // 4)
    many, t_many, _ = timed(lambda: spring_draws(
        model, replace(cfg, n_draws=short), plan, chains=range(100, 100 + 4 * n_ind)))
    # exact i.i.d. spring-only draws (suscept.spring_sample) and stationary twins for them
    n_pool = args.pool or (32 if args.quick else 8 * draws)
    n_pool -= n_pool % (2 * POOL_CHAINS)
    twin, t_twin, pool, t_pool = spring_parts(model, train, cfg, plan, keep, n_pool)
    print(f"i.i.d. spring-only pool: {n_pool} draws plain {t_pool[False]:.1f} s, antithetic "
          f"{t_pool[True]:.1f} s; stationary twins {t_twin:.1f} s")
    d_seq = {k: seq.draws[k] for k in keep}
    d_bat = {k: bat.draws[k] for k in keep + [STEIN]}
    cuts = sorted({max(2, draws * i // 4) for i in range(1, 5)})
    half = n_ind // 2
    ind_halves = {0: list(range(half)), 2: list(range(half, n_ind))}
    many_halves = {0: list(range(2 * n_ind)), 2: list(range(2 * n_ind, 4 * n_ind))}
    n_all = CHAINS * draws
    methods = {
        "plain, sequential": (lambda h, k: chi_plain(prefix(d_seq, k), h), t_seq),
        "plain, batched": (lambda h, k: chi_plain(prefix(d_bat, k), h), t_bat),
        "control variates (Stein, 8 dirs)": (lambda h, k: chi_cv(prefix(d_bat, k), h), t_bat),
        "coupled (spring-only twin)": (
            lambda h, k: chi_coupled(prefix(d_bat, k), prefix(cpl, k), prefix(ind, k), h,
                                     ind_halves[h[0]]), t_bat + t_cpl + t_ind),
        "coupled, base thinned 4x more": (
            lambda h, k: chi_coupled(prefix(d_bat, k), prefix(cpl, k), prefix(sparse, k), h,
                                     ind_halves[h[0]]), t_bat + t_cpl + t_sparse),
        f"coupled, 1/4 SGLD, {4 * n_ind} base chains": (
            lambda h, k: chi_coupled(prefix(d_bat, max(2, k // 4)), prefix(cpl, max(2, k // 4)),
                                     prefix(many, max(2, k // 4)), h, many_halves[h[0]]),
            (t_bat + t_cpl) / 4 + t_many),
    }
    if args.save_draws:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save({"run": d_seq, "twin": twin, "pool": pool, "thin": args.thin, "seconds": {
            "run": t_seq, "twin": t_twin, "pool": t_pool}}, Path(args.out) / "draws.pt")
    skip = coupling_skip(cfg)
    alloc, rows = iid_rows(d_seq, twin, pool, t_seq, t_twin, t_pool, draws, skip)
    methods.update(rows)
    report = {"settings": {"draws": draws, "thin": args.thin, "chains": CHAINS,
                           "independent": n_ind, "pool": n_pool, "skip": skip,
                           "threads": torch.get_num_threads(),
                           "clock": args.clock,
                           "quick": args.quick},
              "allocation": alloc,
              "seconds": {"stationary_twins": t_twin, "pool_iid": t_pool[False],
                          "pool_antithetic": t_pool[True], "sequential": t_seq,
                          "batched": t_bat, "coupled_spring": t_cpl,
                          "independent_spring": t_ind, "independent_spring_sparse": t_sparse},
              "loads": {"sequential": l_seq, "batched": l_bat, "coupled": l_cpl,
                        "independent": l_ind}, "methods": {}}
    report["methods"] = table(methods, draws, cuts, n_all)

    everything = list(range(CHAINS))
    parts = coupled_covariance((d_bat[PHI], d_bat[RESTRICTED]), (cpl[PHI], cpl[RESTRICTED]),
                               (ind[PHI], ind[RESTRICTED]), paired=True, n_blocks=5)
    plain_est, cv_est = cv_covariance(d_bat[PHI], d_bat[RESTRICTED], d_bat[STEIN],
                                      paired=True, n_blocks=5)
    added = chi_plain(d_bat, everything) - chi_plain(cpl, everything)
    rel = float(added.norm() / chi_plain(d_bat, everything).norm())
    print(f"\nmedian standard errors (batch means, 5 blocks per chain): plain "
          f"{float(plain_est.stderr.median()):.3g}, control variates "
          f"{float(cv_est.stderr.median()):.3g}; coupled: difference part "
          f"{parts.meta['se_difference_median']:.3g}, independent part "
          f"{parts.meta['se_independent_median']:.3g} ({n_ind} chains)")
    print(f"what the tempered loss adds beyond the spring-only (n_beta -> 0) matrix: "
          f"||chi - chi_0|| / ||chi|| = {rel:.3f} (coupled difference, same noise)")
    report["standard_errors"] = {"plain": float(plain_est.stderr.median()),
                                 "cv": float(cv_est.stderr.median()),
                                 "coupled_difference": parts.meta["se_difference_median"],
                                 "coupled_independent": parts.meta["se_independent_median"]}
    report["loss_added_relative"] = rel

    # ---- schedule from the plain run ---------------------------------------------------
    fm = private_copy(model)
    _, t_eval, _ = timed(lambda: [plan(fm.module) for _ in range(5)])
    c_eval = CHAINS * t_eval / 5
    c_step = max(1e-6, (t_seq - n_all * t_eval / 5) / (cfg.n_steps))
    phi = seq.flat(PHI)
    tau = float(suscept.diagnostics.iat(phi).median()) * args.thin if draws >= 4 else 1.0
    plain_tt = report["methods"]["plain, sequential"]["to_target"]
    ess = plain_tt["draws"] / thinned_iat(max(1.0, tau), args.thin)  # plain's ESS to 0.8
    sch = schedule(max(1.0, tau), c_step, c_eval, ess=ess, n_chains=CHAINS)
    now = sch.table[args.thin]
    print(f"\nschedule: IAT of phi {tau:.1f} steps (median over heads), step {c_step:.3f} s, "
          f"evaluation {c_eval:.3f} s (all chains); best thin {sch.thin} at "
          f"{sch.cost_per_effective_draw:.3f} s per effective draw vs {now:.3f} s at thin "
          f"{args.thin} (x{sch.cost_per_effective_draw / now:.2f}); to {TARGET}: "
          f"{sch.n_chains} chains x {sch.n_draws} draws, predicted {sch.seconds:.0f} s")
    report["schedule"] = {"tau_steps": tau, "step_s": c_step, "eval_s": c_eval,
                          "thin": sch.thin, "cost": sch.cost_per_effective_draw,
                          "cost_current_thin": now}

    # ---- batched chains per second ----------------------------------------------------
    zoo = {"sequential_s": t_seq, "batched_s": t_bat, "speedup": t_seq / t_bat}
    mlp = mlp_speed(8, 40 if args.quick else 300)
    print(f"\nbatched chains: zoo one run (4 chains, evaluation included) x{zoo['speedup']:.2f};"
          f" MLP (8 chains, probe only, 1 thread) sequential {mlp['sequential']:.2f} s, "
          f"batched {mlp['batched']:.2f} s, x{mlp['speedup']:.2f} "
          f"({mlp['chain_steps_per_s']['batched']:.0f} vs "
          f"{mlp['chain_steps_per_s']['sequential']:.0f} chain-steps/s); load {load():.2f}")
    report["batched"] = {"zoo": zoo, "mlp": mlp}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("variance_quick.json" if args.quick else "variance.json")
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
