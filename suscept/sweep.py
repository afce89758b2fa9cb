"""Sweeps over components and hyperparameters: one function call per grid cell, resumable.

``run(fn, cells, folder)`` calls ``fn(**cell)`` for every cell of a grid (e.g.
``grid(component=["L0H0", "L1H2"], gamma=[300, 1000], n_beta=[10, 30])``). Each finished
cell is written at once, atomically (a temporary file renamed into place), to
``folder/cells/<hash of the cell>.json``; a rerun into the same folder skips every cell whose
file exists, so an interrupted sweep resumes without recomputing finished cells, and a crash
mid-write leaves no half-written cell. ``folder/sweep.json`` records the grid's axes, your
``config`` (the settings the cells share), the function's name and a hash of its code,
defaults and closure values (:func:`fn_hash`); a rerun whose axes, config or function differ
is refused. Adding values to an axis is allowed: old cells are reused.

The result is a tidy pandas table, one row per (cell, quantity, element): the grid's axes as
columns, then ``quantity`` (a key of ``fn``'s returned dict), ``element`` (``""`` for a scalar,
else the element's label, e.g. a component name, ``","``-joined for several dims),
``value`` and ``stderr`` (NaN unless the quantity is an :class:`~suscept.estimate.Estimate`).
``folder/table.csv`` is written at the end (read it back with
``pd.read_csv(path, keep_default_na=False, na_values=["nan"])``); :func:`load` rebuilds the
same table exactly from the cell files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import math
import types
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.folder import write_atomic

COLUMNS = ("quantity", "element", "value", "stderr")


def grid(**axes) -> list[dict]:
    """All combinations of the axes' values, the first axis varying slowest.

    ``grid(gamma=[300, 1000], component=["L0H0"])`` ->
    ``[{"gamma": 300, "component": "L0H0"}, {"gamma": 1000, "component": "L0H0"}]``.
    Values must be JSON scalars (numbers, strings, booleans).
    """
    for name, values in axes.items():
        if isinstance(values, str) or not hasattr(values, "__iter__"):
            raise ConfigError(f"axis {name!r} must be a list of values; got {values!r}")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def split_config(base, cell: dict):
    """``(config, rest)``: ``base`` (a dataclass such as ``SamplerConfig``) with the cell's
    matching fields replaced, and the cell's other entries (e.g. ``component``)."""
    names = {f.name for f in dataclasses.fields(base)}
    return (dataclasses.replace(base, **{k: v for k, v in cell.items() if k in names}),
            {k: v for k, v in cell.items() if k not in names})


def cell_key(cell: dict) -> str:
    """The file name stem of a cell: a hash of its sorted JSON."""
    return hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:20]


def _labels(est_dims: tuple[str, ...], shape: tuple[int, ...], meta: dict) -> list[str]:
    axes = [meta["components"] if d == "component" and meta.get("components")
            and len(meta["components"]) == n else [str(i) for i in range(n)]
            for d, n in zip(est_dims, shape)]
    return [",".join(map(str, t)) for t in itertools.product(*axes)] if axes else [""]


def _rows(name: str, out) -> list[list]:
    """``[quantity, element, value, stderr]`` rows of one returned quantity."""
    if isinstance(out, Estimate):
        labels = _labels(out.dims, out.shape, out.meta)
        values, errors = out.value.flatten().tolist(), out.stderr.flatten().tolist()
    elif isinstance(out, bool | int | float) or (isinstance(out, torch.Tensor)):
        t = torch.as_tensor(out, dtype=torch.float64)
        labels = _labels(tuple(f"dim{i}" for i in range(t.ndim)), tuple(t.shape), {})
        values, errors = t.flatten().tolist(), [math.nan] * t.numel()
    else:
        raise ConfigError(f"quantity {name!r}: fn must return numbers, tensors or Estimates; "
                          f"got {type(out).__name__}")
    return [[name, lab, float(v), float(e)] for lab, v, e in zip(labels, values, errors)]


def _name(fn) -> str:
    """``module.qualname`` of a function, or of the class of a callable object."""
    named = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{named.__module__}.{named.__qualname__}"


def fn_hash(fn) -> str:
    """A hash of what ``fn`` computes: its code (bytecode, constants, names, recursively),
    defaults and closure values; for a ``functools.partial`` its function and arguments, for a
    callable object or a bound method the code of its class's method (not the object's
    mutable state). Two lambdas of one line, or one function closing over other values, get
    different hashes; the same function in a new process gets the same one (values are hashed
    by content, never by address)."""
    h = hashlib.sha256()
    _feed(h, fn, depth=0)
    return h.hexdigest()[:20]


def _feed(h, v, depth: int) -> None:
    if depth > 20:
        h.update(b"<deep>")
        return
    if isinstance(v, functools.partial):
        for part in (v.func, v.args, sorted(v.keywords.items())):
            _feed(h, part, depth + 1)
    elif inspect.ismethod(v):
        _feed(h, v.__func__, depth + 1)
    elif inspect.isfunction(v):
        h.update(f"fn {v.__module__}.{v.__qualname__}".encode())
        _feed(h, v.__code__, depth + 1)
        cells = [c.cell_contents for c in v.__closure__ or () if _has_contents(c)]
        for part in (v.__defaults__ or (), sorted((v.__kwdefaults__ or {}).items()), cells):
            _feed(h, part, depth + 1)
    elif isinstance(v, types.CodeType):
        h.update(v.co_code + repr((v.co_names, v.co_varnames)).encode())
        _feed(h, v.co_consts, depth + 1)
    elif isinstance(v, list | tuple):
        h.update(f"{type(v).__name__}{len(v)}".encode())
        for x in v:
            _feed(h, x, depth + 1)
    elif isinstance(v, dict):
        _feed(h, sorted(v.items(), key=lambda kv: repr(kv[0])), depth + 1)
    elif isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif v is None or isinstance(v, bool | int | float | complex | str | bytes):
        h.update(repr(v).encode())
    elif isinstance(v, types.ModuleType | type):
        h.update(f"{type(v).__name__} {getattr(v, '__qualname__', v.__name__)}".encode())
    elif callable(v) and depth == 0:
        h.update(_name(v).encode())
        _feed(h, type(v).__call__, depth + 1)
    else:  # an object: its type, and its repr unless that names a memory address
        text = repr(v)
        h.update((type(v).__qualname__ + ("" if " at 0x" in text else text)).encode())


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell (a variable not yet assigned)
        return False
    return True


def _check_folder(folder: Path, spec: dict) -> None:
    meta = folder / "sweep.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        diff = [k for k in ("axes", "config", "fn", "fn_hash")
                if old.get(k) != spec[k] and (k != "fn_hash" or k in old)]
        if diff:
            detail = "; ".join(f"{k}: saved {old.get(k)!r}, now {spec[k]!r}" for k in diff)
            raise ConfigError(f"{folder} holds a sweep with a different {', '.join(diff)} "
                              f"({detail}); resume with the same settings, or use a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cells").mkdir(exist_ok=True)


def run(fn: Callable[..., dict], cells: list[dict], folder: str | Path, *,
        config: dict | None = None, progress: bool = True):
    """Call ``fn(**cell)`` for each cell not finished in ``folder``; the tidy table.

    Args:
        fn: ``fn(**cell) -> {quantity: number | Tensor | Estimate}``; must be deterministic for
            a resumed table to equal an uninterrupted one (seed your sampler).
        cells: the grid (:func:`grid`), a list of dicts with the same keys (JSON scalars).
        folder: where cells are stored; reruns resume from it.
        config: JSON-able settings shared by all cells (a mismatch on resume is refused).
        progress: a tqdm bar over the cells.
    Returns:
        A pandas DataFrame: the axes, then ``quantity, element, value, stderr``.
    """
    if not cells:
        raise ConfigError("the grid has no cells")
    axes = list(cells[0])
    if any(list(c) != axes for c in cells):
        raise ConfigError(f"every cell must have the axes {axes} in that order")
    keys = [cell_key(c) for c in cells]
    if len(set(keys)) != len(keys):
        raise ConfigError("the grid lists a cell more than once")
    folder = Path(folder)
    spec = {"axes": axes, "config": json.loads(json.dumps(config)),
            "fn": _name(fn), "fn_hash": fn_hash(fn)}
    _check_folder(folder, spec)
    write_atomic(folder / "sweep.json", json.dumps({**spec, "cells": cells}, indent=1))
    done = sum((folder / "cells" / f"{k}.json").exists() for k in keys)
    bar = tqdm(total=len(cells), initial=done, disable=not progress, desc="sweep")
    for cell, key in zip(cells, keys):
        path = folder / "cells" / f"{key}.json"
        if path.exists():
            continue
        bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in cell.items()))
        out = fn(**cell)
        if not isinstance(out, dict) or not out:
            raise ConfigError(f"fn must return a non-empty dict of quantities; got {out!r}")
        rows = [r for name, v in out.items() for r in _rows(str(name), v)]
        write_atomic(path, json.dumps({"cell": cell, "rows": rows}))
        bar.update(1)
    bar.close()
    table = load(folder)
    table.to_csv(folder / "table.csv", index=False, na_rep="nan")
    return table


def load(folder: str | Path):
    """The tidy table of the sweep in ``folder`` (its last grid), rebuilt from the cell files;
    raises if a cell is missing (the sweep was interrupted: rerun :func:`run`)."""
    import pandas as pd

    folder = Path(folder)
    if not (folder / "sweep.json").exists():
        raise ConfigError(f"{folder} holds no sweep (sweep.json missing)")
    meta = json.loads((folder / "sweep.json").read_text())
    records = []
    missing = []
    for cell in meta["cells"]:
        path = folder / "cells" / f"{cell_key(cell)}.json"
        if not path.exists():
            missing.append(cell)
            continue
        for row in json.loads(path.read_text())["rows"]:
            records.append({**cell, **dict(zip(COLUMNS, row))})
    if missing:
        raise ConfigError(f"{len(missing)} cells of {folder} are not finished (first: "
                          f"{missing[0]}); rerun sweep.run to complete them")
    return pd.DataFrame.from_records(records, columns=[*meta["axes"], *COLUMNS])
