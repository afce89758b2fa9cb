"""The backdoor experiment: the planted trigger is exactly what it says, and the --quick run
detects triggered inputs from their per-token fluctuation profiles."""

import json

import pytest
import torch

pytest.importorskip("transformer_lens")
pytest.importorskip("matplotlib")

from experiments import backdoor  # noqa: E402
from experiments.zoo import train as zoo_train  # noqa: E402
from experiments.zoo.language import make_dataset  # noqa: E402


def test_plant_writes_trigger_then_target_and_nothing_else():
    clean = make_dataset(200, seed=3).tokens
    tokens, planted = backdoor.plant(clean, 0.05, seed=1)
    assert int(planted.sum()) == 10
    changed = (tokens != clean).any(1)
    assert not changed[~planted].any()
    for i in planted.nonzero().flatten().tolist():
        (p,) = (tokens[i] == backdoor.TRIGGER).nonzero()[:, 0].tolist()  # exactly one trigger
        assert tokens[i, p + 1] == backdoor.TARGET
        keep = torch.ones(clean.shape[1], dtype=torch.bool)
        keep[p:p + 2] = False
        assert torch.equal(tokens[i, keep], clean[i, keep])
    assert not (clean == backdoor.TRIGGER).any()  # the clean language never uses the trigger


def test_plant_uses_every_position_that_leaves_room_for_the_target():
    """Trigger positions run over exactly 1 .. pos - 2: never the first token (no context) and
    never the last (the target would fall off the sequence)."""
    clean = make_dataset(2000, seed=4).tokens
    tokens, planted = backdoor.plant(clean, 1.0, seed=2)
    assert bool(planted.all())
    first = (tokens == backdoor.TRIGGER).int().argmax(1)
    assert set(first.tolist()) == set(range(1, clean.shape[1] - 1))


def test_poisoned_training_data_is_scoped():
    original = zoo_train.make_dataset
    with pytest.raises(RuntimeError):
        with backdoor.poisoned_training_data(0.5):
            pool = zoo_train.make_dataset(100, seed=0, language_seed=0, seq_len=32, vocab=65)
            probe = zoo_train.make_dataset(100, seed=zoo_train.EVAL_SEED, language_seed=0,
                                           seq_len=32, vocab=65)
            raise RuntimeError("interrupt")
    assert zoo_train.make_dataset is original
    assert int((pool.tokens == backdoor.TRIGGER).any(1).sum()) == 50
    assert not (probe.tokens == backdoor.TRIGGER).any()


def test_backdoor_quick(tmp_path):
    """``python -m experiments.backdoor --quick`` is the anomaly runner on the trigger kind."""
    figures = backdoor.main(["--quick", "--out", str(tmp_path)])
    out = tmp_path / "anomaly"
    for name in ("figures.json", "config.json", "report.md", "scores.png", "auroc.png"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["quick"] is True and config["kinds"] == ["trigger"] and config["rates"] == [0.03]
    (run,) = figures["runs"]
    assert run["attack_success"] > 0.9  # the backdoor was learned
    res = run["kinds"]["trigger"]
    # The per-token fluctuation profiles find the triggered sequences (measured with --quick:
    # AUROC 0.971 / 0.889 / 0.996 on seeds 0 / 1 / 2, so the bar 0.8 leaves >= 0.09); the
    # issue's two baselines stay near chance (sequence loss 0.51 / 0.62 / 0.48, final-residual
    # Mahalanobis 0.39 / 0.53 / 0.61); chance is 0.5.
    fluct = res["fluctuation_max_token"]
    assert fluct["auroc"] > 0.8
    assert fluct["auroc"] > res["loss_baseline"]["auroc"]
    assert fluct["auroc"] > res["activation_baseline"]["auroc"]
    for r in res.values():
        assert 0.0 <= r["auroc"] <= 1.0 and 0 < r["auroc_se"] < 0.2
        assert 0 < r["conformal"]["expected_fpr"] <= 0.05
    # MAD-FA from the same draws (seed 0: AUROC 0.49-0.67, reported not asserted); the paired
    # difference is the difference of the two AUROCs
    d = run["differences"]["trigger"]["fixed"]
    assert d["b"].startswith("madfa_")
    assert d["value"] == pytest.approx(fluct["auroc"] - res[d["b"]]["auroc"], abs=1e-12)
    assert "madfa_paper_mean" not in res  # the paper-regime run is full mode only
