"""The run command: TOML configuration round trip, bad configurations named, reruns with
different settings refused, ``report`` re-rendering from saved results without sampling."""

import dataclasses
import json

import pytest
import torch
from test_store import MODEL_TOML

from suscept import cli
from suscept import config as config_mod
from suscept.errors import ConfigError
from suscept.estimate import Estimate

TOML = MODEL_TOML.replace("n_layers = 2", "n_layers = 1") + """
[data]
n_sequences = 20
seq_len = 24
n_probe = 5
n_query = 2

[observables]
components = ["all heads"]

[sampler]
step_size = 1e-3
n_beta = 20.0
gamma = 300.0
n_chains = 2
n_draws = 10
n_blocks = 2
batch_size = 6

[estimators]
wanted = ["llc", "bif", "susceptibility"]
"""


def write(tmp_path, text=TOML, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_round_trip(tmp_path):
    cfg = config_mod.load(write(tmp_path))
    assert cfg["sampler"]["gamma"] == 300.0 and cfg["sampler"]["thin"] == 1  # given, default
    assert cfg["model"]["kind"] == "config" and cfg["observables"]["token_loss"] is True
    config_mod.claim_folder(tmp_path / "out", cfg, {"torch": torch.__version__})
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved == cfg and config_mod.resolve(saved) == cfg  # resolved config is a fixed point
    sampler = config_mod.sampler_config(cfg)
    assert (sampler.n_chains, sampler.n_draws, sampler.step_size) == (2, 10, 1e-3)


@pytest.mark.parametrize("edit, message", [
    ("[model]\nkind = 'config'\nwidth = 3\n", r"unknown keys \['width'\] in \[model\]"),
    ("[modle]\n", r"unknown tables \['modle'\]"),
    ("[sampler]\nn_beta = 1.0\n", r"\[sampler\] needs \['step_size'\]"),
    ("[sampler]\nstep_size = 1e-3\nn_beta = 1.0\nn_chains = 0\n", "n_chains = 0"),
    ("[sampler]\nstep_size = 1e-3\nn_beta = 1.0\n[data]\nkind = 'web'\n", "kind='web'"),
    ("[sampler]\nstep_size = 1e-3\nn_beta = 1.0\n[estimators]\nwanted = ['lcc']\n", "lcc"),
    ("[sampler]\nstep_size = 1e-3\nn_beta = 1.0\n[data]\nkind = 'tokens'\n", "needs path"),
    ("[sampler\n", "not valid TOML"),
])
def test_bad_configurations_are_named(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.load(write(tmp_path, edit))


def test_run_refuses_other_settings_and_report_rerenders(tmp_path, capsys):
    pytest.importorskip("transformer_lens")
    out = tmp_path / "out"
    cli.run(str(write(tmp_path)), folder=out, progress=False)
    table = (out / "summary.txt").read_text()
    assert "susceptibility" in table and "llc" in table and table in capsys.readouterr().out
    assert json.loads((out / "versions.json").read_text())["torch"] == torch.__version__
    bif = Estimate.load(out / "estimates" / "bif.pt")
    assert bif.shape == (5, 2 * 23) and bif.convention == "-Cov(l_j, O_q)"  # per query token
    llc = Estimate.load(out / "estimates" / "llc.pt")

    # the same folder with other sampler settings: refused, naming the key
    other = write(tmp_path, TOML.replace("gamma = 300.0", "gamma = 100.0"), "other.toml")
    with pytest.raises(ConfigError, match=r"sampler\.gamma"):
        cli.run(str(other), folder=out, resume=True, progress=False)
    assert cli.main(["run", str(other), "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "sampler.gamma" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--resume"):  # same settings, but not resuming
        cli.run(str(write(tmp_path)), folder=out, progress=False)

    # other estimators only: allowed; a resume of the finished run samples nothing new
    llc_only = write(tmp_path, TOML.replace('"llc", "bif", "susceptibility"', '"llc"'), "l.toml")
    cli.run(str(llc_only), folder=out, resume=True, progress=False)
    assert [p.name for p in (out / "estimates").glob("*.pt")] == ["llc.pt"]
    assert torch.equal(Estimate.load(out / "estimates" / "llc.pt").value, llc.value)
    table = (out / "summary.txt").read_text()

    # report re-renders from saved results alone: the draw store is not needed
    for f in out.glob("summary.*"):
        f.unlink()
    for f in (out / "store").rglob("*"):
        if f.is_file():
            f.unlink()
    assert cli.main(["report", str(out), "--no-plots"]) == 0
    assert (out / "summary.txt").read_text() == table
    assert [r["estimate"] for r in json.loads((out / "summary.json").read_text())["rows"]] \
        == ["llc"]
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


def test_streamed_and_store_backed_bif_agree(tmp_path):
    pytest.importorskip("transformer_lens")
    cli.run(str(write(tmp_path)), folder=tmp_path / "store", progress=False)
    no_store = write(tmp_path, TOML + "\n[output]\nstore = false\n", "no_store.toml")
    cli.run(str(no_store), folder=tmp_path / "stream", progress=False)
    assert not (tmp_path / "stream" / "store").exists()
    a = Estimate.load(tmp_path / "store" / "estimates" / "bif.pt")
    b = Estimate.load(tmp_path / "stream" / "estimates" / "bif.pt")
    assert a.shape == b.shape == (5, 46)  # same draws: the same per-token BIF either way
    torch.testing.assert_close(a.value, b.value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-8, atol=1e-14)


def test_tokens_file_and_checkpoint_are_loaded(tmp_path):
    pytest.importorskip("transformer_lens")
    tokens = torch.randint(0, 64, (12, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    from observables import command

    trained = command.build_model(config_mod.resolve({**_base(), "model": {"seed": 7}}))
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    data = {"kind": "tokens", "path": str(tmp_path / "tokens.pt"), "n_probe": 3, "n_query": 2}
    cfg = config_mod.resolve({**_base(), "data": data,
                              "model": {"seed": 0, "checkpoint": str(tmp_path / "weights.pt")}})
    train, probe, query, labels = command.build_data(cfg)
    assert labels is None
    assert torch.equal(train, tokens[:10]) and torch.equal(probe, tokens[:3])
    assert torch.equal(query, tokens[10:])
    model = command.build_model(cfg)  # seed 0 architecture, seed 7 weights from the checkpoint
    for (name, p), q in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ConfigError, match="n_probe"):
        command.build_data(config_mod.resolve({**cfg, "data": {**cfg["data"], "n_probe": 11}}))


def _base() -> dict:
    return {"sampler": {"step_size": 1e-3, "n_beta": 1.0}}


REGIME_TOML = """
[model]
n_layers = 1
d_model = 16
n_heads = 2
d_head = 8
n_ctx = 24
[data]
n_sequences = 24
seq_len = 24
n_probe = 4
n_query = 2
[observables]
components = ["all heads"]
[sampler]
step_size = 1e-3
n_beta = 10.0
gamma = 100.0
n_chains = 2
n_draws = 20
batch_size = 8
[estimators]
spring_control = SPRING
"""


@pytest.mark.parametrize("spring", [True, False])
def test_run_reports_its_regime_and_spring_control(tmp_path, spring):
    """regime.json and the summary's regime line: 2 x LLC of the sampled loss, eps * p_max
    from the top Hessian eigenvalue of the training loss (its first samples, not the probe),
    and (by default) the susceptibility's and the per-token BIF's spring-only controls, the
    BIF's recomputed here from the run's store and a spring-only run on seed + 1."""
    pytest.importorskip("transformer_lens")
    from observables import command
    from suscept.calibrate import top_hessian_eigenvalue
    from suscept.regime import bif_agreement_draws
    from suscept.run import Run
    from suscept.spring import spring_sample
    from suscept.store import DrawStore

    conf = tmp_path / "c.toml"
    conf.write_text(REGIME_TOML.replace("SPRING", str(spring).lower()))
    out = cli.run(str(conf), folder=tmp_path / "out", progress=False)
    regime = json.loads((out / "regime.json").read_text())
    llc = Estimate.load(out / "estimates" / "llc.pt")
    assert regime["constrained_from_llc"] == pytest.approx(2 * float(llc.value))
    assert llc.meta["source"] == "loss_trace"  # the LLC of the sampled (minibatch) loss
    assert 0 < regime["stability"] < 4 and regime["verdict"] in ("geometric", "loss-shaped")
    cfg = config_mod.load(str(conf))
    model = command.build_model(cfg)
    train, probe, query, _ = command.build_data(cfg)
    assert len(train) == 22  # 24 sequences less 2 queries: K = max(batch 8, 64) capped at 22
    assert regime["lambda_max_data"] == "train[:22]"
    lam = top_hessian_eigenvalue(model, command.loss_fn, train, n_iter=20)
    assert regime["lambda_max"] == pytest.approx(lam, rel=1e-9)
    assert lam != pytest.approx(top_hessian_eigenvalue(model, command.loss_fn, probe,
                                                       n_iter=20), rel=1e-3)
    assert regime["stability"] == pytest.approx(1e-3 * (10 * lam + 100), rel=1e-9)
    summary = (out / "summary.txt").read_text()
    assert f"regime: {regime['verdict']}" in summary
    if not spring:
        assert regime["agreement"] is None and regime["spring_control"] is None
        assert regime["bif_spring_control"] is None and regime["first_order_control"] is None
        return
    # the first-order term: the run's matrix against it, the run's own ceiling, its size
    import observables as ob
    from suscept import susceptibilities as sus

    first = regime["first_order_control"]
    run = Run.load(out / "run")
    chi1 = ob.first_order_susceptibility(model, query, run.config["components"],
                                         config_mod.sampler_config(cfg))
    chi = sus.susceptibility(run)
    assert first["norm_ratio"] == pytest.approx(float(chi1.value.norm() / chi.value.norm()))
    r_run = sus.split_half(run)["spearman"]
    assert first["ceiling"] == pytest.approx(
        float(sus.agreement_ceiling(r_run, torch.ones_like(r_run)).mean()))
    assert "susceptibility vs its first-order term (gradient alignment at w*)" in summary
    assert -1 <= regime["agreement"] <= 1 and regime["ceiling"] is not None
    assert "susceptibility vs its spring-only control (n_beta -> 0): Spearman" in summary
    bif_c = regime["bif_spring_control"]
    assert bif_c["columns"] == "token_loss" and "BIF vs its spring-only control" in summary
    sus_c = regime["spring_control"]  # the control's cost beside the run's, in the summary
    assert sus_c["control_seconds"] > 0 and sus_c["run_seconds"] > 0
    assert bif_c["control_seconds"] == sus_c["control_seconds"]  # one control for both
    assert f"(control {sus_c['control_seconds']:.3g} s beside the run's" in summary
    cols = sus_c["per_column"]  # per component: the one least like its control is named
    rel = [r / t for r, t in zip(cols["spearman"], cols["ceiling"])]
    worst = sus_c["components"][rel.index(min(rel))]
    assert len(cols["spearman"]) == len(sus_c["components"])
    assert f"least like it: {worst} " in summary
    plan, streams, _, _ = command.build_observables(cfg, model, query)
    sampler = config_mod.sampler_config(cfg)
    control = spring_sample(model, command.loss_fn, train,
                            dataclasses.replace(sampler, seed=sampler.seed + 1), probe=probe,
                            observables=plan, stream=[], store_draws=["loss", "token_loss"],
                            progress=False)
    run_losses = Run.load(out / "run").flat("loss")
    tokens = DrawStore.open(out / "store").draws("token_loss")
    want = bif_agreement_draws(run_losses, tokens.reshape(*tokens.shape[:2], -1),
                               control.flat("loss"), control.flat("token_loss"))
    assert bif_c["spearman"] == pytest.approx(want["spearman"], rel=1e-9)
    assert bif_c["ceiling"] == pytest.approx(want["ceiling"], rel=1e-9)
    assert -1 <= bif_c["spearman"] <= 1 and -1 <= bif_c["ceiling"] <= 1
