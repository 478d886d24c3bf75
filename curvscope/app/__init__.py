"""The analyses the command line runs end to end: load, compute, write documents.

:func:`run_report` is the pipeline behind ``curvscope report``, :func:`track` the one
behind ``curvscope track`` (and :class:`Tracker` its form inside a training loop);
:func:`document` builds the result document every command writes. Numerics live in the
diagnostics and solvers, drawing in :mod:`curvscope.report`.
"""

from ._diff import COVERAGE, DiffEntry, DiffResult, diff_documents
from ._documents import describe, document, save_document
from ._report import PRESETS, ReportRun, run_report
from ._track import (
    TRACE_ESTIMATORS,
    Tracker,
    TrackRun,
    expand_checkpoints,
    order_checkpoints,
    preserved,
    stability_threshold,
    track,
)

__all__ = [
    "COVERAGE",
    "DiffEntry",
    "DiffResult",
    "PRESETS",
    "TRACE_ESTIMATORS",
    "ReportRun",
    "TrackRun",
    "Tracker",
    "describe",
    "diff_documents",
    "document",
    "expand_checkpoints",
    "order_checkpoints",
    "preserved",
    "run_report",
    "save_document",
    "stability_threshold",
    "track",
]
