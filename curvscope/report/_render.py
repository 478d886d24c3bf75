"""Result documents in, ``report.html`` and figures out: rendering only, no numerics."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import CurvscopeError, arg
from ..io import read_document, run_of, write_atomic
from ._html import render_report
from ._plots import remove_stale_figures, save_figures

__all__ = [
    "OPTIONAL_PARTS",
    "PARTS",
    "SKIPPED_FILE",
    "Rendered",
    "render_directory",
    "render_documents",
    "one_run",
]

PARTS = ("spectrum", "density", "check", "compare", "surface", "solve")
"""The report's parts, in page order; each is the document ``<part>.json``."""

OPTIONAL_PARTS = ("classes", "track")
"""Documents a folder may hold besides the report's parts (``classes.json`` from ``curvscope
classes`` or a full report of a classifier, ``track.json`` from ``curvscope track``): rendered
when present, never listed as skipped when absent."""

SKIPPED_FILE = "report-skipped.json"
"""What a report run left out and why, so ``report --from`` can say it again."""


@dataclass(frozen=True)
class Rendered:
    """A rendered report: the page, the documents it shows, its figures, what was skipped."""

    html: Path
    documents: dict[str, Path]
    figures: list[Path]
    skipped: list[dict[str, str]]
    timings: dict[str, float] = field(default_factory=dict)


def render_documents(
    documents: dict[str, dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    plotly_js: str = "inline",
    figure_formats: tuple[str, ...] = ("png",),
    skipped: list[dict[str, str]] | None = None,
) -> tuple[Path, list[Path]]:
    """Write ``out_dir/report.html`` and ``out_dir/figures/`` from result documents.

    Returns:
        ``(html path, figure paths)``.
    """
    out = Path(out_dir)
    figures: list[Path] = []
    for doc in documents.values():
        figures += save_figures(doc, out / "figures", figure_formats)
    # figures/ belongs to the report: a figure of an earlier run that this one did not
    # write (another preset, a format no longer asked for) goes
    if (out / "figures").is_dir():
        remove_stale_figures(out / "figures", figures)
    page = render_report(documents, plotly_js=plotly_js, skipped=list(skipped or []))
    return write_atomic(out / "report.html", page), figures


def render_directory(
    directory: str | os.PathLike,
    *,
    plotly_js: str = "inline",
    figure_formats: tuple[str, ...] = ("png",),
) -> Rendered:
    """Render ``report.html`` (and figures) from the result documents already in a folder.

    The documents must be of one run (:func:`one_run`): a folder that mixes runs is refused
    rather than rendered as one page.

    Raises:
        CurvscopeError: when the folder holds no result document, or documents of several
            runs or models (naming the odd one).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise CurvscopeError(f"{arg('from_dir')} {folder} is not a folder.")
    documents: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    for name in (*PARTS, *OPTIONAL_PARTS):
        path = folder / f"{name}.json"
        if path.is_file():
            documents[name] = read_document(path)
            paths[name] = path
    if not documents:
        raise CurvscopeError(
            f"{arg('from_dir')} {folder} holds no result document "
            f"({', '.join(p + '.json' for p in (*PARTS, *OPTIONAL_PARTS))})."
        )
    recorded: list[dict[str, str]] = []
    recorded_run: str | None = None
    try:
        record = json.loads((folder / SKIPPED_FILE).read_text())
        recorded = list(record["skipped"])
        recorded_run = record.get("run")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    reference = one_run(documents, paths, recorded_run)
    if recorded_run is not None and recorded_run != reference:
        recorded = []  # what another run left out says nothing about these documents
    named = {str(r.get("part", "")).split(":")[0] for r in recorded}
    skipped = [
        r
        for r in recorded
        if str(r.get("part", "")).split(":")[0] not in documents or ":" in str(r.get("part", ""))
    ]
    if any(p in documents for p in PARTS):  # a track alone is no report with parts missing
        skipped += [
            {"part": p, "reason": f"no {p}.json in {folder}"}
            for p in PARTS
            if p not in documents and p not in named
        ]
    html, figures = render_documents(
        documents, folder, plotly_js=plotly_js, figure_formats=figure_formats, skipped=skipped
    )
    return Rendered(html, paths, figures, skipped)


def _fingerprint(doc: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What was analysed: the model's sha256 and parameter names, the data's sha256."""
    info = doc.get("input") or {}
    model, data = info.get("model") or {}, info.get("data") or {}
    names = model.get("param_names")
    return model.get("sha256"), tuple(names) if names else None, data.get("sha256")


def _describe(doc: dict[str, Any]) -> str:
    run = run_of(doc)
    model = (doc.get("input") or {}).get("model") or {}
    sha = str(model.get("sha256") or "unknown")[:12]
    who = f"run {run['id']} ({run.get('command', doc.get('command'))})" if run else "no run id"
    return f"{who}, model {model.get('path', '?')} sha256 {sha}"


def one_run(
    documents: dict[str, dict[str, Any]],
    paths: dict[str, Path],
    preferred: str | None = None,
) -> str | None:
    """Check that a folder's documents are of one run; return that run's id.

    The reference run is ``preferred`` (the run a report recorded) when a document has it,
    else the run most documents share (the newest on a tie). Every document with a run id
    must have the reference's id and the reference's model and data (sha256, parameter
    names); a document without one (written before runs were recorded) must have the
    reference's model sha256.

    Raises:
        CurvscopeError: naming the first document of another run or model, and the reference.
    """
    ids = [run_of(d).get("id") for d in documents.values()]
    counted = [i for i in ids if i]
    if preferred in counted:
        ref_id = preferred
    elif counted:
        started = {
            run_of(d).get("id"): str(run_of(d).get("started", "")) for d in documents.values()
        }
        ref_id = max(set(counted), key=lambda i: (counted.count(i), started.get(i, "")))
    else:
        ref_id = None
    names = list(documents)
    ref_name = next((n for n in names if run_of(documents[n]).get("id") == ref_id), names[0])
    ref = documents[ref_name]
    for name in names:
        doc = documents[name]
        run_id = run_of(doc).get("id")
        if run_id and ref_id:
            odd = run_id != ref_id or _fingerprint(doc) != _fingerprint(ref)
        else:
            odd = _fingerprint(doc)[0] != _fingerprint(ref)[0]
        if odd:
            raise CurvscopeError(
                f"{arg('from_dir')} renders the documents of one run, and {paths[name]} "
                f"({_describe(doc)}) is not of the run of {paths[ref_name]} "
                f"({_describe(ref)}): move one of them to another folder, or rerun the report "
                f"into a new {arg('out_dir')}."
            )
    return ref_id
