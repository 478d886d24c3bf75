r"""EA-CG (Chen et al., eq. 9-11): block-wise CG on the mixed positive-curvature Hessian.

Each step solves, for every weight and bias tensor separately (eq. 10a, 10b),

.. math:: \big((1 - \alpha)\, \hat H_{jj} + \alpha I\big)\, d_j = -g_j,

with :math:`\hat H` the block-diagonal PCH matrix (eq. 8; ``PCHOperator``, PCH-1 ``mode="abs"``
or PCH-2 ``mode="clip"``, expectation approximation), by at most ``max|CG|`` CG steps to a
relative residual ``eps_CG``, and moves :math:`\theta \leftarrow \theta + \eta d` (Chen,
Sec. "Newton's method": fixed step size :math:`\eta`).

Weight blocks use :math:`E_i[h h^T]` (eq. 8c / 11a). The cheaper rank-one
:math:`E_i[h] E_i[h]^T` of eq. 11b is not implemented: our check found it 7-99% off the
blocks it replaces (FINDINGS.md section 2).

Chen et al. tune :math:`\eta \in \{0.05, 0.1, 0.2\}`, :math:`\alpha \in \{0.01, 0.02, 0.05,
0.1\}`, ``max|CG|`` :math:`\in \{5, 10, 20, 50\}` and ``eps_CG`` :math:`\in \{10^{-10},
10^{-5}, 10^{-2}, 10^{-1}\}` by grid search and do not report the values selected; the
defaults :math:`\eta = 0.1`, :math:`\alpha = 0.01`, ``max|CG| = 10``,
``eps_CG = 1e-5`` are points of that grid. ``line_search="armijo"`` (not in the paper)
backtracks from :math:`\eta`.
"""

from __future__ import annotations

from typing import Any

import torch

from .._errors import OptionError
from ..linalg import cg
from ._linesearch import ARMIJO_C1, ARMIJO_SHRINK, armijo
from ._objective import Objective, ProblemObjective
from ._state import SolverSpec, SolverState, register

__all__ = ["eacg_direction", "eacg_step"]


def _blocks(objective: Objective) -> list[slice]:
    if isinstance(objective, ProblemObjective):
        return list(objective.problem.param_slices().values())
    return [slice(0, objective.num_params)]


def eacg_direction(
    op, grad: torch.Tensor, blocks: list[slice], *, alpha: float, max_cg: int, eps_cg: float
) -> tuple[torch.Tensor, dict[str, Any]]:
    r"""Solve eq. 10 block by block with CG.

    Args:
        op: the PCH operator (block-diagonal over ``blocks``).
        grad: the gradient ``[P]``.
        blocks: index slices of the diagonal blocks (one per tensor).
        alpha: the mixing weight :math:`\alpha` of eq. 9.
        max_cg: most CG steps per block.
        eps_cg: relative residual tolerance per block.

    Returns:
        The direction ``d`` and CG statistics (total steps, stop reasons, negative curvature).
    """
    d = torch.zeros_like(grad)
    iters, reasons, neg = 0, [], False
    for sl in blocks:
        gb = grad[sl]

        def matvec(v, sl=sl):
            full = torch.zeros_like(grad)
            full[sl] = v
            return (1 - alpha) * (op @ full)[sl] + alpha * v

        res = cg(matvec, -gb, tol=eps_cg, max_iter=max_cg)
        d[sl] = res.x
        iters += res.num_iters
        reasons.append(res.stop_reason)
        neg = neg or res.negative_curvature
    worst = "max_iter" if "max_iter" in reasons else reasons[0] if reasons else "zero_rhs"
    if "negative_curvature" in reasons:
        worst = "negative_curvature"
    return d, {"cg_iters": iters, "cg_stop_reason": worst, "negative_curvature": neg}


def eacg_step(
    state: SolverState, objective: Objective, settings: dict[str, Any]
) -> tuple[SolverState, dict[str, Any]]:
    """One EA-CG step.

    Args:
        state: current state.
        objective: the function (its ``curvature("pch-<mode>", w)`` is the PCH matrix).
        settings: ``mode``, ``alpha``, ``lr``, ``max_cg``, ``eps_cg``, ``line_search``.

    Returns:
        The new state and the trace entries of this step.

    Raises:
        OptionError: for an unknown mode or line search.
    """
    mode = settings["mode"]
    if mode not in ("abs", "clip"):
        raise OptionError(f"EA-CG mode {mode!r} is not known; choose abs (PCH-1) or clip (PCH-2).")
    if settings["line_search"] not in ("none", "armijo"):
        raise OptionError("EA-CG line_search must be none or armijo.")
    op = objective.track(objective.curvature(f"pch-{mode}", state.w))
    d, info = eacg_direction(
        op,
        state.grad,
        _blocks(objective),
        alpha=float(settings["alpha"]),
        max_cg=int(settings["max_cg"]),
        eps_cg=float(settings["eps_cg"]),
    )
    lr = float(settings["lr"])
    info["direction_cosine"] = float(
        -(d @ state.grad) / (torch.linalg.vector_norm(d) * torch.linalg.vector_norm(state.grad))
    )
    if settings["line_search"] == "armijo":
        ls = armijo(
            objective,
            state.w,
            d,
            state.loss,
            float(state.grad @ d),
            alpha0=lr,
            shrink=ARMIJO_SHRINK,
            c1=ARMIJO_C1,
        )
        info.update(line_search_evals=ls.evals, line_search_failed=not ls.success)
        if not ls.success:
            info.update(alpha=0.0, step_length=0.0)
            return state.evolve(iteration=state.iteration + 1), info
        lr = ls.alpha
    w = state.w + lr * d
    loss, grad = objective.loss_and_grad(w)
    info.update(alpha=lr, step_length=lr * float(torch.linalg.vector_norm(d)))
    return state.evolve(w=w, loss=loss, grad=grad, iteration=state.iteration + 1), info


_DEFAULTS = {
    "mode": "abs",
    "alpha": 0.01,
    "lr": 0.1,
    "max_cg": 10,
    "eps_cg": 1e-5,
    "line_search": "none",
}

register(
    SolverSpec(
        "eacg",
        eacg_step,
        _DEFAULTS,
        "EA-CG: block-wise CG on (1-a) PCH + a I, fixed step (Chen eq. 9-11)",
        curvature="pch-abs",
    )
)
register(
    SolverSpec(
        "eacg-clip",
        eacg_step,
        {**_DEFAULTS, "mode": "clip"},
        "EA-CG with PCH-2 (positive parts) (Chen eq. 8-11)",
        curvature="pch-clip",
    )
)
