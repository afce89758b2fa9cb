"""Susceptibility sweep over the 8 heads of the zoo model: one run vs per-component runs.

Model: ``train_or_load("attn", seed=0)`` (2 layers, attention only, 4 heads per layer;
``--n-heads H`` trains and uses a variant with H heads per layer of width 64 / H). SGLD on
training sequences of the zoo's language (``make_dataset(N_TRAIN, seed=0)``, the start of the
zoo's training pool); probe = 64 held-out sequences of 32 tokens (1984 predicted tokens,
``make_dataset(64, seed=EVAL_SEED)``). Every method uses the same sampler settings (plain SGLD,
step size 1e-3, n_beta 30, gamma 300, 4 chains, minibatch 64; seed 0, the restricted runs
seed 1 so that their noise is independent), the same draws per chain
and the same steps between draws (``--thin``, default 4 and 1).

1. **End to end** (wall-clock of the whole call, post-processing included):

   - ``suscept one run``: ``observables.one_run(model, train, probe, "all heads", cfg)`` then
     ``suscept.susceptibility(run)``: one SGLD run, every head's restricted losses at each draw;
   - ``restricted_runs``: ``observables.restricted_runs(...)``, the literature's method in this
     project: 8 masked runs + 1 full run (its full run is ``one_run(cross=True)``, which also
     evaluates every head; the column ``lean`` estimates a literature-style full run that
     evaluates only the probe as the mean masked-run time);
   - ``devinterp 2.0.1``: ``devinterp.slt.susceptibilities.susceptibilities`` with
     ``create_param_masks(model, "l{L}h{H}")`` per head and ``"full": None``, the probe as the
     one observable and as sampling task (``include_sampling_task=True``: the cheapest setting,
     one probe forward per draw), its defaults otherwise (32 batches for its init loss, zarr
     output in a temporary folder, deleted afterwards).

2. **Time to a reliable matrix**: split-half reliability of the standardized ``[token, head]``
   matrix (``suscept.standardize``; mean over heads of the per-column Spearman between the
   matrices of chains {0, 1} and {2, 3}) as a function of the first ``b`` of ``n_blocks``
   blocks of every chain, from the per-segment streamed Moments of the runs of part 1 (one run:
   ``run.paired("phi", "restricted_token_loss")``; restricted runs: every run's
   ``Cross("phi", "token_loss")`` Moments, captured by wrapping ``observables.runs.sample``;
   their total estimator takes ``E_full`` from the same chains and blocks of the full run).
   Draws to r = 0.8: measured where reached, else extrapolated with Spearman-Brown,
   ``r(k n) = k r / (1 + (k - 1) r)``, from the last point (and, as a check, from a fit of
   ``a n / (1 + a n)`` to the whole curve); such figures are labelled ``extrap``. Seconds =
   draws x the sampling seconds per draw of part 1, where the methods ran back to back: the one
   run; for the covariance part the 8 masked runs (it needs no full run); for the total the
   ``lean`` time (8 masked runs + a full run costed as a masked run), which favours it.
   ``--long-draws`` adds one longer one-run (thin 4, same seed, so its first draws are those of
   part 1) for a longer curve, costed per draw like the thin-4 one run of part 1; the table
   checks Spearman-Brown on it (prediction from a quarter of its draws vs the measured end).

3. **Sanity**: AUROC with which PC1 of the one-run standardized matrix separates induction from
   bigram tokens (labels ``make_dataset(...).target_types`` of the probe); PC1's sign is
   arbitrary, so ``max(a, 1 - a)`` is given as well.

Prints tables and writes ``results/sweep/sweep[_quick].json``.

    .venv/bin/python experiments/benchmarks/sweep.py [--quick] [--draws D] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain progress bars
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root

import observables as ob  # noqa: E402
import observables.runs as ob_runs  # noqa: E402
import suscept  # noqa: E402
from experiments.zoo.language import BIGRAM, INDUCTION, make_dataset  # noqa: E402
from experiments.zoo.train import EVAL_SEED, train_or_load  # noqa: E402
from suscept.moments import Moments  # noqa: E402
from suscept.susceptibilities import FULL, PHI, RESTRICTED, spearman  # noqa: E402

STEP_SIZE, N_BETA, GAMMA, CHAINS, BATCH = 1e-3, 30.0, 300.0, 4, 64
TARGET = 0.8
HALVES = ((0, 1), (2, 3))


# ---- helpers -------------------------------------------------------------------------------
def load() -> float:
    return os.getloadavg()[0]


def config(draws: int, thin: int, blocks: int) -> suscept.SamplerConfig:
    return suscept.SamplerConfig(step_size=STEP_SIZE, n_beta=N_BETA, gamma=GAMMA,
                                 n_chains=CHAINS, n_draws=draws, thin=thin, batch_size=BATCH,
                                 seed=0, n_blocks=blocks)


def select(m: Moments, idx: list[int]) -> Moments:
    """The Moments of the segments ``idx`` only."""
    t = torch.tensor(idx, dtype=torch.long)
    return replace(m, **{f.name: getattr(m, f.name)[t] for f in fields(m)
                         if getattr(m, f.name) is not None})


def seg_index(run: suscept.Run, chains: tuple[int, ...], b: int) -> list[int]:
    """Segment indices of the first ``b`` blocks of ``chains`` (segments are chain-major)."""
    blocks = run.config["n_blocks"]
    valid = run.valid_chains
    return [valid.index(c) * blocks + j for c in chains if c in valid for j in range(b)]


def one_run_matrix(run: suscept.Run, chains, b: int) -> torch.Tensor:
    """``chi [token, head]`` of the one run from the first ``b`` blocks of ``chains``."""
    idx = seg_index(run, chains, b)
    cols = [-select(m, idx).total().cov()[0, 0] for m in run.paired(PHI, RESTRICTED)]
    return torch.stack(cols, 1)


def restricted_matrices(full: suscept.Run, comp_runs: list[suscept.Run], chains, b: int
                        ) -> dict[str, torch.Tensor]:
    """Covariance part and total of the two-chain estimator from the first ``b`` blocks."""
    e_full = select(full.moments_of(PHI, FULL), seg_index(full, chains, b)).total().mean_y[0]
    cov, total = [], []
    for run in comp_runs:
        t = select(run.moments_of(PHI, FULL), seg_index(run, chains, b)).total()
        c = -t.cov()[0, 0]
        cov.append(c)
        total.append(c - t.mean_x[0, 0] * (t.mean_y[0] - e_full))
    return {"covariance": torch.stack(cov, 1), "total": torch.stack(total, 1)}


def split_half_r(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over columns of the Spearman between the standardized halves."""
    try:
        return float(spearman(suscept.standardize(a), suscept.standardize(b)).mean())
    except suscept.ShapeError:  # a constant column (too few draws)
        return float("nan")


def auroc(score: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    s = score.double()
    x, y = s[pos], s[neg]
    allv = torch.cat([x, y])
    order = allv.argsort()
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, len(allv) + 1, dtype=allv.dtype)
    for v in allv.unique():  # average ranks of ties
        tie = allv == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    u = ranks[: len(x)].sum() - len(x) * (len(x) + 1) / 2
    return float(u / (len(x) * len(y)))


def pc1_auroc(chi: torch.Tensor, labels: torch.Tensor) -> dict:
    z = suscept.standardize(chi)
    pcs = suscept.pca(z, n_components=2)
    a = auroc(pcs["scores"][:, 0], labels == INDUCTION, labels == BIGRAM)
    return {"auroc": a, "auroc_signfree": max(a, 1 - a),
            "pc1_explained": float(pcs["explained"][0]),
            "pc1_loadings": [round(float(v), 4) for v in pcs["loadings"][0]]}


def spearman_brown(r: float, k: float) -> float:
    """Reliability after ``k`` times the draws, from reliability ``r``."""
    return k * r / (1 + (k - 1) * r)


def draws_to_target(curve: list[dict]) -> dict:
    """Draws (all chains) until the split-half ``r`` reaches TARGET: measured, or Spearman-Brown.

    ``extrap``: ``n_last * k`` with ``spearman_brown(r_last, k) = TARGET``; ``draws_fit``: from a
    least-squares fit of ``a n / (1 + a n)`` (the Spearman-Brown family) to the whole curve.
    """
    for i, p in enumerate(curve):
        if p["r"] >= TARGET:
            if i == 0:
                return {"draws": p["draws"], "how": "measured"}
            q = curve[i - 1]  # linear interpolation between the two points
            f = (TARGET - q["r"]) / (p["r"] - q["r"])
            return {"draws": q["draws"] + f * (p["draws"] - q["draws"]), "how": "measured"}
    last = curve[-1]
    r = last["r"]
    out: dict = {"how": "extrap"}
    out["draws"] = (last["draws"] * TARGET * (1 - r) / ((1 - TARGET) * r)
                    if r > 0 and math.isfinite(r) else float("inf"))
    pts = [(p["draws"], p["r"]) for p in curve if math.isfinite(p["r"])]
    best = (float("inf"), float("nan"))
    for la in torch.linspace(-9, 1, 2001).tolist():
        a = 10**la
        sse = sum((r_ - a * n / (1 + a * n)) ** 2 for n, r_ in pts)
        best = min(best, (sse, a))
    a = best[1]
    out["draws_fit"] = TARGET / ((1 - TARGET) * a) if a > 2e-9 else float("inf")
    return out


def summarize(curves: dict[str, dict], long_key: str | None) -> dict:
    """Part 2's tables: curves, draws to TARGET, seconds = draws x cost per draw, ratios.

    Every curve carries ``s_per_draw``: sampling seconds per draw (all chains) measured in
    part 1, where the methods ran back to back; the long one-run's curve is costed with the
    thin-4 one run of part 1 (same conditions as the restricted runs), its own run time is kept
    as ``own_s_per_draw``.
    """
    print("\n2. Split-half reliability r (mean per-head Spearman of the standardized matrix, "
          "chains {0,1} vs {2,3})\n   against draws (all 4 chains) from the first b blocks "
          "of every chain:")
    for name, c in curves.items():
        pts = c["curve"]
        step = max(1, len(pts) // 8)
        shown = pts[step - 1::step]
        if shown[-1] is not pts[-1]:
            shown.append(pts[-1])
        print(f"  {name:<34}" + " ".join(f"{p['draws']}:{p['r']:+.2f}" for p in shown))
        c["to_target"] = draws_to_target(pts)
        c["to_target"]["seconds"] = c["to_target"]["draws"] * c["s_per_draw"]
    if long_key:
        pts = curves[long_key]["curve"]
        q = pts[len(pts) // 4 - 1] if len(pts) >= 4 else pts[0]
        if q["r"] > 0:
            pred = spearman_brown(q["r"], pts[-1]["draws"] / q["draws"])
            curves[long_key]["sb_check"] = {"from_draws": q["draws"], "from_r": q["r"],
                                            "predicted": pred, "measured": pts[-1]["r"]}
            print(f"  Spearman-Brown check on the long run: r={q['r']:.3f} at {q['draws']} "
                  f"draws predicts {pred:.3f} at {pts[-1]['draws']}; measured "
                  f"{pts[-1]['r']:.3f}")
    print(f"\n   draws and seconds to r = {TARGET} (extrap = Spearman-Brown from the last point; "
          "fit = from a fit to the whole curve;\n   seconds = draws x sampling s/draw of part 1)")
    print(f"  {'method':<34}{'draws':>6}{'r end':>7}{'to 0.8':>8}{'how':>7}{'fit':>8}"
          f"{'s/draw':>8}{'seconds':>9}")
    for name, c in curves.items():
        tt = c["to_target"]
        print(f"  {name:<34}{c['curve'][-1]['draws']:>6}{c['curve'][-1]['r']:>7.3f}"
              f"{tt['draws']:>8.0f}{tt['how']:>7}{tt.get('draws_fit', float('nan')):>8.0f}"
              f"{c['s_per_draw']:>8.3f}{tt['seconds']:>9.0f}")
    ratios = {}
    for name, c in curves.items():
        if not name.startswith("restricted"):
            continue
        thin = name.rsplit(" ", 1)[1]
        ref = long_key if long_key and thin == "4" else f"one run, thin {thin}"
        a, b = c["to_target"]["seconds"], curves[ref]["to_target"]["seconds"]
        r = a / b if math.isfinite(a) and math.isfinite(b) else float("nan")
        ratios[name] = {"against": ref, "ratio": r}
        txt = f"{r:.1f}x" if math.isfinite(r) else "n/a (no growth of r to extrapolate from)"
        print(f"  time to {TARGET}: {name} / {ref} = {txt}")
    if long_key and "own_s_per_draw" in curves[long_key]:
        c = curves[long_key]
        print(f"  (the long run itself took {c['own_s_per_draw']:.3f} s/draw: "
              f"{c['to_target']['draws'] * c['own_s_per_draw']:.0f} s to {TARGET} at its load)")
    return ratios


# ---- the three methods ---------------------------------------------------------------------
def run_one(model, train, probe, cfg) -> dict:
    l0, t0 = load(), time.perf_counter()
    run = ob.one_run(model, train, probe, "all heads", cfg, progress=False)
    chi = suscept.susceptibility(run)
    wall = time.perf_counter() - t0
    return {"wall": wall, "sampling": run.wall_s, "run": run, "chi": chi.value,
            "load": (l0, load()), "divergences": len(run.divergences)}


def run_restricted(model, train, probe, cfg) -> dict:
    captured: list[suscept.Run] = []
    original = ob_runs.sample

    def capture(*a, **kw):
        out = original(*a, **kw)
        captured.append(out)
        return out

    ob_runs.sample = capture  # restricted_runs and one_run call this module-level name
    try:
        l0, t0 = load(), time.perf_counter()
        res = ob.restricted_runs(model, train, probe, "all heads", cfg, progress=False)
        wall = time.perf_counter() - t0
    finally:
        ob_runs.sample = original
    full, comps = captured[0], captured[1:]
    assert full is res.full_run and len(comps) == len(res.seconds) - 1
    return {"wall": wall, "sampling": sum(res.seconds), "seconds": res.seconds,
            "lean": len(res.seconds) * sum(res.seconds[1:]) / len(res.seconds[1:]),
            "full": full, "comps": comps, "res": res, "load": (l0, load()),
            "divergences": sum(len(r.divergences) for r in captured)}


def devinterp_available() -> str | None:
    try:
        import devinterp  # noqa: F401
        from devinterp.slt.susceptibilities import susceptibilities  # noqa: F401
        from devinterp.slt.weight_restrictions import create_param_masks  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def run_devinterp(model, train, probe, cfg, heads: list[tuple[int, int]]) -> dict:
    from datasets import Dataset
    from devinterp.slt.susceptibilities import susceptibilities
    from devinterp.slt.weight_restrictions import create_param_masks

    dataset = Dataset.from_dict({"input_ids": train.tolist()}).with_format("torch")
    probe_ds = Dataset.from_dict({"input_ids": probe.tolist()}).with_format("torch")
    out_dir = tempfile.mkdtemp(prefix="sweep_devinterp_")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation and nbeta notices
            l0, t0 = load(), time.perf_counter()
            wr = {"full": None}
            wr.update({f"l{lay}h{h}": create_param_masks(model, f"l{lay}h{h}")
                       for lay, h in heads})
            tree = susceptibilities(
                model, dataset, {"probe": (probe_ds, len(probe) // BATCH)}, wr,
                sampling_task="probe", include_sampling_task=True,
                lr=cfg.step_size, n_beta=cfg.n_beta, localization=cfg.gamma,
                num_chains=cfg.n_chains, num_draws=cfg.n_draws,
                num_steps_bw_draws=cfg.thin, num_burnin_steps=0, batch_size=BATCH,
                device="cpu", output_path=os.path.join(out_dir, "samples.zarr"))
            sus = tree["susceptibilities"]["sus"].values
            wall = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in Path(out_dir).rglob("*") if f.is_file())
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"wall": wall, "shape": list(sus.shape), "disk_mb": disk / 2**20,
            "load": (l0, load())}


# ---- main ----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (tiny draws, < 2 min)")
    ap.add_argument("--draws", type=int, help="draws per chain of every method (default 48)")
    ap.add_argument("--blocks", type=int, help="blocks per chain (default draws // 4)")
    ap.add_argument("--thin", type=int, nargs="+", default=[4, 1], help="steps between draws")
    ap.add_argument("--long-draws", type=int,
                    help="draws per chain of an extra one-run (thin 4) for its reliability "
                         "curve; 0 = none (default 200, quick 0)")
    ap.add_argument("--no-devinterp", action="store_true")
    ap.add_argument("--restricted-seed", type=int, default=1,
                    help="sampler seed of the restricted runs (the one run uses 0); the same "
                         "seed makes both methods share their noise (common random numbers)")
    ap.add_argument("--n-heads", type=int, default=4,
                    help="heads per layer (d_head = 64 / H; a variant other than 4 is trained "
                         "on first use and cached)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--out", default=str(ROOT / "results" / "sweep"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    draws = args.draws or (2 if args.quick else 48)
    blocks = args.blocks or max(1, min(draws, 2 if args.quick else draws // 4))
    long_draws = args.long_draws if args.long_draws is not None else (0 if args.quick else 200)
    n_train = 1024 if args.quick else 4096

    variant = None if args.n_heads == 4 else {"n_heads": args.n_heads,
                                               "d_head": 64 // args.n_heads}
    trained = train_or_load("attn", seed=0, cache_dir=ROOT / "results" / "zoo",
                            model_kw=variant)
    model = trained.model
    train = make_dataset(n_train, seed=0).tokens
    probe_data = make_dataset(64, seed=EVAL_SEED)
    probe = probe_data.tokens
    labels = probe_data.target_types.reshape(-1)
    n_heads, n_layers = model.cfg.n_heads, model.cfg.n_layers
    heads = [(lay, h) for lay in range(n_layers) for h in range(n_heads)]
    di_missing = "--no-devinterp" if args.no_devinterp else devinterp_available()
    from importlib.metadata import version

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), transformer-lens "
          f"{version('transformer-lens')}, devinterp "
          f"{'n/a: ' + di_missing if di_missing else version('devinterp')}; "
          f"load average {load():.2f}")
    print(f"model {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} "
          f"params, {len(heads)} heads); SGLD eps={STEP_SIZE} n_beta={N_BETA} gamma={GAMMA}, "
          f"{CHAINS} chains, batch {BATCH} of n={len(train)}; probe {tuple(probe.shape)} = "
          f"{labels.numel()} tokens ({int((labels == INDUCTION).sum())} induction, "
          f"{int((labels == BIGRAM).sum())} bigram); {draws} draws/chain, {blocks} blocks/chain")

    report: dict = {
        "settings": {"step_size": STEP_SIZE, "n_beta": N_BETA, "gamma": GAMMA,
                     "chains": CHAINS, "batch": BATCH, "n_train": len(train),
                     "probe": list(probe.shape), "draws": draws, "blocks": blocks,
                     "thin": args.thin, "long_draws": long_draws, "quick": args.quick,
                     "restricted_seed": args.restricted_seed,
                     "threads": torch.get_num_threads(), "target_r": TARGET,
                     "devinterp": di_missing or version("devinterp")},
        "end_to_end": {}, "reliability": {}, "auroc": {}}
    results: dict = {}
    t_all = time.perf_counter()
    for thin in args.thin:
        cfg = config(draws, thin, blocks)
        print(f"\n[thin {thin}] suscept one run ...", flush=True)
        one = run_one(model, train, probe, cfg)
        print(f"  {one['wall']:.1f} s; restricted_runs ...", flush=True)
        res = run_restricted(model, train, probe, replace(cfg, seed=args.restricted_seed))
        print(f"  {res['wall']:.1f} s", flush=True)
        di = None
        if not di_missing and not (args.quick and results):  # quick: first thin only
            print("  devinterp susceptibilities ...", flush=True)
            di = run_devinterp(model, train, probe, cfg, heads)
            print(f"  {di['wall']:.1f} s", flush=True)
        results[thin] = (one, res, di)
        # the captured per-segment Moments give exactly restricted_runs' matrices
        full_m = restricted_matrices(res["full"], res["comps"], (0, 1, 2, 3), blocks)
        for part in ("covariance", "total"):
            ref = getattr(res["res"], part).value
            assert torch.allclose(full_m[part], ref, rtol=1e-6, atol=1e-9 * ref.abs().max()), \
                f"captured moments disagree with restricted_runs ({part})"
        assert torch.allclose(one_run_matrix(one["run"], (0, 1, 2, 3), blocks), one["chi"])

    # ---- part 1: end to end -------------------------------------------------------------
    print(f"\n1. End to end, {CHAINS} chains x {draws} draws, {len(heads)} heads (seconds; "
          "ratio = method / "
          "suscept one run)")
    print(f"{'thin':>4} {'one run':>8} {'restricted':>11} {'x':>6} {'lean':>7} {'x':>6} "
          f"{'devinterp':>10} {'x':>6}   load avg (before/after each)")
    for thin, (one, res, di) in results.items():
        row = {"one_run_s": one["wall"], "one_run_sampling_s": one["sampling"],
               "restricted_s": res["wall"], "restricted_runs_s": res["seconds"],
               "restricted_lean_s": res["lean"],
               "ratio_restricted": res["wall"] / one["wall"],
               "ratio_lean": res["lean"] / one["sampling"],
               "loads": {"one": one["load"], "restricted": res["load"]},
               "divergences": {"one": one["divergences"], "restricted": res["divergences"]}}
        dtxt = f"{'-':>10} {'-':>6}"
        if di:
            row.update(devinterp_s=di["wall"], ratio_devinterp=di["wall"] / one["wall"],
                       devinterp_disk_mb=di["disk_mb"], devinterp_shape=di["shape"])
            row["loads"]["devinterp"] = di["load"]
            dtxt = f"{di['wall']:>10.1f} {row['ratio_devinterp']:>6.2f}"
        loads = " ".join(f"{a:.1f}/{b:.1f}" for a, b in row["loads"].values())
        print(f"{thin:>4} {one['wall']:>8.1f} {res['wall']:>11.1f} {row['ratio_restricted']:>6.2f} "
              f"{res['lean']:>7.1f} {row['ratio_lean']:>6.2f} {dtxt}   {loads}")
        report["end_to_end"][str(thin)] = row
    print("restricted = observables.restricted_runs (its full run is one_run(cross=True));\n"
          f"lean = {len(heads) + 1} x mean masked-run sampling time (a full run evaluating only "
          "the probe), "
          "ratio against the one run's sampling time")
    for thin, (_, res, di) in results.items():
        print(f"  thin {thin}: restricted_runs per run (full first): "
              + " ".join(f"{s:.1f}" for s in res["seconds"])
              + (f"; devinterp wrote {di['disk_mb']:.0f} MB of zarr" if di else ""))

    # ---- part 2: reliability curves -----------------------------------------------------
    curves: dict[str, dict] = {}
    for thin, (one, res, _) in results.items():
        # the covariance part needs no full run; the total is costed with a lean full run
        t_one, t_res, t_cov = one["sampling"], res["lean"], sum(res["seconds"][1:])
        c1, cc, ct = [], [], []
        for b in range(1, blocks + 1):
            base = {"blocks": b, "draws": CHAINS * b * draws // blocks}
            halves = [one_run_matrix(one["run"], h, b) for h in HALVES]
            c1.append(dict(base, r=split_half_r(*halves)))
            rh = [restricted_matrices(res["full"], res["comps"], h, b) for h in HALVES]
            cc.append(dict(base, r=split_half_r(rh[0]["covariance"], rh[1]["covariance"])))
            ct.append(dict(base, r=split_half_r(rh[0]["total"], rh[1]["total"])))
        lib = suscept.split_half(one["run"])["spearman"].mean()
        assert abs(float(lib) - c1[-1]["r"]) < 1e-9, (float(lib), c1[-1]["r"])
        n = CHAINS * draws
        curves[f"one run, thin {thin}"] = {"curve": c1, "s_per_draw": t_one / n}
        curves[f"restricted covariance, thin {thin}"] = {"curve": cc, "s_per_draw": t_cov / n}
        curves[f"restricted total, thin {thin}"] = {"curve": ct, "s_per_draw": t_res / n}
    long_run, long_key = None, None
    if long_draws:
        lb = max(1, long_draws // 4)
        cfg = config(long_draws, 4, lb)
        print(f"\n[long one run: thin 4, {long_draws} draws/chain, {lb} blocks] ...", flush=True)
        long_run = run_one(model, train, probe, cfg)
        print(f"  {long_run['wall']:.1f} s (load {long_run['load'][0]:.1f}/"
              f"{long_run['load'][1]:.1f})", flush=True)
        c1 = []
        for b in range(1, lb + 1):
            halves = [one_run_matrix(long_run["run"], h, b) for h in HALVES]
            c1.append({"blocks": b, "draws": CHAINS * b * long_draws // lb,
                       "r": split_half_r(*halves)})
        own = long_run["sampling"] / (CHAINS * long_draws)
        long_key = "one run (long), thin 4"
        curves[long_key] = {"curve": c1, "own_s_per_draw": own, "s_per_draw": curves.get(
            "one run, thin 4", {"s_per_draw": own})["s_per_draw"]}
    ratios = summarize(curves, long_key)
    report["reliability"] = {"curves": curves, "ratios": ratios}

    # ---- part 3: PC1 AUROC --------------------------------------------------------------
    print("\n3. PC1 of the standardized matrix: induction vs bigram tokens")
    print(f"  {'matrix':<40}{'AUROC':>7}{'|.|':>7}{'PC1 var':>9}  PC1 loadings (L0H0..L1H3)")
    mats = {f"one run, thin {t}": r[0]["chi"] for t, r in results.items()}
    if long_run:
        mats[f"one run (long), {long_draws} draws"] = long_run["chi"]
    for t, r in results.items():
        mats[f"restricted covariance, thin {t}"] = r[1]["res"].covariance.value
        mats[f"restricted total, thin {t}"] = r[1]["res"].total.value
    for name, chi in mats.items():
        a = pc1_auroc(chi, labels)
        report["auroc"][name] = a
        print(f"  {name:<40}{a['auroc']:>7.3f}{a['auroc_signfree']:>7.3f}"
              f"{a['pc1_explained']:>9.2f}  {a['pc1_loadings']}")
    report["agreement"] = agreement(results, blocks, heads)
    report["total_wall_s"] = time.perf_counter() - t_all
    print(f"\ntotal wall-clock {report['total_wall_s']:.0f} s; load average now {load():.2f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("sweep_quick.json" if args.quick else "sweep.json")
    path.write_text(json.dumps(report, indent=1, default=_jsonable))
    print(f"wrote {path}")


def agreement(results: dict, blocks: int, heads: list[tuple[int, int]]) -> dict:
    """Part 4: per head, the Spearman between the one run's standardized column and each
    restricted estimate's (covariance part, total), against the ceiling that noise allows.

    Each method's reliability per column is its split-half Spearman ``r`` (chains {0, 1} vs
    {2, 3}) stepped up to the whole run by Spearman-Brown, ``R = 2 r / (1 + r)``; two methods
    that estimate the same matrix cannot agree better than ``sqrt(R_a R_b)`` (the attenuation
    bound), so ``agreement / ceiling`` near 1 means they measure the same thing. The bound
    holds for independent noise: run the restricted runs with another seed
    (``--restricted-seed``, default 1). With the same seed a head's masked chain follows nearly
    the same path as its weights in the one run (same noise, same minibatches), the two
    estimates share their Monte Carlo error and agree far beyond the ceiling.
    """
    print("\n4. Agreement per head: Spearman(one run, restricted) of standardized columns / "
          "ceiling sqrt(R_one R_restricted) from split-half reliabilities")
    names = [f"L{lay}H{h}" for lay, h in heads]
    out: dict = {}
    for thin, (one, res, _) in results.items():
        all_chains = (0, 1, 2, 3)
        mats = {"one run": one_run_matrix(one["run"], all_chains, blocks)}
        mats.update(restricted_matrices(res["full"], res["comps"], all_chains, blocks))
        halves = {"one run": [one_run_matrix(one["run"], h, blocks) for h in HALVES]}
        rh = [restricted_matrices(res["full"], res["comps"], h, blocks) for h in HALVES]
        for part in ("covariance", "total"):
            halves[part] = [rh[0][part], rh[1][part]]
        r_half = {k: spearman(suscept.standardize(a), suscept.standardize(b))
                  for k, (a, b) in halves.items()}
        rel = {k: suscept.agreement_ceiling(r, r) for k, r in r_half.items()}  # R = 2r/(1+r)
        row: dict = {"heads": names, "reliability": rel}
        print(f"  thin {thin}: {'head':<6}{'R one':>7}{'R cov':>7}{'R tot':>7}"
              f"{'one~cov':>9}{'ceil':>6}{'one~tot':>9}{'ceil':>6}")
        z_one = suscept.standardize(mats["one run"])
        for part in ("covariance", "total"):
            row[part] = {"spearman": spearman(z_one, suscept.standardize(mats[part])),
                         "ceiling": suscept.agreement_ceiling(r_half["one run"],
                                                              r_half[part])}
        for i, name in enumerate(names):
            print(f"  {'':8}{name:<6}{rel['one run'][i]:>7.2f}{rel['covariance'][i]:>7.2f}"
                  f"{rel['total'][i]:>7.2f}{row['covariance']['spearman'][i]:>9.2f}"
                  f"{row['covariance']['ceiling'][i]:>6.2f}{row['total']['spearman'][i]:>9.2f}"
                  f"{row['total']['ceiling'][i]:>6.2f}")
        for part in ("covariance", "total"):
            a, c = row[part]["spearman"].mean(), row[part]["ceiling"].mean()
            print(f"  {'':8}mean one~{part}: {a:.2f} of ceiling {c:.2f}")
        out[str(thin)] = row
    return out


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    main()
