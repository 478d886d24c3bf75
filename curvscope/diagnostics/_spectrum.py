"""Extreme eigenvalues of curvature matrices, whole-model and per block, with residuals."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from .._errors import OptionError
from ..io._eigenvectors import canonical_sign
from ..linalg import DEFAULT_TOL, EigenResult, eigenpairs, power_iteration
from ..operators import CurvatureOperator
from ..problem import Problem

__all__ = [
    "BlockMode",
    "Method",
    "SpectrumEntry",
    "SpectrumResult",
    "make_matrix",
    "resolve_blocks",
    "spectrum",
]

Progress = Callable[[int, int, str], None]


class Method(str, Enum):
    """Eigen-solver: Lanczos (default) or power iteration with deflation (Suk Alg. 5)."""

    LANCZOS = "lanczos"
    POWER = "power"


class BlockMode(str, Enum):
    """Which blocks to analyse: the whole selection, each module, or each parameter."""

    ALL = "all"
    PER_LAYER = "per-layer"
    PER_PARAM = "per-param"


@dataclass(frozen=True)
class SpectrumEntry:
    """One ``results.spectra`` entry (DESIGN.md "Contracts")."""

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


@dataclass(frozen=True)
class SpectrumResult:
    """All spectra of one run.

    Attributes:
        spectra: the entries, in the order matrices x blocks x (top, bottom).
        eigenvectors: ``[P_block, k]`` tensors aligned with ``spectra`` (not serialised).
        notes: sentences for the result document.
        num_matvecs: products used in total (repeats included).
    """

    spectra: list[SpectrumEntry]
    eigenvectors: list[torch.Tensor] = field(repr=False)
    notes: list[str]
    num_matvecs: int

    def to_results(self) -> dict:
        """The ``results`` part of the result document."""
        return {"spectra": self.spectra}

    @property
    def all_converged(self) -> bool:
        """Whether every requested pair converged."""
        return all(all(e.converged) for e in self.spectra)


def make_matrix(name: str, problem: Problem, *, seed: int = 0) -> CurvatureOperator:
    """The operator for matrix ``name`` (see ``curvscope.operators.MATRIX_NAMES``)."""
    from .. import operators

    return operators.make_operator(name, problem, seed=seed)


def resolve_blocks(problem: Problem, blocks: str | BlockMode | Sequence[str]) -> list[str]:
    """Block names for ``"all"``, ``"per-layer"``, ``"per-param"`` or an explicit list.

    Raises:
        OptionError: for a block name that does not exist (listing the valid ones).
    """
    if isinstance(blocks, str) and blocks in {m.value for m in BlockMode}:
        mode = BlockMode(blocks)
        if mode == BlockMode.ALL:
            return ["all"]
        if mode == BlockMode.PER_LAYER:
            return list(problem.module_blocks())
        return list(problem.names)
    names = [blocks] if isinstance(blocks, str) else list(blocks)
    for name in names:
        problem.block_param_names(name)  # raises with the valid names
    return names


def _solve(
    op: CurvatureOperator,
    *,
    top: int,
    bottom: int,
    method: Method,
    tol: float,
    max_iter: int | None,
    generator: torch.Generator,
    progress: Progress | None,
) -> list[EigenResult]:
    n = op.shape[0]
    if top + bottom > n:
        raise OptionError(
            f"--top {top} and --bottom {bottom} ask for {top + bottom} eigenvalues of a "
            f"{op.name} block with only {n} rows."
        )
    if method == Method.LANCZOS:
        return eigenpairs(
            op,
            top=top,
            bottom=bottom,
            tol=tol,
            max_iter=max_iter,
            generator=generator,
            progress=progress,
        )
    out = []
    iters = max_iter if max_iter is not None else 1000
    if top:
        out.append(
            power_iteration(
                op,
                top,
                which="top",
                tol=tol,
                max_iter=iters,
                generator=generator,
                progress=progress,
            )
        )
    if bottom:
        out.append(
            power_iteration(
                op,
                bottom,
                which="bottom",
                tol=tol,
                max_iter=iters,
                generator=generator,
                progress=progress,
            )
        )
    return out


def spectrum(
    problem: Problem,
    *,
    matrices: Sequence[str] = ("hessian",),
    blocks: str | Sequence[str] = "all",
    top: int = 5,
    bottom: int = 2,
    method: str | Method = Method.LANCZOS,
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    seed: int = 0,
    repeats: int = 0,
    samples: int | None = None,
    progress: Progress | None = None,
) -> SpectrumResult:
    r"""Extreme eigenpairs of each requested matrix and block.

    Every eigenvalue comes with its measured residual :math:`\lVert Av - \lambda v\rVert` and a
    converged flag (residual <= ``tol`` x the largest |Ritz value|). With ``repeats`` R and
    ``samples`` N the same eigenvalues are recomputed on R seeded random subsets of N samples
    and summarised per eigenvalue in ``spread`` (mean, std, min, max): the sampling
    uncertainty that a mini-batch estimate carries (cf. PyHessian issue #5).

    Args:
        problem: model, loss, data, parameter selection.
        matrices: matrix names (``hessian``, ``ggn``, ...).
        blocks: ``"all"``, ``"per-layer"``, ``"per-param"`` or explicit block names.
        top: number of largest eigenvalues per block.
        bottom: number of smallest eigenvalues per block.
        method: ``lanczos`` or ``power``.
        tol: relative residual tolerance.
        max_iter: Lanczos steps (or power iterations per pair) at most.
        seed: seeds start vectors, Monte-Carlo matrices and data subsets.
        repeats: number of subset repeats (0: none).
        samples: subset size for ``repeats``.
        progress: ``progress(completed, total, description)``.

    Raises:
        OptionError: for invalid counts, methods, matrices or blocks.
    """
    try:
        method = Method(method)
    except ValueError:
        raise OptionError(f"--method {method!r} is not known; choose lanczos or power.") from None
    if top < 0 or bottom < 0 or top + bottom == 0:
        raise OptionError("ask for at least one eigenvalue: --top and --bottom are both 0.")
    if repeats < 0:
        raise OptionError(f"--repeats must be >= 0, got {repeats}.")
    if repeats and samples is None:
        raise OptionError("--repeats needs --samples N, the size of each random subset.")
    block_names = resolve_blocks(problem, blocks)
    entries: list[SpectrumEntry] = []
    vectors: list[torch.Tensor] = []
    notes: list[str] = []
    total = 0
    for matrix in matrices:
        full = make_matrix(matrix, problem, seed=seed)
        notes.extend(n for n in full.notes if n not in notes)
        for block in block_names:
            op = full.block(block)
            gen = torch.Generator().manual_seed(seed)
            label = f"{matrix} [{block}]"
            results = _solve(
                op,
                top=top,
                bottom=bottom,
                method=method,
                tol=tol,
                max_iter=max_iter,
                generator=gen,
                progress=_labelled(progress, label),
            )
            spreads = (
                _repeats(
                    problem,
                    matrix,
                    block,
                    repeats,
                    samples,
                    seed,
                    top=top,
                    bottom=bottom,
                    method=method,
                    tol=tol,
                    max_iter=max_iter,
                )
                if repeats
                else {}
            )
            shared = len(results) > 1 and method == Method.LANCZOS
            total += results[0].num_matvecs if shared else sum(r.num_matvecs for r in results)
            total += sum(s["num_matvecs"] for s in spreads.values())
            for res in results:
                entries.append(
                    SpectrumEntry(
                        matrix=matrix,
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
                        spread=spreads.get(res.which, {}).get("spread"),
                    )
                )
                vectors.append(canonical_sign(res.eigenvectors.detach()))
            if shared:
                notes_line = (
                    "top and bottom pairs of a block come from one Lanczos run; their "
                    "num_matvecs is that run's count, not a sum."
                )
                if notes_line not in notes:
                    notes.append(notes_line)
    return SpectrumResult(entries, vectors, notes, total)


def _labelled(progress: Progress | None, label: str) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total, what: progress(done, total, f"{what} {label}")


def _repeats(problem, matrix, block, repeats, samples, seed, **solve_kw) -> dict:
    """Eigenvalues on ``repeats`` seeded subsets, summarised per eigenvalue and end."""
    gen = torch.Generator().manual_seed(seed + 1)
    per_which: dict[str, list[torch.Tensor]] = {}
    matvecs = 0
    for r in range(repeats):
        sub = problem.subsample(samples, gen)
        op = make_matrix(matrix, sub, seed=seed + r).block(block)
        results = _solve(
            op, generator=torch.Generator().manual_seed(seed + r), progress=None, **solve_kw
        )
        matvecs += results[0].num_matvecs if len(results) > 1 else results[0].num_matvecs
        for res in results:
            per_which.setdefault(res.which, []).append(res.eigenvalues)
    out = {}
    for which, vals in per_which.items():
        stack = torch.stack(vals)
        out[which] = {
            "spread": {
                "mean": stack.mean(0).tolist(),
                "std": (
                    stack.std(0, unbiased=True)
                    if repeats > 1
                    else torch.zeros(stack.shape[1], dtype=stack.dtype)
                ).tolist(),
                "min": stack.min(0).values.tolist(),
                "max": stack.max(0).values.tolist(),
                "repeats": repeats,
                "samples": samples,
            },
            "num_matvecs": 0,
        }
    if out:
        next(iter(out.values()))["num_matvecs"] = matvecs
    return out
