"""One exception hierarchy: every error says what was wrong and what to do."""

from __future__ import annotations


class SusceptError(Exception):
    """Base class of every error raised by suscept."""


class ConfigError(SusceptError, ValueError):
    """A setting or argument is invalid (the message names the argument)."""


class ShapeError(SusceptError, ValueError):
    """A tensor has the wrong shape (the message names the argument and both shapes)."""


class DivergenceWarning(UserWarning):
    """A chain diverged (NaN/inf or exploding loss) and is excluded from estimates."""


class EstimatorWarning(UserWarning):
    """An estimator dropped chains or cannot give a trustworthy standard error."""


class MemoryWarning(UserWarning):
    """A run is predicted to need more memory than the machine (or its budget) has."""
