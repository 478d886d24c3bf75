"""The analyses the command line runs end to end: load, compute, write documents.

:func:`run_report` is the pipeline behind ``curvscope report``, :func:`track` the one
behind ``curvscope track`` (and :class:`Tracker` its form inside a training loop);
:func:`document` builds the result document every command writes. Numerics live in the
diagnostics and solvers, drawing in :mod:`curvscope.report`.
"""

from ._diff import COVERAGE, DiffEntry, DiffResult, diff_documents
from ._documents import describe, document, save_document
from ._memory import (
    MemoryEstimate,
    available_memory,
    estimate_memory,
    format_bytes,
    parse_memory,
    refuse_if_too_large,
)
from ._report import PRESETS, QUICK_BUDGET_S, ReportRun, report_plan, run_report
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
    "MemoryEstimate",
    "PRESETS",
    "QUICK_BUDGET_S",
    "TRACE_ESTIMATORS",
    "ReportRun",
    "TrackRun",
    "Tracker",
    "available_memory",
    "describe",
    "diff_documents",
    "document",
    "estimate_memory",
    "format_bytes",
    "expand_checkpoints",
    "order_checkpoints",
    "parse_memory",
    "preserved",
    "refuse_if_too_large",
    "report_plan",
    "run_report",
    "save_document",
    "stability_threshold",
    "track",
]
