r"""Mehouachi & Kasmi: the MK direction (eq. 40/42) and the closed-form direction of eq. 35.

Both are written for an MLP :math:`x(k) = F(W(k) x(k-1) + \beta(k))`, :math:`k = 1..n`
(Linear layers with biases, each followed by elementwise activations, identity allowed), and a
single pattern :math:`p`. We keep the paper's symbols: :math:`G(k), g(k)` are the gradients of
the loss with respect to :math:`W(k)` and :math:`\beta(k)`; for one pattern
:math:`\lVert \nabla F(a_p(k)) b_p(k)\rVert = \lVert g(k)\rVert` (eq. 20), and
:math:`b_p(n) = -\partial \ell_p / \partial x_p(n)` is the output adjoint, which is
:math:`d_p - x_p(n)` for the paper's :math:`\tfrac12 \lVert d_p - x_p(n)\rVert^2`. With several
samples the pattern quantities are replaced by sample means (:math:`\lVert x(k-1)\rVert^2` and
:math:`\lVert b(n)\rVert^2` by their means, :math:`\lVert \nabla F(a(k))\rVert_\infty` by the
maximum over samples and units, :math:`x(k-1)` and :math:`b(n)` in eq. 35 by their means);
with one sample every formula is the paper's. The gradients are those of the user's loss
(the paper's state regulariser :math:`\mathcal R(x)` is not part of it; the paper itself uses
unregularised adjoints for eq. 65 in practice).

**MK (eq. 42, damping** :math:`\mu` **; eq. 40 is** :math:`\mu = 0` **)**, for every layer,

.. math::
    N_{MK}(k) = \frac{\lambda_{k-1}}{\mu \lambda_{k-1} + \lVert g(k)\rVert^2}\, G(k), \qquad
    \eta_{MK}(k) = \frac{c_k}{\mu c_k + \lVert g(k)\rVert^2}\, g(k), \qquad
    c_k = \lambda_{k-1} \lVert x(k-1)\rVert^2 + 1_{k=n}\, \lambda_n \lVert b(n)\rVert^2,

and :math:`\theta \leftarrow \theta - \eta_{step} [N_{MK}; \eta_{MK}]` with a constant step
(Sec. 6: "the step has been maintained constant"; its value is not given, default 0.1).
Every factor is positive: **the MK direction is a per-tensor positive rescaling of the
gradient** (FINDINGS.md section 3), which each step measures (per-tensor cosine with the
gradient and scale factor) so the attribution can state it from the run.

**Regularisation.** ``regularization="layer"`` (default) uses the optimal layer values of
eq. 65, :math:`\lambda_k = \lVert \nabla F(a(k+1)) b(k+1)\rVert_2 / \lVert \nabla
F(a(k))\rVert_\infty` for :math:`k = 1..n-1`, computed with unregularised adjoints as the paper
does, and eq. 68, :math:`\lambda_n = \lVert b(n)\rVert_2 / \lVert \nabla F(a(n))\rVert_\infty`
for the output term (eq. 67 weighs :math:`\tfrac12 \lVert d - x(n)\rVert^2` by
:math:`\lambda_n`; we apply that weight to the output term of :math:`c_n`, our reading). The
first layer's :math:`\lambda_0` is that of the "white layer" of Fig. 4 (an identity layer in
front, eq. 65 with :math:`F' = 1`): :math:`\lambda_0 = \lVert g(1)\rVert`. A number
``regularization=lam`` uses one :math:`\lambda` everywhere (eq. 40/42) and :math:`\lambda_n = 1`.

**Closed form (eq. 35)**, ``mk-closed-form``:
:math:`N(k) = -\lambda_{k-1} \nabla F(a(k)) b(k) x(k-1)^T / \lVert \nabla F(a(k)) b(k)\rVert^2
= \lambda_{k-1} g(k) x(k-1)^T / \lVert g(k)\rVert^2` for :math:`k \ge 2`, :math:`N(1) = 0`
(the paper defines :math:`N` only from the second layer), :math:`\eta(k) = 1_{k=n} \nabla
F(a(n))^{-1} b(n) - N(k) x(k-1)`. The paper claims :math:`H [N; \eta] = [G; g]` (eq. 28), so
the step is :math:`\theta \leftarrow \theta - \eta_{step}[N; \eta]`. Our check found it far
from solving the Newton system (relative residual 1.8-1.95, FINDINGS.md section 3); every
step measures :math:`\lVert H s - \nabla L\rVert / \lVert \nabla L\rVert` with one Hessian
product (counted as diagnostic work).
"""

from __future__ import annotations

from typing import Any

import torch

from .._errors import OptionError, UnsupportedModelError, arg
from ..operators import HessianOperator
from ._linesearch import ARMIJO_C1, ARMIJO_SHRINK, armijo
from ._objective import Objective, ProblemObjective
from ._state import SolverSpec, SolverState, register

__all__ = ["MK_DAMPING", "mk_closed_form_direction", "mk_direction", "mk_quantities"]

MK_DAMPING = 1e-8
"""mu of eq. 41-42: the paper adds it "to avoid numerical division by zero" without a value."""


def _act_grad(acts, z: torch.Tensor) -> torch.Tensor:
    if not acts:
        return torch.ones_like(z)

    def f(u):
        for a in acts:
            u = a(u)
        return u.sum()

    return torch.func.grad(f)(z)


def mk_quantities(objective: Objective, w: torch.Tensor) -> list[dict[str, Any]]:
    """Per Linear layer (bottom to top) the pattern quantities MK and eq. 35 need.

    Returns one dict per layer with ``weight``/``bias`` (parameter names), ``x_prev_sq``
    (mean ||x(k-1)||^2), ``x_prev_mean`` (mean x(k-1)), ``fprime_inf`` (max |F'(a(k))|), and on
    the last layer ``b_out_sq`` (mean ||b(n)||^2) and ``b_out_over_fprime`` (mean of
    b_p(n) / F'(a_p(n))).

    Raises:
        UnsupportedModelError: for a model that is not an MLP of Linear layers with biases
            and elementwise activations, or whose selected parameters are not all of them.
    """
    from ..operators import mlp_chain

    if not isinstance(objective, ProblemObjective):
        raise UnsupportedModelError("MK needs a model (an MLP), not a plain objective.")
    problem = objective.work_problem(w)
    flatten, layers = mlp_chain(problem.model, "MK", problem.loss_name)
    names = []
    for layer in layers:
        if layer.module.bias is None:
            raise UnsupportedModelError(
                f"MK needs a bias in every Linear layer; layer {layer.name!r} has none."
            )
        prefix = f"{layer.name}." if layer.name else ""
        names += [prefix + "weight", prefix + "bias"]
    if sorted(names) != sorted(problem.names):
        raise UnsupportedModelError(
            "MK works on all weights and biases of the MLP together; select all of them "
            f"(no {arg('params')})."
        )
    params = {n: t.detach() for n, t in problem.params.items()}
    L = len(layers)
    acc = [{"x_prev_sq": 0.0, "x_prev_sum": 0.0, "fprime_inf": 0.0} for _ in range(L)]
    b_sq, b_over = 0.0, 0.0
    n_total = 0
    c = 1.0 / problem.num_samples if problem.reduction == "mean" else 1.0
    with problem.mode():
        for batch in problem.batches():
            h = batch.x.reshape(batch.x.shape[0], -1) if flatten else batch.x
            for t, layer in enumerate(layers):
                prefix = f"{layer.name}." if layer.name else ""
                z = torch.nn.functional.linear(
                    h, params[prefix + "weight"], params[prefix + "bias"]
                )
                acc[t]["x_prev_sq"] += float((h * h).sum())
                acc[t]["x_prev_sum"] = acc[t]["x_prev_sum"] + h.sum(0)
                fp = _act_grad(layer.acts, z)
                acc[t]["fprime_inf"] = max(acc[t]["fprime_inf"], float(fp.abs().max()))
                h = z
                for a in layer.acts:
                    h = a(h)
                if t == L - 1:
                    # per-sample loss l_p with L = c sum_p l_p: b_p(n) = -dl_p/dx_p(n)
                    out = h.detach().requires_grad_(True)
                    value = batch.weight * problem.loss_fn(out, batch.y, problem.reduction)
                    (dl,) = torch.autograd.grad(value, out)
                    b = -dl / c
                    b_sq += float((b * b).sum())
                    b_over = b_over + (b / fp).sum(0)
            n_total += batch.size
    if problem.group.active:  # statistics over every rank's batches
        maxima = problem.reduce([a.pop("fprime_inf") for a in acc], op="max")
        acc, b_sq, b_over, n_total = problem.reduce([acc, b_sq, b_over, n_total])
        for a, m in zip(acc, maxima, strict=True):
            a["fprime_inf"] = m
    out = []
    for t, layer in enumerate(layers):
        prefix = f"{layer.name}." if layer.name else ""
        q = {
            "layer": layer.name,
            "weight": prefix + "weight",
            "bias": prefix + "bias",
            "x_prev_sq": acc[t]["x_prev_sq"] / n_total,
            "x_prev_mean": acc[t]["x_prev_sum"] / n_total,
            "fprime_inf": acc[t]["fprime_inf"],
        }
        if t == L - 1:
            q["b_out_sq"] = b_sq / n_total
            q["b_out_over_fprime"] = b_over / n_total
        out.append(q)
    objective.counts.loss_evals += 1
    return out


def _lambdas(q, grads, regularization) -> tuple[list[float], float]:
    """lambda_0..lambda_{n-1} (one per layer input) and lambda_n."""
    L = len(q)
    if regularization != "layer":
        lam = float(regularization)
        if not lam > 0:
            raise OptionError(f"MK regularization must be 'layer' or positive, got {lam}.")
        return [lam] * L, 1.0
    gnorm = [float(torch.linalg.vector_norm(grads[x["bias"]])) for x in q]
    lams = [gnorm[0]]  # white layer in front (Fig. 4): eq. 65 with F' = 1
    for k in range(1, L):  # lambda_k for hidden state x(k), eq. 65
        lams.append(gnorm[k] / max(q[k - 1]["fprime_inf"], 1e-300))
    lam_n = (q[-1]["b_out_sq"] ** 0.5) / max(q[-1]["fprime_inf"], 1e-300)  # eq. 68
    return lams, lam_n


def mk_direction(
    objective: Objective, w: torch.Tensor, grad: torch.Tensor, *, regularization, damping: float
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The MK direction of eq. 42 (eq. 40 for ``damping=0``); the step is ``w - lr * d``.

    Args:
        objective: a :class:`ProblemObjective` on an MLP.
        w: current weights.
        grad: gradient at ``w``.
        regularization: ``"layer"`` (eq. 65/68) or one positive lambda.
        damping: mu.

    Returns:
        The flat direction and the per-layer lambdas and factors.
    """
    problem = objective.problem
    q = mk_quantities(objective, w)
    grads = problem.unflatten(grad)
    lams, lam_n = _lambdas(q, grads, regularization)
    parts = {n: torch.zeros_like(t) for n, t in grads.items()}
    factors = []
    L = len(q)
    for k, x in enumerate(q):
        gg = float((grads[x["bias"]] ** 2).sum())
        lam = lams[k]
        ck = lam * x["x_prev_sq"] + (lam_n * x["b_out_sq"] if k == L - 1 else 0.0)
        fw = lam / (damping * lam + gg) if damping * lam + gg > 0 else 0.0
        fb = ck / (damping * ck + gg) if damping * ck + gg > 0 else 0.0
        parts[x["weight"]] = fw * grads[x["weight"]]
        parts[x["bias"]] = fb * grads[x["bias"]]
        factors += [fw, fb]
    return problem.flatten(parts), {"mk_lambdas": lams + [lam_n], "mk_factors": factors}


def mk_closed_form_direction(
    objective: Objective, w: torch.Tensor, grad: torch.Tensor, *, regularization
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The closed-form "Newton" direction ``[N; eta]`` of eq. 35 (step ``w - lr * s``).

    Args:
        objective: a :class:`ProblemObjective` on an MLP.
        w: current weights.
        grad: gradient at ``w``.
        regularization: ``"layer"`` (eq. 65/68) or one positive lambda.

    Returns:
        The flat direction and the per-layer lambdas.
    """
    problem = objective.problem
    q = mk_quantities(objective, w)
    grads = problem.unflatten(grad)
    lams, lam_n = _lambdas(q, grads, regularization)
    parts = {}
    L = len(q)
    for k, x in enumerate(q):
        g = grads[x["bias"]]
        xm = x["x_prev_mean"]
        gg = float((g * g).sum())
        if k == 0 or gg == 0.0:
            N = torch.zeros_like(grads[x["weight"]])
        else:
            N = lams[k] * torch.outer(g, xm) / gg
        eta = -(N @ xm)
        if k == L - 1:
            eta = eta + x["b_out_over_fprime"]
        parts[x["weight"]], parts[x["bias"]] = N, eta
    return problem.flatten(parts), {"mk_lambdas": lams + [lam_n]}


def _tensor_stats(objective: Objective, d: torch.Tensor, grad: torch.Tensor) -> dict[str, list]:
    cos, scale = [], []
    for sl in objective.problem.param_slices().values():
        a, b = d[sl], grad[sl]
        na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
        cos.append(float(a @ b) / (na * nb) if na > 0 and nb > 0 else None)
        scale.append(na / nb if nb > 0 else None)
    return {"layer_cosines": cos, "layer_scales": scale}


def _move(state, objective, d, settings, info):
    """Step ``w - lr d`` (constant step, or Armijo backtracking from lr)."""
    lr = float(settings["lr"])
    info["direction_cosine"] = float(
        (d @ state.grad) / (torch.linalg.vector_norm(d) * torch.linalg.vector_norm(state.grad))
    )
    if settings["line_search"] == "armijo":
        slope = -float(state.grad @ d)
        if slope >= 0:
            info.update(alpha=0.0, step_length=0.0, line_search_failed=True)
            return state.evolve(iteration=state.iteration + 1), info
        ls = armijo(
            objective, state.w, -d, state.loss, slope, alpha0=lr, shrink=ARMIJO_SHRINK, c1=ARMIJO_C1
        )
        info.update(line_search_evals=ls.evals, line_search_failed=not ls.success)
        if not ls.success:
            info.update(alpha=0.0, step_length=0.0)
            return state.evolve(iteration=state.iteration + 1), info
        lr = ls.alpha
    elif settings["line_search"] != "none":
        raise OptionError("MK line_search must be none or armijo.")
    w = state.w - lr * d
    loss, grad = objective.loss_and_grad(w)
    info.update(alpha=lr, step_length=lr * float(torch.linalg.vector_norm(d)))
    return state.evolve(w=w, loss=loss, grad=grad, iteration=state.iteration + 1), info


def mk_step(
    state: SolverState, objective: Objective, settings: dict[str, Any]
) -> tuple[SolverState, dict[str, Any]]:
    """One MK step (eq. 42) with the per-tensor cosine and scale measured.

    Args:
        state: current state.
        objective: a :class:`ProblemObjective` on an MLP.
        settings: ``regularization``, ``damping``, ``lr``, ``line_search``.

    Returns:
        The new state and the trace entries of this step.
    """
    d, info = mk_direction(
        objective,
        state.w,
        state.grad,
        regularization=settings["regularization"],
        damping=float(settings["damping"]),
    )
    info.update(_tensor_stats(objective, d, state.grad))
    return _move(state, objective, d, settings, info)


def mk_closed_form_step(
    state: SolverState, objective: Objective, settings: dict[str, Any]
) -> tuple[SolverState, dict[str, Any]]:
    """One step along the eq. 35 direction, with its Newton residual measured.

    Args:
        state: current state.
        objective: a :class:`ProblemObjective` on an MLP.
        settings: ``regularization``, ``lr``, ``line_search``, ``measure_newton_residual``.

    Returns:
        The new state and the trace entries of this step.
    """
    s, info = mk_closed_form_direction(
        objective, state.w, state.grad, regularization=settings["regularization"]
    )
    info.update(_tensor_stats(objective, s, state.grad))
    if settings["measure_newton_residual"]:
        H = objective.track(HessianOperator(objective.work_problem(state.w)), diagnostic=True)
        r = H @ s - state.grad
        info["newton_residual"] = float(
            torch.linalg.vector_norm(r) / torch.linalg.vector_norm(state.grad)
        )
    return _move(state, objective, s, settings, info)


_MK_DEFAULTS = {"regularization": "layer", "damping": MK_DAMPING, "lr": 0.1, "line_search": "none"}

register(
    SolverSpec(
        "mk",
        mk_step,
        _MK_DEFAULTS,
        "MK direction (Mehouachi eq. 42, layer regularisation eq. 65/68), constant step",
    )
)
register(
    SolverSpec(
        "mk-closed-form",
        mk_closed_form_step,
        {
            "regularization": "layer",
            "lr": 0.1,
            "line_search": "none",
            "measure_newton_residual": True,
        },
        "closed-form 'Newton' direction of Mehouachi eq. 35, residual measured",
    )
)
