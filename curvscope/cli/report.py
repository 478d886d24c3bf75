"""``curvscope report``: run the analyses and write one self-contained HTML page.

``curvscope report MODEL --out DIR`` runs spectrum, density, check, compare and surface (and
the solvers with ``--preset full``), writes each result document, PNG figures and
``DIR/report.html``. ``curvscope report --from DIR`` renders documents already written.
"""

# No ``from __future__ import annotations``: common_options rebuilds the signature and typer
# must see real annotations to keep explicit option names such as "--from".

import inspect
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from .._errors import OptionError
from ._common import (
    CommonArgs,
    announce,
    check_out_dir,
    common_options,
    console,
    guarded,
    open_session,
    plan_memory,
    print_table,
    progress_bar,
    table,
)

__all__ = ["register", "report_cli", "write_plotly_js"]


def write_plotly_js(path: Path) -> Path:
    """Write plotly's JavaScript to ``path`` (for reports made with ``--plotly-js PATH``)."""
    from ..io import write_atomic
    from ..report import plotly_js_text

    return write_atomic(path, plotly_js_text())


def _optional_model(func):
    """Make the MODEL argument optional (``--from DIR`` needs none)."""
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    params[0] = params[0].replace(
        annotation=Annotated[
            Path | None,
            typer.Argument(
                help="Checkpoint to analyse (curvscope .pt, .safetensors, state dict with "
                "--model, TorchScript, or a pickled module with --trust-checkpoint); omit with "
                "--from.",
                show_default=False,
            ),
        ],
        default=None,
    )
    func.__signature__ = sig.replace(parameters=params)
    return func


@_optional_model
@common_options
def report_cli(
    common: CommonArgs,
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="quick (top-5 Hessian eigenpairs, 20-probe density, checks, compare on GGN "
            "and PCH, 21x21 surface) or full (every matrix, 41x41 surface, solver runs).",
        ),
    ] = "quick",
    plotly_js: Annotated[
        str,
        typer.Option(
            "--plotly-js",
            help="inline (self-contained page) or a path relative to the page to a shared "
            "plotly.min.js (written there if missing).",
        ),
    ] = "inline",
    from_dir: Annotated[
        Path | None,
        typer.Option("--from", help="Render the result documents already in this folder."),
    ] = None,
    figures: Annotated[
        str, typer.Option("--figures", help="Figure formats written to DIR/figures: png,pdf.")
    ] = "png",
    budget_s: Annotated[
        float | None,
        typer.Option(
            "--budget-s",
            help="Seconds to plan for (default: 300 for quick, none for full): parts shrink "
            "or are left out, as recorded, to finish within it.",
        ),
    ] = None,
) -> None:
    """Run the analyses and write DIR/report.html (or render existing documents with --from)."""
    with guarded():
        t0 = time.perf_counter()
        formats = tuple(f.strip() for f in figures.split(",") if f.strip())
        bad = [f for f in formats if f not in ("png", "pdf", "svg")]
        if bad:
            raise OptionError(f"--figures {','.join(bad)!r} is not known; choose png, pdf, svg.")
        if from_dir is not None:
            if common.model_path is not None:
                raise OptionError("give either MODEL or --from DIR, not both.")
            if not Path(from_dir).is_dir():
                what = "is a file, not a folder" if Path(from_dir).exists() else "does not exist"
                raise OptionError(f"--from {from_dir} {what}.")
            check_out_dir(Path(from_dir), "--from")
            from ..report import render_directory

            _ensure_plotly(Path(from_dir), plotly_js)
            run = render_directory(from_dir, plotly_js=plotly_js, figure_formats=formats)
        else:
            if common.model_path is None:
                raise OptionError("give a MODEL to analyse, or --from DIR to render documents.")
            if preset not in ("quick", "full"):
                raise OptionError(f"--preset {preset!r} is not known; choose quick or full.")
            session = open_session(common)
            from ..app import report_memory_phases, run_report
            from .spectrum import lanczos_basis

            # every part in turn: the spectrum's basis, density's SLQ bases (in blocks that
            # fit), check's float64 copy; the printed estimate is the largest of them
            fitted = plan_memory(
                session,
                matrices=["hessian", "ggn", "kfac"],
                vectors=14,
                basis=lanczos_basis(session, "all", 7, None),
                phases=report_memory_phases(session.problem, preset),
            )
            left_out = (session.memory or {}).get("left_out") or {}
            names = [n for n in ("spectrum", "density", "check", "compare") if n not in left_out]
            planned = announce(
                f"report ({preset}): {', '.join(names)} and surface"
                + (", solvers and, for a softmax classifier, classes" if preset == "full" else ""),
                report_plan(session, preset, left_out),
                session,
            )
            # after every check: a refused report writes nothing
            _ensure_plotly(Path(common.out), plotly_js)
            from ..linalg import basis_placement

            with (
                progress_bar(session=session, planned=planned) as update,
                basis_placement(common.basis_device),
            ):
                run = run_report(
                    session.problem,
                    out_dir=common.out,
                    preset=preset,
                    base_settings={
                        **common.settings(),
                        "memory_estimate_bytes": (session.memory or {}).get("total_bytes"),
                    },
                    seed=common.seed,
                    tol=common.tol,
                    max_iter=common.max_iter,
                    plotly_js=plotly_js,
                    figure_formats=formats,
                    budget_s=budget_s,
                    progress=update,
                    probe_block=fitted.probe_block,
                    memory=session.memory,
                )
        _print(run, time.perf_counter() - t0)


def report_plan(session, preset: str, left_out=()) -> int:
    """About how many products the report's parts take (the app's plan, summed).

    The parts the memory plan left out are not counted.
    """
    from ..app import report_plan as plan

    return sum(n for part, n in plan(session.problem, preset).items() if part not in left_out)


def _ensure_plotly(out_dir: Path, plotly_js: str) -> None:
    if plotly_js == "inline":
        return
    # lexically: "DIR/../plotly.min.js" must not depend on DIR existing yet
    target = Path(os.path.normpath(out_dir / plotly_js))
    if not target.exists() and "://" not in plotly_js and not plotly_js.startswith("//"):
        write_plotly_js(target)
        console.print(f"wrote plotly's JavaScript to {target}")


def _print(run, seconds: float) -> None:
    t = table(f"report written in {seconds:.1f} s", ["part", "result"])
    for part, path in run.documents.items():
        t.add_row(part, str(path))
    for s in run.skipped:
        t.add_row(s["part"], f"[yellow]skipped:[/] {s['reason']}")
    print_table(t)
    if run.figures:
        console.print(f"Figures: {run.figures[0].parent}/ ({len(run.figures)} files)")
    console.print(f"Report: {run.html}")


def register(app: typer.Typer) -> None:
    """Add ``report`` to the app."""
    app.command("report", no_args_is_help=True)(report_cli)
