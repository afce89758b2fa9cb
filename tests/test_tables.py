"""Estimates as tables: long-form pandas, xarray, coordinates, top couplings (suscept.tables).

Every table entry is checked against the Estimate's own tensors element by element, on a real
BIF estimate from Gaussian draws (no sampler needed for a layout test).
"""

import sys

import numpy as np
import pytest
import torch

import suscept
from suscept.errors import ConfigError, ShapeError
from suscept.tables import top, write_top_couplings


@pytest.fixture(scope="module")
def est():
    g = torch.Generator().manual_seed(0)
    losses = torch.randn(2, 40, 3, generator=g, dtype=torch.float64)
    obs = losses[..., :1] * torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64) \
        + torch.randn(2, 40, 4, generator=g, dtype=torch.float64)
    return suscept.bif(losses, obs).with_coords(
        sample=["a", "b", "c"],
        observable={"token_str": [" the", " cat", " sat", "."], "position": [1, 2, 3, 4],
                    "sequence": [7, 7, 7, 7], "document": [0, 0, 0, 0]})


def test_dataframe_long_form_matches_every_element(est):
    df = est.to_dataframe()
    assert len(df) == est.value.numel() == 12
    assert list(df.columns) == ["sample", "observable", "token_str", "position", "sequence",
                                "document", "value", "stderr", "z"]
    names = ["a", "b", "c"]
    strings = [" the", " cat", " sat", "."]
    for row in df.itertuples():
        j, q = names.index(row.sample), row.observable
        assert row.value == est.value[j, q].item() and row.stderr == est.stderr[j, q].item()
        assert row.z == pytest.approx(est.value[j, q].item() / est.stderr[j, q].item(), rel=1e-15)
        assert row.token_str == strings[q] and row.position == q + 1
    back = df.pivot(index="sample", columns="observable", values="value").loc[names]
    np.testing.assert_array_equal(back.to_numpy(), est.value.numpy())


def test_xarray_named_dims_and_coords(est):
    ds = est.to_xarray()
    assert ds["value"].dims == ("sample", "observable")
    np.testing.assert_array_equal(ds["value"].sel(sample="b").values, est.value[1].numpy())
    np.testing.assert_array_equal(ds["stderr"].values, est.stderr.numpy())
    assert list(ds["token_str"].values) == [" the", " cat", " sat", "."]
    assert ds["position"].dims == ("observable",)
    assert ds.attrs["convention"] == est.convention


def test_scalar_and_component_fallback():
    e = suscept.Estimate(torch.tensor(1.5, dtype=torch.float64),
                         torch.tensor(0.5, dtype=torch.float64), (), "llc", "t (E L - L*)")
    df = e.to_dataframe()
    assert len(df) == 1 and df["z"].item() == 3.0
    m = suscept.Estimate(torch.zeros(2, 2, dtype=torch.float64),
                         torch.ones(2, 2, dtype=torch.float64), ("token", "component"),
                         "susceptibility", "-Cov", {"components": ["L0H0", "L0H1"]})
    assert list(m.to_dataframe()["component"]) == ["L0H0", "L0H1", "L0H0", "L0H1"]
    assert list(m.to_xarray()["component"].values) == ["L0H0", "L0H1"]


def test_coords_survive_save_and_load(est, tmp_path):
    est.save(tmp_path / "b.pt")
    back = suscept.Estimate.load(tmp_path / "b.pt")
    assert back.to_dataframe().equals(est.to_dataframe())


def test_bad_coords_are_refused(est):
    with pytest.raises(ShapeError, match="has 2 values"):
        est.with_coords(sample=["a", "b"])
    with pytest.raises(ShapeError, match="no dim 'token'"):
        est.with_coords(token=[1, 2, 3])
    with pytest.raises(ConfigError, match="rank by"):
        top(est, by="size")


def test_top_is_sorted_by_abs_z(est, tmp_path):
    t = top(est, 5)
    z = (est.value / est.stderr).abs().flatten().sort(descending=True).values[:5]
    np.testing.assert_allclose(t["z"].abs().to_numpy(), z.numpy(), rtol=1e-12)
    assert list(t["rank"]) == [1, 2, 3, 4, 5]
    paths = write_top_couplings(tmp_path, {"bif": est, "llc": suscept.Estimate(
        torch.tensor(1.0), torch.tensor(1.0), (), "llc", "")}, n=3)
    assert [p.name for p in paths] == ["top_bif.csv"]
    import pandas as pd

    csv = pd.read_csv(paths[0])
    assert len(csv) == 3 and list(csv["sample"]) == list(t["sample"][:3])


def test_xarray_missing_gives_clear_error(est, monkeypatch):
    monkeypatch.setitem(sys.modules, "xarray", None)  # import xarray raises ImportError
    with pytest.raises(ConfigError, match="suscept\\[xarray\\]"):
        est.to_xarray()


def test_repeated_dim_gets_its_own_axis_name():
    g = torch.Generator().manual_seed(1)
    k = suscept.loss_kernel(torch.randn(2, 30, 3, generator=g, dtype=torch.float64))
    k = k.with_coords(sample={"sequence": [4, 5, 6]})
    df = k.to_dataframe()
    assert list(df.columns[:4]) == ["sample", "sample_sequence", "sample_2", "sample_2_sequence"]
    row = df.iloc[5]  # element (1, 2)
    assert (row["sample"], row["sample_2"], row["sample_2_sequence"]) == (1, 2, 6)
    assert row["value"] == k.value[1, 2].item()
    assert k.to_xarray()["value"].dims == ("sample", "sample_2")
