r"""What a solver step may ask of the objective: values, gradients and curvature at given weights.

Solver steps are pure functions of their state and an :class:`Objective`; the objective owns
the counting of work (gradients, loss evaluations, curvature products), so every run reports
what it cost. Two implementations:

- :class:`ProblemObjective` wraps a :class:`~curvscope.problem.Problem`. Curvature operators
  at weights ``w`` are built on a private deep copy of the model whose parameters are
  overwritten in place with ``w`` (the caller's model is never touched), so every operator of
  :mod:`curvscope.operators` (Hessian, GGN, PCH...) works at the solver's current point.
- :class:`QuadraticObjective` is :math:`\frac12 w^T A w - b^T w` for a dense symmetric
  ``A``: the test double with a known minimiser and known spectrum.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .._errors import NonFiniteError, OptionError
from ..operators import CurvatureOperator, DenseOperator, HessianOperator, graph_account
from ..problem import Problem

__all__ = ["Counts", "Objective", "ProblemObjective", "QuadraticObjective"]


@dataclass
class Counts:
    """Work done so far (mutable, owned by an objective).

    Attributes:
        gradients: loss-and-gradient evaluations.
        loss_evals: loss-only evaluations.
        matvecs: curvature-matrix products used by the solver (Hessian, GGN, PCH columns).
        diagnostic_matvecs: products spent on the tracked eigenvalues (not charged to the
            solver's budget).
    """

    gradients: int = 0
    loss_evals: int = 0
    matvecs: int = 0
    diagnostic_matvecs: int = 0


class Objective:
    """Interface the solver steps use. Subclasses implement the four evaluation methods."""

    num_params: int
    dtype: torch.dtype
    device: torch.device

    def __init__(self) -> None:
        self.counts = Counts()
        self._operators: list[tuple[CurvatureOperator, bool]] = []

    # -- evaluations ------------------------------------------------------------------
    def loss(self, w: torch.Tensor) -> float:
        """The objective at ``w``."""
        raise NotImplementedError

    def loss_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The objective and its gradient at ``w``."""
        raise NotImplementedError

    def curvature(self, name: str, w: torch.Tensor, **knobs) -> CurvatureOperator:
        """A curvature operator (``"hessian"``, ``"ggn"``, ...) at ``w``."""
        raise NotImplementedError

    # -- bookkeeping ------------------------------------------------------------------
    def track(self, op: CurvatureOperator, *, diagnostic: bool = False) -> CurvatureOperator:
        """Register ``op`` so its products are counted (as solver or diagnostic work)."""
        self._operators.append((op, diagnostic))
        return op

    def sync_counts(self) -> Counts:
        """Fold the products of every tracked operator into :attr:`counts` and return it."""
        for op, diagnostic in self._operators:
            if diagnostic:
                self.counts.diagnostic_matvecs += op.num_matvecs
            else:
                self.counts.matvecs += op.num_matvecs
            op.num_matvecs = 0
        self._operators.clear()
        return self.counts

    def accuracy(self, w: torch.Tensor) -> float | None:
        """Training accuracy at ``w`` where it is defined (classification), else ``None``."""
        return None


def _check(value: float, grad: torch.Tensor | None = None) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteError("the loss became NaN or Inf during the solve (try a smaller step).")
    if grad is not None and not torch.isfinite(grad).all():
        raise NonFiniteError("the gradient became NaN or Inf during the solve.")


class ProblemObjective(Objective):
    """The loss of a :class:`~curvscope.problem.Problem` as a function of the flat weights.

    Args:
        problem: model, loss, data and parameter selection.
    """

    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.problem = problem
        self.num_params = problem.num_params
        self.dtype = problem.dtype
        self.device = problem.device
        self._work: Problem | None = None

    def loss(self, w: torch.Tensor) -> float:
        """The problem's total loss at ``w`` (one pass)."""
        self.counts.loss_evals += 1
        value = float(self.problem.loss(w))
        _check(value)
        return value

    def loss_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Total loss and flat gradient at ``w`` (one pass)."""
        self.counts.gradients += 1
        value, grad = self.problem.loss_and_grad(w)
        value = float(value)
        _check(value, grad)
        return value, grad.detach()

    def accuracy(self, w: torch.Tensor) -> float | None:
        """Training accuracy at ``w`` (``None`` for regression)."""
        return self.problem.accuracy(w)

    def work_problem(self, w: torch.Tensor) -> Problem:
        """A problem on a private copy of the model whose selected parameters hold ``w``."""
        if self._work is None:
            p = self.problem
            model = copy.deepcopy(p.model)
            work = Problem(
                model,
                p.loss_name,
                p.data,
                reduction=p.reduction,
                params=list(p.names),
                weight_decay=p.weight_decay,
                train_mode=p.train_mode,
                group=p.group,
                graph_cache=graph_account(p).budget,  # the budget the memory plan chose
            )
            self._work = work
        values = self._work.unflatten(w.detach())
        with torch.no_grad():
            for name, tensor in self._work.params.items():
                tensor.copy_(values[name])
        return self._work

    def curvature(self, name: str, w: torch.Tensor, **knobs) -> CurvatureOperator:
        """Operator ``name`` (a ``--matrix`` name, e.g. hessian, ggn, pch-abs) at ``w``.

        Raises:
            OptionError: when the matrix name is not known.
        """
        work = self.work_problem(w)
        if name == "hessian" and not knobs:
            return HessianOperator(work)
        try:
            from ..operators import make_operator
        except ImportError:  # the operator registry is optional for the Hessian-only paths
            raise OptionError(
                f"the {name} matrix is not available in this build of curvscope "
                "(curvscope.operators.make_operator is missing)."
            ) from None
        return make_operator(name, work, **knobs)


class QuadraticObjective(Objective):
    r""":math:`f(w) = \frac12 w^T A w - b^T w` with a dense symmetric ``A`` (test double).

    Every curvature name maps to ``A`` itself (for a quadratic, Hessian = GGN).

    Args:
        matrix: symmetric ``[P, P]`` tensor.
        rhs: ``b``, ``[P]``.
    """

    def __init__(self, matrix: torch.Tensor, rhs: torch.Tensor) -> None:
        super().__init__()
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or rhs.shape != matrix[0].shape:
            raise OptionError("a quadratic objective needs a square matrix and a matching vector.")
        self.matrix = matrix
        self.rhs = rhs
        self.num_params = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def loss(self, w: torch.Tensor) -> float:
        """The quadratic's value."""
        self.counts.loss_evals += 1
        return float(0.5 * w @ (self.matrix @ w) - self.rhs @ w)

    def loss_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Value and gradient ``A w - b``."""
        self.counts.gradients += 1
        aw = self.matrix @ w
        return float(0.5 * w @ aw - self.rhs @ w), aw - self.rhs

    def curvature(self, name: str, w: torch.Tensor, **knobs) -> CurvatureOperator:
        """The matrix ``A`` as a :class:`~curvscope.operators.DenseOperator`."""
        return DenseOperator(self.matrix)
