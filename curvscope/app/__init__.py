"""The analyses the command line runs end to end: load, compute, write documents.

:func:`run_report` is the pipeline behind ``curvscope report``, :func:`track` the one
behind ``curvscope track`` (and :class:`Tracker` its form inside a training loop);
:func:`document` builds the result document every command writes. Numerics live in the
diagnostics and solvers, drawing in :mod:`curvscope.report`.
"""

import importlib
from typing import Any

# Loaded on first use: the report pipeline imports matplotlib, which the other commands do
# not need before their first product (the start-up limit of the command line).
_NAMES = {
    "COVERAGE": "_diff",
    "DiffEntry": "_diff",
    "DiffResult": "_diff",
    "MemoryEstimate": "_memory",
    "PRESETS": "_report",
    "QUICK_BUDGET_S": "_report",
    "ReportRun": "_report",
    "TRACE_ESTIMATORS": "_track",
    "TrackRun": "_track",
    "Tracker": "_track",
    "available_memory": "_memory",
    "describe": "_documents",
    "diff_documents": "_diff",
    "document": "_documents",
    "estimate_memory": "_memory",
    "expand_checkpoints": "_track",
    "format_bytes": "_memory",
    "order_checkpoints": "_track",
    "parse_memory": "_memory",
    "preserved": "_track",
    "refuse_if_too_large": "_memory",
    "report_plan": "_report",
    "run_report": "_report",
    "save_document": "_documents",
    "stability_threshold": "_track",
    "track": "_track",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
