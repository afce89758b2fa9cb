"""What a ``suscept run`` configuration points at, loaded and checked before anything is
written: the builders of its model kind (:func:`builders`, found by entry point), token and
checkpoint files, the split of token ids, and the predicted memory against the budget. Every
failure is a :class:`~suscept.errors.ConfigError` naming the input and what to do.
"""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import torch

from suscept import config as config_mod
from suscept.errors import ConfigError
from suscept.estimators import default_blocks
from suscept.streams import Cross, as_stream, memory_bytes, physical_memory

SMALL = ("loss", "mean_loss", "phi")  # observables also kept in memory (the rest: store only)
GROUP = "suscept.builders"  # entry points: modules with build_model, build_data, loss_fn, ...


def builders(name: str = "transformer_lens"):
    """The module that builds models, data and observables for ``suscept run``, registered in
    the ``suscept.builders`` entry-point group (the ``suscept`` distribution registers its
    TransformerLens builders as ``transformer_lens``). The engine names no model library."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
    if name not in found:
        raise ConfigError(f"no {name!r} builders for suscept run are installed (entry-point "
                          f"group {GROUP!r} has {sorted(found)}); install the suscept "
                          "distribution with pip install . (or pip install -e . in a checkout)")
    return found[name].load()


def input_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {p} does not exist")
    if not p.is_file():
        raise ConfigError(f"{what} {p} is not a file (a folder?); give the path of a torch file")
    return p


def torch_load(path: Path, what: str, need: str):
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except OSError:
        raise
    except Exception as e:  # pickle, zip and torch errors of a file that is not a tensor file
        raise ConfigError(f"{what} {path} is not a readable torch file of {need} "
                          f"({type(e).__name__}); save it with torch.save") from e


def split_tokens(tokens, n_query: int, n_probe: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train, probe, query)`` of integer token ids ``[n_sequences, pos]``: query = the last
    ``n_query`` sequences, train = the others, probe = the first ``n_probe`` training ones."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ConfigError(f"[data] must give token ids of shape [n_sequences, pos]; got {got}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ConfigError(f"[data] token ids must be an integer tensor; got dtype {tokens.dtype} "
                          "(save them with .long(); values are not rounded for you)")
    if not 0 < n_probe <= len(tokens) - n_query or n_query < 1:
        raise ConfigError(f"[data] has {len(tokens)} sequences: need n_query >= 1 and "
                          f"1 <= n_probe <= n_sequences - n_query (got {n_query}, {n_probe})")
    train, query = tokens[:-n_query].long(), tokens[-n_query:].long()
    return train, train[:n_probe], query


def observable_shapes(dims: dict, n_probe: int, n_components: int,
                      query: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape of one draw of each recorded observable."""
    n_tokens = query.shape[0] * (query.shape[1] - 1)
    sizes = {"sample": n_probe, "component": n_components, "token": n_tokens}
    return {name: tuple(sizes[d] for d in axes) for name, axes in dims.items()}


def memory_budget(cfg: dict) -> float:
    """Bytes a run may use: ``[output] memory_budget_gb``, default half the physical memory."""
    if cfg["output"]["memory_budget_gb"] is not None:
        return cfg["output"]["memory_budget_gb"] * 2**30
    return 0.5 * physical_memory()


def check_memory(cfg: dict, shapes: dict, streams: list) -> dict[str, int]:
    """Predicted peak memory of the streamed moments, in-memory draws and the store-backed BIF
    (:func:`suscept.streams.memory_bytes`); a ConfigError past :func:`memory_budget`."""
    s = config_mod.sampler_config(cfg)
    segs = s.n_chains * (s.n_blocks or default_blocks(s.n_chains, s.n_draws))
    stored = {k: s.n_chains * s.n_draws * math.prod(shapes[k]) for k in SMALL if k in shapes}
    items = memory_bytes([as_stream(x) for x in streams], shapes, segs, stored)
    if cfg["output"]["store"] and "token_loss" in shapes and "bif" in cfg["estimators"]["wanted"]:
        cols = min(cfg["output"]["col_block"], math.prod(shapes["token_loss"]))
        items["store-backed bif"] = memory_bytes([Cross("loss", "token", third=False)],
                                                 {"loss": shapes["loss"], "token": (cols,)},
                                                 segs)["loss|token"]
    total, budget = sum(items.values()), memory_budget(cfg)
    if total > budget:
        top = max(items, key=items.get)
        raise ConfigError(f"this run would need about {total / 2**30:.3g} GB of memory, over the "
                          f"budget of {budget / 2**30:.3g} GB ([output] memory_budget_gb); most "
                          f"of it is {top!r} ({items[top] / 2**30:.3g} GB): lower n_probe, the "
                          "components, [data] seq_len, n_chains or n_blocks, or raise the budget")
    return items
