"""Run the analyses a report needs, write their result documents, figures and the page.

:func:`run_report` calls the same library functions the individual commands call (spectrum,
density, check, compare, surface, solve), each in its own ``try``: a part the model does not
support (:class:`~curvscope._errors.UnsupportedModelError`), or one this version of curvscope
does not have, is recorded as skipped with its reason and shown on the page; nothing is
substituted for it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._errors import CurvscopeError, OptionError, UnsupportedModelError
from ..io import make_document, read_document, versions, write_atomic, write_document
from ..problem import Problem
from ._html import render_report
from ._plots import save_figures

__all__ = ["PRESETS", "ReportRun", "render_directory", "run_report"]

Progress = Callable[[int, int, str], None]

PRESETS = ("quick", "full")
PARTS = ("spectrum", "density", "check", "compare", "surface", "solve")
NOT_AVAILABLE = "not available in this version of curvscope"
SKIPPED_FILE = "report-skipped.json"
SOLVE_FULL = ("gd", "lbfgs", "nlcg", "newton-cg", "hf", "eacg", "mk")
SOLVE_MAX_ITER = 30


@dataclass(frozen=True)
class ReportRun:
    """What :func:`run_report` wrote.

    Attributes:
        html: the report page.
        documents: result document paths by part.
        figures: PNG/PDF figure paths.
        skipped: ``{"part", "reason"}`` for every part not run.
        timings: seconds per part.
    """

    html: Path
    documents: dict[str, Path]
    figures: list[Path]
    skipped: list[dict[str, str]]
    timings: dict[str, float] = field(default_factory=dict)


def _describe(problem: Problem) -> dict[str, Any]:
    """A minimal ``input`` section when the caller has no checkpoint information."""
    return {
        "model": {
            "path": type(problem.model).__name__,
            "sha256": None,
            "format": "in-memory module",
            "num_params": sum(p.numel() for p in problem.model.parameters()),
            "params_selected": problem.num_params,
        },
        "data": {
            "source": "in-memory batches",
            "sha256": None,
            "num_samples": problem.num_samples,
            "batch_size": max(problem.batch_sizes),
            "subset_seed": None,
        },
        "loss": problem.loss_name,
        "reduction": problem.reduction,
        "weight_decay": problem.weight_decay,
        "dtype": str(problem.dtype).replace("torch.", ""),
        "device": str(problem.device),
        "seed": None,
        "train_mode": problem.train_mode,
        "versions": versions(),
    }


def _is_mlp(problem: Problem) -> bool:
    """Linear layers and elementwise activations only (what PCH and the certificate need)."""
    from torch import nn

    allowed = (
        nn.Linear,
        nn.Sequential,
        nn.Tanh,
        nn.Sigmoid,
        nn.ReLU,
        nn.LeakyReLU,
        nn.GELU,
        nn.SiLU,
        nn.Softplus,
        nn.ELU,
        nn.Identity,
        nn.Flatten,
        nn.LogSoftmax,
    )
    mods = list(problem.model.modules())
    return all(isinstance(m, allowed) for m in mods) and any(isinstance(m, nn.Linear) for m in mods)


def _eigen_from_spectrum(result: Any) -> Any:
    """The Hessian top entry of a spectrum result for block ``all`` as an ``EigenResult``."""
    from ..linalg import EigenResult

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


def _matrix_names() -> list[str]:
    from .. import operators

    return list(getattr(operators, "MATRIX_NAMES", ["hessian"]))


def run_report(
    problem: Problem,
    *,
    out_dir: str | os.PathLike,
    preset: str = "quick",
    input_info: dict[str, Any] | None = None,
    base_settings: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    seed: int = 0,
    tol: float = 1e-4,
    max_iter: int | None = None,
    model_sha256: str | None = None,
    plotly_js: str = "inline",
    figure_formats: tuple[str, ...] = ("png",),
    parts: tuple[str, ...] = PARTS,
    progress: Progress | None = None,
) -> ReportRun:
    """Run spectrum, density, checks, comparison, surface (and solvers in ``full``); render.

    The ``quick`` preset: top-5 and bottom-2 Hessian eigenpairs of the whole model, a 20-probe
    density (30 Lanczos steps each) with Hutchinson/Hutch++ traces, the derivative checks,
    ``compare`` on the GGN and, for MLPs, PCH, and a 21 x 21 surface along the top two
    eigenvectors (reused from the spectrum). ``full`` adds every matrix the model supports and
    every layer to spectrum, density and compare, 80-step density, a 41 x 41 surface and the
    solver runs.

    Args:
        problem: model, loss, data and parameter selection.
        out_dir: folder for the result documents, ``figures/`` and ``report.html``.
        preset: ``quick`` or ``full``.
        input_info: the documents' ``input`` section (the CLI's session gives it).
        base_settings: settings recorded in every document besides the part's own.
        notes: sentences added to every document (e.g. checkpoint notes).
        seed: seeds every random choice (probes, start vectors, directions).
        tol: eigenpair tolerance.
        max_iter: Lanczos step limit.
        model_sha256: the checkpoint hash (recorded with eigenvectors).
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
        raise OptionError(f"--preset {preset!r} is not known; choose quick or full.")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise OptionError(f"report parts {unknown} are not known; choose from {', '.join(PARTS)}.")
    out = Path(out_dir)
    info = input_info or _describe(problem)
    full = preset == "full"
    skipped: list[dict[str, str]] = []
    documents: dict[str, dict] = {}
    doc_paths: dict[str, Path] = {}
    timings: dict[str, float] = {}
    state: dict[str, Any] = {}
    mlp = _is_mlp(problem)
    matrices_all = _matrix_names()

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def record(part: str, settings: dict, results: dict, t0: float, matvecs: int, extra: list):
        doc = make_document(
            part,
            input=info,
            settings={**(base_settings or {}), "preset": preset, **settings},
            results=results,
            timings={"total_s": time.perf_counter() - t0},
            counts={
                "matvecs": int(matvecs),
                "data_passes": problem.data_passes - state["passes0"],
            },
            notes=[*(notes or []), *extra],
        )
        doc_paths[part] = write_document(doc, out)
        documents[part] = doc

    # ------------------------------------------------------------------ the parts
    def do_spectrum() -> None:
        from ..diagnostics import spectrum

        matrices = ["hessian"]
        if full:
            matrices += [
                m for m in ("ggn", "empirical-fisher", "pch-abs", "kfac") if m in matrices_all
            ]
        per_layer = full and len(problem.module_blocks()) > 1
        blocks = ["all", *problem.module_blocks()] if per_layer else ["all"]
        settings = {
            "matrix": matrices,
            "blocks": blocks,
            "top": 5,
            "bottom": 2,
            "method": "lanczos",
            "tol": tol,
            "max_iter": max_iter,
        }
        t0 = time.perf_counter()
        res, extra = _tolerant(
            lambda m: spectrum(
                problem,
                matrices=m,
                blocks=blocks,
                top=5,
                bottom=2,
                tol=tol,
                max_iter=max_iter,
                seed=seed,
                progress=progress,
            ),
            matrices,
            "spectrum",
            skipped,
        )
        state["spectrum"] = res
        record("spectrum", settings, res.to_results(), t0, res.num_matvecs, [*res.notes, *extra])

    def do_density() -> None:
        from ..diagnostics import density

        matrices = ["hessian"]
        if full:
            matrices += [m for m in ("ggn", "pch-abs") if m in matrices_all]
        settings = {
            "matrix": matrices,
            "blocks": ["all"],
            "probes": 20,
            "lanczos_steps": 80 if full else 30,
            "trace_probes": 100 if full else 30,
            "exact_trace_max": 2000 if full else 0,
        }
        t0 = time.perf_counter()
        res, extra = _tolerant(
            lambda m: density(
                problem,
                matrices=m,
                blocks=["all"],
                num_probes=20,
                num_steps=settings["lanczos_steps"],
                trace_probes=settings["trace_probes"],
                exact_trace_max=settings["exact_trace_max"],
                seed=seed,
                generator=gen(),
                progress=progress,
            ),
            matrices,
            "density",
            skipped,
        )
        record("density", settings, res.to_results(), t0, res.num_matvecs, [*res.notes, *extra])

    def do_check() -> None:
        try:
            from ..diagnostics import check
        except ImportError:
            raise _Unavailable from None
        t0 = time.perf_counter()
        res = _call(check, problem, seed=seed, generator=gen(), progress=progress)
        record(
            "check",
            {},
            _results_of(res, "checks"),
            t0,
            getattr(res, "num_matvecs", 0),
            list(getattr(res, "notes", [])),
        )

    def do_compare() -> None:
        try:
            from ..diagnostics import compare
        except ImportError:
            raise _Unavailable from None
        matrices = ["ggn"] + (["pch-abs"] if mlp else [])
        if full:
            matrices = [m for m in matrices_all if m != "hessian"]
        t0 = time.perf_counter()
        res, extra = _tolerant(
            lambda m: _call(
                compare, problem, matrices=m, seed=seed, generator=gen(), progress=progress
            ),
            matrices,
            "compare",
            skipped,
        )
        # compare itself leaves out the matrices a model does not support, with the reason
        for entry in getattr(res, "skipped", None) or []:
            skipped.append(
                {"part": f"compare: {entry.get('matrix')}", "reason": str(entry.get("reason"))}
            )
        record(
            "compare",
            {"matrix": matrices},
            _results_of(res, "comparisons"),
            t0,
            getattr(res, "num_matvecs", 0),
            [*getattr(res, "notes", []), *extra],
        )

    def do_surface() -> None:
        from ..diagnostics import surface

        steps = 41 if full else 21
        eig = _eigen_from_spectrum(state["spectrum"]) if "spectrum" in state else None
        t0 = time.perf_counter()
        res = surface(
            problem,
            dims=2,
            directions="eigen",
            range_=(-1.0, 1.0),
            steps=steps,
            eigen=eig,
            generator=gen(),
            model_sha256=model_sha256,
            tol=tol,
            max_iter=max_iter,
            progress=progress,
        )
        settings = {
            "dims": 2,
            "directions": "eigen",
            "range": [-1.0, 1.0],
            "steps": steps,
            "eigenvectors": "from the spectrum part" if eig is not None else "computed",
        }
        record("surface", settings, {"surface": res}, t0, res.num_matvecs, list(res.notes))

    def do_solve() -> None:
        if not full:
            skipped.append(
                {
                    "part": "solve",
                    "reason": "solver runs are in the full preset only (--preset full).",
                }
            )
            return
        try:
            from ..solvers import SOLVERS, compare_runs, run_solver
        except ImportError:
            raise _Unavailable from None
        names = [n for n in SOLVE_FULL if n in SOLVERS]
        t0 = time.perf_counter()
        runs, extra = [], []
        for name in names:
            try:
                runs.append(
                    run_solver(
                        problem,
                        name,
                        max_iter=SOLVE_MAX_ITER,
                        generator=gen(),
                        progress=progress,
                        eig_tol=tol,
                    )
                )
            except UnsupportedModelError as exc:
                skipped.append({"part": f"solve: {name}", "reason": str(exc)})
                extra.append(f"{name} left out: {exc}")
        if not runs:
            raise CurvscopeError("no solver could run on this model.")
        rows = compare_runs(runs)
        for row in rows:
            row.pop("loss_curve", None)
        results = {"solves": [r.to_result() for r in runs], "comparison": rows}
        record(
            "solve",
            {"solver": names, "max_iter": SOLVE_MAX_ITER},
            results,
            t0,
            sum(r.num_matvecs for r in runs),
            extra,
        )

    runners = {
        "spectrum": do_spectrum,
        "density": do_density,
        "check": do_check,
        "compare": do_compare,
        "surface": do_surface,
        "solve": do_solve,
    }
    interrupted = False
    for part in parts:
        t0 = time.perf_counter()
        state["passes0"] = problem.data_passes
        if interrupted:
            skipped.append({"part": part, "reason": "not run: interrupted (Ctrl-C)."})
            continue
        try:
            runners[part]()
        except KeyboardInterrupt:
            # keep what finished: the page is rendered below, then the interrupt goes on
            interrupted = True
            skipped.append({"part": part, "reason": "interrupted (Ctrl-C) while running."})
        except _Unavailable:
            skipped.append({"part": part, "reason": f"{NOT_AVAILABLE}."})
        except (UnsupportedModelError, CurvscopeError) as exc:
            skipped.append({"part": part, "reason": str(exc)})
        except ImportError:
            skipped.append({"part": part, "reason": f"{NOT_AVAILABLE}."})
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others
            skipped.append(
                {
                    "part": part,
                    "reason": f"failed with an internal error ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); this is a bug in "
                    "curvscope, please report it.",
                }
            )
        timings[part] = time.perf_counter() - t0

    figures: list[Path] = []
    for doc in documents.values():
        figures += save_figures(doc, out / "figures", figure_formats)
    page = render_report(documents, plotly_js=plotly_js, skipped=skipped)
    html = write_atomic(out / "report.html", page)
    # what was skipped and why, so that `report --from DIR` can say it again
    write_atomic(out / SKIPPED_FILE, json.dumps({"skipped": skipped}, indent=1) + "\n")
    if interrupted:
        raise KeyboardInterrupt
    return ReportRun(html, doc_paths, figures, skipped, timings)


class _Unavailable(Exception):
    """A part whose library function this version does not have."""


def _call(fn: Callable[..., Any], problem: Problem, **kwargs: Any) -> Any:
    """Call a diagnostic with the keyword arguments its signature takes (seed or generator)."""
    import inspect

    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(problem, **kwargs)


def _results_of(res: Any, key: str) -> dict:
    if hasattr(res, "to_results"):
        return res.to_results()
    if isinstance(res, dict):
        return res if key in res else {key: res}
    return {key: getattr(res, key)}


def _tolerant(call, matrices: list[str], part: str, skipped: list[dict[str, str]]):
    """Run ``call(matrices)``; a matrix the model does not support is dropped and recorded."""
    matrices = list(matrices)
    extra: list[str] = []
    while True:
        try:
            return call(matrices), extra
        except UnsupportedModelError as exc:
            culprit = next((m for m in matrices if m in str(exc)), None)
            if culprit is None or len(matrices) == 1:
                raise
            matrices.remove(culprit)
            skipped.append({"part": f"{part}: {culprit}", "reason": str(exc)})
            extra.append(f"{culprit} left out: {exc}")


def render_directory(
    directory: str | os.PathLike,
    *,
    plotly_js: str = "inline",
    figure_formats: tuple[str, ...] = ("png",),
) -> ReportRun:
    """Render ``report.html`` (and figures) from the result documents already in a folder.

    Raises:
        CurvscopeError: when the folder holds no result document.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise CurvscopeError(f"--from {folder} is not a folder.")
    documents: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    for name in PARTS:
        path = folder / f"{name}.json"
        if path.is_file():
            documents[name] = read_document(path)
            paths[name] = path
    if not documents:
        raise CurvscopeError(
            f"--from {folder} holds no result document ({', '.join(p + '.json' for p in PARTS)})."
        )
    recorded: list[dict[str, str]] = []
    try:
        recorded = list(json.loads((folder / SKIPPED_FILE).read_text())["skipped"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    named = {str(r.get("part", "")).split(":")[0] for r in recorded}
    skipped = [
        r
        for r in recorded
        if str(r.get("part", "")).split(":")[0] not in documents or ":" in str(r.get("part", ""))
    ]
    skipped += [
        {"part": p, "reason": f"no {p}.json in {folder}"}
        for p in PARTS
        if p not in documents and p not in named
    ]
    figures: list[Path] = []
    for doc in documents.values():
        figures += save_figures(doc, folder / "figures", figure_formats)
    page = render_report(documents, plotly_js=plotly_js, skipped=skipped)
    html = write_atomic(folder / "report.html", page)
    return ReportRun(html, paths, figures, skipped)
