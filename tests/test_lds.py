"""The LDS benchmark's --quick mode runs end to end and ranks retraining outcomes."""

import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_lds_quick(tmp_path):
    from experiments import lds

    figures = lds.main(["--quick", "--out", str(tmp_path)])
    out = tmp_path / "lds"
    written = {p.name for p in out.iterdir()}
    assert {"figures.json", "config.json", "report.md", "lds.png", "cache"} <= written, written
    config = json.loads((out / "config.json").read_text())
    assert config["quick"] is True and set(config["settings"]) == {"logreg"}
    assert list((out / "cache").glob("logreg-alpha0.5-*.pt")), "retrained losses not cached"
    methods = figures["settings"]["logreg"]["methods"]
    exact = methods["influence (explicit H)"]["alpha"][0.5]
    # measured 0.917 ± 0.014 (24 subsets); chance is 0 with SE ~ 1/sqrt(23) per query
    assert exact["lds"] > 0.5 and exact["lds"] > 5 * exact["se_subsets"]
    cg = methods["influence (CG)"]["alpha"][0.5]
    assert abs(cg["lds"] - exact["lds"]) < 1e-3
    bif = [r for m, r in methods.items() if m.startswith("BIF") and "alpha" in r]
    assert bif, "no calibrated BIF setting"
    assert bif[0]["alpha"][0.5]["lds"] > 0.2
    for r in methods.values():
        if "cost" in r:
            assert r["cost"]["wall_s"] > 0 and r["cost"]["cpu_s"] >= 0


def test_lds_statistic_on_a_known_answer():
    """Attributions that are the exact additive model of the losses give LDS 1; reversed, -1;
    noise alone, about 0 within the bootstrap error."""
    from experiments import lds

    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(60, 30, generator=g) < 0.5).double()
    tau = torch.randn(30, 4, generator=g, dtype=torch.float64)
    f = masks @ tau
    assert lds.lds(tau, masks, f)["lds"] == pytest.approx(1.0)
    assert lds.lds(-tau, masks, f)["lds"] == pytest.approx(-1.0)
    noise = lds.lds(torch.randn(30, 4, generator=g, dtype=torch.float64), masks, f)
    assert abs(noise["lds"]) < 4 * noise["se_subsets"] + 4 * noise["se_queries"]
