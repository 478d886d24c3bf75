"""``curvscope surface``: the loss on a line or grid around the weights, with figures."""

# No ``from __future__ import annotations`` here: common_options rebuilds the signature, and
# typer then sees string annotations and drops the explicit option names ("--range" became
# "--range-").
import time
from pathlib import Path
from typing import Annotated

import typer

from .._errors import OptionError
from ._common import (
    CommonArgs,
    announce,
    check_paths,
    common_options,
    computing,
    console,
    finish,
    guarded,
    open_session,
    parse_floats,
    parse_list,
    plan_memory,
    print_batch_line,
    print_table,
    table,
)

__all__ = ["register", "surface_cli"]

PLOT_FORMATS = ["png", "pdf", "svg", "html"]


def parse_range(value: str) -> tuple[float, float]:
    """``"-1,1"`` -> ``(-1.0, 1.0)``.

    Raises:
        OptionError: unless the value is two increasing numbers.
    """
    vals = parse_floats(value, "--range") or []
    if len(vals) != 2 or not vals[0] < vals[1]:
        raise OptionError(f"--range {value!r} must be LO,HI with LO < HI, e.g. -1,1.")
    return vals[0], vals[1]


@common_options
def surface_cli(
    common: CommonArgs,
    dims: Annotated[int, typer.Option("--dims", help="1 (a line) or 2 (a grid).")] = 2,
    directions: Annotated[
        str,
        typer.Option(
            "--directions",
            help="eigen (top Hessian eigenvectors), random, filter-normalized (Li et al. 2018; "
            "biases and BatchNorm zeroed) or a FILE: spectrum's eigenvectors.pt, or a .pt/.npy "
            "tensor of shape [P] or [P, 2].",
        ),
    ] = "eigen",
    range_: Annotated[
        str,
        typer.Option(
            "--range",
            help="LO,HI of the grid coordinates (distances along unit eigenvectors).",
        ),
    ] = "-1,1",
    steps: Annotated[int, typer.Option("--steps", help="Grid points per axis.")] = 41,
    plots: Annotated[
        str,
        typer.Option("--plots", help="Figures to write next to surface.json: png,pdf,svg,html."),
    ] = "png",
    plotly_js: Annotated[
        str,
        typer.Option(
            "--plotly-js",
            help="For --plots html: 'inline' (self-contained) or a relative path to plotly.min.js.",
        ),
    ] = "inline",
) -> None:
    """Loss surface along the top Hessian eigenvectors (or random directions), with figures."""
    with guarded():
        t0 = time.perf_counter()
        if dims not in (1, 2):
            raise OptionError(f"--dims {dims} is not supported; a surface has 1 or 2 dimensions.")
        lo_hi = parse_range(range_)
        formats = parse_list(plots, "--plots", PLOT_FORMATS)
        if steps < 2:
            raise OptionError(f"--steps must be at least 2, got {steps}.")
        named = directions not in ("eigen", "random", "filter-normalized")
        check_paths(common, {"--directions": directions if named else None})
        session = open_session(common)
        from ..diagnostics import surface
        from .spectrum import lanczos_products

        points = steps**dims
        from .spectrum import lanczos_basis

        plan_memory(
            session,
            matrices=["hessian"],
            vectors=2 * dims + 2,
            basis=lanczos_basis(session, "all", dims, None) if directions == "eigen" else 0,
        )
        eigen = lanczos_products(dims, session.problem.num_params) if directions == "eigen" else 0
        planned = announce(
            f"loss surface on {'x'.join([str(steps)] * dims)} points along {directions} directions",
            points + eigen,
            session,
        )
        settings = {
            "dims": dims,
            "directions": directions,
            "range": list(lo_hi),
            "steps": steps,
            "plots": formats,
            "plotly_js": plotly_js,
        }
        given = directions
        if named:  # an eigenvector file or a tensor file, read and checked against the model
            from ..io import read_directions

            given = read_directions(
                directions, session.problem.names, session.problem.shapes,
                model_sha256=session.input_info["model"]["sha256"],
            )
        with computing(session, "surface", settings, planned, lambda r: {"surface": r}) as update:
            result = surface(
                session.problem,
                dims=dims,
                directions=given,
                range_=lo_hi,
                steps=steps,
                seed=common.seed,
                tol=common.tol,
                max_iter=common.max_iter,
                progress=update,
            )
        doc_path = finish(
            session,
            "surface",
            settings=settings,
            results={"surface": result},
            timings={"total_s": time.perf_counter() - t0},
            counts={"matvecs": result.num_matvecs},
            notes=list(result.notes),
        )
        figures = write_figures(doc_path, formats, plotly_js)
        _print(result, doc_path, figures, session)


def write_figures(doc_path: Path, formats: list[str], plotly_js: str = "inline") -> list[Path]:
    """Figures of a written surface document (matplotlib files, and an HTML page)."""
    from ..io import read_document, write_atomic
    from ..report import SURFACE_FIGURES, remove_stale_figures, render_report, save_figures

    doc = read_document(doc_path)
    out = doc_path.parent
    paths = save_figures(doc, out, tuple(f for f in formats if f != "html"))
    if "html" in formats:
        paths.append(
            write_atomic(out / "surface.html", render_report({"surface": doc}, plotly_js=plotly_js))
        )
    elif (out / "surface.html").is_file():
        (out / "surface.html").unlink()  # an earlier run's page, not of these results
    # this command's figures of an earlier run that this one did not write (a 2-D run's
    # contour after a 1-D run) go; other commands' files stay
    remove_stale_figures(out, paths, SURFACE_FIGURES)
    return paths


def _print(result, doc_path: Path, figures: list[Path], session) -> None:
    cols = ["direction", "eigenvalue", "g·d", "d·Hd", "axis"]
    t = table(result.directions.description, cols, numbers=cols[1:])
    for i in range(result.dims):
        ev = result.eigenvalues[i] if result.eigenvalues else None
        axis = result.axes[i]
        t.add_row(
            f"d{i + 1}",
            "" if ev is None else f"{ev:.6g}",
            f"{result.gradient_projections[i]:.3e}",
            f"{result.curvatures[i][i]:.6g}",
            f"{axis[0]:g} .. {axis[-1]:g} ({len(axis)})",
        )
    print_table(t)
    print_batch_line(session)
    flat = [v for row in result.loss for v in (row if isinstance(row, list) else [row])]
    finite = [v for v in flat if v == v]
    console.print(
        f"loss at the weights {result.center_loss:.6g}; on the grid "
        f"{min(finite):.6g} .. {max(finite):.6g}"
        if finite
        else "every grid point gave a non-finite loss"
    )
    for note in result.notes:
        console.print(f"[yellow]{note}[/]")
    console.print(f"Result: {doc_path}")
    if figures:
        console.print("Figures: " + ", ".join(str(p) for p in figures))


def register(app: typer.Typer) -> None:
    """Add ``surface`` to the app."""
    app.command("surface", no_args_is_help=True)(surface_cli)
