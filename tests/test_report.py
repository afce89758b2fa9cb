"""The summary and figures of a results folder: labels match the data, scales are centred,
the sampler's health and its warnings are reported (real runs on the exact Gaussian toy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import suscept
from suscept import exact
from suscept.estimate import Estimate
from suscept.figures import axis_names, matrix_figure, trace_figure
from suscept.report import health, report
from suscept.store import write_json

pytest.importorskip("matplotlib")
torch.set_num_threads(1)

N, D = 6, 3


def gaussian_run(anchor_shift: float = 0.0, step_size: float = 0.03, gamma: float = 4.0,
                 n_beta: float = 8.0):
    """A real SGLD run on quadratic losses; ``anchor_shift`` moves w* off the minimum."""
    m, a = exact.random_problem(N, D, seed=3)
    w_min = torch.linalg.solve(a.mean(0), torch.einsum("ijk,ik->j", a, m) / N)
    anchor = w_min + anchor_shift
    cfg = suscept.SamplerConfig(step_size=step_size, n_beta=n_beta, gamma=gamma, n_chains=3,
                                n_draws=200, thin=2, burn_in=50, seed=0)
    run = suscept.sample(exact.Point(anchor), exact.quadratic_losses, (m, a), cfg,
                         probe=(m, a), stream=[("loss", "loss")], progress=False)
    llc = suscept.llc(run.moments_of("loss"), run.anchor_values["loss"], n_beta)
    return run, llc


@pytest.fixture(scope="module")
def healthy():
    return gaussian_run()


def test_trace_has_a_legend_per_chain_and_the_anchor_line(healthy):
    run, _ = healthy
    fig = trace_figure(run)
    top, bottom = fig.axes[:2]
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert labels == [f"chain {c}" for c in range(3)] + ["anchor w*: L(w*)"]
    anchor_line = top.get_lines()[-1]
    assert np.allclose(anchor_line.get_ydata(), float(run.anchor_values["loss"].mean()))
    x, y = top.get_lines()[1].get_data()
    cfg = run.config
    assert x[0] == cfg["burn_in"] + cfg["thin"] and x[-1] == cfg["burn_in"] + 200 * cfg["thin"]
    assert np.allclose(y, run.probe_loss[1].numpy())
    assert np.allclose(bottom.get_lines()[2].get_ydata(), run.distance[2].numpy())
    assert bottom.get_xlabel() == "SGLD step" and "probe loss" in top.get_ylabel()


def test_susceptibility_rows_are_named_components_and_the_scale_is_centred():
    value = torch.tensor([[1.0, -3.0, 0.5], [2.0, 0.2, -0.1]], dtype=torch.float64).repeat(31, 1)
    stderr = torch.full_like(value, 0.5)
    names = ["L0H1", "L1H0", "L1.mlp"]
    est = Estimate(value, stderr, ("token", "component"), "susceptibility", "-Cov(...)",
                   {"components": names})
    fig = matrix_figure(est, data={"n_query": 2, "seq_len": 32, "n_probe": 8})
    left, right = fig.axes[:2]  # value and z panels; the colour bars come after
    img = left.get_images()[0]
    assert np.array_equal(img.get_array(), value.T.numpy())  # components as rows
    assert [t.get_text() for t in left.get_yticklabels()] == names
    assert img.norm.vmin == -3.0 and img.norm.vmax == 3.0
    assert np.allclose(right.get_images()[0].get_array(), (value / stderr).T.numpy())
    assert [t.get_text() for t in left.get_xticklabels()] == ["seq 0", "seq 1"]
    assert list(left.get_xticks()) == [0, 31]
    assert left.get_ylabel() == "component" and left.get_xlabel().startswith("query token")


def test_bif_rows_are_probe_samples_and_columns_query_tokens(healthy):
    run, _ = healthy
    est = suscept.bif(run.moments_of("loss"))  # [sample j, observable i], here i = samples
    fig = matrix_figure(est, data={"n_probe": N, "n_query": 1, "seq_len": 32})
    ax = fig.axes[0]
    assert np.array_equal(ax.get_images()[0].get_array(), est.value.numpy())
    assert ax.get_ylabel().startswith("probe sequence j") and "up-weighted" in ax.get_ylabel()
    assert ax.get_xlabel().startswith("probe sequence i")
    vmax = float(est.value.abs().max())
    assert ax.get_images()[0].norm.vmin == -vmax and ax.get_images()[0].norm.vmax == vmax
    assert "-Cov(l_j, O_q)" in fig.get_suptitle()


def test_axis_names_fall_back_to_indices():
    assert axis_names("component", 3, ["a", "b"]) == ("component index", None, None)
    assert axis_names("token", 10, None, {"n_query": 2, "seq_len": 32})[0] == "token index"


def test_health_of_a_healthy_run_has_no_warnings(healthy):
    run, llc = healthy
    h = health(run, {"llc": llc})
    rise = float(run.probe_loss.double().mean() - run.anchor_values["loss"].double().mean())
    assert h["loss_rise"] == pytest.approx(rise)
    assert float(llc.value) == pytest.approx(8.0 * rise, rel=1e-9)  # probe = training set
    assert h["rhat_max"] < 1.1 and h["ess_min"] > 100 and h["divergences"] == 0
    assert h["warnings"] == []


def test_health_warns_on_a_negative_llc_and_on_a_large_loss_rise():
    run, llc = gaussian_run(anchor_shift=1.5, gamma=1.0)  # w* far up the slope
    h = health(run, {"llc": llc})
    assert float(llc.value) < 0 and h["loss_rise"] < 0
    assert any("not a local minimum" in w and "raise gamma" in w for w in h["warnings"])
    run, _ = gaussian_run(gamma=0.05, n_beta=0.5, step_size=0.05)  # a loose, hot chain
    h = health(run)
    assert h["relative_rise"] > 0.5
    assert any(w.startswith("large loss rise") and "Lower step_size" in w
               for w in h["warnings"])


def test_report_writes_health_and_figures(healthy, tmp_path):
    run, llc = healthy
    run.save(tmp_path / "run")
    write_json(tmp_path / "config.json", {"data": {"n_probe": N, "n_query": 1, "seq_len": 32}})
    (tmp_path / "estimates").mkdir()
    llc.save(tmp_path / "estimates" / "llc.pt")
    suscept.bif(run.moments_of("loss")).save(tmp_path / "estimates" / "bif.pt")
    text = report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    h = summary["health"]
    assert h == json.loads(json.dumps(health(run, {"llc": llc})))
    assert f"R-hat {h['rhat_max']:.3f}, ESS {h['ess_min']:.0f}" in text
    assert f"loss rise {h['loss_rise']:+.4g} nats" in text and "no warnings" in text
    assert (tmp_path / "trace.png").stat().st_size > 0 and (tmp_path / "bif.png").exists()


def test_graph_figure_labels_every_component_inside_the_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from suscept import graph

    names = ["L0H0", "L0H1", "L1H0", "L1.mlp"]
    g = torch.Generator().manual_seed(0)
    value = torch.randn(12, 4, generator=g, dtype=torch.float64)
    value[:, 1] *= 20  # strong couplings of L0H1
    est = Estimate(value, torch.ones_like(value), ("token", "component"), "susceptibility",
                   "-Cov(phi_C, l^C_x - Lbar_S(w^C))", {"components": names})
    G = graph.build(est, level=None, top_k=2, per="col",
                    rows={"type": ["induction", "bigram"] * 6})
    fig = graph.figure(G)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text() in names]
    assert sorted(t.get_text() for t in texts) == sorted(names)
    box = fig.bbox
    for t in texts + [ax.title]:  # nothing clipped by the figure's edges
        e = t.get_window_extent()
        assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, t
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["value < 0", "value > 0", "component", "bigram", "induction"]
    assert "-Cov(phi_C" in ax.get_title()
