"""Streaming, mergeable central moments in float64 (Chan / Pebay pairwise formulas).

A :class:`Moments` holds, for two groups of observables ``x`` (``kx`` entries, e.g. train
losses ``l_j``) and ``y`` (``ky`` entries, e.g. observables ``O_q``), per *segment* ``s``
(a block of consecutive draws of one chain):

    n            [S]          draws
    mean_x/_y    [S, k]       means
    m2_x/_y      [S, k]       sum of squared deviations (diagonal only)
    cxy          [S, kx, ky]  sum dx_a dy_b
    t_xyy        [S, kx, ky]  sum dx_a dy_b^2        (optional third-order slice)
    t_xxy        [S, kx, ky]  sum dx_a^2 dy_b        (optional third-order slice)

Only these two slices of the third central moment are kept, never a dense k^3 tensor: they
give ``k3(O_q, l_j, l_j)`` (second-order influence) and ``k3(O_q, O_q, l_j)`` (variance
response). Every operation returns a new object; nothing is finalized in place, so calling
an estimator twice gives the same answer. Segments of different chains, processes or resumed
runs combine with :meth:`Moments.cat`; :meth:`Moments.total` merges them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from suscept.errors import ShapeError

DTYPE = torch.float64


@dataclass(frozen=True)
class Moments:
    n: Tensor
    mean_x: Tensor
    mean_y: Tensor
    m2_x: Tensor
    m2_y: Tensor
    cxy: Tensor
    t_xyy: Tensor | None = None
    t_xxy: Tensor | None = None

    # ---- construction -------------------------------------------------------------------
    @staticmethod
    def from_draws(x: Tensor, y: Tensor | None = None, third: bool = True) -> Moments:
        """Moments of one segment from draws ``x [N, kx]`` and ``y [N, ky]`` (default ``x``)."""
        if x.ndim != 2 or (y is not None and (y.ndim != 2 or y.shape[0] != x.shape[0])):
            yshape = None if y is None else tuple(y.shape)
            raise ShapeError(f"from_draws needs x [N, kx] and y [N, ky]; got {tuple(x.shape)}"
                             f" and {yshape}")
        x = x.to(DTYPE)
        y = x if y is None else y.to(DTYPE)
        n = x.shape[0]
        mx, my = x.mean(0), y.mean(0)
        dx, dy = x - mx, y - my
        out = Moments(
            n=torch.tensor([float(n)], dtype=DTYPE, device=x.device),
            mean_x=mx[None], mean_y=my[None],
            m2_x=(dx * dx).sum(0)[None], m2_y=(dy * dy).sum(0)[None],
            cxy=(dx.T @ dy)[None],
            t_xyy=(dx.T @ (dy * dy))[None] if third else None,
            t_xxy=((dx * dx).T @ dy)[None] if third else None,
        )
        return out

    @staticmethod
    def cat(parts: list[Moments]) -> Moments:
        """Concatenate the segments of several accumulators (chains, ranks, resumed runs)."""
        if not parts:
            raise ShapeError("Moments.cat needs at least one accumulator")
        first = parts[0]
        for p in parts[1:]:
            if p.cxy.shape[1:] != first.cxy.shape[1:] or (p.t_xyy is None) != (first.t_xyy is None):
                raise ShapeError("cannot concatenate Moments of different shapes or orders: "
                                 f"{tuple(first.cxy.shape[1:])} vs {tuple(p.cxy.shape[1:])}")
        kw = {}
        for f in fields(Moments):
            vals = [getattr(p, f.name) for p in parts]
            kw[f.name] = None if vals[0] is None else torch.cat(vals)
        return Moments(**kw)

    # ---- properties ---------------------------------------------------------------------
    @property
    def n_segments(self) -> int:
        return int(self.n.shape[0])

    @property
    def has_third(self) -> bool:
        return self.t_xyy is not None

    def segment(self, s: int) -> Moments:
        return Moments(**{f.name: (None if getattr(self, f.name) is None
                                   else getattr(self, f.name)[s:s + 1]) for f in fields(self)})

    # ---- merging ------------------------------------------------------------------------
    def merge(self, other: Moments) -> Moments:
        """Segment-wise exact merge ``self (+) other`` (same number of segments)."""
        a, b = self, other
        na, nb = a.n, b.n
        n = na + nb
        safe = n.clamp(min=1)
        wb = (nb / safe)[:, None]
        dx, dy = b.mean_x - a.mean_x, b.mean_y - a.mean_y
        f2 = (na * nb / safe)[:, None]
        out = dict(
            n=n,
            mean_x=a.mean_x + dx * wb,
            mean_y=a.mean_y + dy * wb,
            m2_x=a.m2_x + b.m2_x + dx * dx * f2,
            m2_y=a.m2_y + b.m2_y + dy * dy * f2,
            cxy=a.cxy + b.cxy + dx[:, :, None] * dy[:, None, :] * f2[:, :, None],
        )
        if a.has_third and b.has_third:
            f3 = (na * nb * (na - nb) / safe**2)[:, None, None]
            ra, rb = (na / safe)[:, None, None], (nb / safe)[:, None, None]
            dxc, dyr = dx[:, :, None], dy[:, None, :]
            out["t_xyy"] = (
                a.t_xyy + b.t_xyy + f3 * dxc * dyr**2
                + ra * (dxc * b.m2_y[:, None, :] + 2 * dyr * b.cxy)
                - rb * (dxc * a.m2_y[:, None, :] + 2 * dyr * a.cxy)
            )
            out["t_xxy"] = (
                a.t_xxy + b.t_xxy + f3 * dxc**2 * dyr
                + ra * (b.m2_x[:, :, None] * dyr + 2 * dxc * b.cxy)
                - rb * (a.m2_x[:, :, None] * dyr + 2 * dxc * a.cxy)
            )
        return Moments(**out)

    def total(self) -> Moments:
        """Merge all segments into one (pairwise tree, exact up to float64 rounding)."""
        m = self
        while m.n_segments > 1:
            s = m.n_segments
            half = s // 2
            left = m._slice(0, half)
            right = m._slice(half, 2 * half)
            merged = left.merge(right)
            m = merged if s % 2 == 0 else Moments.cat([merged, m._slice(2 * half, s)])
        return m

    def remove(self, part: Moments) -> Moments:
        """Inverse of :meth:`merge`: the moments of ``self`` without the draws of ``part``.

        Both must have one segment. Used for leave-one-segment-out jackknife errors.
        """
        t, b = self, part
        n, nb = t.n, b.n
        na = n - nb
        safe_a = na.clamp(min=1)
        mean_x = (t.mean_x * n[:, None] - b.mean_x * nb[:, None]) / safe_a[:, None]
        mean_y = (t.mean_y * n[:, None] - b.mean_y * nb[:, None]) / safe_a[:, None]
        dx, dy = b.mean_x - mean_x, b.mean_y - mean_y
        f2 = (na * nb / n.clamp(min=1))[:, None]
        out = dict(
            n=na, mean_x=mean_x, mean_y=mean_y,
            m2_x=t.m2_x - b.m2_x - dx * dx * f2,
            m2_y=t.m2_y - b.m2_y - dy * dy * f2,
            cxy=t.cxy - b.cxy - dx[:, :, None] * dy[:, None, :] * f2[:, :, None],
        )
        if t.has_third:
            safe = n.clamp(min=1)
            f3 = (na * nb * (na - nb) / safe**2)[:, None, None]
            ra, rb = (na / safe)[:, None, None], (nb / safe)[:, None, None]
            dxc, dyr = dx[:, :, None], dy[:, None, :]
            out["t_xyy"] = (
                t.t_xyy - b.t_xyy - f3 * dxc * dyr**2
                - ra * (dxc * b.m2_y[:, None, :] + 2 * dyr * b.cxy)
                + rb * (dxc * out["m2_y"][:, None, :] + 2 * dyr * out["cxy"])
            )
            out["t_xxy"] = (
                t.t_xxy - b.t_xxy - f3 * dxc**2 * dyr
                - ra * (b.m2_x[:, :, None] * dyr + 2 * dxc * b.cxy)
                + rb * (out["m2_x"][:, :, None] * dyr + 2 * dxc * out["cxy"])
            )
        return Moments(**out)

    def _slice(self, lo: int, hi: int) -> Moments:
        return replace(self, **{f.name: getattr(self, f.name)[lo:hi] for f in fields(self)
                                if getattr(self, f.name) is not None})

    # ---- finalized statistics (k-statistics; unbiased) -----------------------------------
    def cov(self) -> Tensor:
        """Unbiased ``Cov(x_a, y_b)`` per segment: ``cxy / (n - 1)``; shape ``[S, kx, ky]``."""
        return self.cxy / (self.n - 1)[:, None, None]

    def var_x(self) -> Tensor:
        return self.m2_x / (self.n - 1)[:, None]

    def var_y(self) -> Tensor:
        return self.m2_y / (self.n - 1)[:, None]

    def k3(self, which: str) -> Tensor:
        """Unbiased joint third cumulant slice, ``M3 * n / ((n-1)(n-2))``; ``[S, kx, ky]``.

        ``which="xyy"``: ``k3(x_a, y_b, y_b)``; ``which="xxy"``: ``k3(x_a, x_a, y_b)``.
        """
        if not self.has_third:
            raise ShapeError("these Moments were accumulated without third-order slices; "
                             "pass third=True when accumulating")
        t = {"xyy": self.t_xyy, "xxy": self.t_xxy}[which]
        n = self.n
        return t * (n / ((n - 1) * (n - 2)))[:, None, None]
