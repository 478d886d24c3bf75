"""Errors curvscope raises for user mistakes.

Every message is one sentence that names the file, argument or layer at fault and says what
to do. The library never names a command-line flag: an argument is written with
:func:`arg` (``f"{arg('top')} must be at least 1"``), which reads ``top`` in the library's
own message and ``--top`` once the command line renders it (:meth:`CurvscopeError.render`
with the CLI's table of flags). What an error is about travels as data (``matrix``,
``layer``, ``option``, ``path``), so callers decide from fields, never by matching text.

The command line turns any :class:`CurvscopeError` into that sentence and exit code 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "CheckpointError",
    "CurvscopeError",
    "DataError",
    "DeterminismError",
    "Interrupted",
    "NonFiniteError",
    "OptionError",
    "UnsupportedModelError",
    "arg",
    "render_args",
]

# a name, or a name with its value (``load_strict=False``: a boolean flag turned off)
_ARG = re.compile(r"\{@([A-Za-z_][A-Za-z0-9_]*(?:=[A-Za-z0-9_.]+)?)\}")


def render_args(text: str, flags: Any = None) -> str:
    """``text`` with each :func:`arg` placeholder written by ``flags``.

    ``flags``: a mapping or a function of the argument name; names it does not cover (or
    every name, for ``None``) are written as they are.
    """

    def name(m: re.Match) -> str:
        key = m.group(1)
        if flags is None:
            return key
        if callable(flags):
            return flags(key) or key
        return flags.get(key, key)

    return _ARG.sub(name, text)


def arg(name: str) -> str:
    """A placeholder for the library argument ``name`` inside an error message.

    ``str(error)`` shows ``name``; the command line shows its own flag for it.
    """
    return "{@" + name + "}"


class CurvscopeError(Exception):
    """Base class of the errors caused by input the user can fix.

    Args:
        message: one sentence; arguments written with :func:`arg`.
        **data: what the error is about, for callers that decide from it (``matrix``,
            ``layer``, ``option``, ``path``); available as attributes.
    """

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = dict(data)
        for key, value in data.items():
            setattr(self, key, value)
        if "option" not in data:
            found = _ARG.findall(message)
            self.option = found[0].split("=")[0] if found else None

    @property
    def options(self) -> list[str]:
        """Every argument the message names, in order."""
        return _ARG.findall(self.message)

    def render(self, flags: Mapping[str, str] | Callable[[str], str] | None = None) -> str:
        """The message with each argument placeholder replaced.

        Args:
            flags: argument name -> how to write it (a mapping or a function); names it does
                not cover are written as they are.
        """
        return render_args(self.message, flags)

    def __str__(self) -> str:
        return self.render()

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.data))


def _rebuild(cls, message, data):
    return cls(message, **data)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a computation, with what had finished.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it; callers that can keep
    partial work read :attr:`partial`: the command's result object with every finished
    part (eigenpairs of finished blocks, finished densities, evaluated grid points).
    """

    def __init__(self, partial: Any = None) -> None:
        super().__init__()
        self.partial = partial


class CheckpointError(CurvscopeError):
    """A model file is missing, unreadable, untrusted or does not fit its architecture."""


class DataError(CurvscopeError):
    """A data file or built-in data set is missing, malformed or does not fit the model."""


class OptionError(CurvscopeError):
    """An option value is invalid or inconsistent with the model (e.g. ``top=0``)."""


class UnsupportedModelError(CurvscopeError):
    """A method does not support a layer, loss or mode of the model.

    Carries ``matrix`` (the matrix or method refused) and, where one is at fault, ``layer``.
    """

    def __init__(self, message: str, *, matrix: str | None = None, **data: Any) -> None:
        super().__init__(message, matrix=matrix, **data)


class NonFiniteError(CurvscopeError):
    """NaN or Inf in weights, data, loss or a matrix product."""


class DeterminismError(CurvscopeError):
    """Two passes over the data gave different results; names the likely cause."""
