"""Estimates as tables and labelled arrays: long-form pandas, xarray, and the top couplings.

Coordinates live in ``Estimate.meta["coords"]``: ``{dim: labels}`` (a list, one label per
element of that dim, e.g. ``{"component": ["L0H0", "L0H1"]}``) or ``{dim: {name: values}}``
(several per-element coordinates, e.g. the token dim's ``token_str``, ``position``,
``sequence``, ``document``). A dim without coordinates is labelled by its integer index; a
``component`` dim without coordinates falls back to ``meta["components"]``.

Long form (:func:`to_dataframe`): one row per element, a column per dim (its label, or its
index when its coordinates are a dict; a repeated dim's second axis is named ``DIM_2``, as the
loss kernel's ``sample, sample_2``), a column per extra coordinate (prefixed ``AXIS_`` when two
axes carry the same name, e.g. a BIF's ``sample_sequence``, ``observable_sequence``), then
``value``, ``stderr`` and ``z = value / stderr`` (how many standard errors from zero;
``inf``/``nan`` where ``stderr`` is 0). The sign and scale of ``value`` are the estimate's own
(``Estimate.convention``; ``docs/theory.md`` section 3 and 5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from suscept.errors import ConfigError, ShapeError


def _labels(dim: str, size: int, raw) -> dict[str, list]:
    """``{coordinate name: values}`` for one dim, each a plain list of length ``size``."""
    out = dict(raw) if isinstance(raw, dict) else {dim: raw}
    for name, values in out.items():
        values = out[name] = values.tolist() if hasattr(values, "tolist") else list(values)
        if len(values) != size:
            raise ShapeError(f"coordinate {name!r} of dim {dim!r} has {len(values)} values; the "
                             f"dim has {size} elements")
    return out


def coords_of(est) -> dict[str, dict[str, list]]:
    """Every dim's coordinates ``{dim: {name: values}}`` (empty dict: index only)."""
    given = dict(est.meta.get("coords") or {})
    if "component" in est.dims and "component" not in given and est.meta.get("components"):
        given["component"] = list(est.meta["components"])
    unknown = sorted(set(given) - set(est.dims))
    if unknown:
        raise ShapeError(f"{est.name}: coordinates for {unknown}, which are not dims {est.dims}")
    return {d: _labels(d, n, given[d]) if d in given else {}
            for d, n in zip(est.dims, est.shape)}


def _axes(est) -> list[tuple[str, list | None, dict[str, list]]]:
    """Per axis: a unique name (a repeated dim's second axis is ``DIM_2``), its labels (None:
    the index) and its other coordinates, a name found on two axes prefixed ``AXIS_`` (e.g. a
    BIF's ``sample_sequence`` and ``observable_sequence``)."""
    coords = coords_of(est)
    names = [d if est.dims[:i].count(d) == 0 else f"{d}_{est.dims[:i].count(d) + 1}"
             for i, d in enumerate(est.dims)]
    extra = [n for d in est.dims for n in coords[d] if n != d]
    out = []
    for axis, dim in zip(names, est.dims):
        other = {(f"{axis}_{n}" if extra.count(n) > 1 else n): v
                 for n, v in coords[dim].items() if n != dim}
        bad = set(other) & ({*names, "value", "stderr", "z"})
        if bad:
            raise ShapeError(f"{est.name}: coordinate names {sorted(bad)} clash with a dim or "
                             "with value/stderr/z; rename them")
        out.append((axis, coords[dim].get(dim), other))
    return out


def with_coords(est, **coords):
    """A copy of ``est`` whose ``meta["coords"]`` also holds ``coords`` (checked for length)."""
    from dataclasses import replace

    merged = dict(est.meta.get("coords") or {})
    for dim, raw in coords.items():
        if dim not in est.dims:
            raise ShapeError(f"{est.name}: no dim {dim!r} to label; dims are {est.dims}")
        labels = _labels(dim, est.shape[est.dims.index(dim)], raw)
        merged[dim] = labels if isinstance(raw, dict) else labels[dim]
    return replace(est, meta={**est.meta, "coords": merged})


def _columns(est) -> dict[str, np.ndarray]:
    """The long form as columns (one entry per element, C order)."""
    index = np.indices(est.shape).reshape(len(est.shape), -1) if est.shape else np.zeros((0, 1))
    cols: dict[str, np.ndarray] = {}
    for axis, (name, labels, other) in enumerate(_axes(est)):
        idx = index[axis].astype(np.int64)
        cols[name] = idx if labels is None else np.asarray(labels, dtype=object)[idx]
        cols.update({k: np.asarray(v)[idx] for k, v in other.items()})
    value = est.value.detach().double().cpu().numpy().reshape(-1)
    stderr = est.stderr.detach().double().cpu().numpy().reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = value / stderr
    cols.update(value=value, stderr=stderr, z=z)
    return cols


def to_dataframe(est):
    """Long form: one row per element; dims and coordinates as columns, then value, stderr,
    z. Shapes: ``prod(est.shape)`` rows (1 for a scalar)."""
    import pandas as pd

    return pd.DataFrame(_columns(est))


def to_xarray(est):
    """An ``xarray.Dataset`` with variables ``value``, ``stderr``, ``z`` over ``est.dims``;
    dim coordinates are the labels (or indices), extra coordinates ride along their dim;
    ``attrs`` hold name, convention and meta. Needs the ``xarray`` extra."""
    try:
        import xarray as xr
    except ImportError as e:
        raise ConfigError("to_xarray needs xarray: pip install 'suscept[xarray]'") from e
    import json

    value = est.value.detach().double().cpu().numpy()
    stderr = est.stderr.detach().double().cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        z = value / stderr
    coords, dims = {}, []
    for (name, labels, other), n in zip(_axes(est), est.shape):
        dims.append(name)
        coords[name] = np.arange(n) if labels is None else labels
        coords.update({k: (name, v) for k, v in other.items()})
    attrs = {"name": est.name, "convention": est.convention,
             "meta": json.dumps({k: v for k, v in est.meta.items() if k != "coords"})}
    return xr.Dataset({k: (tuple(dims), v) for k, v in (("value", value), ("stderr", stderr),
                                                      ("z", z))}, coords=coords, attrs=attrs)


def top(est, n: int = 50, by: str = "z"):
    """The ``n`` elements largest in ``|z|`` (``by="z"``) or ``|value|`` (``by="value"``),
    long form, with a ``rank`` column (1 = largest)."""
    if by not in ("z", "value"):
        raise ConfigError(f"top(by={by!r}): rank by 'z' or 'value'")
    df = to_dataframe(est)
    key = df[by].abs().fillna(-1.0)  # NaN (zero stderr and value) ranks last
    df = df.loc[key.sort_values(ascending=False, kind="stable").index[:n]]
    return df.reset_index(drop=True).rename_axis("rank").reset_index().assign(
        rank=lambda d: d["rank"] + 1)


def write_top_couplings(folder: str | Path, estimates: dict, n: int = 200) -> list[Path]:
    """Write ``top_NAME.csv`` (:func:`top` by ``|z|``) into ``folder`` for every estimate with
    at least two dims (susceptibility, bif, loss kernel); returns the paths written."""
    paths = []
    for name, est in estimates.items():
        if est.value.ndim >= 2:
            path = Path(folder) / f"top_{name}.csv"
            top(est, n).to_csv(path, index=False, na_rep="nan")
            paths.append(path)
    return paths
