r"""Derivative checks: the central-difference gradient test and the Taylor-error test.

Both evaluate in float64 whatever dtype the run asked for (in float32 the Taylor e2 window
nearly vanishes: round-off near h = 0.1 on a tiny MLP, FINDINGS.md section 4); the float32
round-off floor is measured separately and reported beside the verdict.

- Gradient test (Veitch eq. 31): :math:`(L(w+\epsilon d) - L(w-\epsilon d)) / (2\epsilon)
  - g^T d = O(\epsilon^2)`: the log-log slope of the error is 2.
- Taylor test (Suk ch. 13): :math:`e_1(h) = |L(w+hd) - L(w) - h g^T d| = O(h^2)` and
  :math:`e_2(h) = |L(w+hd) - L(w) - h g^T d - \tfrac{h^2}{2} d^T H d| = O(h^3)`. The thesis
  states slopes one and two; those belong to :math:`e/h`, and for the absolute errors used
  here the slopes are 2 and 3 (FINDINGS.md section 4).

A direction fails only on evidence of a wrong derivative: a wrong gradient leaves an error of
order h (e1, e2) or 1 (central differences), a wrong Hessian an e2 of order h^2, and these
lower orders dominate as h shrinks. So the verdict rests on the slope over the smallest steps
whose errors are clear of round-off (``NEAR_FLOOR`` x the floor estimate): more than
``SLOPE_TOLERANCE`` below the order fails. A slope above the order is no such evidence (a small
next derivative along the direction lets the remainder fall faster at the larger steps): it
passes as "passed (higher-order remainder)", the numbers in the reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .._errors import CurvscopeError
from .._sampling import as_generator
from ..operators import HessianOperator
from ..problem import Problem
from ._kinks import KinkRecorder, pattern_changes

__all__ = [
    "GRADIENT_SLOPE",
    "SLOPE_TOLERANCE",
    "TAYLOR_SLOPES",
    "DirectionResult",
    "combine",
    "evaluation_problem",
    "gradient_test",
    "taylor_test",
]

GRADIENT_SLOPE = 2.0
"""Expected slope of the central-difference error (Veitch eq. 31)."""
TAYLOR_SLOPES = (2.0, 3.0)
"""Expected slopes of e1 and e2 (absolute errors; FINDINGS.md section 4)."""
SLOPE_TOLERANCE = 0.3
"""A fitted slope passes when it lies within this distance of the expected one; a wrong
derivative is called only where the slope over the smallest steps lies more than this below
the expected one (a slope above it is a higher-order remainder, no evidence of a wrong
derivative)."""
FLOOR_FACTOR = 10.0
"""Errors below FLOOR_FACTOR x the round-off estimate are excluded from the fit."""
MIN_POINTS = 3
"""Points above the round-off floor needed for a conclusive fit."""
NEAR_FLOOR = 1e4
"""Within this factor of the floor, an error that stops falling marks round-off."""
FIT_POINTS = 6
"""The slope is fitted over at most this many smallest steps above the floor (3 decades)."""
TAIL_POINTS = 3
"""The asymptotic slope is fitted over this many smallest steps whose errors are clear of
round-off (``NEAR_FLOOR`` x the floor; 1 decade): the order the errors approach as h shrinks,
which alone can show a wrong derivative."""
RISE = 0.1
"""A relative rise of the error above which a run of falling points ends (the recovery after a
zero crossing of the error); a flat error, as a wrong gradient leaves, creeps up by less."""
JUMP_FACTOR = 10.0
"""An error this many times below the expected-slope extrapolation of the step before it,
staying there at every smaller step, is a jump (a kink crossed, not a Taylor curve)."""
JUMP_VISIBLE = 100.0
"""A jump counts only where the extrapolated error is this far above the round-off floor,
so that round-off cannot explain the drop."""
HIGHER_ORDER = "passed (higher-order remainder)"
"""How a direction's reason starts when a slope lies above the order (no failure)."""
STEPS = tuple(10.0 ** (-k / 2) for k in range(0, 15))
"""h and eps values: 1 down to 1e-7 in half decades."""


@dataclass(frozen=True)
class DirectionResult:
    """One direction's sweep: steps, errors, fitted slopes and a verdict.

    ``kink_changes[i]`` counts the elements whose ReLU sign or max-pool winner differs
    between the weights and the points of step ``steps[i]``; ``None`` when the forward shows
    no piecewise-linear operation (or cannot be observed: TorchScript).
    """

    direction: str
    steps: list[float]
    errors: dict[str, list[float]]
    slopes: dict[str, float | None]
    fit_range: dict[str, list[float] | None]
    roundoff_step: dict[str, float | None]
    passed: bool | None
    reason: str
    float32_floor: dict[str, float] = field(default_factory=dict)
    kink_changes: list[int] | None = None
    evaluated_in: str = "float64"


@dataclass(frozen=True)
class _Fit:
    slope: float | None
    range: list[float] | None
    roundoff: float | None
    jump: tuple[int, int] | None = None
    tail: float | None = None
    """Slope over the ``TAIL_POINTS`` smallest steps of the window whose errors are at least
    ``NEAR_FLOOR`` x the floor (the asymptotic order); ``None`` when fewer are."""
    tail_range: list[float] | None = None


def _usable(errors: np.ndarray, floor: np.ndarray) -> np.ndarray:
    return np.isfinite(errors) & (errors > FLOOR_FACTOR * floor) & (errors > 0)


def _jump(
    steps: np.ndarray, errors: np.ndarray, floor: np.ndarray, expected: float, skip: np.ndarray
) -> tuple[int, int] | None:
    """The first drop far below the expected slope that the curve never recovers from.

    Between consecutive steps ``a`` and ``b = a + 1`` (neither in ``skip``), the error at
    ``b`` lies ``JUMP_FACTOR`` below ``errors[a] (h_b / h_a)^expected`` although that
    extrapolation is ``JUMP_VISIBLE`` above the round-off floor, and every smaller step stays
    ``JUMP_FACTOR`` below its own extrapolation where that is ``JUMP_VISIBLE`` above the floor.
    A Taylor curve cannot do this (higher-order
    terms only make errors at larger steps bigger); a zero crossing of the error dips and
    recovers; a kink left behind (errors flat, then at round-off) does it.
    """
    n = len(steps)
    above = _usable(errors, floor)
    for a in range(n - 1):
        b = a + 1
        if skip[a] or skip[b] or not above[a] or not np.isfinite(errors[b]):
            continue

        def extrapolated(j: int, a: int = a) -> float:
            return float(errors[a] * (steps[j] / steps[a]) ** expected)

        if extrapolated(b) < JUMP_VISIBLE * floor[b] or errors[b] >= extrapolated(b) / JUMP_FACTOR:
            continue
        later = [
            j
            for j in range(b + 1, n)
            if not skip[j] and np.isfinite(errors[j]) and extrapolated(j) >= JUMP_VISIBLE * floor[j]
        ]
        if all(errors[j] < extrapolated(j) / JUMP_FACTOR for j in later):
            return a, b
    return None


def _fit(
    steps: np.ndarray,
    errors: np.ndarray,
    floor: np.ndarray,
    expected: float,
    kinked: np.ndarray | None = None,
) -> _Fit:
    """Slope of log(error) against log(step) in the asymptotic window above round-off.

    Walking from the largest step down, the window is the last run of consecutive points
    that are above ``FLOOR_FACTOR x floor``, crossed no kink (``kinked``) and whose errors do
    not rise (by more than the floor); a rise, or a single point at the floor followed by
    clear errors (the error crossing zero), starts a new run. It ends where round-off takes
    over: an error below the floor, or within ``NEAR_FLOOR x floor`` that stopped falling at
    half the expected rate. The slope is fitted over the window's ``FIT_POINTS`` smallest
    steps (large steps are often not yet asymptotic, e.g. h = 1 along a top eigenvector).
    A curve with a jump (:func:`_jump`) gets no slope.
    """
    n = len(steps)
    kinked = np.zeros(n, dtype=bool) if kinked is None else kinked
    jump = _jump(steps, errors, floor, expected, kinked)
    ok = _usable(errors, floor)
    runs: list[list[int]] = []
    run: list[int] = []
    roundoff = None
    for i in range(n):
        if kinked[i]:
            if run:
                runs.append(run)
            run = []
            continue
        if not ok[i]:
            clear = i + 1 < n and ok[i + 1] and errors[i + 1] > NEAR_FLOOR * floor[i + 1]
            if clear:  # a zero crossing of the error (it recovers at once): start again
                if run:
                    runs.append(run)
                run = []
                continue
            if run or runs:  # errors reached the floor: round-off from here on
                roundoff = float(steps[i])
                break
            continue
        if run:
            prev = run[-1]
            local = np.log10(errors[prev] / errors[i]) / np.log10(steps[prev] / steps[i])
            if errors[i] < NEAR_FLOOR * floor[i] and local < expected / 2:
                roundoff = float(steps[i])
                break
            # rising again (a zero crossing): start again from here; a flat error that creeps
            # towards its limit (a wrong derivative) stays one run
            if errors[i] - errors[prev] > max(floor[i], RISE * errors[prev]):
                runs.append(run)
                run = []
        run.append(i)
    if run:
        runs.append(run)
    if roundoff is None and not runs:
        roundoff = float(steps[0])
    window = runs[-1] if runs else []
    if jump is not None or len(window) < MIN_POINTS:
        return _Fit(None, None, roundoff, jump)
    # the asymptotic order: the smallest steps whose errors are far above round-off (the
    # floor is an estimate; a loss summed over many samples is noisier than eps |L|)
    clear = [i for i in window if errors[i] >= NEAR_FLOOR * floor[i]]
    tail = clear[-TAIL_POINTS:] if len(clear) >= TAIL_POINTS else None
    window = window[-FIT_POINTS:]

    def fitted(idx: list[int]) -> tuple[float, list[float]]:
        x, y = np.log10(steps[idx]), np.log10(errors[idx])
        return float(np.polyfit(x, y, 1)[0]), [float(steps[idx[-1]]), float(steps[idx[0]])]

    slope, span = fitted(window)
    tail_slope, tail_span = fitted(tail) if tail else (None, None)
    return _Fit(slope, span, roundoff, None, tail_slope, tail_span)


def _roundoff(p: Problem) -> float:
    """Epsilon of what the model computes in: float32's where it casts inside a float64 run."""
    return max(float(torch.finfo(p.dtype).eps), p.precision.eps)


def _at_floor(p: Problem, passed: bool | None, reason: str) -> tuple[bool | None, str]:
    """A model computing in a lower precision inside the run cannot fail at that floor.

    HF Llama and T5 compute their norms in float32 in a float64 run: the errors of the
    checks then stop at float32 round-off and their slopes flatten, which says nothing
    about the derivatives (with the casts removed the slopes are 2.00 and 3.0).
    """
    if passed is not False or not p.precision.lowered:
        return passed, reason
    low = str(p.precision.computes_in).removeprefix("torch.")
    return None, (
        f"inconclusive at the {low} floor: the model computes in {low} inside this "
        f"{str(p.dtype).removeprefix('torch.')} run ({p.precision.where[0]}...), so errors stop "
        f"near {low} round-off; {reason}"
    )


def evaluation_problem(problem: Problem) -> tuple[Problem, str | None]:
    """The problem in float64 for the derivative checks, or in float32 when it cannot run so.

    Returns:
        ``(problem, note)``: the note says why float32 was used (``None`` for float64).

    Raises:
        CurvscopeError: when the model's own errors (not the dtype) stop the float64 pass.
    """
    if problem.dtype == torch.float64:
        return problem, None
    try:
        p64 = problem.to(torch.float64)
        p64.loss()
        return p64, None
    except CurvscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the model's own float64 code
        # TorchScript puts its interpreter's traceback first and the cause last
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        cause = (lines[-1] if lines else "")[:200]
        if not re.match(r"\w+(Error|Exception)\b", cause):
            cause = f"{type(exc).__name__}: {cause}".rstrip(": ")
        p32 = problem.to(torch.float32)
        return p32, (
            f"the model cannot run in float64 ({cause}), so the "
            "derivatives are checked in float32, with float32's wider round-off floor"
        )


def _recorded_loss(problem: Problem, w: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    rec = KinkRecorder()
    with rec:
        value = float(problem.loss(w))
    return value, rec.patterns


def _changes(reference: list[torch.Tensor], counts: list[int]) -> list[int] | None:
    return counts if reference else None


def _directions(
    problem: Problem, count: int, gen: torch.Generator, eigenvectors: torch.Tensor | None
) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i in range(count):
        d = torch.randn(problem.num_params, generator=gen, dtype=torch.float64)
        out.append((f"random {i + 1}", d / torch.linalg.vector_norm(d)))
    if eigenvectors is not None:
        for j in range(eigenvectors.shape[1]):
            v = eigenvectors[:, j].to(torch.float64)
            out.append((f"eigenvector {j + 1}", v / torch.linalg.vector_norm(v)))
    return out


def _verdict(
    fits: dict[str, _Fit],
    expected: dict,
    keys: Sequence[str],
    steps: np.ndarray,
    kinked: np.ndarray,
    above: np.ndarray,
    scripted: bool,
):
    """Verdict and reason of one direction from its fits (one per error curve)."""
    for k in keys:
        jump = fits[k].jump
        if jump is not None:
            a, b = jump
            what = "error" if k == "error" else f"{k} error"
            return None, (
                f"inconclusive: the {what} falls from h = {steps[a]:.0e} to {steps[b]:.0e} far "
                f"faster than slope {expected[k]:g} and stays low: a jump, as when the steps "
                "cross a kink of a piecewise-linear operation; no slope is fitted across a jump"
            )
    crossed = kinked & above
    kink_text = ""
    if crossed.any():
        h = float(steps[np.nonzero(crossed)[0][-1]])
        kink_text = f"ReLU signs or max-pool winners change along every step down to h = {h:.0e}"
    slopes = {k: fits[k].slope for k in keys}
    conclusive = {k: s for k, s in slopes.items() if s is not None}
    if not conclusive:
        if kink_text:
            return None, (
                f"inconclusive: {kink_text} (kinks crossed), and the errors of the smaller "
                "steps are at the round-off floor"
            )
        return None, (
            "inconclusive: every error at the round-off floor (the model's higher derivatives "
            "vanish along this direction, e.g. a linear or quadratic model)"
        )
    left_out = f"; steps that crossed kinks left out ({kink_text})" if kink_text else ""
    # A wrong derivative leaves a lower-order term that dominates as h shrinks: only the slope
    # over the smallest steps above round-off, clearly below the order, is evidence of one. A
    # slope above the order (the next derivative along d is small, so the remainder falls
    # faster at the larger steps) or a slope pulled down by larger steps that are not yet
    # asymptotic while the smallest steps show the order is no evidence.
    low = {
        k: fits[k]
        for k in conclusive
        if fits[k].tail is not None and fits[k].tail < expected[k] - SLOPE_TOLERANCE
    }
    if low:
        what = "; ".join(
            f"{k} slope {f.tail:.2f} (expected {expected[k]:g}) {_tail_where(f)}"
            for k, f in low.items()
        )
        if scripted:
            return None, (
                f"inconclusive: {what}, and the model is TorchScript, whose operations cannot "
                "be watched for kinks"
            )
        return False, (
            f"failed: {what}: more than {SLOPE_TOLERANCE} below the order, the derivatives "
            f"autograd returns do not match the loss{left_out}"
        )
    missing = [k for k in keys if slopes[k] is None]
    extra = f"; {', '.join(missing)} at the round-off floor" if missing else ""
    high = [k for k, sl in conclusive.items() if sl > expected[k] + SLOPE_TOLERANCE]
    early = [k for k, sl in conclusive.items() if sl < expected[k] - SLOPE_TOLERANCE]
    unclear = [k for k in early if fits[k].tail is None]
    if unclear:
        what = ", ".join(
            f"{k} slope {conclusive[k]:.2f} over h from {_span(fits[k].range)}" for k in unclear
        )
        return None, (
            f"inconclusive: {what} lies below {_expected(expected, unclear)}, but too close to "
            f"the round-off floor (under {NEAR_FLOOR:.0e} x its estimate) to show a lower "
            f"order{left_out}"
        )
    within = [k for k in conclusive if k not in high and k not in early]
    parts = []
    for k in high:
        f = fits[k]
        tail = f", {f.tail:.2f} {_tail_where(f)}" if f.tail is not None else ""
        parts.append(
            f"{k} slope {conclusive[k]:.2f} over h from {_span(f.range)}{tail}, above the order "
            f"{expected[k]:g}: the remainder falls faster where the next derivative along this "
            "direction is small, no sign of a wrong derivative"
        )
    for k in early:
        f = fits[k]
        parts.append(
            f"{k} slope {conclusive[k]:.2f} over h from {_span(f.range)} but {f.tail:.2f} "
            f"{_tail_where(f)} (expected {expected[k]:g}): the larger steps are not yet "
            "asymptotic"
        )
    if within:
        ok = ", ".join(f"{k} slope {conclusive[k]:.2f}" for k in within)
        parts.append(f"{ok} (expected {_expected(expected, within)})")
    head = HIGHER_ORDER if high else "passed"
    return True, f"{head}: {'; '.join(parts)}{extra}{left_out}"


def _span(span: list[float] | None) -> str:
    return f"{span[0]:.0e} to {span[1]:.0e}" if span else "-"


def _tail_where(fit: _Fit) -> str:
    """``over the smallest steps clear of round-off, h from 1e-05 to 1e-04``."""
    return f"over the smallest steps clear of round-off, h from {_span(fit.tail_range)}"


def _fmt(slopes: dict) -> str:
    return ", ".join(f"{k} {s:.2f}" for k, s in slopes.items())


def _expected(expected: dict, keys) -> str:
    return ", ".join(f"{k} {expected[k]:g}" for k in keys)


def gradient_test(
    problem: Problem,
    *,
    directions: int = 2,
    eigenvectors: torch.Tensor | None = None,
    seed: int | torch.Generator = 0,
) -> list[DirectionResult]:
    """Central differences against the autograd directional derivative (Veitch eq. 31).

    Every evaluation records the ReLU signs and max-pool winners of the forward
    (:class:`~curvscope.diagnostics._kinks.KinkRecorder`); steps whose points differ from the
    weights crossed a kink and are left out of the fit.

    Args:
        problem: evaluated in float64 (a float64 copy is made when needed; float32 when the
            model cannot run in float64, see :func:`evaluation_problem`).
        directions: number of random unit directions.
        eigenvectors: optional ``[P, k]`` directions (top Hessian eigenvectors).
        seed: random source of the directions (an int or a generator).
    """
    p, _ = evaluation_problem(problem)
    eps = _roundoff(p)
    gen = as_generator(seed)
    w = p.param_vector()
    loss0, grad = p.loss_and_grad()
    _, reference = _recorded_loss(p, w)
    steps = np.array(STEPS)
    out = []
    for label, d in _directions(p, directions, gen, eigenvectors):
        d = d.to(p.dtype)
        gd = float(grad @ d)
        errs, kinks = [], []
        for h in steps:
            plus, pat_plus = _recorded_loss(p, w + h * d)
            minus, pat_minus = _recorded_loss(p, w - h * d)
            errs.append(abs((plus - minus) / (2 * h) - gd))
            kinks.append(
                pattern_changes(reference, pat_plus) + pattern_changes(reference, pat_minus)
            )
        errs = np.array(errs)
        # round-off of a central difference: about eps |L| / h
        floor = eps * max(abs(float(loss0)), 1e-300) / steps
        kinked = np.array(kinks) > 0
        fit = _fit(steps, errs, floor, GRADIENT_SLOPE, kinked)
        passed, reason = _verdict(
            {"error": fit},
            {"error": GRADIENT_SLOPE},
            ["error"],
            steps,
            kinked,
            _usable(errs, floor),
            p.scripted,
        )
        passed, reason = _at_floor(p, passed, reason)
        out.append(
            DirectionResult(
                label,
                steps.tolist(),
                {"error": errs.tolist()},
                {"error": fit.slope},
                {"error": fit.range},
                {"error": fit.roundoff},
                passed,
                reason,
                kink_changes=_changes(reference, kinks),
                evaluated_in=str(p.dtype).removeprefix("torch."),
            )
        )
    return out


def _taylor_errors(problem: Problem, d: torch.Tensor, steps: np.ndarray, record: bool = False):
    w = problem.param_vector()
    d = d.to(problem.dtype)
    loss0, grad = problem.loss_and_grad()
    reference = _recorded_loss(problem, w)[1] if record else []
    gd = float(grad @ d)
    dhd = float(d @ (HessianOperator(problem) @ d))
    e1, e2, kinks = [], [], []
    for h in steps:
        value, patterns = _recorded_loss(problem, w + h * d)
        diff = value - float(loss0) - h * gd
        e1.append(abs(diff))
        e2.append(abs(diff - 0.5 * h * h * dhd))
        kinks.append(pattern_changes(reference, patterns) if record else 0)
    return float(loss0), np.array(e1), np.array(e2), _changes(reference, kinks)


def taylor_test(
    problem: Problem,
    *,
    directions: int = 2,
    eigenvectors: torch.Tensor | None = None,
    seed: int | torch.Generator = 0,
) -> list[DirectionResult]:
    """Taylor-error test (Suk ch. 13): e1 ~ h^2 and e2 ~ h^3, in float64.

    The same sweep in float32 gives the float32 round-off floor (the smallest e1 and e2
    reached and the h where e2 stops decreasing), reported beside the float64 verdict.
    Steps that crossed a kink (ReLU signs, max-pool winners) are left out of the fit.

    Args:
        problem: evaluated in float64 (a float64 copy is made when needed; float32 when the
            model cannot run in float64, see :func:`evaluation_problem`).
        directions: number of random unit directions.
        eigenvectors: optional ``[P, k]`` directions.
        seed: random source of the directions (an int or a generator).
    """
    p, _ = evaluation_problem(problem)
    in32 = p.dtype == torch.float32
    p32 = p if in32 else problem.to(torch.float32)
    eps = _roundoff(p)
    gen = as_generator(seed)
    steps = np.array(STEPS)
    out = []
    for label, d in _directions(p, directions, gen, eigenvectors):
        loss0, e1, e2, kinks = _taylor_errors(p, d, steps, record=True)
        floor = np.full_like(steps, eps * max(abs(loss0), 1e-300))
        kinked = np.array(kinks or [0] * len(steps)) > 0
        fits = {
            "e1": _fit(steps, e1, floor, TAYLOR_SLOPES[0], kinked),
            "e2": _fit(steps, e2, floor, TAYLOR_SLOPES[1], kinked),
        }
        passed, reason = _verdict(
            fits,
            dict(zip(("e1", "e2"), TAYLOR_SLOPES, strict=True)),
            ["e1", "e2"],
            steps,
            kinked,
            _usable(e1, floor),
            p.scripted,
        )
        passed, reason = _at_floor(p, passed, reason)
        f1, f2 = (e1, e2) if in32 else _taylor_errors(p32, d, steps)[1:3]
        stall = int(np.argmin(f2))
        f32 = {
            "e1_min": float(f1.min()),
            "e2_min": float(f2.min()),
            "e2_stops_decreasing_at_h": float(steps[stall]),
            "loss_eps32": float(np.finfo(np.float32).eps * abs(loss0)),
        }
        out.append(
            DirectionResult(
                label,
                steps.tolist(),
                {"e1": e1.tolist(), "e2": e2.tolist()},
                {k: f.slope for k, f in fits.items()},
                {k: f.range for k, f in fits.items()},
                {k: f.roundoff for k, f in fits.items()},
                passed,
                reason,
                f32,
                kink_changes=kinks,
                evaluated_in=str(p.dtype).removeprefix("torch."),
            )
        )
    return out


def combine(results: list[DirectionResult]) -> tuple[bool | None, str]:
    """Overall verdict over directions.

    Failed if any conclusive direction failed, passed if all conclusive ones passed (the
    reason says how many with a higher-order remainder, and the first one's numbers),
    inconclusive when none was conclusive.
    """
    conclusive = [r for r in results if r.passed is not None]
    if not conclusive:
        return None, results[0].reason if results else "no direction"
    failed = [r for r in conclusive if not r.passed]
    if failed:
        return False, f"{len(failed)} of {len(conclusive)} conclusive directions failed: " + failed[
            0
        ].reason
    head = f"all {len(conclusive)} conclusive directions passed"
    higher = [r for r in conclusive if r.reason.startswith(HIGHER_ORDER)]
    if not higher:
        return True, head
    first = higher[0]
    detail = first.reason.removeprefix(HIGHER_ORDER).removeprefix(": ")
    return True, f"{head}, {len(higher)} with a higher-order remainder; {first.direction}: {detail}"
