"""Runs: the id every result document records, and the marker a run leaves in its folder.

A run is one command invocation (``curvscope spectrum ...``) or one library call that writes
documents (:func:`curvscope.app.run_report`, :func:`curvscope.app.track`). Every document it
writes carries the same ``run`` section, ``{"id", "command", "started", "state"}``, so a
folder's documents can be told apart by run (``report --from`` renders one run only).

While a command runs, its ``--out`` folder holds :data:`MARKER` (``.curvscope-run.json``):
the run id, the command, the model and data fingerprints and the state (``running``,
``complete`` or ``interrupted``). A rerun into the folder of an interrupted run reads it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MARKER",
    "RUN_STATES",
    "Run",
    "active_run",
    "current_run",
    "new_run_id",
    "now_iso",
    "read_marker",
    "rename_marker",
    "run_of",
    "set_current_run",
]

MARKER = ".curvscope-run.json"
"""The file a run leaves in its output folder (hidden: not a result document)."""

RUN_STATES = ("running", "complete", "interrupted")
"""A run's states: still going (or killed without a word), finished, or stopped part-way."""


def now_iso() -> str:
    """The UTC time now, ISO 8601 to the second (as documents record ``created``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """A fresh run id: UTC time and 8 random hex digits, e.g. ``20250101T120000Z-1a2b3c4d``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(4)}"


@dataclass
class Run:
    """One run: its id, the command, when it started; ``resumed`` when a run was taken up."""

    command: str
    id: str = field(default_factory=new_run_id)
    started: str = field(default_factory=now_iso)
    resumed: list[dict[str, Any]] = field(default_factory=list)

    def section(self, state: str = "complete") -> dict[str, Any]:
        """The document's ``run`` section in ``state``."""
        out: dict[str, Any] = {
            "id": self.id,
            "command": self.command,
            "started": self.started,
            "state": state,
        }
        if self.resumed:
            out["resumed"] = [dict(r) for r in self.resumed]
        return out


_CURRENT: list[Run] = []


def current_run() -> Run | None:
    """The run documents are written for now (the command's), or ``None``."""
    return _CURRENT[-1] if _CURRENT else None


def set_current_run(run: Run | None) -> None:
    """Make ``run`` the current run (``None``: no run), replacing any other."""
    _CURRENT.clear()
    if run is not None:
        _CURRENT.append(run)


@contextlib.contextmanager
def active_run(command: str) -> Iterator[Run]:
    """The current run, or a new one for ``command`` for the duration of the block.

    A library call (:func:`curvscope.app.run_report`) writes all its documents under one
    run; called by the command line, it joins the command's run.
    """
    if _CURRENT:
        yield _CURRENT[-1]
        return
    run = Run(command)
    _CURRENT.append(run)
    try:
        yield run
    finally:
        with contextlib.suppress(ValueError):
            _CURRENT.remove(run)


def run_of(doc: dict[str, Any]) -> dict[str, Any]:
    """A document's ``run`` section (``{}`` for documents of versions before runs)."""
    run = doc.get("run")
    return run if isinstance(run, dict) else {}


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker a run left in ``folder``, or ``None`` (none, or unreadable)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("id") else None


def rename_marker(folder: str | os.PathLike, old_id: str, new_id: str) -> None:
    """Give the marker of run ``old_id`` in ``folder`` the id ``new_id`` (a resumed run)."""
    marker = read_marker(folder)
    if marker is None or marker.get("id") != old_id or old_id == new_id:
        return
    from ._results import write_atomic

    write_atomic(Path(folder) / MARKER, json.dumps({**marker, "id": new_id}, indent=1) + "\n")
