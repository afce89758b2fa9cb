"""Train the zoo's tiny transformers on the synthetic language, with a cache on disk.

Architectures (``ARCHS``), both built by :func:`observables.build` (a ``HookedTransformer``
under TransformerLens 3.x, a ``TransformerBridge`` under 4.x):

- ``"attn"``: 2 layers, attention only, d_model 64, 4 heads of d_head 16, n_ctx 32, LN;
- ``"mlp"``: the same with GELU MLPs of width 256.

Training: AdamW, linear warm-up then cosine decay to a tenth of the peak rate, batches drawn
from a fixed pool of sequences of the language (data and initialization from ``seed``). The
training loss is the mean per-token loss :func:`observables.lm_loss`.

Cache layout: ``{cache_dir}/{arch}-seed{seed}-{backend}-{key}/`` with ``step{N:06d}.pt`` (a
``state_dict`` per checkpoint, log-spaced steps, step 0 = initialization) and ``curve.json``
(the training curve: loss by token type on a held-out probe, the configuration, the wall-clock
time). ``backend`` is ``hooked`` or ``bridge`` (their state dicts differ) and ``key`` hashes the
model and training configuration, so that a changed configuration trains anew.

Shipped checkpoints: ``experiments/zoo/checkpoints/`` holds the final ``state_dict`` and
``curve.json`` of a few default models (``"attn"``, seed 0, TransformerLens 3.x), in the same
layout as the cache. ``train_or_load(..., shipped=True)`` loads one on a cache miss instead of
training (its only checkpoint is the final step); ``python -m experiments.zoo.train --ship``
writes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import observables
from experiments.zoo.language import Dataset, make_dataset

BASE = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64, n_ctx=32)
ARCHS: dict[str, dict] = {"attn": dict(BASE), "mlp": dict(BASE, d_mlp=256)}
EVAL_SEED = 999_999  # the held-out probe's data seed (training data uses the training seed)
SHIPPED = Path(__file__).parent / "checkpoints"  # final checkpoints shipped with the package


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 50
    n_train: int = 16384  # size of the pool of training sequences
    n_eval: int = 256  # held-out probe for the training curve
    eval_every: int = 100
    n_checkpoints: int = 10  # step 0 plus n_checkpoints - 1 log-spaced steps ending at `steps`
    language_seed: int = 0


def checkpoint_steps(steps: int, n: int = 10) -> list[int]:
    """``0`` and up to ``n - 1`` log-spaced steps ending at ``steps`` (fewer if they collide)."""
    if n < 2 or steps < 1:
        return [0, steps] if steps > 0 else [0]
    rest = np.unique(np.round(np.geomspace(max(1.0, steps / 300), steps, n - 1)).astype(int))
    return [0] + [int(s) for s in rest]


@dataclass
class Trained:
    """A trained model and its training record. ``from_cache``: loaded, not trained now."""

    model: nn.Module
    arch: str
    seed: int
    backend: str
    model_kw: dict
    config: TrainConfig
    path: Path
    checkpoints: list[int]
    curve: dict
    train_seconds: float
    from_cache: bool
    type_names: tuple[str, ...] = field(default=())

    def checkpoint(self, step: int) -> nn.Module:
        """A fresh model with the weights saved at ``step`` (one of ``self.checkpoints``)."""
        if step not in self.checkpoints:
            raise KeyError(f"no checkpoint at step {step}; have {self.checkpoints}")
        return load_model(self.path / f"step{step:06d}.pt", self.model_kw, self.seed)

    def final_loss_by_type(self) -> dict[str, float]:
        return {k: v[-1] for k, v in self.curve["eval"].items()}


def loss_by_type(model: nn.Module, data: Dataset, batch: int = 512) -> dict[str, float]:
    """Mean per-token loss for each label of the predicted tokens (``nan`` where none)."""
    losses = token_losses(model, data.tokens, batch)
    tt = data.target_types
    out = {"all": float(losses.mean())}
    for k, name in enumerate(data.type_names):
        m = tt == k
        out[name] = float(losses[m].mean()) if m.any() else float("nan")
    return out


@torch.no_grad()
def token_losses(model: nn.Module, tokens: Tensor, batch: int = 512) -> Tensor:
    """``[n, seq_len - 1]`` per-token losses, computed in batches without gradients."""
    return torch.cat([observables.token_losses(model(t), t) for t in tokens.split(batch)])


def load_model(path: str | os.PathLike, model_kw: dict, seed: int = 0) -> nn.Module:
    model = observables.build(**model_kw, seed=seed)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _key(arch: str, model_kw: dict, config: TrainConfig) -> str:
    blob = json.dumps({"arch": arch, "model": model_kw, "train": dataclasses.asdict(config)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def cache_path(arch: str, seed: int, cache_dir: str | os.PathLike = "results/zoo",
               config: TrainConfig | None = None, model_kw: dict | None = None) -> Path:
    config = config or TrainConfig()
    model_kw = dict(ARCHS[arch], **(model_kw or {}))
    return (Path(cache_dir)
            / f"{arch}-seed{seed}-{observables.backend()}-{_key(arch, model_kw, config)}")


def train(arch: str, seed: int, out_dir: str | os.PathLike, config: TrainConfig | None = None,
          model_kw: dict | None = None, verbose: bool = False, progress: bool = True) -> dict:
    """Train one model, writing checkpoints and ``curve.json`` into ``out_dir``; the curve.

    ``progress`` shows a tqdm bar (steps, rate, remaining time, running training loss);
    ``verbose`` also prints the held-out loss by token type at every evaluation.
    """
    config = config or TrainConfig()
    model_kw = dict(ARCHS[arch], **(model_kw or {}))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lang = dict(language_seed=config.language_seed, seq_len=model_kw["n_ctx"],
                vocab=model_kw["d_vocab"])
    data = make_dataset(config.n_train, seed=seed, **lang).tokens
    probe = make_dataset(config.n_eval, seed=EVAL_SEED, **lang)
    model = observables.build(**model_kw, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:  # factor of config.lr at optimizer step `step` (0-based)
        if step < config.warmup:
            return (step + 1) / config.warmup
        t = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ckpts = checkpoint_steps(config.steps, config.n_checkpoints)
    evals = sorted(set(range(0, config.steps + 1, config.eval_every)) | set(ckpts))
    g = torch.Generator().manual_seed(seed)
    curve: dict = {"step": [], "train_loss": [], "eval": {}}
    running = float("nan")
    t0 = time.perf_counter()
    bar = tqdm(total=config.steps, desc=f"training {arch} seed {seed}", unit="step",
               disable=not progress, mininterval=2.0)
    for step in range(config.steps + 1):
        if step in evals:
            model.eval()
            ev = loss_by_type(model, probe)
            model.train()
            curve["step"].append(step)
            curve["train_loss"].append(running)
            for k, v in ev.items():
                curve["eval"].setdefault(k, []).append(v)
            bar.set_postfix(eval_loss=f"{ev['all']:.3f}", refresh=False)
            if verbose:
                bar.write(f"  step {step:5d}  {time.perf_counter() - t0:6.1f}s  "
                      + "  ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        if step in ckpts:
            torch.save(model.state_dict(), out_dir / f"step{step:06d}.pt")
        if step == config.steps:
            break
        idx = torch.randint(len(data), (config.batch_size,), generator=g)
        loss = observables.lm_loss(model, data[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if math.isnan(running) else 0.9 * running + 0.1 * loss.item()
        bar.update()
    bar.close()
    model.eval()
    curve.update(checkpoints=ckpts, train_seconds=time.perf_counter() - t0,
                 type_names=list(probe.type_names), arch=arch, seed=seed,
                 backend=observables.backend(), model=model_kw,
                 config=dataclasses.asdict(config), n_params=sum(
                     p.numel() for p in model.parameters()),
                 torch_threads=torch.get_num_threads())
    (out_dir / "curve.json").write_text(json.dumps(curve, indent=1))
    return curve


def train_or_load(arch: str, seed: int = 0, cache_dir: str | os.PathLike = "results/zoo",
                  config: TrainConfig | None = None, model_kw: dict | None = None,
                  verbose: bool = False, progress: bool = True,
                  shipped: bool = False) -> Trained:
    """The trained model ``arch`` (a key of ``ARCHS``) for ``seed``; trains only on a cache miss.

    ``model_kw`` overrides entries of ``ARCHS[arch]`` (e.g. a smaller model for tests). The
    cache is complete once ``curve.json`` exists (written last, the directory renamed into
    place), so an interrupted run trains again. ``shipped=True``: on a cache miss, load the
    final checkpoint shipped in ``SHIPPED`` when one matches (same arch, seed, backend and
    configuration key); its ``checkpoints`` then list only the final step.
    """
    if arch not in ARCHS:
        raise KeyError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    config = config or TrainConfig()
    full_kw = dict(ARCHS[arch], **(model_kw or {}))
    path = cache_path(arch, seed, cache_dir, config, model_kw)
    from_cache = (path / "curve.json").exists()
    if not from_cache and shipped and (SHIPPED / path.name / "curve.json").exists():
        path, from_cache = SHIPPED / path.name, True
    if not from_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp", dir=path.parent))
        try:
            train(arch, seed, tmp, config, model_kw, verbose, progress)
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    curve = json.loads((path / "curve.json").read_text())
    final = curve["checkpoints"][-1]
    model = load_model(path / f"step{final:06d}.pt", full_kw, seed)
    return Trained(model=model, arch=arch, seed=seed, backend=curve["backend"], model_kw=full_kw,
                   config=config, path=path, checkpoints=curve["checkpoints"], curve=curve,
                   train_seconds=curve["train_seconds"], from_cache=from_cache,
                   type_names=tuple(curve["type_names"]))


def ship(arch: str = "attn", seed: int = 0, cache_dir: str | os.PathLike = "results/zoo") -> Path:
    """Copy the final checkpoint and curve of a default model into ``SHIPPED`` (training it
    first on a cache miss); returns the shipped folder."""
    trained = train_or_load(arch, seed, cache_dir)
    final = trained.checkpoints[-1]
    dest = SHIPPED / trained.path.name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained.path / f"step{final:06d}.pt", dest / f"step{final:06d}.pt")
    curve = dict(trained.curve, checkpoints=[final])
    (dest / "curve.json").write_text(json.dumps(curve, indent=1))
    return dest


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write the shipped zoo checkpoints")
    parser.add_argument("--ship", action="store_true", required=True)
    parser.add_argument("--seed", type=int, default=0)
    torch.set_num_threads(1)
    print(ship("attn", parser.parse_args().seed))
