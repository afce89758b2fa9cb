"""The regime report (suscept.regime): SLQ count against exact spectra, verdicts, the regime
target of calibrate, and the spring-only control of a real TransformerLens run."""

import pytest
import torch

import suscept
from suscept.exact import Point, quadratic_losses, random_problem
from suscept.regime import assess, hessian_spectrum, regime_target

D = 40


@pytest.fixture(scope="module")
def quad():
    m, a = random_problem(3, D, seed=6)
    return m, a, torch.linalg.eigvalsh(a.mean(0))


def exact_count(lam, t, gamma):
    x = t * lam.clamp(min=0)
    return float((x / (x + gamma)).sum())


@pytest.mark.parametrize("n_lanczos", [D, 12])
def test_slq_count_matches_the_exact_spectrum(quad, n_lanczos):
    m, a, lam = quad
    spec = hessian_spectrum(Point(torch.zeros(D, dtype=torch.float64)), quadratic_losses, (m, a),
                            n_probes=30, n_lanczos=n_lanczos)
    assert spec.d == D and abs(spec.lambda_max - lam.max()) < 1e-6 * lam.max()
    for t, gamma in [(1.0, 5.0), (30.0, 3.0), (0.01, 10.0)]:
        c, se = spec.constrained(t, gamma)
        truth = exact_count(lam, t, gamma)
        assert abs(c - truth) < 4.5 * se, (t, gamma, c, se, truth)
        assert se < 0.1 * truth  # the test has power


def test_masked_spectrum_is_the_block(quad):
    m, a, _ = quad
    keep = torch.zeros(D, dtype=torch.bool)
    keep[:10] = True
    spec = hessian_spectrum(Point(torch.zeros(D, dtype=torch.float64)), quadratic_losses, (m, a),
                            n_probes=30, n_lanczos=10, mask={"w": keep})
    lam_cc = torch.linalg.eigvalsh(a.mean(0)[:10, :10])
    c, se = spec.constrained(2.0, 4.0)
    assert spec.d == 10 and abs(c - exact_count(lam_cc, 2.0, 4.0)) < 4.5 * se


def test_verdict_advice_and_regime_target(quad):
    m, a, lam = quad
    spec = hessian_spectrum(Point(torch.zeros(D, dtype=torch.float64)), quadratic_losses, (m, a),
                            n_probes=10, n_lanczos=D)
    geo = suscept.SamplerConfig(step_size=1e-3, n_beta=1e-3, gamma=300.0)
    r = assess(geo, D, spectrum=spec)
    assert r.verdict == "geometric" and r.fraction < 0.01 and "n_beta" in r.advice
    assert abs(r.stability - 1e-3 * (1e-3 * lam.max() + 300)) < 1e-9
    shaped = assess(suscept.SamplerConfig(step_size=1e-3, n_beta=100.0, gamma=1.0), D,
                    spectrum=spec)
    assert shaped.verdict == "loss-shaped" and shaped.fraction > 0.5 and not shaped.advice
    assert "constrained directions" in str(shaped)
    # the spring-only control agreeing within its ceiling makes a run geometric by itself
    agree = assess(shaped.as_dict() | {"weight_decay": 0.0}, D,
                   agreement={"spearman": 0.8, "ceiling": 0.82})
    assert agree.verdict == "geometric"
    goal = regime_target(spec, 0.25, gamma=300.0)
    assert abs(spec.constrained(goal["n_beta"], 300.0)[0] - 0.25 * D) < 1e-6 * D
    assert abs(goal["step_size"] * (goal["n_beta"] * spec.lambda_max + 300.0) - 0.4) < 1e-9
    assert regime_target(spec, 0.999999, gamma=300.0) is None or lam.min() > 0


def test_calibrate_with_a_constrained_fraction():
    """Each cell's n_beta constrains the asked fraction by the SLQ estimate (bisection, exact)
    and by the exact spectrum within 4.5 of the SLQ's standard error over its probes."""
    m, a = random_problem(6, 3, seed=4)
    wstar = torch.linalg.solve(a.mean(0), torch.einsum("ijk,ik->j", a, m) / 6)
    base = suscept.SamplerConfig(step_size=1.0, n_beta=1.0, n_chains=2, n_draws=20, thin=2,
                                 burn_in=20)
    spec = hessian_spectrum(Point(wstar), quadratic_losses, (m, a), n_probes=30)
    cal = suscept.calibrate(Point(wstar), quadratic_losses, (m, a), (m, a), base,
                            step_sizes=[1e-3], gammas=[5.0, 50.0], constrained_fraction=0.5,
                            spectrum=spec)
    lam = torch.linalg.eigvalsh(a.mean(0))
    for c in cal.cells:
        assert c["fraction"] == pytest.approx(0.5, abs=1e-9)
        count, se = spec.constrained(c["n_beta"], c["gamma"])
        truth = exact_count(lam, c["n_beta"], c["gamma"])
        assert abs(count - truth) < 4.5 * se, (count, se, truth)
        assert se < 0.05 * truth  # power: a count 20% off fails
        assert c["spring_iat"] > 1
    assert cal.cells[1]["n_beta"] > 5 * cal.cells[0]["n_beta"]  # 10x gamma needs ~10x n_beta
    assert "fraction" in cal.table()


def test_spring_control_of_a_transformer_run():
    pytest.importorskip("transformer_lens")
    import observables as ob

    model = ob.build(n_layers=2, d_model=32, n_heads=2, d_head=8, d_vocab=20, n_ctx=12, seed=0)
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 20, (64, 12), generator=g)
    cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=1.0, gamma=300.0, n_chains=4,
                                n_draws=24, thin=1, batch_size=16, seed=0)
    run = ob.one_run(model, train, train[:4], "all heads", cfg, progress=False)
    ctrl = ob.one_run(model, train, train[:4], "all heads", cfg, draws="spring",
                      progress=False)
    assert ctrl.config["draw_source"] == "spring" and ctrl.flat("phi").shape == (4, 24, 4)
    res = suscept.regime.agreement(run, ctrl)
    assert 0 <= res["ceiling"] <= 1 and len(res["pc_cos"]) == 3
    cols = res["per_column"]  # one entry per component (4 heads); their means are the summary
    assert len(cols["spearman"]) == len(cols["ceiling"]) == 4
    assert res["spearman"] == pytest.approx(sum(cols["spearman"]) / 4, rel=1e-9)
    assert res["ceiling"] == pytest.approx(sum(cols["ceiling"]) / 4, rel=1e-9)
    # at n_beta 1, gamma 300 the loss barely shapes the posterior: the control agrees
    assert res["spearman"] > 0.5 * res["ceiling"], res
    with pytest.raises(suscept.ConfigError, match="seed"):
        suscept.regime.agreement(run, run)


def test_llc_only_on_the_sampled_loss():
    """llc(run) uses the sampled loss or refuses; llc_from_trace is the sampled-loss LLC of any
    run; both match the closed form of docs/theory.md section 7 within their errors."""
    from suscept.spring import spring_sample

    m, a = random_problem(4, 3, seed=1)
    wstar = torch.linalg.solve(a.mean(0), torch.einsum("ijk,ik->j", a, m) / 4)
    cfg = suscept.SamplerConfig(step_size=0.01, n_beta=20.0, gamma=5.0, n_chains=4,
                                n_draws=250, thin=2, burn_in=100)
    lam = torch.linalg.eigvalsh(a.mean(0))
    p = 20.0 * lam + 5.0
    truth = float(0.5 * (20.0 * lam / (p * (1 - 0.01 * p / 4))).sum())
    run = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg, probe=(m.clone(), a),
                         progress=False)
    assert run.config["sampled_loss"] == "loss"
    assert abs(suscept.llc(run).z(truth)) < 4.5
    anchor = float(quadratic_losses(Point(wstar), (m, a)).mean().detach())
    from_trace = suscept.llc_from_trace(run, anchor)
    assert abs(from_trace.z(truth)) < 4.5 and from_trace.meta["source"] == "loss_trace"
    held_out = suscept.sample(Point(wstar), quadratic_losses, (m, a), cfg, probe=(m[:2], a[:2]),
                              progress=False)
    assert held_out.config["sampled_loss"] is None
    with pytest.raises(suscept.ConfigError, match="not the loss this run sampled"):
        suscept.llc(held_out)
    ctrl = spring_sample(Point(wstar), quadratic_losses, (m, a), cfg, probe=(m, a),
                         progress=False)
    with pytest.raises(suscept.ConfigError, match="spring"):
        suscept.llc(ctrl)


def test_bif_agreement_of_two_draws_of_one_law_reaches_its_ceiling():
    """Over 12 pairs of independent spring-only runs of one law, the mean ratio agreement /
    ceiling is 1 within 4 standard errors of that mean (measured over 100 pairs: 1.012 ±
    0.009); the ceiling is below 1 by more than 4 of its standard errors (the noise matters),
    and the same criterion rejects a control of another law (ratio near 0)."""
    from suscept.spring import spring_sample

    wstar = torch.zeros(5, dtype=torch.float64)

    def control(seed, problem):
        cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=1.0, gamma=2.0, n_chains=4,
                                    n_draws=10, seed=seed)
        return spring_sample(Point(wstar), quadratic_losses, problem, cfg, probe=problem,
                             observables={"w": lambda model: model.w}, stream=[],
                             progress=False)

    same, other = random_problem(30, 5, seed=2), random_problem(30, 5, seed=3)
    reps = [(suscept.regime.bif_agreement(control(2 * k + 1, same), control(2 * k + 2, same),
                                          "loss", "w"),
             suscept.regime.bif_agreement(control(2 * k + 1, same), control(2 * k + 2, other),
                                          "loss", "w")) for k in range(12)]

    def mean_se(values):
        x = torch.tensor(values, dtype=torch.float64)
        return float(x.mean()), float(x.std() / len(x) ** 0.5)

    ratio, se = mean_se([r["ratio"] for r, _ in reps])
    assert abs(ratio - 1) < 4 * se and 4 * se < 0.15, (ratio, se)  # power: 0.85 fails
    ceiling, ceiling_se = mean_se([r["ceiling"] for r, _ in reps])
    assert ceiling < 1 - 4 * ceiling_se, (ceiling, ceiling_se)
    wrong, wrong_se = mean_se([o["ratio"] for _, o in reps])
    assert abs(wrong - 1) > 4 * wrong_se, (wrong, wrong_se)
