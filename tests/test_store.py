"""The draw store: kill -9 and resume equals an uninterrupted run; interrupted in-process
runs resume bitwise; mismatched or corrupt stores are refused; the blockwise BIF equals the
in-memory one; the store reads back as xarray."""

import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import suscept
from suscept import cli
from suscept.errors import ConfigError
from suscept.integrity import StoreError, StoreLockedError, seal
from suscept.store import DrawStore, write_json

ROOT = Path(__file__).resolve().parents[1]
MODEL_TOML = """
[model]
n_layers = 2
d_model = 16
n_heads = 2
d_head = 8
d_vocab = 64
n_ctx = 24
"""  # a tiny TransformerLens model for the zoo language
TOML = MODEL_TOML + """
[data]
n_sequences = 24
seq_len = 24
n_probe = 6
n_query = 2

[observables]
components = ["L0H0", "L1.attn"]

[sampler]
step_size = 1e-3
n_beta = 20.0
gamma = 300.0
n_chains = 3
n_draws = 48
n_blocks = 8
batch_size = 8
precondition = "rmsprop"

[output]
col_block = 16
"""


# ---- a small regression problem for in-process checks ---------------------------------------
def regression(**overrides):
    torch.manual_seed(0)
    x = torch.randn(24, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(24)
    model = nn.Linear(3, 1)
    cfg = suscept.SamplerConfig(**{**dict(step_size=1e-3, n_beta=24.0, gamma=100.0,
                                          n_chains=3, n_draws=30, thin=2, batch_size=8,
                                          precondition="rmsprop"), **overrides})
    kwargs = dict(probe=(x, y), observables={"q": lambda m: m(x[:5]).squeeze(-1)},
                  progress=False)
    return model, (lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2), (x, y), cfg, kwargs


class Interrupt(Exception):
    pass


class Interrupted(DrawStore):
    """A store whose process 'dies' (raises) right after its k-th commit."""

    def __init__(self, *args, after: int, **kw):
        super().__init__(*args, **kw)
        self.after = after

    def commit(self, *args):
        super().commit(*args)
        self.after -= 1
        if self.after == 0:
            raise Interrupt


def assert_same_run(a: suscept.Run, b: suscept.Run) -> None:
    """Bitwise equal draws, traces (NaN where the other has NaN) and streamed moments."""
    def same(u, v, what):
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True, msg=what)

    for name in b.draws:
        same(a.draws[name], b.draws[name], name)
    for name in ("loss_trace", "probe_loss", "distance"):
        same(getattr(a, name), getattr(b, name), name)
    assert a.divergences == b.divergences
    assert a.moments.keys() == b.moments.keys()
    for key, mb in b.moments.items():
        ma = a.moments[key]
        for x, y in zip(ma if isinstance(ma, list) else [ma], mb if isinstance(mb, list) else [mb]):
            for f in ("n", "mean_x", "mean_y", "m2_x", "m2_y", "cxy", "t_xyy", "t_xxy"):
                u, v = getattr(x, f), getattr(y, f)
                assert (u is None and v is None) or torch.equal(u, v), (key, f)


# commits: 3 blocks per chain; with DIVERGE, chain 1 commits block 0 (commit 4), then stops at
# step 26 with 2 draws of block 1 pending, committed as its last record (commit 5)
DIVERGE = dict(step_size=3e-3, max_loss_rise=3.0)


@pytest.mark.parametrize("after, overrides", [(1, {}), (4, {}), (7, {}), (4, DIVERGE),
                                              (5, DIVERGE)])
def test_interrupted_in_process_resumes_bitwise(tmp_path, after, overrides):
    model, loss_fn, data, cfg, kwargs = regression(**overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", suscept.DivergenceWarning)
        ref = suscept.sample(model, loss_fn, data, cfg, **kwargs)
        assert [d.chain for d in ref.divergences] == ([1] if overrides else [])
        with pytest.raises(Interrupt):
            suscept.sample(model, loss_fn, data, cfg, store=Interrupted(tmp_path, after=after),
                           **kwargs)
    committed = sum(r["draws"] for r in DrawStore(tmp_path).progress().values())
    assert 0 < committed < cfg.n_chains * cfg.n_draws
    assert DrawStore(tmp_path).holder() is None  # the failed writer released its lock
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", suscept.DivergenceWarning)
        run = suscept.sample(model, loss_fn, data, cfg, store=DrawStore(tmp_path, resume=True),
                             **kwargs)
    assert_same_run(run, ref)
    store = DrawStore.open(tmp_path)
    torch.testing.assert_close(store.draws("q").to(ref.draws["q"].dtype), ref.draws["q"],
                               rtol=0, atol=0, equal_nan=True)
    status = [r["status"] for _, r in sorted(store.progress().items())]
    assert status == (["done", "diverged", "done"] if overrides else ["done"] * 3)


def test_blockwise_bif_equals_in_memory_bif(tmp_path):
    model, loss_fn, data, cfg, kwargs = regression()
    run = suscept.sample(model, loss_fn, data, cfg, store=DrawStore(tmp_path), **kwargs)
    store = DrawStore.open(tmp_path)
    for col_block in (1, 2, 5):  # any column blocking gives the same matrix
        est = store.bif("loss", "q", col_block=col_block)
        ref = suscept.bif(run.flat("loss"), run.flat("q"))
        assert est.dims == ref.dims and est.convention == ref.convention
        torch.testing.assert_close(est.value, ref.value, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(est.stderr, ref.stderr, rtol=1e-10, atol=1e-15)
    derivative = store.bif("loss", "q", scale="derivative", beta=run.beta)
    torch.testing.assert_close(derivative.value, run.beta * ref.value, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(store.anchor("loss"), run.anchor_values["loss"])


def test_xarray_view(tmp_path):
    xr = pytest.importorskip("xarray")
    model, loss_fn, data, cfg, kwargs = regression()
    run = suscept.sample(model, loss_fn, data, cfg, progress=False, store=DrawStore(
        tmp_path, meta={"what": "test"}, dims={"loss": ("sample",), "q": ("query",)},
        coords={"query": ["a", "b", "c", "d", "e"]}),
        **{k: v for k, v in kwargs.items() if k != "progress"})
    ds = DrawStore.open(tmp_path).to_xarray()
    assert isinstance(ds, xr.Dataset)
    assert ds["q"].dims == ("chain", "draw", "query") and list(ds["query"].values) == list("abcde")
    assert ds["loss"].dims == ("chain", "draw", "sample")
    assert torch.equal(torch.from_numpy(ds["q"].values).to(run.draws["q"].dtype), run.draws["q"])
    assert ds["committed"].values.tolist() == [30, 30, 30]
    assert json.loads(ds.attrs["meta"]) == {"what": "test"}


def test_mismatched_and_corrupt_stores_are_refused(tmp_path):
    model, loss_fn, data, cfg, kwargs = regression()
    suscept.sample(model, loss_fn, data, cfg, store=DrawStore(tmp_path, meta={"a": 1}), **kwargs)
    with pytest.raises(ConfigError, match="resume"):  # committed draws, no resume
        suscept.sample(model, loss_fn, data, cfg, store=DrawStore(tmp_path, meta={"a": 1}),
                       **kwargs)
    with pytest.raises(ConfigError, match=r"meta\.a"):  # a different run's store
        suscept.sample(model, loss_fn, data, cfg,
                       store=DrawStore(tmp_path, meta={"a": 2}, resume=True), **kwargs)
    other = suscept.SamplerConfig(**{**cfg.__dict__, "gamma": 50.0})
    with pytest.raises(ConfigError, match=r"config\.gamma"):
        suscept.sample(model, loss_fn, data, other,
                       store=DrawStore(tmp_path, meta={"a": 1}, resume=True), **kwargs)
    ckpt = next((tmp_path / "state").glob("chain1-*.pt"))
    ckpt.write_bytes(b"garbage")
    with pytest.raises(StoreError, match=r"checkpoint .*chain1-.* fails its checksum"):
        suscept.sample(model, loss_fn, data, cfg,
                       store=DrawStore(tmp_path, meta={"a": 1}, resume=True), **kwargs)
    (tmp_path / "progress" / "chain0.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"chain0\.json is corrupt \(JSONDecodeError"):
        DrawStore.open(tmp_path).progress()
    (tmp_path / "progress" / "chain0.json").unlink()
    (tmp_path / "draws.zarr" / "zarr.json").write_text("{")
    with pytest.raises(StoreError, match=r"draws.zarr/zarr.json is missing or fails its "):
        DrawStore.open(tmp_path)
    for p in (tmp_path / "progress").iterdir():
        p.unlink()
    with pytest.raises(StoreError, match="draw store .* is corrupt"):  # no record to check
        DrawStore.open(tmp_path)
    with pytest.raises(StoreError, match="no draw store"):
        DrawStore.open(tmp_path / "nothing")


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    pytest.importorskip("transformer_lens")
    toml = tmp_path / "run.toml"
    toml.write_text(TOML)
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "suscept", "run", str(toml), "--out",
                             str(killed), "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = killed / "store" / "progress"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # kill after 3 commits
        records = [json.loads(p.read_text()) for p in progress.glob("chain*.json")] \
            if progress.exists() else []
        if sum(r["draws"] for r in records) >= 18:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = DrawStore(killed / "store").progress()
    assert sum(r["draws"] for r in before.values()) < 3 * 48  # really interrupted
    kept = {c: DrawStore.open(killed / "store").read("token_loss", c, r["draws"])
            for c, r in before.items()}

    with pytest.raises(ConfigError, match="--resume"):
        cli.run(str(toml), folder=killed, progress=False)
    cli.run(str(toml), folder=killed, resume=True, progress=False)
    full = tmp_path / "full"
    cli.run(str(toml), folder=full, progress=False)

    a, b = DrawStore.open(killed / "store"), DrawStore.open(full / "store")
    for name in a.names:  # every draw, none lost or duplicated: the same arrays
        assert torch.equal(a.draws(name), b.draws(name)), name
    for c, draws in kept.items():  # committed draws survived the kill untouched
        assert torch.equal(draws, b.read("token_loss", c, len(draws)))
    assert_same_run(suscept.Run.load(killed / "run"), suscept.Run.load(full / "run"))
    for est in (full / "estimates").glob("*.pt"):
        x, y = suscept.Estimate.load(killed / "estimates" / est.name), suscept.Estimate.load(est)
        assert torch.equal(x.value, y.value) and torch.equal(x.stderr, y.stderr), est.name


def test_cost_scaling_quick():
    pytest.importorskip("transformer_lens")
    sys.path.insert(0, str(ROOT))
    from experiments.benchmarks import cost_scaling

    out = cost_scaling.main(["--quick", "--dense"])
    assert {r["sweep"] for r in out["cost"]} == {"probe tokens", "components", "parameters"}
    blockwise, dense = out["memory"]
    assert blockwise["shape"] == dense["shape"] == [64, 8 * 127]
    assert abs(blockwise["checksum"] - dense["checksum"]) < 1e-9 * dense["checksum"]
    assert blockwise["peak_rss_mb"] < cost_scaling.BUDGET_MB


# ---- damaged stores, the writer lock, stored dtypes -----------------------------------------
def finished_store(folder: Path, **overrides) -> tuple[suscept.Run, Callable]:
    """A finished store of the regression problem and a function that resumes it."""
    model, loss_fn, data, cfg, kwargs = regression(**overrides)
    run = suscept.sample(model, loss_fn, data, cfg, store=DrawStore(folder), **kwargs)

    def resume():
        return suscept.sample(model, loss_fn, data, cfg, store=DrawStore(folder, resume=True),
                              **kwargs)
    return run, resume


def edit_record(folder: Path, chain: int, **changes) -> None:
    """Rewrite a commit record with ``changes`` and a valid seal (a deliberate edit)."""
    path = folder / "progress" / f"chain{chain}.json"
    path.write_text(json.dumps(seal({**json.loads(path.read_text()), **changes})))


@pytest.mark.parametrize("damage", ["garbled chunk", "deleted chunk", "n_draws attribute",
                                    "record draws", "checkpoint outside state",
                                    "linked checkpoint", "layout outside", "garbled anchor"])
def test_damaged_store_is_refused_by_readers_and_resume(tmp_path, damage):
    folder = tmp_path / "store"
    run, resume = finished_store(folder)
    chunk = folder / "draws.zarr" / "q" / "c" / "1" / "1" / "0"
    if damage == "garbled chunk":
        data = bytearray(chunk.read_bytes())
        data[7] ^= 0x01  # the lowest mantissa bit of one float32: a tiny silent change
        chunk.write_bytes(bytes(data))
        what = r"draws 10\.\.19 of chain 1 of 'q' .* missing or damaged"
    elif damage == "deleted chunk":
        chunk.unlink()
        what = r"draws 10\.\.19 of chain 1 of 'q' .* missing or damaged"
    elif damage == "n_draws attribute":
        meta = folder / "draws.zarr" / "zarr.json"
        attrs = json.loads(meta.read_text())
        attrs["attributes"]["n_draws"] = 20
        meta.write_text(json.dumps(attrs))
        what = r"zarr.json is missing or fails its checksum"
    elif damage == "record draws":
        edit_record(folder, 2, draws=20)
        what = r"chain2.json does not match the store's attributes"
    elif damage == "checkpoint outside state":
        shutil.copy(next((folder / "state").glob("chain0-*")), tmp_path / "evil.pt")
        edit_record(folder, 0, checkpoint="../../evil.pt")
        what = r"names '../../evil.pt', which is not a file inside"
    elif damage == "linked checkpoint":
        ckpt = next((folder / "state").glob("chain0-*"))
        shutil.move(ckpt, tmp_path / "elsewhere.pt")
        ckpt.symlink_to(tmp_path / "elsewhere.pt")
        what = r"which is not a file inside"
    elif damage == "layout outside":
        rec = json.loads((folder / "progress" / "chain0.json").read_text())
        for c in range(3):
            edit_record(folder, c, layout={**rec["layout"], "../../../etc/hostname": "0"})
        what = r"names '../../../etc/hostname', which is not a path inside"
    else:
        anchor = folder / "draws.zarr" / "anchor_q" / "c" / "0"
        anchor.write_bytes(anchor.read_bytes()[:-1] + b"\x00")
        what = r"anchor_q/c/0 is missing or fails its checksum"
    with pytest.raises(StoreError, match=what):
        DrawStore.open(folder).bif("loss", "q")
    with pytest.raises(StoreError, match=what):
        resume()
    with pytest.raises(StoreError, match=what):
        DrawStore.open(folder).draws("q")


def test_verification_in_slices_of_any_size(tmp_path, monkeypatch):
    """Blocks checked in reads smaller than a row, than a block, or spanning blocks."""
    from suscept import store_read

    run, _ = finished_store(tmp_path)
    chunk = tmp_path / "draws.zarr" / "loss" / "c" / "2" / "2" / "0"
    good = chunk.read_bytes()
    for size in (1, 7, 24 * 3 + 5, 24 * 25, 1 << 20):
        monkeypatch.setattr(store_read, "VERIFY_ELEMENTS", size)
        chunk.write_bytes(good)
        assert DrawStore.open(tmp_path).verify().keys() == {0, 1, 2}
        chunk.write_bytes(good[:-1] + bytes([good[-1] ^ 0x80]))  # last draw of the last block
        with pytest.raises(StoreError, match=r"draws 20\.\.29 of chain 2 of 'loss'"):
            DrawStore.open(tmp_path).verify()


def test_writer_lock_temp_files_and_orphans(tmp_path):
    model, loss_fn, data, cfg, kwargs = regression()
    anchor = {"loss": torch.zeros(24), "q": torch.zeros(5)}
    shapes = {k: tuple(v.shape) for k, v in anchor.items()}
    with DrawStore(tmp_path) as first:
        first.prepare(dataclasses.asdict(cfg), shapes, anchor, [10, 10, 10])
        second = DrawStore(tmp_path, resume=True)
        with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()} on .* since 20"):
            second.prepare(dataclasses.asdict(cfg), shapes, anchor, [10, 10, 10])
        assert f"pid {os.getpid()}" in second.holder() and first.holder() is None
    assert second.holder() is None  # released on leaving the with block
    dropped = DrawStore(tmp_path, resume=True)
    dropped.prepare(dataclasses.asdict(cfg), shapes, anchor, [10, 10, 10])
    assert second.holder() is not None
    del dropped  # a writer dropped without close() frees the lock too
    assert second.holder() is None
    # what killed writers leave: temporary files and a checkpoint no record names
    leftovers = [tmp_path / "state" / "chain0-0000010-00000020.pt",
                 tmp_path / "progress" / "chain0.json.123.abcd.tmp",
                 tmp_path / "draws.zarr.123.abcd.tmp"]
    leftovers[0].write_bytes(b"x")
    leftovers[1].write_bytes(b"{")
    leftovers[2].mkdir()
    run = suscept.sample(model, loss_fn, data, cfg, store=DrawStore(tmp_path, resume=True),
                         **kwargs)
    assert not any(p.exists() for p in leftovers)
    assert torch.equal(DrawStore.open(tmp_path).draws("q").to(run.draws["q"].dtype),
                       run.draws["q"])


def test_unique_temp_names_two_processes_write_one_file(tmp_path):
    """Two processes replacing one JSON file 300 times each: with a shared temporary name one
    would move the other's half-written file or fail; with unique names both succeed."""
    target = tmp_path / "record.json"
    ctx = multiprocessing.get_context("fork")

    def hammer(k: int) -> None:
        for i in range(300):
            write_json(target, {"writer": k, "i": i, "pad": "x" * 4000})
        os._exit(0)

    procs = [ctx.Process(target=hammer, args=(k,)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads(target.read_text())["i"] == 299
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("dtype, stored", [(torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float32),
                                           (torch.float64, torch.float64)])
def test_draws_stored_float32_or_better(tmp_path, dtype, stored):
    model, loss_fn, data, cfg, kwargs = regression(n_draws=6, n_chains=1)
    model = model.to(dtype)
    data = tuple(t.to(dtype) for t in data)
    x = data[0]
    kwargs.update(probe=data, observables={"q": lambda m: m(x[:5]).squeeze(-1)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", suscept.DivergenceWarning)
        run = suscept.sample(model, loss_fn, data, cfg, store=DrawStore(tmp_path), **kwargs)
    draws = DrawStore.open(tmp_path).draws("q")
    assert draws.dtype == stored
    assert torch.equal(draws, run.draws["q"].to(stored))  # exact: no value rounded


def test_non_finite_draws_are_never_committed(tmp_path):
    model, loss_fn, data, cfg, kwargs = regression()
    anchor = {"loss": torch.zeros(24), "q": torch.zeros(5)}
    store = DrawStore(tmp_path)
    store.prepare(dataclasses.asdict(cfg), {k: tuple(v.shape) for k, v in anchor.items()},
                  anchor, [10, 10, 10])
    checkpoint = {"chain": 0, "draw": 10, "step": 20, "done": False, "divergence": None}
    for bad, what in [(float("nan"), "NaN"), (1e39, "range")]:  # 1e39 overflows float32
        q = torch.zeros(10, 5, dtype=torch.float64)
        q[3, 1] = bad
        with pytest.raises(StoreError, match=rf"'q', chain 0 draws from 0: 1 values are not "
                                             rf"finite as float32 \(NaN, inf or out of its {what}"
                           if what == "range" else r"'q', chain 0 .* not finite"):
            store.commit(0, 0, {"loss": torch.zeros(10, 24), "q": q}, checkpoint)
    assert store.progress() == {}  # nothing committed
    shutil.rmtree(tmp_path / "state")
    (tmp_path / "state").write_text("a file where the checkpoints go: an OSError on writing")
    with pytest.raises(StoreError, match=r"cannot write the draw store .*free disk space"):
        store.commit(0, 0, {"loss": torch.zeros(10, 24), "q": torch.zeros(10, 5)}, checkpoint)
    assert store.progress() == {}
    store.close()
    with pytest.raises(StoreError, match="not open for writing"):
        store.commit(0, 0, {"loss": torch.zeros(10, 24), "q": torch.zeros(10, 5)}, checkpoint)
    with pytest.raises(StoreError, match="not finite"):
        DrawStore(tmp_path / "b").prepare(dataclasses.asdict(cfg), {"q": (1,)},
                                          {"q": torch.tensor([float("inf")])}, [10, 10, 10])
