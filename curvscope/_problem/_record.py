"""The input record: what a problem was loaded from, given to it at construction.

``curvscope.load`` describes the problem it built (the result document's ``input`` section,
its notes, what was read, the data source, the options to load other data alike) and hands
the description over with :meth:`~curvscope.problem.Problem.recorded`; nothing outside
:mod:`curvscope.problem` sets attributes on a problem after construction. A problem built
directly has no record: its ``input_info``, ``loaded``, ``data_source`` and
``load_options`` are ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InputRecord:
    """What a loaded problem was read from and how.

    Attributes:
        info: the result document's ``input`` section (model, data, loss, dtype, files...).
        notes: the load's notes (checkpoint, precision, train mode); they replace the
            problem's own notes, which the load has already taken in.
        loaded: what was read (:class:`~curvscope.io.LoadedModel`: the model, its path,
            format, hash and metadata).
        source: the data source (batches, source name, hash, files).
        load_options: the options to load other data alike (batch size, file options,
            forward keywords, output, groups), for :func:`curvscope.load_like`.
    """

    info: dict[str, Any] | None = None
    notes: Sequence[str] | None = None
    loaded: Any = None
    source: Any = None
    load_options: dict[str, Any] | None = None


class Recorded:
    """The input record's fields, read-only, on the problem that carries it."""

    record: InputRecord | None

    @property
    def input_info(self) -> dict[str, Any] | None:
        """The result document's ``input`` section (``None`` for a problem not loaded)."""
        return self.record.info if self.record is not None else None

    @property
    def loaded(self) -> Any:
        """What ``curvscope.load`` read (the model file and its metadata), or ``None``."""
        return self.record.loaded if self.record is not None else None

    @property
    def data_source(self) -> Any:
        """The data source ``curvscope.load`` opened, or ``None``."""
        return self.record.source if self.record is not None else None

    @property
    def load_options(self) -> dict[str, Any] | None:
        """The options to load other data as this problem's were, or ``None``."""
        return self.record.load_options if self.record is not None else None
