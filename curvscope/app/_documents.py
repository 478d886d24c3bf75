"""Result documents of analyses: the ``input`` section, settings, counts and timings."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..io import Run, current_run, make_document, versions, write_document
from ..operators import hvp_record
from ..problem import Problem

__all__ = ["describe", "document", "save_document"]


def describe(problem: Problem) -> dict[str, Any]:
    """The ``input`` section: what ``load`` recorded, or a minimal one for a built problem."""
    info = getattr(problem, "input_info", None)
    if info:
        return info
    return {
        "model": {
            "path": type(problem.model).__name__,
            "sha256": None,
            "format": "in-memory module",
            "num_params": sum(p.numel() for p in problem.model.parameters()),
            "params_selected": problem.num_params,
            "param_names": list(problem.names),
        },
        "data": {
            "source": "in-memory batches",
            "sha256": None,
            "num_samples": problem.num_samples,
            "num_terms": problem.num_terms,
            "batch_size": max(problem.batch_sizes),
            "subset_seed": None,
        },
        "loss": problem.loss_name,
        "reduction": problem.reduction,
        "weight_decay": problem.weight_decay,
        "dtype": str(problem.dtype).replace("torch.", ""),
        "device": str(problem.device),
        "seed": None,
        "train_mode": problem.train_mode,
        "batch_dependent": problem.batch_dependent,
        "files": {},
        "versions": versions(),
    }


def document(
    problem: Problem | None,
    command: str,
    *,
    settings: dict[str, Any],
    results: dict[str, Any],
    started: float,
    passes_before: int = 0,
    matvecs: int = 0,
    notes: list[str] | None = None,
    timings: dict[str, float] | None = None,
    counts: dict[str, int] | None = None,
    complete: bool = True,
    state: str | None = None,
    run: Run | None = None,
) -> dict[str, Any]:
    """A result document for ``command`` (docs/DESIGN.md "Result document").

    Args:
        problem: the analysed problem (its ``input_info`` and data-pass counter).
        command: the command name (``spectrum``...).
        settings: every option the command used.
        results: the command's ``results``.
        started: ``time.perf_counter()`` when the command started.
        passes_before: the problem's data passes before the command started.
        matvecs: products used.
        notes: sentences for the reader (the problem's notes come first).
        timings: extra timings.
        counts: extra counts (e.g. gradients).
        complete: ``False`` for a partial document written on interruption.
        state: the ``run`` section's state (default ``complete``, or ``interrupted`` for a
            partial document; ``running`` for a track's rows written as it goes).
        run: the run (default: the current one; see :func:`curvscope.io.active_run`).
    """
    mode_note = problem.mode_note() if hasattr(problem, "mode_note") else None
    all_notes = [
        *(getattr(problem, "notes", None) or []),
        *([mode_note] if mode_note else []),
        *(notes or []),
    ]
    doc = make_document(
        command,
        input=describe(problem) if problem is not None else {},
        settings=settings,
        results=results,
        timings={"total_s": time.perf_counter() - started, **(timings or {})},
        counts={
            "matvecs": int(matvecs),
            "data_passes": (problem.data_passes - passes_before) if problem is not None else 0,
            **(counts or {}),
        },
        notes=list(dict.fromkeys(all_notes)),
        run=(run or current_run() or Run(command)).section(
            state or ("complete" if complete else "interrupted")
        ),
    )
    # the Hessian operators' account of the problem, not the problem, keeps the record
    record = hvp_record(problem)
    if record:  # how Hessian products were taken: backend, fallback, FD errors, kept graphs
        doc["hvp"] = dict(record)
    if not complete:
        doc["complete"] = False
    return doc


def save_document(doc: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/<command>.json`` atomically."""
    return write_document(doc, out_dir)
