"""Wall time of one_run SGLD steps at 1 vs 2 torch threads, interleaved, with the load.

The circuit demo's quick settings on the shipped zoo checkpoint; 10 SGLD steps (5 draws of all
8 heads) per measurement, two rounds. On a 2-core machine shared with other jobs, two threads
stall: ``python experiments/benchmarks/threads.py``.
"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import observables as ob  # noqa: E402
from experiments.circuit_recovery import QUICK, data_for  # noqa: E402
from experiments.zoo.train import train_or_load  # noqa: E402

model = train_or_load("attn", 0, cache_dir="results/zoo", shipped=True).model
train, probe = data_for(0, QUICK)
cfg = QUICK.sampler(n_chains=1, n_draws=5, thin=2)  # 10 SGLD steps, 5 evaluations of 8 heads
for rnd in range(2):
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        ob.one_run(model, train, probe.tokens, "all heads", cfg, progress=False)
        dt = time.perf_counter() - t0
        print(f"round {rnd} threads {threads}: {dt:.1f} s for 10 steps "
              f"({dt / 10:.2f} s/step); loadavg {os.getloadavg()}", flush=True)
