"""The analyses behind ``curvscope report``: run each part, write its document, render the page.

Each part (spectrum, density, check, compare, surface, solve) is a function of the problem
that calls the same library function the individual command calls and returns its result
document. Which matrices a part uses comes from the registry
(:func:`curvscope.operators.report_matrices`); a matrix the model does not support is left
out with the reason its error carries (``error.matrix``), and a part the model does not
support is recorded as skipped. Rendering is :mod:`curvscope.report`'s job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._errors import CurvscopeError, OptionError, UnsupportedModelError, arg
from ..io import write_atomic, write_document
from ..linalg import EigenResult
from ..operators import build_operators, report_matrices
from ..problem import Problem
from ..report import PARTS, SKIPPED_FILE, Rendered, render_documents
from ._documents import document

__all__ = ["PARTS", "PRESETS", "SKIPPED_FILE", "ReportRun", "run_report"]

Progress = Callable[[int, int, str], None]

PRESETS = ("quick", "full")
SOLVE_FULL = ("gd", "lbfgs", "nlcg", "newton-cg", "hf", "eacg", "mk")
SOLVE_MAX_ITER = 30


ReportRun = Rendered
"""What :func:`run_report` wrote: the page, the documents, figures, skips and timings."""


@dataclass
class _Context:
    """What every part needs: the problem, the preset's choices and what was skipped."""

    problem: Problem
    preset: str
    seed: int
    tol: float
    max_iter: int | None
    base_settings: dict[str, Any]
    progress: Progress | None
    skipped: list[dict[str, str]] = field(default_factory=list)
    eigen: EigenResult | None = None

    @property
    def full(self) -> bool:
        return self.preset == "full"

    def operators(self, names: list[str], part: str) -> dict:
        """The part's operators; unsupported ones are recorded as skipped (from the error)."""
        ops, skipped = build_operators(
            self.problem, names, seed=self.seed, skip_unsupported=True
        )
        for s in skipped:
            self.skipped.append({"part": f"{part}: {s['matrix']}", "reason": s["reason"]})
        if not ops:
            raise UnsupportedModelError(
                f"no matrix of the {part} part supports this model ("
                + "; ".join(f"{s['matrix']}: {s['reason']}" for s in skipped)
                + ")."
            )
        return ops

    def document(self, part: str, settings: dict, results: dict, t0: float, passes: int,
                 matvecs: int, notes: list[str]) -> dict:
        return document(
            self.problem,
            part,
            settings={**self.base_settings, "preset": self.preset, **settings},
            results=results,
            started=t0,
            passes_before=passes,
            matvecs=matvecs,
            notes=notes,
        )


# ---------------------------------------------------------------------------------- parts
def _spectrum(ctx: _Context) -> dict:
    from ..diagnostics import spectrum

    p = ctx.problem
    names = report_matrices(ctx.preset)
    if not ctx.full:
        names = ["hessian"]
    ops = ctx.operators(names, "spectrum")
    per_layer = ctx.full and len(p.module_blocks()) > 1
    blocks = ["all", *p.module_blocks()] if per_layer else ["all"]
    t0, passes = time.perf_counter(), p.data_passes
    res = spectrum(ops, blocks=blocks, top=5, bottom=2, tol=ctx.tol, max_iter=ctx.max_iter,
                   seed=ctx.seed, progress=ctx.progress)
    ctx.eigen = _top_hessian(res)
    settings = {"matrix": list(ops), "blocks": blocks, "top": 5, "bottom": 2,
                "method": "lanczos", "tol": ctx.tol, "max_iter": ctx.max_iter}
    return ctx.document("spectrum", settings, res.to_results(), t0, passes, res.num_matvecs,
                        res.notes)


def _density(ctx: _Context) -> dict:
    from ..diagnostics import density

    p = ctx.problem
    names = ["hessian"] + ([n for n in report_matrices("full") if n in ("ggn", "pch-abs")]
                           if ctx.full else [])
    ops = ctx.operators(names, "density")
    settings = {
        "matrix": list(ops),
        "blocks": ["all"],
        "probes": 20,
        "lanczos_steps": 80 if ctx.full else 30,
        "trace_probes": 100 if ctx.full else 30,
        "exact_trace_max": 2000 if ctx.full else 0,
    }
    t0, passes = time.perf_counter(), p.data_passes
    res = density(ops, blocks=["all"], num_probes=20, num_steps=settings["lanczos_steps"],
                  trace_probes=settings["trace_probes"],
                  exact_trace_max=settings["exact_trace_max"], seed=ctx.seed,
                  progress=ctx.progress)
    return ctx.document("density", settings, res.to_results(), t0, passes, res.num_matvecs,
                        res.notes)


def _check(ctx: _Context) -> dict:
    from ..diagnostics import check

    p = ctx.problem
    t0, passes = time.perf_counter(), p.data_passes
    res = check(p, seed=ctx.seed, progress=ctx.progress)
    return ctx.document("check", {}, res.to_results(), t0, passes, res.num_matvecs,
                        list(getattr(res, "notes", [])))


def _compare(ctx: _Context) -> dict:
    from ..diagnostics import compare

    p = ctx.problem
    names = [n for n in report_matrices(ctx.preset) if n != "hessian"]
    if ctx.full:
        from ..operators import compare_defaults

        names = compare_defaults()
    candidates, skipped = build_operators(p, names, seed=ctx.seed, skip_unsupported=True)
    for s in skipped:
        ctx.skipped.append({"part": f"compare: {s['matrix']}", "reason": s["reason"]})
    if not candidates:
        raise UnsupportedModelError(
            "no approximation applies to this model ("
            + "; ".join(f"{s['matrix']}: {s['reason']}" for s in skipped) + ")."
        )
    (H,) = build_operators(p, ["hessian"], seed=ctx.seed)[0].values()
    t0, passes = time.perf_counter(), p.data_passes
    res = compare(H, candidates, tol=ctx.tol, seed=ctx.seed, skipped=skipped,
                  progress=ctx.progress)
    for entry in res.skipped:
        if "block" in entry:
            ctx.skipped.append({"part": f"compare: {entry['matrix']} [{entry['block']}]",
                                "reason": entry["reason"]})
    return ctx.document("compare", {"matrix": list(candidates)}, res.to_results(), t0, passes,
                        res.num_matvecs, [])


def _surface(ctx: _Context) -> dict:
    from ..diagnostics import surface

    p = ctx.problem
    steps = 41 if ctx.full else 21
    t0, passes = time.perf_counter(), p.data_passes
    res = surface(
        p,
        dims=2,
        directions="eigen",
        range_=(-1.0, 1.0),
        steps=steps,
        eigen=ctx.eigen,
        seed=ctx.seed,
        model_sha256=(getattr(p, "input_info", None) or {}).get("model", {}).get("sha256"),
        tol=ctx.tol,
        max_iter=ctx.max_iter,
        progress=ctx.progress,
    )
    settings = {
        "dims": 2,
        "directions": "eigen",
        "range": [-1.0, 1.0],
        "steps": steps,
        "eigenvectors": "from the spectrum part" if ctx.eigen is not None else "computed",
    }
    return ctx.document("surface", settings, {"surface": res}, t0, passes, res.num_matvecs,
                        list(res.notes))


def _solve(ctx: _Context) -> dict | None:
    if not ctx.full:
        ctx.skipped.append(
            {"part": "solve", "reason": "solver runs are in the full preset only."}
        )
        return None
    from ..solvers import SOLVERS, compare_runs, run_solver

    p = ctx.problem
    names = [n for n in SOLVE_FULL if n in SOLVERS]
    t0, passes = time.perf_counter(), p.data_passes
    runs, notes = [], []
    for name in names:
        try:
            runs.append(
                run_solver(p, name, max_iter=SOLVE_MAX_ITER, seed=ctx.seed,
                           progress=ctx.progress, eig_tol=ctx.tol)
            )
        except UnsupportedModelError as exc:
            ctx.skipped.append({"part": f"solve: {name}", "reason": str(exc)})
            notes.append(f"{name} left out: {exc}")
    if not runs:
        raise CurvscopeError("no solver could run on this model.")
    rows = compare_runs(runs)
    for row in rows:
        row.pop("loss_curve", None)
    results = {"solves": [r.to_result() for r in runs], "comparison": rows}
    return ctx.document("solve", {"solver": names, "max_iter": SOLVE_MAX_ITER}, results, t0,
                        passes, sum(r.num_matvecs for r in runs), notes)


_RUNNERS: dict[str, Callable[[_Context], dict | None]] = {
    "spectrum": _spectrum,
    "density": _density,
    "check": _check,
    "compare": _compare,
    "surface": _surface,
    "solve": _solve,
}


def _top_hessian(result: Any) -> EigenResult | None:
    """The Hessian's top pairs of block ``all`` from a spectrum result, for the surface."""
    for entry, vectors in zip(result.spectra, result.eigenvectors, strict=False):
        if entry.matrix == "hessian" and entry.block == "all" and entry.which == "top":
            return EigenResult(
                "top",
                entry.method,
                torch.tensor(entry.eigenvalues, dtype=torch.float64),
                vectors,
                torch.tensor(entry.residual_norms, dtype=torch.float64),
                torch.tensor(entry.converged),
                entry.num_matvecs,
                entry.norm_estimate,
                entry.tol,
                entry.num_iters,
            )
    return None


def _internal(part: str, exc: Exception) -> dict[str, str]:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return {
        "part": part,
        "reason": f"failed with an internal error ({type(exc).__name__}: {first}); this is a "
        "bug in curvscope, please report it.",
    }


def run_report(
    problem: Problem,
    *,
    out_dir: str | Path,
    preset: str = "quick",
    base_settings: dict[str, Any] | None = None,
    seed: int = 0,
    tol: float = 1e-4,
    max_iter: int | None = None,
    plotly_js: str = "inline",
    figure_formats: tuple[str, ...] = ("png",),
    parts: tuple[str, ...] = PARTS,
    progress: Progress | None = None,
) -> ReportRun:
    """Run spectrum, density, checks, comparison, surface (and solvers in ``full``); render.

    The ``quick`` preset: top-5 and bottom-2 Hessian eigenpairs of the whole model, a
    20-probe density (30 Lanczos steps each) with Hutchinson/Hutch++ traces, the derivative
    checks, ``compare`` on the registry's quick matrices (GGN and, for MLPs, PCH), and a
    21 x 21 surface along the top two eigenvectors (reused from the spectrum). ``full`` adds
    the registry's full-report matrices and every layer to spectrum, density and compare,
    80-step density, a 41 x 41 surface and the solver runs.

    Args:
        problem: model, loss, data and parameter selection (``load`` records its input).
        out_dir: folder for the result documents, ``figures/`` and ``report.html``.
        preset: ``quick`` or ``full``.
        base_settings: settings recorded in every document besides the part's own.
        seed: seeds every random choice (probes, start vectors, directions).
        tol: eigenpair tolerance.
        max_iter: Lanczos step limit.
        plotly_js: ``inline`` or a relative path to ``plotly.min.js``.
        figure_formats: matplotlib figure formats written to ``figures/``.
        parts: which parts to attempt (default all).
        progress: ``progress(completed, total, description)``.

    Returns:
        A :class:`ReportRun` with the paths written and what was skipped.

    Raises:
        OptionError: for an unknown preset or part.
    """
    if preset not in PRESETS:
        raise OptionError(f"{arg('preset')} {preset!r} is not known; choose quick or full.")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise OptionError(f"report parts {unknown} are not known; choose from {', '.join(PARTS)}.")
    out = Path(out_dir)
    ctx = _Context(problem, preset, seed, tol, max_iter, dict(base_settings or {}), progress)
    documents: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    timings: dict[str, float] = {}
    interrupted = False
    for part in parts:
        if interrupted:
            ctx.skipped.append({"part": part, "reason": "not run: interrupted (Ctrl-C)."})
            continue
        t0 = time.perf_counter()
        try:
            doc = _RUNNERS[part](ctx)
        except KeyboardInterrupt:
            # keep what finished: the page is rendered below, then the interrupt goes on
            interrupted = True
            ctx.skipped.append({"part": part, "reason": "interrupted (Ctrl-C) while running."})
            doc = None
        except CurvscopeError as exc:
            ctx.skipped.append({"part": part, "reason": str(exc)})
            doc = None
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others
            ctx.skipped.append(_internal(part, exc))
            doc = None
        if doc is not None:
            documents[part] = doc
            paths[part] = write_document(doc, out)
        timings[part] = time.perf_counter() - t0
    html, figures = render_documents(
        documents, out, plotly_js=plotly_js, figure_formats=figure_formats, skipped=ctx.skipped
    )
    # what was skipped and why, so that `report --from DIR` can say it again
    write_atomic(out / SKIPPED_FILE, json.dumps({"skipped": ctx.skipped}, indent=1) + "\n")
    if interrupted:
        raise KeyboardInterrupt
    return ReportRun(html, paths, figures, ctx.skipped, timings)
