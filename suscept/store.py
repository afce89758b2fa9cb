"""A crash-safe on-disk record of every draw (zarr v3), and estimators that read it blockwise.

Pass a :class:`DrawStore` to :func:`suscept.sample` (``store=``): each finished block of
draws of each chain is written to disk with a checkpoint of the chain, and a later call with
the same settings continues every chain from its last checkpoint. Layout of the folder::

    draws.zarr/               zarr v3 group; one array per observable ``[chain, draw, *shape]``
                              (dimension names ``chain``, ``draw`` and the observable's own),
                              ``anchor_NAME`` arrays ``[*shape]`` (values at w*), attributes:
                              format, meta hash, sampler config, shapes, block lengths, coords
    progress/chain{c}.json    the commit record of chain c (sealed with its own checksum):
                              draws committed, status, checkpoint name and checksum, one
                              checksum per committed block per observable, checksums of the
                              metadata files of ``draws.zarr`` (the layout)
    state/chain{c}-{k}-{s}.pt the chain's checkpoint after k draws (next step s)
    writer.lock               the writer's lock (pid, host, start time of the holder)

Draws are stored as float32 (float64 for float64 or integer observables), whatever the
model's dtype: a bf16 or fp16 model stores exact float32 values. A value that is not finite
in that dtype is refused, never stored.

Commit protocol for one block of chain ``c`` (draws ``start .. start + L - 1``), run by the
one process that holds ``writer.lock`` (:func:`suscept.sample` takes it when it starts and
drops it when it returns or raises; the kernel drops it when the process dies):

1. the draws are written into the arrays (zarr writes every chunk file to a uniquely named
   temporary file and renames it, so a chunk is never torn; committed draws sharing the
   chunk are rewritten with their own values);
2. the checkpoint (weights, preconditioner, generator states, minibatch position, traces and
   the block moments, see :func:`suscept.sample`) goes to a uniquely named temporary file,
   then ``os.replace`` puts it in place;
3. ``progress/chain{c}.json`` is replaced the same way: **this is the commit**;
4. the previous checkpoint is deleted.

Killed before 3, the record still names the previous checkpoint, whose draws are all on disk:
the block is sampled again from there and rewrites the same values. Killed after 3, the block
is committed. So a resumed run loses no committed draw, duplicates none (a draw has one slot),
and, chains being deterministic functions of their checkpoint, ends with the same draws and
moments as an uninterrupted run. Checkpointing (instead of re-running a chain from w*) costs
one weight vector per chain on disk and saves all the sampling done before the interruption.

Every reader checks what it uses against the records: the layout when the store is opened,
each checkpoint before it is loaded, each committed block of an observable (checksum and
finiteness) before its draws are used. A damaged, truncated, deleted or edited file is
refused with a :class:`~suscept.integrity.StoreError` naming it, never read as other numbers.

Estimators read the store blockwise (:meth:`DrawStore.moments`, :meth:`DrawStore.bif`):
segments of draws of one chain times blocks of columns, so memory is bounded by one column
block of the result, not by the number of draws times observables.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from suscept.errors import ConfigError
from suscept.integrity import (
    StoreError,
    StoreLockedError,
    array_digest,
    atomic_write,
    deferred_interrupt,
    digest,
    seal,
)
from suscept.store_read import FORMAT, StoreReader, _checkpoint_name

CHUNK_ELEMENTS = 1 << 20  # at most ~4 MB of float32 per chunk file


def config_hash(meta: dict) -> str:
    """A short hash of a JSON-able dict (key order does not matter)."""
    text = json.dumps(meta, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (uniquely named temporary file, ``os.replace``)."""
    atomic_write(path, json.dumps(data, indent=1, default=str).encode())


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


class DrawStore(StoreReader):
    """The draws of one run on disk, written while sampling (see the module docstring).

    Args:
        path: the store's folder (created if missing).
        meta: JSON-able description of what is sampled (model, data, observables...); its hash
            is kept, and a store written under another ``meta`` or sampler config is refused.
            Put content hashes of the inputs here (:func:`suscept.integrity.file_digest`) to
            refuse a resume whose inputs changed.
        dims: observable name -> names of its own axes (default ``NAME_0, NAME_1, ...``).
        coords: axis name -> labels (e.g. ``{"component": ["L0H0", ...]}``) for ``to_xarray``.
        resume: continue chains that the store already holds; without it a store with
            committed draws is refused.
        rank, barrier: under torch.distributed, rank 0 creates the arrays and holds the
            writer lock; every rank waits at ``barrier()`` before writing its own chains and
            in :meth:`close`.

    Writing (:meth:`prepare`, called by :func:`suscept.sample`) takes the store's writer
    lock; a second writer gets :class:`~suscept.integrity.StoreLockedError` naming the holder.
    :meth:`close` (called by :func:`suscept.sample` when it returns or raises; also ``with
    DrawStore(...) as store``) releases it; the store stays readable.
    """

    def __init__(self, path: str | os.PathLike, *, meta: dict | None = None,
                 dims: dict[str, tuple[str, ...]] | None = None,
                 coords: dict[str, list] | None = None, resume: bool = False, rank: int = 0,
                 barrier: Callable[[], None] | None = None):
        super().__init__(Path(path))
        self.meta = json.loads(json.dumps(meta or {}, default=str))
        self.dims_given, self.coords = dict(dims or {}), dict(coords or {})
        self.resume, self.rank, self.barrier = resume, rank, barrier
        self._writing = False
        self._last: dict[int, str] = {}  # chain -> its current checkpoint file
        self._blocks: dict[int, list] = {}  # chain -> committed [start, stop, {name: sha}]

    # ---- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> DrawStore:
        """Open an existing store to read it (refused if it is not a complete store)."""
        store = cls(path)
        store._group = store._open_group(mode="r")
        store.meta = store.attrs["meta"]
        return store

    def __enter__(self) -> DrawStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop writing: wait for the other ranks (distributed), release the writer lock."""
        try:
            if self._writing and self.barrier is not None:
                self.barrier()
        finally:
            self._writing = False
            self._lock.release()

    def prepare(self, config: dict, shapes: dict, anchor_values: dict, bounds: list) -> None:
        """Take the writer lock, create the arrays or check that the existing store was
        written by the same run, and clean what killed writers left (temporary files,
        uncommitted checkpoints)."""
        fingerprint = {"meta_hash": config_hash(self.meta), "meta": self.meta,
                       "config": json.loads(json.dumps(config)),
                       "shapes": {k: list(v) for k, v in shapes.items()}, "bounds": list(bounds)}
        try:
            with self._os_errors():
                self._prepare(fingerprint, anchor_values, config["n_chains"], sum(bounds))
        except BaseException:
            self._lock.release()
            raise
        self._writing = True

    @contextmanager
    def _os_errors(self):
        """An operating-system error while writing (full disk, no permission) as a
        :class:`StoreError`; the store stays as it was after its last commit."""
        try:
            yield
        except OSError as e:
            raise StoreError(f"cannot write the draw store {self.path}: {e.strerror or e} "
                             f"({e.filename}); free disk space or fix permissions, then "
                             "resume") from e

    def _prepare(self, fingerprint: dict, anchor_values: dict, n_chains: int,
                 n_draws: int) -> None:
        if self.rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(f"the draw store {self.path}")
            self._remove_temporaries()
            if not (self.zarr_path / "zarr.json").exists():
                self._create(fingerprint, anchor_values, n_chains, n_draws)
        if self.barrier is not None:
            self.barrier()
        self._group = self._open_group()
        self._check_fingerprint(fingerprint)
        if self.rank == 0:
            self._remove_orphans()
        if self.barrier is not None:  # every rank has checked before any rank writes
            self.barrier()

    def _check_fingerprint(self, fingerprint: dict) -> None:
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

    def _remove_temporaries(self) -> None:
        """Temporary files of killed writers (only under the writer lock)."""
        for p in self.path.glob("draws.zarr.*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        for sub in ("progress", "state"):
            for p in (self.path / sub).glob("*.tmp"):
                p.unlink(missing_ok=True)

    def _remove_orphans(self) -> None:
        """Checkpoints that no commit record names (superseded, or written by a writer killed
        before its commit); only under the writer lock."""
        named = {r["checkpoint"] for r in self.progress().values()}
        for p in (self.path / "state").glob("chain*.pt"):
            if p.name not in named:
                p.unlink(missing_ok=True)

    def _create(self, fingerprint: dict, anchor_values: dict, n_chains: int,
                n_draws: int) -> None:
        """Build the group in a temporary folder and rename it into place (atomic)."""
        import zarr

        if self.zarr_path.exists():
            raise StoreError(f"{self.zarr_path} exists but has no zarr.json: an incomplete "
                             "store; delete it or use a new folder")
        tmp = self.path / f"draws.zarr.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            self._build(zarr.open_group(tmp, mode="w", zarr_format=3), fingerprint,
                        anchor_values, n_chains, n_draws)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for sub in ("progress", "state"):
            (self.path / sub).mkdir(exist_ok=True)
        os.rename(tmp, self.zarr_path)

    def _build(self, group, fingerprint: dict, anchor_values: dict, n_chains: int,
               n_draws: int) -> None:
        dims, draw_chunk = {}, max(fingerprint["bounds"])
        for name, value in anchor_values.items():
            v = _as_stored(name, value, "its value at w*")
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

    # ---- the recorder protocol of suscept.sample -----------------------------------------
    def restore(self, chain: int) -> dict | None:
        """The chain's last checkpoint (verified: its checksum, and every committed block of
        every observable of the chain), or None for a chain with no commit."""
        rec = self.progress().get(chain)
        if rec is None:
            self._blocks[chain] = []
            return None
        saved = self._load_checkpoint(rec)
        for name in self.names:
            self._verify(name, chain, rec)
        self._last[chain], self._blocks[chain] = rec["checkpoint"], rec["blocks"]
        return saved

    def commit(self, chain: int, start: int, values: dict | None, checkpoint: dict) -> None:
        """Record draws ``start .. start + L - 1`` of ``chain`` (``values[name]`` ``[L,
        *shape]``, cast to the stored dtype and refused unless finite) and the checkpoint."""
        if not self._writing:
            raise StoreError(f"the draw store {self.path} is not open for writing (call "
                             "prepare first; a closed store is read-only)")
        blocks = list(self._blocks.get(chain, []))
        if start != (blocks[-1][1] if blocks else 0):
            raise StoreError(f"chain {chain}: a commit must start at draw "
                             f"{blocks[-1][1] if blocks else 0}, not {start}")
        arrays = self._stored_block(chain, start, values) if values else {}
        if arrays:
            stop = start + len(arrays[self.names[0]])
            blocks.append([start, stop, {n: array_digest(x) for n, x in arrays.items()}])
        k = checkpoint["draw"]
        if k != (blocks[-1][1] if blocks else 0):
            raise StoreError(f"chain {chain}: the checkpoint is at draw {k}, the committed "
                             f"draws end at {blocks[-1][1] if blocks else 0}")
        name = _checkpoint_name(chain, k, checkpoint["step"])
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        status = ("diverged" if checkpoint["divergence"] else "done") if checkpoint["done"] \
            else "running"
        record = seal({"chain": chain, "draws": k, "step": checkpoint["step"], "status": status,
                       "checkpoint": name, "checkpoint_sha": digest(buf.getvalue()),
                       "meta_hash": config_hash(self.meta), "layout": self._layout,
                       "blocks": blocks})
        with self._os_errors(), deferred_interrupt():  # Ctrl-C waits for the commit
            for n, x in arrays.items():
                self._group[n][chain, start:start + len(x)] = x
            atomic_write(self.path / "state" / name, buf.getvalue())
            write_json(self.path / "progress" / f"chain{chain}.json", record)  # the commit
            self._blocks[chain] = blocks
            old, self._last[chain] = self._last.get(chain), name
            if old is not None and old != name:
                (self.path / "state" / old).unlink(missing_ok=True)

    def _stored_block(self, chain: int, start: int, values: dict) -> dict[str, np.ndarray]:
        """``values`` as stored (float32 or wider), refused unless complete and finite."""
        if sorted(values) != sorted(self.names) or len({len(v) for v in values.values()}) > 1:
            raise StoreError(f"chain {chain}: a commit needs draws of equal length for "
                             f"exactly {self.names}; got {sorted(values)}")
        return {name: _as_stored(name, values[name], f"chain {chain} draws from {start}",
                                 self._group[name].dtype) for name in self.names}

def _as_stored(name: str, value, what: str, dtype: np.dtype | None = None) -> np.ndarray:
    """``value`` as the store keeps it: float64 for float64 and integer values, float32 for
    every other dtype (bf16/fp16 exactly), or ``dtype``; refused unless all finite."""
    t = torch.as_tensor(value).detach().cpu()
    if t.is_complex():
        raise ConfigError(f"observable {name!r} is complex; the store keeps real values")
    if dtype is None:
        dtype = np.float64 if t.dtype == torch.float64 or not t.is_floating_point() \
            else np.float32
    x = t.double().numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(dtype, copy=False)
    if not np.isfinite(x).all():
        raise StoreError(f"observable {name!r}, {what}: {int((~np.isfinite(x)).sum())} "
                         f"values are not finite as {np.dtype(dtype).name} (NaN, inf or out "
                         "of its range); they are not stored (a sampler stops such chains "
                         "as diverged before committing them)")
    return x


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


__all__ = ["DrawStore", "StoreError", "StoreLockedError", "config_hash", "differing_keys",
           "write_json"]
