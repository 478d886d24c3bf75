"""``curvscope density``: SLQ spectral density and the trace, whole model or per block."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from .._errors import OptionError
from ._common import (
    CommonArgs,
    announce,
    block_mode,
    common_options,
    computing,
    console,
    finish,
    guarded,
    open_session,
    parse_list,
    plan_memory,
    print_batch_line,
    print_findings,
    print_table,
    table,
)
from ._names import MATRIX_NAMES, matrix_names

__all__ = ["density_cli", "register"]


@common_options
def density_cli(
    common: CommonArgs,
    matrix: Annotated[
        str,
        typer.Option(
            "--matrix",
            help="Comma-separated matrices: " + ", ".join(MATRIX_NAMES) + ".",
        ),
    ] = "hessian",
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="Each module's block (weight and bias together).")
    ] = False,
    per_param: Annotated[
        bool, typer.Option("--per-param", help="Each parameter tensor's block.")
    ] = False,
    probes: Annotated[int, typer.Option("--probes", help="SLQ probe vectors.")] = 20,
    lanczos_steps: Annotated[
        int, typer.Option("--lanczos-steps", help="Lanczos steps per probe.")
    ] = 80,
    trace_probes: Annotated[
        int,
        typer.Option(
            "--trace-probes", help="Products for Hutchinson and for Hutch++ each (0: skip)."
        ),
    ] = 100,
    exact_trace_max: Annotated[
        int,
        typer.Option(
            "--exact-trace-max",
            help="Exact trace (P products) for blocks with at most this many rows (0: never).",
        ),
    ] = 2000,
    sigma: Annotated[
        float | None,
        typer.Option("--sigma", help="Gaussian broadening width (default: 1% of the range)."),
    ] = None,
    grid_points: Annotated[
        int, typer.Option("--grid-points", help="Points of the density grid.")
    ] = 1000,
    distribution: Annotated[
        str, typer.Option("--distribution", help="Probe distribution: rademacher or gaussian.")
    ] = "rademacher",
) -> None:
    """Spectral density (stochastic Lanczos quadrature) and trace (Hutchinson, Hutch++, exact)."""
    with guarded():
        t0 = time.perf_counter()
        matrices = matrix_names(matrix)
        blocks = block_mode(per_layer, per_param, common.group)
        parse_list(distribution, "--distribution", ["rademacher", "gaussian"])
        if sigma is not None and not sigma > 0:
            raise OptionError(f"--sigma must be positive, got {sigma}.")
        if grid_points < 2:
            raise OptionError(f"--grid-points must be at least 2, got {grid_points}.")
        session = open_session(common)
        from ..diagnostics import density
        ops, _ = session.operators(matrices)
        from .spectrum import block_sizes

        sizes = block_sizes(session.problem, blocks)
        per = [
            probes * min(lanczos_steps, n)
            + 2 * trace_probes
            + (n if exact_trace_max and n <= exact_trace_max else 0)
            for n in sizes
        ]
        where = "" if blocks == "all" else f" in each of {len(sizes)} blocks"
        fitted = plan_memory(
            session, matrices=matrices, vectors=2, slq_steps=min(lanczos_steps, max(sizes)),
            slq_probes=probes, trace_probes=trace_probes,
        )
        planned = announce(
            f"{', '.join(matrices)} density by SLQ ({probes} probes x {lanczos_steps} steps) "
            f"and traces{where}",
            len(matrices) * sum(per),
            session,
        )
        settings = {
            "matrix": matrices,
            "blocks": blocks,
            "probes": probes,
            "lanczos_steps": lanczos_steps,
            "trace_probes": trace_probes,
            "exact_trace_max": exact_trace_max,
            "sigma": sigma,
            "grid_points": grid_points,
            "distribution": distribution,
        }
        with computing(session, "density", settings, planned) as update:
            result = density(
                ops,
                blocks=blocks,
                num_probes=probes,
                num_steps=lanczos_steps,
                trace_probes=trace_probes,
                exact_trace_max=exact_trace_max,
                num_points=grid_points,
                sigma=sigma,
                distribution=distribution,
                seed=common.seed,
                progress=update,
                probe_block=fitted.probe_block,
            )
        doc_path = finish(
            session,
            "density",
            settings=settings,
            results=result.to_results(),
            timings={"total_s": time.perf_counter() - t0},
            counts={"matvecs": result.num_matvecs},
            notes=result.notes,
        )
        _print(result, session, doc_path)


def _fmt_pm(value: float, err: float) -> str:
    if err == 0:
        return f"{value:.6g}"
    return f"{value:.6g} ± {err:.2g}"


def _print(result, session, doc_path) -> None:
    p = session.problem
    info = session.input_info
    title = (
        f"Trace: {p.num_params} parameters, {p.num_samples} samples, {info['loss']} "
        f"({info['reduction']}), {info['dtype']}"
    )
    cols = [
        "matrix",
        "block",
        "estimator",
        "estimate ± stderr",
        "exact",
        "error / stderr",
        "products",
    ]
    t = table(title, cols, numbers=cols[3:])
    exact = {(t.matrix, t.block): t.estimate for t in result.traces if t.estimator == "exact"}
    slq = {(d.matrix, d.block): d for d in result.densities}
    keys = list(dict.fromkeys([(d.matrix, d.block) for d in result.densities]))
    for key in keys:
        rows = [t for t in result.traces if (t.matrix, t.block) == key]
        d = slq[key]
        ex = exact.get(key)
        entries = [(t.estimator, t.estimate, t.stderr, t.num_matvecs) for t in rows]
        entries.append(("slq", d.slq_trace, d.slq_trace_stderr, d.num_matvecs))
        for i, (name, est, err, mv) in enumerate(entries):
            z = ""
            if ex is not None and name != "exact" and err > 0:
                z = f"{(est - ex) / err:+.2f}"
            t.add_row(
                key[0] if i == 0 else "",
                key[1] if i == 0 else "",
                name,
                _fmt_pm(est, err),
                "" if ex is None else f"{ex:.6g}",
                z,
                str(mv),
            )
        t.add_section()
    print_table(t)
    dcols = ["matrix", "block", "P", "probes", "steps", "min node", "max node", "sigma"]
    dens = table("Spectral density (SLQ)", dcols, numbers=dcols[2:])
    for d in result.densities:
        live = [
            x
            for row, wrow in zip(d.nodes, d.weights, strict=True)
            for x, w in zip(row, wrow, strict=True)
            if w
        ]
        dens.add_row(
            d.matrix,
            d.block,
            str(d.dim),
            str(d.num_probes),
            str(d.lanczos_steps),
            f"{min(live):.4g}",
            f"{max(live):.4g}",
            f"{d.sigma:.3g}",
        )
    print_table(dens)
    print_batch_line(session)
    print_findings(result.notes)
    console.print(
        "[dim]slq: the quadrature's own trace estimate; ± 2 stderr covers the trace in ~95% "
        "of runs (hutchpp: the whole estimate, sketch included).[/]"
    )
    console.print(f"{result.num_matvecs} matrix-vector products. Result: {doc_path}")


def register(app: typer.Typer) -> None:
    """Add ``density`` to the app."""
    app.command("density", no_args_is_help=True)(density_cli)
