"""``curvscope classes``: where the GGN's outliers come from (Papyan 2019, 2020)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    CommonArgs,
    announce,
    common_options,
    computing,
    console,
    finish,
    guarded,
    open_session,
    plan_memory,
    print_batch_line,
    print_findings,
    print_table,
    table,
)
from .spectrum import lanczos_basis, lanczos_products

__all__ = ["classes_cli", "register"]


@common_options
def classes_cli(
    common: CommonArgs,
    top: Annotated[
        int | None,
        typer.Option(
            "--top",
            help="GGN eigenpairs to compare (default C^2: the C class outliers and the C(C-1) "
            "cross-class ones).",
        ),
    ] = None,
    max_matvecs: Annotated[
        int | None,
        typer.Option("--max-matvecs", help="Lanczos products at most (--max-iter means the same)."),
    ] = None,
    basis_size: Annotated[
        int | None, typer.Option("--basis-size", help="Lanczos basis vectors at most.")
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option("--rtol", help="Converge each eigenvalue to this relative error bound."),
    ] = None,
) -> None:
    """The GGN split into class means, cross-class means and the rest, against its outliers."""
    with guarded():
        from .._errors import OptionError

        t0 = time.perf_counter()
        if top is not None and top < 1:
            raise OptionError(f"--top {top} must be at least 1.")
        session = open_session(common)
        from ..diagnostics import check_classifier, classes

        problem = session.problem
        C = check_classifier(problem)  # refuses mse, bce... in one sentence, before any work
        k = min(C * C if top is None else top, problem.num_params - 1)
        fitted = plan_memory(
            session,
            matrices=["ggn"],
            vectors=2 * (k + 1) + 2 * C * C,
            basis=lanczos_basis(session, "all", k + 1, basis_size),
            k=k + 1,
            explicit_basis=basis_size is not None,
            movable=True,
        )
        planned = announce(
            f"{C} classes: {C * C} class-mean vectors and ggn top-{k + 1} by Lanczos",
            C * C + lanczos_products(k + 1, problem.num_params),
            session,
        )
        settings = {"top": top, "max_matvecs": max_matvecs, "basis_size": basis_size, "rtol": rtol}
        with computing(
            session,
            "classes",
            settings,
            planned,
            show=lambda part, path: _show(part, session, path),
        ) as update:
            result = classes(
                problem,
                top=top,
                tol=common.tol,
                rtol=rtol,
                max_matvecs=max_matvecs if max_matvecs is not None else common.max_iter,
                basis_size=fitted.size or basis_size,
                basis_device=fitted.device,
                seed=common.seed,
                progress=update,
            )
        doc_path = finish(
            session,
            "classes",
            settings=settings,
            results=result.to_results(),
            timings={"total_s": time.perf_counter() - t0},
            counts={"matvecs": result.num_matvecs},
            notes=list(result.notes),
        )
        _show(result, session, doc_path)


def _show(result, session, doc_path: Path) -> None:
    """The figure beside the document (complete or partial), then the tables."""
    figures = write_figures(doc_path)
    _print(result, session, doc_path)
    if figures:
        console.print("Figure: " + ", ".join(str(p) for p in figures))


def write_figures(doc_path: Path) -> list[Path]:
    """``classes.png`` beside a written classes document (as ``surface`` writes its own)."""
    from ..io import read_document
    from ..report import CLASSES_FIGURES, remove_stale_figures, save_figures

    paths = save_figures(read_document(doc_path), doc_path.parent, ("png",))
    remove_stale_figures(doc_path.parent, paths, CLASSES_FIGURES)
    return paths


def _print(result, session, doc_path) -> None:
    p = session.problem
    C = result.num_classes
    g = {"eigenvalues": [], "converged": [], "error_bounds": None, **(result.ggn or {})}
    t = table(
        f"GGN of {p.num_params} parameters, {p.num_samples} samples, {C} classes "
        f"({session.input_info['dtype']})",
        ["#", "ggn eigenvalue", "error bound", "class means", "cross-class means"],
        numbers=["#", "ggn eigenvalue", "error bound", "class means", "cross-class means"],
    )
    rows = max(len(g["eigenvalues"]), len(result.class_eigenvalues))
    for i in range(rows):
        ev = g["eigenvalues"][i] if i < len(g["eigenvalues"]) else None
        cross_i = i - C
        t.add_row(
            str(i + 1),
            "-" if ev is None else f"{ev:.6g}" + ("" if g["converged"][i] else " (nc)"),
            "-" if ev is None or not g["error_bounds"] else f"{g['error_bounds'][i]:.1e}",
            f"{result.class_eigenvalues[i]:.6g}" if i < len(result.class_eigenvalues) else "",
            f"{result.cross_eigenvalues[cross_i]:.6g}"
            if 0 <= cross_i < len(result.cross_eigenvalues)
            else "",
        )
        if i + 1 == C:
            t.add_section()
    print_table(t)
    a = table(
        "Principal angles between the parts' ranges and the GGN eigenspaces",
        ["part", "ggn pairs", "dim", "mean cos²", "largest cos", "smallest cos", "± bound"],
        numbers=["dim", "mean cos²", "largest cos", "smallest cos", "± bound"],
    )
    for e in result.angles:
        a.add_row(
            e.part,
            f"{e.ggn_pairs[0]}..{e.ggn_pairs[1]}",
            str(e.dimension),
            f"{e.mean_squared_cosine:.4f}",
            f"{e.cosines[0]:.4f}" if e.cosines else "-",
            f"{e.cosines[-1]:.4f}" if e.cosines else "-",
            f"{e.error_bound:.1e}",
        )
    print_table(a)
    print_batch_line(session)
    print_findings(result.notes)
    console.print(
        f"tr G_class = {result.class_trace:.5g}, tr G_cross = {result.cross_trace:.5g}. "
        f"{result.num_matvecs} products. Result: {doc_path}"
    )


def register(app: typer.Typer) -> None:
    """Add ``classes`` to the app."""
    app.command("classes", no_args_is_help=True)(classes_cli)
