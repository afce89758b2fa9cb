"""Cost of one suscept SGLD step relative to one bare ``torch.optim.SGD`` step.

Every variant does forward + backward + update of the same model with the same ``loss_fn``
and batch size; all ratios come from this one run:

- ``torch SGD``: ``opt.zero_grad(); loss_fn(model, batch).mean().backward(); opt.step()``
  with ``torch.optim.SGD`` on one fixed batch (the baseline).
- ``sgld kernel``: the same loop on suscept's flat private copy (``suscept.model``) with the
  plain-SGLD update of ``suscept.sgld.build`` instead of ``opt.step()``; no sampler
  bookkeeping.
- ``sample, full batch``: the real ``suscept.sample`` with the fixed batch as the whole
  training set (so no minibatch sampling). Timed is the *marginal* cost of a step: a call
  doing ``N`` steps minus a call doing 1 step, over ``N - 1``. Both calls take exactly one draw
  (observables = the probe loss of the batch, evaluated once), so the difference is the
  per-step loop alone: loss + gradient, loss trace, divergence check, kernel update.
- ``sample, rmsprop``: as ``sample, full batch`` with the RMSprop preconditioner.
- ``torch SGD, minibatch``: bare SGD drawing a fresh minibatch of the same size each step
  from a larger training set, exactly as ``suscept.sample`` does (``randperm(n)[:m]`` +
  gather): the fair baseline of
- ``sample, minibatch``: ``suscept.sample`` with that training set and ``batch_size`` = m.

Each repeat runs every variant for ``N`` steps, in a rotated order (interleaved, so load
drift hits all of them alike); the table gives the median and least time per step and the
median over repeats of the per-repeat ratio to the row's baseline.
Target (issue): SGLD step / SGD step <= 1.1.

    .venv/bin/python experiments/benchmarks/step_cost.py [--quick] [--task mlp transformer] \
        [--threads 1 --clock cpu]

On a busy shared machine, two OpenMP threads per process make wall-clock timings swing by
several times; ``--threads 1 --clock cpu`` (this process's CPU time) gives steadier ratios.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import suscept  # noqa: E402
from experiments.benchmarks import timing  # noqa: E402
from experiments.benchmarks.models import TASKS, Task  # noqa: E402
from suscept.data import index, n_samples  # noqa: E402
from suscept.model import private_copy  # noqa: E402
from suscept.sgld import SGLDHyper, build  # noqa: E402

HYPER = dict(step_size=1e-5, n_beta=10.0, gamma=100.0)


def sgd_runner(task: Task, minibatch: bool = False) -> Callable[[int], None]:
    """Bare SGD; with ``minibatch`` it draws a fresh minibatch per step the way
    ``suscept.sample`` does (``randperm(n)[:m]`` + gather)."""
    model = copy.deepcopy(task.model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    n, m = n_samples(task.data), n_samples(task.batch)
    gen = torch.Generator().manual_seed(0)

    def run(steps: int) -> None:
        for _ in range(steps):
            batch = task.batch
            if minibatch:
                batch = index(task.data, torch.randperm(n, generator=gen)[:m])
            opt.zero_grad()
            task.loss_fn(model, batch).mean().backward()
            opt.step()

    return run


def kernel_runner(task: Task) -> Callable[[int], None]:
    fm = private_copy(task.model)
    anchor = fm.params.clone()
    init, update = build(SGLDHyper(**HYPER))
    gen = torch.Generator().manual_seed(0)
    state = init(fm.params)

    def run(n: int) -> None:
        nonlocal state
        fm.params.copy_(anchor)
        for _ in range(n):
            fm.grad.zero_()
            task.loss_fn(fm.module, task.batch).mean().backward()
            state = update(state, fm.grad, anchor, gen)

    return run


def sample_runner(task: Task, minibatch: bool, precondition: str | None = None):
    """``run(n)`` = one ``suscept.sample`` call of ``n`` steps and one draw."""
    data = task.data if minibatch else task.batch
    batch_size = n_samples(task.batch) if minibatch else None

    def run(n: int) -> None:
        cfg = suscept.SamplerConfig(**HYPER, precondition=precondition, n_chains=1, n_draws=1,
                                    thin=n, batch_size=batch_size, seed=0)
        out = suscept.sample(task.model, task.loss_fn, data, cfg, probe=task.batch,
                             progress=False)
        assert not out.divergences, out.divergences

    return run


# wall clock by default; --clock cpu: this process's CPU time (all its threads), which is
# blind to time spent descheduled by other processes: steadier on a shared machine, but only
# comparable between variants at --threads 1 (idle OpenMP workers spin and count).


def timed(run: Callable[[int], None], n: int) -> float:
    t0 = timing.now()
    run(n)
    return timing.now() - t0


# name -> (make the runner, marginal timing?, baseline of the ratio). ``run(n)`` does n steps;
# marginal: a step costs (T(n) - T(1)) / (n - 1), which drops the per-call setup of ``sample``.
VARIANTS = {
    "torch SGD": (sgd_runner, False, "torch SGD"),
    "sgld kernel (build/update)": (kernel_runner, False, "torch SGD"),
    "sample, full batch": (lambda t: sample_runner(t, False), True, "torch SGD"),
    "sample, rmsprop": (lambda t: sample_runner(t, False, "rmsprop"), True, "torch SGD"),
    "torch SGD, minibatch": (lambda t: sgd_runner(t, minibatch=True), False, "torch SGD"),
    "sample, minibatch": (lambda t: sample_runner(t, True), True, "torch SGD, minibatch"),
}


def bench(task: Task, n_steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, one entry per repeat (interleaved)."""
    runners = {name: make(task) for name, (make, _, _) in VARIANTS.items()}
    names = list(runners)
    for run in runners.values():  # warm-up
        run(max(n_steps // 4, 2))
    per_step: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            run = runners[name]
            if VARIANTS[name][1]:
                t = (timed(run, n_steps) - timed(run, 1)) / (n_steps - 1)
            else:
                t = timed(run, n_steps) / n_steps
            per_step[name].append(t)
    return per_step


def report(task: Task, per_step: dict[str, list[float]], n_steps: int, repeats: int) -> None:
    print(f"\n{task.name}: {task.n_params:,} params, batch {n_samples(task.batch)} "
          f"(minibatch rows: of n={n_samples(task.data)}), {n_steps} steps x {repeats} "
          f"repeats, {torch.get_num_threads()} threads")
    print(f"{'variant':<28}{'median us/step':>15}{'min us/step':>13}{'ratio':>8}  baseline")
    for name, ts in per_step.items():
        base_name = VARIANTS[name][2]
        base = per_step[base_name]
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"{name:<28}{1e6 * statistics.median(ts):>15.1f}{1e6 * min(ts):>13.1f}"
              f"{ratio:>8.3f}  {base_name}")


STEPS = {"mlp": (200, 50), "transformer": (40, 10)}  # steps per timed call: full, --quick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (noisier)")
    ap.add_argument("--task", nargs="+", choices=sorted(TASKS), default=["mlp", "transformer"])
    ap.add_argument("--steps", type=int, help="steps per timed call (default: per task)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 15, quick 3)")
    timing.add_arguments(ap)
    args = ap.parse_args()
    timing.configure(args)
    repeats = args.repeats or (3 if args.quick else 15)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    for name in args.task:
        task = TASKS[name]()
        n_steps = args.steps or STEPS[name][args.quick]
        report(task, bench(task, n_steps, repeats), n_steps, repeats)
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (other processes on the machine "
          "inflate and scatter the timings; 'min' is the least disturbed repeat)")


if __name__ == "__main__":
    main()
