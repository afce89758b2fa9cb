"""Batches: a tensor, a tuple/list of tensors, or a dict of tensors sharing dim 0 (samples)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from suscept.errors import ConfigError, ShapeError

Batch = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


def leaves(batch: Batch) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return list(batch)
    raise ConfigError(f"a batch must be a tensor, a tuple/list of tensors or a dict of tensors; "
                      f"got {type(batch).__name__}")


def n_samples(batch: Batch, name: str = "data") -> int:
    """Number of samples (size of dim 0, the same for every tensor of the batch)."""
    ts = leaves(batch)
    if not ts or not all(isinstance(t, Tensor) for t in ts):
        raise ConfigError(f"{name} must contain at least one tensor, and only tensors")
    sizes = {t.shape[0] if t.ndim else None for t in ts}
    if len(sizes) != 1 or None in sizes:
        raise ShapeError(f"every tensor of {name} must share its first (sample) dimension; "
                         f"got shapes {[tuple(t.shape) for t in ts]}")
    n = sizes.pop()
    if n == 0:
        raise ConfigError(f"{name} is empty (0 samples); pass at least one sample")
    return n


def index(batch: Batch, idx: Tensor) -> Batch:
    """The sub-batch of samples ``idx`` (same structure as ``batch``)."""
    if isinstance(batch, Tensor):
        return batch[idx.to(batch.device)]
    if isinstance(batch, Mapping):
        return {k: v[idx.to(v.device)] for k, v in batch.items()}
    return type(batch)(t[idx.to(t.device)] for t in batch)


def check_like(probe: Batch, data: Batch) -> int:
    """Check that ``probe`` has the structure and per-sample shapes of ``data``."""
    n = n_samples(probe, "probe")
    p, d = leaves(probe), leaves(data)
    if len(p) != len(d) or any(a.shape[1:] != b.shape[1:] for a, b in zip(p, d)):
        raise ShapeError("probe must be a batch like data (same structure, same shape after the "
                         f"sample dim): probe {[tuple(t.shape) for t in p]} vs data "
                         f"{[tuple(t.shape) for t in d]}")
    if any(a.dtype != b.dtype for a, b in zip(p, d)):
        raise ShapeError("probe and data tensors must share dtypes: "
                         f"{[t.dtype for t in p]} vs {[t.dtype for t in d]}")
    return n

