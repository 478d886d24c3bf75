"""Result documents in, ``report.html`` and figures out: rendering only, no numerics."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import CurvscopeError, arg
from ..io import read_document, write_atomic
from ._html import render_report
from ._plots import remove_stale_figures, save_figures

__all__ = [
    "OPTIONAL_PARTS",
    "PARTS",
    "SKIPPED_FILE",
    "Rendered",
    "render_directory",
    "render_documents",
]

PARTS = ("spectrum", "density", "check", "compare", "surface", "solve")
"""The report's parts, in page order; each is the document ``<part>.json``."""

OPTIONAL_PARTS = ("track",)
"""Documents a folder may hold besides the report's parts (``track.json`` from ``curvscope
track``): rendered when present, never listed as skipped when absent."""

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

    Raises:
        CurvscopeError: when the folder holds no result document.
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
    try:
        recorded = list(json.loads((folder / SKIPPED_FILE).read_text())["skipped"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
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
