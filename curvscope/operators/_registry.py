"""The one registry of curvature matrices: name -> factory, with what each supports.

Every place that needs matrix names asks here: the command line's ``--matrix`` help and its
validation (before any data is loaded), the default set of ``compare``, and the matrices the
report runs. A matrix a model does not support raises
:class:`~curvscope._errors.UnsupportedModelError` carrying the matrix name as data, so callers
decide from ``error.matrix``, never from the message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._errors import OptionError, UnsupportedModelError, arg
from ..problem import Problem
from ._base import CurvatureOperator

__all__ = [
    "MATRICES",
    "MATRIX_NAMES",
    "MatrixSpec",
    "build_operators",
    "compare_defaults",
    "make_operator",
    "matrix_help",
    "report_matrices",
    "resolve_matrices",
]


@dataclass(frozen=True)
class MatrixSpec:
    """A curvature matrix by name.

    Attributes:
        name: what ``--matrix`` and result documents call it.
        summary: one line for help texts.
        build: ``build(problem, seed=..., mc_samples=..., hvp=...) -> CurvatureOperator``.
        approximates: an approximation of the Hessian (a ``compare`` candidate).
        compare_default: in ``compare``'s default set.
        needs: what it needs of the model, in words, for help texts (empty: any model).
        report: the report presets whose spectrum and compare parts use it.
    """

    name: str
    summary: str
    build: Callable[..., CurvatureOperator]
    approximates: bool = True
    compare_default: bool = True
    needs: str = ""
    report: tuple[str, ...] = ()


def _hessian(problem: Problem, *, hvp: str = "auto", **_: object) -> CurvatureOperator:
    from ._hessian import HessianOperator

    if getattr(problem, "sharding", None) is not None:
        from ._sharded import ShardedHessianOperator

        return ShardedHessianOperator(problem, mode=hvp)
    return HessianOperator(problem, mode=hvp)


def _ggn(problem: Problem, **_: object) -> CurvatureOperator:
    from ._ggn import GGNOperator

    return GGNOperator(problem)


def _fisher(kind: str) -> Callable[..., CurvatureOperator]:
    def build(problem: Problem, *, seed: int = 0, mc_samples: int = 1, **_: object):
        from ._fisher import FisherOperator

        return FisherOperator(problem, kind=kind, mc_samples=mc_samples, seed=seed)

    return build


def _empirical_fisher(problem: Problem, **_: object) -> CurvatureOperator:
    from ._fisher import EmpiricalFisherOperator

    return EmpiricalFisherOperator(problem)


def _pch(mode: str, approximation: str) -> Callable[..., CurvatureOperator]:
    def build(problem: Problem, **_: object) -> CurvatureOperator:
        from ._pch import PCHOperator

        return PCHOperator(problem, mode=mode, approximation=approximation)

    return build


def _kfac(fisher_type: str, ekfac: bool = False) -> Callable[..., CurvatureOperator]:
    def build(problem: Problem, *, seed: int = 0, mc_samples: int = 1, **_: object):
        from ._kfac import EKFACOperator, KFACOperator

        cls = EKFACOperator if ekfac else KFACOperator
        return cls(problem, fisher_type=fisher_type, mc_samples=mc_samples, seed=seed)

    return build


_LIKELIHOOD = "a loss that is a negative log-likelihood (not chen_nonconvex or a user function)"
_MLP = "an MLP of Linear layers and elementwise activations"
_KFAC = (
    "selected parameters in Linear, Conv1D, Conv2d or Embedding layers; eval mode; "
    "a likelihood loss"
)

MATRICES: dict[str, MatrixSpec] = {
    spec.name: spec
    for spec in (
        MatrixSpec(
            "hessian",
            "the exact Hessian of the loss",
            _hessian,
            approximates=False,
            compare_default=False,
            report=("quick", "full"),
        ),
        MatrixSpec(
            "ggn",
            "generalised Gauss-Newton J^T H_out J",
            _ggn,
            report=("quick", "full"),
        ),
        MatrixSpec("fisher", "Fisher, exact expectation over labels", _fisher("exact"),
                   needs=_LIKELIHOOD),
        MatrixSpec("fisher-mc", "Fisher, Monte-Carlo labels (fixed seed)", _fisher("mc"),
                   needs=_LIKELIHOOD),
        MatrixSpec(
            "empirical-fisher",
            "outer products of per-sample gradients at the observed labels",
            _empirical_fisher,
            needs="eval mode",
            report=("full",),
        ),
        MatrixSpec("pch-abs", "Chen et al.'s positive-curvature Hessian, |eigenvalues|",
                   _pch("abs", "expectation"), needs=_MLP, report=("quick", "full")),
        MatrixSpec("pch-clip", "PCH with negative eigenvalues clipped to 0",
                   _pch("clip", "expectation"), needs=_MLP),
        MatrixSpec("pch-abs-persample", "PCH-1 from per-sample blocks",
                   _pch("abs", "per-sample"), needs=_MLP),
        MatrixSpec("pch-clip-persample", "PCH-2 from per-sample blocks",
                   _pch("clip", "per-sample"), needs=_MLP),
        MatrixSpec("kfac", "Kronecker-factored Fisher per layer (exact labels)",
                   _kfac("exact"), needs=_KFAC, report=("full",)),
        MatrixSpec("kfac-mc", "KFAC with Monte-Carlo labels", _kfac("mc"),
                   compare_default=False, needs=_KFAC),
        MatrixSpec("kfac-empirical", "KFAC from the observed labels", _kfac("empirical"),
                   compare_default=False, needs=_KFAC),
        MatrixSpec("ekfac", "eigenvalue-corrected KFAC", _kfac("exact", ekfac=True),
                   needs=_KFAC),
    )
}
"""Every matrix by name, in the order result documents list them."""

MATRIX_NAMES = tuple(MATRICES)
"""Every matrix name, in registry order."""


def resolve_matrices(
    names: str | Sequence[str], *, approximations_only: bool = False
) -> list[str]:
    """Validate matrix names before any data is loaded; a comma-separated string is split.

    Args:
        names: names or one comma-separated string.
        approximations_only: refuse the Hessian itself (``compare`` candidates).

    Raises:
        OptionError: for an unknown or refused name, listing the valid ones, or none at all.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    items = [str(getattr(n, "value", n)).strip().lower() for n in names]
    items = [n for n in items if n]
    valid = [n for n, s in MATRICES.items() if s.approximates or not approximations_only]
    bad = [n for n in items if n not in valid]
    if bad:
        what = "cannot be compared with the Hessian" if approximations_only else "is not known"
        raise OptionError(
            f"{arg('matrices')} {','.join(bad)!r} {what}; choose from {', '.join(valid)}.",
            option="matrices",
        )
    if not items:
        raise OptionError(f"{arg('matrices')} needs at least one matrix name.", option="matrices")
    return list(dict.fromkeys(items))


def make_operator(
    name: str, problem: Problem, *, seed: int = 0, mc_samples: int = 1, hvp: str = "auto"
) -> CurvatureOperator:
    """Build the operator called ``name`` (one of :data:`MATRIX_NAMES`) for ``problem``.

    Args:
        name: matrix name.
        problem: model, loss, data and parameter selection.
        seed: seed of Monte-Carlo label draws (``fisher-mc``, ``kfac-mc``).
        mc_samples: labels drawn per sample for the Monte-Carlo matrices.
        hvp: how Hessian products are taken (``auto``, ``double-backward``,
            ``forward-over-reverse``, ``finite-difference``).

    Raises:
        OptionError: for an unknown name, listing the valid ones.
        UnsupportedModelError: when the matrix does not support the model, loss or mode; its
            ``matrix`` attribute is ``name``.
    """
    (key,) = resolve_matrices([name])
    try:
        op = MATRICES[key].build(problem, seed=seed, mc_samples=mc_samples, hvp=hvp)
    except UnsupportedModelError as exc:
        if getattr(exc, "matrix", None) != key:  # the registry's name is the one callers know
            exc.matrix = key
            exc.data["matrix"] = key
        raise
    op.name = key
    return op


def build_operators(
    problem: Problem,
    names: str | Sequence[str],
    *,
    seed: int = 0,
    mc_samples: int = 1,
    hvp: str = "auto",
    skip_unsupported: bool = False,
) -> tuple[dict[str, CurvatureOperator], list[dict[str, str]]]:
    """Build several matrices by name: ``({name: operator}, skipped)``.

    Args:
        problem: model, loss, data and parameter selection.
        names: matrix names (validated first).
        seed: seed of Monte-Carlo label draws.
        mc_samples: labels drawn per sample for the Monte-Carlo matrices.
        hvp: how Hessian products are taken.
        skip_unsupported: leave out a matrix the model does not support and record
            ``{"matrix", "reason"}`` instead of raising.

    Raises:
        UnsupportedModelError: for an unsupported matrix unless ``skip_unsupported``.
    """
    ops: dict[str, CurvatureOperator] = {}
    skipped: list[dict[str, str]] = []
    for name in resolve_matrices(names):
        try:
            ops[name] = make_operator(name, problem, seed=seed, mc_samples=mc_samples, hvp=hvp)
        except UnsupportedModelError as exc:
            if not skip_unsupported:
                raise
            skipped.append({"matrix": name, "reason": str(exc)})
    return ops, skipped


def report_matrices(preset: str) -> list[str]:
    """The matrices a report preset uses, in registry order."""
    return [n for n, s in MATRICES.items() if preset in s.report]


def compare_defaults() -> list[str]:
    """The approximations ``compare`` uses by default."""
    return [n for n, s in MATRICES.items() if s.compare_default]


def matrix_help() -> str:
    """One line per matrix for help texts."""
    return "; ".join(f"{s.name}: {s.summary}" for s in MATRICES.values())
