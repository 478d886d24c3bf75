"""Optimisers whose convergence curvscope analyses, with per-iteration traces and findings."""

from . import _eacg, _first_order, _hessian_free, _mk, _newton  # noqa: F401  (register them)
from ._attribution import RULES, Finding, attribute, compare_runs
from ._driver import PRODUCTS_PER_ITERATION, SolveRun, run_solver
from ._hessian_free import lm_damping_update, martens_pcg, martens_should_stop
from ._objective import Objective, ProblemObjective, QuadraticObjective
from ._state import SOLVERS, SolverSpec, SolverState

__all__ = [
    "PRODUCTS_PER_ITERATION",
    "RULES",
    "SOLVERS",
    "Finding",
    "Objective",
    "ProblemObjective",
    "QuadraticObjective",
    "SolveRun",
    "SolverSpec",
    "SolverState",
    "attribute",
    "compare_runs",
    "lm_damping_update",
    "martens_pcg",
    "martens_should_stop",
    "run_solver",
]
