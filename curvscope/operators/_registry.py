"""Matrix names (``--matrix``) and the one factory that builds an operator from a name."""

from __future__ import annotations

from .._errors import OptionError
from ..problem import Problem
from ._base import CurvatureOperator

__all__ = ["MATRIX_NAMES", "make_operator"]

MATRIX_NAMES = (
    "hessian",
    "ggn",
    "fisher",
    "fisher-mc",
    "empirical-fisher",
    "pch-abs",
    "pch-clip",
    "pch-abs-persample",
    "pch-clip-persample",
    "kfac",
    "kfac-mc",
    "kfac-empirical",
    "ekfac",
)
"""Every matrix ``--matrix`` accepts, in the order result documents list them."""


def make_operator(
    name: str, problem: Problem, *, seed: int = 0, mc_samples: int = 1
) -> CurvatureOperator:
    """Build the operator called ``name`` (one of :data:`MATRIX_NAMES`) for ``problem``.

    Args:
        name: matrix name.
        problem: model, loss, data and parameter selection.
        seed: seed of Monte-Carlo label draws (``fisher-mc``, ``kfac-mc``).
        mc_samples: labels drawn per sample for the Monte-Carlo matrices.

    Raises:
        OptionError: for an unknown name, listing the valid ones.
        UnsupportedModelError: when the matrix does not support the model, loss or mode.
    """
    from ._fisher import EmpiricalFisherOperator, FisherOperator
    from ._ggn import GGNOperator
    from ._hessian import HessianOperator
    from ._kfac import EKFACOperator, KFACOperator
    from ._pch import PCHOperator

    key = str(getattr(name, "value", name)).strip().lower()
    if key == "hessian":
        return HessianOperator(problem)
    if key == "ggn":
        return GGNOperator(problem)
    if key == "fisher":
        return FisherOperator(problem, kind="exact")
    if key == "fisher-mc":
        return FisherOperator(problem, kind="mc", mc_samples=mc_samples, seed=seed)
    if key == "empirical-fisher":
        return EmpiricalFisherOperator(problem)
    if key.startswith("pch-") and key in MATRIX_NAMES:
        mode = key.split("-")[1]
        approx = "per-sample" if key.endswith("-persample") else "expectation"
        return PCHOperator(problem, mode=mode, approximation=approx)
    if key in ("kfac", "kfac-mc", "kfac-empirical"):
        fisher_type = {"kfac": "exact", "kfac-mc": "mc", "kfac-empirical": "empirical"}[key]
        return KFACOperator(problem, fisher_type=fisher_type, mc_samples=mc_samples, seed=seed)
    if key == "ekfac":
        return EKFACOperator(problem)
    raise OptionError(f"--matrix {name!r} is not known; choose one of {', '.join(MATRIX_NAMES)}.")
