"""``curvscope spectrum``: extreme eigenvalues with residuals, whole model or per block."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

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
    plan_memory,
    print_batch_line,
    print_findings,
    print_table,
    table,
)
from ._names import MATRIX_NAMES, matrix_help, matrix_names
from ._precond import (
    OptimizerKeyOption,
    PreconditionerOption,
    check_preconditioner_flag,
    describe_preconditioner,
    read_cli_preconditioner,
)

__all__ = ["register", "spectrum_cli"]


@common_options
def spectrum_cli(
    common: CommonArgs,
    matrix: Annotated[
        str,
        typer.Option(
            "--matrix",
            help="Comma-separated matrices: " + ", ".join(MATRIX_NAMES) + ". " + matrix_help(),
        ),
    ] = "hessian",
    top: Annotated[int, typer.Option("--top", help="Largest eigenvalues per block.")] = 5,
    bottom: Annotated[
        int | None,
        typer.Option(
            "--bottom", help="Smallest eigenvalues per block (default: 2; 0 with --method power)."
        ),
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help="lanczos or power (Suk Alg. 5, shifted for top/bottom).")
    ] = "lanczos",
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="Each module's block (weight and bias together).")
    ] = False,
    per_param: Annotated[
        bool, typer.Option("--per-param", help="Each parameter tensor's block.")
    ] = False,
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats", help="Recompute on R random subsets of --samples N and report the spread."
        ),
    ] = 0,
    save_eigenvectors_: Annotated[
        bool,
        typer.Option(
            "--save-eigenvectors", help="Write OUT/eigenvectors.pt for surface --directions."
        ),
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 3 when a requested pair did not converge.")
    ] = False,
    max_matvecs: Annotated[
        int | None,
        typer.Option(
            "--max-matvecs",
            help="Lanczos: products at most, the final residual check included (default: "
            "from the pairs asked for; --max-iter means the same for Lanczos).",
        ),
    ] = None,
    basis_size: Annotated[
        int | None,
        typer.Option(
            "--basis-size",
            help="Lanczos basis vectors at most (default: from the pairs and the memory "
            "budget); restarts keep the best Ritz vectors of both ends.",
        ),
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option(
            "--rtol",
            help="Converge each eigenvalue to this relative accuracy (error bound / |lambda|) "
            "instead of --tol.",
        ),
    ] = None,
    preconditioner: PreconditionerOption = None,
    optimizer_key: OptimizerKeyOption = None,
    gradient_overlap: Annotated[
        int,
        typer.Option(
            "--gradient-overlap",
            metavar="K",
            help="Also the fraction of the full-data gradient in the top-K eigenspace of each "
            "matrix and block, with its Davis-Kahan interval (Gur-Ari et al. 2018); --top is "
            "raised to K+1 where smaller.",
        ),
    ] = 0,
) -> None:
    """Extreme eigenvalues of the Hessian (or GGN, Fisher, PCH, KFAC), each with its residual."""
    with guarded():
        t0 = time.perf_counter()
        if bottom is None:
            # power iteration finds the bottom end only on a shifted operator, slowly and often
            # unconverged (issue 14): ask for it explicitly there
            bottom = 0 if method == "power" else 2
        matrices = matrix_names(matrix)
        blocks = block_mode(per_layer, per_param, common.group)
        solve_top, repeat_samples = _check_counts(common, top, bottom, gradient_overlap, repeats)
        check_preconditioner_flag(preconditioner, optimizer_key)
        if common.shard:
            _check_shard(method, blocks, repeats, save_eigenvectors_, preconditioner,
                         gradient_overlap)
        session = open_session(common)
        from ..diagnostics import spectrum

        pre = _preconditioner(session, preconditioner, optimizer_key)
        pre_record = pre.to_dict() if pre is not None else None
        ops, _ = session.operators(matrices, preconditioner=pre)
        planned_basis, fitted, planned = _plan(
            session, matrices, blocks, solve_top, bottom, method, repeats, basis_size
        )
        settings = {
            "matrix": matrices,
            "top": top,
            "bottom": bottom,
            "method": method,
            "blocks": blocks,
            "repeats": repeats,
            "repeat_samples": repeat_samples,
            "max_matvecs": max_matvecs,
            "basis_size": basis_size,
            "rtol": rtol,
            "gradient_overlap": gradient_overlap or None,
            "save_eigenvectors": save_eigenvectors_,
            "strict": strict,
            "preconditioner": preconditioner,
            "optimizer_key": optimizer_key,
        }
        with computing(
            session, "spectrum", settings, planned,
            show=lambda part, path: _print(part, session, path, False),
        ) as update:
            result = spectrum(
                ops,
                blocks=blocks,
                top=top,
                bottom=bottom,
                method=method,
                tol=common.tol,
                max_iter=max_matvecs if max_matvecs is not None else common.max_iter,
                seed=common.seed,
                repeats=repeats,
                samples=repeat_samples,
                rtol=rtol,
                # the plan's size only where it shrank the basis: other blocks keep their own
                basis_size=fitted.size if fitted.size != planned_basis else basis_size,
                basis_device=fitted.device,
                progress=update,
                gradient_overlap=gradient_overlap,
            )
        results, notes = _results_and_notes(session, result, pre_record, save_eigenvectors_)
        doc_path = finish(
            session,
            "spectrum",
            settings=settings,
            results=results,
            timings={"total_s": time.perf_counter() - t0},
            counts={"matvecs": result.num_matvecs},
            notes=notes,
        )
        _print(result, session, doc_path, save_eigenvectors_)
        if pre_record is not None:
            _print_threshold(pre_record, result)
    if strict and not result.all_converged:
        raise typer.Exit(code=3)


def _plan(
    session, matrices: list[str], blocks, top: int, bottom: int, method: str, repeats: int,
    basis_size: int | None,
) -> tuple[int, Any, int]:
    """Plan the run's memory and announce its products.

    Returns the basis planned at first, what the plan fitted (a smaller basis, or one kept
    elsewhere, where the first does not fit; refused when nothing fits) and the products.
    """
    planned_basis = (
        lanczos_basis(session, blocks, top + bottom, basis_size) if method != "power" else 0
    )
    fitted = plan_memory(
        session,
        matrices=matrices,
        vectors=2 * (top + bottom),
        basis=planned_basis,
        k=top + bottom,
        explicit_basis=basis_size is not None,
        movable=True,
    )
    planned = announce(
        *spectrum_plan(session, matrices, blocks, top, bottom, method, repeats),
        session,
    )
    return planned_basis, fitted, planned


def _results_and_notes(
    session, result, pre_record: dict | None, save_eigenvectors: bool
) -> tuple[dict, list[str]]:
    """The document's results and notes: the preconditioner's, where eigenvectors went."""
    notes = list(result.notes)
    results = result.to_results()
    if pre_record is not None:
        results["preconditioner"] = pre_record
        notes += pre_record["notes"]
        notes.append(
            "the matrices are P^-1/2 A P^-1/2, whose eigenvalues are those of P^-1 A "
            "(Cohen et al. 2022, arXiv 2207.14484); an eigenvector u of it gives P^-1/2 u, "
            "one of P^-1 A."
        )
    if save_eigenvectors:
        notes.append(f"eigenvectors written to {_save_vectors(session, result)}")
    return results, notes


def _check_shard(method, blocks, repeats, save, preconditioner, gradient_overlap) -> None:
    """Refuse, in one sentence, what ``--shard`` cannot do (docs/sharded.md)."""
    given = [
        flag
        for flag, on in (
            ("--method power", method == "power"),
            (f"--{blocks} blocks", blocks != "all"),
            ("--repeats", bool(repeats)),
            ("--save-eigenvectors", save),
            ("--preconditioner", preconditioner is not None),
            ("--gradient-overlap", bool(gradient_overlap)),
        )
        if on
    ]
    if given:
        raise OptionError(
            f"--shard computes the whole-model Hessian spectrum by Lanczos only; drop "
            f"{', '.join(given)} or --shard.",
            option="shard",
        )


def _check_counts(
    common, top: int, bottom: int, gradient_overlap: int, repeats: int
) -> tuple[int, int | None]:
    """``(top pairs to solve for, subset size of --repeats)``; refuses impossible counts.

    With ``--repeats``, ``--samples`` is the size of each random subset: the reported
    eigenvalues themselves use all the data.
    """
    if top < 0 or bottom < 0 or top + bottom == 0:
        raise OptionError(
            f"--top {top} --bottom {bottom}: ask for at least one eigenvalue (and none "
            "negative)."
        )
    if gradient_overlap < 0:
        raise OptionError(f"--gradient-overlap {gradient_overlap} must be >= 0.")
    solve_top = max(top, gradient_overlap + 1) if gradient_overlap else top
    repeat_samples = None
    if repeats:
        if common.samples is None:
            raise OptionError("--repeats R needs --samples N, the size of each subset.")
        repeat_samples, common.samples = common.samples, None
    return solve_top, repeat_samples


def _preconditioner(session, preconditioner: str | None, optimizer_key: str | None):
    """The optimiser's diagonal P of ``--preconditioner`` (``None`` without the flag)."""
    if preconditioner is None:
        return None
    pre = read_cli_preconditioner(
        preconditioner,
        session.common.model_path,
        session.problem.model,
        session.problem.names,
        optimizer_key,
    )
    if not pre.preconditions:
        raise OptionError(
            f"--preconditioner {preconditioner}: the optimiser state is {pre.optimizer}'s, "
            "which divides its step by nothing, so there is no preconditioned matrix; "
            "its threshold applies to the plain spectrum (curvscope track "
            "--preconditioner checkpoint draws it)."
        )
    return pre


def _save_vectors(session, result) -> Path:
    """``--save-eigenvectors``: the eigenvector file beside the document."""
    from ..io import save_eigenvectors

    return save_eigenvectors(
        session.common.out / "eigenvectors.pt",
        model_sha256=session.input_info["model"]["sha256"],
        param_names=session.problem.names,
        param_shapes=session.problem.shapes,
        entries=[
            {"matrix": e.matrix, "block": e.block, "which": e.which,
             "eigenvalues": e.eigenvalues, "vectors": v}
            for e, v in zip(result.spectra, result.eigenvectors, strict=True)
        ],
    )


def lanczos_products(k: int, n: int) -> int:
    """About how many products thick-restart Lanczos takes for ``k`` pairs of an n x n matrix.

    Measured on the examples: top-5 + bottom-2 of a 1.8k-parameter MLP took about 60.
    """
    return min(n + k, 4 * k + 32)


def lanczos_basis(session, blocks: str, k: int, basis_size: int | None) -> int:
    """Basis vectors thick-restart Lanczos will hold for ``k`` pairs of the largest block."""
    from ..linalg import default_basis_size

    n = max(block_sizes(session.problem, blocks))
    item = 8 if session.problem.dtype.itemsize == 8 else 4
    return min(n, basis_size) if basis_size else default_basis_size(k, n, itemsize=item)


def block_sizes(problem, blocks: str) -> list[int]:
    """Rows of each block ``--per-layer``/``--per-param``/``--group`` gives (or all)."""
    if blocks == "all":
        return [problem.num_params]
    slices = problem.param_slices()
    names = {
        "per-layer": lambda: list(problem.module_blocks()),
        "per-param": lambda: list(problem.names),
        "per-group": lambda: list(problem.groups),
    }[blocks]()
    sizes = []
    for name in names:
        parts = problem.block_param_names(name)
        sizes.append(sum(slices[p].stop - slices[p].start for p in parts))
    return sizes


def spectrum_plan(session, matrices, blocks, top, bottom, method, repeats) -> tuple[str, int]:
    """What ``spectrum`` will do and about how many products it takes."""
    sizes = block_sizes(session.problem, blocks)
    k = top + bottom
    if method == "power":
        per = [100 * k for n in sizes]  # about 100 iterations a pair (Suk Alg. 5)
    else:
        per = [lanczos_products(k, n) for n in sizes]
    products = len(matrices) * sum(per) * (1 + repeats)
    ends = " + ".join(f"{w}-{n}" for w, n in (("top", top), ("bottom", bottom)) if n)
    where = "" if blocks == "all" else f" in each of {len(sizes)} blocks"
    what = f"{', '.join(matrices)} {ends}{where} by {'Lanczos' if method != 'power' else method}"
    if repeats:
        what += f", on {repeats} subsets as well"
    return what, products


def _print(result, session, doc_path, saved) -> None:
    """The eigenvalue table, the gradient-overlap table, the notes and the footer."""
    p = session.problem
    title = (
        f"{p.num_params} parameters, {p.num_samples} samples, {session.input_info['loss']} "
        f"({session.input_info['reduction']}), {session.input_info['dtype']}"
        + (", train mode" if p.train_mode else "")
    )
    has_spread = any(e.spread for e in result.spectra)
    spread_col = ["subset mean ± std"] if has_spread else []
    t = table(
        title,
        ["matrix", "block", "end", "#", "eigenvalue", "residual", "error bound", "converged"]
        + spread_col,
        numbers=["#", "eigenvalue", "residual", "error bound", *spread_col],
        center=["converged"],
    )
    for e in result.spectra:
        for i, (lam, res, ok) in enumerate(
            zip(e.eigenvalues, e.residual_norms, e.converged, strict=True)
        ):
            row = [
                e.matrix if i == 0 else "",
                e.block if i == 0 else "",
                e.which if i == 0 else "",
                str(i + 1),
                f"{lam: .6g}",
                f"{res:.2e}",
                f"{e.error_bounds[i]:.1e}" if e.error_bounds else "-",
                "[green]yes[/]" if ok else "[red]no[/]",
            ]
            if has_spread:
                row.append(
                    f"{e.spread['mean'][i]:.4g} ± {e.spread['std'][i]:.2g}" if e.spread else ""
                )
            t.add_row(*row)
        t.add_section()
    print_table(t)
    _print_overlap(result)
    print_batch_line(session)
    print_findings(result.notes)
    _print_footer(result, session, doc_path, saved)


def _print_overlap(result) -> None:
    """``--gradient-overlap``: the gradient's share of each top-k eigenspace."""
    if not result.gradient_overlap:
        return
    o = table(
        "Gradient in the top-k eigenspace, ||Pi_k g||^2 / ||g||^2",
        ["matrix", "block", "k", "fraction", "interval", "gap", "||g||"],
        numbers=["k", "fraction", "interval", "gap", "||g||"],
    )
    for e in result.gradient_overlap:
        o.add_row(
            e.matrix,
            e.block,
            str(e.k),
            f"{e.fraction:.4f}",
            f"[{e.lower:.4f}, {e.upper:.4f}]",
            "-" if e.gap is None else f"{e.gap:.3g}",
            f"{e.grad_norm:.3g}",
        )
    print_table(o)


def _print_footer(result, session, doc_path, saved) -> None:
    """Unconverged pairs and what would help, the products, how bounds are set, the paths."""
    unconverged = sum(not c for e in result.spectra for c in e.converged)
    precision = session.problem.precision
    if unconverged:
        console.print(
            f"[yellow]{unconverged} pair(s) did not reach residual <= tol x ||A||; "
            + (
                f"the model computes in {str(precision.computes_in).removeprefix('torch.')} "
                f"({precision.where[0]}...), whose round-off no product count overcomes: "
                "cast those operations to the run's dtype in the model's code, or loosen "
                "--tol.[/]"
                if precision.lowered
                else "raise --max-matvecs or --basis-size, or loosen --tol.[/]"
            )
        )
    asked = session.common.tol
    used = max((e.tol for e in result.spectra if e.tol is not None), default=asked)
    if used > asked * (1 + 1e-9):
        console.print(
            f"--tol was raised from {asked:.3g} to {used:.3g} (the largest of its blocks): to "
            f"the round-off of the products in {str(session.problem.dtype).removeprefix('torch.')}"
            ", 4 eps sqrt(P) on P parameters, below which no error bound falls, or to the "
            "residuals that stalled there (up to twice it).",
            highlight=False,
        )
    in_float32 = str(session.problem.dtype) != "torch.float64"
    floored = any(
        b is not None and b > r
        for e in result.spectra
        for b, r in zip(e.error_bounds or [], e.residual_norms, strict=False)
    )
    console.print(
        f"{result.num_matvecs} matrix-vector products. The error bound is min(r, r^2/gap) "
        "(r: residual)"
        + (
            ", and at least the round-off of one product in its dtype (4 eps sqrt(P) ||A||),"
            " which sets the bounds larger than r here"
            + (
                f" (eps of {str(precision.computes_in).removeprefix('torch.')}, what the model"
                " computes in)"
                if precision.lowered
                else " (--dtype float64 lowers it)" if in_float32 else ""
            )
            if floored
            else ""
        )
        + f". Result: {doc_path}"
    )
    if saved:
        console.print(f"Eigenvectors: {doc_path.parent / 'eigenvectors.pt'}")


def _print_threshold(record, result) -> None:
    console.print(describe_preconditioner(record), highlight=False)
    tops = [e for e in result.spectra if e.which == "top" and e.block == "all" and e.eigenvalues]
    for t in record.get("thresholds") or []:
        if t is None:
            continue
        for e in tops:
            lam = float(e.eigenvalues[0])
            console.print(
                f"{e.matrix}: lambda_1 = {lam:.5g} is {100 * lam / t:.0f}% of the threshold "
                f"{t:.5g}" + (" (above: unstable on a quadratic)." if lam > t else "."),
                highlight=False,
            )
        if len(set(record["thresholds"])) == 1:
            break


def register(app: typer.Typer) -> None:
    """Add ``spectrum`` to the app."""
    app.command("spectrum", no_args_is_help=True)(spectrum_cli)
