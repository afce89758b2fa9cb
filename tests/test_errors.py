"""Bad input gets a clear error that names the argument."""

import pytest
import torch

import suscept
from suscept.exact import Point, quadratic_losses, random_problem

M, A = random_problem(6, 2, seed=0)


def go(config=None, *, loss_fn=quadratic_losses, data=(M, A), **kw):
    config = config or suscept.SamplerConfig(step_size=1e-3, n_beta=5.0, n_draws=3, n_chains=1)
    kw.setdefault("probe", (M, A))
    return suscept.sample(Point(torch.zeros(2, dtype=torch.float64)), loss_fn, data, config,
                          progress=False, **kw)


@pytest.mark.parametrize("field, value", [
    ("step_size", 0.0), ("step_size", -1e-3), ("step_size", float("nan")),
    ("n_beta", 0.0), ("n_beta", -2.0), ("gamma", -1.0), ("weight_decay", -0.1),
    ("precondition", "adam"), ("n_chains", 0), ("n_draws", 0), ("thin", 0), ("burn_in", -1),
    ("batch_size", 0),
])
def test_bad_settings_name_the_argument(field, value):
    kw = {"step_size": 1e-3, "n_beta": 5.0, field: value}
    with pytest.raises(suscept.ConfigError, match=field):
        go(suscept.SamplerConfig(**kw))


def test_empty_data():
    with pytest.raises(suscept.ConfigError, match="empty"):
        go(data=(M[:0], A[:0]), probe=None, observables={"w": lambda m: m.w})


def test_loss_fn_returning_a_mean():
    with pytest.raises(suscept.ShapeError, match="per-sample losses"):
        go(loss_fn=lambda model, batch: quadratic_losses(model, batch).mean())


def test_mask_matching_no_parameter():
    with pytest.raises(suscept.ConfigError, match="matches no trainable parameter"):
        go(mask={"encoder.*": True})
    with pytest.raises(suscept.ShapeError, match="mask"):
        go(mask={"w": torch.ones(3)})
    with pytest.raises(suscept.ConfigError, match="selects no parameter"):
        go(mask={"w": torch.zeros(2)})


def test_probe_of_the_wrong_shape():
    with pytest.raises(suscept.ShapeError, match="probe"):
        go(probe=(M[:, :1], A))
    with pytest.raises(suscept.ShapeError, match="probe"):
        go(probe=(M, A[:3]))


def test_anchor_and_observable_errors():
    with pytest.raises(suscept.ConfigError, match="anchor"):
        go(anchor={"v": torch.zeros(2)})
    with pytest.raises(suscept.ShapeError, match="anchor"):
        go(anchor={"w": torch.zeros(3)})
    with pytest.raises(suscept.ConfigError, match="reserved"):
        go(observables={"loss": lambda m: m.w})
    with pytest.raises(suscept.ConfigError, match="unknown observable"):
        go(stream=[("loss", "w")])
    with pytest.raises(suscept.ConfigError, match="must return a tensor"):
        go(observables={"w": lambda m: 3.0})
    with pytest.raises(suscept.ConfigError, match="nn.Module"):
        suscept.sample(lambda x: x, quadratic_losses, (M, A),
                       suscept.SamplerConfig(step_size=1e-3, n_beta=1.0), probe=(M, A))


def test_estimator_input_errors():
    x = torch.randn(2, 10, 3)
    with pytest.raises(suscept.ShapeError, match="chain, draw, k"):
        suscept.bif(x[0])
    with pytest.raises(suscept.ShapeError, match="same draws"):
        suscept.bif(x, torch.randn(2, 9, 3))
    with pytest.raises(suscept.ConfigError, match="beta"):
        suscept.bif(x, scale="derivative")
    with pytest.raises(suscept.ConfigError, match="scale"):
        suscept.bif(x, scale="tiny")
    with pytest.raises(suscept.ShapeError, match="anchor_losses"):
        suscept.llc(x, torch.zeros(4), 1.0)
