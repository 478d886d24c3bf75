"""Extreme eigenvalues of curvature matrices, whole-model and per block, with residuals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from .._errors import Interrupted, OptionError, arg
from .._sampling import as_generator
from ..linalg import (
    DEFAULT_TOL,
    EigenResult,
    LinearOperator,
    canonical_sign,
    eigsh,
    power_iteration,
)
from ._common import (
    MatrixSkips,
    Progress,
    add_notes,
    keep_finished,
    labelled,
    named_operators,
    resolve_blocks,
)
from ._overlap import GradientOverlap, block_gradient, overlap_from_ritz

__all__ = [
    "BlockMode",
    "Method",
    "SpectrumEntry",
    "SpectrumResult",
    "spectrum",
]


class Method(str, Enum):
    """Eigen-solver: Lanczos (default) or power iteration with deflation (Suk Alg. 5)."""

    LANCZOS = "lanczos"
    POWER = "power"


class BlockMode(str, Enum):
    """Which blocks to analyse: the whole selection, each module, or each parameter."""

    ALL = "all"
    PER_LAYER = "per-layer"
    PER_PARAM = "per-param"
    PER_GROUP = "per-group"


@dataclass(frozen=True)
class SpectrumEntry:
    """One ``results.spectra`` entry (docs/DESIGN.md "Result document")."""

    matrix: str
    block: str
    which: str
    method: str
    eigenvalues: list[float]
    residual_norms: list[float]
    converged: list[bool]
    num_matvecs: int
    norm_estimate: float
    tol: float
    num_iters: int
    shift: float | None = None
    spread: dict | None = None
    error_bounds: list[float] | None = None
    restarts: int = 0
    residual_check: str = "measured"


@dataclass(frozen=True)
class SpectrumResult:
    """All spectra of one run.

    Attributes:
        spectra: the entries, in the order matrices x blocks x (top, bottom).
        eigenvectors: ``[P_block, k]`` tensors aligned with ``spectra`` (not serialised).
        notes: sentences for the result document.
        num_matvecs: products used in total (repeats included).
        gradient_overlap: with ``gradient_overlap`` K, one entry per matrix and block: the
            gradient's fraction in the top-K eigenspace with its bound.
    """

    spectra: list[SpectrumEntry]
    eigenvectors: list[torch.Tensor] = field(repr=False)
    notes: list[str]
    num_matvecs: int
    gradient_overlap: list[GradientOverlap] = field(default_factory=list)

    def to_results(self) -> dict:
        """The ``results`` part of the result document."""
        out: dict = {"spectra": self.spectra}
        if self.gradient_overlap:
            out["gradient_overlap"] = self.gradient_overlap
        return out

    @property
    def all_converged(self) -> bool:
        """Whether every requested pair converged."""
        return all(all(e.converged) for e in self.spectra)


def _solve(
    op: LinearOperator,
    *,
    top: int,
    bottom: int,
    method: Method,
    tol: float,
    max_iter: int | None,
    seed: torch.Generator,
    progress: Progress | None,
    rtol: float | None = None,
    basis_size: int | None = None,
    basis_device: str | None = None,
) -> list[EigenResult]:
    n = getattr(op, "global_size", None) or op.shape[0]  # a sharded operator's is local
    if top + bottom > n:
        raise OptionError(
            f"{arg('top')} {top} and {arg('bottom')} {bottom} ask for {top + bottom} "
            f"eigenvalues of a {op.name} block with only {n} rows."
        )
    if method == Method.LANCZOS:
        return eigsh(
            op,
            top=top,
            bottom=bottom,
            tol=tol,
            rtol=rtol,
            basis_size=basis_size,
            basis_device=basis_device,
            max_matvecs=max_iter,
            seed=seed,
            progress=progress,
        )
    out = []
    iters = max_iter if max_iter is not None else 1000
    for which, k in (("top", top), ("bottom", bottom)):
        if k:
            out.append(
                power_iteration(
                    op, k, which=which, tol=tol, max_iter=iters, seed=seed, progress=progress
                )
            )
    return out


def _counted(results: list[EigenResult], method: Method) -> int:
    """Products of one solve: a Lanczos run serves both ends; power runs are separate."""
    if method == Method.LANCZOS:
        return results[0].num_matvecs if results else 0
    return sum(r.num_matvecs for r in results)


def spectrum(
    ops,
    *,
    blocks: str | Sequence[str] = "all",
    top: int = 5,
    bottom: int = 2,
    method: str | Method = Method.LANCZOS,
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    seed: int | torch.Generator = 0,
    repeats: int = 0,
    samples: int | None = None,
    rtol: float | None = None,
    basis_size: int | None = None,
    basis_device: str | None = None,
    progress: Progress | None = None,
    gradient_overlap: int = 0,
    gradient: torch.Tensor | None = None,
) -> SpectrumResult:
    r"""Extreme eigenpairs of each operator and block, each with its measured residual.

    Every eigenvalue comes with its residual :math:`\lVert Av - \lambda v\rVert` and a
    converged flag (residual <= ``tol`` x the largest |Ritz value|). With ``repeats`` R and
    ``samples`` N the same eigenvalues are recomputed on R seeded random subsets of N samples
    (operators built from data only) and summarised per eigenvalue in ``spread`` (mean, std,
    min, max): the sampling uncertainty that a mini-batch estimate carries (cf. PyHessian
    issue #5). ``std`` is the sample standard deviation over the R subsets: the scatter of
    one N-sample eigenvalue around the subsets' ``mean`` (a fresh N-sample estimate lies
    within ``mean ± 2 * t_factor(R) * sqrt(1 + 1/R) * std`` in ~95% of runs, within
    ``mean ± 2 std`` in 89% at R = 5 and 93.5% at R = 10; ``benchmarks/coverage.py``). It
    is *not* an error bar on the full-data ``eigenvalues``: the extreme eigenvalues of a
    subset are biased outwards (the top one upwards), so the full-data value can lie far
    outside an N-sample estimate ± 2 std (30% coverage in the benchmark's Gram matrix);
    ``mean - eigenvalue`` shows that bias.

    Args:
        ops: ``{name: operator}`` (or one operator): curvature operators, ``H + 1e-3 * I``,
            a matrix, a scipy or curvlinops operator (see :func:`curvscope.linalg.as_operator`).
        blocks: ``"all"``, ``"per-layer"``, ``"per-param"``, ``"per-group"`` or block names.
        top: number of largest eigenvalues per block.
        bottom: number of smallest eigenvalues per block.
        method: ``lanczos`` or ``power``.
        tol: relative residual tolerance.
        max_iter: products at most for thick-restart Lanczos (the final residual check
            included), or power iterations per pair.
        seed: seeds start vectors and data subsets (an int or a generator).
        repeats: number of subset repeats (0: none).
        samples: subset size for ``repeats``.
        rtol: Lanczos converges each pair to this relative accuracy (its error bound
            over ``|lambda|``) instead of ``tol``.
        basis_size: Lanczos basis vectors at most (default from the pairs asked for and a
            1 GiB budget, :func:`curvscope.linalg.default_basis_size`).
        basis_device: where the Lanczos basis lives (``cpu`` keeps it in host memory when the
            device is short; default the operator's device).
        progress: ``progress(completed, total, description)``.
        gradient_overlap: K > 0 adds, per matrix and block, the fraction of the gradient in
            the span of the top-K eigenvectors with its Davis-Kahan interval
            (:func:`~curvscope.diagnostics.overlap_from_ritz`); ``top`` is raised to K + 1
            where smaller (the (K+1)-th pair gives the gap), and a note says so.
        gradient: ``[P]`` the whole operator's gradient for ``gradient_overlap`` (default:
            ``problem.loss_and_grad()`` of curvature operators, computed once per problem);
            each block takes its part.

    Raises:
        OptionError: for invalid counts, methods or blocks.
    """
    try:
        method = Method(method)
    except ValueError:
        raise OptionError(
            f"{arg('method')} {method!r} is not known; choose lanczos or power."
        ) from None
    if top < 0 or bottom < 0 or top + bottom == 0:
        raise OptionError(
            f"{arg('top')} {top} and {arg('bottom')} {bottom}: ask for at least one eigenvalue "
            "(and none negative)."
        )
    if repeats < 0:
        raise OptionError(f"{arg('repeats')} must be >= 0, got {repeats}.")
    if repeats and samples is None:
        raise OptionError(
            f"{arg('repeats')} needs {arg('samples')} N, the size of each random subset."
        )
    if gradient_overlap < 0:
        raise OptionError(
            f"{arg('gradient_overlap')} must be >= 0, got {gradient_overlap}.",
            option="gradient_overlap",
        )
    operators = named_operators(ops)
    overlaps: list[GradientOverlap] = []
    gradients: dict[int, torch.Tensor] = {}
    if gradient_overlap and top < gradient_overlap + 1:
        top_note = (
            f"top raised from {top} to {gradient_overlap + 1} for the gradient overlap: the "
            f"({gradient_overlap}+1)-th eigenvalue gives the gap of its bound."
        )
        top = gradient_overlap + 1
    else:
        top_note = None
    base_seed = seed if isinstance(seed, int) else int(as_generator(seed).initial_seed())
    entries: list[SpectrumEntry] = []
    vectors: list[torch.Tensor] = []
    notes: list[str] = []
    total = 0
    if top_note:
        notes.append(top_note)
    skips = MatrixSkips(list(operators), notes)
    with keep_finished(
        notes,
        "the matrices and blocks listed",
        lambda: SpectrumResult(entries, vectors, notes, total, overlaps),
    ):
        for name, full in operators.items():
            with skips.guard(name):
                add_notes(notes, full)
                for block in resolve_blocks(full, blocks):
                    op = full.block(block)
                    solve_kw = {
                        "top": top,
                        "bottom": bottom,
                        "method": method,
                        "tol": tol,
                        "max_iter": max_iter,
                        "rtol": rtol,
                        "basis_size": basis_size,
                        "basis_device": basis_device,
                    }
                    stopped = False
                    try:
                        results = _solve(
                            op,
                            seed=torch.Generator().manual_seed(base_seed),
                            progress=labelled(progress, f"{name} [{block}]"),
                            **solve_kw,
                        )
                    except Interrupted as stop:  # Lanczos keeps the Ritz pairs at hand
                        results, stopped = list(stop.partial or []), True
                        notes.append(
                            f"{name} [{block}]: interrupted during Lanczos; its current Ritz "
                            "values are kept with their residual estimates (not measured, no "
                            "bound), marked not converged."
                        )
                    total += _counted(results, method)
                    add_notes(notes, full, op)  # notes that came with the products
                    spreads = {}
                    if repeats and not stopped:
                        spreads, used = _repeats(
                            full, block, repeats, samples, base_seed, **solve_kw
                        )
                        total += used
                    for res in results:
                        entries.append(
                            SpectrumEntry(
                                matrix=name,
                                block=block,
                                which=res.which,
                                method=res.method,
                                eigenvalues=res.eigenvalues.tolist(),
                                residual_norms=res.residual_norms.tolist(),
                                converged=[bool(c) for c in res.converged],
                                num_matvecs=res.num_matvecs,
                                norm_estimate=res.norm_estimate,
                                tol=res.tol,
                                num_iters=res.num_iters,
                                shift=res.shift,
                                spread=spreads.get(res.which),
                                error_bounds=(
                                    None if res.error_bounds is None else res.error_bounds.tolist()
                                ),
                                restarts=int(getattr(res, "restarts", 0)),
                                residual_check=getattr(res, "residual_check", "measured"),
                            )
                        )
                        vectors.append(canonical_sign(res.eigenvectors.detach()))
                        if gradient_overlap and res.which == "top" and not stopped:
                            g = _gradient(full, gradient, gradients)
                            overlaps.append(
                                overlap_from_ritz(
                                    res.eigenvalues,
                                    res.eigenvectors,
                                    res.residual_norms,
                                    res.error_bounds,
                                    res.converged,
                                    block_gradient(full, block, g),
                                    gradient_overlap,
                                    matrix=name,
                                    block=block,
                                )
                            )
                    if stopped:
                        raise KeyboardInterrupt
                    if repeats:
                        line = (
                            "spread.std is the standard deviation of an eigenvalue over the "
                            f"{repeats} subsets of {samples} samples: the scatter of a "
                            f"{samples}-sample estimate around spread.mean, not an error bar on "
                            "the full-data eigenvalue (extreme eigenvalues of subsets are biased "
                            "outwards; spread.mean - eigenvalue shows by how much)."
                        )
                        if line not in notes:
                            notes.append(line)
                    if len(results) > 1 and method == Method.LANCZOS:
                        line = (
                            "top and bottom pairs of a block come from one Lanczos run; their "
                            "num_matvecs is that run's count, not a sum."
                        )
                        if line not in notes:
                            notes.append(line)
    skips.check()
    if overlaps:
        notes.append(OVERLAP_NOTE)
    return SpectrumResult(entries, vectors, notes, total, overlaps)


OVERLAP_NOTE = (
    "gradient_overlap: fraction = ||V^T g||^2/||g||^2 with the top-k Ritz vectors V; the "
    "fraction with the exact top-k eigenspace lies within error_bound = min(1, ||R||_F/gap) "
    "(Davis-Kahan; R the residuals, gap = theta_k - theta_{k+1} - e_{k+1}), in [lower, upper]."
)


def _gradient(
    full: LinearOperator, given: torch.Tensor | None, cache: dict[int, torch.Tensor]
) -> torch.Tensor:
    """The whole operator's gradient: the one given, or its problem's (computed once)."""
    if given is not None:
        return given
    problem = getattr(full, "problem", None)
    if problem is None:
        raise OptionError(
            f"{arg('gradient_overlap')} needs {arg('gradient')} for the {full.name} operator, "
            "which has no problem to compute it from.",
            option="gradient",
        )
    key = id(problem)
    if key not in cache:
        cache[key] = problem.loss_and_grad()[1].detach()
    return cache[key]


def _repeats(
    full: LinearOperator, block: str, repeats: int, samples: int, seed: int, **solve_kw
) -> tuple[dict, int]:
    """Eigenvalues on ``repeats`` seeded subsets, summarised per eigenvalue and end."""
    gen = torch.Generator().manual_seed(seed + 1)
    per_which: dict[str, list[torch.Tensor]] = {}
    matvecs = 0
    for r in range(repeats):
        op = full.on_subset(samples, gen).block(block)
        results = _solve(
            op, seed=torch.Generator().manual_seed(seed + r), progress=None, **solve_kw
        )
        matvecs += _counted(results, solve_kw["method"])
        for res in results:
            per_which.setdefault(res.which, []).append(res.eigenvalues)
    out = {}
    for which, vals in per_which.items():
        stack = torch.stack(vals)
        std = (
            stack.std(0, unbiased=True)
            if repeats > 1
            else torch.zeros(stack.shape[1], dtype=stack.dtype)
        )
        out[which] = {
            "mean": stack.mean(0).tolist(),
            "std": std.tolist(),
            "min": stack.min(0).values.tolist(),
            "max": stack.max(0).values.tolist(),
            "repeats": repeats,
            "samples": samples,
        }
    return out, matvecs
