"""The zoo checkpoint shipped in the repository: small, loaded safely, the model it claims."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens")

import observables  # noqa: E402
from experiments.zoo.language import make_dataset  # noqa: E402
from experiments.zoo.train import (  # noqa: E402
    EVAL_SEED,
    SHIPPED,
    cache_path,
    loss_by_type,
    train_or_load,
)


def test_shipped_checkpoint_is_small_and_is_the_default_model(tmp_path):
    if observables.backend() != "hooked":
        pytest.skip("the shipped state_dict is TransformerLens 3.x's (HookedTransformer)")
    name = cache_path("attn", 0, tmp_path).name  # the key of the default configuration
    files = sorted((SHIPPED / name).iterdir())
    assert [f.name for f in files] == ["curve.json", "step001500.pt"]
    assert sum(f.stat().st_size for f in files) < 300_000
    torch.load(files[1], weights_only=True)  # plain tensors only
    trained = train_or_load("attn", 0, cache_dir=tmp_path, shipped=True)
    assert trained.from_cache and trained.path == SHIPPED / name
    assert trained.checkpoints == [1500] and not any(tmp_path.iterdir())  # nothing trained
    cfg = trained.config
    probe = make_dataset(cfg.n_eval, seed=EVAL_SEED, language_seed=cfg.language_seed)
    now = loss_by_type(trained.model, probe)
    for kind, curve in trained.curve["eval"].items():  # the recorded held-out losses
        assert now[kind] == pytest.approx(curve[-1], abs=1e-5), kind
    assert now["induction"] < 0.5 < now["bigram"] < now["other"]  # it learned induction
