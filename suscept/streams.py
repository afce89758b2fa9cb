"""What :func:`suscept.sample` accumulates while it samples, one block of draws at a time.

A stream reads named observables from each finished block of draws (``[L, *shape]``, L draws
of one chain) and returns :class:`~suscept.moments.Moments` for that segment. The sampler keeps
the segments of chains that did not diverge and concatenates them, so a stream's result is
exactly what the estimators would compute from the stored draws, without storing them.

- :class:`Cross`: moments of observable ``x`` (flattened, ``kx``) against ``y`` (``ky``), with
  optional third-order slices: feeds ``bif``, ``loss_kernel``, ``llc``, ``variance_response``...
- :class:`Marginal`: means and variances of ``x`` alone, ``O(k)``: the default stream of the
  probe losses (feeds ``llc``, ``per_sample_llc``, ``singular_fluctuation``).
- :class:`Paired`: for ``K`` components, moments of ``x[..., k]`` (a scalar per component, e.g.
  ``phi_C``) against ``y[..., k, :]`` (a vector per component, e.g. its per-token losses): ``K``
  separate ``1 x X`` cross moments, never the ``K x (K X)`` product. Feeds susceptibilities.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from torch import Tensor

from suscept.errors import ConfigError, ShapeError
from suscept.moments import Moments


@dataclass(frozen=True)
class Cross:
    x: str
    y: str
    third: bool = True

    @property
    def key(self) -> str:
        return f"{self.x}|{self.y}"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.x, self.y)

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for name in self.names:
            if name not in shapes:
                raise ConfigError(f"stream {self.key!r} names unknown observable {name!r}; "
                                  f"known: {sorted(shapes)}")

    def block(self, values: dict[str, Tensor]) -> Moments:
        x = values[self.x].reshape(len(values[self.x]), -1)  # scalars become [L, 1]
        y = None if self.y == self.x else values[self.y].reshape(len(values[self.y]), -1)
        return Moments.from_draws(x, y, third=self.third)

    @staticmethod
    def combine(parts: list[Moments]) -> Moments:
        return Moments.cat(parts)


@dataclass(frozen=True)
class Marginal:
    """Moments of ``x`` alone, O(k) per segment: means and variances, no cross or third
    moments. Its key is ``"x|x"``, so ``run.moments_of(x)`` finds it; it feeds ``llc``,
    ``per_sample_llc`` and ``singular_fluctuation``, and estimators that need the ``k x k``
    kernel (``bif``, ``loss_kernel``) refuse it, asking for the full ``(x, x)`` stream."""

    x: str

    @property
    def key(self) -> str:
        return f"{self.x}|{self.x}"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.x,)

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        Cross(self.x, self.x).check(shapes)

    def block(self, values: dict[str, Tensor]) -> Moments:
        x = values[self.x].reshape(len(values[self.x]), -1)
        return Moments.from_draws(x, x[:, :0], third=False)

    @staticmethod
    def combine(parts: list[Moments]) -> Moments:
        return Moments.cat(parts)


@dataclass(frozen=True)
class Paired:
    """``x`` has shape ``[K]`` per draw, ``y`` has ``[K, X]``: component k's x with its y row."""

    x: str
    y: str

    @property
    def key(self) -> str:
        return f"{self.x}~{self.y}"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.x, self.y)

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        Cross(self.x, self.y).check(shapes)
        sx, sy = shapes[self.x], shapes[self.y]
        if len(sx) != 1 or len(sy) != 2 or sy[0] != sx[0]:
            raise ShapeError(f"paired stream {self.key!r} needs x of shape [K] and y of shape "
                             f"[K, X]; got {sx} and {sy}")

    def block(self, values: dict[str, Tensor]) -> list[Moments]:
        x, y = values[self.x], values[self.y]
        return [Moments.from_draws(x[:, k:k + 1], y[:, k], third=False)
                for k in range(x.shape[1])]

    @staticmethod
    def combine(parts: list[list[Moments]]) -> list[Moments]:
        return [Moments.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


Stream = Cross | Marginal | Paired


def segment_bytes(stream: Stream, shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of one segment's :class:`~suscept.moments.Moments` of ``stream`` (float64):
    ``Cross``: ``8 (1 + 2 kx + 2 ky + kx ky (1 + 2 third))``; ``Marginal``: ``8 (1 + 2 k)``;
    ``Paired``: ``8 K (3 + 3 X)``."""
    if isinstance(stream, Paired):
        k, x = shapes[stream.x][0], shapes[stream.y][1]
        return 8 * k * (3 + 3 * x)
    if isinstance(stream, Marginal):
        return 8 * (1 + 2 * math.prod(shapes[stream.x]))
    kx, ky = math.prod(shapes[stream.x]), math.prod(shapes[stream.y])
    return 8 * (1 + 2 * kx + 2 * ky + kx * ky * (1 + 2 * stream.third))


def memory_bytes(streams: list[Stream], shapes: dict[str, tuple[int, ...]], n_segments: int,
                 stored: dict[str, int] | None = None) -> dict[str, int]:
    """Predicted peak bytes of a run's streamed moments and in-memory draws, by item.

    A stream keeps one segment per block of each chain, concatenated once at the end, and its
    estimator works on a few more segment-sized tensors: ``(2 n_segments + 4)`` segments in
    all. ``stored``: observable -> values kept in memory (``chain * draw * size``, float64).
    """
    out = {s.key: (2 * n_segments + 4) * segment_bytes(s, shapes) for s in streams}
    for name, n_values in (stored or {}).items():
        out[f"draws {name}"] = 8 * n_values
    return out


def physical_memory() -> int:
    """Bytes of physical memory of this machine (8 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def as_stream(spec: tuple[str, str] | Stream) -> Stream:
    if isinstance(spec, Cross | Marginal | Paired):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(s, str) for s in spec):
        return Cross(*spec)
    raise ConfigError(f"stream entries must be (x, y) name pairs, Cross, Marginal or Paired; "
                      f"got {spec!r}")
