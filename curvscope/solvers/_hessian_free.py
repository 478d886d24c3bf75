r"""Hessian-free optimisation with the damped GGN (Brunn et al., Alg. 1-2; Martens 2010).

Each step (Brunn Alg. 1) solves the damped Gauss-Newton system (eq. 20, 27)

.. math:: (G + \lambda I)\, v = g, \qquad \theta_{k+1} = \theta_k - v,

by preconditioned CG (Alg. 2) warm-started from the previous update, and then adapts
:math:`\lambda` by the Levenberg-Marquardt rule (eq. 25-26).

**CG and its stopping rule.** Alg. 2 tracks
:math:`\psi_i = \tfrac12 \langle v_i, w_i - 2 g\rangle = \tfrac12 v_i^T (G + \lambda I) v_i -
g^T v_i`, the damped quadratic model's change for the step :math:`-v_i`, and runs while
:math:`i \le j` or :math:`s > \varepsilon j` or :math:`\psi_i \ge 0`, with
:math:`s = 1 - \psi_{i-j} / \psi_i = (\psi_i - \psi_{i-j}) / \psi_i`: Martens' relative-progress
rule (Martens 2010, Sec. 4.4). As printed, the window update
:math:`j \leftarrow \max\{t, \lceil j/t\rceil\}` leaves :math:`j = t` for ever; we use
Martens' window :math:`j = \max(t, \lceil 0.1\, i\rceil)`, which equals :math:`t` for the first
:math:`10t` steps. Defaults: :math:`\varepsilon = 5 \cdot 10^{-4}` and at least :math:`t = 3`
steps (Brunn Sec. V.B), at most 250 steps (Martens 2010, Sec. 4.4). The solve stops early,
and says so, when CG meets non-positive curvature (only possible through round-off or a
non-PSD "GGN" with a non-convex loss).

**Preconditioner.** :math:`M = [\operatorname{diag}(c \sum_i \nabla \ell_i \odot \nabla\ell_i)
+ \lambda I]^{\xi}` with :math:`\xi = 3/4` (Martens 2010, Sec. 4.7; Brunn cites it as "[4]"),
:math:`c` the loss normalisation (per-sample gradients by ``torch.func``); ``"none"`` turns it
off. Objectives without per-sample structure (the quadratic test double) use none.

**Damping** (eq. 25-26). :math:`\rho = (f(\theta_k + p) - f(\theta_k)) / (q(p) - q(0))` with
:math:`p = -v` and :math:`q(p) - q(0) = g^T p + \tfrac12 p^T G p = \psi - \tfrac12 \lambda
\lVert v\rVert^2`, the *undamped* model (Martens 2010, Sec. 4.1). Eq. 25 as printed has the
numerator the other way round (:math:`f(\theta_k) - f(\theta_{k+1})`), which would make every
successful step's :math:`\rho` negative; we use Martens' sign. Then :math:`\lambda \leftarrow r
\lambda` if :math:`\rho < 1/4`, :math:`\lambda / r` if :math:`\rho > 3/4`, with :math:`r = 1.5`
(eq. 26; Brunn recommend :math:`r = 1.01` for batches under 150 samples). The model change is
computed from CG quantities, so :math:`\rho` costs no extra product. Alg. 2's "denom" line
(:math:`\psi_i + \langle v_i, 2 g - \tfrac12 \lambda v_i\rangle`) is not this model change
and is not used. The initial :math:`\lambda` is not fixed by the paper; default 1.

**CG backtracking** (Martens 2010, Sec. 4.6). The iterates at steps :math:`\lceil 1.3^k
\rceil` and the last one are kept; after CG the loss is evaluated at them from the last
backwards while it keeps decreasing, and the best is taken. If even that step increases the
loss it is rejected (the point does not move) and :math:`\rho < 0` raises the damping.

**Warm start.** CG starts from :math:`\zeta v_{k-1}` with :math:`\zeta = 0.95` (Martens
2010, Sec. 4.5; Brunn Alg. 1 starts from :math:`v_{k-1}`, i.e. :math:`\zeta = 1`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..operators import IdentityOperator
from ._objective import Objective, ProblemObjective
from ._state import SolverSpec, SolverState, register

__all__ = [
    "CG_BACKTRACK_BASE",
    "DAMPING_RATIO",
    "MARTENS_EPS",
    "MIN_CG_STEPS",
    "hessian_free_step",
    "lm_damping_update",
    "martens_should_stop",
    "martens_pcg",
]

MARTENS_EPS = 5e-4
"""Relative-progress tolerance epsilon of the CG stopping rule (Brunn Sec. V.B)."""
MIN_CG_STEPS = 3
"""Minimum number t of PCG steps (Brunn Sec. III.E and V.B)."""
WINDOW_FRACTION = 0.1
"""Martens' window j = max(t, ceil(0.1 i)) (Martens 2010, Sec. 4.4)."""
DAMPING_RATIO = 1.5
"""r of the Levenberg-Marquardt update, eq. 26 (Brunn Sec. III.D)."""
RHO_LOW, RHO_HIGH = 0.25, 0.75
"""Thresholds of eq. 26."""
CG_BACKTRACK_BASE = 1.3
"""Iterates kept for CG backtracking at steps ceil(1.3^k) (Martens 2010, Sec. 4.6)."""
PRECONDITIONER_EXPONENT = 0.75
"""xi of Martens' diagonal preconditioner (Martens 2010, Sec. 4.7)."""
WARM_START_DECAY = 0.95
"""zeta of the CG warm start (Martens 2010, Sec. 4.5)."""


def martens_should_stop(
    psi: list[float], *, eps: float = MARTENS_EPS, min_steps: int = MIN_CG_STEPS
) -> bool:
    r"""Martens' CG stopping rule as in Brunn Alg. 2.

    With :math:`i = \text{len}(\psi) - 1` steps done and window :math:`j = \max(t, \lceil 0.1
    i\rceil)`, stop when :math:`i > j`, :math:`\psi_i < 0` and :math:`(\psi_i - \psi_{i-j}) /
    \psi_i \le \varepsilon j`.

    Args:
        psi: :math:`\psi_0, \dots, \psi_i` (the model change after each step, ``psi[0]`` at
            the start vector).
        eps: relative-progress tolerance.
        min_steps: :math:`t`.

    Returns:
        Whether CG should stop after step ``i``.
    """
    i = len(psi) - 1
    j = max(min_steps, math.ceil(WINDOW_FRACTION * i))
    if i <= j or psi[i] >= 0:
        return False
    s = (psi[i] - psi[i - j]) / psi[i]
    return s <= eps * j


def lm_damping_update(
    damping: float,
    rho: float,
    *,
    ratio: float = DAMPING_RATIO,
    low: float = RHO_LOW,
    high: float = RHO_HIGH,
) -> float:
    """The Levenberg-Marquardt damping update of Brunn eq. 26.

    Args:
        damping: current lambda.
        rho: reduction ratio (eq. 25, Martens' sign); NaN counts as a failed step.
        ratio: r.
        low: below it the damping grows.
        high: above it the damping shrinks.

    Returns:
        The new lambda.
    """
    if not rho >= low:  # also NaN
        return damping * ratio
    if rho > high:
        return damping / ratio
    return damping


def martens_pcg(
    A,
    g: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    preconditioner: torch.Tensor | None = None,
    max_iter: int = 250,
    eps: float = MARTENS_EPS,
    min_steps: int = MIN_CG_STEPS,
) -> dict[str, Any]:
    r"""Brunn's Algorithm 2: PCG for :math:`A v = g` with Martens' stopping rule.

    Args:
        A: the damped matrix (operator or callable on ``[P]``).
        g: right-hand side (the gradient).
        x0: start vector (default zero).
        preconditioner: the diagonal of :math:`M` (``None``: identity).
        max_iter: most steps.
        eps: relative-progress tolerance of the stopping rule.
        min_steps: minimum steps t.

    Returns:
        ``x`` (last iterate), ``psi`` (list), ``iters``, ``matvecs``, ``stop_reason``
        (``"martens"``, ``"max_iter"``, ``"negative_curvature"``, ``"converged"``),
        ``negative_curvature`` and ``backtrack`` (list of ``(i, v_i, psi_i)`` kept for CG
        backtracking, the last iterate included).
    """
    matvec = A.matvec if hasattr(A, "matvec") else A
    x = torch.zeros_like(g) if x0 is None else x0.clone()
    matvecs = 0
    if x0 is None:
        w = torch.zeros_like(g)
    else:
        w = matvec(x)
        matvecs += 1
    r = g - w

    def msolve(v):
        return v if preconditioner is None else v / preconditioner

    y = msolve(r)
    d = y.clone()
    ry = float(r @ y)
    psi = [0.5 * float(x @ (w - 2 * g))]
    keep = []
    next_keep = 1
    k_pow = 0
    stop = "max_iter"
    neg = False
    i = 0
    gnorm = float(torch.linalg.vector_norm(g))
    while i < max_iter:
        if float(torch.linalg.vector_norm(r)) <= 1e-14 * max(gnorm, 1e-300):
            stop = "converged"
            break
        z = matvec(d)
        matvecs += 1
        dz = float(d @ z)
        if dz <= 0:
            stop, neg = "negative_curvature", True
            break
        i += 1
        alpha = ry / dz
        w = w + alpha * z
        x = x + alpha * d
        r = r - alpha * z
        y = msolve(r)
        ry_new = float(r @ y)
        d = y + (ry_new / ry) * d
        ry = ry_new
        psi.append(0.5 * float(x @ (w - 2 * g)))
        if i >= next_keep:
            keep.append((i, x.clone(), psi[-1]))
            while next_keep <= i:
                k_pow += 1
                next_keep = math.ceil(CG_BACKTRACK_BASE**k_pow)
        if martens_should_stop(psi, eps=eps, min_steps=min_steps):
            stop = "martens"
            break
    if not keep or keep[-1][0] != i:
        keep.append((i, x.clone(), psi[-1]))
    return {
        "x": x,
        "psi": psi,
        "iters": i,
        "matvecs": matvecs,
        "stop_reason": stop,
        "negative_curvature": neg,
        "backtrack": keep,
    }


def _sq_grad_diag(objective: Objective, w: torch.Tensor) -> torch.Tensor | None:
    """``c * sum_i grad_i**2`` of the per-sample losses (Martens' preconditioner)."""
    if not isinstance(objective, ProblemObjective) or objective.problem.scripted:
        return None
    problem = objective.work_problem(w)
    params = {n: t.detach() for n, t in problem.params.items()}
    total = torch.zeros(problem.num_params, dtype=problem.dtype, device=problem.device)

    def one(ps, x, y):
        out = problem.forward(ps, x.unsqueeze(0))
        return problem.loss_fn(out, y.unsqueeze(0), "sum")

    per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    scale = 1.0 / problem.num_samples if problem.reduction == "mean" else 1.0
    with problem.mode():
        for batch in problem.batches():
            grads = per_sample(params, batch.x, batch.y)
            flat = torch.cat([grads[n].reshape(batch.size, -1) for n in problem.names], dim=1)
            total += scale * (flat * flat).sum(0)
    problem.reduce(total)
    objective.counts.gradients += 1
    return total


def hessian_free_step(
    state: SolverState, objective: Objective, settings: dict[str, Any]
) -> tuple[SolverState, dict[str, Any]]:
    """One Hessian-free step (Brunn Alg. 1 body).

    Args:
        state: current state; ``memory`` holds ``damping`` and the previous update.
        objective: the function; ``curvature(settings["curvature"], w)`` is the GGN.
        settings: ``curvature``, ``damping``, ``damping_ratio``, ``cg_max_iter``,
            ``cg_eps``, ``cg_min_steps``, ``preconditioner``, ``warm_start_decay``,
            ``cg_backtracking``.

    Returns:
        The new state and the trace entries of this step.
    """
    lam = float(state.memory.get("damping", settings["damping"]))
    g = state.grad
    G = objective.track(objective.curvature(settings["curvature"], state.w))
    A = G + lam * IdentityOperator(G.shape[0], G.dtype, G.device)
    diag = None
    if settings["preconditioner"] == "martens":
        sq = _sq_grad_diag(objective, state.w)
        if sq is not None:
            diag = (sq + lam) ** PRECONDITIONER_EXPONENT
    prev = state.memory.get("update")
    x0 = None if prev is None else settings["warm_start_decay"] * prev
    res = martens_pcg(
        A,
        g,
        x0=x0,
        preconditioner=diag,
        max_iter=int(settings["cg_max_iter"]),
        eps=settings["cg_eps"],
        min_steps=int(settings["cg_min_steps"]),
    )
    # CG backtracking: from the last kept iterate backwards while the loss decreases.
    candidates = res["backtrack"]
    if not settings["cg_backtracking"]:
        candidates = candidates[-1:]
    best = None
    evals = 0
    for i, v, psi in reversed(candidates):
        value = objective.loss(state.w - v)
        evals += 1
        if best is None or value < best[0]:
            best = (value, i, v, psi)
        else:
            break
    value, chosen_iter, v, psi = best
    model_change = psi - 0.5 * lam * float(v @ v)
    actual = value - state.loss
    rho = actual / model_change if model_change < 0 else float("nan")
    new_lam = lm_damping_update(lam, rho, ratio=settings["damping_ratio"])
    info = {
        "cg_iters": res["iters"],
        "cg_stop_reason": res["stop_reason"],
        "negative_curvature": res["negative_curvature"],
        "damping": lam,
        "rho": rho,
        "cg_backtrack_iter": chosen_iter,
        "line_search_evals": evals,
        "predicted_reduction": -model_change,
        "actual_reduction": -actual,
    }
    if not value < state.loss:
        info.update(step_length=0.0, rejected=True)
        memory = {"damping": new_lam, "update": None}
        return state.evolve(iteration=state.iteration + 1, memory=memory), info
    w = state.w - v
    loss, grad = objective.loss_and_grad(w)
    info.update(step_length=float(torch.linalg.vector_norm(v)), rejected=False)
    memory = {"damping": new_lam, "update": v}
    return state.evolve(
        w=w, loss=loss, grad=grad, iteration=state.iteration + 1, memory=memory
    ), info


register(
    SolverSpec(
        "hf",
        hessian_free_step,
        {
            "curvature": "ggn",
            "damping": 1.0,
            "damping_ratio": DAMPING_RATIO,
            "cg_max_iter": 250,
            "cg_eps": MARTENS_EPS,
            "cg_min_steps": MIN_CG_STEPS,
            "preconditioner": "martens",
            "warm_start_decay": WARM_START_DECAY,
            "cg_backtracking": True,
        },
        "Hessian-free: damped GGN, PCG with Martens' rule, LM damping (Brunn Alg. 1-2)",
        curvature="ggn",
    )
)
