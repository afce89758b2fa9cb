"""Speed-up of 2 processes (torchrun, gloo) over 1 on the same chains, and where time goes.

The same run (a tiny attention-only transformer on the zoo's synthetic language, observables
of the one-run susceptibility over all heads plus per-token query losses) is launched as:

- ``1 proc x 1 thread``: ``torchrun --nproc_per_node 1`` with ``OMP_NUM_THREADS=1``;
- ``1 proc x 2 threads``: the same with 2 torch threads (what one process can use here);
- ``2 procs x 1 thread``: ``torchrun --nproc_per_node 2``, each rank runs half the chains.

Each rank reports (JSON on stdout) the seconds from process start to the model being built
(imports, torch.distributed start-up, model and plan), its own sampling, the wait for the
slower rank (a barrier), and the exact merge (``all_reduce`` of draws and moments); the
parent adds the whole command's wall-clock time
(launcher included). Printed: a table per setting and the speed-ups of the sampling phase and
of the whole command. On a machine with 2 cores the ideal is 2x for sampling; start-up,
the merge and any other load on the cores (timings here are wall-clock) take from it.

    .venv/bin/python experiments/benchmarks/distributed_speedup.py [--quick] [--chains 4] \
        [--no-two-threads]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    """One rank: build, sample its chains, merge; print its timings as JSON."""
    import torch

    import observables as ob
    import suscept
    from experiments.zoo.language import make_dataset
    from suscept import distributed

    torch.set_num_threads(args.threads)
    distributed.init()
    model = ob.build(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64, n_ctx=32, seed=0)
    tokens = make_dataset(68, seed=0).tokens
    specs, streams = ob.susceptibility_observables(["all heads"])
    plan = ob.EvaluationPlan(model, tokens[64:], [*specs, ob.TokenLoss(None, name="tok")])
    cfg = suscept.SamplerConfig(step_size=1e-4, n_beta=30.0, gamma=1000.0,
                                n_chains=args.chains, n_draws=args.draws, batch_size=16)
    kwargs = dict(probe=tokens[:16], observables=plan, stream=[("loss", "loss"), *streams],
                  store_draws=["loss"], progress=False)
    t_built = time.perf_counter()
    rank, world = distributed.rank(), (torch.distributed.get_world_size()
                                       if distributed.is_active() else 1)
    mine = distributed.chains_of(rank, world, cfg.n_chains)
    part = suscept.sample(model, ob.lm_loss, tokens[:64], cfg, chains=mine, **kwargs)
    t_sampled = time.perf_counter()
    if distributed.is_active():
        torch.distributed.barrier()  # waiting for the slower rank, timed apart from the merge
    t_waited = time.perf_counter()
    if distributed.is_active():
        distributed.merge(part, mine)
    t_merged = time.perf_counter()
    line = json.dumps({"rank": rank, "startup_s": t_built - T_START,
                       "sample_s": t_sampled - t_built, "wait_s": t_waited - t_sampled,
                       "merge_s": t_merged - t_waited,
                       "cpu_s": time.process_time(), "chains": mine})
    sys.stdout.write(line + "\n")  # one write: the ranks share stdout, lines must not interleave
    sys.stdout.flush()
    if distributed.is_active():
        torch.distributed.barrier()  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()


def launch(nproc: int, threads: int, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", __file__, "--worker",
           "--threads", str(threads), "--chains", str(args.chains), "--draws", str(args.draws)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {"nproc": nproc, "threads": threads, "wall_s": wall,
            "startup_s": max(r["startup_s"] for r in ranks),
            "sample_s": max(r["sample_s"] for r in ranks),
            "wait_s": max(r["wait_s"] for r in ranks),
            "merge_s": max(r["merge_s"] for r in ranks),
            "cpu_s": sum(r["cpu_s"] for r in ranks), "ranks": ranks}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=None)
    p.add_argument("--no-two-threads", action="store_true",
                   help="skip the 1 process x 2 threads baseline (very slow on a loaded machine)")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.draws = args.draws or (4 if args.quick else 100)
    if args.worker:
        worker(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip interpreter teardown, where a rank sometimes aborts after its work
    settings = [(1, 1), (2, 1)] if args.quick or args.no_two_threads else [(1, 1), (1, 2), (2, 1)]
    rows = [launch(n, t, args) for n, t in settings]
    print(f"{args.chains} chains x {args.draws} draws (thin 1), wall-clock seconds")
    print(f"{'setting':<20}{'command':>9}{'startup':>9}{'sampling':>10}{'wait':>7}{'merge':>8}"
          f"{'CPU':>8}")
    for r in rows:
        label = (f"{r['nproc']} proc{'s' * (r['nproc'] > 1)} x {r['threads']} "
                 f"thread{'s' * (r['threads'] > 1)}")
        print(f"{label:<20}{r['wall_s']:>9.1f}{r['startup_s']:>9.1f}{r['sample_s']:>10.1f}"
              f"{r['wait_s']:>7.2f}{r['merge_s']:>8.2f}{r['cpu_s']:>8.1f}")
    one, two = rows[0], rows[-1]
    out = {"rows": rows, "sampling_speedup": one["sample_s"] / two["sample_s"],
           "command_speedup": one["wall_s"] / two["wall_s"]}
    print(f"2 procs vs 1 proc x 1 thread: sampling {out['sampling_speedup']:.2f}x, whole command "
          f"{out['command_speedup']:.2f}x")
    if len(rows) == 3:
        out["vs_two_threads"] = rows[1]["sample_s"] / two["sample_s"]
        print(f"2 procs vs 1 proc x 2 threads: sampling {out['vs_two_threads']:.2f}x")
    return out


if __name__ == "__main__":
    main()
