"""The state every solver step takes and returns, and the registry of solvers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ._objective import Objective

__all__ = ["SOLVERS", "SolverSpec", "SolverState", "register"]


@dataclass(frozen=True)
class SolverState:
    """Where a solver stands: the point, its loss and gradient, and the solver's memory.

    Steps never mutate a state; they return a new one (``memory`` is replaced, not edited).

    Attributes:
        w: flat parameter vector.
        loss: objective at ``w``.
        grad: gradient at ``w``.
        iteration: steps taken so far.
        memory: solver-specific values (L-BFGS pairs, damping, previous direction...).
    """

    w: torch.Tensor
    loss: float
    grad: torch.Tensor
    iteration: int = 0
    memory: dict[str, Any] = field(default_factory=dict)

    def evolve(self, **changes: Any) -> SolverState:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


StepFn = Callable[[SolverState, Objective, dict[str, Any]], tuple[SolverState, dict[str, Any]]]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver.

    Attributes:
        name: the ``--solver`` name.
        step: ``step(state, objective, settings) -> (new_state, info)``; ``info`` holds the
            per-iteration trace entries of this step.
        defaults: every setting with its default (each cited in the module docstring).
        description: one line for the CLI help and the report.
        curvature: the matrix the solver's model uses (``None`` for first-order solvers),
            for the conditioning finding.
        init: optional ``init(state, objective, settings) -> state`` to seed the memory.
    """

    name: str
    step: StepFn
    defaults: dict[str, Any]
    description: str
    curvature: str | None = None
    init: Callable[[SolverState, Objective, dict[str, Any]], SolverState] | None = None


SOLVERS: dict[str, SolverSpec] = {}
"""Every solver by its ``--solver`` name (filled by the solver modules on import)."""


def register(spec: SolverSpec) -> SolverSpec:
    """Add ``spec`` to :data:`SOLVERS`."""
    SOLVERS[spec.name] = spec
    return spec
