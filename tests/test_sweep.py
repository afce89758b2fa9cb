"""Sweeps resume after an interruption without recomputing finished cells, and give the same
tidy table as an uninterrupted run; mismatched settings are refused."""

import json

import pandas as pd
import pytest
import torch

import suscept
from suscept import sweep
from suscept.errors import ConfigError

CELLS = sweep.grid(component=["L0H0", "L1H2"], gamma=[100.0, 300.0], n_beta=[10.0, 30.0])


class Counting:
    """A deterministic cell function: an LLC Estimate from Gaussian draws seeded by the cell,
    a per-component Estimate and a plain number; it records every call and can be told to
    stop (like a Ctrl-C) at its n-th call."""

    def __init__(self, stop_at: int | None = None):
        self.calls: list[dict] = []
        self.stop_at = stop_at

    def __call__(self, component, gamma, n_beta):
        self.calls.append(dict(component=component, gamma=gamma, n_beta=n_beta))
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        g = torch.Generator().manual_seed(int(gamma + n_beta) + len(component))
        losses = 1.0 + torch.randn(4, 40, 5, generator=g, dtype=torch.float64) / gamma
        llc = suscept.llc(losses, torch.ones(5), n_beta)
        f64 = dict(dtype=torch.float64)
        chi = suscept.Estimate(torch.tensor([gamma, -n_beta], **f64),
                               torch.tensor([0.1, 0.2], **f64), ("component",), "chi", "t",
                               {"components": ["L0H0", "L1H2"]})
        return {"llc": llc, "chi": chi, "loss_rise": float(n_beta / gamma)}


def test_tidy_table(tmp_path):
    table = sweep.run(Counting(), CELLS, tmp_path / "s", config={"seed": 0}, progress=False)
    assert list(table.columns) == ["component", "gamma", "n_beta", "quantity", "element",
                                   "value", "stderr"]
    assert len(table) == len(CELLS) * 4  # llc (scalar) + chi (2 components) + loss_rise
    row = table[(table.quantity == "chi") & (table.element == "L1H2")
                & (table.gamma == 300.0) & (table.n_beta == 10.0)]
    assert row.value.tolist() == [-10.0, -10.0] and row.stderr.tolist() == [0.2, 0.2]
    llc = table[table.quantity == "llc"]
    assert llc.stderr.notna().all() and table[table.quantity == "loss_rise"].stderr.isna().all()
    pd.testing.assert_frame_equal(sweep.load(tmp_path / "s"), table)
    csv = pd.read_csv(tmp_path / "s" / "table.csv", keep_default_na=False, na_values=["nan"])
    pd.testing.assert_frame_equal(csv, table)


def test_resume_after_interrupt_recomputes_nothing_finished(tmp_path):
    whole = sweep.run(Counting(), CELLS, tmp_path / "whole", config={"seed": 0},
                      progress=False)
    first = Counting(stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(first, CELLS, tmp_path / "cut", config={"seed": 0}, progress=False)
    assert len(list((tmp_path / "cut" / "cells").glob("*.json"))) == 3
    with pytest.raises(ConfigError, match="not finished"):
        sweep.load(tmp_path / "cut")
    # a crash in the middle of writing leaves only a temporary file, which is ignored
    (tmp_path / "cut" / "cells" / "half-written.json.tmp").write_text('{"cell": ')
    second = Counting()
    resumed = sweep.run(second, CELLS, tmp_path / "cut", config={"seed": 0}, progress=False)
    assert second.calls == CELLS[3:]  # the interrupted cell and the rest, nothing else
    pd.testing.assert_frame_equal(resumed, whole)
    # a deleted cell is the only one recomputed
    (tmp_path / "cut" / "cells" / f"{sweep.cell_key(CELLS[5])}.json").unlink()
    third = Counting()
    again = sweep.run(third, CELLS, tmp_path / "cut", config={"seed": 0}, progress=False)
    assert third.calls == [CELLS[5]]
    pd.testing.assert_frame_equal(again, whole)


def test_extending_an_axis_reuses_finished_cells(tmp_path):
    sweep.run(Counting(), CELLS, tmp_path / "s", config={"seed": 0}, progress=False)
    more = sweep.grid(component=["L0H0", "L1H2"], gamma=[100.0, 300.0, 1000.0],
                      n_beta=[10.0, 30.0])
    f = Counting()
    table = sweep.run(f, more, tmp_path / "s", config={"seed": 0}, progress=False)
    assert f.calls == [c for c in more if c["gamma"] == 1000.0]
    assert len(table) == len(more) * 4


def test_mismatched_settings_are_refused(tmp_path):
    sweep.run(Counting(), CELLS[:2], tmp_path / "s", config={"seed": 0}, progress=False)
    with pytest.raises(ConfigError, match=r"different config .*saved \{'seed': 0\}"):
        sweep.run(Counting(), CELLS[:2], tmp_path / "s", config={"seed": 1}, progress=False)
    with pytest.raises(ConfigError, match="different axes"):
        sweep.run(Counting(), sweep.grid(gamma=[1.0]), tmp_path / "s", config={"seed": 0},
                  progress=False)
    with pytest.raises(ConfigError, match="different fn"):
        sweep.run(lambda **c: {"x": 1.0}, CELLS[:2], tmp_path / "s", config={"seed": 0},
                  progress=False)
    saved = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert saved["config"] == {"seed": 0}  # a refused rerun changes nothing


def test_bad_grids_and_outputs(tmp_path):
    with pytest.raises(ConfigError, match="list of values"):
        sweep.grid(gamma=300.0)
    with pytest.raises(ConfigError, match="no cells"):
        sweep.run(Counting(), [], tmp_path / "a")
    with pytest.raises(ConfigError, match="more than once"):
        sweep.run(Counting(), CELLS[:1] * 2, tmp_path / "b")
    with pytest.raises(ConfigError, match="numbers, tensors or Estimates"):
        sweep.run(lambda gamma: {"x": "high"}, sweep.grid(gamma=[1.0]), tmp_path / "c",
                  progress=False)
    with pytest.raises(ConfigError, match="sweep.json missing"):
        sweep.load(tmp_path / "nowhere")


def test_split_config():
    base = suscept.SamplerConfig(step_size=1e-3, n_beta=10.0, gamma=100.0)
    config, rest = sweep.split_config(base, {"gamma": 300.0, "component": "L0H1"})
    assert config.gamma == 300.0 and config.n_beta == 10.0 and rest == {"component": "L0H1"}
