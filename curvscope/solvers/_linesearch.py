r"""Line searches: Armijo backtracking and the strong Wolfe conditions.

Both search along a direction ``p`` from ``w`` for a step ``alpha`` on
:math:`\phi(\alpha) = f(w + \alpha p)`, with :math:`\phi'(0) = g^T p < 0`.

- Armijo backtracking (Suk, thesis Sec. 9.2, Alg. 4: :math:`\sigma_k \in \{1, \beta,
  \beta^2, \dots\}` until :math:`f(w + \sigma p) - f(w) \le \sigma \gamma g^T p`). The thesis
  leaves :math:`\beta, \gamma \in (0, 1)` open; the defaults :math:`\beta = 1/2`,
  :math:`\gamma = 10^{-4}` are Nocedal & Wright's (*Numerical Optimization*, 2nd ed., Sec. 3.1).
- Strong Wolfe (Nocedal & Wright Alg. 3.5 with ``zoom``, Alg. 3.6, cubic interpolation with a
  bisection safeguard), as used by L-BFGS and nonlinear CG (Veitch Sec. 2). Sufficient
  decrease :math:`\phi(\alpha) \le \phi(0) + c_1 \alpha \phi'(0)` and curvature
  :math:`|\phi'(\alpha)| \le c_2 |\phi'(0)|`, defaults :math:`c_1 = 10^{-4}` and
  :math:`c_2 = 0.9` (quasi-Newton) or :math:`0.1` (nonlinear CG), Nocedal & Wright Sec. 3.1
  and 5.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._errors import NonFiniteError
from ._objective import Objective

__all__ = ["LineSearchResult", "armijo", "strong_wolfe"]

ARMIJO_SHRINK = 0.5
"""Backtracking factor beta (Nocedal & Wright Sec. 3.1; Suk Alg. 4 leaves it open)."""
ARMIJO_C1 = 1e-4
"""Sufficient-decrease constant gamma / c1 (Nocedal & Wright Sec. 3.1)."""
WOLFE_C2_QUASI_NEWTON = 0.9
"""Curvature constant for L-BFGS (Nocedal & Wright Sec. 3.1)."""
WOLFE_C2_NLCG = 0.1
"""Curvature constant for nonlinear CG (Nocedal & Wright Sec. 5.2)."""
ROUNDOFF_FACTOR = 100.0
"""Strong-Wolfe loss comparisons allow ``ROUNDOFF_FACTOR * eps * |f(w)|`` of round-off.

Near a minimiser the decrease a step can make falls below the loss's own rounding error,
and without this margin the searches fail there although the gradient (which decides the
curvature condition) is still accurate. Armijo backtracking gets no margin: with the loss
as its only test, the margin lets steepest descent cycle between two points near the minimiser."""


def _fuzz(loss0: float, dtype: torch.dtype) -> float:
    return ROUNDOFF_FACTOR * torch.finfo(dtype).eps * abs(loss0)


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of a line search.

    Attributes:
        alpha: accepted step (0 when the search failed and the point did not move).
        loss: objective at the accepted point.
        grad: gradient there (``None`` for Armijo, which evaluates losses only).
        evals: objective evaluations spent.
        success: whether the conditions were met.
    """

    alpha: float
    loss: float
    grad: torch.Tensor | None
    evals: int
    success: bool


def armijo(
    objective: Objective,
    w: torch.Tensor,
    p: torch.Tensor,
    loss0: float,
    slope0: float,
    *,
    alpha0: float = 1.0,
    shrink: float = ARMIJO_SHRINK,
    c1: float = ARMIJO_C1,
    max_evals: int = 30,
) -> LineSearchResult:
    """Backtrack from ``alpha0`` by ``shrink`` until sufficient decrease holds.

    Args:
        objective: the function.
        w: current point.
        p: direction with ``slope0 = g^T p < 0``.
        loss0: ``f(w)``.
        slope0: ``g^T p``.
        alpha0: first trial step.
        shrink: backtracking factor.
        c1: sufficient-decrease constant.
        max_evals: trial steps before giving up.

    Returns:
        The accepted step; on failure ``alpha = 0`` and the loss at ``w``.
    """
    alpha = alpha0
    for k in range(1, max_evals + 1):
        try:
            value = objective.loss(w + alpha * p)
        except NonFiniteError:  # the trial step overflowed: treat it as too long
            value = math.inf
        if value <= loss0 + c1 * alpha * slope0:
            return LineSearchResult(alpha, value, None, k, True)
        alpha *= shrink
    return LineSearchResult(0.0, loss0, None, max_evals, False)


def _cubic_min(a, fa, ga, b, fb, gb) -> float | None:
    """Minimiser of the cubic through (a, fa, ga), (b, fb, gb) (Nocedal & Wright eq. 3.59)."""
    d1 = ga + gb - 3 * (fa - fb) / (a - b)
    disc = d1 * d1 - ga * gb
    if disc < 0:
        return None
    d2 = math.copysign(math.sqrt(disc), b - a)
    denom = gb - ga + 2 * d2
    if denom == 0:
        return None
    return b - (b - a) * (gb + d2 - d1) / denom


def strong_wolfe(
    objective: Objective,
    w: torch.Tensor,
    p: torch.Tensor,
    loss0: float,
    grad0: torch.Tensor,
    *,
    alpha0: float = 1.0,
    c1: float = ARMIJO_C1,
    c2: float = WOLFE_C2_QUASI_NEWTON,
    alpha_max: float = 1e10,
    max_evals: int = 25,
) -> LineSearchResult:
    """Step satisfying the strong Wolfe conditions (Nocedal & Wright Alg. 3.5 and 3.6).

    Args:
        objective: the function.
        w: current point.
        p: descent direction.
        loss0: ``f(w)``.
        grad0: gradient at ``w``.
        alpha0: first trial step.
        c1: sufficient-decrease constant.
        c2: curvature constant.
        alpha_max: largest step tried.
        max_evals: objective-and-gradient evaluations before giving up.

    Returns:
        The accepted step with loss and gradient there. On failure the best point seen with
        sufficient decrease is returned with ``success=False`` (or ``alpha = 0``).
    """
    slope0 = float(grad0 @ p)
    fuzz = _fuzz(loss0, w.dtype)
    evals = 0
    best = LineSearchResult(0.0, loss0, grad0, 0, False)

    def phi(a: float) -> tuple[float, torch.Tensor, float]:
        nonlocal evals, best
        evals += 1
        try:
            value, grad = objective.loss_and_grad(w + a * p)
        except NonFiniteError:  # the trial step overflowed: treat it as too long
            return math.inf, grad0, math.nan
        if value <= loss0 + c1 * a * slope0 + fuzz and value < best.loss:
            best = LineSearchResult(a, value, grad, 0, False)
        return value, grad, float(grad @ p)

    def fail() -> LineSearchResult:
        return LineSearchResult(best.alpha, best.loss, best.grad, evals, False)

    def zoom(lo, flo, glo, hi, fhi, ghi) -> LineSearchResult:
        while evals < max_evals:
            a = _cubic_min(lo, flo, glo, hi, fhi, ghi)
            left, right = min(lo, hi), max(lo, hi)
            margin = 0.1 * (right - left)
            if a is None or not (left + margin <= a <= right - margin):
                a = 0.5 * (lo + hi)  # bisection safeguard
            fa, ga_vec, ga = phi(a)
            if fa > loss0 + c1 * a * slope0 + fuzz or fa > flo + fuzz:
                hi, fhi, ghi = a, fa, ga
            else:
                if abs(ga) <= -c2 * slope0:
                    return LineSearchResult(a, fa, ga_vec, evals, True)
                if ga * (hi - lo) >= 0:
                    hi, fhi, ghi = lo, flo, glo
                lo, flo, glo = a, fa, ga
            if abs(hi - lo) <= 1e-16 * max(abs(lo), 1.0):
                break
        return fail()

    prev, fprev, gprev = 0.0, loss0, slope0
    a = alpha0
    first = True
    while evals < max_evals:
        fa, ga_vec, ga = phi(a)
        if fa > loss0 + c1 * a * slope0 + fuzz or (not first and fa > fprev + fuzz):
            return zoom(prev, fprev, gprev, a, fa, ga)
        if abs(ga) <= -c2 * slope0:
            return LineSearchResult(a, fa, ga_vec, evals, True)
        if ga >= 0:
            return zoom(a, fa, ga, prev, fprev, gprev)
        prev, fprev, gprev = a, fa, ga
        a = min(2.0 * a, alpha_max)
        first = False
    return fail()
