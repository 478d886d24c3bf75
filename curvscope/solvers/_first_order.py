r"""First-order and quasi-Newton solvers: GD, L-BFGS and nonlinear CG (Veitch Sec. 2).

- ``gd``: :math:`w \leftarrow w - \eta g` with a fixed step ``lr`` (Veitch's "Gradient";
  the paper gives no value, the default 0.1 is ours).
- ``gd-armijo``: steepest descent with Armijo backtracking from ``alpha0`` (Veitch's
  "Steplength estimator"; constants of :mod:`._linesearch`).
- ``lbfgs``: limited-memory BFGS, two-loop recursion with the initial scaling
  :math:`H_0 = s^T y / y^T y\, I` (Nocedal & Wright Alg. 7.4 and eq. 7.20), memory
  ``m = 10`` (scipy's L-BFGS-B default, the solver behind Veitch's Table 3), strong Wolfe
  line search with :math:`c_2 = 0.9`. A pair with :math:`s^T y \le 10^{-10} \lVert s\rVert
  \lVert y\rVert` is skipped (cannot happen after a successful strong-Wolfe step).
- ``nlcg``: nonlinear conjugate gradients with Polak-Ribiere+ (``beta="pr+"``:
  :math:`\beta = \max(0, g_{k+1}^T (g_{k+1} - g_k) / g_k^T g_k)`) or Fletcher-Reeves
  (``beta="fr"``: :math:`\beta = g_{k+1}^T g_{k+1} / g_k^T g_k`), strong Wolfe with
  :math:`c_2 = 0.1` (Nocedal & Wright Sec. 5.2), restart with :math:`-g` when the new
  direction is not a descent direction. Initial trial step from the previous one
  (Nocedal & Wright eq. 3.60).
"""

from __future__ import annotations

from typing import Any

import torch

from .._errors import OptionError
from ._linesearch import (
    ARMIJO_C1,
    ARMIJO_SHRINK,
    WOLFE_C2_NLCG,
    WOLFE_C2_QUASI_NEWTON,
    armijo,
    strong_wolfe,
)
from ._objective import Objective
from ._state import SolverSpec, SolverState, register

__all__ = ["gd_armijo_step", "gd_step", "lbfgs_step", "nlcg_step"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def gd_step(
    state: SolverState, objective: Objective, settings: dict[str, Any]
) -> tuple[SolverState, dict[str, Any]]:
    """One fixed-step gradient descent step.

    Args:
        state: current state.
        objective: the function.
        settings: ``lr``.

    Returns:
        The new state and the trace entries of this step.
    """
    lr = float(settings["lr"])
    w = state.w - lr * state.grad
    loss, grad = objective.loss_and_grad(w)
    info = {"step_length": lr * float(torch.linalg.vector_norm(state.grad)), "alpha": lr}
    return state.evolve(w=w, loss=loss, grad=grad, iteration=state.iteration + 1), info


def gd_armijo_step(
    state: SolverState, objective: Objective, settings: dict[str, Any]
) -> tuple[SolverState, dict[str, Any]]:
    """One steepest-descent step with Armijo backtracking.

    Args:
        state: current state.
        objective: the function.
        settings: ``alpha0``, ``shrink``, ``c1``.

    Returns:
        The new state and the trace entries of this step.
    """
    p = -state.grad
    slope = float(state.grad @ p)
    ls = armijo(
        objective,
        state.w,
        p,
        state.loss,
        slope,
        alpha0=settings["alpha0"],
        shrink=settings["shrink"],
        c1=settings["c1"],
    )
    info = {
        "alpha": ls.alpha,
        "step_length": ls.alpha * float(torch.linalg.vector_norm(p)),
        "line_search_evals": ls.evals,
        "line_search_failed": not ls.success,
    }
    if not ls.success:
        return state.evolve(iteration=state.iteration + 1), info
    w = state.w + ls.alpha * p
    loss, grad = objective.loss_and_grad(w)
    return state.evolve(w=w, loss=loss, grad=grad, iteration=state.iteration + 1), info


def _two_loop(grad: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Nocedal & Wright Alg. 7.4: ``-H_k g`` from the stored ``(s, y)`` pairs."""
    q = grad.clone()
    alphas = []
    for s, y in reversed(pairs):
        rho = 1.0 / float(y @ s)
        a = rho * float(s @ q)
        alphas.append((a, rho))
        q = q - a * y
    if pairs:
        s, y = pairs[-1]
        q = q * (float(s @ y) / float(y @ y))
    for (s, y), (a, rho) in zip(pairs, reversed(alphas), strict=True):
        b = rho * float(y @ q)
        q = q + (a - b) * s
    return -q


def lbfgs_step(
    state: SolverState, objective: Objective, settings: dict[str, Any]
) -> tuple[SolverState, dict[str, Any]]:
    """One L-BFGS step with a strong-Wolfe line search.

    Args:
        state: current state; ``memory["pairs"]`` holds the last ``m`` pairs.
        objective: the function.
        settings: ``memory``, ``c1``, ``c2``.

    Returns:
        The new state and the trace entries of this step.
    """
    pairs = list(state.memory.get("pairs", []))
    p = _two_loop(state.grad, pairs)
    restarted = False
    if float(state.grad @ p) >= 0:  # safeguard: never search uphill
        p, pairs, restarted = -state.grad, [], True
    gnorm = float(torch.linalg.vector_norm(state.grad))
    alpha0 = 1.0 if pairs else min(1.0, 1.0 / max(gnorm, 1e-300))
    ls = strong_wolfe(
        objective,
        state.w,
        p,
        state.loss,
        state.grad,
        alpha0=alpha0,
        c1=settings["c1"],
        c2=settings["c2"],
    )
    info = {
        "alpha": ls.alpha,
        "step_length": ls.alpha * float(torch.linalg.vector_norm(p)),
        "line_search_evals": ls.evals,
        "line_search_failed": not ls.success,
        "restarted": restarted,
        "direction_cosine": _cos(p, -state.grad),
    }
    if ls.alpha == 0.0:
        memory = {"pairs": []}
        return state.evolve(iteration=state.iteration + 1, memory=memory), info
    w = state.w + ls.alpha * p
    s, y = w - state.w, ls.grad - state.grad
    if float(s @ y) > 1e-10 * float(torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)):
        pairs.append((s, y))
        pairs = pairs[-int(settings["memory"]) :]
    new = state.evolve(
        w=w, loss=ls.loss, grad=ls.grad, iteration=state.iteration + 1, memory={"pairs": pairs}
    )
    return new, info


def nlcg_step(
    state: SolverState, objective: Objective, settings: dict[str, Any]
) -> tuple[SolverState, dict[str, Any]]:
    """One nonlinear CG step (PR+ or FR) with a strong-Wolfe line search.

    Args:
        state: current state; ``memory`` holds the previous direction and step.
        objective: the function.
        settings: ``beta`` (``"pr+"`` or ``"fr"``), ``c1``, ``c2``.

    Returns:
        The new state and the trace entries of this step.

    Raises:
        OptionError: for an unknown ``beta`` rule.
    """
    rule = settings["beta"]
    if rule not in ("pr+", "fr"):
        raise OptionError(f"nlcg beta rule {rule!r} is not known; choose pr+ or fr.")
    p = state.memory.get("direction")
    if p is None:
        p = -state.grad
    restarted = False
    slope = float(state.grad @ p)
    if slope >= 0:
        p, slope, restarted = -state.grad, -float(state.grad @ state.grad), True
    prev_alpha, prev_slope = state.memory.get("alpha"), state.memory.get("slope")
    if prev_alpha is None or prev_slope is None or restarted:
        gnorm = float(torch.linalg.vector_norm(state.grad))
        alpha0 = min(1.0, 1.0 / max(gnorm, 1e-300)) if prev_alpha is None else prev_alpha
    else:
        alpha0 = prev_alpha * prev_slope / slope  # Nocedal & Wright eq. 3.60
    ls = strong_wolfe(
        objective,
        state.w,
        p,
        state.loss,
        state.grad,
        alpha0=alpha0,
        c1=settings["c1"],
        c2=settings["c2"],
    )
    info = {
        "alpha": ls.alpha,
        "step_length": ls.alpha * float(torch.linalg.vector_norm(p)),
        "line_search_evals": ls.evals,
        "line_search_failed": not ls.success,
        "restarted": restarted,
        "direction_cosine": _cos(p, -state.grad),
    }
    if ls.alpha == 0.0:
        return state.evolve(iteration=state.iteration + 1, memory={}), info
    g_old, g_new = state.grad, ls.grad
    denom = float(g_old @ g_old)
    if rule == "fr":
        beta = float(g_new @ g_new) / denom
    else:
        beta = max(0.0, float(g_new @ (g_new - g_old)) / denom)
    info["beta"] = beta
    direction = -g_new + beta * p
    memory = {"direction": direction, "alpha": ls.alpha, "slope": slope}
    w = state.w + ls.alpha * p
    new = state.evolve(w=w, loss=ls.loss, grad=g_new, iteration=state.iteration + 1, memory=memory)
    return new, info


register(
    SolverSpec(
        "gd",
        gd_step,
        {"lr": 0.1},
        "gradient descent with a fixed step (Veitch Sec. 2)",
    )
)
register(
    SolverSpec(
        "gd-armijo",
        gd_armijo_step,
        {"alpha0": 1.0, "shrink": ARMIJO_SHRINK, "c1": ARMIJO_C1},
        "steepest descent with Armijo backtracking (Veitch Fig. 1, Suk Sec. 9.2)",
    )
)
register(
    SolverSpec(
        "lbfgs",
        lbfgs_step,
        {"memory": 10, "c1": ARMIJO_C1, "c2": WOLFE_C2_QUASI_NEWTON},
        "L-BFGS, strong Wolfe line search (Veitch Sec. 2, Nocedal & Wright Alg. 7.4)",
    )
)
register(
    SolverSpec(
        "nlcg",
        nlcg_step,
        {"beta": "pr+", "c1": ARMIJO_C1, "c2": WOLFE_C2_NLCG},
        "nonlinear CG, Polak-Ribiere+ or Fletcher-Reeves, strong Wolfe (Veitch Sec. 2)",
    )
)
