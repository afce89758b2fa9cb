"""The value every estimator returns: a tensor, its standard error and named dimensions."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from suscept.errors import ConfigError, ShapeError


@dataclass(frozen=True)
class Estimate:
    """An estimate with its Monte Carlo standard error.

    Attributes:
        value: the estimate (float64), shape given by ``dims``.
        stderr: standard error of ``value`` (same shape): leave-one-segment-out jackknife over
            blocks of consecutive draws of each chain (see ``docs/estimators.md``).
        dims: names of the axes of ``value``, e.g. ``("sample", "observable")``.
        name: which estimator produced it (``"bif"``, ``"llc"``, ...).
        convention: the sign and scale of ``value`` in words (docs/theory.md section 3 table).
        meta: small JSON-able facts (number of draws, segments, scale, ...).
    """

    value: Tensor
    stderr: Tensor
    dims: tuple[str, ...]
    name: str
    convention: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.value, Tensor) or not isinstance(self.stderr, Tensor):
            raise ShapeError(f"{self.name}: value and stderr must be tensors")
        if self.value.ndim != len(self.dims):
            raise ShapeError(f"{self.name}: value has {self.value.ndim} axes but "
                             f"dims={self.dims}")
        if self.stderr.shape != self.value.shape:
            raise ShapeError(f"{self.name}: stderr has shape {tuple(self.stderr.shape)} but value "
                             f"has {tuple(self.value.shape)}; give one standard error per entry")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def z(self, truth: Tensor) -> Tensor:
        """``(value - truth) / stderr``: how many standard errors from a known answer."""
        return (self.value - torch.as_tensor(truth, dtype=self.value.dtype)) / self.stderr

    def __repr__(self) -> str:
        if self.value.numel() == 1:
            body = f"{self.value.item():.6g} ± {self.stderr.item():.2g}"
        else:
            body = f"shape {dict(zip(self.dims, self.shape))}"
        return f"Estimate<{self.name}: {body}; {self.convention}>"

    # ---- tables (suscept/tables.py; coordinates in meta["coords"]) ----------------------------
    def with_coords(self, **coords) -> Estimate:
        """A copy with coordinates: ``dim=[labels]`` or ``dim={name: values}`` per element."""
        from suscept import tables

        return tables.with_coords(self, **coords)

    def to_dataframe(self):
        """Long-form pandas table: one row per element, dims and coordinates as columns, then
        ``value``, ``stderr``, ``z`` (see :mod:`suscept.tables`)."""
        from suscept import tables

        return tables.to_dataframe(self)

    def to_xarray(self):
        """``xarray.Dataset`` of ``value``, ``stderr``, ``z`` with named dims and coordinates
        (needs the ``xarray`` extra; see :mod:`suscept.tables`)."""
        from suscept import tables

        return tables.to_xarray(self)

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (a ``.pt`` tensor file); reload with :meth:`Estimate.load`."""
        torch.save({"value": self.value, "stderr": self.stderr, "dims": list(self.dims),
                    "name": self.name, "convention": self.convention,
                    "meta": json.dumps(self.meta)}, Path(path))

    @staticmethod
    def load(path: str | Path) -> Estimate:
        """Read an Estimate written by :meth:`save`; a damaged or edited file is refused."""
        d = load_saved(path, "estimate", {"value": Tensor, "stderr": Tensor, "dims": list,
                                          "name": str, "convention": str, "meta": str})
        try:
            meta = json.loads(d["meta"])
            if not isinstance(meta, dict) or not all(isinstance(x, str) for x in d["dims"]):
                raise ValueError("meta must be a JSON object and dims names")
            return Estimate(value=d["value"], stderr=d["stderr"], dims=tuple(d["dims"]),
                            name=d["name"], convention=d["convention"], meta=meta)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path} is not a valid saved estimate ({e}); write it again") from e


def load_saved(path: str | Path, what: str, fields: dict[str, type]) -> dict:
    """``torch.load`` (tensors and plain data only) of a file :meth:`save` methods write,
    with the ``fields`` of the given types; anything else is a ConfigError naming the file."""
    try:
        d = torch.load(Path(path), weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except OSError:
        raise
    except Exception as e:  # unpickling, zip and torch errors of a damaged file
        raise ConfigError(f"{path} is not a readable saved {what} ({type(e).__name__}); "
                          "write it again") from e
    bad = [k for k, t in fields.items() if not isinstance(d, dict) or not isinstance(d.get(k), t)]
    if bad:
        raise ConfigError(f"{path} is not a valid saved {what}: fields {bad} are missing or of "
                          "the wrong type; write it again")
    return d
