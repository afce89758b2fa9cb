"""The user's model is sacred; divergent chains never poison estimates."""

import warnings

import pytest
import torch
from torch import nn

import suscept


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 1))


def mse(model, batch):
    x, y = batch
    return (model(x).squeeze(-1) - y) ** 2


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return x, x.sum(1)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [m.training for m in model.modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules()),
            [p.grad for p in model.parameters()])


def assert_same(model, snap):
    state, training, modes, hooks, grads = snapshot(model)
    assert state.keys() == snap[0].keys()
    assert all(torch.equal(state[k], snap[0][k]) for k in state)
    assert (training, modes, hooks) == snap[1:4]
    assert all(g is None for g in grads)


CFG = suscept.SamplerConfig(step_size=1e-3, n_beta=10.0, gamma=100.0, n_chains=2, n_draws=10,
                            batch_size=8)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_bitwise_unchanged_after_sample(mode):
    model = mlp().train(mode == "train")
    snap = snapshot(model)
    x, y = data()
    run = suscept.sample(model, mse, (x, y), CFG, probe=(x[:4], y[:4]), progress=False)
    assert_same(model, snap)
    # observables see eval mode: with dropout active, repeated draws at w* would differ
    assert torch.equal(run.anchor_values["loss"], mse(mlp().eval(), (x[:4], y[:4])).detach())


def test_model_unchanged_when_the_call_raises():
    model = mlp().train()
    snap = snapshot(model)
    calls = {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("boom")
        return mse(model, batch)

    x, y = data()
    with pytest.raises(RuntimeError, match="boom"):
        suscept.sample(model, flaky, (x, y), CFG, probe=(x[:4], y[:4]), progress=False)
    assert_same(model, snap)


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))


def double_well(model, batch):
    """l(w) = w^2/2 - w^4/4: a barrier of 1/4 at |w| = 1, unbounded below beyond it."""
    w = model.w[0]
    return (0.5 * w**2 - 0.25 * w**4) * torch.ones_like(batch)


def test_divergent_chains_are_stopped_reported_and_excluded():
    cfg = suscept.SamplerConfig(step_size=0.05, n_beta=18.0, gamma=0.0, n_chains=6,
                                n_draws=100, thin=5, seed=0)
    batch = torch.ones(4, dtype=torch.float64)
    with pytest.warns(suscept.DivergenceWarning):
        run = suscept.sample(Line(), double_well, batch, cfg, probe=batch,
                             observables={"w": lambda m: m.w}, stream=[("w", "w")],
                             progress=False)
    bad = sorted(d.chain for d in run.divergences)
    good = run.valid_chains
    assert bad and good, "the setting must make some but not all chains diverge"
    for d in run.divergences:
        assert torch.isnan(run.loss_trace[d.chain, d.step + 1:]).all()
        assert torch.isnan(run.draws["w"][d.chain, -1]).all()
    # streamed moments hold only the good chains; draw-based estimates drop the bad ones
    with pytest.warns(suscept.EstimatorWarning, match="excluded"):
        from_draws = suscept.loss_kernel(run.flat("w"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only_good = suscept.loss_kernel(run.flat("w")[good])
        streamed = suscept.loss_kernel(run.moments_of("w"))
    assert torch.isfinite(from_draws.value).all() and torch.isfinite(from_draws.stderr).all()
    assert torch.equal(from_draws.value, only_good.value)
    torch.testing.assert_close(streamed.value, only_good.value, rtol=1e-10, atol=0)
    assert run.diagnostics()["divergences"][0]["chain"] == run.divergences[0].chain
