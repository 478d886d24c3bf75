"""``curvscope check``: gradient test, Taylor test and the convexity certificate."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from .._errors import OptionError
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
    print_table,
    table,
)

__all__ = ["check_cli", "register"]


def _verdict(passed) -> str:
    return {True: "[green]passed[/]", False: "[red]failed[/]", None: "[yellow]inconclusive[/]"}[
        passed
    ]


@common_options
def check_cli(
    common: CommonArgs,
    directions: Annotated[
        int, typer.Option("--directions", help="Random unit directions per test.")
    ] = 2,
    eigen_directions: Annotated[
        int,
        typer.Option("--eigen-directions", help="Top Hessian eigenvectors as extra directions."),
    ] = 1,
) -> None:
    """Are the derivatives right, and where is the layer-wise Hessian provably convex?"""
    with guarded():
        t0 = time.perf_counter()
        if directions < 0 or eigen_directions < 0:
            raise OptionError("--directions and --eigen-directions must be non-negative.")
        session = open_session(common)
        from ..diagnostics import check

        planned = _plan(session, directions, eigen_directions)
        settings = {"directions": directions, "eigen_directions": eigen_directions}
        with computing(session, "check", settings, planned) as update:
            result = check(
                session.problem,
                directions=directions,
                eigen_directions=eigen_directions,
                seed=common.seed,
                progress=update,
            )
        path = finish(
            session,
            "check",
            settings=settings,
            results=result.to_results(),
            timings={"total_s": time.perf_counter() - t0},
            counts={"matvecs": result.num_matvecs},
        )
    _print(result, session, path)


def _plan(session, directions: int, eigen_directions: int) -> int:
    """Plan the memory and announce the products.

    Eigenvectors; per direction 2 x len(STEPS) losses (gradient test), len(STEPS) losses and
    one product (Taylor, float64 and the float32 floor); the certificate's Lanczos.
    """
    from ..diagnostics import DERIVATIVE_STEPS as STEPS
    from .spectrum import lanczos_basis, lanczos_products

    n = session.problem.num_params
    dirs = directions + eigen_directions
    plan_memory(
        session,
        matrices=["hessian"],
        vectors=2 * max(eigen_directions, 1),
        basis=lanczos_basis(session, "all", max(eigen_directions, 1), None),
    )
    return announce(
        f"gradient and Taylor tests along {directions} random and {eigen_directions} "
        "eigenvector directions, convexity certificate",
        (lanczos_products(eigen_directions, n) if eigen_directions else 0)
        + dirs * (4 * len(STEPS) + 6)
        + lanczos_products(1, n),
        session,
    )


def _print(result, session, path) -> None:
    """The derivative checks' table, their notes and the float32 floor, then the certificate."""
    evaluated_in = result.checks[0].get("evaluated_in", "float64")
    t = table(
        f"derivative checks (evaluated in {evaluated_in})",
        ["check", "verdict", "slopes by direction", "reason"],
    )
    for c in result.checks[:2]:
        slopes = "; ".join(
            ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in d["slopes"].items())
            for d in c["directions"]
        )
        t.add_row(c["name"], _verdict(c["passed"]), slopes, c["reason"])
    print_table(t)
    print_batch_line(session)
    for note in result.checks[0].get("notes") or []:
        console.print(f"[yellow]{note}[/]", highlight=False)
    taylor = result.checks[1]
    f32 = taylor.get("float32_floor") or {}
    if f32:
        console.print(
            f"float32 round-off floor: e1 reaches {f32['e1_min']:.1e}, e2 {f32['e2_min']:.1e} "
            f"and stops decreasing at h = {f32['e2_stops_decreasing_at_h']:.0e}."
        )
    _print_certificate(result.checks[2])
    console.print(f"Result: {path}")


def _print_certificate(conv: dict) -> None:
    """The convexity certificate, one row per hidden layer."""
    ccols = [
        "layer",
        "activation",
        "satisfied",
        "as printed (eq. 32)",
        "certified",
        "min eigenvalue",
        "residual",
    ]
    ctable = table(
        "convexity certificate (each hidden layer's diagonal block only)",
        ccols,
        numbers=ccols[2:],
    )
    for layer in conv["layers"]:
        ctable.add_row(
            layer["name"],
            layer["activation"],
            f"{layer['fraction_satisfied']:.1%}",
            f"{layer['fraction_satisfied_as_printed']:.1%}",
            "[green]yes[/]" if layer["certified"] else "no",
            f"{layer['min_eigenvalue']:.3e}",
            f"{layer['min_eigenvalue_residual']:.1e}",
        )
    if conv["layers"]:
        print_table(ctable)
    console.print(f"[dim]{conv['reason']}[/]")


def register(app: typer.Typer) -> None:
    """Add ``check`` to the app."""
    app.command("check", no_args_is_help=True)(check_cli)
