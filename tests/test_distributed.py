"""Chains split over 2 processes (torchrun, gloo) merge to exactly the one-process run.

The test launches this file under ``python -m torch.distributed.run --nproc_per_node 2``
(real processes, real process group); the ranks sample a tiny TransformerLens model with
an evaluation plan (paired susceptibility moments, per-sample losses with third-order
slices), 5 chains split 3 + 2, and write to one shared draw store. Rank 0 saves the merged
Run; the test compares it with ``suscept.sample`` in this process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_store import assert_same_run

import suscept

ROOT = Path(__file__).resolve().parents[1]
CONFIG = suscept.SamplerConfig(step_size=1e-3, n_beta=20.0, gamma=300.0, n_chains=5,
                               n_draws=12, thin=2, batch_size=8, seed=3, n_blocks=3,
                               precondition="rmsprop", max_loss_rise=0.29)
# max_loss_rise: chains 2 (rank 0) and 4 (rank 1) stop early as diverged, the others finish


def problem():
    """A tiny 2-layer transformer, train and probe tokens, observables and streams."""
    import observables as ob

    model = ob.build(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=12, n_ctx=8, seed=0)
    tokens = torch.randint(0, 12, (24, 8), generator=torch.Generator().manual_seed(1))
    specs, streams = ob.susceptibility_observables(["all heads", "L0.attn"])
    plan = ob.EvaluationPlan(model, tokens[:4], specs)
    kwargs = dict(probe=tokens[:6], observables=plan, stream=[("loss", "loss"), *streams],
                  store_draws=["loss", "phi"], progress=False)
    return model, ob.lm_loss, tokens, kwargs


def worker(out: str) -> None:
    from suscept import distributed
    from suscept.store import DrawStore

    torch.set_num_threads(1)
    assert distributed.init() and torch.distributed.get_world_size() == 2
    model, loss_fn, tokens, kwargs = problem()
    store = DrawStore(Path(out) / "store", meta={"test": "distributed"})
    run = distributed.sample(model, loss_fn, tokens, CONFIG, store=store, **kwargs)
    if distributed.rank() == 0:
        run.save(Path(out) / "run")
    torch.distributed.barrier()  # no rank tears the group down while another still uses it
    torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    pytest.importorskip("transformer_lens")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
           str(Path(__file__)), str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = suscept.Run.load(tmp_path / "run")

    model, loss_fn, tokens, kwargs = problem()
    with pytest.warns(suscept.DivergenceWarning):
        single = suscept.sample(model, loss_fn, tokens, CONFIG, **kwargs)
    assert [d.chain for d in single.divergences] == [2, 4]
    assert merged.divergences == single.divergences
    assert_same_run(merged, single)  # bitwise: same draws, same float64 sums
    chi_m, chi_s = suscept.susceptibility(merged), suscept.susceptibility(single)
    torch.testing.assert_close(chi_m.value, chi_s.value, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(chi_m.stderr, chi_s.stderr, rtol=1e-12, atol=1e-15)
    llc_m = suscept.llc(merged.moments_of("loss"), merged.anchor_values["loss"], 20.0)
    llc_s = suscept.llc(single.flat("loss"), single.anchor_values["loss"], 20.0, n_blocks=3)
    torch.testing.assert_close(llc_m.value, llc_s.value, rtol=1e-12, atol=0)

    # both ranks wrote their chains into one store: it holds the one-process draws
    from suscept.store import DrawStore

    store = DrawStore.open(tmp_path / "store")
    assert store.chains() == [0, 1, 3]  # finished without diverging
    torch.testing.assert_close(store.draws("loss").to(single.draws["loss"].dtype),
                               single.draws["loss"], rtol=0, atol=0, equal_nan=True)
    from suscept.susceptibilities import from_draws

    with pytest.warns(suscept.EstimatorWarning, match=r"chains \[2, 4\]"):
        stored = from_draws(store.draws("phi"), store.draws("restricted_token_loss"), n_blocks=3)
    chi_store = suscept.susceptibility(stored)
    torch.testing.assert_close(chi_store.value, chi_s.value, rtol=1e-12, atol=1e-15)


def test_speedup_benchmark_quick():
    pytest.importorskip("transformer_lens")
    sys.path.insert(0, str(ROOT))
    from experiments.benchmarks import distributed_speedup

    out = distributed_speedup.main(["--quick"])
    one, two = out["rows"]
    assert (one["nproc"], two["nproc"]) == (1, 2)
    assert [r["chains"] for r in sorted(two["ranks"], key=lambda r: r["rank"])] == [[0, 1], [2, 3]]
    assert out["sampling_speedup"] == one["sample_s"] / two["sample_s"] > 0


if __name__ == "__main__":
    worker(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, where a rank sometimes aborts after the work is done
