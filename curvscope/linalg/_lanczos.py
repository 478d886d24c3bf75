r"""Lanczos with full reorthogonalisation, and extreme eigenpairs with certified residuals.

The Lanczos relation :math:`A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^T` gives, for a Ritz pair
:math:`(\theta_i, y_i = Q_m s_i)` of the tridiagonal :math:`T_m`, the residual
:math:`\lVert A y_i - \theta_i y_i \rVert = \beta_m |e_m^T s_i|`. With full
reorthogonalisation the relation holds to round-off, so this estimate drives the stopping test
at no extra product; the residuals we report are then computed explicitly with one ``A @ Y``
(all requested vectors at once), so every eigenvalue printed comes with a measured residual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._errors import OptionError, arg
from .._sampling import as_generator
from ._operator import LinearOperator, as_operator, require_square

__all__ = ["EigenResult", "LanczosResult", "eigenpairs", "lanczos"]

Progress = Callable[[int, int, str], None]

DEFAULT_TOL = 1e-4
"""Relative residual tolerance: converged when ||Av - lambda v|| <= tol * ||A||_2
(docs/DESIGN.md "Numerical policy")."""


@dataclass(frozen=True)
class LanczosResult:
    """The Lanczos tridiagonal matrix and basis.

    Attributes:
        alphas: diagonal of ``T`` (float64, ``[m]``).
        betas: off-diagonal of ``T`` followed by the last residual norm ``beta_m``
            (float64, ``[m]``; ``betas[:-1]`` are the off-diagonal entries).
        basis: orthonormal Lanczos vectors ``[P, m]`` in the operator's dtype.
        num_matvecs: products used.
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    basis: torch.Tensor
    num_matvecs: int

    def tridiagonal(self) -> torch.Tensor:
        """The symmetric tridiagonal matrix ``T_m`` in float64."""
        m = self.alphas.shape[0]
        t = torch.diag(self.alphas)
        if m > 1:
            off = self.betas[: m - 1]
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        return t


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs at one end of the spectrum with their measured residuals.

    Attributes:
        which: ``"top"`` (descending), ``"bottom"`` (ascending) or ``"magnitude"``.
        method: ``"lanczos"`` or ``"power"``.
        eigenvalues: ``[k]`` float64.
        eigenvectors: ``[P, k]`` unit-norm columns in the operator's dtype.
        residual_norms: ``[k]`` absolute ``||A v - lambda v||`` (measured with products).
        converged: ``[k]`` bool: residual <= tol * norm_estimate.
        num_matvecs: products used, residual checks included.
        norm_estimate: ``||A||_2`` estimated by the largest ``|Ritz value|``.
        tol: the relative tolerance used.
        num_iters: Lanczos steps (or power iterations).
        shift: the shift ``s`` of ``A + s I`` for shifted power iteration, else ``None``.
        error_bounds: ``[k]`` float64 bounds on ``|lambda_true - lambda|`` (thick-restart
            :func:`~curvscope.linalg.eigsh`), else ``None``.
        restarts: basis restarts (thick-restart Lanczos), else 0.
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

    @property
    def all_converged(self) -> bool:
        """Whether every pair converged."""
        return bool(self.converged.all())


def _start_vector(n: int, A: LinearOperator, v0, gen: torch.Generator) -> torch.Tensor:
    if v0 is None:
        v0 = torch.randn(n, generator=gen, dtype=torch.float64)
    v = v0.to(device=A.device, dtype=A.dtype).reshape(-1)
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        raise OptionError("the Lanczos start vector is zero.")
    return v / norm


DGKS = 0.7071067811865476
"""A Gram-Schmidt pass that keeps more than this fraction (1/sqrt(2)) of the vector's norm
needs no second pass (the DGKS criterion, Daniel et al. 1976, as ARPACK uses it)."""


def orthogonalise(
    w: torch.Tensor, blocks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Remove from ``w`` its components along orthonormal blocks; coefficients of the last.

    Classical Gram-Schmidt, repeated once when a pass removed most of ``w`` ("twice is
    enough", Giraud et al. 2005; a pass that kept more than :data:`DGKS` of the norm
    leaves ``w`` orthogonal to working precision). Each pass reads the whole basis, which
    dominates a step's cost beside the product on models with millions of parameters.
    """
    coef = None
    for k in range(2):
        before = torch.linalg.vector_norm(w)
        for i, Q in enumerate(blocks):
            if Q.shape[1] == 0:
                continue
            c = Q.T @ w
            w = w - Q @ c
            if i == len(blocks) - 1:
                coef = c if coef is None else coef + c
        if k == 0 and torch.linalg.vector_norm(w) > DGKS * before:
            break
    return w, coef


def lanczos(
    A: LinearOperator,
    num_iters: int,
    *,
    v0: torch.Tensor | None = None,
    seed: int | torch.Generator | None = 0,
    callback: Callable[[LanczosResult], bool] | None = None,
) -> LanczosResult:
    """Run ``num_iters`` Lanczos steps with full reorthogonalisation.

    Stops early on breakdown (``beta`` at round-off: the Krylov space is invariant, and the
    Ritz values are exact eigenvalues) or when ``callback`` returns ``True``.

    Args:
        A: a symmetric operator (or anything with ``shape``, ``dtype``, ``device`` and ``@``).
        num_iters: maximum number of steps (at most ``P``).
        v0: start vector (default: Gaussian from ``seed``).
        seed: an int or a torch.Generator: the random source for the start vector.
        callback: called after every step with the current result; return ``True`` to stop.
    """
    A = as_operator(A)
    n = A.shape[0]
    m_max = min(int(num_iters), n)
    if m_max < 1:
        raise OptionError("Lanczos needs at least one step.")
    q = _start_vector(n, A, v0, as_generator(seed))
    Q = torch.empty(m_max, n, dtype=A.dtype, device=A.device).T  # column-major, see eigsh
    alphas: list[float] = []
    betas: list[float] = []
    eps = torch.finfo(A.dtype).eps
    scale = 0.0
    result = None
    for j in range(m_max):
        Q[:, j] = q
        w = A @ q
        alpha = float(q @ w)
        w, _ = orthogonalise(w, [Q[:, : j + 1]])
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        betas.append(beta)
        scale = max(scale, abs(alpha) + beta)
        result = LanczosResult(
            torch.tensor(alphas, dtype=torch.float64),
            torch.tensor(betas, dtype=torch.float64),
            Q[:, : j + 1],
            j + 1,
        )
        if callback is not None and callback(result):
            break
        if beta <= 10 * eps * max(scale, 1e-300) * (j + 1) ** 0.5:
            break
        q = w / beta
    return result


def _ritz(result: LanczosResult) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz values (ascending), eigenvectors of T, and residual estimates."""
    theta, S = torch.linalg.eigh(result.tridiagonal())
    est = (result.betas[-1] * S[-1, :]).abs()
    return theta, S, est


def _select(theta: torch.Tensor, top: int, bottom: int) -> tuple[list[int], list[int]]:
    """Indices of the wanted Ritz values: largest first (descending), smallest (ascending)."""
    m = theta.shape[0]
    top_idx = list(range(m - 1, m - 1 - min(top, m), -1))
    bottom_idx = list(range(min(bottom, m)))
    return top_idx, bottom_idx


def eigenpairs(
    A: LinearOperator,
    *,
    top: int = 5,
    bottom: int = 0,
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    seed: int | torch.Generator | None = 0,
    v0: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> list[EigenResult]:
    r"""The ``top`` largest and ``bottom`` smallest eigenpairs of a symmetric operator.

    One Lanczos run serves both ends. After every step the Ritz residual estimates are
    checked; the run stops when every requested pair satisfies
    :math:`\lVert A y - \theta y\rVert \le \mathrm{tol}\,\lVert A\rVert_2` (``||A||_2``
    estimated by the largest ``|Ritz value|``), at breakdown, at ``max_iter`` or at ``P`` steps.
    The reported residuals are then measured with one product with all requested vectors.

    Args:
        A: symmetric operator.
        top: number of largest eigenvalues (descending in the result).
        bottom: number of smallest eigenvalues (ascending in the result).
        tol: relative residual tolerance (docs/DESIGN.md "Numerical policy", default 1e-4).
        max_iter: maximum Lanczos steps (default ``min(P, max(100, 10 (top + bottom)))``).
        seed: an int or a torch.Generator: the random source for the start vector.
        v0: optional start vector.
        progress: ``progress(completed, total, description)`` after every step.

    Returns:
        A list with the ``top`` result first (if requested) and then the ``bottom`` one.

    Raises:
        OptionError: when nothing or more eigenvalues than ``P`` are requested.
    """
    A = as_operator(A)
    require_square(A, "Lanczos")
    n = A.shape[0]
    k = top + bottom
    if top < 0 or bottom < 0 or k == 0:
        raise OptionError(
            f"ask for at least one eigenvalue ({arg('top')} or {arg('bottom')} >= 1)."
        )
    if k > n:
        raise OptionError(
            f"{arg('top')} {top} and {arg('bottom')} {bottom} ask for {k} eigenvalues of a "
            f"matrix with only {n} rows."
        )
    max_iter = min(n, max_iter if max_iter is not None else max(100, 10 * k))
    if max_iter < k:
        raise OptionError(
            f"{arg('max_iter')} {max_iter} is smaller than the {k} eigenvalues requested."
        )

    def done(res: LanczosResult) -> bool:
        m = res.alphas.shape[0]
        if progress is not None:
            progress(m, max_iter, "Lanczos")
        if m < k:
            return False
        theta, _, est = _ritz(res)
        norm = float(theta.abs().max())
        top_idx, bottom_idx = _select(theta, top, bottom)
        wanted = top_idx + bottom_idx
        return bool((est[wanted] <= tol * max(norm, 1e-300)).all())

    res = lanczos(A, max_iter, v0=v0, seed=seed, callback=done)
    theta, S, _ = _ritz(res)
    norm = float(theta.abs().max())
    top_idx, bottom_idx = _select(theta, top, bottom)
    idx = top_idx + bottom_idx
    Y = res.basis @ S[:, idx].to(res.basis.dtype)
    Y = Y / torch.linalg.vector_norm(Y, dim=0, keepdim=True)
    AY = A @ Y
    vals = theta[idx]
    resid = torch.linalg.vector_norm(
        AY.to(torch.float64) - Y.to(torch.float64) * vals.unsqueeze(0), dim=0
    ).cpu()
    # Rayleigh quotients of the normalised vectors agree with the Ritz values to round-off;
    # keep the Ritz values, which are what the residuals above were measured against.
    matvecs = res.num_matvecs + len(idx)
    converged = resid <= tol * max(norm, 1e-300)
    out = []
    if top:
        t = slice(0, len(top_idx))
        out.append(
            EigenResult(
                "top",
                "lanczos",
                vals[t].cpu(),
                Y[:, t],
                resid[t],
                converged[t],
                matvecs,
                norm,
                tol,
                res.num_matvecs,
            )
        )
    if bottom:
        b = slice(len(top_idx), len(idx))
        out.append(
            EigenResult(
                "bottom",
                "lanczos",
                vals[b].cpu(),
                Y[:, b],
                resid[b],
                converged[b],
                matvecs,
                norm,
                tol,
                res.num_matvecs,
            )
        )
    return out
