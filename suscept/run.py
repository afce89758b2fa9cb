"""The result of :func:`suscept.sample`: draws, streamed moments, traces and diagnostics."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from suscept import diagnostics
from suscept.errors import ConfigError
from suscept.estimate import load_saved
from suscept.moments import Moments


@dataclass(frozen=True)
class Divergence:
    chain: int
    step: int  # SGLD step index at which the chain was stopped
    reason: str


@dataclass
class Run:
    """Everything one sampling run produced.

    Attributes:
        config: the :class:`~suscept.sample.SamplerConfig` as a dict.
        n: training-set size; ``beta = n_beta / n``.
        shapes: observable name -> shape of one evaluation.
        anchor_values: observable name -> its value at the anchor w*.
        draws: observable name -> ``[chain, draw, *shape]`` (empty if not stored). Draw ``d`` of
            a chain is taken at the weights after SGLD step ``burn_in + (d + 1) * thin``. Draws
            of a diverged chain after its divergence are NaN.
        moments: stream key -> streamed :class:`Moments` over the chains that did not diverge
            only: ``"x|y"`` (x against y) -> Moments; ``"x~y"`` (paired per component) -> a
            list of Moments, one per component (see :mod:`suscept.streams`).
        loss_trace: ``[chain, step]`` minibatch mean loss at ``w_k``, the weights the k-th
            gradient is taken at (``w_0 = w*``); NaN after a divergence.
        probe_loss: ``[chain, draw]`` mean of the ``"loss"`` observable (the probe's
            per-sample losses) or of ``"mean_loss"``, whichever exists, at each draw.
        distance: ``[chain, draw]`` ``||w - w*||`` at each draw.
        divergences: the chains stopped for NaN/inf or an exploding loss, with their step.
    """

    config: dict
    n: int
    shapes: dict[str, tuple[int, ...]]
    anchor_values: dict[str, Tensor]
    draws: dict[str, Tensor]
    moments: dict[str, Moments | list[Moments]]
    loss_trace: Tensor
    probe_loss: Tensor
    distance: Tensor
    divergences: list[Divergence] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def beta(self) -> float:
        return self.config["n_beta"] / self.n

    @property
    def valid_chains(self) -> list[int]:
        bad = {d.chain for d in self.divergences}
        return [c for c in range(self.config["n_chains"]) if c not in bad]

    def flat(self, name: str) -> Tensor:
        """Stored draws of ``name`` flattened to ``[chain, draw, k]``."""
        if name not in self.draws:
            raise ConfigError(f"no stored draws for {name!r}; stored: {sorted(self.draws)} "
                              "(sample with store_draws=True)")
        x = self.draws[name]
        return x.reshape(x.shape[0], x.shape[1], -1)

    def moments_of(self, x: str, y: str | None = None) -> Moments:
        key = f"{x}|{y or x}"
        if key not in self.moments:
            raise ConfigError(f"no streamed moments {key!r}; streamed: {sorted(self.moments)} "
                              "(pass stream=[(x, y)] to sample)")
        return self.moments[key]

    def paired(self, x: str, y: str) -> list[Moments]:
        """Per-component Moments of a :class:`~suscept.streams.Paired` stream."""
        key = f"{x}~{y}"
        if key not in self.moments:
            raise ConfigError(f"no paired stream {key!r}; streamed: {sorted(self.moments)}")
        return self.moments[key]

    def diagnostics(self) -> dict:
        """ESS / IAT (in draws) / R-hat of the probe loss, distance and stored observables."""
        out = {"divergences": [asdict(d) for d in self.divergences]}
        if self.probe_loss.shape[1] >= 4:
            out["probe_loss"] = diagnostics.summary(self.probe_loss[..., None])
            out["distance"] = diagnostics.summary(self.distance[..., None])
        for name in self.draws:
            if self.draws[name].shape[1] >= 4:
                out[name] = diagnostics.summary(self.flat(name))
        return out

    # ---- persistence ------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``run.json`` (config, shapes, divergences) and ``run.pt`` (tensors)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"config": self.config, "n": self.n, "wall_s": self.wall_s,
                "shapes": {k: list(v) for k, v in self.shapes.items()},
                "divergences": [asdict(d) for d in self.divergences]}
        (folder / "run.json").write_text(json.dumps(meta, indent=2))
        tensors = {
            "anchor_values": self.anchor_values, "draws": self.draws,
            "moments": {k: [_as_dict(x) for x in m] if isinstance(m, list) else _as_dict(m)
                        for k, m in self.moments.items()},
            "loss_trace": self.loss_trace, "probe_loss": self.probe_loss,
            "distance": self.distance,
        }
        torch.save(tensors, folder / "run.pt")
        return folder

    @staticmethod
    def load(folder: str | Path) -> Run:
        """Read a Run written by :meth:`save`; damaged or edited files (shapes that do not fit
        together, missing fields) are refused with a ConfigError naming the folder."""
        folder = Path(folder)
        if not (folder / "run.json").exists():
            raise ConfigError(f"{folder} holds no saved run (run.json missing)")
        try:
            meta = json.loads((folder / "run.json").read_text())
            run = Run(config=meta["config"], n=meta["n"],
                      shapes={k: tuple(v) for k, v in meta["shapes"].items()},
                      anchor_values={}, draws={}, moments={}, loss_trace=torch.empty(0),
                      probe_loss=torch.empty(0), distance=torch.empty(0),
                      divergences=[Divergence(**d) for d in meta["divergences"]],
                      wall_s=float(meta["wall_s"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{folder}/run.json is damaged ({type(e).__name__}: {e}); "
                              "sample again") from e
        t = load_saved(folder / "run.pt", "run", {"anchor_values": dict, "draws": dict,
                                                  "moments": dict, "loss_trace": Tensor,
                                                  "probe_loss": Tensor, "distance": Tensor})
        try:
            moments = {k: [Moments(**x) for x in v] if isinstance(v, list) else Moments(**v)
                       for k, v in t["moments"].items()}
        except TypeError as e:
            raise ConfigError(f"{folder}/run.pt holds damaged moments ({e}); sample again") from e
        run = replace(run, anchor_values=t["anchor_values"], draws=t["draws"], moments=moments,
                      loss_trace=t["loss_trace"], probe_loss=t["probe_loss"],
                      distance=t["distance"])
        problem = _inconsistency(run)
        if problem:
            raise ConfigError(f"the saved run in {folder} is damaged or was edited: {problem}; "
                              "sample again")
        return run


def _inconsistency(run: Run) -> str | None:
    """What does not fit together in a loaded run (None if all does)."""
    c = run.config
    if not all(isinstance(c.get(k), int) and c[k] >= 1 for k in ("n_chains", "n_draws")):
        return "config needs integers n_chains, n_draws >= 1"
    if not isinstance(run.n, int) or run.n < 1:
        return f"n = {run.n!r} must be an integer >= 1"
    chains, draws = c["n_chains"], c["n_draws"]
    for name in ("probe_loss", "distance"):
        if tuple(getattr(run, name).shape) != (chains, draws):
            return f"{name} has shape {tuple(getattr(run, name).shape)}, not {(chains, draws)}"
    if run.loss_trace.ndim != 2 or run.loss_trace.shape[0] != chains:
        return f"loss_trace has shape {tuple(run.loss_trace.shape)}, not [{chains}, steps]"
    for name, v in run.anchor_values.items():
        if not isinstance(v, Tensor) or tuple(v.shape) != run.shapes.get(name):
            return f"anchor value {name!r} does not have the shape {run.shapes.get(name)}"
    for name, v in run.draws.items():
        want = (chains, draws, *run.shapes.get(name, (-1,)))
        if not isinstance(v, Tensor) or tuple(v.shape) != want:
            return f"draws of {name!r} do not have the shape {want}"
    for key, m in run.moments.items():
        for part in m if isinstance(m, list) else [m]:
            s, kx, ky = part.n.shape[0], part.mean_x.shape[-1], part.mean_y.shape[-1]
            if part.cxy.shape != (s, kx, ky) or part.m2_x.shape != (s, kx) \
                    or part.m2_y.shape != (s, ky):
                return f"moments {key!r} have inconsistent shapes"
    if any(not 0 <= d.chain < chains for d in run.divergences):
        return "a divergence names a chain out of range"
    return None


def _as_dict(m: Moments) -> dict:
    return {f.name: getattr(m, f.name) for f in fields(m)}
