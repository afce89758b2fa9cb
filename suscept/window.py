"""The sampler's loop without host-device synchronisation per step: the pieces it shares
with :mod:`suscept.batched`.

On a GPU the host queues kernels ahead of the device and only waits when it reads a value
back (``float``, ``item``, ``bool``, ``tolist``, a copy to the CPU) or copies from pageable
host memory. The chain loop reads nothing per step: each step's minibatch mean loss goes to a
device buffer, and once per *window* (the ``thin`` steps of a draw; during burn-in up to
:data:`BURN_IN_WINDOW` steps) :func:`summary` gathers the window's losses, the draw's
finiteness flags, probe loss and ``||w - w*||`` into one float64 vector read in one transfer.
Minibatch indices are shuffled on the CPU (its own generator: no device involved) and sent to
the data's device once per epoch, from pinned memory without blocking (:class:`Minibatches`).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

# burn-in steps whose minibatch losses are read and checked together (after burn-in: the
# ``thin`` steps of one draw)
BURN_IN_WINDOW = 64
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (on the CPU) on ``device`` without waiting for it: from pinned memory, without
    blocking, to a GPU (the host never waits for the device's queue)."""
    if t.device == device:
        return t
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def caller_level() -> int:
    """The ``stacklevel`` that points a warning issued by the caller of this function at the
    first frame outside the suscept package (the user's call)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def summary(losses: Tensor, values: dict[str, Tensor] | None, params: Tensor,
            anchor: Tensor) -> Tensor:
    """What the host reads of a window, as one float64 vector on the device (one transfer):
    the minibatch losses ``[k]``, then for a draw one finiteness flag (1/0) per observable, the
    probe's mean loss (when ``loss`` or ``mean_loss`` is recorded) and ``||w - w*||``."""
    if values is None:
        return losses
    dev = losses.device
    parts = [losses] + [torch.isfinite(v).all().double().reshape(1).to(dev)
                        for v in values.values()]
    probe = values.get("loss", values.get("mean_loss"))
    if probe is not None:
        parts.append(probe.double().mean().reshape(1).to(dev))
    parts.append(torch.linalg.vector_norm(params - anchor, dtype=torch.float64).reshape(1))
    return torch.cat(parts)


class Minibatches:
    """Minibatches without replacement within an epoch: one shuffle of the ``n`` sample
    indices per epoch (from the chain's data generator, on the CPU), consecutive slices of it
    per step; a slice that would run past the end starts a new epoch.

    The shuffle is sent to ``device`` (the data's) once per epoch, from pinned memory without
    blocking when that is a GPU, so a step's slice indexes the data where it lives: no step
    copies indices to the device or waits for it."""

    def __init__(self, n: int, size: int | None, generator: torch.Generator,
                 device: torch.device):
        self.n, self.size, self.gen, self.device = n, size, generator, device
        self.perm, self.pos, self.on_device = None, n, None

    def next(self) -> Tensor:
        if self.pos + self.size > self.n:
            self.use(torch.randperm(self.n, generator=self.gen), 0)
        self.pos += self.size
        return self.on_device[self.pos - self.size:self.pos]

    def use(self, perm: Tensor | None, pos: int) -> None:
        """Continue from shuffle ``perm`` (CPU) at position ``pos``."""
        self.perm, self.pos = perm, pos
        self.on_device = None if perm is None else to_device(perm, self.device)

    def state(self) -> tuple:
        return self.gen.get_state(), self.perm, self.pos, self.on_device

    def set_state(self, state: tuple) -> None:
        gen, self.perm, self.pos, self.on_device = state
        self.gen.set_state(gen)
