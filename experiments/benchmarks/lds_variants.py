"""The LDS table's BIF with the variance-reduction variants, at equal compute and at the exact
influence function's time (docs/classical.md, "With the variance-reduction variants").

Settings, problems, retrained subsets (``results/lds/cache``), calibration and the LDS are those
of :mod:`experiments.lds` (logistic regression and the MLP on digits, gamma 10; step size and
``n_beta`` from :func:`suscept.calibrate` unless given). The BIF is ``tau = -beta Cov(l_j, l_q)``
``[n, Q]`` (derivative scale, docs/theory.md section 3; ``beta = n_beta / n``), from:

- ``plain``: 4 SGLD chains x ``n_draws`` (today's LDS row), the k-statistic covariance;
- ``coupled``: :func:`suscept.coupled_covariance` with the same SGLD chains after
  ``skip`` draws, their stationary spring-only twins (:func:`suscept.spring_draws`, same
  noise) and an antithetic i.i.d. spring-only base (:func:`suscept.spring_sample`, another
  seed): ``C = C(SGLD) - C(twins) + C(base)``, the plain estimator's expectation up to the
  twins' ``O(1/N)`` finite-run bias (docs/efficiency.md);
- ``laplace``: the same with linear-Gaussian twins of the chains (the SGLD step with the loss
  linearized at w*, :mod:`experiments.benchmarks.laplace_twin`) and i.i.d. draws of their law;
- ``stein``: :func:`suscept.cv_covariance` on the same chains run batched with
  ``Batched(directions=V)``, ``V`` the top ``r`` right singular vectors of the query-gradient
  matrix at w* or the top ``r`` Hessian eigenvectors (``r (r + 3) / 2`` zero-mean Stein
  features; same expectation as plain);
- ``schedule``: the same chains evaluated every ``m``-th draw (variance factor only).

Per method: the per-draw variance ``V = N se^2`` (median over the ``n Q`` entries; batch means,
5 blocks per chain), CPU seconds per draw ``c``, the variance factor at equal compute ``V c /
(V_p c_p)`` (the coupled one at its best split, ``(sqrt(V_d c_run) + sqrt(V_b c_b))^2 / (V_p
c_p)``), the split-half reliability of the matrix (mean over queries of the Spearman between the
BIFs of chains {0, 1} and {2, 3}) at the plain run's CPU time, and the LDS at alpha 0.5 and
0.25. Also the plain BIF truncated to the exact influence function's CPU time (1 thread: its
wall-clock when the machine is idle).

    python experiments/benchmarks/lds_variants.py [--settings logreg mlp] [--quick]
        [--step-size EPS --n-beta NB] [--variants coupled laplace stein] [--directions R]
        [--direction-source query|hessian] [--gamma G] [--tag TAG] [--out results]

Writes ``results/lds/variants/figures-SETTINGS[-TAG].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import suscept  # noqa: E402
from experiments import lds  # noqa: E402
from experiments.benchmarks.lds_coupled import (  # noqa: E402
    coupled_variant,
    observe,
    per_draw_variance,
    split_half,
)
from experiments.common import results_dir, write_json  # noqa: E402
from suscept.batched import STEIN, Batched  # noqa: E402
from suscept.control_variates import cv_covariance  # noqa: E402


def plain_run(model, p, cfg, batched=False):
    with warnings.catch_warnings(), lds.Cost() as c:
        warnings.simplefilter("ignore")
        run = suscept.sample(model, p.loss_fn, p.data, cfg, probe=p.data,
                             observables={"query": lambda m: p.loss_fn(m, p.queries)},
                             stream=[], progress=False, batched=batched)
    draws = {k: run.flat(k) for k in ("loss", "query")}
    if batched:
        draws[STEIN] = run.draws[STEIN]
    return draws, c.record()


def directions(model, p, r: int, source: str) -> torch.Tensor:
    """``[r, d]``: the top ``r`` right singular vectors of the query-loss gradients at w*
    (``source="query"``) or the top ``r`` eigenvectors of the training loss's Hessian."""
    from suscept import classical

    fn = classical.Functional(model, p.loss_fn)
    if source == "hessian":
        return torch.linalg.eigh(classical.hessian(fn, p.data))[1][:, -r:].T
    grads = classical.per_sample_grads(fn, p.queries)
    return torch.linalg.svd(grads, full_matrices=False).Vh[:r]


def stein_variant(model, p, cfg, t_run: dict, args) -> dict:
    """The same chains, batched with Stein features on ``args.directions`` directions of
    ``args.direction_source``; cross-fitted control variates at the plain run's CPU time."""
    v = directions(model, p, args.directions, args.direction_source)
    draws, t = plain_run(model, p, cfg, batched=Batched(directions=v))
    beta, d = cfg.n_beta / len(p.data[0]), cfg.n_draws
    plain, cv = cv_covariance(draws["loss"], draws["query"], draws[STEIN])
    c_b, c_p = t["cpu_s"] / (4 * d), t_run["cpu_s"] / (4 * d)
    k = max(8, min(d, int(d * t_run["cpu_s"] / t["cpu_s"])))
    cut = {name: x[:, :k] for name, x in draws.items()}

    def bif_of(h):
        return -beta * cv_covariance(cut["loss"][h], cut["query"][h], cut[STEIN][h])[1].value

    tau = -beta * cv_covariance(cut["loss"], cut["query"], cut[STEIN])[1].value
    ratio = cv.meta["variance_factor"]
    return {"tau": tau, "split_half": split_half(bif_of), "cpu_s": t["cpu_s"] * k / d,
            "draws": 4 * k, "directions": f"{args.directions} {args.direction_source}",
            "features": draws[STEIN].shape[-1],
            "se_ratio_squared": ratio, "c_batched": c_b,
            "variance_factor": ratio * c_b / c_p, "cost": t,
            "max_plain_difference": float((plain.value - cv.value).abs().max())}


def truncated(run, cfg, t_run: dict, seconds: float) -> dict:
    """The plain BIF on the first ``k`` draws per chain that fit in ``seconds`` of the run's
    CPU time (per-step cost from the whole run), burn-in included; when the burn-in alone
    does not fit, ``k`` with the burn-in not charged (``free_burn_in``: a lower bound)."""
    per_chain = seconds / t_run["cpu_s"] * cfg.n_steps
    k = int((per_chain - cfg.burn_in) / cfg.thin)
    out = {"seconds": seconds, "burn_in_s": t_run["cpu_s"] * cfg.burn_in / cfg.n_steps,
           "draws_per_chain": k, "free_burn_in": k < 2}
    if k < 2:
        k = max(2, int(per_chain / cfg.thin))
        out["draws_per_chain"] = k
    beta = cfg.n_beta / run["loss"].shape[-1]
    out["tau"] = suscept.bif(run["loss"][:, :k], run["query"][:, :k], scale="derivative",
                             beta=beta, n_blocks=1).value
    return out


def thinned(model, p, cfg, run, t_run: dict, factors=(2, 4, 8, 16)) -> dict:
    """The schedule lever: the same chains evaluated every ``m``-th draw (thin ``m thin``).
    Cost per draw ``m thin c_step + c_eval`` with ``c_eval`` timed at w* (50 evaluations) and
    ``c_step`` the rest of the run's CPU per step; the variance factor at equal compute is
    ``V_m c_m / (V_1 c_1)`` (``V`` per draw as :func:`per_draw_variance`)."""
    import time

    f = observe(p)
    with torch.no_grad():
        t0 = time.process_time()
        for _ in range(50):
            f(model)
        c_eval = (time.process_time() - t0) / 50
    n_draws = cfg.n_chains * cfg.n_draws
    c_step = (t_run["cpu_s"] - n_draws * c_eval) / (cfg.n_chains * cfg.n_steps)
    v1, c1 = per_draw_variance(run["loss"], run["query"]), cfg.thin * c_step + c_eval
    out = {"c_eval": c_eval, "c_step": c_step}
    for m in factors:
        vm = per_draw_variance(run["loss"][:, ::m], run["query"][:, ::m])
        out[f"thin {m * cfg.thin}"] = vm * (m * cfg.thin * c_step + c_eval) / (v1 * c1)
    return out


def config_for(model, p, s, args) -> suscept.SamplerConfig:
    if args.step_size and args.n_beta:
        return suscept.SamplerConfig(step_size=args.step_size, n_beta=args.n_beta,
                                     gamma=s.gammas[0], n_chains=s.n_chains, n_draws=s.n_draws,
                                     thin=s.thin, burn_in=s.burn_in,
                                     weight_decay=args.n_beta * s.weight_decay)
    configs, _ = lds.calibrated_bif(model, p, s, quick=False)
    if not configs:
        raise SystemExit(f"{s.name}: calibration found no acceptable cell at gamma {s.gammas}")
    return configs[0]


def one_setting(s: lds.Setting, args, cache) -> dict:
    torch.manual_seed(0)
    p = lds.problem(s)
    model = p.fit(torch.arange(s.n_train), 0)
    retrained = {a: lds.retrain(s, p, a, cache) for a in s.alphas}
    cfg = config_for(model, p, s, args)
    lam = suscept.top_hessian_eigenvalue(model, p.loss_fn, p.data)
    regime = {"gamma": cfg.gamma, "n_beta": cfg.n_beta, "step_size": cfg.step_size,
              "lambda_max": lam, "n_beta_lambda_over_gamma": cfg.n_beta * lam / cfg.gamma,
              "eps_p_max": cfg.step_size * (cfg.n_beta * lam + cfg.gamma + cfg.weight_decay)}
    print(f"== {s.name}: {regime}  load {os.getloadavg()}", flush=True)
    damping, _ = lds.classical_damping(model, p, s)
    exact = lds.classical_methods(model, p, s, damping)["influence (explicit H)"]
    with lds.Cost() as c:
        tau_exact = exact().value
    rows = {"exact influence (explicit H)": {"tau": tau_exact, "cost": c.record()}}
    run, t_run = plain_run(model, p, cfg)
    beta = cfg.n_beta / s.n_train
    rows["plain"] = {
        "tau": suscept.bif(run["loss"], run["query"], scale="derivative", beta=beta).value,
        "cpu_s": t_run["cpu_s"], "draws": 4 * cfg.n_draws, "cost": t_run, "variance_factor": 1.0,
        "split_half": split_half(lambda h: suscept.bif(run["loss"][h], run["query"][h],
                                                       scale="derivative", beta=beta).value),
        "V_plain": per_draw_variance(run["loss"], run["query"])}
    rows["schedule"] = thinned(model, p, cfg, run, t_run)
    for kind in ("coupled", "laplace"):
        if kind in args.variants:
            rows[kind] = coupled_variant(model, p, cfg, run, t_run, args,
                                         "laplace" if kind == "laplace" else "spring")
            rows[kind].pop("parts")
    if "stein" in args.variants:
        rows["stein"] = stein_variant(model, p, cfg, t_run, args)
    rows["plain at the exact IF's time"] = truncated(run, cfg, t_run,
                                                     rows["exact influence (explicit H)"]
                                                     ["cost"]["cpu_s"])
    for name, row in rows.items():
        tau = row.pop("tau", None)
        if tau is not None:
            row["lds"] = {a: {k: v for k, v in lds.lds(tau, r["masks"], r["f"]).items()
                              if k != "per_query"} for a, r in retrained.items()}
        print(f"  {name:32s} " + "  ".join(
            f"a={a}: {v['lds']:.3f} ± {v['se_subsets']:.3f}" for a, v in row.get("lds",
                                                                                   {}).items())
            + "  " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                               if isinstance(v, float | int) and not isinstance(v, bool)),
            flush=True)
    return {"setting": dataclasses.asdict(s), "regime": regime, "rows": rows,
            "load_end": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=["logreg", "mlp"], choices=["logreg", "mlp"])
    ap.add_argument("--quick", action="store_true", help="experiments.lds's quick logreg")
    ap.add_argument("--step-size", type=float, help="skip calibration (with --n-beta)")
    ap.add_argument("--n-beta", type=float)
    ap.add_argument("--gamma", type=float, default=10.0, help="the LDS row's gamma (10)")
    ap.add_argument("--n-draws", type=int, help="draws per chain (default the setting's)")
    ap.add_argument("--variants", nargs="+", default=["coupled", "stein"],
                    choices=["coupled", "laplace", "stein"])
    ap.add_argument("--pool", type=int, default=16000, help="i.i.d. base draws (all groups)")
    ap.add_argument("--directions", type=int, default=6, help="Stein directions r")
    ap.add_argument("--direction-source", choices=["query", "hessian"], default="query",
                    help="Stein directions: query gradients' top singular vectors or the top "
                         "Hessian eigenvectors")
    ap.add_argument("--tag", help="suffix of the figures file")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="blocks of")  # the IAT note of the BIF's error
    table = lds.QUICK if args.quick else lds.SETTINGS
    names = ["logreg"] if args.quick else args.settings
    cache = results_dir("lds", args.out) / "cache"
    figures = {"args": vars(args), "settings": {}}
    for name in names:
        s = dataclasses.replace(table[name], gammas=(args.gamma,),
                                **({"n_draws": args.n_draws} if args.n_draws else {}))
        figures["settings"][name] = one_setting(s, args, cache)
    out = results_dir("lds/variants" + ("-quick" if args.quick else ""), args.out)
    tag = "-".join(names) + (f"-{args.tag}" if args.tag else "")
    write_json(out / f"figures-{tag}.json", figures)
    return figures


if __name__ == "__main__":
    main()
