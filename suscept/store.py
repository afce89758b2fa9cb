"""A crash-safe on-disk record of every draw (zarr v3), and estimators that read it blockwise.

Pass a :class:`DrawStore` to :func:`suscept.sample` (``store=``): each finished block of
draws of each chain is written to disk with a checkpoint of the chain, and a later call with
the same settings continues every chain from its last checkpoint. Layout of the folder::

    draws.zarr/               zarr v3 group; one array per observable ``[chain, draw, *shape]``
                              (dimension names ``chain``, ``draw`` and the observable's own),
                              ``anchor_NAME`` arrays ``[*shape]`` (values at w*), attributes:
                              format, meta hash, sampler config, shapes, block lengths, coords
    progress/chain{c}.json    the commit record of chain c: draws committed, checkpoint, status
    state/chain{c}-{k}.pt     the chain's checkpoint after its k-th commit

Commit protocol for one block of chain ``c`` (draws ``start .. start + L - 1``):

1. the draws are written into the arrays (zarr writes every chunk file to a temporary file
   and renames it, so a chunk is never torn; committed draws sharing the chunk are rewritten
   with their own values);
2. the checkpoint (weights, preconditioner, generator states, minibatch position, traces and
   the block moments, see :func:`suscept.sample`) goes to a temporary file, then
   ``os.replace`` puts it in place;
3. ``progress/chain{c}.json`` is replaced the same way: **this is the commit**;
4. the previous checkpoint is deleted.

Killed before 3, the record still names the previous checkpoint, whose draws are all on disk:
the block is sampled again from there and rewrites the same values. Killed after 3, the block
is committed. So a resumed run loses no committed draw, duplicates none (a draw has one slot),
and, chains being deterministic functions of their checkpoint, ends with the same draws and
moments as an uninterrupted run. Checkpointing (instead of re-running a chain from w*) costs
one weight vector per chain on disk and saves all the sampling done before the interruption.

Estimators read the store blockwise (:meth:`DrawStore.moments`, :meth:`DrawStore.bif`):
segments of draws of one chain times blocks of columns, so memory is bounded by one column
block of the result, not by the number of draws times observables.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.moments import Moments

FORMAT = "suscept-draws-1"
CHUNK_ELEMENTS = 1 << 20  # at most ~4 MB of float32 per chunk file


def config_hash(meta: dict) -> str:
    """A short hash of a JSON-able dict (key order does not matter)."""
    text = json.dumps(meta, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, then ``os.replace``)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


class DrawStore:
    """The draws of one run on disk, written while sampling (see the module docstring).

    Args:
        path: the store's folder (created if missing).
        meta: JSON-able description of what is sampled (model, data, observables...); its hash
            is kept, and a store written under another ``meta`` or sampler config is refused.
        dims: observable name -> names of its own axes (default ``NAME_0, NAME_1, ...``).
        coords: axis name -> labels (e.g. ``{"component": ["L0H0", ...]}``) for ``to_xarray``.
        resume: continue chains that the store already holds; without it a store with
            committed draws is refused.
        rank, barrier: under torch.distributed, rank 0 creates the arrays and every rank waits
            at ``barrier()`` before writing its own chains.
    """

    def __init__(self, path: str | os.PathLike, *, meta: dict | None = None,
                 dims: dict[str, tuple[str, ...]] | None = None,
                 coords: dict[str, list] | None = None, resume: bool = False, rank: int = 0,
                 barrier: Callable[[], None] | None = None):
        self.path = Path(path)
        self.meta = json.loads(json.dumps(meta or {}, default=str))
        self.dims_given, self.coords = dict(dims or {}), dict(coords or {})
        self.resume, self.rank, self.barrier = resume, rank, barrier
        self._group = None
        self._last: dict[int, str] = {}  # chain -> its current checkpoint file

    # ---- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> DrawStore:
        """Open an existing store to read it (refused if it is not a complete store)."""
        store = cls(path)
        store._group = store._open_group()
        store.meta = store.attrs["meta"]
        return store

    @property
    def zarr_path(self) -> Path:
        return self.path / "draws.zarr"

    def _open_group(self):
        import zarr

        if not (self.zarr_path / "zarr.json").exists():
            raise ConfigError(f"{self.path} holds no draw store (draws.zarr/zarr.json missing)")
        try:
            group = zarr.open_group(self.zarr_path, mode="r+", zarr_format=3)
            attrs = dict(group.attrs)
        except Exception as e:  # unreadable metadata
            raise ConfigError(f"the draw store {self.path} is corrupt ({e}); delete the folder "
                              "or sample into a new one") from e
        if attrs.get("format") != FORMAT:
            raise ConfigError(f"{self.path} is not a suscept draw store of format {FORMAT} "
                              f"(found {attrs.get('format')!r}); use a new folder")
        for name in attrs["names"]:
            if name not in group or f"anchor_{name}" not in group:
                raise ConfigError(f"the draw store {self.path} is corrupt: array {name!r} is "
                                  "missing; delete the folder or sample into a new one")
        return group

    @property
    def attrs(self) -> dict:
        return dict(self._group.attrs)

    def prepare(self, config: dict, shapes: dict, anchor_values: dict, bounds: list) -> None:
        """Create the arrays, or check that the existing store was written by the same run."""
        fingerprint = {"meta_hash": config_hash(self.meta), "meta": self.meta,
                       "config": json.loads(json.dumps(config)),
                       "shapes": {k: list(v) for k, v in shapes.items()}, "bounds": list(bounds)}
        if self.rank == 0 and not (self.zarr_path / "zarr.json").exists():
            self._create(fingerprint, anchor_values, config["n_chains"], sum(bounds))
        if self.barrier is not None:
            self.barrier()
        self._group = self._open_group()
        old = {k: self.attrs.get(k) for k in fingerprint}
        if old != fingerprint:
            keys = differing_keys(old, fingerprint)
            raise ConfigError(f"the draw store {self.path} was written by a different run "
                              f"(meta hash {old['meta_hash']} vs {fingerprint['meta_hash']}); "
                              f"differing settings: {keys}. Use a new folder, or the old "
                              "settings to resume.")
        done = {c: r["draws"] for c, r in self.progress().items() if r["draws"]}
        if done and not self.resume:
            raise ConfigError(f"the draw store {self.path} already holds committed draws "
                              f"(chain: draws {done}); pass resume=True (suscept run --resume) "
                              "to continue it, or use a new folder")
        if self.barrier is not None:  # every rank has checked before any rank writes
            self.barrier()

    def _create(self, fingerprint: dict, anchor_values: dict, n_chains: int,
                n_draws: int) -> None:
        import zarr

        self.path.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(self.zarr_path, mode="w", zarr_format=3)
        dims, draw_chunk = {}, max(fingerprint["bounds"])
        for name, value in anchor_values.items():
            v = _numpy(value)
            dims[name] = list(self.dims_given.get(name, [f"{name}_{i}" for i in
                                                         range(v.ndim)]))
            if len(dims[name]) != v.ndim:
                raise ConfigError(f"dims[{name!r}] = {dims[name]} but the observable has "
                                  f"shape {v.shape}")
            arr = group.create_array(name, shape=(n_chains, n_draws, *v.shape), dtype=v.dtype,
                                     chunks=_chunks(draw_chunk, v.shape), fill_value=np.nan,
                                     compressors=None, dimension_names=["chain", "draw",
                                                                        *dims[name]])
            arr.attrs["observable"] = name
            anchor = group.create_array(f"anchor_{name}", shape=v.shape, dtype=v.dtype,
                                        compressors=None, dimension_names=dims[name])
            anchor[...] = v
        group.attrs.update(format=FORMAT, names=list(anchor_values), dims=dims,
                           coords=self.coords, n_chains=n_chains, n_draws=n_draws,
                           **fingerprint)
        for sub in ("progress", "state"):
            (self.path / sub).mkdir(exist_ok=True)

    # ---- the recorder protocol of suscept.sample -----------------------------------------
    def progress(self) -> dict[int, dict]:
        """chain -> its commit record ``{"draws", "checkpoint", "status", ...}``."""
        out = {}
        for f in sorted((self.path / "progress").glob("chain*.json")):
            try:
                rec = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"commit record {f} is corrupt ({e}); delete the store") from e
            out[rec["chain"]] = rec
        return out

    def restore(self, chain: int) -> dict | None:
        rec = self.progress().get(chain)
        if rec is None:
            return None
        path = self.path / "state" / rec["checkpoint"]
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as e:
            raise ConfigError(f"checkpoint {path} of chain {chain} is missing or corrupt ({e}); "
                              "delete the store and sample again") from e
        if saved["chain"] != chain or saved["draw"] != rec["draws"]:
            raise ConfigError(f"checkpoint {path} does not match the commit record of chain "
                              f"{chain} ({saved['draw']} vs {rec['draws']} draws): corrupt store")
        self._last[chain] = rec["checkpoint"]
        return saved

    def read(self, name: str, chain: int, k: int) -> Tensor:
        return torch.from_numpy(np.asarray(self._group[name][chain, :k]))

    def commit(self, chain: int, start: int, values: dict | None, checkpoint: dict) -> None:
        if values:
            for name, v in values.items():
                self._group[name][chain, start:start + len(v)] = _numpy(v)
        k = checkpoint["draw"]
        name = f"chain{chain}-{k:07d}.pt"
        tmp = self.path / "state" / (name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, self.path / "state" / name)
        status = ("diverged" if checkpoint["divergence"] else "done") if checkpoint["done"] \
            else "running"
        write_json(self.path / "progress" / f"chain{chain}.json",
                   {"chain": chain, "draws": k, "step": checkpoint["step"],
                    "checkpoint": name, "status": status,
                    "meta_hash": config_hash(self.meta)})
        old = self._last.get(chain)
        if old is not None and old != name:
            (self.path / "state" / old).unlink(missing_ok=True)
        self._last[chain] = name

    # ---- reading -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.attrs["names"])

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name)
        return tuple(self.attrs["shapes"][name])

    def _check_name(self, name: str) -> None:
        if name not in self.attrs["names"]:
            raise ConfigError(f"the store has no observable {name!r}; it has {self.names}")

    def anchor(self, name: str) -> Tensor:
        """The observable's value at w*, ``[*shape]``."""
        self._check_name(name)
        return torch.from_numpy(np.asarray(self._group[f"anchor_{name}"][...]))

    def chains(self) -> list[int]:
        """Chains that finished without diverging (those the estimators use)."""
        prog = self.progress()
        n = self.attrs["n_chains"]
        unfinished = [c for c in range(n) if prog.get(c, {}).get("status") not in
                      ("done", "diverged")]
        if unfinished:
            raise ConfigError(f"chains {unfinished} of the store {self.path} are unfinished; "
                              "resume the run (suscept run --resume) before estimating")
        return [c for c in range(n) if prog[c]["status"] == "done"]

    def draws(self, name: str) -> Tensor:
        """All draws of ``name``, ``[chain, draw, *shape]`` (loads them: small observables)."""
        self._check_name(name)
        return torch.from_numpy(np.asarray(self._group[name][...]))

    def segments(self, name: str, n_blocks: int | None = None,
                 cols: slice = slice(None)) -> Iterator[Tensor]:
        """Blocks of consecutive draws ``[L, k]`` (``k`` = flattened columns ``cols`` of the
        observable's last axis) of every finished chain, in the order of
        :func:`suscept.estimators.segments`: chain by chain, ``n_blocks`` per chain (default:
        the sampler's blocks, the segments of the run's streamed moments)."""
        self._check_name(name)
        chains, n_draws = self.chains(), self.attrs["n_draws"]
        if not chains:
            raise ConfigError("every chain of the store diverged; nothing to estimate from")
        n_blocks = n_blocks or len(self.attrs["bounds"])
        if not 1 <= n_blocks <= n_draws:
            raise ConfigError(f"n_blocks={n_blocks} must be between 1 and {n_draws}")
        arr = self._group[name]
        index = (slice(None),) * (arr.ndim - 3) + (cols,) if arr.ndim > 2 else ()
        for c in chains:
            for blk in torch.tensor_split(torch.arange(n_draws), n_blocks):
                lo, hi = int(blk[0]), int(blk[-1]) + 1
                x = torch.from_numpy(np.asarray(arr[(c, slice(lo, hi), *index)]))
                yield x.reshape(hi - lo, -1)

    def moments(self, x: str, y: str | None = None, *, cols: slice = slice(None),
                n_blocks: int | None = None, third: bool = False) -> Moments:
        """Segment moments of ``x`` against columns ``cols`` of ``y``'s last axis (default
        ``x``), read one segment at a time; same segments as the in-memory estimators."""
        xs = self.segments(x, n_blocks)
        ys = self.segments(y, n_blocks, cols) if y is not None else itertools.repeat(None)
        return Moments.cat([Moments.from_draws(a, b, third=third) for a, b in zip(xs, ys)])

    def bif(self, losses: str, observables: str, *, scale: str = "raw",
            beta: float | None = None, n_blocks: int | None = None, col_block: int = 4096,
            progress: bool = False) -> Estimate:
        """:func:`suscept.bif` of stored ``losses`` ``[n]`` against stored ``observables``,
        computed ``col_block`` entries of the observable's last axis at a time.

        Same convention as :func:`suscept.bif` (raw ``-Cov(l_j, O_q)``, ...). Dims
        ``("sample", "observable")``, shape ``[n, Q]`` with ``Q`` the observable flattened.
        Peak memory is about ``n_segments * n * col_block`` float64 plus one segment's draws.
        """
        from tqdm.auto import tqdm

        from suscept.estimators import bif

        shape = self.shape(observables)
        last = shape[-1] if shape else 1
        if col_block < 1:
            raise ConfigError(f"col_block={col_block} must be >= 1")
        values, errors, meta = [], [], {}
        starts = range(0, last, col_block)
        for lo in tqdm(starts, disable=not progress, desc="bif column blocks"):
            cols = slice(lo, min(lo + col_block, last))
            m = self.moments(losses, observables, cols=cols, n_blocks=n_blocks)
            est = bif(m, scale=scale, beta=beta)
            n = est.value.shape[0]
            values.append(est.value.reshape(n, *shape[:-1], -1))
            errors.append(est.stderr.reshape(n, *shape[:-1], -1))
            meta = est.meta
        value = torch.cat(values, -1).reshape(len(values[0]), -1)
        stderr = torch.cat(errors, -1).reshape(len(values[0]), -1)
        meta = dict(meta, col_block=col_block, source=str(self.path))
        return Estimate(value, stderr, ("sample", "observable"), "bif", est.convention, meta)

    def to_xarray(self):
        """The store as an ``xarray.Dataset`` (lazy; needs the ``xarray`` extra): one variable
        per observable with dims ``(chain, draw, ...)``, ``anchor_NAME`` variables, coords
        from ``coords``, the run's attributes, and ``committed`` ``[chain]`` draws per chain
        (draws past it are NaN or not yet final)."""
        try:
            import xarray as xr
        except ImportError as e:
            raise ConfigError("to_xarray needs xarray: pip install 'suscept[xarray]'") from e
        ds = xr.open_zarr(self.zarr_path, consolidated=False, zarr_format=3)
        attrs = self.attrs
        coords = {"chain": np.arange(attrs["n_chains"]), "draw": np.arange(attrs["n_draws"])}
        for dim, labels in attrs.get("coords", {}).items():
            if dim in ds.dims and len(labels) == ds.sizes[dim]:
                coords[dim] = list(labels)
        prog = self.progress()
        committed = [prog.get(c, {}).get("draws", 0) for c in range(attrs["n_chains"])]
        ds = ds.assign_coords(coords).assign(committed=("chain", committed))
        ds.attrs = {"meta_hash": attrs["meta_hash"], "names": attrs["names"],
                    "config": json.dumps(attrs["config"]), "meta": json.dumps(attrs["meta"])}
        return ds


def _numpy(v) -> np.ndarray:
    t = torch.as_tensor(v).detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()  # exact; numpy has no bfloat16
    return t.numpy()


def _chunks(draw_chunk: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``(1, draw_chunk, *trailing)``, halving the largest trailing chunk until a chunk holds
    at most ``CHUNK_ELEMENTS`` values."""
    trailing = [max(1, s) for s in shape]
    while trailing and draw_chunk * math.prod(trailing) > CHUNK_ELEMENTS:
        i = int(np.argmax(trailing))
        if trailing[i] == 1:
            break
        trailing[i] = math.ceil(trailing[i] / 2)
    return (1, draw_chunk, *trailing)


__all__ = ["DrawStore", "config_hash", "differing_keys", "write_json"]
