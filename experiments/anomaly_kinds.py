"""Three kinds of anomalous input on the zoo language, each detected from one SGLD run.

Kinds (each with trusted clean reference and calibration sets and held-out clean test
sequences from the model's own training distribution, and held-out anomalous sequences):

1. ``trigger``: a planted backdoor (:mod:`experiments.backdoor`), one model per trigger rate
   (``--rates``, fraction of the poisoned training sequences); anomalous inputs carry the
   trigger.
2. ``shift``: a distribution the model never saw: sequences of the zoo language with another
   Markov transition table (``language_seed`` 1 instead of 0; same vocabulary, same segments
   and brackets).
3. ``switch``: a mechanism switch. In a clean sequence the second copy of the repeated segment
   is predicted by induction; in a switched one the copy breaks off after its first
   ``switch_keep`` tokens and continues along the most likely Markov successors, so that from
   there the bigram statistics, not induction, predict it. The switched sequences are chosen
   from a pool of candidates to match a fresh clean template set in (sequence loss, log
   smallest token loss, largest token loss) at w*, so that the loss alone cannot tell them
   apart (``switch_losses.png`` shows it).

Kinds 2 and 3 use the zoo's clean ``attn`` model (1500 steps; it has induction heads); the
backdoored models (600 steps) do not yet predict the copies, so they carry kind 1 only. For
each model one SGLD run feeds every method of :data:`experiments.anomaly_profiles.METHODS`
(:func:`experiments.anomaly_profiles.all_scores`); full mode adds a MAD-FA run in its
published regime.

    python -m experiments.anomaly_kinds [--quick] [--seeds 0 1 2] [--rates 0.01 0.03 0.1]
        [--kinds trigger shift switch] [--draws N] [--threads 1] [--out results]

Writes ``results/anomaly/``: ``figures.json``, ``config.json``, ``report.md``,
``auroc.png``, ``switch_losses.png``, ``scores.png`` and ``profiles_{model}_seed{s}.pt``.
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

import suscept  # noqa: E402
from experiments import anomaly_profiles as ap  # noqa: E402
from experiments import backdoor  # noqa: E402
from experiments.common import results_dir, torch_threads, versions, write_json  # noqa: E402
from experiments.zoo import train as zoo_train  # noqa: E402
from experiments.zoo.language import BIGRAM, Language, make_dataset  # noqa: E402

KINDS = ("trigger", "shift", "switch")


SAMPLER = suscept.SamplerConfig(step_size=1e-3, n_beta=30.0, gamma=300.0, n_chains=4,
                                n_draws=200, thin=2, batch_size=64, seed=0)


@dataclass(frozen=True)
class Settings:
    sgld: suscept.SamplerConfig = SAMPLER
    n_sgld_train: int = 2048  # sequences the SGLD minibatches are drawn from
    n_fit: int = 96  # trusted clean sequences detectors are fitted on (MAD-FA's reference)
    n_calibrate: int = 48  # trusted clean sequences thresholds are calibrated on
    n_test: int = 48  # clean test sequences, and as many of each anomalous kind
    shift_language_seed: int = 1
    switch_keep: int = 3  # tokens of the second copy kept before the switch
    switch_pool: int = 10  # candidates per switched sequence for the loss matching
    madfa_paper_regime: bool = True  # also MAD-FA from a run in its paper's regime
    madfa_draws: int = 500  # draws per chain of that run (4 chains: the paper's 2000)


QUICK = Settings(sgld=dataclasses.replace(SAMPLER, n_draws=60), n_sgld_train=1024, n_fit=64,
                 n_calibrate=32, n_test=32, madfa_paper_regime=False)


# ---- organisms ------------------------------------------------------------------------------
def shifted(n: int, seed: int, s: Settings) -> Tensor:
    """``[n, 32]`` sequences of the language with transition table ``shift_language_seed``."""
    return make_dataset(n, seed=60_000 + seed, language_seed=s.shift_language_seed).tokens


def switch_candidates(n: int, seed: int, keep: int) -> Tensor:
    """``[n, 32]`` clean sequences whose second segment copy is kept for ``keep`` tokens and
    then continues along the most likely Markov successor of the token before. The Markov
    tokens right after the copy keep their successor rank (the ``j``-th successor of the old
    previous token becomes the ``j``-th successor of the new one), so the filler stays text of
    the language."""
    data = make_dataset(n, seed=70_000 + seed)
    succ = torch.as_tensor(Language().successors)
    out = data.tokens.clone()
    for i in range(n):
        p2, length = (int(v) for v in (data.seg_starts[i, 1], data.seg_len[i]))
        for p in range(p2 + keep, p2 + length):
            out[i, p] = succ[out[i, p - 1], 0]
        p = p2 + length
        while p < out.shape[1] and int(data.types[i, p]) == BIGRAM:
            rank = int((succ[data.tokens[i, p - 1]] == data.tokens[i, p]).int().argmax())
            out[i, p] = succ[out[i, p - 1], rank]
            p += 1
    return out


@torch.no_grad()
def loss_features(model: nn.Module, tokens: Tensor) -> Tensor:
    """``[n, 3]`` (sequence loss, log smallest token loss, largest token loss) at w*."""
    losses = zoo_train.token_losses(model, tokens)
    return torch.stack([losses.mean(1), losses.min(1).values.log(), losses.max(1).values], 1)


def matched(model: nn.Module, candidates: Tensor, template: Tensor, seed: int) -> Tensor:
    """For each template sequence (random order), the unused candidate nearest in standardized
    :func:`loss_features`; ``[len(template), pos]``."""
    fc, ft = loss_features(model, candidates), loss_features(model, template)
    mu, sd = ft.mean(0), ft.std(0)
    zc, zt = (fc - mu) / sd, (ft - mu) / sd
    used = torch.zeros(len(zc), dtype=torch.bool)
    picks = []
    for i in torch.randperm(len(zt), generator=torch.Generator().manual_seed(seed)).tolist():
        dist = (zc - zt[i]).norm(dim=1).masked_fill(used, float("inf"))
        j = int(dist.argmin())
        used[j] = True
        picks.append(j)
    return candidates[torch.tensor(picks)]


def switched(model: nn.Module, n: int, seed: int, s: Settings) -> Tensor:
    """``[n, 32]`` switched sequences matched in loss to a fresh clean template set."""
    candidates = switch_candidates(n * s.switch_pool, seed, s.switch_keep)
    return matched(model, candidates, make_dataset(n, seed=80_000 + seed).tokens, seed)


def clean_sets(seed: int, s: Settings) -> Tensor:
    return make_dataset(s.n_fit + s.n_calibrate + s.n_test, seed=30_000 + seed).tokens


# ---- one model, one run, every kind -------------------------------------------------------
def measure(model: nn.Module, train: Tensor, probe: ap.Probe, s: Settings, tag: str,
            out_dir) -> dict:
    """One SGLD run on ``model``; every method evaluated on every kind of ``probe``."""
    config = s.sgld
    t0, c0 = time.perf_counter(), time.process_time()
    run = ap.sgld_run(model, train, probe.tokens, config)
    sgld_seconds, sgld_cpu = time.perf_counter() - t0, time.process_time() - c0
    got = ap.all_scores(model, run, probe, config.n_beta)
    scores = got["scores"]
    madfa_keys = list(ap.MADFA)
    out = {"tag": tag, "kinds": {}, "differences": {}, "seconds": got["seconds"],
           "cost": {"sgld_seconds": sgld_seconds, "sgld_cpu_seconds": sgld_cpu,
                    "draws": config.n_chains * config.n_draws,
                    "sgld_steps": config.n_chains * config.n_draws * config.thin}}
    if s.madfa_paper_regime:
        t1, c1 = time.perf_counter(), time.process_time()
        paper = ap.paper_regime_run(model, train, probe.tokens, config, s.madfa_draws)
        out["cost"]["madfa_paper_seconds"] = time.perf_counter() - t1
        out["cost"]["madfa_paper_cpu_seconds"] = time.process_time() - c1
        out["cost"]["madfa_paper_draws"] = config.n_chains * s.madfa_draws
        paper_scores = ap.madfa(paper, probe, prefix="madfa_paper")
        scores.update({k: v.double() for k, v in paper_scores.items()})
        madfa_keys += list(paper_scores)
    for kind in probe.kinds:
        part = probe.part_of(kind)
        res = {m: ap.evaluate(v, probe, part) for m, v in scores.items()}
        out["kinds"][kind] = res
        best_profile = max(ap.PROFILE_METHODS, key=lambda m: res[m]["auroc"])
        best_madfa = max(madfa_keys, key=lambda m: res[m]["auroc"])
        out["differences"][kind] = {
            "fixed": ap.difference(scores, probe, part, "fluctuation_max_token", best_madfa),
            "best": ap.difference(scores, probe, part, best_profile, best_madfa)}
    out["susceptibility_split_half"] = ap.profile_split_half(run, len(probe.tokens))
    rel = suscept.reliability(run)
    out["token_split_half"] = rel["split_half"]["spearman"]
    out["loss_rise"] = rel.get("loss_rise")
    out["part"] = probe.part
    out["scores"] = scores
    torch.save({**got["profiles"], "part": probe.part, "kinds": probe.kinds,
                "tokens": probe.tokens}, out_dir / f"profiles_{tag}.pt")
    return out


def trigger_run(seed: int, rate: float, s: Settings, out_dir) -> dict:
    trained = backdoor.backdoored_model(seed, rate)
    anomalous = backdoor.triggered(s.n_test, seed)
    probe = ap.Probe.build(clean_sets(seed, s), (s.n_fit, s.n_calibrate, s.n_test),
                           {"trigger": anomalous})
    train = backdoor.sgld_data(s.n_sgld_train, seed, rate)
    out = measure(trained.model, train, probe, s, f"trigger{rate:g}_seed{seed}", out_dir)
    return {**out, "seed": seed, "rate": rate, "model": f"backdoor {rate:.0%}",
            "attack_success": backdoor.attack_success(trained.model, anomalous),
            "clean_loss_by_type": trained.final_loss_by_type()}


def clean_run(seed: int, kinds: list[str], s: Settings, out_dir) -> dict:
    trained = zoo_train.train_or_load("attn", seed, shipped=True, progress=False)
    model = trained.model
    made = {"shift": lambda: shifted(s.n_test, seed, s),
            "switch": lambda: switched(model, s.n_test, seed, s)}
    probe = ap.Probe.build(clean_sets(seed, s), (s.n_fit, s.n_calibrate, s.n_test),
                           {k: made[k]() for k in kinds})
    train = make_dataset(s.n_sgld_train, seed=50_000 + seed).tokens
    out = measure(model, train, probe, s, f"clean_seed{seed}", out_dir)
    return {**out, "seed": seed, "rate": None, "model": "clean zoo",
            "clean_loss_by_type": trained.final_loss_by_type()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, seed 0 alone")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--rates", type=float, nargs="+", default=None,
                        help="trigger rates (default 0.03; e.g. 0.01 0.03 0.1)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--draws", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.draws:
        s = dataclasses.replace(s, sgld=dataclasses.replace(s.sgld, n_draws=args.draws))
    with torch_threads(args.threads):
        return run_all(args, s)


def run_all(args, s: Settings) -> dict:
    from experiments import anomaly_report

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    rates = args.rates or [0.03]
    out = results_dir("anomaly", args.out)
    write_json(out / "config.json", {"settings": dataclasses.asdict(s), "seeds": seeds,
                                     "rates": rates, "kinds": args.kinds, "quick": args.quick,
                                     "components": ap.COMPONENTS, "versions": versions(),
                                     "loadavg": os.getloadavg()})
    figures = {"settings": dataclasses.asdict(s), "quick": args.quick, "runs": []}
    jobs = [(trigger_run, (seed, rate, s, out)) for seed in seeds if "trigger" in args.kinds
            for rate in rates]
    rest = [k for k in args.kinds if k != "trigger"]
    jobs += [(clean_run, (seed, rest, s, out)) for seed in seeds if rest]
    for fn, job in jobs:  # results written after every run, so a cut-off run keeps the rest
        figures["runs"].append(fn(*job))
        anomaly_report.progress(figures["runs"][-1])
        figures["loadavg"] = os.getloadavg()
        anomaly_report.write(figures, out)
    return figures

if __name__ == "__main__":
    main()
