r"""Globalised Newton-CG (Suk, thesis Sec. 9.2, Algorithm 4, with Tikhonov regularisation Sec. 7.2).

Each step solves :math:`(H + \alpha I) s = -g` by conjugate gradients on Hessian-vector
products (eq. 7.5: Tikhonov / :math:`L_2` regularisation with :math:`\alpha` "slightly above
machine precision": default :math:`\alpha = 1000\,\epsilon` of the dtype), then:

- if CG meets a direction of non-positive curvature :math:`p^T (H + \alpha I) p \le 0`, or the
  solution is not a descent direction, :math:`g^T s > T`, the step falls back to
  :math:`s = -g` (Alg. 4). Suk only asks for :math:`T < 0`; we use the scale-free
  :math:`T = -\tau \lVert g\rVert \lVert s\rVert` with :math:`\tau = 10^{-10}`;
- the step size :math:`\sigma_k` comes from Armijo backtracking from 1 (Alg. 4, "Armijo step
  size adaption", constants of :mod:`._linesearch`), also for Newton directions, as the
  thesis recommends.

The thesis leaves the CG tolerance open; we use the forcing sequence
:math:`\eta_k = \min(0.5, \sqrt{\lVert g_k\rVert})` of Nocedal & Wright (eq. 7.3), which keeps
the local convergence superlinear, and at most ``cg_max_iter`` (default 250) CG steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..linalg import cg
from ..operators import IdentityOperator
from ._linesearch import ARMIJO_C1, ARMIJO_SHRINK, armijo
from ._objective import Objective
from ._state import SolverSpec, SolverState, register

__all__ = ["DESCENT_TOL", "newton_cg_step"]

DESCENT_TOL = 1e-10
"""tau in the fall-back threshold T = -tau ||g|| ||s|| (Suk Alg. 4 asks only T < 0)."""


def newton_cg_step(
    state: SolverState, objective: Objective, settings: dict[str, Any]
) -> tuple[SolverState, dict[str, Any]]:
    """One step of Suk's Algorithm 4.

    Args:
        state: current state.
        objective: the function (its ``curvature(settings["curvature"], w)`` is the matrix).
        settings: ``curvature``, ``tikhonov`` (``None``: 1000 eps), ``cg_max_iter``,
            ``cg_tol`` (``None``: the forcing sequence), ``descent_tol``, ``shrink``, ``c1``.

    Returns:
        The new state and the trace entries of this step.
    """
    g = state.grad
    gnorm = float(torch.linalg.vector_norm(g))
    alpha = settings["tikhonov"]
    if alpha is None:
        alpha = 1000 * torch.finfo(state.w.dtype).eps
    H = objective.track(objective.curvature(settings["curvature"], state.w))
    A = H + alpha * IdentityOperator(H.shape[0], H.dtype, H.device) if alpha else H
    tol = settings["cg_tol"]
    if tol is None:
        tol = min(0.5, math.sqrt(gnorm))
    res = cg(A, -g, tol=tol, max_iter=int(settings["cg_max_iter"]))
    s = res.x
    snorm = float(torch.linalg.vector_norm(s))
    threshold = -settings["descent_tol"] * gnorm * snorm
    fallback = None
    if res.negative_curvature:
        fallback = "negative_curvature"
    elif snorm == 0.0 or float(g @ s) > threshold:
        fallback = "not_descent"
    if fallback is not None:
        s = -g
    slope = float(g @ s)
    ls = armijo(
        objective,
        state.w,
        s,
        state.loss,
        slope,
        alpha0=1.0,
        shrink=settings["shrink"],
        c1=settings["c1"],
    )
    neg = [c for c in res.curvatures if c <= 0]
    info = {
        "cg_iters": res.num_iters,
        "cg_stop_reason": res.stop_reason,
        "cg_residual": res.residual_norm / max(gnorm, 1e-300),
        "negative_curvature": res.negative_curvature,
        "fallback": fallback,
        "damping": alpha,
        "alpha": ls.alpha,
        "step_length": ls.alpha * float(torch.linalg.vector_norm(s)),
        "line_search_evals": ls.evals,
        "line_search_failed": not ls.success,
        "min_cg_curvature": min(neg) if neg else None,
    }
    if not ls.success:
        return state.evolve(iteration=state.iteration + 1), info
    w = state.w + ls.alpha * s
    loss, grad = objective.loss_and_grad(w)
    return state.evolve(w=w, loss=loss, grad=grad, iteration=state.iteration + 1), info


register(
    SolverSpec(
        "newton-cg",
        newton_cg_step,
        {
            "curvature": "hessian",
            "tikhonov": None,
            "cg_max_iter": 250,
            "cg_tol": None,
            "descent_tol": DESCENT_TOL,
            "shrink": ARMIJO_SHRINK,
            "c1": ARMIJO_C1,
        },
        "Newton-CG with Armijo backtracking and gradient fall-back (Suk Alg. 4)",
        curvature="hessian",
    )
)
