"""``curvscope compare``: every approximation against the true Hessian, layer by layer."""

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
from ._names import COMPARE_MATRICES, matrix_names

__all__ = ["compare_cli", "register"]


@common_options
def compare_cli(
    common: CommonArgs,
    matrix: Annotated[
        str,
        typer.Option("--matrix", help="Comma-separated approximations (default: all)."),
    ] = ",".join(COMPARE_MATRICES),
    top_k: Annotated[int, typer.Option("--top-k", help="Eigenvalues and eigenspace size.")] = 5,
    exact_max_dim: Annotated[
        int,
        typer.Option("--exact-max-dim", help="Blocks up to this size are compared densely."),
    ] = 2048,
    probes: Annotated[
        int, typer.Option("--probes", help="Hutchinson probes for larger blocks.")
    ] = 64,
) -> None:
    """Relative error, eigenvalues and eigenspace overlap of GGN, Fisher, PCH, KFAC... per layer."""
    with guarded():
        t0 = time.perf_counter()
        matrices = matrix_names(matrix, approximations_only=True)
        session = open_session(common)
        from ..diagnostics import compare
        candidates, skipped = session.operators(matrices, skip_unsupported=True)
        if not candidates:
            raise OptionError(
                "no requested matrix applies to this model, so nothing is compared: "
                + "; ".join(f"{s['matrix']}: {s['reason']}" for s in skipped)
            )
        (hessian,) = session.operators(["hessian"])[0].values()
        planned = _plan(session, candidates, top_k, exact_max_dim, probes)
        settings = {
            "matrix": matrices,
            "top_k": top_k,
            "exact_max_dim": exact_max_dim,
            "probes": probes,
        }
        with computing(session, "compare", settings, planned) as update:
            result = compare(
                hessian,
                candidates,
                skipped=skipped,
                top_k=top_k,
                exact_max_dim=exact_max_dim,
                hutchinson_probes=probes,
                tol=common.tol,
                seed=common.seed,
                progress=update,
            )
        path = finish(
            session,
            "compare",
            settings=settings,
            results=result.to_results(),
            timings={"total_s": time.perf_counter() - t0},
            counts={"matvecs": result.num_matvecs},
        )
    cols = [
        "layer",
        "matrix",
        "rel. Frobenius error",
        "Chen metric (bias)",
        "top eigenvalue (H)",
        "overlap top-k",
        "min eigenvalue",
    ]
    t = table("approximations against the Hessian, per layer block", cols, numbers=cols[2:])
    last = None
    for r in sorted(result.comparisons, key=lambda r: r.block):
        err = f"{r.rel_frobenius:.3g}" + (
            f" ± {r.rel_frobenius_stderr:.1g}" if r.method == "hutchinson" else " (exact)"
        )
        overlap = sum(r.subspace_overlap) / max(len(r.subspace_overlap), 1)
        t.add_row(
            r.block if r.block != last else "",
            r.matrix,
            err,
            "-" if r.chen_metric is None else f"{r.chen_metric:.3g}",
            f"{r.top_eigenvalues[0]:.4g} ({r.hessian_top_eigenvalues[0]:.4g})",
            f"{overlap:.3f}",
            f"{r.min_eigenvalue:.3g}",
        )
        last = r.block
    print_table(t)
    print_batch_line(session)
    for s in result.skipped:
        console.print(f"[yellow]skipped {s['matrix']}[/]: {s['reason']}")
    console.print(f"Result: {path}")


def _plan(session, candidates: dict, top_k: int, exact_max_dim: int, probes: int) -> int:
    """Plan the memory and announce the products.

    Per block: the reference (dense up to ``--exact-max-dim``, else probes) and each candidate
    alike, plus top-k Lanczos runs for eigenvalues and overlaps.
    """
    from .spectrum import block_sizes, lanczos_basis, lanczos_products

    sizes = block_sizes(session.problem, "per-layer")
    plan_memory(
        session,
        matrices=["hessian", *candidates],
        vectors=2 * (top_k + 1),
        basis=lanczos_basis(session, "per-layer", top_k + 1, None),
    )
    per = [
        (1 + len(candidates))
        * ((n if n <= exact_max_dim else probes) + lanczos_products(top_k, n))
        for n in sizes
    ]
    return announce(
        f"{', '.join(candidates)} against the Hessian in {len(sizes)} layer blocks",
        sum(per),
        session,
    )


def register(app: typer.Typer) -> None:
    """Add ``compare`` to the app."""
    app.command("compare", no_args_is_help=True)(compare_cli)
