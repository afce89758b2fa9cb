"""How the coupling graph scales: 10^5 tokens x 100 components.

A synthetic ``[token, component]`` Estimate (float64 value and stderr, 160 MB at full size):
``value = stderr * N(0, 1)`` with 0.5% of the entries planted at ``|z| = 8``. For each filter
it times :func:`suscept.graph.select` (the vectorised numpy filter) and
:func:`suscept.graph.build` (filter + networkx graph) in CPU seconds (``time.process_time``,
torch and numpy on 1 thread) and wall seconds, and measures the peak memory allocated during
the call beyond its input with ``tracemalloc`` (numpy arrays and Python objects are traced),
next to the number of kept edges. Bytes per kept edge show that memory follows the kept edges,
not the size of the matrix.

    python experiments/benchmarks/graph_scale.py [--quick] [--rows N] [--cols K]

Writes ``results/benchmarks/graph_scale[_quick].json``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from experiments.common import results_dir, write_json  # noqa: E402
from suscept import graph  # noqa: E402
from suscept.estimate import Estimate  # noqa: E402

FILTERS = {
    "bonferroni 0.05": dict(level=0.05, correction="bonferroni"),
    "bh 0.05": dict(level=0.05, correction="bh"),
    "bonferroni 0.05 + top 3": dict(level=0.05, top_k=3),
    "no test, top 3 per row": dict(level=None, top_k=3, per="row"),
}


def synthetic(rows: int, cols: int, seed: int = 0) -> Estimate:
    g = torch.Generator().manual_seed(seed)
    se = 0.5 + torch.rand(rows, cols, generator=g, dtype=torch.float64)
    value = se * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    hot = torch.rand(rows, cols, generator=g) < 0.005
    value[hot] = 8 * se[hot] * torch.sign(value[hot])
    return Estimate(value, se, ("token", "component"), "susceptibility", "synthetic",
                    {"components": [f"L{c // 10}H{c % 10}" for c in range(cols)]})


def measure(fn) -> dict:
    gc.collect()
    tracemalloc.start()
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"out": out, "cpu_s": cpu, "wall_s": wall, "peak_mb": peak / 2**20}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^4 x 20 (CI)")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--cols", type=int, default=None)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    rows = args.rows or (10_000 if args.quick else 100_000)
    cols = args.cols or (20 if args.quick else 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(rows, cols, args)
    finally:
        torch.set_num_threads(threads)


def run(rows: int, cols: int, args) -> dict:
    est = synthetic(rows, cols)
    input_mb = 2 * est.value.numel() * 8 / 2**20
    print(f"{rows} tokens x {cols} components; input (value + stderr) {input_mb:.0f} MB")
    print(f"{'filter':28s} {'kept':>9s} {'select cpu':>10s} {'build cpu':>9s} {'build wall':>10s}"
          f" {'peak MB':>8s} {'B/edge':>7s}")
    table = []
    for name, kw in FILTERS.items():
        sel = measure(lambda kw=kw: graph.select(est, **kw))
        built = measure(lambda kw=kw: graph.build(est, **kw))
        kept = sel["out"].facts["n_kept"]
        assert built["out"].number_of_edges() == kept
        row = {"filter": name, "kept_edges": kept, "select_cpu_s": sel["cpu_s"],
               "select_wall_s": sel["wall_s"], "select_peak_mb": sel["peak_mb"],
               "build_cpu_s": built["cpu_s"], "build_wall_s": built["wall_s"],
               "build_peak_mb": built["peak_mb"],
               "bytes_per_edge": built["peak_mb"] * 2**20 / max(kept, 1)}
        table.append(row)
        print(f"{name:28s} {kept:9d} {row['select_cpu_s']:10.2f} {row['build_cpu_s']:9.2f} "
              f"{row['build_wall_s']:10.2f} {row['build_peak_mb']:8.1f} "
              f"{row['bytes_per_edge']:7.0f}")
    out = {"rows": rows, "cols": cols, "input_mb": input_mb, "threads": 1, "table": table}
    suffix = "_quick" if args.quick else ""
    write_json(results_dir("benchmarks", args.out) / f"graph_scale{suffix}.json", out)
    return out


if __name__ == "__main__":
    main()
