"""Names the help texts list, as plain tuples: ``--help`` must not import torch.

The registries they mirror (:data:`curvscope.operators.MATRICES`,
:data:`curvscope.solvers.SOLVERS`, :data:`curvscope.diagnostics.COMPARE_MATRICES`) import
torch; ``tests/test_startup.py`` checks that these tuples equal them.
"""

from __future__ import annotations

__all__ = [
    "COMPARE_MATRICES",
    "EXAMPLE_NAMES",
    "MATRIX_HELP",
    "MATRIX_NAMES",
    "SOLVER_NAMES",
    "matrix_help",
    "matrix_names",
]

EXAMPLE_NAMES: tuple[str, ...] = (
    "digits-mlp",
    "digits-sigmoid",
    "digits-cnn",
    "sinus-mlp",
    "tiny-gpt",
    "lstm",
)
"""The example models (:data:`curvscope._examples.EXAMPLES`)."""

MATRIX_HELP: tuple[tuple[str, str], ...] = (
    ("hessian", "the exact Hessian of the loss"),
    ("ggn", "generalised Gauss-Newton J^T H_out J"),
    ("fisher", "Fisher, exact expectation over labels"),
    ("fisher-mc", "Fisher, Monte-Carlo labels (fixed seed)"),
    ("empirical-fisher", "outer products of per-sample gradients at the observed labels"),
    ("pch-abs", "Chen et al.'s positive-curvature Hessian, |eigenvalues|"),
    ("pch-clip", "PCH with negative eigenvalues clipped to 0"),
    ("pch-abs-persample", "PCH-1 from per-sample blocks"),
    ("pch-clip-persample", "PCH-2 from per-sample blocks"),
    ("kfac", "Kronecker-factored Fisher per layer (exact labels)"),
    ("kfac-mc", "KFAC with Monte-Carlo labels"),
    ("kfac-empirical", "KFAC from the observed labels"),
    ("ekfac", "eigenvalue-corrected KFAC"),
)
"""(name, summary) of every matrix, in registry order."""

MATRIX_NAMES: tuple[str, ...] = tuple(name for name, _ in MATRIX_HELP)
"""Every matrix name, in registry order."""

COMPARE_MATRICES: tuple[str, ...] = (
    "ggn",
    "fisher",
    "fisher-mc",
    "empirical-fisher",
    "pch-abs",
    "pch-clip",
    "pch-abs-persample",
    "pch-clip-persample",
    "kfac",
    "ekfac",
)
"""The approximations ``compare`` uses by default."""

SOLVER_NAMES: tuple[str, ...] = (
    "gd",
    "gd-armijo",
    "lbfgs",
    "nlcg",
    "newton-cg",
    "hf",
    "eacg",
    "eacg-clip",
    "mk",
    "mk-closed-form",
)
"""Every solver ``solve --solver`` knows."""


def matrix_names(value: str, *, approximations_only: bool = False) -> list[str]:
    """``--matrix`` checked before torch is imported (the registry checks it again later).

    Raises:
        OptionError: for an unknown or refused name, or none at all.
    """
    from .._errors import OptionError

    items = list(dict.fromkeys(n.strip().lower() for n in value.split(",") if n.strip()))
    valid = [n for n in MATRIX_NAMES if n != "hessian" or not approximations_only]
    bad = [n for n in items if n not in valid]
    if bad:
        what = "cannot be compared with the Hessian" if approximations_only else "is not known"
        raise OptionError(f"--matrix {','.join(bad)!r} {what}; choose from {', '.join(valid)}.")
    if not items:
        raise OptionError("--matrix needs at least one matrix name.")
    return items


def matrix_help() -> str:
    """One line per matrix for help texts."""
    return "; ".join(f"{name}: {summary}" for name, summary in MATRIX_HELP)
