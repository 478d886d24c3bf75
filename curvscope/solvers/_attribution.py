"""Convergence attribution: findings in words, with numbers, derived from a run's trace.

Each rule is a small function of a run (anything with ``solver``, ``settings``, ``trace``
and ``stop_reason``: a :class:`~curvscope.solvers.SolveRun` or the same keys read back from
a result document) that returns a :class:`Finding` or ``None``. Its docstring states the rule
and its thresholds; the tests build a trace that triggers it and one that must not.
:func:`attribute` applies every rule in :data:`RULES`; :func:`compare_runs` lays runs side by
side for the summary table and the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["RULES", "Finding", "attribute", "compare_runs"]

STALL_WINDOW = 10
"""Iterations over which a stall is judged."""
STALL_RTOL = 1e-6
"""Relative loss change below which the last STALL_WINDOW iterations count as a stall."""
ILL_CONDITIONED = 1e3
"""kappa at or above which conditioning is reported as limiting progress."""
INDEFINITE_RTOL = 1e-8
"""lambda_min < -INDEFINITE_RTOL * |lambda_max| counts as indefinite (round-off margin)."""
DAMPING_GROWTH = 10.0
"""Damping that ends at least this factor above its start is reported."""
RHO_POOR = 0.25
"""Reduction ratio below which the model predicted the step poorly (Brunn eq. 26)."""
MK_COSINE_TOL = 1e-6
"""Per-tensor cosine >= 1 - MK_COSINE_TOL counts as 'parallel to the gradient'."""
NEWTON_RESIDUAL_BAD = 0.1
"""Median relative Newton residual above which eq. 35 'does not solve the Newton system'."""
GROWTH_WINDOW = 3
"""A loss that rose in each of the last GROWTH_WINDOW iterations counts as diverging."""
RISE_REL = 1e-4
"""A rise counts only above this fraction of the loss: below it, a loss flat to round-off
(seen: gradient descent near a minimum, 0.0024332 'rising' in its 7th digit) is not
divergence."""


@dataclass(frozen=True)
class Finding:
    """One statement about a run.

    Attributes:
        rule: the rule's name.
        text: the statement in words, with numbers.
        evidence: the numbers it rests on.
    """

    rule: str
    text: str
    evidence: dict[str, Any]


def _get(run, name):
    if isinstance(run, dict):
        return run.get(name)
    return getattr(run, name, None)


def _col(run, key) -> list:
    trace = _get(run, "trace") or {}
    return list(trace.get(key) or [])


def _vals(run, key) -> list:
    return [v for v in _col(run, key) if v is not None and not _nan(v)]


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _steps(run) -> int:
    return max(len(_col(run, "iteration")) - 1, 0)


def converged(run) -> Finding | None:
    """Fires when the last gradient norm is at most the run's ``tol`` setting."""
    tol = (_get(run, "settings") or {}).get("tol")
    g = _vals(run, "grad_norm")
    if tol is None or not g or g[-1] > tol:
        return None
    return Finding(
        "converged",
        f"converged: gradient norm {g[-1]:.2e} <= {tol:.0e} after {_steps(run)} iterations.",
        {"grad_norm": g[-1], "tol": tol, "iterations": _steps(run)},
    )


def budget_exhausted(run) -> Finding | None:
    """Fires when the run stopped because products plus gradients reached the budget."""
    if _get(run, "stop_reason") != "budget":
        return None
    m, gr = _vals(run, "matvecs"), _vals(run, "gradients")
    budget = (_get(run, "settings") or {}).get("budget_matvecs")
    g = _vals(run, "grad_norm")
    return Finding(
        "budget_exhausted",
        f"stopped by the product budget ({budget}) after {_steps(run)} iterations "
        f"({m[-1] if m else 0} curvature products, {gr[-1] if gr else 0} gradients) with "
        f"gradient norm {g[-1]:.2e}.",
        {"budget": budget, "matvecs": m[-1] if m else 0, "gradients": gr[-1] if gr else 0},
    )


def iteration_limit(run) -> Finding | None:
    """Fires when the run hit ``max_iter`` without meeting the gradient tolerance."""
    if _get(run, "stop_reason") != "max_iter" or converged(run) is not None:
        return None
    g = _vals(run, "grad_norm")
    if not g:
        return None
    return Finding(
        "iteration_limit",
        f"stopped at the iteration limit ({_steps(run)}) with gradient norm {g[-1]:.2e} "
        f"(from {g[0]:.2e}).",
        {"iterations": _steps(run), "grad_norm": g[-1], "grad_norm_start": g[0]},
    )


def stalled(run) -> Finding | None:
    """Rule ``stalled``.

    Fires when the loss changed by at most STALL_RTOL (relative) over the last STALL_WINDOW
    iterations while the gradient tolerance was not met.
    """
    loss = _vals(run, "loss")
    if len(loss) <= STALL_WINDOW or converged(run) is not None:
        return None
    a, b = loss[-STALL_WINDOW - 1], loss[-1]
    rel = abs(a - b) / max(abs(a), 1e-300)
    if rel > STALL_RTOL:
        return None
    g = _vals(run, "grad_norm")
    return Finding(
        "stalled",
        f"stalled: the loss changed by {rel:.1e} (relative) over the last {STALL_WINDOW} "
        f"iterations while the gradient norm is still {g[-1]:.2e}.",
        {"relative_change": rel, "window": STALL_WINDOW, "grad_norm": g[-1]},
    )


def fallbacks(run) -> Finding | None:
    """Rule ``fallbacks``.

    Fires when at least one step fell back to the negative gradient (Newton-CG, Suk Alg. 4);
    reports how many were caused by negative curvature and the smallest Hessian eigenvalue
    tracked.
    """
    fb = _col(run, "fallback")
    used = [f for f in fb if f]
    if not used:
        return None
    neg = sum(f == "negative_curvature" for f in used)
    lmin = _vals(run, "hessian_min")
    cause = f"CG met negative curvature in {neg}" if neg else "no negative curvature"
    text = (
        f"fell back to gradient steps in {len(used)} of {_steps(run)} iterations: {cause}"
        f"{'' if not neg else ' of them'}"
    )
    evidence = {"fallbacks": len(used), "negative_curvature": neg, "iterations": _steps(run)}
    if lmin:
        text += f" (smallest Hessian eigenvalue {min(lmin):.3g})"
        evidence["hessian_min"] = min(lmin)
    return Finding("fallbacks", text + ".", evidence)


def negative_curvature(run) -> Finding | None:
    """Rule ``negative_curvature``.

    Fires when CG met non-positive curvature in some iteration of a solver without a
    gradient fall-back (Hessian-free, EA-CG): a matrix meant to be PSD was not, to round-
    off.
    """
    if any(_col(run, "fallback")):
        return None
    events = [
        i
        for i, v in zip(_col(run, "iteration"), _col(run, "negative_curvature"), strict=False)
        if v
    ]
    if not events:
        return None
    return Finding(
        "negative_curvature",
        f"CG met non-positive curvature in {len(events)} of {_steps(run)} iterations "
        f"(first at iteration {events[0]}).",
        {"count": len(events), "first": events[0]},
    )


def damping_growth(run) -> Finding | None:
    """Rule ``damping_growth``.

    Fires when the damping ended at least DAMPING_GROWTH times above its start; reports
    since when it grew and how often rho < RHO_POOR.
    """
    d = [
        (i, v)
        for i, v in zip(_col(run, "iteration"), _col(run, "damping"), strict=False)
        if v is not None
    ]
    if len(d) < 2 or d[0][1] <= 0:
        return None
    start, end = d[0][1], d[-1][1]
    if end < DAMPING_GROWTH * start:
        return None
    rho = _vals(run, "rho")
    poor = sum(r < RHO_POOR for r in rho)
    # the last iteration from which the damping never fell below its start again
    since = d[0][0]
    for i, v in d:
        if v <= start:
            since = i
    return Finding(
        "damping_growth",
        f"damping grew from {start:.3g} to {end:.3g} after iteration {since}: the quadratic "
        f"model predicted the reduction poorly (rho < {RHO_POOR} in {poor} of {len(rho)} "
        "iterations).",
        {"start": start, "end": end, "since": since, "poor_rho": poor, "steps": len(rho)},
    )


def conditioning(run) -> Finding | None:
    """Rule ``conditioning``.

    Fires at the last tracked eigenvalues of the matrix the solver used (the Hessian for
    first-order solvers; with its damping). Indefinite (lambda_min < -INDEFINITE_RTOL
    |lambda_max|): reports lambda_min. Positive definite with kappa = lambda_max /
    lambda_min >= ILL_CONDITIONED: reports kappa.
    """
    hi, lo = _vals(run, "curvature_max"), _vals(run, "curvature_min")
    matrix = "curvature used"
    if not hi or not lo:
        hi, lo = _vals(run, "hessian_max"), _vals(run, "hessian_min")
        matrix = "Hessian"
    if not hi or not lo:
        return None
    lmax, lmin = hi[-1], lo[-1]
    if lmin < -INDEFINITE_RTOL * abs(lmax):
        return Finding(
            "indefinite",
            f"the {matrix} is indefinite at the last tracked point: smallest eigenvalue "
            f"{lmin:.3g} (largest {lmax:.3g}).",
            {"matrix": matrix, "lambda_min": lmin, "lambda_max": lmax},
        )
    if lmin <= 0:
        return None
    kappa = lmax / lmin
    if kappa < ILL_CONDITIONED:
        return None
    return Finding(
        "ill_conditioned",
        f"progress limited by conditioning: kappa ~ {kappa:.1e} for the {matrix} "
        f"(lambda_max {lmax:.3g}, lambda_min {lmin:.3g}).",
        {"matrix": matrix, "kappa": kappa, "lambda_min": lmin, "lambda_max": lmax},
    )


def line_search_failures(run) -> Finding | None:
    """Fires when at least one line search failed to meet its conditions."""
    failed = [
        i
        for i, v in zip(_col(run, "iteration"), _col(run, "line_search_failed"), strict=False)
        if v
    ]
    if not failed:
        return None
    return Finding(
        "line_search_failures",
        f"the line search failed in {len(failed)} of {_steps(run)} iterations (first at "
        f"iteration {failed[0]}): no step met its conditions along the direction.",
        {"count": len(failed), "first": failed[0]},
    )


def rejected_steps(run) -> Finding | None:
    """Rule ``rejected_steps``.

    Fires when Hessian-free rejected at least one step (even CG backtracking did not
    decrease the loss).
    """
    rej = [v for v in _col(run, "rejected") if v]
    if not rej:
        return None
    return Finding(
        "rejected_steps",
        f"{len(rej)} of {_steps(run)} steps were rejected: even the best CG iterate "
        "increased the loss.",
        {"count": len(rej)},
    )


def mk_scaled_gradient(run) -> Finding | None:
    """Rule ``mk_scaled_gradient``.

    Fires for runs that measured the per-tensor cosine between the MK direction and the
    gradient; says 'positive per-layer rescaling of the gradient' when every cosine is at
    least 1 - MK_COSINE_TOL, else reports the smallest.
    """
    rows = [r for r in _col(run, "layer_cosines") if r]
    if not rows:
        return None
    what = "MK direction" if _get(run, "solver") == "mk" else "step direction"
    flat = [c for r in rows for c in r if c is not None]
    scales = [s for r in _col(run, "layer_scales") if r for s in r if s is not None]
    cmin = min(flat)
    evidence = {"min_cosine": cmin, "iterations": len(rows)}
    if scales:
        evidence.update(min_scale=min(scales), max_scale=max(scales))
    if cmin >= 1 - MK_COSINE_TOL:
        text = (
            f"the {what} is a positive per-tensor rescaling of the gradient: cosine "
            f">= {cmin:.12f} for every weight and bias tensor in all {len(rows)} iterations"
        )
        if scales:
            text += f"; scale factors from {min(scales):.3g} to {max(scales):.3g}"
        return Finding("mk_scaled_gradient", text + ".", evidence)
    return Finding(
        "mk_scaled_gradient",
        f"the {what} is not a per-tensor rescaling of the gradient: smallest per-tensor cosine "
        f"{cmin:.3g}.",
        evidence,
    )


def newton_residual(run) -> Finding | None:
    """Rule ``newton_residual``.

    Fires when the relative Newton residual ||H s - g|| / ||g|| of the step direction was
    measured (``mk-closed-form``); says it does not solve the Newton system when the median
    exceeds NEWTON_RESIDUAL_BAD, else that it does.
    """
    r = sorted(_vals(run, "newton_residual"))
    if not r:
        return None
    med = r[len(r) // 2]
    ev = {"median": med, "min": r[0], "max": r[-1], "measured": len(r)}
    if med > NEWTON_RESIDUAL_BAD:
        return Finding(
            "newton_residual",
            f"the eq. 35 direction does not solve the Newton system: relative residual "
            f"||Hs - g||/||g|| median {med:.3g} (range {r[0]:.3g}-{r[-1]:.3g}) over {len(r)} "
            "iterations.",
            ev,
        )
    return Finding(
        "newton_residual",
        f"the step direction solves the Newton system to a relative residual of {med:.2g} "
        "(median).",
        ev,
    )


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def non_finite(run) -> Finding | None:
    """Rule ``non_finite``.

    Fires when a recorded loss or gradient norm is NaN or infinite (written as null in a
    result document, as NaN in a fresh trace); names the first iteration.
    """
    its = _col(run, "iteration")
    bad = []
    for key in ("loss", "grad_norm"):
        col = _col(run, key)
        if not col:
            continue
        bad += [(i, key) for i, v in zip(its, col, strict=False) if not _finite(v)]
    if not bad:
        return None
    first, key = min(bad)
    what = "loss" if key == "loss" else "gradient norm"
    return Finding(
        "non_finite",
        f"non-finite values: the {what} is NaN or infinite from iteration {first} on "
        f"({len({i for i, _ in bad})} of {len(its)} recorded points).",
        {"first": first, "count": len({i for i, _ in bad}), "quantity": key},
    )


def diverged(run) -> Finding | None:
    """Rule ``diverged``.

    Fires when the last finite loss is above the starting loss, or when the loss rose in
    each of the last GROWTH_WINDOW iterations: the solver made things worse. A rise counts
    above RISE_REL of the loss only (round-off is not divergence).
    """
    loss = [v for v in _col(run, "loss") if _finite(v)]
    if len(loss) < 2:
        return None
    start, end = loss[0], loss[-1]
    tail = loss[-GROWTH_WINDOW - 1 :]

    def rose(a: float, b: float) -> bool:
        return b - a > RISE_REL * max(abs(a), abs(b))

    growing = (
        len(tail) == GROWTH_WINDOW + 1
        and all(b > a for a, b in zip(tail, tail[1:], strict=False))
        and rose(tail[0], end)
    )
    if rose(start, end):
        text = (
            f"diverged: the loss went from {start:.6g} to {end:.6g} ({end / start:.3g}x its "
            "start)" if start > 0 else f"diverged: the loss went from {start:.6g} to {end:.6g}"
        )
    elif growing:
        text = (
            f"diverging: the loss rose in each of the last {GROWTH_WINDOW} iterations, from "
            f"{tail[0]:.6g} to {end:.6g}"
        )
    else:
        return None
    return Finding(
        "diverged",
        text + ".",
        {"start": start, "end": end, "growing_last": growing, "window": GROWTH_WINDOW},
    )


def error(run) -> Finding | None:
    """Fires when the run stopped on an error (non-finite loss, unsupported model...)."""
    if _get(run, "stop_reason") != "error":
        return None
    return Finding(
        "error",
        f"stopped after {_steps(run)} iterations: {_get(run, 'message')}",
        {"message": _get(run, "message")},
    )


RULES: list[Callable[[Any], Finding | None]] = [
    converged,
    non_finite,
    diverged,
    budget_exhausted,
    iteration_limit,
    stalled,
    error,
    fallbacks,
    negative_curvature,
    damping_growth,
    rejected_steps,
    line_search_failures,
    conditioning,
    mk_scaled_gradient,
    newton_residual,
]
"""Every attribution rule, in the order findings are listed."""


def attribute(run) -> list[Finding]:
    """Apply every rule of :data:`RULES` to ``run``.

    Args:
        run: a :class:`~curvscope.solvers.SolveRun` or a dict with the same keys.

    Returns:
        The findings that fired, in rule order.
    """
    return [f for rule in RULES if (f := rule(run)) is not None]


def compare_runs(runs: list) -> list[dict[str, Any]]:
    """Side-by-side rows for a summary table: one per run.

    Args:
        runs: :class:`~curvscope.solvers.SolveRun` objects or dicts with the same keys.

    Returns:
        Rows with solver, iterations, final loss and gradient norm, products, gradients,
        wall time, stop reason, final train/test accuracy and test loss, and the loss curve.
    """
    rows = []
    for run in runs:

        def last(key, run=run):
            v = _vals(run, key)
            return v[-1] if v else None

        rows.append(
            {
                "solver": _get(run, "solver"),
                "iterations": _steps(run),
                "final_loss": _get(run, "final_loss"),
                "final_grad_norm": _get(run, "final_grad_norm"),
                "num_matvecs": _get(run, "num_matvecs"),
                "num_gradients": _get(run, "num_gradients"),
                "wall_time_s": _get(run, "wall_time_s"),
                "stop_reason": _get(run, "stop_reason"),
                "train_accuracy": last("train_accuracy"),
                "test_loss": last("test_loss"),
                "test_accuracy": last("test_accuracy"),
                "loss_curve": {"iteration": _col(run, "iteration"), "loss": _col(run, "loss")},
            }
        )
    return rows
