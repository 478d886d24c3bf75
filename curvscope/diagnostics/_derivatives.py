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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .._sampling import as_generator
from ..operators import HessianOperator
from ..problem import Problem

__all__ = [
    "GRADIENT_SLOPE",
    "KINK_MODULES",
    "SLOPE_TOLERANCE",
    "TAYLOR_SLOPES",
    "DirectionResult",
    "combine",
    "gradient_test",
    "taylor_test",
]

GRADIENT_SLOPE = 2.0
"""Expected slope of the central-difference error (Veitch eq. 31)."""
TAYLOR_SLOPES = (2.0, 3.0)
"""Expected slopes of e1 and e2 (absolute errors; FINDINGS.md section 4)."""
SLOPE_TOLERANCE = 0.3
"""A fitted slope passes when it lies within this distance of the expected one."""
FLOOR_FACTOR = 10.0
"""Errors below FLOOR_FACTOR x the round-off estimate are excluded from the fit."""
MIN_POINTS = 3
"""Points above the round-off floor needed for a conclusive fit."""
NEAR_FLOOR = 1e4
"""Within this factor of the floor, an error that stops falling marks round-off."""
FIT_POINTS = 6
"""The slope is fitted over at most this many smallest steps above the floor (3 decades)."""
STEPS = tuple(10.0 ** (-k / 2) for k in range(0, 15))
"""h and eps values: 1 down to 1e-7 in half decades."""

KINK_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool2d,
    nn.Hardswish,
    nn.Hardsigmoid,
)
"""Piecewise-smooth modules whose kinks finite differences may cross."""


@dataclass(frozen=True)
class DirectionResult:
    """One direction's sweep: steps, errors, fitted slopes and a verdict."""

    direction: str
    steps: list[float]
    errors: dict[str, list[float]]
    slopes: dict[str, float | None]
    fit_range: dict[str, list[float] | None]
    roundoff_step: dict[str, float | None]
    passed: bool | None
    reason: str
    float32_floor: dict[str, float] = field(default_factory=dict)


def _fit(steps: np.ndarray, errors: np.ndarray, floor: np.ndarray, expected: float):
    """Slope of log(error) against log(step) in the asymptotic window above round-off.

    The window is the first run of consecutive points, from the largest step down, whose
    errors stay above ``FLOOR_FACTOR x floor``; it ends early where round-off takes over:
    an error within ``NEAR_FLOOR x floor`` that stopped falling at half the expected rate.
    The slope is fitted over the window's ``FIT_POINTS`` smallest steps (large steps are
    often not yet asymptotic, e.g. h = 1 along a top eigenvector). Returns
    ``(slope, [h_min, h_max], roundoff_h)``.
    """
    ok = (errors > FLOOR_FACTOR * floor) & np.isfinite(errors) & (errors > 0)
    idx = np.nonzero(ok)[0]
    if idx.size == 0:
        return None, None, float(steps[0])
    run = [int(idx[0])]
    for i in idx[1:]:
        if i != run[-1] + 1:
            break
        prev = run[-1]
        local = np.log10(errors[prev] / errors[i]) / np.log10(steps[prev] / steps[i])
        if errors[i] < NEAR_FLOOR * floor[i] and local < expected / 2:
            break
        run.append(int(i))
    roundoff = float(steps[run[-1] + 1]) if run[-1] + 1 < len(steps) else None
    if len(run) < MIN_POINTS:
        return None, None, roundoff
    run = run[-FIT_POINTS:]
    x, y = np.log10(steps[run]), np.log10(errors[run])
    slope = float(np.polyfit(x, y, 1)[0])
    return slope, [float(steps[run[-1]]), float(steps[run[0]])], roundoff


def _has_kinks(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, KINK_MODULES)]


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


def _verdict(slopes: dict, expected: dict, kinks: list[str], keys: Sequence[str]):
    conclusive = {k: slopes[k] for k in keys if slopes[k] is not None}
    if not conclusive:
        return None, (
            "inconclusive: every error at the round-off floor (the model's higher derivatives "
            "vanish along this direction, e.g. a linear or quadratic model)"
        )
    bad = {k: s for k, s in conclusive.items() if abs(s - expected[k]) > SLOPE_TOLERANCE}
    if not bad:
        missing = [k for k in keys if slopes[k] is None]
        extra = f"; {', '.join(missing)} at the round-off floor" if missing else ""
        slope_text = ", ".join(f"{k} slope {s:.2f}" for k, s in conclusive.items())
        return True, f"passed: {slope_text} (expected {_expected(expected, keys)}){extra}"
    if kinks:
        return None, (
            f"inconclusive: slopes {_fmt(bad)} differ from {_expected(expected, keys)}, and the "
            f"model has piecewise-linear layers ({', '.join(sorted(set(kinks)))}) whose kinks "
            "the differences may cross"
        )
    return False, (
        f"failed: slopes {_fmt(bad)} differ from {_expected(expected, keys)} by more than "
        f"{SLOPE_TOLERANCE}: the derivatives autograd returns do not match the loss"
    )


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

    Args:
        problem: evaluated in float64 (a float64 copy is made when needed).
        directions: number of random unit directions.
        eigenvectors: optional ``[P, k]`` directions (top Hessian eigenvectors).
        seed: random source of the directions (an int or a generator).
    """
    p64 = problem.to(torch.float64)
    gen = as_generator(seed)
    w = p64.param_vector()
    loss0, grad = p64.loss_and_grad()
    kinks = _has_kinks(problem.model)
    steps = np.array(STEPS)
    out = []
    for label, d in _directions(p64, directions, gen, eigenvectors):
        gd = float(grad @ d)
        errs = []
        for eps in steps:
            fd = (float(p64.loss(w + eps * d)) - float(p64.loss(w - eps * d))) / (2 * eps)
            errs.append(abs(fd - gd))
        errs = np.array(errs)
        # round-off of a central difference: about eps64 |L| / eps
        floor = np.finfo(np.float64).eps * max(abs(float(loss0)), 1e-300) / steps
        slope, rng, roundoff = _fit(steps, errs, floor, GRADIENT_SLOPE)
        passed, reason = _verdict({"error": slope}, {"error": GRADIENT_SLOPE}, kinks, ["error"])
        out.append(
            DirectionResult(
                label,
                steps.tolist(),
                {"error": errs.tolist()},
                {"error": slope},
                {"error": rng},
                {"error": roundoff},
                passed,
                reason,
            )
        )
    return out


def _taylor_errors(problem: Problem, d: torch.Tensor, steps: np.ndarray):
    w = problem.param_vector()
    d = d.to(problem.dtype)
    loss0, grad = problem.loss_and_grad()
    gd = float(grad @ d)
    dhd = float(d @ (HessianOperator(problem) @ d))
    e1, e2 = [], []
    for h in steps:
        diff = float(problem.loss(w + h * d)) - float(loss0) - h * gd
        e1.append(abs(diff))
        e2.append(abs(diff - 0.5 * h * h * dhd))
    return float(loss0), np.array(e1), np.array(e2)


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

    Args:
        problem: evaluated in float64 (a float64 copy is made when needed).
        directions: number of random unit directions.
        eigenvectors: optional ``[P, k]`` directions.
        seed: random source of the directions (an int or a generator).
    """
    p64 = problem.to(torch.float64)
    p32 = problem.to(torch.float32)
    gen = as_generator(seed)
    kinks = _has_kinks(problem.model)
    steps = np.array(STEPS)
    out = []
    for label, d in _directions(p64, directions, gen, eigenvectors):
        loss0, e1, e2 = _taylor_errors(p64, d, steps)
        floor = np.full_like(steps, np.finfo(np.float64).eps * max(abs(loss0), 1e-300))
        s1, r1, h1 = _fit(steps, e1, floor, TAYLOR_SLOPES[0])
        s2, r2, h2 = _fit(steps, e2, floor, TAYLOR_SLOPES[1])
        slopes = {"e1": s1, "e2": s2}
        passed, reason = _verdict(
            slopes, dict(zip(("e1", "e2"), TAYLOR_SLOPES, strict=True)), kinks, ["e1", "e2"]
        )
        _, f1, f2 = _taylor_errors(p32, d, steps)
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
                slopes,
                {"e1": r1, "e2": r2},
                {"e1": h1, "e2": h2},
                passed,
                reason,
                f32,
            )
        )
    return out


def combine(results: list[DirectionResult]) -> tuple[bool | None, str]:
    """Overall verdict over directions.

    Failed if any conclusive direction failed, passed if all conclusive ones passed,
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
    return True, f"all {len(conclusive)} conclusive directions passed"
