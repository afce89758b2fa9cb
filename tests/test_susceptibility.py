"""Susceptibilities from one SGLD run on a real TransformerLens model (docs/theory.md section 5)."""

import pytest
import torch

pytest.importorskip("transformer_lens")

import observables as ob  # noqa: E402
import suscept  # noqa: E402
from suscept import susceptibilities as sus  # noqa: E402

G = torch.Generator().manual_seed(0)
TRAIN = torch.randint(0, 20, (64, 12), generator=G)
PROBE = TRAIN[:6]
CFG = suscept.SamplerConfig(step_size=1e-3, n_beta=20.0, gamma=300.0, n_chains=4, n_draws=40,
                            thin=2, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def model():
    return ob.build(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=20, n_ctx=12, seed=0)


@pytest.fixture(scope="module")
def run(model):
    return ob.one_run(model, TRAIN, PROBE, "all heads", CFG, cross=True, progress=False)


def test_one_run_gives_every_head(run):
    chi = suscept.susceptibility(run)
    assert chi.dims == ("token", "component")
    assert chi.shape == (6 * 11, 8)
    assert chi.meta["components"] == [f"L{l}H{h}" for l in range(2) for h in range(4)]
    assert torch.isfinite(chi.value).all() and (chi.stderr > 0).all()
    cross = suscept.susceptibility(run, cross=True)
    assert cross.shape == chi.shape and cross.meta["cross"]
    assert run.flat("phi").shape == (4, 40, 8)


def test_cross_table_is_the_group_mean_of_the_cross_susceptibility(run):
    """heads.cross_table: one group per token is the cross susceptibility itself (values and
    jackknife errors); a group's value is its tokens' mean (linear in the token loss)."""
    from suscept import heads
    from suscept.errors import ConfigError, ShapeError

    cross = suscept.susceptibility(run, cross=True)  # [token, component]
    single = heads.Groups([str(i) for i in range(66)], torch.eye(66, dtype=torch.bool))
    t = heads.cross_table(run, single)
    assert t.dims == ("component", "group") and t.meta["cross"]
    torch.testing.assert_close(t.value, cross.value.T.double(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(t.stderr, cross.stderr.T.double(), rtol=1e-8, atol=1e-14)
    seq = heads.cross_table(run, heads.sequence_groups(6, 11))
    by_hand = cross.value.double().reshape(6, 11, 8).mean(1).T
    torch.testing.assert_close(seq.value, by_hand, rtol=1e-10, atol=1e-14)
    assert (seq.stderr > 0).all()
    with pytest.raises(ShapeError, match="probe tokens"):
        heads.cross_table(run, heads.sequence_groups(3, 11))
    restricted_only = ob.one_run(ob.build(n_layers=1, d_model=16, n_heads=2, d_head=8,
                                          d_vocab=20, n_ctx=12), TRAIN[:8], PROBE[:1],
                                 "all heads", CFG.__class__(**{**CFG.__dict__, "n_draws": 4,
                                                               "n_chains": 2}),
                                 progress=False)
    with pytest.raises(ConfigError, match="token_loss"):
        heads.cross_table(restricted_only, heads.sequence_groups(1, 11))


def test_streamed_equals_draws(model):
    specs, streams = ob.susceptibility_observables(["L0H1", "L1H2", "L1"])
    plan = ob.EvaluationPlan(model, PROBE, specs)
    run = suscept.sample(model, ob.lm_loss, TRAIN, CFG, observables=plan, stream=streams,
                         progress=False)
    streamed = suscept.susceptibility(run)
    drawn = suscept.susceptibility(sus.from_draws(run.draws["phi"],
                                                  run.draws["restricted_token_loss"]))
    torch.testing.assert_close(streamed.value, drawn.value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(streamed.stderr, drawn.stderr, rtol=1e-9, atol=1e-12)
    # the definition, by hand from the draws: -Cov(phi_C, l^C_x - Lbar_S(w^C))
    phi = run.draws["phi"].double().flatten(0, 1)
    y = run.draws["restricted_token_loss"].double().flatten(0, 1)
    dphi, dy = phi - phi.mean(0), y - y.mean(0)
    by_hand = -torch.einsum("nk,nkx->xk", dphi, dy) / (phi.shape[0] - 1)
    torch.testing.assert_close(streamed.value, by_hand, rtol=1e-6, atol=1e-9)


def test_frozen_component_has_zero_susceptibility(model):
    ad = ob.Adapter.of(model)
    moving = ob.union_mask(ob.expand("all heads", ad)[:-1])  # L1H3 never moves
    run = ob.one_run(model, TRAIN, PROBE, ["L0H0", "L1H3"], CFG, mask=moving, progress=False)
    chi = suscept.susceptibility(run)
    assert chi.value[:, 0].abs().max() > 0
    assert torch.equal(chi.value[:, 1], torch.zeros_like(chi.value[:, 1]))
    assert torch.equal(run.flat("phi")[:, :, 1], torch.zeros_like(run.flat("phi")[:, :, 1]))


def test_standardize_and_pca():
    x = (torch.randn(50, 6, generator=G) * torch.arange(1, 7) + 3).double()
    z = sus.standardize(x)
    torch.testing.assert_close(z.mean(1), torch.zeros(50, dtype=torch.float64))
    zc = (x - x.mean(0)) / x.std(0)
    torch.testing.assert_close(z, zc - zc.mean(1, keepdim=True))
    p = sus.pca(z)
    torch.testing.assert_close(p["loadings"] @ p["loadings"].T, torch.eye(6, dtype=torch.float64),
                               atol=1e-10, rtol=0)
    assert abs(float(p["explained"].sum()) - 1) < 1e-10
    torch.testing.assert_close(p["scores"] @ p["loadings"], z - z.mean(0))
    with pytest.raises(suscept.ShapeError, match="constant"):
        sus.standardize(torch.ones(5, 2))


def test_reliability_report(run):
    rel = sus.reliability(run)
    assert rel["split_half"]["spearman"].shape == (8,)
    assert rel["split_half"]["pc_cos"].shape == (3,)
    assert ((rel["split_half"]["pc_cos"] >= 0) & (rel["split_half"]["pc_cos"] <= 1)).all()
    assert rel["phi_mean"].shape == (8,) and rel["phi_iat"].shape == (8,)
    assert rel["loss_rise"] > 0  # the chain climbs out of the minimum at n_beta = 20
    assert sus.split_half(run, cross=True)["spearman"].shape == (8,)


def test_restricted_posterior_parts_add_up(model):
    cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=20.0, gamma=300.0, n_chains=2,
                                n_draws=20, thin=2, batch_size=16)
    res = ob.restricted_runs(model, TRAIN, PROBE, ["L0H0", "L1H1"], cfg, progress=False)
    torch.testing.assert_close(res.total.value, res.covariance.value + res.shift.value)
    assert res.total.shape == (66, 2) and len(res.seconds) == 3
    assert torch.isfinite(res.total.stderr).all()


def test_susceptibility_matches_an_exact_gaussian_answer():
    """Exact Gaussian draws x ~ N(0, S); phi_k = a_k.x and y_k = B_k x give
    chi[x, k] = -Cov(phi_k, y_kx) = -(B_k S a_k)_x; compare within reported errors."""
    g = torch.Generator().manual_seed(3)
    p, k, n_tok = 4, 3, 5
    root = torch.randn(p, p, generator=g, dtype=torch.float64)
    cov = root @ root.T + torch.eye(p, dtype=torch.float64)
    a = torch.randn(k, p, generator=g, dtype=torch.float64)
    b = torch.randn(k, n_tok, p, generator=g, dtype=torch.float64)
    x = torch.randn(4, 2000, p, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    phi = torch.einsum("kp,cdp->cdk", a, x)
    y = torch.einsum("kxp,cdp->cdkx", b, x)
    chi = suscept.susceptibility(sus.from_draws(phi, y))
    truth = -torch.einsum("kxp,pq,kq->xk", b, cov, a)
    z = chi.z(truth)
    assert z.abs().max() < 5 and (z**2).mean() < 3, z
    assert (truth.abs() / chi.stderr).max() > 10  # the test could see a wrong sign or scale


def test_agreement_ceiling_is_spearman_brown_stepped_up():
    r_a = torch.tensor([0.5, 1.0, 0.0, -0.2])
    r_b = torch.tensor([0.5, 1.0 / 3.0, 0.9, 0.4])
    # R = 2r / (1 + r): 0.5 -> 2/3, 1 -> 1, 1/3 -> 1/2, 0 and negative -> 0
    expected = torch.tensor([2 / 3, (1 * 0.5) ** 0.5, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(suscept.agreement_ceiling(r_a, r_b), expected)



def test_pathwise_stein_term_on_transformer_lens(model):
    """On a TransformerLens model and its evaluation plan, the pathwise estimator's gradient
    term has the mean of the product it replaces (Stein's identity, docs/efficiency.md):
    per pair ``D = path - o_phi u`` averages to 0 within 4.5 standard errors everywhere, and a
    gradient term twice too large would be caught. The antithetic spring_sample of the same seed
    gives the same pairs (its odd parts give ``u = o_y - r``)."""
    from dataclasses import replace

    from suscept.pathwise import PathwiseBase
    from suscept.spring import odd_even

    comps = ob.expand("all heads", ob.Adapter.of(model))
    specs, _ = ob.susceptibility_observables([c.name for c in comps])
    plan = ob.EvaluationPlan(model, PROBE, specs[:2])
    cfg = replace(CFG, n_chains=2, n_draws=80, seed=11)
    base = PathwiseBase(model, cfg, plan, lambda m, t: ob.token_losses(m(t), t), PROBE,
                        [c.mask() for c in comps])
    terms = [t for c in range(cfg.n_chains) for t in base.pairs(c, cfg.n_draws // 2, 1)]
    anti = suscept.spring_sample(model, ob.lm_loss, TRAIN, cfg, observables=plan, stream=[],
                                 antithetic=True, progress=False)
    o_y = odd_even(anti.draws["restricted_token_loss"].double())[1].flatten(0, 1)
    u = o_y - torch.stack([t.r for t in terms])
    o_phi = torch.stack([t.o_phi for t in terms])[..., None]
    path = torch.stack([t.path for t in terms])

    def z(d):
        return d.mean(0) / (d.std(0) / len(d) ** 0.5)
    assert z(path - o_phi * u).abs().max() < 4.5
    assert z(2 * path - o_phi * u).abs().max() > 6


def test_spring_susceptibility_call(model):
    """observables.spring_susceptibility: [token, component] named like one_run's matrix, its
    token coordinates, the model left as it was."""
    from dataclasses import replace

    before = {k: v.clone() for k, v in model.state_dict().items()}
    chi = ob.spring_susceptibility(model, PROBE, "all heads", replace(CFG, n_draws=8, seed=3),
                                   method="pathwise", grad_every=2, progress=False)
    ref = suscept.susceptibility(ob.one_run(model, TRAIN, PROBE, "all heads",
                                            replace(CFG, n_draws=4), progress=False))
    assert chi.dims == ref.dims and chi.shape == ref.shape
    assert chi.meta["components"] == ref.meta["components"]
    assert chi.meta["coords"] == ref.meta["coords"]
    assert chi.meta["n_gradient_pairs"] == 4 * 2 and torch.isfinite(chi.stderr).all()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())




def test_interpolation_estimator_on_transformer_lens(model):
    """observables.spring_susceptibility (method="interpolation", the default) on a
    TransformerLens model:
    the same chi0 as the pathwise estimator (every entry within 4.5 combined standard errors,
    and mean z^2 near 1: the errors are honest), named alike; the model bitwise unchanged, in
    its mode, with no gradient written and no hook left; a bad method refused."""
    from dataclasses import replace

    was = model.training
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = replace(CFG, n_chains=2, n_draws=40, seed=9)
    chi = ob.spring_susceptibility(model, PROBE, "all heads", cfg, progress=False)
    assert chi.meta["seconds"].keys() == {"gradient", "jvp"}  # the default method
    ref = ob.spring_susceptibility(model, PROBE, "all heads", replace(cfg, n_draws=120,
                                   seed=10), method="pathwise", grad_every=2, progress=False)
    assert chi.dims == ref.dims and chi.shape == ref.shape
    assert chi.meta["components"] == ref.meta["components"]
    assert chi.meta["coords"] == ref.meta["coords"]
    z = (chi.value - ref.value) / (chi.stderr**2 + ref.stderr**2).sqrt()
    assert z.abs().max() < 4.5, z.abs().max()
    # honest errors: the mean of 264 chi2_1 values has sd sqrt(2 / 264) = 0.09 if independent;
    # the entries share draws (fewer independent ones), so 0.6-1.6 (4.6 such sd below 1)
    assert 0.6 < float((z**2).mean()) < 1.6, float((z**2).mean())
    assert float((chi.stderr / chi.value.abs()).median()) < 0.5  # it resolves the matrix
    assert model.training
    model.train(was)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()
                   if not hasattr(m, "_capture_hook_handles"))
    with pytest.raises(suscept.ConfigError, match="method="):
        ob.spring_susceptibility(model, PROBE, "all heads", cfg, method="exact")


def _tensor_attrs(model) -> dict:
    """Every plain attribute of every submodule that is a tensor or None (not parameters or
    buffers): state a forward may leave behind."""
    return {(n, k): v for n, m in model.named_modules() for k, v in vars(m).items()
            if v is None or torch.is_tensor(v)}


def test_private_copies_leave_the_model_untouched():
    """A forward and backward of a private copy leaves nothing on the original: on
    TransformerLens 4.x a deep copy keeps hooks whose closures point at the original's
    attention modules, which then held each forward's residual and its graph (and the model
    could no longer be deep-copied); suscept.model.copy_module drops them."""
    import copy

    from suscept.model import private_copy

    fresh = ob.build(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=20, n_ctx=12, seed=0)
    fresh(PROBE)  # the original's own hooks wired, as after any use
    before = _tensor_attrs(fresh)
    fm = private_copy(fresh)
    ob.token_losses(fm.module(PROBE), PROBE).mean().backward()
    after = _tensor_attrs(fresh)
    assert after.keys() == before.keys()
    assert all(after[k] is v for k, v in before.items())
    copy.deepcopy(fresh)


def test_first_order_susceptibility_on_transformer_lens(model):
    """observables.first_order_susceptibility against brute force (one backward per token):
    chi1[x, C] = -(s^2 M_C grad Lbar_S) . grad (l_x - Lbar_S) at w*; named like the one-run
    matrix; the model left as it was, with no gradient written."""
    from observables.adapter import Adapter
    from observables.components import expand
    from suscept.spring import stationary

    before = {k: v.clone() for k, v in model.state_dict().items()}
    chi1 = ob.first_order_susceptibility(model, PROBE, "all heads", CFG)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert chi1.dims == ("token", "component") and chi1.shape == (6 * 11, 8)
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    params = [q for n, q in model.named_parameters() if q.requires_grad]
    losses = ob.token_losses(model(PROBE), PROBE).flatten()
    rows = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        losses[i], params, retain_graph=True)]).double() for i in range(len(losses))])
    g_mean, a = rows.mean(0), rows - rows.mean(0)
    s2 = float(stationary(CFG, torch.zeros(1))[1] ** 2)
    for k, comp in enumerate(expand("all heads", Adapter.of(model))):
        m = comp.mask()
        mask = torch.cat([(m[n] if n in m else torch.zeros_like(q, dtype=torch.bool))
                          .expand_as(q).flatten() for n, q in zip(names, params)]).double()
        want = -a @ (s2 * mask * g_mean)
        torch.testing.assert_close(chi1.value[:, k], want, rtol=1e-4,
                                   atol=1e-4 * float(want.abs().max()))


def test_agreement_with_a_pathwise_control(model, run):
    """suscept.regime.agreement takes the pathwise chi0 as the control: its split-half
    reliability (meta) enters the ceiling; a control on the run's own seed is refused."""
    from dataclasses import replace

    chi0 = ob.spring_susceptibility(model, PROBE, "all heads", replace(CFG, n_draws=40, seed=5),
                                    method="pathwise", grad_every=4, progress=False)
    agree = suscept.regime.agreement(run, chi0)
    r_run = sus.split_half(run)["spearman"]
    ceiling = sus.agreement_ceiling(r_run, torch.tensor(chi0.meta["split_half"]))
    assert agree["ceiling"] == pytest.approx(float(ceiling.mean()))
    rho = sus.spearman(sus.standardize(suscept.susceptibility(run)), sus.standardize(chi0))
    assert agree["spearman"] == pytest.approx(float(rho.mean()))
    # the first-order term: deterministic, so the ceiling is the run's own sqrt(R)
    chi1 = ob.first_order_susceptibility(model, PROBE, "all heads", CFG)
    first = suscept.regime.agreement(run, chi1)
    assert first["ceiling"] == pytest.approx(
        float(sus.agreement_ceiling(r_run, torch.ones_like(r_run)).mean()))
    rho1 = sus.spearman(sus.standardize(suscept.susceptibility(run)), sus.standardize(chi1))
    assert first["spearman"] == pytest.approx(float(rho1.mean()))
    same = ob.spring_susceptibility(model, PROBE, "all heads", replace(CFG, n_draws=8),
                                    method="pathwise", grad_every=2, progress=False)
    with pytest.raises(suscept.ConfigError, match="another seed"):
        suscept.regime.agreement(run, same)
    with pytest.raises(suscept.ConfigError, match="cross=False"):
        suscept.regime.agreement(run, chi0, cross=True)


def test_coupled_streamed_equals_draws(model):
    """Streamed run and twins (paired Moments, spring_moments) give the draws-based coupled
    estimate exactly, value and batch-means error; a layout mismatch and a streamed run with
    a draws base are refused."""
    from dataclasses import replace

    from suscept.coupled import coupled_susceptibility
    from suscept.streams import Paired

    cfg = replace(CFG, n_draws=12, burn_in=20, n_blocks=3)
    plan, _, _, _ = ob.runs.lean_plan(model, PROBE, "all heads")
    stream = Paired(sus.PHI, sus.RESTRICTED)
    run = suscept.sample(model, ob.lm_loss, TRAIN, cfg, observables=plan, stream=[stream],
                         store_draws=[sus.PHI, sus.RESTRICTED], progress=False)
    draws = {k: run.draws[k] for k in (sus.PHI, sus.RESTRICTED)}
    twin = suscept.spring_draws(model, cfg, plan, start="stationary")
    streamed = suscept.spring_moments(model, cfg, plan, stream)
    chi0 = ob.spring_susceptibility(model, PROBE, "all heads", replace(cfg, seed=1, n_draws=4),
                                    method="pathwise", grad_every=2, progress=False)
    a = coupled_susceptibility(draws, twin, chi0, config=cfg, n_blocks=3)
    b = coupled_susceptibility(run.paired(sus.PHI, sus.RESTRICTED), streamed, chi0, config=cfg)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.value, y.value, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x.stderr, y.stderr, rtol=1e-10, atol=1e-12)
    other = suscept.spring_moments(model, replace(cfg, n_blocks=2), plan, stream)
    with pytest.raises(suscept.ConfigError, match="layout"):
        coupled_susceptibility(run.paired(sus.PHI, sus.RESTRICTED), other, chi0, config=cfg)
    with pytest.raises(suscept.ConfigError, match="chi0"):
        coupled_susceptibility(run.paired(sus.PHI, sus.RESTRICTED), streamed, draws, config=cfg)


def test_coupled_run(model):
    """observables.coupled_run: chi = (coupled difference) + pathwise chi0, every part named and
    oriented like one_run's matrix; the model left as it was; a short burn-in warned about,
    RMSprop refused."""
    from dataclasses import replace

    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = replace(CFG, n_draws=12, burn_in=20)
    chi, added, chi0 = ob.coupled_run(model, TRAIN, PROBE, "all heads", cfg, base_draws=8,
                                      base="pathwise", grad_every=2, progress=False)
    ref = suscept.susceptibility(ob.one_run(model, TRAIN, PROBE, "all heads",
                                            replace(cfg, n_draws=4), progress=False))
    for e in (chi, added, chi0):
        assert e.dims == ref.dims and e.shape == ref.shape
        assert e.meta["components"] == ref.meta["components"]
    torch.testing.assert_close(chi.value, added.value + chi0.value)
    assert chi0.meta["law"]["seed"] == cfg.seed + 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    chi_i, added_i, chi0_i = ob.coupled_run(model, TRAIN, PROBE, "all heads", cfg,
                                            base_draws=4, base="interpolation", progress=False)
    torch.testing.assert_close(added_i.value, added.value)  # the same run and twins
    torch.testing.assert_close(chi_i.value, added_i.value + chi0_i.value)
    assert chi0_i.meta["n_draws"] == cfg.n_chains * 4 and "jvp" in chi0_i.meta["seconds"]
    with pytest.raises(suscept.ConfigError, match="base="):
        ob.coupled_run(model, TRAIN, PROBE, "all heads", cfg, base_draws=4, base="iid")
    with pytest.warns(UserWarning, match="burn_in"):
        ob.coupled_run(model, TRAIN, PROBE, ["L0H0"], replace(cfg, burn_in=0, n_draws=4),
                       base_draws=4, grad_every=2, progress=False)
    with pytest.raises(suscept.ConfigError, match="plain SGLD"):
        ob.coupled_run(model, TRAIN, PROBE, "all heads", replace(cfg, precondition="rmsprop"),
                       base_draws=4, progress=False)
