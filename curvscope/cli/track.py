"""``curvscope track``: curvature at every checkpoint of a training run, in one document."""

# No ``from __future__ import annotations``: the signature is rebuilt below and typer must see
# real annotations.

import inspect
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ._common import (
    CommonArgs,
    batch_line,
    check_out_dir,
    common_options,
    console,
    guarded,
    load_kwargs,
    progress_bar,
    refuse_shard,
    start_run,
)
from ._names import MATRIX_NAMES, matrix_help
from ._precond import (
    OptimizerKeyOption,
    PreconditionerOption,
    check_preconditioner_flag,
    describe_preconditioner,
)

__all__ = ["register", "track_cli"]


def _many_checkpoints(func):
    """Make the positional argument a list of checkpoints (paths or quoted globs)."""
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    params[0] = params[0].replace(
        annotation=Annotated[
            list[str],
            typer.Argument(
                help="Checkpoints of one run: files or quoted globs ('runs/ckpt-*.pt'), "
                "ordered by the step each records (meta.step, step, global_step, epoch) or by "
                "the last integer in its name.",
                show_default=False,
                metavar="CKPT...",
            ),
        ],
    )
    func.__signature__ = sig.replace(parameters=params)
    return func


@_many_checkpoints
@common_options
def track_cli(
    common: CommonArgs,
    matrix: Annotated[
        str,
        typer.Option(
            "--matrix",
            help="Comma-separated matrices: " + ", ".join(MATRIX_NAMES) + ". " + matrix_help(),
        ),
    ] = "hessian",
    top: Annotated[int, typer.Option("--top", help="Largest eigenvalues per matrix.")] = 3,
    bottom: Annotated[int, typer.Option("--bottom", help="Smallest eigenvalues per matrix.")] = 0,
    trace: Annotated[
        bool, typer.Option("--trace", help="Record the trace (Hutch++) with its standard error.")
    ] = False,
    trace_estimator: Annotated[
        str, typer.Option("--trace-estimator", help="hutchpp or hutchinson.")
    ] = "hutchpp",
    trace_probes: Annotated[
        int, typer.Option("--trace-probes", help="Products per trace estimate.")
    ] = 99,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="Each module's top eigenvalue (its own block).")
    ] = False,
    gradient_overlap: Annotated[
        int,
        typer.Option(
            "--gradient-overlap",
            metavar="K",
            help="Record the fraction of the gradient in the top-K eigenspace of each matrix, "
            "with its Davis-Kahan interval (Gur-Ari et al. 2018; K: the number of classes).",
        ),
    ] = 0,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Training step size: draws the stability threshold 2/lr."),
    ] = None,
    momentum: Annotated[
        float | None,
        typer.Option(
            "--momentum",
            help="Heavy-ball momentum of training: the threshold becomes 2(1+momentum)/lr.",
        ),
    ] = None,
    warm_start: Annotated[
        bool,
        typer.Option(
            "--warm-start/--cold-start",
            help="Start each Lanczos run from the previous checkpoint's Ritz vectors.",
        ),
    ] = True,
    compare_cold: Annotated[
        bool,
        typer.Option(
            "--compare-cold",
            help="Also solve every checkpoint from a random start and record both product "
            "counts (what the warm start saved).",
        ),
    ] = False,
    max_matvecs: Annotated[
        int | None,
        typer.Option("--max-matvecs", help="Products per Lanczos run at most."),
    ] = None,
    basis_size: Annotated[
        int | None, typer.Option("--basis-size", help="Lanczos basis vectors at most.")
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option("--rtol", help="Converge each eigenvalue to this relative error bound."),
    ] = None,
    figures: Annotated[
        str,
        typer.Option(
            "--figures",
            help="Figure formats written to OUT/figures (png, pdf, svg; comma-separated), or none.",
        ),
    ] = "png",
    preconditioner: PreconditionerOption = None,
    optimizer_key: OptimizerKeyOption = None,
) -> None:
    """Curvature across training: eigenvalues, trace and per-layer sharpness at every checkpoint."""
    with guarded():
        from .._errors import OptionError
        from ..app import TRACE_ESTIMATORS, track
        from ..report import TRACK_FIGURES, remove_stale_figures, save_figures
        from ._common import parse_list, prepare_torch

        prepare_torch(common)  # --threads (and the default threads) as every command
        if common.max_memory is not None:
            raise OptionError(
                "--max-memory is not taken by track, which plans no memory yet; leave it out "
                "(each checkpoint needs what spectrum --top/--bottom would on one)."
            )
        if trace_estimator not in TRACE_ESTIMATORS:
            raise OptionError(
                f"--trace-estimator {trace_estimator!r} is not known; choose "
                f"{', '.join(TRACE_ESTIMATORS)}."
            )
        formats = (
            []
            if figures.strip().lower() == "none"
            else parse_list(figures, "--figures", ["png", "pdf", "svg"])
        )
        check_preconditioner_flag(preconditioner, optimizer_key)
        refuse_shard(common, "track")
        t0 = time.perf_counter()
        checkpoints = [str(c) for c in common.model_path]
        common.model_path = Path(checkpoints[0]) if checkpoints else Path()
        kwargs = load_kwargs(common)
        seed = kwargs.pop("seed")
        kwargs.pop("data")  # given positionally
        settings = {
            **{k: v for k, v in common.settings().items() if k != "model_path"},
            "trace_estimator": trace_estimator if trace else None,
            "figures": formats,
        }
        check_out_dir(common.out)
        prepare_torch(common)
        # the run starts here: an interrupted track of the same command resumes (track()
        # keeps its finished rows), another command's unfinished folder is refused
        start_run(common, "track")
        with progress_bar() as update:
            run = track(
                checkpoints,
                common.data,
                matrices=matrix,
                top=top,
                bottom=bottom,
                trace=trace_estimator if trace else False,
                trace_probes=trace_probes,
                per_layer=per_layer,
                gradient_overlap=gradient_overlap,
                lr=lr,
                momentum=momentum,
                tol=common.tol,
                rtol=rtol,
                max_matvecs=max_matvecs if max_matvecs is not None else common.max_iter,
                basis_size=basis_size,
                seed=seed,
                warm_start=warm_start,
                compare_cold=compare_cold,
                hvp=common.hvp,
                basis_device=common.basis_device,
                out=common.out,
                settings=settings,
                progress=update,
                resume=not common.overwrite,
                preconditioner=preconditioner,
                optimizer_key=optimizer_key,
                **kwargs,
            )
        # figures from every row, kept ones included; a figure this run did not make goes
        paths = save_figures(run.document, common.out / "figures", tuple(formats))
        remove_stale_figures(common.out / "figures", paths, TRACK_FIGURES)
        _print(run, paths, time.perf_counter() - t0)


def _print(run, figures, seconds) -> None:
    """The checkpoints' table, then the stability threshold, warm start, notes and files."""
    doc = run.document
    console.print(_table(doc))
    _print_footer(run, figures, seconds)


def _table(doc: dict) -> Table:
    """One row a checkpoint: loss, gradient norm, each matrix's columns, products."""
    rows = doc["results"]["track"]
    settings = doc["settings"]
    matrices = list(settings["matrix"])
    matrices += [
        m for r in rows for m in r.get("eigenvalues") or {} if m not in matrices
    ]
    matrices = list(dict.fromkeys(matrices))
    table = Table(
        title=f"{len(rows)} checkpoints, {doc['input']['data']['num_samples']} "
        f"samples, {doc['input']['dtype']}",
        title_style="bold",
    )
    table.add_column("step", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("grad norm", justify="right")
    for m in matrices:
        table.add_column(f"{m} top", justify="right")
        if settings["bottom"]:
            table.add_column(f"{m} bottom", justify="right")
        if settings["trace"]:
            table.add_column(f"{m} trace ± se", justify="right")
        if settings.get("gradient_overlap"):
            table.add_column(f"{m} grad in top-{settings['gradient_overlap']}", justify="right")
    table.add_column("products", justify="right")
    for r in rows:
        cells = [
            str(r["step"]) if r["step"] is not None else f"#{r['index']}",
            f"{r['loss']:.5g}",
            f"{r['grad_norm']:.3g}",
        ]
        for m in matrices:
            cells += _matrix_cells(r, m, settings)
        cells.append(str(r["num_matvecs"]))
        table.add_row(*cells)
    return table


def _matrix_cells(r: dict, m: str, settings: dict) -> list[str]:
    """Row ``r``'s cells for matrix ``m``: top, bottom, trace, gradient overlap as asked."""
    if m not in r["eigenvalues"]:
        # one "-" per column this matrix has, the gradient overlap's included
        return ["-"] * (
            1 + bool(settings["bottom"]) + bool(settings["trace"])
            + bool(settings.get("gradient_overlap"))
        )
    cells = []
    ev = r["eigenvalues"][m]
    conv = all(all(v) for v in r["converged"][m].values())
    top = ev.get("top") or []
    cells.append(f"{top[0]:.5g}" + ("" if conv else " [red](nc)[/]") if top else "-")
    if settings["bottom"]:
        bot = ev.get("bottom") or []
        cells.append(f"{bot[0]:.4g}" if bot else "-")
    if settings["trace"]:
        t = r["trace"][m]
        cells.append(f"{t['estimate']:.5g} ± {t['stderr']:.2g}")
    if settings.get("gradient_overlap"):
        o = (r.get("gradient_overlap") or {}).get(m)
        cells.append(f"{o['fraction']:.3f} [{o['lower']:.3f}, {o['upper']:.3f}]" if o else "-")
    return cells


def _print_footer(run, figures, seconds) -> None:
    """Batching, stability threshold, last optimiser, warm start, notes, counts, files."""
    doc = run.document
    res = doc["results"]
    rows = res["track"]
    line = batch_line(doc.get("input") or {})
    if line:
        console.print(f"[yellow]{escape(line)}[/]", highlight=False)
    stab = res.get("stability")
    if stab:
        console.print(
            f"Stability threshold 2(1+momentum)/lr = {stab['threshold']:.5g} "
            f"(lr {stab['lr']:g}, momentum {stab['momentum']:g})."
        )
    last = next((r["optimizer"] for r in reversed(rows) if "optimizer" in r), None)
    if last is not None and last.get("optimizer") is not None or (
        last is not None and last.get("source") == "file"
    ):
        console.print(
            escape(describe_preconditioner(last)).replace("Preconditioner:", "Last row:", 1),
            highlight=False,
        )
    ws = res["warm_start"]
    if ws.get("matvecs_cold"):
        console.print(
            f"Warm start: {ws['matvecs']} Lanczos products against {ws['matvecs_cold']} from "
            f"random starts ({100 * ws['saving']:.0f}% saved; eigenvalues agree to "
            f"{ws['max_eigenvalue_difference']:.1e})."
        )
    for note in doc.get("notes") or []:
        console.print(f"[dim]{escape(note)}[/]")
    console.print(
        f"{doc['counts']['matvecs']} matrix-vector products in {seconds:.1f} s. "
        + escape(f"Result: {run.path}")
    )
    if figures:
        console.print(escape(f"Figures: {', '.join(str(p) for p in figures)}"))


def register(app: typer.Typer) -> None:
    """Add ``track`` to the app."""
    app.command("track", no_args_is_help=True)(track_cli)
