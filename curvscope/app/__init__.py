"""The analyses the command line runs end to end: load, compute, write documents.

:func:`run_report` is the pipeline behind ``curvscope report``; :func:`document` builds the
result document every command writes. Numerics live in the diagnostics and solvers, drawing
in :mod:`curvscope.report`.
"""

from ._documents import describe, document, save_document
from ._report import PRESETS, ReportRun, run_report

__all__ = ["PRESETS", "ReportRun", "describe", "document", "run_report", "save_document"]
