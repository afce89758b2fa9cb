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


# ---- types and numerics of the settings -------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("n_chains", True), ("step_size", "1e-3"), ("seed", "x"), ("n_blocks", 2.5),
    ("n_blocks", 0), ("rmsprop_delta", float("inf")), ("max_loss_rise", float("nan")),
    ("max_loss_rise", 0.0), ("max_loss_rise", -1.0), ("step_size", 1e300),
    ("n_beta", float("nan")), ("gamma", "300"),
])
def test_wrong_types_and_nonsense_numbers_are_refused(field, value):
    kw = {"step_size": 1e-3, "n_beta": 5.0, field: value}
    with pytest.raises(suscept.ConfigError, match=field):
        go(suscept.SamplerConfig(**kw))


def test_estimators_refuse_nan_settings_and_zero_blocks():
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    with pytest.raises(suscept.ConfigError, match="n_beta"):
        suscept.llc(x, torch.zeros(3), float("nan"))
    with pytest.raises(suscept.ConfigError, match="NaN"):
        suscept.llc(x, torch.tensor([0.0, float("nan"), 0.0]), 1.0)
    with pytest.raises(suscept.ConfigError, match="n_blocks=0"):
        suscept.bif(x, n_blocks=0)


def test_correlations_of_constant_columns_warn():
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    y = torch.ones(2, 10, 2, dtype=torch.float64)
    with pytest.warns(suscept.EstimatorWarning, match="zero variance"):
        est = suscept.bif(x, y, scale="normalized")
    assert torch.isnan(est.value).all()  # undefined, and said so
    with pytest.warns(suscept.EstimatorWarning, match="zero variance"):
        suscept.loss_kernel(torch.cat([x, y], -1), correlation=True)


# ---- losses, observables and masks of the library --------------------------------------
@pytest.mark.parametrize("make, words", [
    (lambda losses: losses.detach(), "do not depend on the parameters"),
    (lambda losses: losses.detach().round().long(), "floating-point"),
    (lambda losses: losses.to(torch.complex128), "floating-point"),
])
def test_losses_must_be_real_and_differentiable(make, words):
    with pytest.raises(suscept.ConfigError, match=words):
        go(loss_fn=lambda model, batch: make(quadratic_losses(model, batch)))


def test_an_observable_changing_shape_mid_run():
    calls = []

    def grows(model):
        calls.append(1)
        return model.w.repeat(len(calls))  # [2] at w*, then [4], [6] ...

    with pytest.raises(suscept.ShapeError, match="changed shape"):
        go(observables={"grows": grows})
    with pytest.raises(suscept.ConfigError, match="complex"):
        go(observables={"c": lambda m: m.w.to(torch.complex64)})


def test_a_string_mask_value():
    with pytest.raises(suscept.ConfigError, match=r"mask\['w'\]"):
        go(mask={"w": "yes"})


def test_low_precision_models_record_float32_or_wider():
    model = Point(torch.zeros(2)).to(torch.bfloat16)
    m, a = M.to(torch.bfloat16), A.to(torch.bfloat16)
    run = suscept.sample(model, quadratic_losses, (m, a),
                         suscept.SamplerConfig(step_size=1e-3, n_beta=5.0, n_draws=3, n_chains=1),
                         probe=(m, a), observables={"w": lambda mod: mod.w}, progress=False)
    assert {v.dtype for v in run.draws.values()} == {torch.float32}
    assert run.anchor_values["w"].dtype == torch.float32 and model.w.dtype == torch.bfloat16


# ---- saved artifacts are validated on load ----------------------------------------------
def test_estimate_of_mismatched_stderr_and_tampered_files(tmp_path):
    with pytest.raises(suscept.ShapeError, match="stderr"):
        suscept.Estimate(torch.zeros(3), torch.zeros(2), ("sample",), "x", "c")
    est = suscept.Estimate(torch.zeros(3), torch.ones(3), ("sample",), "x", "c")
    est.save(tmp_path / "e.pt")
    d = torch.load(tmp_path / "e.pt")
    torch.save({**d, "stderr": torch.ones(5)}, tmp_path / "e.pt")
    with pytest.raises(suscept.ConfigError, match="not a valid saved estimate"):
        suscept.Estimate.load(tmp_path / "e.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(suscept.ConfigError, match="not a readable saved estimate"):
        suscept.Estimate.load(tmp_path / "junk.pt")

    run = go(observables={"w": lambda m: m.w})
    run.save(tmp_path / "run")
    assert suscept.Run.load(tmp_path / "run").draws["w"].shape == (1, 3, 2)
    t = torch.load(tmp_path / "run" / "run.pt")
    t["draws"]["w"] = t["draws"]["w"][:, :2]  # one draw cut off
    torch.save(t, tmp_path / "run" / "run.pt")
    with pytest.raises(suscept.ConfigError, match="draws of 'w'"):
        suscept.Run.load(tmp_path / "run")

    from suscept import anomaly

    det = anomaly.fit(torch.randn(100, 3, generator=torch.Generator().manual_seed(0)))
    det.save(tmp_path / "det.pt")
    d = torch.load(tmp_path / "det.pt")
    torch.save({**d, "precision": torch.eye(2)}, tmp_path / "det.pt")
    with pytest.raises(suscept.ConfigError, match="damaged or edited detector"):
        anomaly.Detector.load(tmp_path / "det.pt")


def test_sweeps_tell_two_lambdas_apart(tmp_path):
    from suscept import sweep

    cells = sweep.grid(x=[1, 2])
    sweep.run(lambda x: {"y": x + 1}, cells, tmp_path / "s", progress=False)
    with pytest.raises(suscept.ConfigError, match="fn_hash"):
        sweep.run(lambda x: {"y": x + 2}, cells, tmp_path / "s", progress=False)
    offset = 1
    f = lambda x: {"y": x + offset}  # noqa: E731
    first = sweep.fn_hash(f)
    assert first == sweep.fn_hash(lambda x: {"y": x + offset})  # same code, same values
    offset = 2  # same code, another closure value: another function
    assert sweep.fn_hash(f) != first


# ---- memory -----------------------------------------------------------------------------
@pytest.mark.parametrize("third", [False, True])
def test_predicted_stream_bytes_are_exact(third):
    from suscept.moments import Moments
    from suscept.streams import Cross, Paired, segment_bytes

    x, y = torch.randn(5, 7), torch.randn(5, 3, 11)
    m = Moments.from_draws(x, y.flatten(1), third=third)
    size = sum(t.numel() * t.element_size() for t in vars(m).values() if t is not None)
    assert segment_bytes(Cross("x", "y", third=third), {"x": (7,), "y": (3, 11)}) == size
    parts = Paired("p", "y").block({"p": torch.randn(5, 3), "y": y})
    size = sum(t.numel() * t.element_size() for m in parts for t in vars(m).values()
               if t is not None)
    assert segment_bytes(Paired("p", "y"), {"p": (3,), "y": (3, 11)}) == size


# ---- TransformerLens inputs -------------------------------------------------------------
def test_one_run_inputs():
    pytest.importorskip("transformer_lens")
    import observables

    state = torch.get_rng_state()
    model = observables.build(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=16,
                              n_ctx=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator untouched
    again = observables.build(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=16,
                              n_ctx=8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    tokens = torch.randint(0, 16, (6, 8), generator=torch.Generator().manual_seed(0))
    config = suscept.SamplerConfig(step_size=1e-3, n_beta=5.0, n_draws=2, n_chains=1)
    with pytest.raises(suscept.ShapeError, match="batch >= 1"):
        observables.one_run(model, tokens, tokens[:0], "all heads", config, progress=False)
    with pytest.raises(suscept.ConfigError, match="TransformerLens model"):
        observables.one_run(torch.nn.Linear(2, 2), tokens, tokens, "all heads", config,
                            progress=False)
    with pytest.raises(suscept.ConfigError, match="components must be"):
        observables.one_run(model, tokens, tokens, None, config, progress=False)


def test_a_value_beyond_the_recorded_dtype_is_a_divergence():
    calls = []

    def big(model):  # float32 at w*, then a float64 value float32 cannot hold
        calls.append(1)
        return torch.zeros(1) if len(calls) == 1 else torch.full((1,), 1e39, dtype=torch.float64)

    with pytest.warns(suscept.DivergenceWarning, match="non-finite observables"):
        run = go(observables={"big": big})
    assert run.draws["big"].dtype == torch.float32 and len(run.divergences) == 1
    assert not torch.isinf(run.draws["big"]).any()  # never recorded as a silent inf
