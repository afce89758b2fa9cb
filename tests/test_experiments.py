"""The experiment scripts' --quick modes run end to end and find what they should."""

import json

import pytest

pytest.importorskip("transformer_lens")
pytest.importorskip("matplotlib")


def test_circuit_recovery_quick(tmp_path):
    from experiments import circuit_recovery

    figures = circuit_recovery.main(["--quick", "--out", str(tmp_path)])
    out = tmp_path / "circuit_recovery"
    for name in ("figures.json", "config.json", "report.md", "loadings.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["quick"] is True
    res = figures["seeds"][0]["gamma"][300.0]
    # measured 0.969 here (full mode targets 0.9 on three seeds); chance is 0.5
    assert res["auroc"] > 0.85
    assert res["pc_cos"] > 0.8
    assert 0.5 <= figures["seeds"][0]["control_ablation"]["auroc"] <= 1.0
