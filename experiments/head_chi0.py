"""Is the head-level susceptibility's disagreement with ablation noise or estimand?

For each run of a ``head_attribution`` output (its ``figures.json``: variant, seeds, the
mean-ablation effect per head on induction tokens), the spring-only susceptibility ``chi0``
of the same model and probe by the interpolation estimator (:mod:`suscept.interpolation`,
two independent replicates of ``--chains`` x ``--draws`` each, seeds 100 and 101), and its
head signal ``-mean_{x in induction} chi0[x, C]`` (the sign and the token group of
``head_attribution``'s ``spring_control`` signal). Printed per seed: the within-layer Spearman
between the two replicates (the head signal's own reliability), that of their mean against
mean ablation, and the stored run's and spring control's figures beside them.

    python -m experiments.head_chi0 --figures results/ha2_attn8/head_attribution/figures.json
        --variant attn8 [--chains 2] [--draws 40] [--out results/head_chi0_attn8.json]
        [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import observables as ob  # noqa: E402
from experiments import head_attribution as ha  # noqa: E402
from suscept import heads  # noqa: E402

VARIANTS = {**ha.QUICK_VARIANTS, **ha.FULL_VARIANTS}


def one(r: dict, variant: str, s: ha.Settings, chains: int, draws: int) -> dict:
    """The figures of one stored run ``r`` (module docstring)."""
    seed = r["seed"]
    model = ha.model_for(VARIANTS[variant], seed, s).model
    probe = ha.data_for(seed, s)[1]
    induction = probe.target_types.flatten() == probe.type_names.index("induction")
    t0 = time.process_time()
    signals = []
    for rep in (0, 1):
        cfg = replace(s.sampler(seed=0), n_chains=chains, n_draws=draws, seed=100 + rep)
        chi0 = ob.spring_susceptibility(model, probe.tokens, "all heads", cfg, progress=False)
        if chi0.meta["components"] != r["components"]:
            raise ValueError(f"components {chi0.meta['components']} differ from the stored "
                             f"run's {r['components']}")
        signals.append(-chi0.value[induction].mean(0))
    layers = r["layers"]
    mean = (signals[0] + signals[1]) / 2
    ablation = torch.tensor(r["ablation"]["induction"])
    return {"seed": seed, "cpu_seconds": time.process_time() - t0,
            "replicates": heads.within_layer_spearman(signals[0], signals[1], layers),
            "vs_mean_ablation": heads.within_layer_spearman(mean, ablation, layers),
            "stored": {k: r["within_layer_spearman"][k]
                       for k in ("susceptibility", "spring_control")},
            "signal": mean.tolist()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--figures", required=True, help="a head_attribution figures.json")
    parser.add_argument("--variant", required=True, choices=sorted(VARIANTS),
                        help="the variant of the figures (attn: head_attribution --quick)")
    parser.add_argument("--quick", action="store_true", help="figures of head_attribution "
                        "--quick (its settings)")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--out", help="write the figures here (json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = json.loads(open(args.figures).read())["runs"]
    out = []
    for r in runs:
        f = one(r, args.variant, ha.QUICK if args.quick else ha.Settings(), args.chains,
                args.draws)
        out.append(f)

        def fmt(d):
            return ", ".join(f"L{k} {v:+.2f}" for k, v in d.items())
        print(f"{args.variant} seed {f['seed']}: replicates {fmt(f['replicates'])} | "
              f"interpolation chi0 vs mean ablation {fmt(f['vs_mean_ablation'])} | stored run "
              f"{fmt(f['stored']['susceptibility'])}, spring control "
              f"{fmt(f['stored']['spring_control'])} | {f['cpu_seconds']:.0f} CPU s",
              flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
