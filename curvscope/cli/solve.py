"""``curvscope solve``: run several solvers from the same weights and explain what each did."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .._errors import OptionError
from ._common import (
    CommonArgs,
    announce,
    check_paths,
    common_options,
    console,
    err_console,
    finish,
    guarded,
    open_session,
    parse_list,
    plan_memory,
    print_batch_line,
    print_table,
    progress_bar,
    table,
)
from ._names import SOLVER_NAMES

if TYPE_CHECKING:
    from ..solvers import Finding, SolveRun

__all__ = ["register", "solve_cli", "solve_results"]

DEFAULT_SOLVERS = "gd,lbfgs,nlcg,newton-cg,hf,eacg,mk"
DEFAULT_MAX_ITER = 50


def solve_results(runs: list[SolveRun]) -> dict[str, Any]:
    """``results`` of the solve document (docs/DESIGN.md "Result document": ``results.solves``)."""
    from ..solvers import compare_runs

    solves = [run.to_result() for run in runs]
    rows = compare_runs(runs)
    for row in rows:
        row.pop("loss_curve", None)
    return {"solves": solves, "comparison": rows}


def _save_weights(session, run: SolveRun, out: Path) -> Path:
    import copy

    import torch

    from ..io import save_checkpoint

    p = session.problem
    model = copy.deepcopy(p.model)
    values = p.unflatten(run.weights)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            named[name].copy_(value)
    loaded = session.problem.loaded
    meta = dict(getattr(loaded, "meta", None) or {})
    meta["created_by"] = f"curvscope solve --solver {run.solver}"
    path = out / f"solved-{run.solver}.pt"
    save_checkpoint(path, model, getattr(loaded, "arch", None), meta)
    return path


@common_options
def solve_cli(
    common: CommonArgs,
    solver: Annotated[
        str,
        typer.Option(
            "--solver",
            help="Comma-separated solvers: gd, gd-armijo, lbfgs, nlcg, newton-cg, hf, eacg, "
            "eacg-clip, mk, mk-closed-form.",
        ),
    ] = DEFAULT_SOLVERS,
    budget_matvecs: Annotated[
        int | None,
        typer.Option(
            "--budget-matvecs",
            help="Stop a solver once its curvature products plus gradients reach M.",
        ),
    ] = None,
    curvature_every: Annotated[
        int,
        typer.Option(
            "--curvature-every",
            help="Track the extreme Hessian eigenvalues every k iterations (0: off).",
        ),
    ] = 25,
    grad_tol: Annotated[
        float,
        typer.Option("--grad-tol", help="Stop when the gradient norm is at most this."),
    ] = 1e-5,
    mini_batch: Annotated[
        int | None,
        typer.Option(
            "--mini-batch",
            help="Mini-batch mode: a seeded random batch of this size per iteration.",
        ),
    ] = None,
    test_data: Annotated[
        str | None,
        typer.Option("--test-data", help="Held-out data for test loss and accuracy."),
    ] = None,
    save_weights: Annotated[
        bool,
        typer.Option("--save-weights", help="Write OUT/solved-<solver>.pt checkpoints."),
    ] = False,
) -> None:
    """Run solvers from the checkpoint's weights; trace them and explain their convergence."""
    with guarded():
        t0 = time.perf_counter()
        names = parse_list(solver, "--solver", list(SOLVER_NAMES))
        if not names:
            raise OptionError("--solver needs at least one solver name.")
        if curvature_every < 0:
            raise OptionError(f"--curvature-every must be non-negative, got {curvature_every}.")
        if grad_tol < 0:
            raise OptionError(f"--grad-tol must be non-negative, got {grad_tol}.")
        check_paths(common, {"--test-data": test_data})
        session = open_session(common)
        from ..solvers import run_solver

        test_problem = session.test_problem(test_data) if test_data else None
        max_iter = common.max_iter or DEFAULT_MAX_ITER
        planned = _plan(session, names, max_iter, curvature_every, budget_matvecs)
        runs = []
        with progress_bar(session=session, planned=planned) as update:
            for name in names:
                runs.append(
                    run_solver(
                        session.problem,
                        name,
                        max_iter=max_iter,
                        budget_matvecs=budget_matvecs,
                        curvature_every=curvature_every,
                        test_problem=test_problem,
                        seed=session.seed,
                        progress=update,
                        tol=grad_tol,
                        mini_batch=mini_batch,
                        eig_tol=common.tol,
                    )
                )
                if runs[-1].stop_reason == "interrupted":  # Ctrl-C: keep what finished
                    break
        interrupted = runs[-1].stop_reason == "interrupted"
        notes = []
        if interrupted:
            left = names[len(runs) :]
            notes.append(
                f"interrupted (Ctrl-C) during {runs[-1].solver}: its iterations up to then are "
                "kept" + (f"; not run: {', '.join(left)}." if left else ".")
            )
        if save_weights:
            common.out.mkdir(parents=True, exist_ok=True)
            for run in runs:
                notes.append(
                    f"weights of {run.solver} written to {_save_weights(session, run, common.out)}"
                )
        settings = {
            "solver": names,
            "max_iter": max_iter,
            "budget_matvecs": budget_matvecs,
            "curvature_every": curvature_every,
            "grad_tol": grad_tol,
            "mini_batch": mini_batch,
            "test_data": test_data,
            "save_weights": save_weights,
        }
        doc_path = finish(
            session,
            "solve",
            settings=settings,
            results=solve_results(runs),
            timings={
                "total_s": time.perf_counter() - t0,
                **{f"{r.solver}_s": r.wall_time_s for r in runs},
            },
            counts={
                "matvecs": sum(r.num_matvecs + r.diagnostic_matvecs for r in runs),
                "gradients": sum(r.num_gradients for r in runs),
            },
            notes=notes,
            complete=not interrupted,
        )
        if interrupted:
            err_console.print(f"[yellow]partial result (complete: false) written: {doc_path}[/]")
            raise KeyboardInterrupt
        _print(runs, doc_path, session)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _print(runs: list[SolveRun], doc_path: Path, session) -> None:
    from ..solvers import compare_runs

    cols = [
        "solver",
        "iters",
        "final loss",
        "grad norm",
        "products",
        "gradients",
        "time s",
        "test acc",
        "stop",
    ]
    t = table(
        "solvers from the same weights",
        cols,
        numbers=[c for c in cols if c not in ("solver", "stop")],
    )
    for row in compare_runs(runs):
        t.add_row(
            row["solver"],
            str(row["iterations"]),
            _fmt(row["final_loss"], ".6g"),
            _fmt(row["final_grad_norm"], ".2e"),
            str(row["num_matvecs"]),
            str(row["num_gradients"]),
            _fmt(row["wall_time_s"], ".2f"),
            _fmt(row["test_accuracy"], ".4f"),
            row["stop_reason"],
        )
    print_table(t)
    print_batch_line(session)
    for run in runs:
        console.print(f"[bold]{run.solver}[/]")
        for f in run.findings:
            console.print(f"  - {_text(f)}", highlight=False)
    console.print(f"Result: {doc_path}")


def _text(f: Finding) -> str:
    return f.text


def _plan(
    session, names: list[str], max_iter: int, curvature_every: int, budget_matvecs: int | None
) -> int:
    """Plan the memory and announce the products of every solver run."""
    from ..solvers import PRODUCTS_PER_ITERATION
    from .spectrum import lanczos_products

    n = session.problem.num_params
    plan_memory(session, matrices=["hessian"], vectors=12)
    per_run = [
        max_iter * PRODUCTS_PER_ITERATION.get(name, 3)
        + (max_iter // curvature_every + 1) * 2 * lanczos_products(1, n)
        if curvature_every
        else max_iter * PRODUCTS_PER_ITERATION.get(name, 3)
        for name in names
    ]
    if budget_matvecs is not None:
        per_run = [min(p, budget_matvecs) for p in per_run]
    return announce(
        f"{', '.join(names)}: up to {max_iter} iterations each"
        + (f", extreme Hessian eigenvalues every {curvature_every}" if curvature_every else ""),
        sum(per_run),
        session,
    )


def register(app: typer.Typer) -> None:
    """Add ``solve`` to the app."""
    app.command("solve", no_args_is_help=True)(solve_cli)
