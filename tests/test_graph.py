"""The coupling graph: filters against brute force, exports that round-trip, projections,
communities and the loss-kernel map against known structure."""

import networkx as nx
import numpy as np
import pytest
import torch
from scipy import special, stats

import suscept
from suscept import graph
from suscept.errors import ConfigError, ShapeError
from suscept.estimate import Estimate
from suscept.susceptibilities import from_draws

HEADS = [f"L{l}H{h}" for l in range(2) for h in range(3)]


def planted(n=300, k=6, seed=0) -> Estimate:
    """value ~ N(0, stderr^2) except a planted block of strong couplings (|z| = 8)."""
    g = torch.Generator().manual_seed(seed)
    se = 0.1 + torch.rand(n, k, generator=g, dtype=torch.float64)
    value = se * torch.randn(n, k, generator=g, dtype=torch.float64)
    value[: n // 10, :2] = -8 * se[: n // 10, :2]
    return Estimate(value, se, ("token", "component"), "susceptibility", "test",
                    {"components": HEADS[:k]})


def kept(e: graph.Edges) -> set:
    return set(zip(e.rows.tolist(), e.cols.tolist()))


@pytest.mark.parametrize("correction", ["bonferroni", "none", "bh"])
def test_significance_filter_matches_brute_force(correction):
    est = planted()
    z = (est.value / est.stderr).numpy()
    p = 2 * special.ndtr(-np.abs(z))
    if correction == "bonferroni":
        want = p <= 0.05 / z.size
    elif correction == "none":
        want = p <= 0.05
    else:  # scipy's Benjamini-Hochberg adjusted p-values
        want = (stats.false_discovery_control(p.ravel()) <= 0.05).reshape(z.shape)
    e = graph.select(est, level=0.05, correction=correction, block_rows=37)
    assert kept(e) == set(zip(*np.nonzero(want)))
    assert e.facts["n_significant"] == int(want.sum()) == e.facts["n_kept"]
    assert e.facts["n_tests"] == z.size
    # every planted coupling (|z| = 8) survives every correction
    assert {(i, j) for i in range(30) for j in range(2)} <= kept(e)
    np.testing.assert_array_equal(e.value, est.value.numpy()[e.rows, e.cols])
    np.testing.assert_allclose(e.p, p[e.rows, e.cols], rtol=1e-12)


def test_top_k_matches_brute_force_and_block_size_does_not_matter():
    est = planted(n=200, k=6, seed=1)
    v, z = est.value.numpy(), (est.value / est.stderr).numpy()
    sig = np.abs(z) >= special.ndtri(1 - 0.5 / 2)  # level 0.5, no correction: many edges
    strength = np.where(sig, np.abs(v), -np.inf)
    want = set()
    for i in range(v.shape[0]):
        want |= {(i, j) for j in np.argsort(-strength[i])[:2] if np.isfinite(strength[i, j])}
    for j in range(v.shape[1]):
        want |= {(i, j) for i in np.argsort(-strength[:, j])[:2] if np.isfinite(strength[i, j])}
    for block in (7, 64, 10_000):
        e = graph.select(est, level=0.5, correction="none", top_k=2, block_rows=block)
        assert kept(e) == want
    rows_only = graph.select(est, level=None, top_k=1, per="row")
    assert kept(rows_only) == {(i, int(np.argmax(np.abs(v[i])))) for i in range(v.shape[0])}


def test_symmetric_kernel_keeps_each_pair_once():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(40, 40, generator=g, dtype=torch.float64)
    value, se = a + a.T, torch.full((40, 40), 0.5, dtype=torch.float64)
    est = Estimate(value, se, ("sample", "sample"), "loss_kernel", "Cov(l_i, l_j)")
    e = graph.select(est, level=0.01, correction="bonferroni")
    iu = np.triu_indices(40, 1)
    zc = special.ndtri(1 - 0.01 / (2 * len(iu[0])))
    want = {(i, j) for i, j in zip(*iu) if abs(value[i, j] / 0.5) >= zc}
    assert kept(e) == want and all(i < j for i, j in want)
    top = graph.select(est, level=None, top_k=3)
    strength = np.where(np.eye(40, dtype=bool), -np.inf, np.abs(value.numpy()))
    nearest = {(min(i, j), max(i, j)) for i in range(40) for j in np.argsort(-strength[i])[:3]}
    assert kept(top) == nearest
    G = graph.build(est, level=None, top_k=3)
    assert all(d >= 3 for _, d in G.degree()) and "bipartite" not in G.nodes["sample:0"]


def test_build_from_a_real_susceptibility_estimate(tmp_path):
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(4, 50, 6, generator=g, dtype=torch.float64)
    y = 0.3 * torch.randn(4, 50, 6, 40, generator=g, dtype=torch.float64)
    y[..., :10] += phi[..., None] * torch.linspace(-1, 1, 6, dtype=torch.float64)[:, None]
    chi = suscept.susceptibility(from_draws(phi, y), components=HEADS)
    types = ["induction"] * 10 + ["bigram"] * 30
    G = graph.build(chi, level=0.05, rows={"type": types, "token_id": torch.arange(40)})
    assert G.graph["correction"] == "bonferroni" and G.graph["level"] == 0.05
    assert G.graph["n_tests"] == 240 and G.graph["convention"] == chi.convention
    c = G.nodes["component:L1H2"]
    assert (c["kind"], c["layer"], c["head"], c["bipartite"]) == ("head", 1, 2, 1)
    for u, v, d in G.edges(data=True):
        tok = G.nodes[u] if u.startswith("token") else G.nodes[v]
        comp = G.nodes[v] if u.startswith("token") else G.nodes[u]
        assert d["value"] == chi.value[tok["index"], comp["index"]].item()
        assert d["weight"] == abs(d["value"]) and d["p"] <= 0.05 / 240
    # y = c_C phi_C + noise on the first 10 tokens: chi = -Cov(phi, y) = -c_C Var(phi) = -c_C
    summary = graph.type_summary(G)
    ind = summary[summary["type"] == "induction"].set_index("node")
    tol = 5 * chi.stderr[:10].max().item()
    assert ind.loc["component:L0H0", "n_edges"] == 10 == ind.loc["component:L1H2", "n_edges"]
    assert ind.loc["component:L0H0", "n_negative"] == 0  # c = -1
    assert ind.loc["component:L1H2", "n_negative"] == 10  # c = +1
    assert abs(ind.loc["component:L0H0", "mean_value"] - 1) < tol
    assert abs(ind.loc["component:L1H2", "mean_value"] + 1) < tol
    assert set(summary["type"]) == {"induction"}  # the bigram tokens couple to nothing
    edges = graph.edge_table(G)
    assert len(edges) == G.number_of_edges() == summary["n_edges"].sum()


@pytest.mark.parametrize("suffix", [".graphml", ".gexf", ".json"])
def test_export_round_trips(tmp_path, suffix):
    G = graph.build(planted(), level=0.05, top_k=2,
                    rows={"type": ["a", "b", "c"] * 100, "loss": torch.linspace(0, 1, 300)})
    H = graph.load(graph.save(G, tmp_path / f"g{suffix}"))
    assert dict(H.nodes(data=True)) == dict(G.nodes(data=True))
    assert {frozenset((u, v)): d for u, v, d in H.edges(data=True)} == \
        {frozenset((u, v)): d for u, v, d in G.edges(data=True)}
    if suffix != ".gexf":  # GEXF has no place for graph attributes
        assert H.graph == G.graph


def test_projection_is_the_cosine_of_kept_couplings():
    est = planted(n=120, k=6, seed=4)
    G = graph.build(est, level=0.2, correction="none")
    P = graph.project(G)
    names = [f"component:{h}" for h in HEADS]
    a = np.zeros((120, 6))
    for u, v, d in G.edges(data=True):
        a[G.nodes[u]["index"], G.nodes[v]["index"]] = d["value"]
    cos = (a.T @ a) / np.outer(np.linalg.norm(a, axis=0), np.linalg.norm(a, axis=0))
    shared = (a != 0).astype(int).T @ (a != 0).astype(int)
    for i in range(6):
        for j in range(i + 1, 6):
            if cos[i, j] > 0:
                d = P.edges[names[i], names[j]]
                assert d["weight"] == pytest.approx(cos[i, j], rel=1e-12)
                assert d["shared"] == shared[i, j]
            else:
                assert not P.has_edge(names[i], names[j])
    assert set(graph.project(G, side=0)) == {u for u in G if u.startswith("token")}


@pytest.mark.parametrize("method", ["louvain", "greedy", "label_propagation"])
def test_communities_recover_planted_component_groups(method):
    g = torch.Generator().manual_seed(5)
    n = 200
    groups = torch.arange(n) % 2  # tokens of group 0 couple to heads 0-2, group 1 to heads 3-5
    value = 0.1 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    value[groups == 0, :3] -= 1.0 + torch.rand(100, 3, generator=g, dtype=torch.float64)
    value[groups == 1, 3:] -= 1.0 + torch.rand(100, 3, generator=g, dtype=torch.float64)
    est = Estimate(value, torch.full_like(value, 0.1), ("token", "component"), "s", "t",
                   {"components": HEADS})
    P = graph.project(graph.build(est, level=0.01))
    found = graph.communities(P, method)
    want = [frozenset(f"component:{h}" for h in HEADS[:3]),
            frozenset(f"component:{h}" for h in HEADS[3:])]
    assert sorted(found, key=sorted) == want
    G = graph.build(est, level=0.01, rows={"group": groups})
    token_groups = [{G.nodes[u]["group"] for u in c if u.startswith("token")}
                    for c in graph.communities(G, method)]
    assert sorted(map(sorted, token_groups)) == [[0], [1]]


def test_adjusted_rand_index_equals_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(6)
    for _ in range(20):
        a, b = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
        b[:25] = a[:25]
        assert graph.adjusted_rand_index(a, b) == pytest.approx(
            metrics.adjusted_rand_score(a, b), abs=1e-12)
    assert graph.adjusted_rand_index([0, 0, 1, 1], [5, 5, 2, 2]) == 1.0


def test_kernel_map_recovers_known_groups_from_a_real_loss_kernel():
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(30) % 3  # each group's losses share one latent direction
    latent = torch.randn(4, 200, 3, generator=g, dtype=torch.float64)
    losses = latent[..., labels] + 0.5 * torch.randn(4, 200, 30, generator=g, dtype=torch.float64)
    kernel = suscept.loss_kernel(losses, correlation=True)
    out = graph.kernel_map(kernel, labels)
    assert out["ari"] == 1.0 and out["coords"].shape == (30, 2)
    # exact identity: all kernel-PCA coordinates reproduce the doubly centered kernel
    full = graph.kernel_map(kernel, labels, n_components=30)
    h = np.eye(30) - 1 / 30
    kc = h @ ((kernel.value + kernel.value.T) / 2).numpy() @ h
    lam = np.linalg.eigvalsh(kc)
    assert lam.min() > -1e-12  # a correlation matrix is positive semi-definite
    np.testing.assert_allclose(full["coords"] @ full["coords"].T, kc, atol=1e-12)
    assert full["explained"].sum() == pytest.approx(1.0, abs=1e-12)


def test_png_for_small_graphs_and_refusal_for_large(tmp_path):
    G = graph.build(planted(n=60), level=0.05, rows={"type": ["a", "b"] * 30})
    path = graph.draw(G, tmp_path / "g.png")
    assert path.stat().st_size > 1000
    with pytest.raises(ConfigError, match="max_nodes"):
        graph.draw(G, tmp_path / "big.png", max_nodes=5)


def test_bad_input_gets_clear_errors():
    est = planted(n=20)
    nan = Estimate(est.value.clone(), est.stderr, est.dims, "s", "t")
    nan.value[3, 1] = float("nan")
    with pytest.raises(ShapeError, match="NaN"):
        graph.build(nan)
    no_se = Estimate(est.value, torch.full_like(est.value, float("nan")), est.dims, "s", "t")
    with pytest.raises(ShapeError, match="level=None"):
        graph.build(no_se)
    assert graph.build(no_se, level=None, top_k=1).number_of_edges() >= 20
    with pytest.raises(ConfigError, match="correction"):
        graph.select(est, correction="holm")
    with pytest.raises(ConfigError, match="top_k"):
        graph.select(est, level=None)
    with pytest.raises(ShapeError, match="row attribute"):
        graph.build(est, rows={"type": [0, 1]})
    with pytest.raises(ShapeError, match="2-D"):
        graph.select(Estimate(torch.zeros(3), torch.ones(3), ("sample",), "x", "y"))
    with pytest.raises(ConfigError, match="format"):
        graph.save(nx.Graph(), "g.txt")


def test_scale_benchmark_quick(tmp_path):
    from experiments.benchmarks import graph_scale

    out = graph_scale.main(["--quick", "--rows", "3000", "--out", str(tmp_path)])
    assert (tmp_path / "benchmarks" / "graph_scale_quick.json").exists()
    rows = {r["filter"]: r for r in out["table"]}
    assert rows["no test, top 3 per row"]["kept_edges"] == 3 * 3000
    # the 0.5% planted couplings (|z| = 8) pass Bonferroni; pure noise almost never does
    planted = 0.005 * 3000 * 20
    assert planted * 0.7 < rows["bonferroni 0.05"]["kept_edges"] < planted * 1.3
