"""Draws per second: ``suscept.sample`` vs devinterp 2.0.1, same model, data and settings.

Both sides run plain localized SGLD (``step_size`` = devinterp ``lr``, ``n_beta`` = ``nbeta``,
``gamma`` = ``localization``; or both RMSprop-SGLD with ``--rmsprop``), the same chains,
draws, steps between draws, minibatch size and loss function, on the 2-layer transformer of
``models.py`` (random tokens, n = 2048 sequences of 33 tokens), and evaluate the same probe
(64 fixed sequences, one forward pass) at every draw. Timed is the whole call (``chains *
draws`` draws, each library's setup included: "end to end"), and a 1-draw call, which gives
the marginal rate after setup ("steady") and the setup time. Variants:

- ``suscept.sample``: probe per-sample losses, stored and streamed into moments.
- ``devinterp sample()``: ``devinterp.slt.sampling.sample`` (its public API: HuggingFace
  ``Dataset`` + ``DataLoader``, per-token losses written to zarr, ``num_init_loss_batches=1``).
- ``devinterp SGMCMC loop``: devinterp's optimizer (``SGMCMC.sgld`` / ``rmsprop_sgld``) in a
  minimal hand-written loop (``randperm`` minibatches, probe evaluated at each draw, losses kept
  in memory): devinterp's kernel without its pipeline.
- ``torch SGD loop``: the same minimal loop with ``torch.optim.SGD`` (no noise, no
  localization): the floor.

Repeats are interleaved (rotated order); the table gives median draws/s and the median of the
per-repeat speed ratios to ``devinterp sample()``. Target (issue): suscept >= 1.1x devinterp.

    .venv/bin/python experiments/benchmarks/vs_devinterp.py [--quick] [--rmsprop] \
        [--threads 1 --clock cpu]

On a busy shared machine, two OpenMP threads per process make wall-clock timings swing by
several times; ``--threads 1 --clock cpu`` (this process's CPU time) gives steadier ratios.

devinterp is optional (``pip install -c constraints.txt devinterp==2.0.1``); without it the
script says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain progress bars

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import suscept  # noqa: E402
from experiments.benchmarks import timing  # noqa: E402
from experiments.benchmarks.models import lm_loss, per_token_loss, transformer_task  # noqa: E402

STEP_SIZE, N_BETA, GAMMA = 1e-5, 10.0, 100.0
BATCH, N_PROBE = 64, 64


def suscept_runner(task, ids, probe, chains, thin, rmsprop):
    def run(draws: int) -> None:
        cfg = suscept.SamplerConfig(step_size=STEP_SIZE, n_beta=N_BETA, gamma=GAMMA,
                                    precondition="rmsprop" if rmsprop else None,
                                    n_chains=chains, n_draws=draws, thin=thin,
                                    batch_size=BATCH, seed=0)
        out = suscept.sample(task.model, lm_loss, ids, cfg, probe=probe, progress=False)
        assert not out.divergences, out.divergences

    return run


def devinterp_runner(task, ids, probe, chains, thin, rmsprop):
    from datasets import Dataset
    from devinterp.slt.sampling import sample

    dataset = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    probe_ds = Dataset.from_dict({"input_ids": probe.tolist()}).with_format("torch")

    def run(draws: int) -> None:
        out_dir = tempfile.mkdtemp(prefix="devinterp_bench_")
        try:
            sample(task.model, dataset, {"probe": (probe_ds, N_PROBE // BATCH)},
                   lr=STEP_SIZE, n_beta=N_BETA, localization=GAMMA,
                   sampling_method="rmsprop_sgld" if rmsprop else "sgmcmc_sgld",
                   num_chains=chains, num_draws=draws, num_steps_bw_draws=thin,
                   num_burnin_steps=0, batch_size=BATCH, num_init_loss_batches=1,
                   device="cpu", loss_fn=per_token_loss,
                   output_path=os.path.join(out_dir, "samples.zarr"))
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    return run


def loop_runner(task, ids, probe, chains, thin, make_opt):
    """A minimal SGLD/SGD loop: ``make_opt(params)`` is the optimizer; probe loss per draw."""

    def run(draws: int) -> None:
        gen = torch.Generator().manual_seed(0)
        losses = torch.empty(chains, draws, N_PROBE)
        for c in range(chains):
            model = copy.deepcopy(task.model)
            opt = make_opt(model.parameters())
            for step in range(draws * thin):
                idx = torch.randperm(len(ids), generator=gen)[:BATCH]
                loss = lm_loss(model, ids[idx]).mean()
                loss.backward()
                if not torch.isfinite(loss):
                    raise RuntimeError("diverged")
                opt.step()
                opt.zero_grad(set_to_none=True)
                if (step + 1) % thin == 0:
                    with torch.no_grad():
                        losses[c, (step + 1) // thin - 1] = lm_loss(model, probe)

    return run


# wall clock by default; --clock cpu: this process's CPU time (all its threads), which is
# blind to time spent descheduled by other processes: steadier on a shared machine, but only
# comparable between variants at --threads 1 (idle OpenMP workers spin and count).


def timed(run, draws: int) -> float:
    t0 = timing.now()
    run(draws)
    return timing.now() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (noisier)")
    ap.add_argument("--rmsprop", action="store_true", help="RMSprop-SGLD on both sides")
    ap.add_argument("--chains", type=int)
    ap.add_argument("--draws", type=int)
    ap.add_argument("--thin", type=int, default=1, help="steps between draws")
    ap.add_argument("--repeats", type=int)
    timing.add_arguments(ap)
    args = ap.parse_args()
    timing.configure(args)
    try:
        import devinterp  # noqa: F401
        from devinterp.optim import SGMCMC
    except ImportError as e:
        print(f"devinterp is not importable ({e}); install the optional extra with\n"
              "  .venv/bin/pip install -c constraints.txt devinterp==2.0.1\n"
              "to run this comparison. Nothing measured.")
        return
    from importlib.metadata import version

    chains = args.chains or (1 if args.quick else 4)
    draws = args.draws or (20 if args.quick else 100)
    repeats = args.repeats or (2 if args.quick else 5)
    task = transformer_task(batch=BATCH)
    ids, probe = task.data, task.data[-N_PROBE:]
    common = (task, ids, probe, chains, args.thin)
    dkw = dict(lr=STEP_SIZE, nbeta=N_BETA, localization=GAMMA)
    dopt = SGMCMC.rmsprop_sgld if args.rmsprop else SGMCMC.sgld
    variants = {
        "devinterp sample()": devinterp_runner(*common, args.rmsprop),
        "suscept.sample": suscept_runner(*common, args.rmsprop),
        "devinterp SGMCMC loop": loop_runner(*common, lambda p: dopt(p, **dkw)),
        "torch SGD loop": loop_runner(*common, lambda p: torch.optim.SGD(p, lr=STEP_SIZE)),
    }
    kind = "RMSprop-SGLD" if args.rmsprop else "SGLD"
    print(f"torch {torch.__version__}, devinterp {version('devinterp')}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{task.name} ({task.n_params:,} params), {kind} eps={STEP_SIZE} n_beta={N_BETA} "
          f"gamma={GAMMA}, batch {BATCH} of n={len(ids)}, probe {N_PROBE} sequences, "
          f"{chains} chains x {draws} draws, {args.thin} step(s) per draw, {repeats} repeats")
    names = list(variants)
    full: dict[str, list[float]] = {k: [] for k in names}  # seconds of the whole call
    one: dict[str, list[float]] = {k: [] for k in names}  # seconds of a 1-draw call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # devinterp's deprecation and nbeta notices
        warnings.filterwarnings("error", message="Chain failed")  # a stopped chain is no run
        for run in variants.values():  # warm-up
            run(2)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                full[name].append(timed(variants[name], draws))
                one[name].append(timed(variants[name], 1))
    total, base = chains * draws, "devinterp sample()"

    def steady(name: str) -> list[float]:  # draws/s after setup: (T(D) - T(1)) / (D - 1)
        return [chains * (draws - 1) / (f - o) for f, o in zip(full[name], one[name])]

    print("\nend to end = the whole call; steady = marginal rate, (T(D draws) - T(1 draw)) / "
          "(D - 1):")
    print(f"{'variant':<23}{'draws/s':>9}{'x devinterp':>13}{'steady d/s':>12}"
          f"{'x devinterp':>13}{'setup s':>9}")
    for name in names:
        e2e = statistics.median(b / s for s, b in zip(full[name], full[base]))
        st = statistics.median(s / b for s, b in zip(steady(name), steady(base)))
        setup = statistics.median(o - (f - o) / (draws - 1) for f, o in zip(full[name], one[name]))
        print(f"{name:<23}{total / statistics.median(full[name]):>9.1f}{e2e:>13.3f}"
              f"{statistics.median(steady(name)):>12.1f}{st:>13.3f}{setup:>9.2f}")
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (ratios are medians of per-repeat "
          "ratios; repeats are interleaved)")

if __name__ == "__main__":
    main()
