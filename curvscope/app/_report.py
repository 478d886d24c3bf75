"""The analyses behind ``curvscope report``: run each part, write its document, render the page.

Each part (spectrum, density, check, compare, surface, solve) is a function of the problem
that calls the same library function the individual command calls and returns its result
document. Which matrices a part uses comes from the registry
(:func:`curvscope.operators.report_matrices`); a matrix the model does not support is left
out with the reason its error carries (``error.matrix``), and a part the model does not
support is recorded as skipped. Rendering is :mod:`curvscope.report`'s job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._errors import CurvscopeError, OptionError, UnsupportedModelError, arg
from .._meter import Product, ProductMeter
from ..io import active_run, run_of, write_atomic, write_document
from ..linalg import EigenResult
from ..operators import build_operators, report_matrices
from ..problem import Problem
from ..report import PARTS, SKIPPED_FILE, Rendered, render_documents
from ._documents import document

__all__ = [
    "PARTS",
    "PRESETS",
    "QUICK_BUDGET_S",
    "REPORT_PARTS",
    "SKIPPED_FILE",
    "ReportRun",
    "lanczos_products",
    "report_memory_phases",
    "report_plan",
    "run_report",
]

Progress = Callable[[int, int, str], None]

PRESETS = ("quick", "full")
REPORT_PARTS = (*PARTS, "classes")
"""The parts ``run_report`` attempts: the page's parts and, in the full preset for a softmax
classifier, the class decomposition (rendered as an optional document, see
:data:`curvscope.report.OPTIONAL_PARTS`)."""
SOLVE_FULL = ("gd", "lbfgs", "nlcg", "newton-cg", "hf", "eacg", "mk")
SOLVE_MAX_ITER = 30


QUICK_BUDGET_S = 300.0
"""Seconds the quick preset plans for by default: about 5 minutes on 2 CPU cores."""

DENSITY_MIN = (5, 10)  # probes, Lanczos steps: below this a density says little
SURFACE_MIN_STEPS = 7


def lanczos_products(k: int, n: int) -> int:
    """About how many products thick-restart Lanczos takes for ``k`` pairs of an n x n matrix.

    Measured on the examples: top-5 + bottom-2 of a 1.8k-parameter MLP took about 60.
    """
    return min(n + k, 4 * k + 32)


def _block_sizes(problem: Problem) -> list[int]:
    slices = problem.param_slices()
    return [
        sum(slices[p].stop - slices[p].start for p in problem.block_param_names(b))
        for b in problem.module_blocks()
    ]


def _derivative_steps() -> int:
    from ..diagnostics import DERIVATIVE_STEPS

    return len(DERIVATIVE_STEPS)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------ plans
@dataclass
class _Plan:
    """Everything a part will take, in the units its cost is measured in.

    ``products[(matrix, dtype, dim)] = [columns, operators]``: products of that matrix (of
    that size and dtype) and how many operators the part builds for them (each operator's
    first product is priced apart: a Hessian's builds the first-order graphs later products
    reuse). ``passes[dtype]``: passes over the data outside products (loss and gradient
    evaluations). ``points``: surface grid points (a forward pass per batch each, vmapped).
    """

    products: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    points: int = 0

    def add(self, matrix: str, dtype: str, dim: int, products: int, operators: int = 1) -> None:
        if products <= 0 or dim <= 0:
            return
        entry = self.products.setdefault((matrix, dtype, int(dim)), [0, 0])
        entry[0] += int(products)
        entry[1] += int(operators)

    def add_passes(self, dtype: str, passes: int) -> None:
        if passes > 0:
            self.passes[dtype] = self.passes.get(dtype, 0) + int(passes)

    def total(self) -> int:
        """Products, passes and points together (the plan line's count)."""
        return sum(c for c, _ in self.products.values()) + sum(self.passes.values()) + self.points

    def describe(self, dtype: str) -> dict[str, Any]:
        """The plan as a document records it: products and first products per matrix."""
        products: dict[str, int] = {}
        firsts: dict[str, int] = {}
        for (matrix, dt, _), (cols, ops) in self.products.items():
            key = matrix if dt == dtype else f"{matrix} ({dt})"
            products[key] = products.get(key, 0) + cols
            firsts[key] = firsts.get(key, 0) + ops
        return {
            "products": products,
            "first_products": firsts,
            "passes": sum(self.passes.values()),
            "points": self.points,
        }


def _spectrum_plan(problem: Problem, names: list[str], blocks: list[str]) -> _Plan:
    plan, dt = _Plan(), _dtype_name(problem.dtype)
    sizes = _named_sizes(problem)
    for name in names:
        for block in blocks:
            dim = sizes.get(block, problem.num_params)
            plan.add(name, dt, dim, lanczos_products(7, dim))
    return plan


def _density_plan(problem: Problem, names: list[str], knobs: dict, exact: int) -> _Plan:
    plan, dt, n = _Plan(), _dtype_name(problem.dtype), problem.num_params
    for name in names:
        slq = knobs["probes"] * min(knobs["lanczos_steps"], n)
        traces = 2 * knobs["trace_probes"]  # Hutchinson and Hutch++, each trace_probes
        plan.add(name, dt, n, slq + traces + (n if exact and n <= exact else 0))
    return plan


def _check_plan(problem: Problem) -> _Plan:
    plan, n = _Plan(), problem.num_params
    # the derivative checks run in float64 (evaluation_problem): the top eigenvector, two
    # products a Taylor direction (3 directions), the loss and gradient at every step
    dt64 = "float64" if problem.dtype.is_floating_point else _dtype_name(problem.dtype)
    plan.add("hessian", dt64, n, lanczos_products(1, n) + 6, operators=4)
    plan.add_passes(dt64, 3 * (4 * _derivative_steps() + 6))
    # the convexity certificate: the smallest eigenvalue of every layer block
    dt = _dtype_name(problem.dtype)
    for m in _block_sizes(problem) or [n]:
        plan.add("hessian", dt, m, 2 * lanczos_products(1, m))
    return plan


def _compare_plan(problem: Problem, candidates: list[str], blocks: list[str]) -> _Plan:
    plan, dt = _Plan(), _dtype_name(problem.dtype)
    sizes = _named_sizes(problem)
    slices = problem.param_slices()
    for block in blocks:
        m = sizes.get(block, problem.num_params)
        names = problem.block_param_names(block) if block != "all" else list(problem.names)
        bias = next((p for p in names if p.endswith("bias")), None)
        b = 0 if bias is None else slices[bias].stop - slices[bias].start
        reference = (m if m <= 2048 else 64) + lanczos_products(5, m)
        plan.add("hessian", dt, m, reference)
        plan.add("hessian", dt, b, b)
        for name in candidates:  # top-5 and the smallest eigenvalue of each candidate
            plan.add(name, dt, m, (m if m <= 2048 else 64) + lanczos_products(6, m))
            plan.add(name, dt, b, b)
    return plan


def _surface_plan(problem: Problem, steps: int, eigen: bool) -> _Plan:
    plan, dt, n = _Plan(), _dtype_name(problem.dtype), problem.num_params
    plan.points = steps**2
    if not eigen:
        plan.add("hessian", dt, n, lanczos_products(2, n))
    plan.add("hessian", dt, n, 2)  # the quadratic model along the two directions
    return plan


def _solve_plan(problem: Problem, names: list[str]) -> _Plan:
    from ..solvers import PRODUCTS_PER_ITERATION

    plan, dt, n = _Plan(), _dtype_name(problem.dtype), problem.num_params
    for name in names:
        plan.add("hessian", dt, n, SOLVE_MAX_ITER * PRODUCTS_PER_ITERATION.get(name, 3))
        plan.add_passes(dt, 2 * SOLVE_MAX_ITER)
    return plan


def _classes_plan(problem: Problem, classes: int, top: int) -> _Plan:
    """The class means (C² vjp columns a batch, priced as GGN products) and GGN top+1."""
    plan, dt, n = _Plan(), _dtype_name(problem.dtype), problem.num_params
    plan.add("ggn", dt, n, classes * classes + lanczos_products(top + 1, n))
    return plan


def _num_classes(problem: Problem) -> int | None:
    """``C`` of a softmax classifier, else ``None`` (one forward pass of one sample)."""
    from ..diagnostics import check_classifier

    try:
        return check_classifier(problem)
    except CurvscopeError:
        return None


def _named_sizes(problem: Problem) -> dict[str, int]:
    layers = dict(zip(problem.module_blocks(), _block_sizes(problem), strict=True))
    return {"all": problem.num_params, **layers}


def _plans(problem: Problem, preset: str) -> dict[str, _Plan]:
    """Each part's plan at the preset's settings (the registry's matrices, not yet built)."""
    from ..solvers import SOLVERS

    full = preset == "full"
    layers = list(problem.module_blocks())
    spectrum_names = report_matrices(preset) if full else ["hessian"]
    density_names = ["hessian"] + (
        [n for n in report_matrices("full") if n in ("ggn", "pch-abs")] if full else []
    )
    compare_names = [n for n in report_matrices(preset) if n != "hessian"]
    if full:
        from ..operators import compare_defaults

        compare_names = list(compare_defaults())
    knobs = {
        "probes": 20,
        "lanczos_steps": 80 if full else 30,
        "trace_probes": 100 if full else 30,
    }
    blocks = ["all", *layers] if full and len(layers) > 1 else ["all"]
    return {
        "spectrum": _spectrum_plan(problem, spectrum_names, blocks),
        "density": _density_plan(problem, density_names, knobs, 2000 if full else 0),
        "check": _check_plan(problem),
        "compare": _compare_plan(problem, compare_names, layers or ["all"]),
        "surface": _surface_plan(problem, 41 if full else 21, eigen=True),
        "solve": _solve_plan(problem, [n for n in SOLVE_FULL if n in SOLVERS]) if full else _Plan(),
        "classes": _classes_plan(problem, C, min(C * C, problem.num_params - 1))
        if full and (C := _num_classes(problem))
        else _Plan(),
    }


def report_memory_phases(problem: Problem, preset: str) -> dict[str, dict[str, Any]]:
    """The memory of the report's parts after the spectrum, for the command's plan.

    Keywords of :func:`~curvscope.app._memory.fit_memory` per part that holds something the
    spectrum does not: density's SLQ bases (all probes at once, or the block the plan fits)
    and trace probes, and ``check``'s float64 copy of the model with its Lanczos basis.
    The parts run one after another, so the run's peak is the largest of them.
    """
    from ..linalg import default_basis_size

    full = preset == "full"
    names = ["hessian"] + (
        [n for n in report_matrices("full") if n in ("ggn", "pch-abs")] if full else []
    )
    n = problem.num_params
    return {
        "density": {
            "matrices": names,
            "vectors": 2,
            "slq_steps": min(80 if full else 30, n),
            "slq_probes": 20,
            "trace_probes": 100 if full else 30,
        },
        "check": {
            "matrices": ["hessian"],
            "vectors": 4,
            "basis": default_basis_size(1, n, itemsize=8),
            "float64": True,
        },
    }


def report_plan(problem: Problem, preset: str) -> dict[str, int]:
    """About how many products each part of the report takes at the preset's settings.

    Every product counts: density's SLQ, Hutchinson, Hutch++ and exact-trace products,
    check's Lanczos and Taylor products and its loss and gradient evaluations, compare's
    reference, candidate and bias products. A pass over the data outside a product counts
    one, and so does a surface point (one forward pass per batch, vmapped). The budget prices
    the same plans with each matrix's measured cost.
    """
    return {part: plan.total() for part, plan in _plans(problem, preset).items()}


# ------------------------------------------------------------------------------ costs
@dataclass
class _Costs:
    """What products, passes and surface points have cost so far, measured as they ran.

    Products come from the problem's :class:`~curvscope._meter.ProductMeter`, per matrix,
    dtype and size; an operator's first product is kept apart (its extra over a later
    product is priced once per operator a plan builds). Passes over the data outside products
    and surface points are measured per part from its wall time.
    """

    # (matrix, dtype, dim) -> [seconds, columns] of products after an operator's first
    steady_time: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)
    # (matrix, dtype, dim) -> [(seconds, columns)] of operators' first products
    first_time: dict[tuple[str, str, int], list[tuple[float, int]]] = field(default_factory=dict)
    pass_time: dict[str, list[float]] = field(default_factory=dict)  # dtype -> [s, passes]
    point_time: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [s, points]

    def add(self, products: list[Product]) -> None:
        for p in products:
            key = (p.matrix, p.dtype, p.dim)
            if p.first:
                self.first_time.setdefault(key, []).append((p.seconds, p.columns))
            else:
                acc = self.steady_time.setdefault(key, [0.0, 0.0])
                acc[0] += p.seconds
                acc[1] += p.columns

    def _steady(self, matrix: str, dtype: str, dim: int) -> tuple[float, str] | None:
        """Seconds a column of the nearest measured matrix: same name and dtype first."""
        for want_matrix, want_dtype in (
            (matrix, dtype),
            (matrix, None),
            ("hessian", dtype),
            ("hessian", None),
        ):
            table: dict[int, list[float]] = {}
            for only_first in (False, True):  # first products only: they bound later ones
                source = self.steady_time
                if only_first:
                    source = {
                        k: [sum(s for s, _ in v), sum(c for _, c in v)]
                        for k, v in self.first_time.items()
                    }
                for (m, dt, d), (s, cols) in source.items():
                    if m == want_matrix and (want_dtype is None or dt == want_dtype) and cols:
                        acc = table.setdefault(d, [0.0, 0.0])
                        acc[0] += s
                        acc[1] += cols
                if table:
                    break
            if not table:
                continue
            # the same size, else the nearest larger one, else the largest measured
            larger = [d for d in table if d >= dim]
            d = min(larger) if larger else max(table)
            s, cols = table[d]
            label = want_matrix if want_matrix == matrix else f"{want_matrix}'s cost"
            return s / cols, f"{label} ({want_dtype or 'another dtype'}, {d} rows)"
        return None

    def steady(self, matrix: str, dtype: str, dim: int) -> float:
        found = self._steady(matrix, dtype, dim)
        return 0.0 if found is None else found[0]

    def first_extra(self, matrix: str, dtype: str, dim: int) -> float:
        """Seconds an operator's first product takes beyond a later one (measured, >= 0)."""
        for want in (matrix, "hessian"):
            for same_dtype in (True, False):
                extras = [
                    max(0.0, s - cols * self.steady(*key))
                    for key, firsts in self.first_time.items()
                    if key[0] == want and (key[1] == dtype or not same_dtype)
                    for s, cols in firsts
                ]
                if extras:
                    return sum(extras) / len(extras)
        return 0.0

    def pass_rate(self, dtype: str) -> float:
        """Seconds a pass over the data outside products (at most a Hessian product's)."""
        s, n = self.pass_time.get(dtype, [0.0, 0.0])
        if n:
            return s / n
        if self.pass_time:
            return max(s / n for s, n in self.pass_time.values() if n)
        return self.steady("hessian", dtype, 1 << 62)

    def point_rate(self, dtype: str) -> float:
        """Seconds a surface point: measured, else a pass or a Hessian product, the less.

        A vmapped point is one forward pass per batch: less than a gradient evaluation and
        less than a Hessian product, so either measured cost bounds it.
        """
        s, n = self.point_time
        if n:
            return s / n
        bounds = [self.steady("hessian", dtype, 1 << 62)]
        if self.pass_time:
            bounds.append(self.pass_rate(dtype))
        return min(b for b in bounds if b > 0) if any(b > 0 for b in bounds) else 0.0

    def price(self, plan: _Plan, dtype: str) -> float:
        """Seconds ``plan`` takes at the costs measured so far."""
        total = 0.0
        for (matrix, dt, dim), (cols, ops) in plan.products.items():
            total += cols * self.steady(matrix, dt, dim) + ops * self.first_extra(matrix, dt, dim)
        total += sum(n * self.pass_rate(dt) for dt, n in plan.passes.items())
        return total + plan.points * self.point_rate(dtype)

    def rates(self, plan: _Plan, dtype: str) -> dict[str, Any]:
        """The measured costs that priced ``plan``, for the record and the reasons."""
        out: dict[str, Any] = {}
        for matrix, dt, dim in plan.products:
            found = self._steady(matrix, dt, dim)
            key = matrix if dt == dtype else f"{matrix} ({dt})"
            entry = out.setdefault(key, {})
            if found is None:
                continue
            rate = found[0]
            if rate >= entry.get("s_per_product", -1.0):
                entry.update(
                    s_per_product=rate,
                    first_extra_s=self.first_extra(matrix, dt, dim),
                    measured_on=found[1],
                )
        if plan.passes:
            out["pass"] = {"s_per_pass": max(self.pass_rate(dt) for dt in plan.passes)}
        if plan.points:
            out["point"] = {"s_per_point": self.point_rate(dtype)}
        return out

    def learn(
        self, products: list[Product], wall: float, passes: int, plan: _Plan, dtype: str
    ) -> dict:
        """Take in what a part did; returns its measured seconds, products and passes."""
        self.add(products)
        inside = sum(p.passes for p in products)
        outside_s = max(0.0, wall - sum(p.seconds for p in products))
        outside = max(0, passes - inside)
        if plan.points:  # the surface: its passes evaluate the grid
            self.point_time[0] += outside_s
            self.point_time[1] += plan.points
        elif outside and plan.passes:
            dt = max(plan.passes, key=plan.passes.get)
            acc = self.pass_time.setdefault(dt, [0.0, 0.0])
            acc[0] += outside_s
            acc[1] += outside
        counted: dict[str, int] = {}
        firsts: dict[str, int] = {}
        for p in products:  # keyed as the plan is (describe)
            key = p.matrix if p.dtype == dtype else f"{p.matrix} ({p.dtype})"
            counted[key] = counted.get(key, 0) + p.columns
            firsts[key] = firsts.get(key, 0) + int(p.first)
        return {
            "seconds": wall,
            "products": counted,
            "first_products": firsts,
            "product_seconds": sum(p.seconds for p in products),
            "passes": outside,
        }


@dataclass
class _Budget:
    """Seconds the report may take, what they bought so far and what each part was priced at."""

    total_s: float
    started: float
    costs: _Costs = field(default_factory=_Costs)
    meter: ProductMeter = field(default_factory=ProductMeter)
    reductions: list[str] = field(default_factory=list)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration_s: float = 0.0

    def spent(self) -> float:
        """Seconds since the report started (the wall clock: what the budget is about)."""
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.total_s - self.spent()

    def record(self) -> dict[str, Any]:
        """The budget section of ``report-skipped.json``."""
        return {
            "budget_s": self.total_s,
            "calibration_s": self.calibration_s,
            "spent_s": self.spent(),
            "parts": self.parts,
        }


def _calibrate(problem: Problem, budget: _Budget) -> None:
    """Two products of a fresh Hessian, timed: its first (graphs built) and a later one.

    They price the first part; every part then adds what its own products cost.
    """
    from ..operators import HessianOperator

    t0 = time.perf_counter()
    v = torch.randn(
        problem.num_params, 1, generator=torch.Generator().manual_seed(0), dtype=problem.dtype
    ).to(problem.device)
    H = HessianOperator(problem)
    start = len(budget.meter.products)
    with problem.metered(budget.meter):
        H @ v
        H @ v
    release = getattr(H, "release", None)
    if release is not None:
        release()
    budget.costs.add(budget.meter.since(start))
    budget.calibration_s = time.perf_counter() - t0


def _refuse_empty_budget(ctx: _Context) -> None:
    """Every part was left out by the budget: say so in one sentence, with what would run.

    (A tiny-gpt report on 11.1k windows spent 120 s of its 120 s calibrating at 26 s a
    product, left every part out and then failed with "there are no result documents".)

    Raises:
        OptionError: naming ``--budget-s``, the measured product cost and ``--samples``.
    """
    b = ctx.budget
    timed = [p for p in b.meter.products if not p.first] or list(b.meter.products)
    cost = f", at {timed[-1].seconds:.2g} s a Hessian product measured here" if timed else ""
    raise OptionError(
        f"no part of the report fits {arg('budget_s')} {b.total_s:.0f}{cost} "
        f"(calibrating took {b.calibration_s:.0f} s): raise {arg('budget_s')} or analyse fewer "
        f"samples with {arg('samples')}.",
        option="budget_s",
    )


ReportRun = Rendered
"""What :func:`run_report` wrote: the page, the documents, figures, skips and timings."""


class _OverBudget(CurvscopeError):
    """A part that does not fit the time left (recorded as skipped with the reason)."""

    def __init__(self, message: str, budget: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.budget = budget or {}


def _needs(plan: _Plan, dtype: str) -> str:
    """``it needs about 70 products of the hessian and 12 passes over the data``."""
    d = plan.describe(dtype)
    items = [f"{n} products of the {m}" for m, n in d["products"].items()]
    if d["passes"]:
        items.append(f"{d['passes']} passes over the data")
    if d["points"]:
        items.append(f"{d['points']} surface points")
    return "it needs about " + (", ".join(items) or "nothing")


def _rates_text(rates: dict[str, Any]) -> str:
    """``0.0051 s a hessian product (+0.09 s an operator's first), 0.008 s a pass``."""
    items = []
    for key, r in rates.items():
        if "s_per_product" in r:
            extra = r.get("first_extra_s") or 0.0
            items.append(
                f"{r['s_per_product']:.2g} s a {key} product"
                + (f" (+{extra:.2g} s an operator's first)" if extra >= 0.0005 else "")
            )
        elif "s_per_pass" in r:
            items.append(f"{r['s_per_pass']:.2g} s a pass")
        elif "s_per_point" in r:
            items.append(f"{r['s_per_point']:.2g} s a surface point")
    return ", ".join(items) or "cost"


@dataclass
class _Context:
    """What every part needs: the problem, the preset's choices and what was skipped."""

    problem: Problem
    preset: str
    seed: int
    tol: float
    max_iter: int | None
    base_settings: dict[str, Any]
    progress: Progress | None
    skipped: list[dict[str, str]] = field(default_factory=list)
    eigen: EigenResult | None = None
    budget: _Budget | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    plan: _Plan | None = None  # the plan the running part was priced with
    probe_block: int | None = None  # SLQ probes at once, as the memory plan fitted them
    memory: dict[str, Any] | None = None  # the command's memory plan, for every document
    left_out: dict[str, str] = field(default_factory=dict)  # parts the plan left out, why

    def fit(self, part: str, plan: Callable[[dict], _Plan], shrink: Callable[[dict], bool]):
        """Shrink the part's settings (``knobs``) until its priced plan fits the time left.

        ``plan(knobs)`` is everything the part will take (:class:`_Plan`), priced with the
        costs measured so far (:class:`_Costs`); ``shrink(knobs)`` makes the part smaller and
        returns ``False`` when it cannot. The time left is the budget less the wall time
        since the report started. Raises :class:`_OverBudget` when even the smallest does not
        fit (the reason names the measured cost); records every reduction and the plan.
        """
        if self.budget is None:
            return
        b, dtype = self.budget, _dtype_name(self.problem.dtype)
        before = dict(self.knobs)
        left = b.left()
        if self.problem.group.active:  # every rank takes the same decision: the least time
            left = -self.problem.reduce(-left, op="max")

        def price() -> float:
            seconds = b.costs.price(plan(self.knobs), dtype)
            if self.problem.group.active:  # and the dearest price
                seconds = self.problem.reduce(seconds, op="max")
            return seconds

        seconds = price()
        while seconds > left:
            if not shrink(self.knobs):
                smallest = plan(self.knobs)
                entry = {
                    "decision": "left out",
                    "left_before_s": left,
                    "planned": {"seconds": seconds, **smallest.describe(dtype)},
                    "rates": b.costs.rates(smallest, dtype),
                }
                b.parts[part] = entry
                self.knobs.update(before)
                raise _OverBudget(
                    f"left out to stay within the budget of {b.total_s:.0f} s: "
                    f"{_needs(smallest, dtype)} ({seconds:.1f} s at the measured "
                    f"{_rates_text(entry['rates'])}) and {max(0.0, left):.1f} s were left.",
                    budget=entry,
                )
            seconds = price()
        changed = {k: (before[k], v) for k, v in self.knobs.items() if before.get(k) != v}
        final = plan(self.knobs)
        b.parts[part] = {
            "decision": "reduced" if changed else "planned",
            "left_before_s": left,
            "planned": {"seconds": seconds, **final.describe(dtype)},
            "rates": b.costs.rates(final, dtype),
        }
        self.plan = final
        if changed:
            b.reductions.append(
                f"{part}: "
                + ", ".join(f"{k} {a} -> {bb}" for k, (a, bb) in changed.items())
                + f" to stay within the budget of {b.total_s:.0f} s ({seconds:.1f} s at the "
                f"measured {_rates_text(b.parts[part]['rates'])}, {max(0.0, left):.1f} s left)"
            )

    @property
    def full(self) -> bool:
        return self.preset == "full"

    def operators(self, names: list[str], part: str) -> dict:
        """The part's operators; unsupported ones are recorded as skipped (from the error)."""
        ops, skipped = build_operators(self.problem, names, seed=self.seed, skip_unsupported=True)
        for s in skipped:
            self.skipped.append({"part": f"{part}: {s['matrix']}", "reason": s["reason"]})
        if not ops:
            raise UnsupportedModelError(
                f"no matrix of the {part} part supports this model ("
                + "; ".join(f"{s['matrix']}: {s['reason']}" for s in skipped)
                + ")."
            )
        return ops

    def document(
        self,
        part: str,
        settings: dict,
        results: dict,
        t0: float,
        passes: int,
        matvecs: int,
        notes: list[str],
    ) -> dict:
        budget = {} if self.budget is None else {"budget_s": self.budget.total_s}
        if self.budget is not None:
            notes = [*notes, *(r for r in self.budget.reductions if r.startswith(part + ":"))]
        doc = document(
            self.problem,
            part,
            settings={**self.base_settings, "preset": self.preset, **budget, **settings},
            results=results,
            started=t0,
            passes_before=passes,
            matvecs=matvecs,
            notes=notes,
        )
        if self.budget is not None and part in self.budget.parts:
            # filled with the measured side when the part returns (see _run_parts)
            doc["budget"] = {"budget_s": self.budget.total_s, **self.budget.parts[part]}
        if self.memory is not None:  # the plan of all parts, and the peak so far
            from .._device import peak_in_use

            doc["memory"] = {**self.memory, "peak_bytes": int(peak_in_use(self.problem.device))}
        return doc


# ---------------------------------------------------------------------------------- parts
def _spectrum(ctx: _Context) -> dict:
    from ..diagnostics import spectrum

    p = ctx.problem
    names = report_matrices(ctx.preset)
    if not ctx.full:
        names = ["hessian"]
    ops = ctx.operators(names, "spectrum")
    per_layer = ctx.full and len(p.module_blocks()) > 1
    blocks = ["all", *p.module_blocks()] if per_layer else ["all"]
    ctx.fit("spectrum", lambda k: _spectrum_plan(p, list(ops), blocks), _fixed)
    t0, passes = time.perf_counter(), p.data_passes
    res = spectrum(
        ops,
        blocks=blocks,
        top=5,
        bottom=2,
        tol=ctx.tol,
        max_iter=ctx.max_iter,
        seed=ctx.seed,
        progress=ctx.progress,
    )
    ctx.eigen = _top_hessian(res)
    settings = {
        "matrix": list(ops),
        "blocks": blocks,
        "top": 5,
        "bottom": 2,
        "method": "lanczos",
        "tol": ctx.tol,
        "max_iter": ctx.max_iter,
    }
    return ctx.document(
        "spectrum", settings, res.to_results(), t0, passes, res.num_matvecs, res.notes
    )


def _density(ctx: _Context) -> dict:
    from ..diagnostics import density

    p = ctx.problem
    names = ["hessian"] + (
        [n for n in report_matrices("full") if n in ("ggn", "pch-abs")] if ctx.full else []
    )
    ops = ctx.operators(names, "density")
    ctx.knobs.update(
        probes=20, lanczos_steps=80 if ctx.full else 30, trace_probes=100 if ctx.full else 30
    )
    exact = 2000 if ctx.full else 0

    def shrink(k: dict) -> bool:
        if (k["probes"], k["lanczos_steps"]) <= DENSITY_MIN:
            return False
        k["probes"] = max(DENSITY_MIN[0], int(k["probes"] * 0.8))
        k["lanczos_steps"] = max(DENSITY_MIN[1], int(k["lanczos_steps"] * 0.8))
        k["trace_probes"] = max(10, int(k["trace_probes"] * 0.8))
        return True

    ctx.fit("density", lambda k: _density_plan(p, list(ops), k, exact), shrink)
    settings = {
        "matrix": list(ops),
        "blocks": ["all"],
        "probes": ctx.knobs["probes"],
        "lanczos_steps": ctx.knobs["lanczos_steps"],
        "trace_probes": ctx.knobs["trace_probes"],
        "exact_trace_max": exact,
    }
    t0, passes = time.perf_counter(), p.data_passes
    res = density(
        ops,
        blocks=["all"],
        num_probes=settings["probes"],
        num_steps=settings["lanczos_steps"],
        trace_probes=settings["trace_probes"],
        exact_trace_max=settings["exact_trace_max"],
        seed=ctx.seed,
        progress=ctx.progress,
        probe_block=ctx.probe_block,
    )
    return ctx.document(
        "density", settings, res.to_results(), t0, passes, res.num_matvecs, res.notes
    )


def _check(ctx: _Context) -> dict:
    from ..diagnostics import check

    p = ctx.problem
    ctx.fit("check", lambda k: _check_plan(p), _fixed)
    t0, passes = time.perf_counter(), p.data_passes
    res = check(p, seed=ctx.seed, progress=ctx.progress)
    return ctx.document(
        "check", {}, res.to_results(), t0, passes, res.num_matvecs, list(getattr(res, "notes", []))
    )


def _compare(ctx: _Context) -> dict:
    from ..diagnostics import compare

    p = ctx.problem
    names = [n for n in report_matrices(ctx.preset) if n != "hessian"]
    if ctx.full:
        from ..operators import compare_defaults

        names = compare_defaults()
    candidates, skipped = build_operators(p, names, seed=ctx.seed, skip_unsupported=True)
    for s in skipped:
        ctx.skipped.append({"part": f"compare: {s['matrix']}", "reason": s["reason"]})
    if not candidates:
        raise UnsupportedModelError(
            "no approximation applies to this model ("
            + "; ".join(f"{s['matrix']}: {s['reason']}" for s in skipped)
            + ")."
        )
    (H,) = build_operators(p, ["hessian"], seed=ctx.seed)[0].values()
    sizes = dict(zip(p.module_blocks(), _block_sizes(p), strict=True))
    ctx.knobs["blocks"] = list(sizes) or ["all"]
    if not sizes:
        sizes = {"all": p.num_params}

    def plan(k: dict) -> _Plan:
        return _compare_plan(p, list(candidates), k["blocks"])

    dtype = _dtype_name(p.dtype)

    def block_price(block: str) -> float:
        return ctx.budget.costs.price(plan({"blocks": [block]}), dtype)

    def shrink(k: dict) -> bool:  # the costliest block goes first
        if len(k["blocks"]) <= 1:
            return False
        costliest = max(k["blocks"], key=block_price)
        k["blocks"] = [b for b in k["blocks"] if b != costliest]
        return True

    ctx.fit("compare", plan, shrink)
    for b in [b for b in sizes if b not in ctx.knobs["blocks"]]:
        one = plan({"blocks": [b]})
        rates = ctx.budget.costs.rates(one, dtype)
        ctx.skipped.append(
            {
                "part": f"compare [{b}]",
                "reason": f"left out to stay within the budget of {ctx.budget.total_s:.0f} s: "
                f"{_needs(one, dtype)} ({block_price(b):.1f} s at the measured "
                f"{_rates_text(rates)}).",
                "planned_s": block_price(b),
            }
        )
    t0, passes = time.perf_counter(), p.data_passes
    res = compare(
        H,
        candidates,
        blocks=ctx.knobs["blocks"],
        tol=ctx.tol,
        seed=ctx.seed,
        skipped=skipped,
        progress=ctx.progress,
    )
    for entry in res.skipped:
        if "block" in entry:
            ctx.skipped.append(
                {
                    "part": f"compare: {entry['matrix']} [{entry['block']}]",
                    "reason": entry["reason"],
                }
            )
    return ctx.document(
        "compare", {"matrix": list(candidates)}, res.to_results(), t0, passes, res.num_matvecs, []
    )


def _surface(ctx: _Context) -> dict:
    from ..diagnostics import surface

    p = ctx.problem
    ctx.knobs["steps"] = 41 if ctx.full else 21

    def shrink(k: dict) -> bool:
        if k["steps"] <= SURFACE_MIN_STEPS:
            return False
        k["steps"] = max(SURFACE_MIN_STEPS, k["steps"] - 4)
        return True

    ctx.fit("surface", lambda k: _surface_plan(p, k["steps"], ctx.eigen is not None), shrink)
    steps = ctx.knobs["steps"]
    t0, passes = time.perf_counter(), p.data_passes
    res = surface(
        p,
        dims=2,
        directions="eigen",
        range_=(-1.0, 1.0),
        steps=steps,
        eigen=ctx.eigen,
        seed=ctx.seed,
        tol=ctx.tol,
        max_iter=ctx.max_iter,
        progress=ctx.progress,
    )
    settings = {
        "dims": 2,
        "directions": "eigen",
        "range": [-1.0, 1.0],
        "steps": steps,
        "eigenvectors": "from the spectrum part" if ctx.eigen is not None else "computed",
    }
    return ctx.document(
        "surface", settings, {"surface": res}, t0, passes, res.num_matvecs, list(res.notes)
    )


def _solve(ctx: _Context) -> dict | None:
    if not ctx.full:
        ctx.skipped.append({"part": "solve", "reason": "solver runs are in the full preset only."})
        return None
    from ..solvers import SOLVERS, compare_runs, run_solver

    p = ctx.problem
    names = [n for n in SOLVE_FULL if n in SOLVERS]
    ctx.fit("solve", lambda k: _solve_plan(p, names), _fixed)
    t0, passes = time.perf_counter(), p.data_passes
    runs, notes = [], []
    for name in names:
        try:
            runs.append(
                run_solver(
                    p,
                    name,
                    max_iter=SOLVE_MAX_ITER,
                    seed=ctx.seed,
                    progress=ctx.progress,
                    eig_tol=ctx.tol,
                )
            )
        except UnsupportedModelError as exc:
            ctx.skipped.append({"part": f"solve: {name}", "reason": str(exc)})
            notes.append(f"{name} left out: {exc}")
    if not runs:
        raise CurvscopeError("no solver could run on this model.")
    rows = compare_runs(runs)
    for row in rows:
        row.pop("loss_curve", None)
    results = {"solves": [r.to_result() for r in runs], "comparison": rows}
    return ctx.document(
        "solve",
        {"solver": names, "max_iter": SOLVE_MAX_ITER},
        results,
        t0,
        passes,
        sum(r.num_matvecs for r in runs),
        notes,
    )


def _classes(ctx: _Context) -> dict | None:
    """Papyan's class decomposition of the GGN, in the full preset, for softmax classifiers.

    Refused (skipped with its one-sentence reason) for other losses and outputs. Under a
    budget the GGN pairs shrink from C² (outliers and mini-outliers) to C (the outliers).
    """
    if not ctx.full:
        return None
    from ..diagnostics import check_classifier, classes

    p = ctx.problem
    C = check_classifier(p)
    ctx.knobs["top"] = min(C * C, p.num_params - 1)

    def shrink(k: dict) -> bool:
        if k["top"] <= C:
            return False
        k["top"] = min(C, k["top"])
        return True

    ctx.fit("classes", lambda k: _classes_plan(p, C, k["top"]), shrink)
    top = ctx.knobs["top"]
    t0, passes = time.perf_counter(), p.data_passes
    res = classes(
        p, top=top, tol=ctx.tol, max_matvecs=ctx.max_iter, seed=ctx.seed, progress=ctx.progress
    )
    settings = {"top": top, "max_matvecs": ctx.max_iter, "basis_size": None, "rtol": None}
    return ctx.document(
        "classes", settings, res.to_results(), t0, passes, res.num_matvecs, list(res.notes)
    )


def _fixed(_: dict) -> bool:
    """A part whose settings cannot shrink: it runs whole or is left out."""
    return False


_RUNNERS: dict[str, Callable[[_Context], dict | None]] = {
    "spectrum": _spectrum,
    "density": _density,
    "check": _check,
    "compare": _compare,
    "surface": _surface,
    "solve": _solve,
    "classes": _classes,
}


def _top_hessian(result: Any) -> EigenResult | None:
    """The Hessian's top pairs of block ``all`` from a spectrum result, for the surface."""
    for entry, vectors in zip(result.spectra, result.eigenvectors, strict=False):
        if entry.matrix == "hessian" and entry.block == "all" and entry.which == "top":
            return EigenResult(
                "top",
                entry.method,
                torch.tensor(entry.eigenvalues, dtype=torch.float64),
                vectors,
                torch.tensor(entry.residual_norms, dtype=torch.float64),
                torch.tensor(entry.converged),
                entry.num_matvecs,
                entry.norm_estimate,
                entry.tol,
                entry.num_iters,
            )
    return None


def _internal(part: str, exc: Exception) -> dict[str, str]:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return {
        "part": part,
        "reason": f"failed with an internal error ({type(exc).__name__}: {first}); this is a "
        "bug in curvscope, please report it.",
    }


def run_report(
    problem: Problem,
    *,
    out_dir: str | Path,
    preset: str = "quick",
    base_settings: dict[str, Any] | None = None,
    seed: int = 0,
    tol: float = 1e-4,
    max_iter: int | None = None,
    plotly_js: str = "inline",
    figure_formats: tuple[str, ...] = ("png",),
    parts: tuple[str, ...] = REPORT_PARTS,
    budget_s: float | None = None,
    progress: Progress | None = None,
    probe_block: int | None = None,
    memory: dict[str, Any] | None = None,
) -> ReportRun:
    """Run spectrum, density, checks, comparison, surface (and solvers in ``full``); render.

    The ``quick`` preset: top-5 and bottom-2 Hessian eigenpairs of the whole model, a
    20-probe density (30 Lanczos steps each) with Hutchinson/Hutch++ traces, the derivative
    checks, ``compare`` on the registry's quick matrices (GGN and, for MLPs, PCH), and a
    21 x 21 surface along the top two eigenvectors (reused from the spectrum). ``full`` adds
    the registry's full-report matrices and every layer to spectrum, density and compare,
    80-step density, a 41 x 41 surface and the solver runs.

    Args:
        problem: model, loss, data and parameter selection (``load`` records its input).
        out_dir: folder for the result documents, ``figures/`` and ``report.html``.
        preset: ``quick`` or ``full``.
        base_settings: settings recorded in every document besides the part's own.
        seed: seeds every random choice (probes, start vectors, directions).
        tol: eigenpair tolerance.
        max_iter: Lanczos step limit.
        plotly_js: ``inline`` or a relative path to ``plotly.min.js``.
        figure_formats: matplotlib figure formats written to ``figures/``.
        parts: which parts to attempt (default all).
        budget_s: seconds the report plans for (default: :data:`QUICK_BUDGET_S` for
            ``quick``, none for ``full``). Products are timed as they run (per matrix, dtype
            and size, an operator's first product apart; two Hessian products before the
            first part), and so are passes over the data and surface points; each part's
            plan (every product it takes) is priced with those costs. Before each part the
            wall time left decides: density probes and steps, surface steps and compare's
            blocks shrink to fit, and a part that does not fit even at its smallest is left
            out and recorded in ``skipped`` with the reason and the measured cost. The
            report ends within the budget plus the overrun of one part. Reductions are notes
            of the part's document; each document's ``budget`` section and
            ``report-skipped.json``'s record the planned and measured seconds and products.
        progress: ``progress(completed, total, description)``.
        probe_block: density's SLQ probes run at once (default all; the command's memory
            plan fits it, :func:`report_memory_phases`).
        memory: the command's memory plan (its ``memory`` section): each document records
            it with the process's peak when the part ended; the parts it left out
            (``left_out``: part -> reason) are skipped with that reason.

    Every document of the report records one run (the command's, or a new one); before the
    first part, the documents of report parts in ``out_dir`` written by another run are
    removed, so the folder never holds a stale part beside the new ones.

    Returns:
        A :class:`ReportRun` with the paths written and what was skipped.

    Raises:
        OptionError: for an unknown preset or part.
    """
    if preset not in PRESETS:
        raise OptionError(f"{arg('preset')} {preset!r} is not known; choose quick or full.")
    unknown = [p for p in parts if p not in REPORT_PARTS]
    if unknown:
        raise OptionError(
            f"report parts {unknown} are not known; choose from {', '.join(REPORT_PARTS)}."
        )
    if budget_s is not None and not budget_s > 0:
        raise OptionError(f"{arg('budget_s')} must be positive, got {budget_s}.")
    out = Path(out_dir)
    ctx = _Context(problem, preset, seed, tol, max_iter, dict(base_settings or {}), progress)
    ctx.probe_block, ctx.memory = probe_block, memory
    ctx.left_out = dict((memory or {}).get("left_out") or {})
    if budget_s is None and preset == "quick":
        budget_s = QUICK_BUDGET_S
    if budget_s is not None:
        ctx.budget = _Budget(budget_s, time.perf_counter())
        _calibrate(problem, ctx.budget)
    with active_run("report") as run:
        _remove_stale_parts(out, run.id)
        return _run_parts(ctx, out, parts, run.id, plotly_js, figure_formats)


def _remove_stale_parts(out: Path, run_id: str) -> list[Path]:
    """Remove ``out/<part>.json`` of every report part written by another run.

    A report rewrites the parts it runs; one it does not reach (interrupted, left out) would
    otherwise stay beside the new ones as if it belonged to this run.
    """
    removed = []
    for part in REPORT_PARTS:
        path = out / f"{part}.json"
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours to judge: rendering refuses it if it is in the way
        if isinstance(doc, dict) and doc.get("schema") and run_of(doc).get("id") != run_id:
            path.unlink()
            removed.append(path)
    return removed


def _run_parts(
    ctx: _Context,
    out: Path,
    parts: tuple[str, ...],
    run_id: str,
    plotly_js: str,
    figure_formats: tuple[str, ...],
) -> ReportRun:
    documents: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    timings: dict[str, float] = {}
    interrupted = False
    for part in parts:
        if interrupted:
            ctx.skipped.append({"part": part, "reason": "not run: interrupted (Ctrl-C)."})
            continue
        if part in ctx.left_out:  # the memory plan found it would not fit
            ctx.skipped.append({"part": part, "reason": ctx.left_out[part]})
            continue
        t0 = time.perf_counter()
        budget = ctx.budget
        if budget is not None:
            start, passes, ctx.plan = len(budget.meter.products), ctx.problem.data_passes, None
        try:
            if budget is not None:
                with ctx.problem.metered(budget.meter):
                    doc = _RUNNERS[part](ctx)
            else:
                doc = _RUNNERS[part](ctx)
        except KeyboardInterrupt:
            # keep what finished: the page is rendered below, then the interrupt goes on
            interrupted = True
            ctx.skipped.append({"part": part, "reason": "interrupted (Ctrl-C) while running."})
            doc = None
        except _OverBudget as exc:
            ctx.skipped.append({"part": part, "reason": str(exc), "budget": exc.budget})
            doc = None
        except CurvscopeError as exc:
            ctx.skipped.append({"part": part, "reason": str(exc)})
            doc = None
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others
            ctx.skipped.append(_internal(part, exc))
            doc = None
        timings[part] = time.perf_counter() - t0
        if budget is not None and ctx.plan is not None:  # it ran (or began): learn its costs
            measured = budget.costs.learn(
                budget.meter.since(start),
                timings[part],
                ctx.problem.data_passes - passes,
                ctx.plan,
                _dtype_name(ctx.problem.dtype),
            )
            budget.parts[part]["measured"] = measured
            if doc is not None:
                doc["budget"] = {"budget_s": budget.total_s, **budget.parts[part]}
        if doc is not None:
            documents[part] = doc
            paths[part] = write_document(doc, out)
    if not documents and not interrupted and ctx.budget is not None:
        _refuse_empty_budget(ctx)
    html, figures = render_documents(
        documents, out, plotly_js=plotly_js, figure_formats=figure_formats, skipped=ctx.skipped
    )
    # what was skipped and why, so that `report --from DIR` can say it again
    record: dict[str, Any] = {"run": run_id, "skipped": ctx.skipped}
    if ctx.budget is not None:
        record["budget"] = ctx.budget.record()
    write_atomic(out / SKIPPED_FILE, json.dumps(record, indent=1) + "\n")
    if interrupted:
        raise KeyboardInterrupt
    return ReportRun(html, paths, figures, ctx.skipped, timings)
