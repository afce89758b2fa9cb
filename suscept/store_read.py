"""Reading a draw store: its checked commit records and the blockwise estimators.

:class:`StoreReader` is the read side of :class:`suscept.store.DrawStore` (the layout and the
commit protocol are described in :mod:`suscept.store`). Nothing is used before it is checked:

- opening checks the metadata files of ``draws.zarr`` (every ``zarr.json`` and the anchor
  chunks) against the checksums in the commit records, and each record against its own
  checksum and the store's attributes (block bounds, draw count, status, checkpoint name
  confined to ``state/``);
- a checkpoint is loaded only if its bytes match the record's checksum;
- the committed draws of an observable are used only once every committed block of it (in
  the chains read) matches its checksum and is finite.

Anything else raises :class:`~suscept.integrity.StoreError` naming the file or the draws.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.integrity import (
    StoreError,
    WriterLock,
    array_hasher,
    confined,
    confined_relative,
    digest,
    feed,
    file_digest,
    unseal,
)
from suscept.moments import Moments

FORMAT = "suscept-draws-2"
STATUSES = ("running", "done", "diverged")
VERIFY_ELEMENTS = 1 << 20  # values read at once when verifying (4 MB of float32)
DAMAGED = "the store is damaged: sample again into a new folder"


class StoreReader:
    """The checked read side of a draw store in folder ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._group, self._attrs, self._layout = None, None, None
        self._lock = WriterLock(self.path / "writer.lock")
        self._verified: dict[tuple[str, int], int] = {}  # (name, chain) -> blocks verified

    def holder(self) -> str | None:
        """The other writer that holds this store now (``"pid P on HOST since T"``) or None."""
        return self._lock.holder()

    @property
    def zarr_path(self) -> Path:
        return self.path / "draws.zarr"

    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    def _open_group(self, mode: str = "r+"):
        """Open the zarr group after checking its metadata files against the commit records."""
        import zarr

        if not (self.zarr_path / "zarr.json").exists():
            raise StoreError(f"{self.path} holds no draw store (draws.zarr/zarr.json missing)")
        records = self.progress(check=False)
        if records:
            self._check_layout(records)
        try:
            group = zarr.open_group(self.zarr_path, mode=mode, zarr_format=3)
            attrs = dict(group.attrs)
            if attrs.get("format") != FORMAT:
                raise StoreError(f"{self.path} is not a suscept draw store of format {FORMAT} "
                                 f"(found {attrs.get('format')!r}); use a new folder")
            for name in attrs["names"]:
                if group[name].shape != (attrs["n_chains"], attrs["n_draws"],
                                         *attrs["shapes"][name]):
                    raise StoreError(f"array {name!r} of {self.path} does not have the shape "
                                     f"its attributes give; {DAMAGED}")
                group[f"anchor_{name}"]
        except StoreError:
            raise
        except Exception as e:  # unreadable or inconsistent metadata
            raise StoreError(f"the draw store {self.path} is corrupt ({e!r}); {DAMAGED}") from e
        self._group, self._attrs = group, attrs
        self._layout = records[min(records)]["layout"] if records else self._current_layout()
        self.progress()  # every record against the attributes
        return group

    def _current_layout(self) -> dict[str, str]:
        """Checksums of the files of ``draws.zarr`` that never change after creation: every
        ``zarr.json`` and the chunks of the ``anchor_*`` arrays."""
        root = self.zarr_path
        files = [root / "zarr.json"]
        for name in self._attrs["names"]:
            files += [root / name / "zarr.json",
                      *sorted(p for p in (root / f"anchor_{name}").rglob("*") if p.is_file())]
        return {p.relative_to(root).as_posix(): file_digest(p) for p in files}

    def _check_layout(self, records: dict[int, dict]) -> None:
        layouts = {json.dumps(r.get("layout"), sort_keys=True) for r in records.values()}
        if len(layouts) != 1 or not isinstance(records[min(records)].get("layout"), dict):
            raise StoreError(f"the commit records of {self.path} disagree on the store's "
                             f"layout; {DAMAGED}")
        for rel, sha in records[min(records)]["layout"].items():
            path = confined_relative(self.zarr_path, rel, "a commit record")
            if not path.is_file() or file_digest(path) != sha:
                raise StoreError(f"{path} is missing or fails its checksum (edited or "
                                 f"damaged); {DAMAGED}")

    # ---- commit records ------------------------------------------------------------------
    def progress(self, check: bool = True) -> dict[int, dict]:
        """chain -> its commit record ``{"draws", "status", "checkpoint", "blocks", ...}``,
        each verified against its own checksum and (``check``) the store's attributes."""
        if check and self._attrs is None:
            self._group = self._open_group(mode="r")  # records are checked against it
        out = {}
        for f in sorted((self.path / "progress").glob("chain*.json")):
            m = re.fullmatch(r"chain(\d+)\.json", f.name)
            if m is None:
                continue
            rec = unseal(f.read_bytes(), f)
            if rec.get("chain") != int(m[1]):
                raise StoreError(f"commit record {f} names chain {rec.get('chain')!r}; {DAMAGED}")
            if check:
                self._check_record(rec, f)
            out[rec["chain"]] = rec
        return out

    def _check_record(self, rec: dict, f: Path) -> None:
        """A record's fields against the attributes: block bounds, draw count, status,
        checkpoint name (a file directly inside ``state/``)."""
        a = self._attrs
        c, k, blocks = rec.get("chain"), rec.get("draws"), rec.get("blocks")
        ends = np.cumsum([0, *a["bounds"]]).tolist()
        ok = (isinstance(c, int) and 0 <= c < a["n_chains"] and rec.get("status") in STATUSES
              and rec.get("meta_hash") == a["meta_hash"] and rec.get("layout") == self._layout
              and isinstance(blocks, list) and isinstance(k, int)
              and k == (blocks[-1][1] if blocks else 0))
        ok = ok and _blocks_ok(blocks, ends, a["names"], rec["status"] == "diverged")
        if ok and rec["status"] == "done":
            ok = k == a["n_draws"]
        if not ok:
            raise StoreError(f"commit record {f} does not match the store's attributes (draws, "
                             f"blocks, status or layout); {DAMAGED}")
        confined(self.path / "state", rec.get("checkpoint"), f"commit record {f}")
        if rec["checkpoint"] != _checkpoint_name(c, k, rec.get("step")):
            raise StoreError(f"commit record {f} names checkpoint {rec['checkpoint']!r}, not "
                             f"{_checkpoint_name(c, k, rec.get('step'))!r}; {DAMAGED}")

    def _load_checkpoint(self, rec: dict) -> dict:
        chain = rec["chain"]
        path = self.path / "state" / rec["checkpoint"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StoreError(f"checkpoint {path} of chain {chain} is missing ({e}); "
                             f"{DAMAGED}") from e
        if digest(data) != rec.get("checkpoint_sha"):
            raise StoreError(f"checkpoint {path} of chain {chain} fails its checksum (edited "
                             f"or damaged); {DAMAGED}")
        try:
            saved = torch.load(io.BytesIO(data), weights_only=True)
            same = (saved["chain"], saved["draw"], saved["step"]) == \
                (chain, rec["draws"], rec["step"])
        except Exception as e:
            raise StoreError(f"checkpoint {path} of chain {chain} is unreadable ({e!r}); "
                             f"{DAMAGED}") from e
        if not same:
            raise StoreError(f"checkpoint {path} does not match the commit record of chain "
                             f"{chain}; {DAMAGED}")
        return saved

    def _verify(self, name: str, chain: int, rec: dict) -> None:
        """Committed draws of ``name`` in ``chain``: present, finite, equal to their checksums.
        Read in slices of at most ``VERIFY_ELEMENTS`` values (whole rows), each block's
        checksum fed slice by slice: memory stays bounded whatever the block size."""
        todo = rec["blocks"][self._verified.get((name, chain), 0):]
        if not todo:
            return
        arr = self._group[name]
        step = max(1, VERIFY_ELEMENTS // max(1, math.prod(arr.shape[2:])))
        hashers = [array_hasher(arr.dtype, (b - a, *arr.shape[2:])) for a, b, _ in todo]
        i = 0  # the block being fed
        for r0 in range(todo[0][0], todo[-1][1], step):
            r1 = min(r0 + step, todo[-1][1])
            try:
                x = np.asarray(arr[chain, r0:r1])
            except Exception as e:
                raise StoreError(f"draws {r0}..{r1 - 1} of chain {chain} of {name!r} in "
                                 f"{self.path} are unreadable ({e!r}); {DAMAGED}") from e
            finite = bool(np.isfinite(x).all())
            pos = r0
            while pos < r1:
                a, b, shas = todo[i]
                end = min(b, r1)
                feed(hashers[i], x[pos - r0:end - r0])
                if not finite and not np.isfinite(x[pos - r0:end - r0]).all() or \
                        end == b and hashers[i].hexdigest()[:32] != shas[name]:
                    raise StoreError(f"draws {a}..{b - 1} of chain {chain} of {name!r} in "
                                     f"{self.path} are missing or damaged (checksum "
                                     f"mismatch); {DAMAGED}")
                i, pos = i + (end == b), end
        self._verified[(name, chain)] = len(rec["blocks"])

    def verify(self) -> dict[int, dict]:
        """Check the whole store (records, layout, every checkpoint, every committed block of
        every observable); returns the commit records. Raises :class:`StoreError`."""
        records = self.progress()
        for chain, rec in records.items():
            self._load_checkpoint(rec)
            for name in self.names:
                self._verify(name, chain, rec)
        return records

    def read(self, name: str, chain: int, k: int) -> Tensor:
        """The first ``k`` committed draws of ``chain``, ``[k, *shape]`` (verified)."""
        rec = self.progress().get(chain)
        if rec is None or not 0 <= k <= rec["draws"]:
            raise StoreError(f"chain {chain} of {self.path} has not committed {k} draws")
        self._verify(name, chain, rec)
        return torch.from_numpy(np.asarray(self._group[name][chain, :k]))

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
            writer = self.holder()
            now = f" (being written now by {writer})" if writer else ""
            raise StoreError(f"chains {unfinished} of the store {self.path} are unfinished"
                             f"{now}; resume the run (suscept run --resume) before estimating")
        return [c for c in range(n) if prog[c]["status"] == "done"]

    def draws(self, name: str) -> Tensor:
        """All draws of ``name``, ``[chain, draw, *shape]`` (loads them: small observables).
        Committed draws are verified; draws a chain has not committed (diverged or unfinished
        chains) are NaN."""
        self._check_name(name)
        x = np.asarray(self._group[name][...])
        if not x.flags.writeable:
            x = x.copy()
        records = self.progress()
        for chain in range(len(x)):
            if chain in records:
                self._verify(name, chain, records[chain])
            x[chain, records[chain]["draws"] if chain in records else 0:] = np.nan
        return torch.from_numpy(x)

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
        records = self.progress()
        for c in chains:
            self._verify(name, c, records[c])
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
        (draws past it are NaN). The whole store is verified first (one pass over it)."""
        try:
            import xarray as xr
        except ImportError as e:
            raise ConfigError("to_xarray needs xarray: pip install 'suscept[xarray]'") from e
        prog = self.verify()
        ds = xr.open_zarr(self.zarr_path, consolidated=False, zarr_format=3)
        attrs = self.attrs
        coords = {"chain": np.arange(attrs["n_chains"]), "draw": np.arange(attrs["n_draws"])}
        for dim, labels in attrs.get("coords", {}).items():
            if dim in ds.dims and len(labels) == ds.sizes[dim]:
                coords[dim] = list(labels)
        committed = [prog.get(c, {}).get("draws", 0) for c in range(attrs["n_chains"])]
        ds = ds.assign_coords(coords).assign(committed=("chain", committed))
        for name in attrs["names"]:
            ds[name] = ds[name].where(ds["draw"] < ds["committed"])
        ds.attrs = {"meta_hash": attrs["meta_hash"], "names": attrs["names"],
                    "config": json.dumps(attrs["config"]), "meta": json.dumps(attrs["meta"])}
        return ds


def _blocks_ok(blocks: list, ends: list[int], names: list[str], diverged: bool) -> bool:
    """Blocks ``[start, stop, {name: sha}]`` are the sampler's blocks from draw 0 in order
    (a diverged chain's last one may be partial), with a checksum for every observable."""
    for i, b in enumerate(blocks):
        if not (isinstance(b, list) and len(b) == 3 and i + 1 < len(ends) and b[0] == ends[i]
                and isinstance(b[2], dict) and sorted(b[2]) == sorted(names)):
            return False
        partial = diverged and i == len(blocks) - 1 and b[0] < b[1] < ends[i + 1]
        if b[1] != ends[i + 1] and not partial:
            return False
    return True


def _checkpoint_name(chain: int, draws: int, step: object) -> str:
    return f"chain{chain}-{draws:07d}-{step:08d}.pt" if isinstance(step, int) else "?"
