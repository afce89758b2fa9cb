"""How the cost of a draw grows, and the peak memory of the blockwise per-token BIF.

Part 1, cost per draw (CPU seconds of this process, ``--threads`` torch threads): a draw is
one SGLD step (minibatch of 16 training sequences) plus every observable at the new weights
(the probe's per-sample losses, the components' restricted per-token losses ``[K, X]`` and
``phi [K]`` through the evaluation plan, the query's per-token losses ``[X]``), written to a
:class:`suscept.store.DrawStore` (``--no-store`` to leave it out). Timed is the *marginal*
cost: a run of ``2N`` draws minus a run of ``N`` draws, over ``N``, so building the plan and
the anchor values are excluded. Three sweeps around a base model (2 layers, d_model 64, 4
heads, n_ctx 32, attention only): probe tokens (query sequences x 31 positions), components
(heads, then layers), parameters (d_model). Each row also gives the cost relative to the
sweep's first row and to its size ratio.

Part 2, memory: a store with the draws of the per-token BIF of 64 training sequences against
the per-token losses of 64 query sequences of 1024 tokens (Q = 64 x 1023 = 65,472 columns),
filled with synthetic draws (a tiny model cannot sample a 1024-token context in a benchmark's
time; the memory of the estimator depends on shapes, not values). In a fresh subprocess each:
``DrawStore.bif`` reading ``--col-block`` columns at a time, and, with ``--dense``, the
in-memory ``suscept.bif`` on all draws loaded at once (what a loader that keeps every draw
does). Printed: peak RSS (``VmHWM``), CPU seconds, the size of the draws, the budget.

    .venv/bin/python experiments/benchmarks/cost_scaling.py [--quick] [--threads 1] [--dense]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import suscept  # noqa: E402
from suscept.store import DrawStore  # noqa: E402

BASE = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64, n_ctx=32)
BUDGET_MB = 1024  # the memory budget of the blockwise per-token BIF (peak RSS)


def draw_cost(model_kw: dict, n_query: int, components: list[str], draws: int,
              store: bool) -> float:
    """Marginal CPU seconds per draw (see the module docstring)."""
    import observables as ob  # not in the memory subprocess: its RSS stays torch's alone

    model = ob.build(**model_kw, seed=0)
    g = torch.Generator().manual_seed(0)
    n_ctx = model_kw["n_ctx"]
    train = torch.randint(0, model_kw["d_vocab"], (64, n_ctx), generator=g)
    query = torch.randint(0, model_kw["d_vocab"], (n_query, n_ctx), generator=g)
    specs, streams = ob.susceptibility_observables(components) if components else ([], [])
    plan = ob.EvaluationPlan(model, query, [*specs, ob.TokenLoss(None, name="token_loss")])

    def cpu(n: int) -> float:
        cfg = suscept.SamplerConfig(step_size=1e-4, n_beta=30.0, gamma=1000.0, n_chains=1,
                                    n_draws=n, batch_size=16, n_blocks=2)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.process_time()
            suscept.sample(model, ob.lm_loss, train, cfg, probe=train[:16], observables=plan,
                           stream=[("loss", "loss"), *streams], store_draws=False,
                           store=DrawStore(tmp) if store else None, progress=False)
            return time.process_time() - t0

    cpu(2)  # warm-up
    return (cpu(2 * draws) - cpu(draws)) / draws


def sweeps(quick: bool) -> dict[str, list[tuple[float, dict, int, list[str]]]]:
    heads = [f"L{layer}H{h}" for layer in range(2) for h in range(4)]
    if quick:
        return {"probe tokens": [(n * 31, BASE, n, heads[:2]) for n in (2, 8)],
                "components": [(k, BASE, 4, heads[:k]) for k in (1, 4)],
                "parameters": [(d, dict(BASE, d_model=d), 4, heads[:2]) for d in (32, 64)]}
    return {
        "probe tokens": [(n * 31, BASE, n, heads[:4]) for n in (4, 16, 64, 256)],
        "components": [(k, BASE, 16, c) for k, c in
                       [(1, heads[:1]), (4, heads[:4]), (8, heads),
                        (12, heads + ["L0.attn", "L1.attn", "L0", "L1"])]],
        "parameters": [(d, dict(BASE, d_model=d), 16, heads[:4]) for d in (32, 64, 128, 256)],
    }


def part1(args) -> list[dict]:
    import observables as ob

    rows = []
    print(f"cost per draw, CPU s ({args.threads} thread(s), {args.draws} draws marginal, "
          f"store {'off' if args.no_store else 'on'})")
    print(f"{'sweep':<14}{'size':>8}{'params':>10}{'ms/draw':>10}{'x first':>9}{'size x':>8}")
    for sweep, settings in sweeps(args.quick).items():
        first = None
        for size, kw, n_query, comps in settings:
            ms = 1e3 * draw_cost(kw, n_query, comps, args.draws, not args.no_store)
            n_params = sum(p.numel() for p in ob.build(**kw, seed=0).parameters())
            first = first or (ms, size)
            rows.append(dict(sweep=sweep, size=size, params=n_params, ms_per_draw=ms))
            print(f"{sweep:<14}{size:>8}{n_params:>10}{ms:>10.1f}{ms / first[0]:>9.2f}"
                  f"{size / first[1]:>8.1f}", flush=True)
    return rows


# ---- part 2: memory of the blockwise per-token BIF -------------------------------------------
def fill_store(path: Path, n: int, q: int, chains: int, draws: int, blocks: int) -> None:
    """A store of synthetic draws ``loss [n]`` and ``token_loss [q]`` (linearly related, so
    the BIF is not zero), written through the same commit path as the sampler."""
    store = DrawStore(path, meta={"synthetic": True}, dims={"loss": ("sample",),
                                                            "token_loss": ("token",)})
    bounds = [len(b) for b in torch.tensor_split(torch.arange(draws), blocks)]
    config = {"n_chains": chains, "n_draws": draws}
    store.prepare(config, {"loss": (n,), "token_loss": (q,)},
                  {"loss": torch.zeros(n), "token_loss": torch.zeros(q)}, bounds)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(n, q, generator=g) / n**0.5
    for c in range(chains):
        start = 0
        for k, length in enumerate(bounds):
            x = torch.randn(length, n, generator=g)
            y = x @ mix + torch.randn(length, q, generator=g)
            done = k == len(bounds) - 1
            store.commit(c, start, {"loss": x, "token_loss": y},
                         {"draw": start + length, "step": start + length, "done": done,
                          "divergence": None})
            start += length


def peak_rss_mb() -> float:
    """This process's peak resident set size: ``VmHWM`` (Linux; starts afresh at ``exec``,
    unlike ``ru_maxrss``, which a child inherits from the parent that forked it)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: str, mode: str, col_block: int) -> dict:
    """Run in a fresh process: peak RSS and CPU time of one BIF from the store."""
    base = peak_rss_mb()  # after the imports
    t0 = time.process_time()
    store = DrawStore.open(path)
    if mode == "blockwise":
        est = store.bif("loss", "token_loss", col_block=col_block)
    else:
        est = suscept.bif(store.draws("loss"), store.draws("token_loss"))
    return {"mode": mode, "cpu_s": time.process_time() - t0, "shape": list(est.shape),
            "peak_rss_mb": peak_rss_mb(),
            "import_rss_mb": base,
            "checksum": float(est.value.abs().sum())}


def part2(args) -> list[dict]:
    n, seqs, ctx = 64, (8 if args.quick else 64), (128 if args.quick else 1024)
    q = seqs * (ctx - 1)
    chains, draws = (2, 40) if args.quick else (4, 200)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()
        fill_store(Path(tmp), n, q, chains, draws, blocks=5)
        print(f"\nper-token BIF: {n} train sequences x {seqs} query sequences of {ctx} tokens "
              f"(Q = {q}), {chains} chains x {draws} draws = "
              f"{chains * draws * (n + q) * 4 / 2**20:.1f} MB of float32 draws "
              f"(written in {time.process_time() - t0:.1f} CPU s)")
        modes = ["blockwise"] + (["dense"] if args.dense else [])
        for mode in modes:
            cmd = [sys.executable, __file__, "--measure", tmp, mode, str(args.col_block),
                   "--threads", str(args.threads)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                            text=True).stdout.splitlines()[-1])
            out.append(res)
            print(f"  {mode:<10} peak RSS {res['peak_rss_mb']:7.0f} MB (after imports "
                  f"{res['import_rss_mb']:.0f} MB)   CPU {res['cpu_s']:6.1f} s   result "
                  f"{res['shape']}   (col_block {args.col_block})")
    base = out[0]["peak_rss_mb"]
    print(f"  budget {BUDGET_MB} MB peak RSS: blockwise {'within' if base <= BUDGET_MB else 'OVER'}"
          " budget")
    if len(out) == 2:
        print(f"  dense / blockwise peak RSS: {out[1]['peak_rss_mb'] / base:.1f}x; "
              f"same values: {abs(out[0]['checksum'] - out[1]['checksum']) < 1e-6 * base}")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--draws", type=int, default=None, help="draws for the marginal cost")
    p.add_argument("--no-store", action="store_true", help="time without the draw store")
    p.add_argument("--dense", action="store_true", help="also the in-memory BIF's memory")
    p.add_argument("--col-block", type=int, default=4096)
    p.add_argument("--skip-cost", action="store_true", help="only the memory part")
    p.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], int(args.measure[2]))))
        return {}
    args.draws = args.draws or (3 if args.quick else 20)
    cost = [] if args.skip_cost else part1(args)
    return {"cost": cost, "memory": part2(args)}


if __name__ == "__main__":
    main()
