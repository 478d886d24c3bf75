"""``check``: gradient test, Taylor test and the convexity certificate in one result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .._sampling import as_generator
from ..linalg import eigsh
from ..operators import HessianOperator
from ..problem import Problem
from ._common import keep_finished
from ._convexity import convexity_certificate
from ._derivatives import (
    FLOOR_FACTOR,
    GRADIENT_SLOPE,
    SLOPE_TOLERANCE,
    TAYLOR_SLOPES,
    combine,
    evaluation_problem,
    gradient_test,
    taylor_test,
)

__all__ = ["CheckResult", "check"]

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class CheckResult:
    """``results.checks`` of the ``check`` command and the products it used."""

    checks: list[dict]
    num_matvecs: int
    notes: list[str] = field(default_factory=list)

    def to_results(self) -> dict:
        """The ``results`` part of the result document."""
        return {"checks": self.checks}


def check(
    problem: Problem,
    *,
    directions: int = 2,
    eigen_directions: int = 1,
    seed: int | torch.Generator = 0,
    progress: Progress | None = None,
) -> CheckResult:
    """Run the gradient test, the Taylor test and the convexity certificate.

    Derivative checks run in float64 whatever the problem's dtype (see
    :mod:`curvscope.diagnostics._derivatives`); the Taylor entries also carry the float32
    round-off floor. Directions: ``directions`` random unit vectors and the top
    ``eigen_directions`` Hessian eigenvectors.

    Args:
        problem: model, loss, data and parameter selection.
        directions: random directions per test.
        eigen_directions: top Hessian eigenvectors used as extra directions (0: none).
        seed: random source of directions and start vectors (an int or a generator).
        progress: ``progress(completed, total, description)``.
    """
    gen = as_generator(seed)
    total = 3
    matvecs = 0

    def step(i: int, what: str) -> None:
        if progress is not None:
            progress(i, total, what)

    evaluated, note = evaluation_problem(problem)
    in_dtype = str(evaluated.dtype).removeprefix("torch.")
    notes = [note] if note else []
    eigvecs = None
    if eigen_directions:
        tol = 1e-6 if evaluated.dtype == torch.float64 else 1e-4
        (top,) = eigsh(HessianOperator(evaluated), top=eigen_directions, tol=tol, seed=gen)
        eigvecs = top.eigenvectors
        matvecs += top.num_matvecs
    checks: list[dict] = []
    stopped: list[str] = []
    with keep_finished(stopped, "the checks listed", lambda: CheckResult(checks, matvecs, stopped)):
        step(0, "gradient test")
        grad = gradient_test(evaluated, directions=directions, eigenvectors=eigvecs, seed=gen)
        passed, reason = combine(grad)
        checks.append(
            {
                "name": "gradient",
                "passed": passed,
                "reason": reason,
                "thresholds": {
                    "expected_slope": GRADIENT_SLOPE,
                    "slope_tolerance": SLOPE_TOLERANCE,
                    "floor_factor": FLOOR_FACTOR,
                },
                "evaluated_in": in_dtype,
                "notes": notes,
                "directions": [asdict(r) for r in grad],
            }
        )
        step(1, "Taylor test")
        taylor = taylor_test(evaluated, directions=directions, eigenvectors=eigvecs, seed=gen)
        matvecs += 2 * len(taylor)
        passed, reason = combine(taylor)
        checks.append(
            {
                "name": "taylor",
                "passed": passed,
                "reason": reason,
                "thresholds": {
                    "expected_slopes": {"e1": TAYLOR_SLOPES[0], "e2": TAYLOR_SLOPES[1]},
                    "slope_tolerance": SLOPE_TOLERANCE,
                    "floor_factor": FLOOR_FACTOR,
                },
                "evaluated_in": in_dtype,
                "notes": notes,
                "float32_floor": taylor[0].float32_floor if taylor else {},
                "directions": [asdict(r) for r in taylor],
            }
        )
        step(2, "convexity certificate")
        cert = convexity_certificate(problem, seed=gen)
        matvecs += cert.num_matvecs
        entry = asdict(cert)
        entry.pop("num_matvecs")
        checks.append(entry)
    step(3, "done")
    return CheckResult(checks, matvecs)
