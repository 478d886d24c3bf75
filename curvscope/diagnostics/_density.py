r"""Spectral densities (SLQ) and traces (Hutchinson, Hutch++, exact) of curvature matrices.

For every requested matrix and block: stochastic Lanczos quadrature with ``num_probes``
normalised Rademacher probes and ``num_steps`` Lanczos steps (all probes in one ``A @ V``
per step), the Gaussian-broadened density on a grid (its width ``sigma`` recorded), and the
trace by Hutchinson and Hutch++ with ``trace_probes`` products each, plus the exact trace
(``P`` products with identity columns) when the block has at most ``exact_trace_max`` rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .._errors import OptionError, arg
from .._sampling import as_generator
from ..linalg import exact_trace, hutchinson_trace, hutchpp_trace, slq, spectral_density
from ._common import (
    MatrixSkips,
    Progress,
    add_notes,
    keep_finished,
    labelled,
    named_operators,
    resolve_blocks,
)

__all__ = ["DensityEntry", "DensityResult", "TraceEntry", "density"]


@dataclass(frozen=True)
class DensityEntry:
    r"""One ``results.densities`` entry (docs/DESIGN.md "Result document").

    Attributes:
        matrix: matrix name (``hessian``, ``ggn``, ...).
        block: ``"all"``, a module name or a parameter name.
        grid: evaluation points of the density.
        density: the broadened density on ``grid`` (integrates to 1 by the trapezoid rule).
        sigma: Gaussian broadening width.
        nodes: quadrature nodes ``[num_probes][m]`` (Ritz values per probe).
        weights: quadrature weights ``[num_probes][m]`` (each row sums to 1).
        num_probes: number of probes.
        num_matvecs: products used by SLQ.
        dim: rows of the block.
        lanczos_steps: Lanczos steps requested per probe (fewer on breakdown).
        slq_trace: :math:`P \cdot` the quadrature's :math:`\operatorname{tr}(A)/P` estimate.
        slq_trace_stderr: its standard error over probes (widened for few probes like
            ``stderr``; see :meth:`curvscope.linalg.SLQResult.moment`).
        wall_time_s: seconds spent on SLQ and the density.
    """

    matrix: str
    block: str
    grid: list[float]
    density: list[float]
    sigma: float
    nodes: list[list[float]]
    weights: list[list[float]]
    num_probes: int
    num_matvecs: int
    dim: int
    lanczos_steps: int
    slq_trace: float
    slq_trace_stderr: float
    wall_time_s: float


@dataclass(frozen=True)
class TraceEntry:
    """One ``results.traces`` entry (docs/DESIGN.md "Result document").

    Attributes:
        matrix: matrix name.
        block: block name.
        estimator: ``"hutchinson"``, ``"hutchpp"`` or ``"exact"``.
        estimate: the trace.
        stderr: standard error (0 for ``"exact"``), widened for few probes so that
            ``estimate ± 2 * stderr`` covers the trace in ~95% of runs; for ``"hutchpp"`` that
            of the whole estimate (see :func:`curvscope.linalg.hutchpp_trace`).
        num_matvecs: products used.
        wall_time_s: seconds spent.
    """

    matrix: str
    block: str
    estimator: str
    estimate: float
    stderr: float
    num_matvecs: int
    wall_time_s: float


@dataclass(frozen=True)
class DensityResult:
    """All densities and traces of one run.

    Attributes:
        densities: one entry per matrix and block.
        traces: up to three entries (hutchinson, hutchpp, exact) per matrix and block.
        notes: sentences for the result document.
        num_matvecs: products used in total.
    """

    densities: list[DensityEntry]
    traces: list[TraceEntry]
    notes: list[str] = field(default_factory=list)
    num_matvecs: int = 0

    def to_results(self) -> dict:
        """The ``results`` part of the result document."""
        return {"densities": self.densities, "traces": self.traces}


def density(
    ops,
    *,
    blocks: str | Sequence[str] = ("all",),
    num_probes: int = 20,
    num_steps: int = 80,
    trace_probes: int = 100,
    exact_trace_max: int = 2000,
    num_points: int = 1000,
    sigma: float | None = None,
    distribution: str = "rademacher",
    seed: int | torch.Generator = 0,
    progress: Progress | None = None,
    probe_block: int | None = None,
) -> DensityResult:
    r"""Spectral density and trace of each requested matrix and block.

    Args:
        ops: ``{name: operator}`` (or one operator), anything
            :func:`curvscope.linalg.as_operator` accepts.
        blocks: ``"all"``, ``"per-layer"``, ``"per-param"`` or explicit block names.
        num_probes: SLQ probes.
        num_steps: Lanczos steps per probe (capped at the block's size).
        trace_probes: products for Hutchinson and for Hutch++ each (0: skip both; Hutch++
            needs at least 3).
        exact_trace_max: compute the exact trace when the block has at most this many rows
            (0: never).
        num_points: density grid size.
        sigma: broadening width (default 1% of each density's node range).
        distribution: probe distribution, ``rademacher`` or ``gaussian``.
        seed: seeds the probes: an int gives every operator and block a fresh generator
            with that seed (so every matrix sees the same probes); a generator is used as is.
        progress: ``progress(completed, total, description)``.
        probe_block: SLQ probes run together (default all; :func:`~curvscope.linalg.slq`):
            fewer hold less memory, with the same result in the same products.

    Returns:
        A :class:`DensityResult`.

    Raises:
        OptionError: for invalid counts, matrices or blocks.
    """
    if num_probes < 1:
        raise OptionError(f"{arg('num_probes')} must be at least 1, got {num_probes}.")
    if num_steps < 1:
        raise OptionError(f"{arg('num_steps')} must be at least 1, got {num_steps}.")
    if trace_probes < 0 or trace_probes in (1, 2):
        raise OptionError(
            f"{arg('trace_probes')} must be 0 (skip) or at least 3 (Hutch++ needs 3), got "
            f"{trace_probes}."
        )
    if exact_trace_max < 0:
        raise OptionError(f"{arg('exact_trace_max')} must be >= 0, got {exact_trace_max}.")
    operators = named_operators(ops)
    densities: list[DensityEntry] = []
    traces: list[TraceEntry] = []
    notes: list[str] = []
    total = 0
    skips = MatrixSkips(list(operators), notes)
    with keep_finished(
        notes,
        "the densities and traces listed",
        lambda: DensityResult(densities, traces, notes, total),
    ):
        for matrix, full in operators.items():
            with skips.guard(matrix):
                for block in resolve_blocks(full, blocks):
                    op = full.block(block)
                    add_notes(notes, op)
                    gen = (
                        as_generator(seed)
                        if isinstance(seed, torch.Generator)
                        else (torch.Generator().manual_seed(int(seed)))
                    )
                    label = f"{matrix} [{block}]"
                    n = op.shape[0]
                    t0 = time.perf_counter()
                    q = slq(
                        op,
                        num_probes=num_probes,
                        num_steps=num_steps,
                        distribution=distribution,
                        seed=gen,
                        progress=labelled(progress, label),
                        probe_block=probe_block,
                    )
                    d = spectral_density(q, num_points=num_points, sigma=sigma)
                    m1, se1 = q.moment(1)
                    densities.append(
                        DensityEntry(
                            matrix=matrix,
                            block=block,
                            grid=d.grid.tolist(),
                            density=d.density.tolist(),
                            sigma=d.sigma,
                            nodes=q.nodes.tolist(),
                            weights=q.weights.tolist(),
                            num_probes=q.num_probes,
                            num_matvecs=q.num_matvecs,
                            dim=n,
                            lanczos_steps=min(num_steps, n),
                            slq_trace=n * m1,
                            slq_trace_stderr=n * se1,
                            wall_time_s=time.perf_counter() - t0,
                        )
                    )
                    total += q.num_matvecs
                    jobs = []
                    if trace_probes:
                        jobs.append(
                            lambda op=op, gen=gen: hutchinson_trace(
                                op, num_matvecs=trace_probes, distribution=distribution, seed=gen
                            )
                        )
                        jobs.append(
                            lambda op=op, gen=gen: hutchpp_trace(
                                op, num_matvecs=trace_probes, distribution=distribution, seed=gen
                            )
                        )
                    if exact_trace_max and n <= exact_trace_max:
                        jobs.append(lambda op=op: exact_trace(op, max_dim=exact_trace_max))
                    for i, job in enumerate(jobs):
                        t0 = time.perf_counter()
                        est = job()
                        traces.append(
                            TraceEntry(
                                matrix=matrix,
                                block=block,
                                estimator=est.estimator,
                                estimate=est.estimate,
                                stderr=est.stderr,
                                num_matvecs=est.num_matvecs,
                                wall_time_s=time.perf_counter() - t0,
                            )
                        )
                        total += est.num_matvecs
                        if progress is not None:
                            progress(i + 1, len(jobs), f"trace {label}")
                    add_notes(notes, op)  # notes that came with the products
                    if exact_trace_max and n > exact_trace_max:
                        line = (
                            "exact traces skipped for blocks with more than "
                            f"{exact_trace_max} rows (exact_trace_max)."
                        )
                        if line not in notes:
                            notes.append(line)
        notes.append(
            f"SLQ: {num_probes} normalised {distribution} probes, up to {num_steps} Lanczos steps "
            "with full reorthogonalisation, float64 tridiagonal eigh; density broadened by a "
            "Gaussian of width sigma (recorded per entry)."
        )
        if trace_probes:
            notes.append(
                "stderr: estimate ± 2 stderr covers the trace in ~95% of runs (a Student-t "
                "interval over the probes; for hutchpp the whole estimate's, its sketched part "
                "being exact given the sketch); fewer when one eigenvalue dominates and the "
                "probes are few (hutchinson and slq: 87% at 10 probes), where hutchpp stays "
                "calibrated."
            )
    skips.check()
    return DensityResult(densities, traces, notes, total)
