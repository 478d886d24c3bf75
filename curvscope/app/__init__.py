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
    "RANK_STATE": "_engine",
    "end_run": "_engine",
    "reset_run_state": "_engine",
    "RunOptions": "_engine",
    "Session": "_engine",
    "add_notice_sink": "_engine",
    "announce": "_engine",
    "check_inputs": "_engine",
    "check_out_dir": "_engine",
    "check_paths": "_engine",
    "default_threads": "_engine",
    "finish": "_engine",
    "join_ranks": "_engine",
    "keep_partial": "_engine",
    "load_kwargs": "_engine",
    "refuse_shard": "_engine",
    "notice": "_engine",
    "open_session": "_engine",
    "peak_memory": "_engine",
    "plan_line": "_engine",
    "plan_memory": "_engine",
    "prepare_torch": "_engine",
    "refuse_other_run": "_engine",
    "remove_run_documents": "_engine",
    "start_run": "_engine",
    "write_marker": "_engine",
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
    "report_memory_phases": "_report",
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
