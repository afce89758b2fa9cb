"""Batched chains (suscept.batched): the same chains as the sequential sampler."""

import pytest
import torch
from torch import nn

import suscept
from suscept.batched import Batched
from suscept.exact import Point, quadratic_losses, random_problem


def mlp_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g)
    y = (x[:, :1] - 0.5 * x[:, 1:2] + 0.1 * torch.randn(96, 1, generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))

    def loss_fn(module, batch):
        xb, yb = batch
        return ((module(xb) - yb) ** 2).mean(-1)

    return model, loss_fn, (x, y)


def both(model, loss_fn, data, cfg, **kw):
    seq = suscept.sample(model, loss_fn, data, cfg, progress=False, **kw)
    bat = suscept.sample(model, loss_fn, data, cfg, progress=False, batched=True, **kw)
    return seq, bat


@pytest.mark.parametrize("extra", [{}, {"precondition": "rmsprop", "weight_decay": 0.1}])
def test_batched_equals_sequential_mlp_minibatch(extra):
    model, loss_fn, data = mlp_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=50.0, gamma=100.0, n_chains=3,
                                n_draws=12, thin=3, burn_in=4, batch_size=32, seed=5, **extra)
    probe = (data[0][:10], data[1][:10])
    seq, bat = both(model, loss_fn, data, cfg, probe=probe,
                    observables={"out": lambda m: m(data[0][:4])[:, 0]},
                    stream=[("loss", "out")])
    for name in seq.draws:  # draws, traces and streamed moments, to float rounding
        torch.testing.assert_close(bat.draws[name], seq.draws[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bat.loss_trace, seq.loss_trace, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bat.distance, seq.distance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bat.moments_of("loss", "out").cov(),
                               seq.moments_of("loss", "out").cov(), rtol=1e-4, atol=1e-9)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is untouched


def test_chain_depends_only_on_seed_and_index():
    """Chain 2 alone (batch of one) and beside chains 0, 1, 3: bitwise the same draws."""
    model, loss_fn, data = mlp_problem()
    cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=50.0, gamma=100.0, n_chains=4,
                                n_draws=10, thin=2, batch_size=16, seed=3)
    probe = (data[0][:8], data[1][:8])
    full = suscept.sample(model, loss_fn, data, cfg, probe=probe, batched=True,
                          progress=False)
    alone = suscept.sample(model, loss_fn, data, cfg, probe=probe, batched=True,
                           chains=[2], progress=False)
    assert torch.equal(alone.draws["loss"][2], full.draws["loss"][2])
    assert torch.isnan(alone.draws["loss"][0]).all()
    # and the vmapped probe evaluation gives the sequential evaluation's values
    seq = suscept.sample(model, loss_fn, data, cfg, probe=probe, chains=[2], progress=False)
    torch.testing.assert_close(alone.draws["loss"][2], seq.draws["loss"][2], rtol=1e-5,
                               atol=1e-6)


def test_batched_full_batch_exact_quadratic_and_mask():
    m, a = random_problem(6, 3, seed=2)
    w0 = torch.zeros(3, dtype=torch.float64)
    cfg = suscept.SamplerConfig(step_size=2e-3, n_beta=10.0, gamma=5.0, n_chains=2,
                                n_draws=20, thin=2, seed=0)
    mask = {"w": torch.tensor([True, False, True])}
    seq, bat = both(Point(w0), quadratic_losses, (m, a), cfg, probe=(m, a),
                    observables={"w": lambda model: model.w}, mask=mask)
    assert torch.equal(bat.draws["w"], seq.draws["w"])  # float64, elementwise kernel
    assert torch.equal(bat.draws["w"][..., 1], torch.zeros(2, 20, dtype=torch.float64))


def test_batched_transformerlens_with_plan():
    import observables as ob
    from observables.lm import lm_loss

    model = ob.build(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=12, n_ctx=8)
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 12, (32, 8), generator=g)
    probe = torch.randint(0, 12, (4, 8), generator=g)
    cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=10.0, gamma=100.0, n_chains=2,
                                n_draws=4, thin=2, batch_size=8, seed=0)
    specs, streams = ob.runs.susceptibility_observables(["L0H0", "L0H1"])
    plan = ob.EvaluationPlan(model, probe, specs)
    seq, bat = both(model, lm_loss, train, cfg, observables=plan, stream=streams)
    torch.testing.assert_close(bat.draws["phi"], seq.draws["phi"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(suscept.susceptibility(bat).value,
                               suscept.susceptibility(seq).value, rtol=1e-3, atol=1e-8)


def test_batched_errors():
    model, loss_fn, data = mlp_problem()
    cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=5.0, gamma=1.0, n_chains=2, n_draws=2)
    with pytest.raises(suscept.ConfigError, match="batched must be"):
        suscept.sample(model, loss_fn, data, cfg, probe=data, batched="yes", progress=False)
    with pytest.raises(suscept.ConfigError, match="directions"):
        suscept.sample(model, loss_fn, data, cfg, probe=data, progress=False,
                       batched=Batched(directions=torch.zeros(2, 3)))


def test_schedule_thin_follows_the_costs():
    from suscept.schedule import schedule, thinned_iat

    assert thinned_iat(7.0, 1) == pytest.approx(7.0)
    # AR(1) with IAT 9 steps, thinned by 4: simulate and compare with the formula
    g = torch.Generator().manual_seed(0)
    rho = (9 - 1) / (9 + 1)
    x = torch.zeros(8, 20000, dtype=torch.float64)
    noise = torch.randn(8, 20000, generator=g, dtype=torch.float64)
    for k in range(1, 20000):
        x[:, k] = rho * x[:, k - 1] + noise[:, k]
    # one IAT per chain (5,000 thinned draws each): their mean and its standard error
    per_chain = torch.stack([suscept.diagnostics.iat(x[c:c + 1, ::4, None])[0]
                             for c in range(8)])
    se = float(per_chain.std() / 8**0.5)
    assert abs(float(per_chain.mean()) - thinned_iat(9.0, 4)) < 4.5 * se
    assert abs(float(per_chain.mean()) - thinned_iat(9.0, 2)) > 4.5 * se  # it can fail
    # evaluations free: every step is worth evaluating; evaluations dear: thin grows
    assert schedule(9.0, 1.0, 0.0, ess=100).thin == 1
    dear = schedule(9.0, 1.0, 20.0, ess=100)
    assert dear.thin > 4 and dear.cost_per_effective_draw <= dear.table[4]
    assert dear.n_draws * dear.n_chains >= 100 * dear.tau_draws - dear.n_chains


def test_batched_divergence_like_sequential():
    """A chain stopped for an exploding loss is stopped at the same step in both samplers."""
    import warnings

    model, loss_fn, data = mlp_problem()
    cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=50.0, gamma=100.0, n_chains=3,
                                n_draws=10, thin=2, seed=1, max_loss_rise=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", suscept.DivergenceWarning)
        seq, bat = both(model, loss_fn, data, cfg, probe=(data[0][:8], data[1][:8]))
    # chains 0 and 2 stop mid-run (steps 18 and 10), chain 1 runs to the end
    assert [(d.chain, d.step) for d in seq.divergences] == [(0, 18), (2, 10)]
    assert sorted(bat.divergences, key=lambda d: d.chain) == seq.divergences
    torch.testing.assert_close(bat.draws["loss"], seq.draws["loss"], rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    assert bat.valid_chains == seq.valid_chains
