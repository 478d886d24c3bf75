r"""What every Lanczos solver here shares: the result type, the tolerance, Gram-Schmidt.

The one eigensolver is :func:`curvscope.linalg.eigsh` (thick-restart Lanczos, also
``curvscope.lanczos``); the restart-free ``eigenpairs``/``lanczos`` of earlier versions are
gone. The Lanczos relation :math:`A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^T` gives, for a Ritz pair
:math:`(\theta_i, y_i = Q_m s_i)` of the tridiagonal :math:`T_m`, the residual
:math:`\lVert A y_i - \theta_i y_i \rVert = \beta_m |e_m^T s_i|`. With full
reorthogonalisation the relation holds to round-off, so this estimate drives the stopping test
at no extra product; the residuals we report are then computed explicitly with one ``A @ Y``
(all requested vectors at once), so every eigenvalue printed comes with a measured residual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DEFAULT_TOL", "DGKS", "EigenResult", "orthogonalise"]

Progress = Callable[[int, int, str], None]

DEFAULT_TOL = 1e-4
"""Relative residual tolerance: converged when ||Av - lambda v|| <= tol * ||A||_2
(docs/DESIGN.md "Numerical policy")."""


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs at one end of the spectrum with their measured residuals.

    Attributes:
        which: ``"top"`` (descending), ``"bottom"`` (ascending) or ``"magnitude"``.
        method: ``"lanczos"`` or ``"power"``.
        eigenvalues: ``[k]`` float64.
        eigenvectors: ``[P, k]`` unit-norm columns in the operator's dtype.
        residual_norms: ``[k]`` absolute ``||A v - lambda v||``, measured with products, or
            bounded by the Lanczos relation verified with products (``residual_check``).
        converged: ``[k]`` bool: residual <= tol * norm_estimate.
        num_matvecs: products used, residual checks included.
        norm_estimate: ``||A||_2`` estimated by the largest ``|Ritz value|``.
        tol: the relative tolerance used.
        num_iters: Lanczos steps (or power iterations).
        shift: the shift ``s`` of ``A + s I`` for shifted power iteration, else ``None``.
        error_bounds: ``[k]`` float64 bounds on ``|lambda_true - lambda|`` (thick-restart
            :func:`~curvscope.linalg.eigsh`), else ``None``.
        restarts: basis restarts (thick-restart Lanczos), else 0.
        residual_check: ``"measured"`` (a product with every vector) or ``"relation"`` (the
            Lanczos relation's residuals, verified on random combinations of the vectors:
            :func:`~curvscope.linalg.eigsh`).
    """

    which: str
    method: str
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residual_norms: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    norm_estimate: float
    tol: float
    num_iters: int
    shift: float | None = None
    error_bounds: torch.Tensor | None = None
    restarts: int = 0
    residual_check: str = "measured"

    @property
    def all_converged(self) -> bool:
        """Whether every pair converged."""
        return bool(self.converged.all())


DGKS = 0.7071067811865476
"""A Gram-Schmidt pass that keeps more than this fraction (1/sqrt(2)) of the vector's norm
needs no second pass (the DGKS criterion, Daniel et al. 1976, as ARPACK uses it)."""


def orthogonalise(
    w: torch.Tensor, blocks: list[torch.Tensor], inner: Any = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Remove from ``w`` its components along orthonormal blocks; coefficients of the last.

    Classical Gram-Schmidt, repeated once when a pass removed most of ``w`` ("twice is
    enough", Giraud et al. 2005; a pass that kept more than :data:`DGKS` of the norm
    leaves ``w`` orthogonal to working precision). Each pass reads the whole basis, which
    dominates a step's cost beside the product on models with millions of parameters.
    ``inner``: a :class:`~curvscope.linalg._inner.Inner` for sharded vectors (inner
    products and norms summed over ranks); ``None``: plain local products.
    """
    if inner is not None and inner.sharded:
        dots, norm = inner.dots, inner.norm
    else:
        dots, norm = (lambda Q, x: Q.T @ x), torch.linalg.vector_norm
    coef = None
    for k in range(2):
        before = norm(w)
        for i, Q in enumerate(blocks):
            if Q.shape[1] == 0:
                continue
            c = dots(Q, w)
            w = w - Q @ c
            if i == len(blocks) - 1:
                coef = c if coef is None else coef + c
        if k == 0 and norm(w) > DGKS * before:
            break
    return w, coef
