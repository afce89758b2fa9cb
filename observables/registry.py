"""The registry of observable kinds and the built-in kinds (docs/theory.md section 5).

Every observable is a frozen spec. ``components=None`` means the full model at the draw's
weights ``w``; a tuple of component names means one row per component ``C``, each evaluated at
the mixed weights ``w^C = M_C w + (1 - M_C) w*`` (C's weights from the draw, all others at the
anchor). An :class:`~observables.plan.EvaluationPlan` computes the per-token losses (and the
logits when a spec needs them) of every weight setting once per draw, then each spec reduces
them with :meth:`Observable.reduce`. Shapes per draw (``X = batch * (pos - 1)`` probe tokens):

=========================  =======================================  ==========  ==========
kind                       value                                    full        components
=========================  =======================================  ==========  ==========
``token_loss``             ``l_x``                                  ``[X]``     ``[K, X]``
``sample_loss``            ``l_i`` (mean over a sequence's tokens)  ``[batch]`` ``[K, batch]``
``mean_loss``              ``Lbar_S``; ``relative``: minus          ``[]``      ``[K]``
                           ``Lbar_S(w*)`` (= ``phi_C``)
``centered_token_loss``    ``l_x - Lbar_S`` (same weights)          ``[X]``     ``[K, X]``
``metric``                 ``fn(logits, tokens)``                   ``[...]``   ``[K, ...]``
=========================  =======================================  ==========  ==========

Define a kind of your own with :func:`register` on a frozen dataclass subclassing
:class:`Observable`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from suscept.errors import ConfigError

REGISTRY: dict[str, type[Observable]] = {}


def register(kind: str):
    """Class decorator: add an observable kind to the registry under ``kind``."""
    def deco(cls):
        if kind in REGISTRY:
            raise ConfigError(f"observable kind {kind!r} is already registered")
        cls.kind = kind
        REGISTRY[kind] = cls
        return cls
    return deco


def make(kind: str, **kwargs) -> Observable:
    if kind not in REGISTRY:
        raise ConfigError(f"unknown observable kind {kind!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[kind](**kwargs)


@dataclass(frozen=True)
class Anchor:
    """Facts about the anchor the reductions may use: ``Lbar_S(w*)`` per row ``[n]``."""

    mean_loss: Tensor


@dataclass(frozen=True)
class Observable:
    """Base spec. Subclasses set ``kind`` (via :func:`register`) and implement ``reduce``."""

    components: tuple[str, ...] | None = None
    name: str | None = None
    kind: ClassVar[str] = "observable"
    needs_logits: ClassVar[bool] = False

    def __post_init__(self):
        if isinstance(self.components, str):
            object.__setattr__(self, "components", (self.components,))
        elif self.components is not None:
            object.__setattr__(self, "components", tuple(self.components))

    @property
    def key(self) -> str:
        """The name this observable's values are recorded under."""
        if self.name:
            return self.name
        return self.kind if self.components is None else f"{self.kind}[{','.join(self.components)}]"

    def reduce(self, losses: Tensor, logits: Tensor | None, tokens: Tensor,
               anchor: Anchor) -> Tensor:
        """Map per-token losses ``[n, batch, pos-1]`` (n weight settings) to ``[n, ...]``."""
        raise NotImplementedError

    @classmethod
    def example(cls, components: tuple[str, ...] | None) -> Observable:
        """A valid instance, for the registry's contract test."""
        return cls(components=components)


@register("token_loss")
@dataclass(frozen=True)
class TokenLoss(Observable):
    def reduce(self, losses, logits, tokens, anchor):
        return losses.flatten(1)


@register("sample_loss")
@dataclass(frozen=True)
class SampleLoss(Observable):
    def reduce(self, losses, logits, tokens, anchor):
        return losses.mean(-1)


@register("mean_loss")
@dataclass(frozen=True)
class MeanLoss(Observable):
    """``Lbar_S`` over all probe tokens; with ``relative=True``, ``Lbar_S - Lbar_S(w*)``."""

    relative: bool = False

    def reduce(self, losses, logits, tokens, anchor):
        mean = losses.flatten(1).double().mean(-1)
        return (mean - anchor.mean_loss.double() if self.relative else mean).to(losses.dtype)


@register("centered_token_loss")
@dataclass(frozen=True)
class CenteredTokenLoss(Observable):
    """``l_x - Lbar_S`` at the same weights (the token side of a susceptibility)."""

    def reduce(self, losses, logits, tokens, anchor):
        flat = losses.flatten(1)
        return flat - flat.mean(-1, keepdim=True)


@register("metric")
@dataclass(frozen=True)
class Metric(Observable):
    """A custom metric ``fn(logits [batch, pos, vocab], tokens [batch, pos]) -> Tensor``.

    Example (logit difference of two tokens at the last position)::

        Metric(fn=lambda logits, tokens: logits[:, -1, 3] - logits[:, -1, 5],
               components=("L1H0",), name="logit_diff")
    """

    fn: Callable[[Tensor, Tensor], Tensor] | None = field(default=None, compare=False)
    needs_logits: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not callable(self.fn):
            raise ConfigError("Metric needs fn(logits, tokens) -> Tensor")

    def reduce(self, losses, logits, tokens, anchor):
        return torch.stack([self.fn(row, tokens) for row in logits])

    @classmethod
    def example(cls, components):
        return cls(components=components, fn=lambda logits, tokens: logits[:, -1, 1]
                   - logits[:, -1, 0], name=None)
