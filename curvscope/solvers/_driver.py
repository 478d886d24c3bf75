"""The thin driver around the pure solver steps: iterate, record traces, stop, explain.

:func:`run_solver` starts from the problem's current weights (never modifying its model),
calls the registered step function until ``max_iter``, a gradient-norm tolerance or the
product budget stops it, and records one trace entry per iteration: loss, gradient norm, the
step's own entries (step length, line-search evaluations, CG iterations and stop reason,
damping, reduction ratio, negative-curvature events, fall-backs...), cumulative work, wall
time, test loss and accuracy, and every ``curvature_every`` iterations the extreme
eigenvalues of the Hessian at the current weights (Lanczos, with residuals), plus those of
the matrix the solver itself uses when that is not the Hessian.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import CurvscopeError, OptionError, arg
from .._sampling import as_generator
from ..problem import Problem
from ._objective import Objective, ProblemObjective
from ._state import SOLVERS, SolverState

__all__ = ["PRODUCTS_PER_ITERATION", "SolveRun", "run_solver"]

PRODUCTS_PER_ITERATION = {
    "gd": 2,
    "gd-armijo": 3,
    "lbfgs": 2,
    "nlcg": 3,
    "newton-cg": 12,
    "hf": 15,
    "eacg": 12,
    "eacg-clip": 12,
    "mk": 3,
    "mk-closed-form": 6,
}
"""Rough products and gradients per iteration, for the plan lines and the report's budget."""

Progress = Callable[[int, int, str], None]

TRACE_FIELDS = (
    "iteration",
    "loss",
    "grad_norm",
    "step_length",
    "alpha",
    "line_search_evals",
    "line_search_failed",
    "cg_iters",
    "cg_stop_reason",
    "negative_curvature",
    "fallback",
    "damping",
    "rho",
    "direction_cosine",
    "hessian_max",
    "hessian_min",
    "hessian_max_residual",
    "hessian_min_residual",
    "curvature_max",
    "curvature_min",
    "matvecs",
    "gradients",
    "loss_evals",
    "wall_time_s",
    "test_loss",
    "test_accuracy",
    "train_accuracy",
    "batch_loss",
)
"""Trace keys present in every run (``None`` where a quantity does not apply)."""


@dataclass(frozen=True)
class SolveRun:
    """One solver run from the given weights.

    Attributes:
        solver: the ``--solver`` name.
        settings: every setting used, defaults included.
        trace: per-iteration lists keyed by quantity (iteration 0 is the start point).
        final_loss: loss at the last point.
        final_grad_norm: gradient norm there.
        num_matvecs: curvature products used by the solver.
        num_gradients: gradient evaluations.
        num_loss_evals: loss-only evaluations.
        diagnostic_matvecs: products spent on the tracked eigenvalues.
        wall_time_s: seconds, diagnostics excluded.
        stop_reason: ``"converged"``, ``"max_iter"``, ``"budget"``, ``"stalled"``,
            ``"interrupted"`` or ``"error"``.
        message: the error message when ``stop_reason == "error"``.
        weights: the final flat weights.
        findings: filled by :func:`~curvscope.solvers.attribute` (``run_solver`` does it).
    """

    solver: str
    settings: dict[str, Any]
    trace: dict[str, list]
    final_loss: float
    final_grad_norm: float
    num_matvecs: int
    num_gradients: int
    num_loss_evals: int
    diagnostic_matvecs: int
    wall_time_s: float
    stop_reason: str
    message: str | None = None
    weights: torch.Tensor | None = field(default=None, repr=False)
    findings: list = field(default_factory=list)

    def to_result(self) -> dict[str, Any]:
        """This run as one ``results.solves`` entry (docs/DESIGN.md "Result document")."""
        return {
            "solver": self.solver,
            "settings": self.settings,
            "trace": self.trace,
            "findings": [
                {"rule": f.rule, "text": f.text, "evidence": f.evidence} for f in self.findings
            ],
            "final_loss": self.final_loss,
            "final_grad_norm": self.final_grad_norm,
            "num_matvecs": self.num_matvecs,
            "num_gradients": self.num_gradients,
            "num_loss_evals": self.num_loss_evals,
            "diagnostic_matvecs": self.diagnostic_matvecs,
            "wall_time_s": self.wall_time_s,
            "stop_reason": self.stop_reason,
            "message": self.message,
        }


def _as_objective(problem) -> Objective:
    if isinstance(problem, Objective):
        return problem
    if isinstance(problem, Problem):
        return ProblemObjective(problem)
    raise OptionError(f"run_solver needs a Problem or an Objective, got {type(problem).__name__}.")


def _resolve_settings(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    spec = SOLVERS[name]
    unknown = sorted(set(settings) - set(spec.defaults))
    if unknown:
        raise OptionError(
            f"solver {name} has no setting {', '.join(unknown)}; it takes "
            f"{', '.join(sorted(spec.defaults)) or 'none'}."
        )
    return {**spec.defaults, **settings}


def _eig_extremes(objective: Objective, name: str, w: torch.Tensor, generator, tol, max_iter):
    from ..linalg import eigsh

    op = objective.track(objective.curvature(name, w), diagnostic=True)
    n = op.shape[0]
    if n < 2:
        top = op @ torch.ones(1, dtype=op.dtype, device=op.device)
        value = float(top[0])
        return value, value, 0.0, 0.0
    res = eigsh(op, top=1, bottom=1, tol=tol, max_matvecs=max_iter, seed=generator)
    t, b = res[0], res[1]
    return (
        float(t.eigenvalues[0]),
        float(b.eigenvalues[0]),
        float(t.residual_norms[0]),
        float(b.residual_norms[0]),
    )


class _Batches:
    """Mini-batch mode: a seeded sub-problem per iteration sharing the work model."""

    def __init__(self, base: ProblemObjective, batch_size: int, generator: torch.Generator):
        if not 1 <= batch_size <= base.problem.num_samples:
            raise OptionError(
                f"{arg('batch_size')} {batch_size} for the solver must be between 1 and the "
                f"{base.problem.num_samples} samples."
            )
        self.base = base
        self.batch_size = batch_size
        self.generator = generator

    def draw(self, w: torch.Tensor) -> ProblemObjective:
        sub = self.base.problem.subsample(self.batch_size, self.generator)
        obj = ProblemObjective(sub)
        obj.counts = self.base.counts
        obj._operators = self.base._operators
        work = self.base.work_problem(w)
        bound = object.__new__(Problem)
        bound.__dict__.update(work.__dict__)
        bound.data, bound.num_samples, bound.batch_sizes = (
            sub.data,
            sub.num_samples,
            sub.batch_sizes,
        )
        obj._work = bound
        return obj


def run_solver(
    problem: Problem | Objective,
    solver_name: str,
    *,
    max_iter: int = 100,
    budget_matvecs: int | None = None,
    curvature_every: int = 0,
    test_problem: Problem | None = None,
    seed: int | torch.Generator = 0,
    progress: Progress | None = None,
    tol: float = 1e-8,
    mini_batch: int | None = None,
    eig_tol: float = 1e-3,
    eig_max_iter: int | None = None,
    stall_window: int = 0,
    stall_tol: float = 0.0,
    **settings: Any,
) -> SolveRun:
    """Run solver ``solver_name`` from the problem's weights and record what it did.

    Args:
        problem: a :class:`~curvscope.problem.Problem` (its model is never modified) or an
            :class:`~curvscope.solvers.Objective`.
        solver_name: one of :data:`~curvscope.solvers.SOLVERS`.
        max_iter: most iterations.
        budget_matvecs: stop once curvature products plus gradient evaluations reach this.
        curvature_every: every ``k`` iterations (and at the start and end) record the
            extreme Hessian eigenvalues (and those of the solver's own matrix); 0: never.
        test_problem: a problem on held-out data (same parameters): test loss and accuracy
            per iteration.
        seed: random source of Lanczos start vectors and mini-batches (an int or a
            generator).
        progress: ``progress(completed, total, description)`` after every iteration.
        tol: stop when the gradient norm is at most ``tol``.
        mini_batch: batch size for mini-batch mode (a seeded sub-problem per iteration);
            ``None``: full batch.
        eig_tol: relative residual tolerance of the tracked eigenvalues.
        eig_max_iter: Lanczos steps for them (default: the linalg default).
        stall_window: stop after this many iterations without a relative loss change above
            ``stall_tol`` (0: never).
        stall_tol: see ``stall_window``.
        **settings: solver settings (see ``SOLVERS[name].defaults``).

    Returns:
        The :class:`SolveRun`, with findings attached.

    Raises:
        OptionError: for an unknown solver or setting, or a bad budget.
    """
    from ._attribution import attribute

    if solver_name not in SOLVERS:
        raise OptionError(
            f"{arg('solver')} {solver_name!r} is not known; choose from {', '.join(SOLVERS)}."
        )
    if max_iter < 0:
        raise OptionError(f"{arg('max_iter')} must be non-negative, got {max_iter}.")
    if budget_matvecs is not None and budget_matvecs < 1:
        raise OptionError(f"{arg('budget_matvecs')} must be positive, got {budget_matvecs}.")
    spec = SOLVERS[solver_name]
    cfg = _resolve_settings(solver_name, settings)
    objective = _as_objective(problem)
    generator = as_generator(seed)
    batches = None
    if mini_batch is not None:
        if not isinstance(objective, ProblemObjective):
            raise OptionError("mini-batch mode needs a Problem.")
        batches = _Batches(objective, int(mini_batch), generator)
    full = objective
    if isinstance(objective, ProblemObjective):
        w0 = objective.problem.param_vector().detach()
    else:  # plain objectives (the quadratic test double) start from zero
        w0 = torch.zeros(objective.num_params, dtype=objective.dtype, device=objective.device)
    return _run(
        spec,
        cfg,
        full,
        batches,
        w0,
        max_iter=max_iter,
        budget=budget_matvecs,
        curvature_every=curvature_every,
        test_problem=test_problem,
        generator=generator,
        progress=progress,
        tol=tol,
        eig_tol=eig_tol,
        eig_max_iter=eig_max_iter,
        stall_window=stall_window,
        stall_tol=stall_tol,
        attribute=attribute,
        mini_batch=mini_batch,
    )


def _run(spec, cfg, full, batches, w0, **kw) -> SolveRun:
    trace: dict[str, list] = {k: [] for k in TRACE_FIELDS}
    counts = full.counts
    elapsed = 0.0
    max_iter = kw["max_iter"]
    every = kw["curvature_every"]
    test_problem = kw["test_problem"]
    progress = kw["progress"]

    def record(state: SolverState, info: dict[str, Any], eig: bool, batch_loss=None) -> None:
        c = full.sync_counts()
        row = {k: None for k in trace}
        row.update(info)
        if batches is not None:
            loss = float(full.problem.loss(state.w))
            gnorm = float(torch.linalg.vector_norm(full.problem.loss_and_grad(state.w)[1]))
            row["batch_loss"] = batch_loss
        else:
            loss, gnorm = state.loss, float(torch.linalg.vector_norm(state.grad))
        row.update(
            iteration=state.iteration,
            loss=loss,
            grad_norm=gnorm,
            matvecs=c.matvecs,
            gradients=c.gradients,
            loss_evals=c.loss_evals,
            wall_time_s=elapsed,
        )
        if isinstance(full, ProblemObjective) and (test_problem is not None or eig):
            row["train_accuracy"] = full.problem.accuracy(state.w)
        if test_problem is not None:
            row["test_loss"] = float(test_problem.loss(state.w))
            row["test_accuracy"] = test_problem.accuracy(state.w)
        if eig:
            try:
                hi, lo, rhi, rlo = _eig_extremes(
                    full, "hessian", state.w, kw["generator"], kw["eig_tol"], kw["eig_max_iter"]
                )
                row.update(
                    hessian_max=hi,
                    hessian_min=lo,
                    hessian_max_residual=rhi,
                    hessian_min_residual=rlo,
                )
                used = spec.curvature
                if used is not None:
                    if used == "hessian":
                        chi, clo = hi, lo
                    else:
                        chi, clo, _, _ = _eig_extremes(
                            full,
                            cfg.get("curvature", used),
                            state.w,
                            kw["generator"],
                            kw["eig_tol"],
                            kw["eig_max_iter"],
                        )
                    row.update(
                        curvature_max=_used(spec.name, chi, row, cfg),
                        curvature_min=_used(spec.name, clo, row, cfg),
                    )
            except CurvscopeError as err:
                row.setdefault("notes", str(err))
            full.sync_counts()
        before = len(trace["iteration"])
        for k, v in row.items():
            if k not in trace:
                trace[k] = [None] * before
            trace[k].append(_plain(v))

    t0 = time.perf_counter()
    loss, grad = full.loss_and_grad(w0)
    state = SolverState(w=w0, loss=loss, grad=grad)
    if spec.init is not None:
        state = spec.init(state, full, cfg)
    elapsed += time.perf_counter() - t0
    record(state, {}, every > 0)
    stop = "max_iter"
    message = None
    if batches is None and float(torch.linalg.vector_norm(grad)) <= kw["tol"]:
        stop = "converged"
        max_iter_eff = 0
    else:
        max_iter_eff = max_iter
    try:
        for it in range(1, max_iter_eff + 1):
            t0 = time.perf_counter()
            objective = full
            if batches is not None:
                objective = batches.draw(state.w)
                bl, bg = objective.loss_and_grad(state.w)
                state = state.evolve(loss=bl, grad=bg)
            state, info = spec.step(state, objective, cfg)
            elapsed += time.perf_counter() - t0
            eig = every > 0 and (it % every == 0 or it == max_iter_eff)
            record(state, info, eig, batch_loss=state.loss if batches is not None else None)
            if progress is not None:
                progress(it, max_iter_eff, spec.name)
            c = counts
            if trace["grad_norm"][-1] <= kw["tol"]:  # full-data gradient in both modes
                stop = "converged"
                break
            if kw["budget"] is not None and c.matvecs + c.gradients >= kw["budget"]:
                stop = "budget"
                break
            n = kw["stall_window"]
            if n and len(trace["loss"]) > n:
                a, b = trace["loss"][-n - 1], trace["loss"][-1]
                if abs(a - b) <= kw["stall_tol"] * max(abs(a), 1e-300):
                    stop = "stalled"
                    break
    except KeyboardInterrupt:
        stop = "interrupted"
    except OptionError:
        raise  # a user mistake in the settings: no run to report
    except CurvscopeError as err:  # the model or the numbers stopped this solver
        stop, message = "error", str(err)
    for k in trace:
        trace[k] = trace[k] + [None] * (len(trace["iteration"]) - len(trace[k]))
    if isinstance(full, ProblemObjective) and trace["train_accuracy"][-1] is None:
        trace["train_accuracy"][-1] = full.problem.accuracy(state.w)
    c = full.sync_counts()
    run = SolveRun(
        solver=spec.name,
        settings={
            **cfg,
            "max_iter": max_iter,
            "budget_matvecs": kw["budget"],
            "curvature_every": every,
            "tol": kw["tol"],
            "mini_batch": kw["mini_batch"],
        },
        trace=trace,
        final_loss=trace["loss"][-1],
        final_grad_norm=trace["grad_norm"][-1],
        num_matvecs=c.matvecs,
        num_gradients=c.gradients,
        num_loss_evals=c.loss_evals,
        diagnostic_matvecs=c.diagnostic_matvecs,
        wall_time_s=elapsed,
        stop_reason=stop,
        message=message,
        weights=state.w.detach().clone(),
    )
    findings = kw["attribute"](run)
    return _with_findings(run, findings)


def _used(name: str, value: float, row: dict, cfg: dict) -> float:
    """An eigenvalue of the matrix the solver's linear system uses, from one of its base."""
    if name.startswith("eacg"):
        a = float(cfg["alpha"])
        return (1 - a) * value + a  # Chen eq. 9
    return value + float(row.get("damping") or 0.0)  # Tikhonov / LM damping: + lambda I


def _with_findings(run: SolveRun, findings: list) -> SolveRun:
    from dataclasses import replace

    return replace(run, findings=findings)


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist() if v.dim() else float(v)
    if isinstance(v, float) and math.isnan(v):
        return None
    return v
