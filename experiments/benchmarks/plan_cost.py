"""Per-draw cost of every head's restricted loss: the evaluation plan vs the naive loop.

The naive loop runs one full forward per component at its mixed weights w^C. The plan caches
the anchor's activations, computes every head's ``z`` of a layer once, and starts each head's
restricted forward right after its layer's attention (see ``observables/plan.py``). Reference
ratios for plan / naive:

- depth bound: the fraction of layer passes left when each head's forward starts at its layer,
  ``sum over heads of (n_layers - layer) / (K * n_layers)`` (it ignores the unembedding and the
  loss, which every head pays in full);
- from-layer bound: ``sum over heads of t(forward from the head's layer) / (K t(full forward))``,
  each ``t`` timed on the probe batch at the anchor: a plan that starts each head at its layer
  with no overhead. The plan goes below both, because it skips the head's own attention;
- after-attention floor: the same sum with each head's forward starting after its layer's
  attention (3.x models only: ``Adapter.rest_of_block``), plus one attention per layer for the
  heads' ``z``: what the plan itself would cost with no overhead at all.

Times are medians of interleaved repeats, by the CPU clock of this process (``--clock cpu``,
the default: robust to other load on the machine) or the wall clock.

    python experiments/benchmarks/plan_cost.py [--quick] [--threads 1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore", DeprecationWarning)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import observables as ob  # noqa: E402
from experiments.benchmarks import timing  # noqa: E402

MODELS = {
    "2-layer attn-only (tiny)": dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64,
                                     n_ctx=32),
    "4-layer with MLPs": dict(n_layers=4, d_model=128, n_heads=8, d_head=16, d_vocab=512,
                              n_ctx=64, d_mlp=512),
}


def draw_like(model: torch.nn.Module, scale: float = 0.01) -> torch.nn.Module:
    w = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in w.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return w




def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = timing.now()
        fn()
        times.append(timing.now() - t)
    return statistics.median(times)


def measure(name: str, cfg: dict, batch: int, repeats: int) -> dict:
    model = ob.build(seed=0, **cfg)
    probe = torch.randint(0, cfg["d_vocab"], (batch, cfg["n_ctx"]),
                          generator=torch.Generator().manual_seed(0))
    comps = ob.expand("all heads", ob.Adapter.of(model))
    specs = [ob.TokenLoss(tuple(c.name for c in comps), name="heads")]
    plan = ob.EvaluationPlan(model, probe, specs)
    naive = ob.EvaluationPlan(model, probe, specs, naive=True)
    w = draw_like(model)
    with torch.no_grad():
        torch.testing.assert_close(plan(w)["heads"], naive(w)["heads"], rtol=0, atol=1e-4)
        for _ in range(2):  # warm up
            plan(w), naive(w)
        t_plan, t_naive = [], []
        for _ in range(repeats):  # interleaved, so both see the same machine load
            t_plan.append(median_time(lambda: plan(w), 1))
            t_naive.append(median_time(lambda: naive(w), 1))
        t_full = median_time(lambda: model(probe), repeats)
        t_from = [median_time(lambda l=l: model(plan.cache[plan.adapter.resid_pre(l)],
                                                 start_at_layer=l), repeats)
                  for l in range(cfg["n_layers"])]
        ad = plan.adapter
        t_mid = [median_time(lambda l=l: model(ad.rest_of_block(
            model, l, plan.cache[ad.resid_mid(l)]), start_at_layer=l + 1), repeats)
            for l in range(cfg["n_layers"])]
        t_z = [median_time(lambda l=l: plan._layer_z(l, dict(w.named_parameters())), repeats)
               for l in range(cfg["n_layers"])]
    n_layers = cfg["n_layers"]
    floor = (sum(t_mid[c.head[0]] for c in comps) + sum(t_z)) / (len(comps) * t_full)
    bound = sum(n_layers - c.head[0] for c in comps) / (len(comps) * n_layers)
    measured = sum(t_from[c.head[0]] for c in comps) / (len(comps) * t_full)
    tp, tn = statistics.median(t_plan), statistics.median(t_naive)
    return {"model": name, "K": len(comps), "plan_ms": 1e3 * tp, "naive_ms": 1e3 * tn,
            "full_forward_ms": 1e3 * t_full, "ratio": tp / tn, "depth_bound": bound,
            "measured_bound": measured, "floor": floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller probe")
    timing.add_arguments(parser, clock="cpu")
    args = parser.parse_args()
    timing.configure(args)
    batch, repeats = (16, 5) if args.quick else (64, 21)
    print(f"probe batch {batch}; torch threads {torch.get_num_threads()}; {args.clock} clock; "
          f"medians of {repeats} interleaved repeats; load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':28s} {'K':>3s} {'plan ms':>9s} {'naive ms':>9s} {'1 fwd ms':>9s} "
          f"{'plan/naive':>10s} {'after-attn floor':>16s} {'from-layer bound':>16s} "
          f"{'depth bound':>11s}")
    for name, cfg in MODELS.items():
        r = measure(name, cfg, batch, repeats)
        print(f"{r['model']:28s} {r['K']:3d} {r['plan_ms']:9.2f} {r['naive_ms']:9.2f} "
              f"{r['full_forward_ms']:9.2f} {r['ratio']:10.3f} {r['floor']:16.3f} "
              f"{r['measured_bound']:16.3f} "
              f"{r['depth_bound']:11.3f}")


if __name__ == "__main__":
    main()
