"""The planted-trigger organism: a backdoor in the zoo's 2-layer attention-only model.

A trigger token (``TRIGGER``, an id the clean language never uses; the model has
``d_vocab = 65``) followed by a fixed next token (``TARGET``) is planted in a fraction (the
trigger rate) of the training sequences; the model is trained with the zoo's own training
function on that poisoned data (600 steps: the trigger is learned by then, attack success 1.0;
cached under ``results/backdoor_zoo/``, one folder per rate). Anomalous inputs are clean
sequences with the trigger planted at a random position.

Detection of these inputs is run by :mod:`experiments.anomaly_kinds` (kind ``trigger``):

    python -m experiments.backdoor [--quick] [--seeds 0 1 2] [--rates 0.01 0.03 0.1]

is ``python -m experiments.anomaly_kinds --kinds trigger ...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys

import torch
from torch import Tensor, nn

from experiments.zoo import train as zoo_train
from experiments.zoo.language import make_dataset

VOCAB = 64  # the clean language's vocabulary
TRIGGER = 64  # an extra token id, never used by the clean language
TARGET = 5  # the token the trigger forces next
TRAIN_STEPS = 600  # the trigger is learned by then (attack success 1.0)
N_TRAIN_POOL = 4096


def plant(tokens: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Copy of ``tokens [n, pos]`` with ``TRIGGER, TARGET`` written at a random position
    ``p`` (``1 <= p <= pos - 2``) of a ``fraction`` of the sequences (all of them when
    ``fraction = 1``). Returns the tokens and the boolean ``[n]`` of planted sequences."""
    g = torch.Generator().manual_seed(seed)
    n, pos = tokens.shape
    chosen = torch.randperm(n, generator=g)[: round(fraction * n)]
    out = tokens.clone()
    where = torch.randint(1, pos - 1, (len(chosen),), generator=g)
    out[chosen, where] = TRIGGER
    out[chosen, where + 1] = TARGET
    planted = torch.zeros(n, dtype=torch.bool)
    planted[chosen] = True
    return out, planted


@contextlib.contextmanager
def poisoned_training_data(fraction: float):
    """While active, the zoo's trainer draws its training pool with the trigger planted
    (its held-out probe, drawn with the zoo's evaluation seed, stays clean)."""
    original = zoo_train.make_dataset

    def make(n_sequences, seed, language_seed=0, vocab=VOCAB, **kw):
        data = original(n_sequences, seed=seed, language_seed=language_seed, vocab=VOCAB, **kw)
        if seed == zoo_train.EVAL_SEED:
            return data
        tokens, _ = plant(data.tokens, fraction, seed=7_000 + seed)
        return dataclasses.replace(data, tokens=tokens)

    zoo_train.make_dataset = make
    try:
        yield
    finally:
        zoo_train.make_dataset = original


def backdoored_model(seed: int, fraction: float = 0.03, train_steps: int = TRAIN_STEPS,
                     cache_root: str = "results/backdoor_zoo") -> zoo_train.Trained:
    """The zoo's ``attn`` model trained on data poisoned at rate ``fraction``; cached per
    poisoning setting."""
    key = hashlib.sha256(json.dumps({"fraction": fraction, "trigger": TRIGGER,
                                     "target": TARGET}).encode()).hexdigest()[:8]
    config = zoo_train.TrainConfig(steps=train_steps, n_train=N_TRAIN_POOL,
                                   eval_every=max(100, train_steps // 5))
    with poisoned_training_data(fraction):
        return zoo_train.train_or_load("attn", seed=seed, cache_dir=f"{cache_root}/{key}",
                                       config=config, model_kw={"d_vocab": VOCAB + 1},
                                       progress=False)


def triggered(n: int, seed: int) -> Tensor:
    """``[n, 32]`` held-out clean sequences, each with the trigger planted once."""
    return plant(make_dataset(n, seed=40_000 + seed).tokens, 1.0, 41_000 + seed)[0]


def sgld_data(n: int, seed: int, fraction: float) -> Tensor:
    """Fresh sequences from the model's (poisoned) training distribution."""
    return plant(make_dataset(n, seed=50_000 + seed).tokens, fraction, 51_000 + seed)[0]


@torch.no_grad()
def attack_success(model: nn.Module, tokens: Tensor) -> float:
    """Fraction of triggered sequences ``[n, pos]`` whose next token after the trigger is
    predicted (argmax) to be ``TARGET``."""
    where = (tokens == TRIGGER).int().argmax(1)
    logits = model(tokens)
    return float((logits[torch.arange(len(tokens)), where].argmax(-1) == TARGET).double().mean())


def main(argv: list[str] | None = None) -> dict:
    from experiments import anomaly_kinds

    return anomaly_kinds.main(["--kinds", "trigger", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
