"""``curvscope diff A.json B.json``: two result documents side by side, with verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ._common import console, guarded, print_table, table

__all__ = ["EXIT_CHANGED", "diff_cli", "register"]

EXIT_CHANGED = 4
"""Exit code of ``--fail-on-change`` when a number differs beyond its uncertainty."""

SHOWN = 40
"""Rows printed without ``--all`` (every changed number first)."""


def diff_cli(
    a: Annotated[Path, typer.Argument(help="First result document (JSON).", show_default=False)],
    b: Annotated[Path, typer.Argument(help="Second result document.", show_default=False)],
    fail_on_change: Annotated[
        bool,
        typer.Option(
            "--fail-on-change",
            help=f"Exit {EXIT_CHANGED} when a number differs beyond its uncertainty (for CI).",
        ),
    ] = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="Print every number, not only the changed ones.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Also write OUT/diff.json with every number and verdict."),
    ] = None,
) -> None:
    """Compare two documents of one command: each number, B - A, its uncertainty, a verdict.

    A number is "same" when |B - A| is within 3 combined uncertainties (error bounds,
    subset spreads and standard errors of both documents added in quadrature; round-off for
    numbers without one), else "different". Exits 0 either way unless --fail-on-change.
    """
    with guarded():
        import time

        from ..app import COVERAGE, diff_documents, document, save_document
        from ..io import read_document

        t0 = time.perf_counter()
        doc_a, doc_b = read_document(a), read_document(b)
        result = diff_documents(doc_a, doc_b, names=(str(a), str(b)))
        _print(result, a, b, show_all, COVERAGE)
        if out is not None:
            doc = document(
                None,
                "diff",
                settings={"a": str(a), "b": str(b), "fail_on_change": fail_on_change},
                results=result.to_results(),
                started=t0,
                notes=result.notes,
            )
            console.print(f"Result: {save_document(doc, out)}")
    if fail_on_change and result.changed:
        raise typer.Exit(code=EXIT_CHANGED)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def _print(result, a: Path, b: Path, show_all: bool, coverage: float) -> None:
    counts = result.counts
    if result.input_differences:
        t = table("What differs in the inputs and settings", ["field", "A", "B"])
        for d in result.input_differences:
            va, vb = _fmt(d["a"]), _fmt(d["b"])
            field = d["field"] + (" (changes the function)" if d.get("changes_results") else "")
            t.add_row(escape(field), escape(va[:40]), escape(vb[:40]))
        print_table(t)
    entries = result.entries if show_all else result.changed
    entries = sorted(entries, key=lambda e: e.verdict == "same")
    # through the shared table: numbers and verdicts are never cut, on a terminal or in a file
    t = table(
        escape(f"{result.command}: {a} (A) vs {b} (B)"),
        ["number", "A", "B", "B - A", f"{coverage:g} x uncertainty", "from", "verdict"],
        numbers=["A", "B", "B - A", f"{coverage:g} x uncertainty", "verdict"],
    )
    limit = len(entries) if show_all else SHOWN
    for e in entries[:limit]:
        colour = "green" if e.verdict == "same" else "red"
        t.add_row(
            escape(e.key),
            escape(_fmt(e.a)),
            escape(_fmt(e.b)),
            "-" if e.difference is None else f"{e.difference:.3g}",
            "-" if e.uncertainty is None else f"{coverage * e.uncertainty:.2g}",
            escape(e.basis),
            f"[{colour}]{e.verdict}[/]",
        )
    if entries:
        print_table(t)
    if len(entries) > limit:
        console.print(f"... and {len(entries) - limit} more changed numbers (--all shows all).")
    console.print(
        f"{len(result.entries)} numbers compared: {counts['same']} same within uncertainty, "
        f"{counts['different']} different, {counts['only in a']} only in A, "
        f"{counts['only in b']} only in B."
    )
    for note in result.notes:
        console.print(f"[dim]{escape(note)}[/]")


def register(app: typer.Typer) -> None:
    """Add ``diff`` to the app."""
    app.command("diff", no_args_is_help=True)(diff_cli)
