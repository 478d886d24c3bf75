"""Errors curvscope raises for user mistakes.

Every message is one sentence that names the file, flag or layer at fault and says what to
do. The command line turns any :class:`CurvscopeError` into that sentence and exit code 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CurvscopeError",
    "DataError",
    "DeterminismError",
    "NonFiniteError",
    "OptionError",
    "UnsupportedModelError",
]


class CurvscopeError(Exception):
    """Base class of the errors caused by input the user can fix."""


class CheckpointError(CurvscopeError):
    """A model file is missing, unreadable, untrusted or does not fit its architecture."""


class DataError(CurvscopeError):
    """A data file or built-in data set is missing, malformed or does not fit the model."""


class OptionError(CurvscopeError):
    """An option value is invalid or inconsistent with the model (e.g. ``--top 0``)."""


class UnsupportedModelError(CurvscopeError):
    """A method does not support a layer, loss or mode of the model; names the layer."""


class NonFiniteError(CurvscopeError):
    """NaN or Inf in weights, data, loss or a matrix product."""


class DeterminismError(CurvscopeError):
    """Two passes over the data gave different results; names the likely cause."""
