"""Head-level readouts against exact answers: group means and their jackknife errors against
brute force and planted covariances, token groups, data attribution ordering, clustering and
the adjusted Rand index on constructed heads with known roles, the PCA route."""

import json
import math

import pytest
import torch

import suscept
from suscept import heads
from suscept.errors import ConfigError, ShapeError
from suscept.estimate import Estimate
from suscept.susceptibilities import from_draws

COMPONENTS = ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "embed"]
K, X, CHAINS, DRAWS, BLOCKS = 6, 12, 4, 300, 3
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])  # 3 token groups
B = torch.linspace(-1.0, 1.0, K * 3, dtype=torch.float64).reshape(K, 3)  # planted


def planted(seed=0, b=B):
    """Draws with ``Var(phi_C) = 1`` and ``y_{C,x} = b[C, g(x)] phi_C + e``, so the exact
    susceptibility is ``chi[x, C] = -b[C, g(x)]`` and every group mean is ``-b[C, g]``."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(CHAINS, DRAWS, K, generator=g, dtype=torch.float64)
    noise = torch.randn(CHAINS, DRAWS, K, X, generator=g, dtype=torch.float64)
    y = b[:, LABELS][None, None] * phi[..., None] + noise
    return phi, y, from_draws(phi, y, n_blocks=BLOCKS)


def test_group_means_and_errors_equal_brute_force():
    phi, y, moments = planted()
    groups = heads.token_groups(LABELS)
    table = heads.head_table(moments, groups, components=COMPONENTS, n_beta=30.0)
    chi = suscept.susceptibility(moments)  # [X, K]
    torch.testing.assert_close(table.susceptibility.value,
                               (chi.value.T @ groups.weights), rtol=1e-12, atol=1e-13)
    # single-token groups: the jackknife errors are the susceptibility's own
    single = heads.head_table(moments, heads.token_groups(torch.arange(X)), n_beta=None)
    torch.testing.assert_close(single.susceptibility.stderr, chi.stderr.T, rtol=1e-10,
                               atol=1e-14)
    assert single.fluctuation is None
    # groups=None: the same per-token table without the [X, X] weight matrix
    per_token = heads.head_table(moments, None, n_beta=30.0)
    ref = heads.head_table(moments, heads.token_groups(torch.arange(X)), n_beta=30.0)
    for a, b in ((per_token.susceptibility, ref.susceptibility),
                 (per_token.fluctuation, ref.fluctuation)):
        torch.testing.assert_close(a.value, b.value, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-10, atol=1e-14)
    assert per_token.n_tokens == [1] * X and per_token.groups == [str(i) for i in range(X)]
    # brute force: leave one block of draws out, recompute from the draws themselves
    blocks = [(c, b) for c in range(CHAINS) for b in torch.tensor_split(torch.arange(DRAWS),
                                                                          BLOCKS)]
    layer = {0: [0, 1, 2], 1: [3, 4]}

    def stats(keep):
        p = torch.cat([phi[c, idx] for c, idx in keep])          # [N, K]
        yy = torch.cat([y[c, idx] for c, idx in keep])           # [N, K, X]
        cov = ((p - p.mean(0))[..., None] * (yy - yy.mean(0))).sum(0) / (len(p) - 1)
        means = -cov @ groups.weights                            # [K, G]
        con = torch.full_like(means, float("nan"))
        for idx in layer.values():
            con[idx] = means[idx] - means[idx].mean(0)
        fl = 15.0 * yy.var(0) @ groups.weights
        return means, con, fl

    full = stats(blocks)
    reps = [stats(blocks[:s] + blocks[s + 1:]) for s in range(len(blocks))]
    n = len(blocks)
    for i, est in enumerate((table.susceptibility, table.contrast, table.fluctuation)):
        r = torch.stack([rep[i] for rep in reps])
        se = (((r - r.mean(0)) ** 2).sum(0) * (n - 1) / n).sqrt()
        torch.testing.assert_close(est.value, full[i], rtol=1e-10, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(est.stderr, se, rtol=1e-8, atol=1e-12, equal_nan=True)
    assert torch.isnan(table.contrast.value[5]).all()  # embed has no layer


def test_planted_means_are_recovered_within_their_errors():
    """Exact answer -B[C, g]; the z-scores of the errors behave like standard normals: each
    below 4.5 and their mean square within 4 of its standard error around 1."""
    _, _, moments = planted(1)
    table = heads.head_table(moments, heads.token_groups(LABELS), components=COMPONENTS)
    z = table.susceptibility.z(-B).flatten()
    assert z.abs().max() < 4.5, z
    # jackknife with 12 segments: z^2 has mean ~ 1, sd ~ sqrt(2 * 12 / 10)
    assert abs((z**2).mean() - 1) < 4 * math.sqrt(2.4 / len(z)), (z**2).mean()
    truth = -B.clone()
    for idx in ([0, 1, 2], [3, 4]):
        truth[idx] = -B[idx] + B[idx].mean(0)
    zc = table.contrast.z(truth)[:5].flatten()
    assert zc.abs().max() < 4.5
    assert torch.equal(table.z_zero, table.susceptibility.value / table.susceptibility.stderr)


def test_against_control_exact_difference_and_calibrated_errors():
    """Run (planted -B) minus an independent control (planted -B0): exactly the difference of
    the two tables, errors in quadrature. Calibration against the exact answer B0 - B over 16
    independent pairs: mean squared error / mean se^2 = 1 within 4 sigma, sigma = sqrt(2 / 96)
    (16 pairs x 6 components with independent phi). The run's error alone would give ~2."""
    groups = heads.token_groups(LABELS)
    b0 = B.flip(0)
    err, var = [], []
    for pair in range(16):
        run = heads.head_table(planted(100 + 2 * pair)[2], groups, components=COMPONENTS)
        ctrl = heads.head_table(planted(101 + 2 * pair, b0)[2], groups, components=COMPONENTS)
        d = heads.against_control(run.susceptibility, ctrl.susceptibility)
        err.append((d.value - (b0 - B)) ** 2)
        var.append(d.stderr**2)
    assert d.dims == ("component", "group") and d.meta["components"] == COMPONENTS
    assert torch.equal(d.value, run.susceptibility.value - ctrl.susceptibility.value)
    torch.testing.assert_close(var[-1], run.susceptibility.stderr**2
                               + ctrl.susceptibility.stderr**2, rtol=1e-12, atol=0)
    ratio = float(torch.stack(err).mean() / torch.stack(var).mean())
    assert abs(ratio - 1) < 4 * math.sqrt(2 / 96), ratio
    two_groups = heads.head_table(planted(4)[2], heads.token_groups(LABELS.clamp(max=1)),
                                  components=COMPONENTS)
    with pytest.raises(ShapeError, match="same table"):
        heads.against_control(run.susceptibility, two_groups.susceptibility)
    other = heads.head_table(planted(4)[2], groups, components=COMPONENTS[::-1])
    with pytest.raises(ShapeError, match="components"):
        heads.against_control(run.susceptibility, other.susceptibility)


def test_token_groups_from_labels_regexes_and_functions():
    words = ["the", "cat", "(", "sat", ")", "on", "the", "mat"]
    g = heads.token_groups({"bracket": r"[()]", "the": r"^the$"}, words)
    assert g.names == ["bracket", "the"]
    assert g.members[:, 0].nonzero().flatten().tolist() == [2, 4]
    assert g.members[:, 1].nonzero().flatten().tolist() == [0, 6]
    one = heads.token_groups(r"at$", words)
    assert one.names == ["at$", "other"]
    assert one.members.sum(0).tolist() == [3, 5]
    f = heads.token_groups(lambda w: None if w in "()" else len(w), words)
    assert f.names == ["2", "3"] and f.members.sum().item() == 6
    lab = heads.token_groups(["a", "b", "a", None])
    assert lab.names == ["a", "b"] and lab.weights[:, 0].tolist() == [0.5, 0, 0.5, 0]
    ordered = heads.token_groups(["a", "b", "a", "c"], names=["c", "a"])
    assert ordered.names == ["c", "a"] and ordered.members.sum(0).tolist() == [1, 2]
    seq = heads.sequence_groups(3, 4)
    assert seq.members.shape == (12, 3) and seq.members[4:8, 1].all()
    with pytest.raises(ConfigError, match="need tokens"):
        heads.token_groups({"x": "x"})
    with pytest.raises(ConfigError, match="hold no token"):
        heads.token_groups({"zzz": "zzz"}, words)


def test_contexts_and_top_data():
    tokens = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    ctx = heads.contexts(tokens, ["a", "b", "c", "d"], width=2)
    assert ctx[:3] == ["a -> [b]", "a b -> [c]", "b c -> [d]"] and len(ctx) == 6
    value = torch.tensor([[0.5, -2.0], [-3.0, 1.0], [1.0, 0.2], [-1.0, 4.0]],
                         dtype=torch.float64)
    est = Estimate(value, torch.full_like(value, 0.5), ("token", "component"), "x", "t",
                   {"components": ["L0H0", "L0H1"]})
    top = heads.top_data(est, 2, labels=["p", "q", "r", "s"])
    assert [r["index"] for r in top["L0H0"]] == [1, 3]
    assert top["L0H0"][0] == {"index": 1, "value": -3.0, "stderr": 0.5, "z": -6.0, "label": "q"}
    assert [r["index"] for r in heads.top_data(est, 2, order="positive")["L0H1"]] == [3, 1]
    # a [component, group] table is read with the groups as the data rows
    t = Estimate(value.T, torch.ones(2, 4, dtype=torch.float64), ("component", "group"), "x",
                 "t", {"components": ["A", "B"]})
    assert [r["index"] for r in heads.top_data(t, 1, order="abs")["B"]] == [3]


def role_matrix(seed=0, noise=0.3):
    """``[token, 12 heads]``: heads of role r follow prototype r plus noise; roles by layer:
    L0H0-3 (2 prev-token + 2 other), L1H0-3 (2 induction + 2 other), L2 (4 other)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(200, 3, generator=g, dtype=torch.float64)
    roles = ["prev", "prev", "other", "other", "induction", "induction", "other", "other",
             "other", "other", "other", "other"]
    idx = torch.tensor([["prev", "induction", "other"].index(r) for r in roles])
    m = protos[:, idx] + noise * torch.randn(200, 12, generator=g, dtype=torch.float64)
    return m, roles


def test_clustering_recovers_planted_roles():
    m, roles = role_matrix()
    out = heads.cluster(heads.head_vectors(m), 3)
    assert heads.adjusted_rand(out["labels"].tolist(), roles) == 1.0
    assert out["linkage"].shape == (11, 4)
    noisy = heads.cluster(heads.head_vectors(role_matrix(1, noise=30.0)[0]), 3)
    assert heads.adjusted_rand(noisy["labels"].tolist(), roles) < 0.5


def test_adjusted_rand_exact_and_against_sklearn():
    assert heads.adjusted_rand([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0
    # contingency [[2, 1], [0, 1]], worked by hand
    a, b = [0, 0, 0, 1], [0, 0, 1, 1]
    index, sa, sb = 1.0, 3.0, 2.0  # C(2,2); C(3,2) + C(1,2); C(2,2) + C(2,2)
    expected = sa * sb / 6
    assert heads.adjusted_rand(a, b) == pytest.approx((index - expected) /
                                                      ((sa + sb) / 2 - expected), abs=1e-15)
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        x = torch.randint(0, 4, (30,), generator=g).tolist()
        y = torch.randint(0, 3, (30,), generator=g).tolist()
        assert heads.adjusted_rand(x, y) == pytest.approx(metrics.adjusted_rand_score(x, y),
                                                          abs=1e-12)


def test_pca_route_names_the_separating_component():
    """Two roles of 4 heads each following opposite token profiles +u and -u, plus noise:
    after standardization PC1 carries u, so role 'a' has loadings AUROC 0 or 1 on PC1."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(300, 1, generator=g, dtype=torch.float64)
    m = torch.cat([u.repeat(1, 4), -u.repeat(1, 4)], 1) + 0.5 * torch.randn(
        300, 8, generator=g, dtype=torch.float64)
    roles = ["a"] * 4 + ["b"] * 4
    out = heads.pca_roles(m, roles, n_pcs=3)
    assert out["best"]["a"][0] == 0 and out["best"]["a"][1] in (0.0, 1.0)
    assert out["separation"]["b"][0] == 1 - out["separation"]["a"][0]
    with pytest.raises(ShapeError, match="roles"):
        heads.pca_roles(m, roles[:3])


def test_within_layer_spearman_and_layers():
    layers = heads.layers_of(["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2", "unembed"])
    assert layers == [0, 0, 0, 1, 1, 1, None]
    score = torch.tensor([1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 9.0])
    ref = torch.tensor([10.0, 20.0, 30.0, 1.0, 2.0, 3.0, 0.0])
    out = heads.within_layer_spearman(score, ref, layers)
    assert set(out) == {0, 1}
    assert out[0] == pytest.approx(1.0, abs=1e-12) and out[1] == pytest.approx(-1.0, abs=1e-12)
    mixed = heads.within_layer_spearman(torch.tensor([1.0, 3.0, 2.0, 0, 0, 0, 0]), ref, layers)
    assert mixed[0] == pytest.approx(0.5, abs=1e-12) and math.isnan(mixed[1])  # 1 - 6*2/24


def test_head_table_save_load_markdown_and_errors(tmp_path):
    _, _, moments = planted(2)
    table = heads.head_table(moments, heads.token_groups(LABELS), components=COMPONENTS,
                             n_beta=10.0)
    back = heads.HeadTable.load(table.save(tmp_path / "t"))
    torch.testing.assert_close(back.contrast.stderr, table.contrast.stderr, rtol=0, atol=0,
                               equal_nan=True)
    assert back.components == COMPONENTS and back.n_tokens == [4, 3, 5]
    md = table.markdown("contrast")
    assert md.count("\n") == K + 1 and "L1H1" in md
    with pytest.raises(ShapeError, match="cover 3 tokens"):
        heads.head_table(moments, heads.token_groups([0, 1, 1]))
    with pytest.raises(ShapeError, match="component names"):
        heads.head_table(moments, heads.token_groups(LABELS), components=["a"])


def test_head_attribution_quick(tmp_path):
    pytest.importorskip("transformer_lens")
    pytest.importorskip("matplotlib")
    from experiments import head_attribution

    figures = head_attribution.main(["--quick", "--out", str(tmp_path)])
    out = tmp_path / "head_attribution"
    for name in ("figures.json", "config.json", "report.md", "heatmap.png", "dendrogram.png",
                 "ablation.png"):
        assert (out / name).exists(), name
    r = figures["runs"][0]
    t = r["table"]
    assert t["groups"][:3] == ["other", "bigram", "induction"]
    g = t["groups"].index("induction")
    layer0 = [i for i, v in enumerate(r["layers"]) if v == 0]
    # every layer-0 head carries induction (mean-ablating one raises the induction-token loss
    # by 1.2-2.8 nats, measured with --quick) and the table says so: chi[L0 head, induction]
    # < 0 at z < -2 for each (measured with --quick: z -4.5 to -6.3)
    assert (r["ablation"]["induction"][layer0] > 0.5).all()
    assert all(t["chi"][i][g] / t["chi_se"][i][g] < -2 for i in layer0)
    loaded = heads.HeadTable.load(out / "table_attn_seed0")
    assert loaded.susceptibility.value.tolist() == t["chi"].tolist()
    for sp in r["within_layer_spearman"].values():
        assert all(-1 <= v <= 1 for v in sp.values())
    assert set(r["within_layer_spearman"]) == set(head_attribution.SIGNALS)
    # key-path patching: layer 0 only (layer 1 has no later keys); every layer-0 head feeds the
    # induction heads' keys (measured with --quick: 0.24-2.3 nats), none is below zero by more
    # than noise
    kp = torch.as_tensor(r["key_path"])
    assert kp[layer0].min() > -0.05 and kp[layer0].max() > 0.5
    assert kp[[i for i, v in enumerate(r["layers"]) if v == 1]].isnan().all()
    assert r["prev_token_spearman"]["susceptibility"].keys() == {0}
    assert r["regime"]["stability"] > 0 and r["spring_seconds"] > 0
    assert "| spring_control |" in (out / "report.md").read_text()
    # the fluctuation readouts: the run's and the control's on the run's n_beta scale, >= 0
    for k in ("fluctuation", "spring_fluctuation", "token_fisher"):
        v = torch.as_tensor(r["signals"][k])
        assert torch.isfinite(v).all() and (v >= 0).all(), k
    assert r["truth_reliability"]["mean_ablation"].keys() == {0, 1}
    assert r["truth_reliability"]["key_path"].keys() == {0}
    assert "Ground truth's own reliability" in (out / "report.md").read_text()
    # --combine of figures made before the fluctuation was a signal: backfilled from the table
    old = json.loads((out / "figures.json").read_text())
    for key in ("signals", "within_layer_spearman", "prev_token_spearman"):
        del old["runs"][0][key]["fluctuation"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = head_attribution.combine([str(tmp_path / "old.json")], str(tmp_path / "combined"))
    b = back["runs"][0]
    assert b["within_layer_spearman"]["fluctuation"] == pytest.approx(
        {int(k): v for k, v in r["within_layer_spearman"]["fluctuation"].items()})
    torch.testing.assert_close(torch.as_tensor(b["signals"]["fluctuation"]).double(),
                               torch.as_tensor(r["signals"]["fluctuation"]).double())
    # what the loss adds: the run's table minus the control's, errors in quadrature
    added = head_attribution.loss_added(json.loads((out / "figures.json").read_text())["runs"][0])
    chi, ctrl = torch.as_tensor(t["chi"])[:, g], torch.as_tensor(r["spring_table"]["chi"])[:, g]
    torch.testing.assert_close(added["value"], (ctrl - chi).double())
    assert torch.isfinite(added["z"]).all() and added["vs_ablation"].keys() == {0, 1}
    assert f"| {head_attribution.LOSS_ADDED} |" in (out / "report.md").read_text()
    # the spring-only head signal by the interpolation estimator, two replicates
    from experiments import head_chi0

    got = head_chi0.main(["--quick", "--figures", str(out / "figures.json"), "--variant",
                          "attn", "--draws", "4", "--out", str(tmp_path / "chi0.json")])[0]
    assert got["replicates"].keys() == got["vs_mean_ablation"].keys() == {0, 1}
    assert all(-1 <= v <= 1 for v in got["vs_mean_ablation"].values())
    # layer-0 heads carry induction tokens in chi0 too: -mean chi0[x in induction, L0 head] > 0
    assert all(got["signal"][i] > 0 for i in layer0), got["signal"]
    assert json.loads((tmp_path / "chi0.json").read_text())[0]["seed"] == 0


def _signal_model():
    pytest.importorskip("transformer_lens")
    import observables as ob
    from experiments.zoo.language import make_dataset

    model = ob.build(n_layers=3, d_model=32, n_heads=3, d_head=8, d_vocab=64, n_ctx=32, seed=0)
    return model, make_dataset(8, seed=5)


def test_gradient_norm_equals_brute_force_and_leaves_the_model_alone():
    import observables as ob
    from experiments import head_signals

    model, data = _signal_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = head_signals.gradient_norm(model, data, "bigram")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    mask = data.target_types == data.type_names.index("bigram")
    ob.token_losses(model(data.tokens), data.tokens)[mask].mean().backward()
    for layer in range(3):
        for h in range(3):
            sq = sum(float(getattr(model.blocks[layer].attn, p).grad[h].pow(2).sum())
                     for p in head_signals.HEAD_PARAMS)
            assert got[layer, h] == pytest.approx(math.sqrt(sq), rel=1e-5)
    model.zero_grad(set_to_none=True)



def test_token_fisher_equals_brute_force_and_leaves_the_model_alone():
    import observables as ob
    from experiments import head_signals

    model, data = _signal_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = head_signals.token_fisher(model, data, "bigram", batch=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    mask = data.target_types == data.type_names.index("bigram")
    want = torch.zeros(3, 3, dtype=torch.float64)
    for b, pos in mask.nonzero().tolist():  # one backward per token
        ob.token_losses(model(data.tokens[b:b + 1]), data.tokens[b:b + 1])[0, pos].backward()
        for layer in range(3):
            for h in range(3):
                want[layer, h] += sum(float(getattr(model.blocks[layer].attn, p).grad[h]
                                            .double().pow(2).sum())
                                      for p in head_signals.HEAD_PARAMS)
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(got.double(), want / int(mask.sum()), rtol=1e-4, atol=0)


def test_per_token_signals_average_to_the_type_signals():
    """Per token, the mean-ablation effect and the attribution-patching score average over a
    token type to the per-type functions (independent code: one forward per head over the
    type's mean loss, one backward of the mean loss); the per-token Fisher is checked by
    brute force above (token_fisher is its mean). Tokens outside the mask are not computed,
    and the model is left as it was."""
    from experiments import head_signals
    from experiments.zoo.heads import ablation_effects

    model, data = _signal_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = data.target_types == data.type_names.index("bigram")
    per = head_signals.token_ablation(model, data)
    assert per.shape == (*data.target_types.shape, 3, 3)
    torch.testing.assert_close(per[mask].mean(0),
                               ablation_effects(model, data, "bigram", mode="mean")[0],
                               rtol=1e-4, atol=1e-6)
    grads = head_signals.per_token_gradients(model, data, mask, batch=3)
    assert grads["fisher"].shape == grads["patching"].shape == (int(mask.sum()), 3, 3)
    torch.testing.assert_close(grads["patching"].mean(0),
                               head_signals.attribution_patching(model, data, "bigram"),
                               rtol=1e-4, atol=1e-6)
    # all tokens: the masked rows are the same values, in (sequence, position) order
    everything = head_signals.per_token_gradients(model, data)
    torch.testing.assert_close(everything["patching"][mask.flatten()], grads["patching"],
                               rtol=1e-5, atol=1e-7)
    # ablation towards other means (a held-out set's) moves every effect
    other = {k: v + 0.1 for k, v in head_signals.mean_z(model, data.tokens).items()}
    assert not torch.allclose(head_signals.token_ablation(model, data, other), per)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.blocks[0].attn.hook_z._forward_hooks
    with pytest.raises(ValueError, match="no predicted token"):
        head_signals.per_token_gradients(model, data, torch.zeros_like(mask))


def test_token_fisher_is_the_linear_part_of_the_spring_fluctuation():
    """For d ~ N(0, s^2 I) on one head's parameters, E[mean_x (l_x(w + d) - l_x(w))^2] / s^2
    = token_fisher + O(s^2): checked at s = 1e-4 in float64 within 4.5 of its Monte Carlo
    standard error."""
    import observables as ob
    from experiments import head_signals

    model, data = _signal_model()
    model = model.to(torch.float64)
    layer, head, s, n = 1, 2, 1e-4, 400
    want = float(head_signals.token_fisher(model, data, "bigram")[layer, head])
    mask = data.target_types == data.type_names.index("bigram")
    params = [getattr(model.blocks[layer].attn, p) for p in head_signals.HEAD_PARAMS]
    anchor = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = ob.token_losses(model(data.tokens), data.tokens)[mask]
        q = []
        for _ in range(n):
            for p, a in zip(params, anchor):
                p[head] = a[head] + s * torch.randn(a[head].shape, generator=g,
                                                    dtype=torch.float64)
            moved = ob.token_losses(model(data.tokens), data.tokens)[mask]
            q.append(float(((moved - base) ** 2).mean()) / s**2)
        for p, a in zip(params, anchor):
            p.copy_(a)
    q = torch.tensor(q, dtype=torch.float64)
    se = float(q.std() / n**0.5)
    assert abs(float(q.mean()) - want) < 4.5 * se
    assert se < 0.2 * want  # the check has power: a Fisher off by half would fail


def test_truth_reliability_exact_cases():
    """A ground truth that does not depend on its data is perfectly reliable; one that is
    fresh noise on every call is not (mean Spearman 0 over halvings); all-NaN layers are left
    out."""
    from experiments import head_signals

    model, data = _signal_model()
    fixed = torch.tensor([[3.0, 1.0, 2.0], [0.1, 0.3, 0.2], [float("nan")] * 3])
    out = head_signals.truth_reliability(lambda m, d: fixed, model, data, n_splits=5)
    assert out.keys() == {0, 1}
    assert all(v[k] == pytest.approx(1.0, abs=1e-12) for v in out.values()
               for k in ("half", "reliability", "ceiling"))
    g = torch.Generator().manual_seed(0)
    noise = head_signals.truth_reliability(lambda m, d: torch.randn(3, 3, generator=g), model,
                                           data, n_splits=200)
    # Spearman of two independent random 3-vectors takes 1, 0.5, -0.5, -1 with probabilities
    # 1/6, 2/6, 2/6, 1/6: mean 0, variance 1/2; over 200 halvings the sd is 0.05
    assert all(abs(v["half"]) < 4.5 * 0.5**0.5 / 200**0.5 for v in noise.values())


def test_key_path_patching_exact_zeros():
    """Exact answers: a head whose output is constant (W_V = 0) changes no key, so its
    key-path effect is 0; with every later layer's W_K = 0 keys are b_K whatever the residual,
    so every effect is 0, while mean ablation of the same heads still moves the loss."""
    from experiments import head_signals
    from experiments.zoo.heads import ablation_effects

    model, data = _signal_model()
    with torch.no_grad():
        model.blocks[0].attn.W_V[1] = 0.0
    kp = head_signals.key_path_patching(model, data, "bigram")
    assert kp.shape == (3, 3) and kp[2].isnan().all() and not kp[:2].isnan().any()
    assert kp[0, 1].abs() < 1e-6 and kp[0, [0, 2]].abs().max() > 1e-4
    with torch.no_grad():
        for layer in (1, 2):
            model.blocks[layer].attn.W_K.zero_()
    assert head_signals.key_path_patching(model, data, "bigram")[:2].abs().max() < 1e-6
    assert ablation_effects(model, data, "bigram", mode="mean")[0][:2].abs().max() > 1e-4
    assert not model.blocks[0].attn.hook_z._forward_hooks  # no hook left


def test_attribution_patching_is_the_first_order_mean_ablation_effect():
    """On a head scaled towards its mean (z -> mean + t (z - mean)), the mean-ablation effect
    is linear in t for small t with slope minus the attribution-patching score."""
    import observables as ob
    from experiments import head_signals

    model, data = _signal_model()
    atp = head_signals.attribution_patching(model, data, "bigram")
    means = head_signals.mean_z(model, data.tokens)
    name = "blocks.1.attn.hook_z"
    mask = data.target_types == data.type_names.index("bigram")

    def loss(t):
        def hook(z, hook):
            z = z.clone()
            z[:, :, 2] = means[name][2] + (1 - t) * (z[:, :, 2] - means[name][2])
            return z
        with torch.no_grad():
            logits = model.run_with_hooks(data.tokens, fwd_hooks=[(name, hook)])
        return float(ob.token_losses(logits, data.tokens)[mask].double().mean())

    t = 1e-2
    slope = (loss(t) - loss(-t)) / (2 * t)  # d L / d t at t = 0: moving z towards mean_z
    assert slope == pytest.approx(float(atp[1, 2]), rel=2e-2, abs=1e-5)


def test_head_tokens_scores_exact_cases():
    """The per-token scores on constructed columns: the same ranking scores 1, the reversed
    one -1 (top-k overlap 0), rows are compared within each layer only, and the noise ceiling
    is 1 without noise and 0 when the errors explain all the variance."""
    from experiments import head_tokens

    g = torch.Generator().manual_seed(0)
    truth = torch.randn(40, 4, generator=g, dtype=torch.float64)
    layers = [0, 0, 1, 1]
    induction = torch.arange(40) % 2 == 0
    same = head_tokens.scores(truth * 3 + 1, truth, layers, 8, induction)
    rev = head_tokens.scores(-truth, truth, layers, 8, induction)
    for key in ("tokens", "induction", "sequences", "top"):
        assert torch.allclose(same[key], torch.ones(4, dtype=torch.float64)), key
    assert torch.allclose(rev["tokens"], -torch.ones(4, dtype=torch.float64))
    assert (rev["top"] == 0).all()
    assert same["heads"] == pytest.approx({0: 1.0, 1: 1.0})
    assert rev["heads"] == pytest.approx({0: -1.0, 1: -1.0})
    # swapping the layers' columns changes nothing within a layer
    swapped = head_tokens.scores(truth[:, [1, 0, 3, 2]], truth, layers, 8, induction)
    assert swapped["heads"] == pytest.approx({0: -1.0, 1: -1.0})
    assert torch.allclose(head_tokens.ceiling(truth, torch.zeros_like(truth)),
                          torch.ones(4, dtype=torch.float64))
    assert (head_tokens.ceiling(truth, 2 * truth.std(0).expand_as(truth)) == 0).all()
    assert head_tokens.by_layer(torch.tensor([1.0, 3.0, 5.0, 7.0]), layers) == {0: 1.0, 1: 5.0}
    # the noise ceiling is the attenuation of a noisy column's correlation with the truth:
    # value = truth + e with Var(e) = se^2 = Var(truth) gives sqrt(R) = 1/sqrt(2); the realized
    # Pearson correlation over n rows has standard error (1 - rho^2) / sqrt(n)
    n = 20_000
    t = torch.randn(n, 3, generator=g, dtype=torch.float64)
    se = torch.full_like(t, 1.0)
    noisy = t + se * torch.randn(n, 3, generator=g, dtype=torch.float64)
    c = head_tokens.ceiling(noisy, se)
    rho = ((noisy - noisy.mean(0)) * (t - t.mean(0))).sum(0) / (
        (noisy - noisy.mean(0)).norm(dim=0) * (t - t.mean(0)).norm(dim=0))
    assert ((c - rho).abs() < 4.5 * (1 - rho**2) / n**0.5 * 2**0.5).all(), (c, rho)
    assert ((c - 2**-0.5).abs() < 0.02).all(), c
    # ties at their average rank, as scipy's
    from scipy.stats import spearmanr

    a = torch.tensor([[1.0], [1.0], [2.0], [2.0], [3.0], [0.5]])
    b = torch.tensor([[4.0], [1.0], [3.0], [2.0], [5.0], [0.0]])
    assert float(head_tokens.spearman(a, b)[0]) == pytest.approx(
        spearmanr(a[:, 0].numpy(), b[:, 0].numpy()).statistic, abs=1e-12)


def test_head_tokens_quick(tmp_path):
    """End to end on the quick model: the rows of every per-token signal line up with the
    per-token ablation (attribution patching, its first-order estimate, ranks each layer's
    tokens at 0.55 / 0.92, measured with these settings; misaligned rows would give ~0)."""
    pytest.importorskip("transformer_lens")
    pytest.importorskip("matplotlib")
    from experiments import head_tokens

    figures = head_tokens.main(["--quick", "--variant", "attn", "--draws", "8",
                                "--chi0-draws", "4", "--out", str(tmp_path)])
    for name in ("figures.json", "report.md", "tokens_attn_seed0.png"):
        assert (tmp_path / name).exists(), name
    r = figures["runs"][0]
    assert set(r["scores"]) == set(head_tokens.SIGNALS)
    assert set(r["ceiling"]) == set(head_tokens.SAMPLED)
    for name, sig in r["scores"].items():
        for key in ("tokens", "induction", "sequences"):
            v = sig[key]["per_head"]
            if name == "type_ablation" and key == "induction":  # one value per type: no rank
                assert v.isnan().all()
                continue
            assert ((v >= -1) & (v <= 1)).all(), (name, key)
        assert ((sig["top"]["per_head"] >= 0) & (sig["top"]["per_head"] <= 1)).all()
    assert min(r["scores"]["attribution_patching"]["tokens"]["layer"].values()) > 0.3
    # the per-token ablation averages to the per-type one on the induction tokens: layer-0
    # heads carry them (> 0.5 nats each with --quick, as in test_head_attribution_quick)
    layer0 = [i for i, v in enumerate(r["layers"]) if v == 0]
    assert (torch.as_tensor(r["truth"]["induction_mean"])[layer0] > 0.5).all()
    assert "| susceptibility | tokens |" in (tmp_path / "report.md").read_text()
    saved = torch.load(tmp_path / "tokens_attn_seed0.pt")
    assert saved["truth"].shape == saved["values"]["susceptibility"][0].shape
    assert saved["values"]["token_fisher"][1] is None  # deterministic: no standard error
    # the type-only baseline is each type's held-out effect: constant within a type
    base = saved["values"]["type_ablation"][0]
    ind = saved["types"] == saved["type_names"].index("induction")
    assert (base[ind] == base[ind][0]).all()
    # scored again from the saved values, without sampling: the same scores
    again = head_tokens.main(["--quick", "--rescore", "--out", str(tmp_path)])["runs"][0]
    for name in head_tokens.SIGNALS:
        for key in ("tokens", "top", "own_loss"):
            torch.testing.assert_close(torch.as_tensor(again["scores"][name][key]["per_head"]),
                                       torch.as_tensor(r["scores"][name][key]["per_head"]),
                                       equal_nan=True)
    # the token Fisher of an induction token follows the token's own loss: deterministic at
    # w* (no sampling, so no standard error), measured 0.96 in both layers with --quick
    assert min(r["scores"]["token_fisher"]["own_loss"]["layer"].values()) > 0.9
