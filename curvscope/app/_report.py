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
from ..io import active_run, run_of, write_atomic, write_document
from ..linalg import EigenResult
from ..operators import build_operators, report_matrices
from ..problem import Problem
from ..report import PARTS, SKIPPED_FILE, Rendered, render_documents
from ._documents import document

__all__ = [
    "PARTS",
    "PRESETS",
    "QUICK_BUDGET_S",
    "SKIPPED_FILE",
    "ReportRun",
    "lanczos_products",
    "report_plan",
    "run_report",
]

Progress = Callable[[int, int, str], None]

PRESETS = ("quick", "full")
SOLVE_FULL = ("gd", "lbfgs", "nlcg", "newton-cg", "hf", "eacg", "mk")
SOLVE_MAX_ITER = 30


QUICK_BUDGET_S = 300.0
"""Seconds the quick preset plans for by default: about 5 minutes on 2 CPU cores."""

DENSITY_MIN = (5, 10)  # probes, Lanczos steps: below this a density says little
SURFACE_MIN_STEPS = 7


def lanczos_products(k: int, n: int) -> int:
    """About how many products thick-restart Lanczos takes for ``k`` pairs of an n x n matrix.

    Measured on the examples: top-5 + bottom-2 of a 1.8k-parameter MLP took about 60.
    """
    return min(n + k, 4 * k + 32)


def _block_sizes(problem: Problem) -> list[int]:
    slices = problem.param_slices()
    return [
        sum(slices[p].stop - slices[p].start for p in problem.block_param_names(b))
        for b in problem.module_blocks()
    ]


def _compare_cost(m: int, candidates: int) -> int:
    return (1 + candidates) * (m if m <= 2048 else 64) + lanczos_products(5, m)


def _derivative_steps() -> int:
    from ..diagnostics import DERIVATIVE_STEPS

    return len(DERIVATIVE_STEPS)


def report_plan(problem: Problem, preset: str) -> dict[str, int]:
    """About how many products each part of the report takes at the preset's settings.

    Surface points count as products (a point is one forward pass per batch, about what a
    product costs per column when vmap batches the points).
    """
    from ..solvers import PRODUCTS_PER_ITERATION

    full = preset == "full"
    n = problem.num_params
    layers = _block_sizes(problem)
    matrices = 4 if full else 1
    candidates = 8 if full else 2
    plan = {
        "spectrum": matrices * lanczos_products(7, n) * (1 + (len(layers) if full else 0)),
        "density": 20 * min(80 if full else 30, n)
        + 2 * (100 if full else 30)
        + (n if full and n <= 2000 else 0),
        "check": 2 * lanczos_products(1, n) + 3 * (4 * _derivative_steps() + 6),
        "compare": sum(_compare_cost(m, candidates) for m in layers),
        "surface": (41 if full else 21) ** 2,
        "solve": sum(SOLVE_MAX_ITER * v for v in PRODUCTS_PER_ITERATION.values()) if full else 0,
    }
    return plan


@dataclass
class _Budget:
    """Seconds the report may take, and the measured cost of one product."""

    total_s: float | None
    started: float
    s_per_product: float = 0.0
    problem: Problem | None = None
    work_at_start: int = 0
    reductions: list[str] = field(default_factory=list)

    def spent(self) -> float:
        """Seconds spent: the wall time, or the products done at the measured price if more."""
        wall = time.perf_counter() - self.started
        done = 0 if self.problem is None else self.problem.work_done - self.work_at_start
        return max(wall, done * self.s_per_product)

    def left(self) -> float | None:
        if self.total_s is None:
            return None
        return self.total_s - self.spent()

    def products_left(self) -> float | None:
        left = self.left()
        if left is None:
            return None
        return max(0.0, left) / max(self.s_per_product, 1e-9)


def _measure_product(problem: Problem) -> float:
    """Seconds of one Hessian product on all the data (one real product, timed)."""
    from ..operators import HessianOperator

    v = torch.randn(
        problem.num_params, 1, generator=torch.Generator().manual_seed(0), dtype=problem.dtype
    ).to(problem.device)
    H = HessianOperator(problem)
    t0 = time.perf_counter()
    H @ v
    return time.perf_counter() - t0


ReportRun = Rendered
"""What :func:`run_report` wrote: the page, the documents, figures, skips and timings."""


class _OverBudget(CurvscopeError):
    """A part that does not fit the time left (recorded as skipped with the reason)."""


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
    budget: _Budget | None = None
    knobs: dict[str, Any] = field(default_factory=dict)

    def fit(self, part: str, cost: Callable[[dict], float], shrink: Callable[[dict], bool]):
        """Shrink the part's settings (``knobs``) until its cost fits the budget left.

        ``cost(knobs)`` is the part's products; ``shrink(knobs)`` makes the part smaller and
        returns ``False`` when it cannot. Raises :class:`_OverBudget` when even the smallest
        does not fit; records every reduction.
        """
        if self.budget is None or self.budget.total_s is None:
            return
        before = dict(self.knobs)
        left = self.budget.products_left() or 0.0
        if self.problem.group.active:  # every rank takes the same decision: the least time
            left = -self.problem.reduce(-left, op="max")
        while cost(self.knobs) > left:
            if not shrink(self.knobs):
                self.knobs.update(before)
                raise _OverBudget(
                    f"left out to stay within the budget of {self.budget.total_s:.0f} s: it "
                    f"needs about {cost(self.knobs):.0f} products "
                    f"({cost(self.knobs) * self.budget.s_per_product:.0f} s at the measured "
                    f"{self.budget.s_per_product:.2g} s a product) and "
                    f"{max(0.0, self.budget.left() or 0.0):.0f} s were left."
                )
        changed = {k: (before[k], v) for k, v in self.knobs.items() if before.get(k) != v}
        if changed:
            self.budget.reductions.append(
                f"{part}: "
                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                + f" to stay within the budget of {self.budget.total_s:.0f} s"
            )

    @property
    def full(self) -> bool:
        return self.preset == "full"

    def operators(self, names: list[str], part: str) -> dict:
        """The part's operators; unsupported ones are recorded as skipped (from the error)."""
        ops, skipped = build_operators(self.problem, names, seed=self.seed, skip_unsupported=True)
        for s in skipped:
            self.skipped.append({"part": f"{part}: {s['matrix']}", "reason": s["reason"]})
        if not ops:
            raise UnsupportedModelError(
                f"no matrix of the {part} part supports this model ("
                + "; ".join(f"{s['matrix']}: {s['reason']}" for s in skipped)
                + ")."
            )
        return ops

    def document(
        self,
        part: str,
        settings: dict,
        results: dict,
        t0: float,
        passes: int,
        matvecs: int,
        notes: list[str],
    ) -> dict:
        budget = {} if self.budget is None else {"budget_s": self.budget.total_s}
        if self.budget is not None:
            notes = [*notes, *(r for r in self.budget.reductions if r.startswith(part + ":"))]
        return document(
            self.problem,
            part,
            settings={**self.base_settings, "preset": self.preset, **budget, **settings},
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
    n = p.num_params
    ctx.fit("spectrum", lambda k: len(ops) * len(blocks) * lanczos_products(7, n), _fixed)
    t0, passes = time.perf_counter(), p.data_passes
    res = spectrum(
        ops,
        blocks=blocks,
        top=5,
        bottom=2,
        tol=ctx.tol,
        max_iter=ctx.max_iter,
        seed=ctx.seed,
        progress=ctx.progress,
    )
    ctx.eigen = _top_hessian(res)
    settings = {
        "matrix": list(ops),
        "blocks": blocks,
        "top": 5,
        "bottom": 2,
        "method": "lanczos",
        "tol": ctx.tol,
        "max_iter": ctx.max_iter,
    }
    return ctx.document(
        "spectrum", settings, res.to_results(), t0, passes, res.num_matvecs, res.notes
    )


def _density(ctx: _Context) -> dict:
    from ..diagnostics import density

    p = ctx.problem
    names = ["hessian"] + (
        [n for n in report_matrices("full") if n in ("ggn", "pch-abs")] if ctx.full else []
    )
    ops = ctx.operators(names, "density")
    n = p.num_params
    ctx.knobs.update(
        probes=20, lanczos_steps=80 if ctx.full else 30, trace_probes=100 if ctx.full else 30
    )
    exact = 2000 if ctx.full else 0

    def cost(k: dict) -> float:
        per = k["probes"] * min(k["lanczos_steps"], n) + 2 * k["trace_probes"]
        return len(ops) * (per + (n if exact and n <= exact else 0))

    def shrink(k: dict) -> bool:
        if (k["probes"], k["lanczos_steps"]) <= DENSITY_MIN:
            return False
        k["probes"] = max(DENSITY_MIN[0], int(k["probes"] * 0.8))
        k["lanczos_steps"] = max(DENSITY_MIN[1], int(k["lanczos_steps"] * 0.8))
        k["trace_probes"] = max(10, int(k["trace_probes"] * 0.8))
        return True

    ctx.fit("density", cost, shrink)
    settings = {
        "matrix": list(ops),
        "blocks": ["all"],
        "probes": ctx.knobs["probes"],
        "lanczos_steps": ctx.knobs["lanczos_steps"],
        "trace_probes": ctx.knobs["trace_probes"],
        "exact_trace_max": exact,
    }
    t0, passes = time.perf_counter(), p.data_passes
    res = density(
        ops,
        blocks=["all"],
        num_probes=settings["probes"],
        num_steps=settings["lanczos_steps"],
        trace_probes=settings["trace_probes"],
        exact_trace_max=settings["exact_trace_max"],
        seed=ctx.seed,
        progress=ctx.progress,
    )
    return ctx.document(
        "density", settings, res.to_results(), t0, passes, res.num_matvecs, res.notes
    )


def _check(ctx: _Context) -> dict:
    from ..diagnostics import check

    p = ctx.problem
    n = p.num_params
    ctx.fit(
        "check", lambda k: 2 * lanczos_products(1, n) + 3 * (4 * _derivative_steps() + 6), _fixed
    )
    t0, passes = time.perf_counter(), p.data_passes
    res = check(p, seed=ctx.seed, progress=ctx.progress)
    return ctx.document(
        "check", {}, res.to_results(), t0, passes, res.num_matvecs, list(getattr(res, "notes", []))
    )


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
            + "; ".join(f"{s['matrix']}: {s['reason']}" for s in skipped)
            + ")."
        )
    (H,) = build_operators(p, ["hessian"], seed=ctx.seed)[0].values()
    sizes = dict(zip(p.module_blocks(), _block_sizes(p), strict=True))
    ctx.knobs["blocks"] = list(sizes) or ["all"]
    if not sizes:
        sizes = {"all": p.num_params}

    def cost(k: dict) -> float:
        return sum(_compare_cost(sizes[b], len(candidates)) for b in k["blocks"])

    def shrink(k: dict) -> bool:  # the costliest block goes first
        if len(k["blocks"]) <= 1:
            return False
        costliest = max(k["blocks"], key=lambda b: _compare_cost(sizes[b], 1))
        k["blocks"] = [b for b in k["blocks"] if b != costliest]
        return True

    ctx.fit("compare", cost, shrink)
    left_out = [b for b in sizes if b not in ctx.knobs["blocks"]]
    for b in left_out:
        ctx.skipped.append(
            {
                "part": f"compare [{b}]",
                "reason": f"left out to stay within the budget of {ctx.budget.total_s:.0f} s.",
            }
        )
    t0, passes = time.perf_counter(), p.data_passes
    res = compare(
        H,
        candidates,
        blocks=ctx.knobs["blocks"],
        tol=ctx.tol,
        seed=ctx.seed,
        skipped=skipped,
        progress=ctx.progress,
    )
    for entry in res.skipped:
        if "block" in entry:
            ctx.skipped.append(
                {
                    "part": f"compare: {entry['matrix']} [{entry['block']}]",
                    "reason": entry["reason"],
                }
            )
    return ctx.document(
        "compare", {"matrix": list(candidates)}, res.to_results(), t0, passes, res.num_matvecs, []
    )


def _surface(ctx: _Context) -> dict:
    from ..diagnostics import surface

    p = ctx.problem
    ctx.knobs["steps"] = 41 if ctx.full else 21
    eigen = 0 if ctx.eigen is not None else lanczos_products(2, p.num_params)

    def shrink(k: dict) -> bool:
        if k["steps"] <= SURFACE_MIN_STEPS:
            return False
        k["steps"] = max(SURFACE_MIN_STEPS, k["steps"] - 4)
        return True

    ctx.fit("surface", lambda k: k["steps"] ** 2 + eigen + 2, shrink)
    steps = ctx.knobs["steps"]
    t0, passes = time.perf_counter(), p.data_passes
    res = surface(
        p,
        dims=2,
        directions="eigen",
        range_=(-1.0, 1.0),
        steps=steps,
        eigen=ctx.eigen,
        seed=ctx.seed,
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
    return ctx.document(
        "surface", settings, {"surface": res}, t0, passes, res.num_matvecs, list(res.notes)
    )


def _solve(ctx: _Context) -> dict | None:
    if not ctx.full:
        ctx.skipped.append({"part": "solve", "reason": "solver runs are in the full preset only."})
        return None
    from ..solvers import SOLVERS, compare_runs, run_solver

    p = ctx.problem
    names = [n for n in SOLVE_FULL if n in SOLVERS]
    ctx.fit("solve", lambda k: report_plan(p, "full")["solve"], _fixed)
    t0, passes = time.perf_counter(), p.data_passes
    runs, notes = [], []
    for name in names:
        try:
            runs.append(
                run_solver(
                    p,
                    name,
                    max_iter=SOLVE_MAX_ITER,
                    seed=ctx.seed,
                    progress=ctx.progress,
                    eig_tol=ctx.tol,
                )
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
    return ctx.document(
        "solve",
        {"solver": names, "max_iter": SOLVE_MAX_ITER},
        results,
        t0,
        passes,
        sum(r.num_matvecs for r in runs),
        notes,
    )


def _fixed(_: dict) -> bool:
    """A part whose settings cannot shrink: it runs whole or is left out."""
    return False


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
    budget_s: float | None = None,
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
        budget_s: seconds the report plans for (default: :data:`QUICK_BUDGET_S` for
            ``quick``, none for ``full``). One timed Hessian product prices each part's
            products; before each part the time left decides: density probes and steps,
            surface steps and compare's blocks shrink to fit, and a part that does not fit
            even at its smallest is left out and recorded in ``skipped`` with the reason.
            Reductions are notes of the part's document.
        progress: ``progress(completed, total, description)``.

    Every document of the report records one run (the command's, or a new one); before the
    first part, the documents of report parts in ``out_dir`` written by another run are
    removed, so the folder never holds a stale part beside the new ones.

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
    if budget_s is not None and not budget_s > 0:
        raise OptionError(f"{arg('budget_s')} must be positive, got {budget_s}.")
    out = Path(out_dir)
    ctx = _Context(problem, preset, seed, tol, max_iter, dict(base_settings or {}), progress)
    if budget_s is None and preset == "quick":
        budget_s = QUICK_BUDGET_S
    if budget_s is not None:
        # one real product, timed, prices every part's plan in seconds
        started, work = time.perf_counter(), problem.work_done
        ctx.budget = _Budget(budget_s, started, _measure_product(problem), problem, work)
    with active_run("report") as run:
        _remove_stale_parts(out, run.id)
        return _run_parts(ctx, out, parts, run.id, plotly_js, figure_formats)


def _remove_stale_parts(out: Path, run_id: str) -> list[Path]:
    """Remove ``out/<part>.json`` of every report part written by another run.

    A report rewrites the parts it runs; one it does not reach (interrupted, left out) would
    otherwise stay beside the new ones as if it belonged to this run.
    """
    removed = []
    for part in PARTS:
        path = out / f"{part}.json"
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours to judge: rendering refuses it if it is in the way
        if isinstance(doc, dict) and doc.get("schema") and run_of(doc).get("id") != run_id:
            path.unlink()
            removed.append(path)
    return removed


def _run_parts(
    ctx: _Context,
    out: Path,
    parts: tuple[str, ...],
    run_id: str,
    plotly_js: str,
    figure_formats: tuple[str, ...],
) -> ReportRun:
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
    write_atomic(
        out / SKIPPED_FILE, json.dumps({"run": run_id, "skipped": ctx.skipped}, indent=1) + "\n"
    )
    if interrupted:
        raise KeyboardInterrupt
    return ReportRun(html, paths, figures, ctx.skipped, timings)
