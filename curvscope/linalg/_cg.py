r"""Conjugate gradients (with preconditioning and curvature monitoring) and MINRES.

``cg`` solves :math:`A x = b` for symmetric positive definite :math:`A` (Hestenes & Stiefel
1952; preconditioned form as in Saad, *Iterative Methods for Sparse Linear Systems*, Alg. 9.1).
Every step records the curvature :math:`p_k^T A p_k` of its search direction, because the
solvers that use it (Newton-CG, Hessian-free, EA-CG) must know when the matrix is not positive
definite along the path: a value :math:`\le 0` stops the run with ``stop_reason =
"negative_curvature"`` and the offending direction (Steihaug 1983, Nocedal & Wright Alg. 7.1).

``minres`` solves symmetric *indefinite* systems by minimising :math:`\lVert b - A x_k\rVert`
over the Krylov space (Paige & Saunders 1975), optionally with a symmetric positive definite
preconditioner.

Both take a :class:`~curvscope.operators.CurvatureOperator`, a dense tensor, or any callable
``v -> A v`` on vectors ``[P]``; a preconditioner is a callable ``r -> M^{-1} r`` or an
operator that applies :math:`M^{-1}`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .._errors import NonFiniteError, OptionError
from ._inner import Inner, refuse_sharded

__all__ = ["CGResult", "MinresResult", "cg", "minres"]

Matvec = Callable[[torch.Tensor], torch.Tensor]
CGCallback = Callable[[int, torch.Tensor, float], "bool | None"]

STOP_REASONS = ("tolerance", "max_iter", "negative_curvature", "callback", "zero_rhs")
"""Why :func:`cg` stopped; ``"tolerance"`` and ``"zero_rhs"`` mean converged."""


@dataclass(frozen=True)
class CGResult:
    r"""The outcome of :func:`cg`.

    Attributes:
        x: the last iterate ``[P]`` (on negative curvature: the iterate *before* the step
            along the offending direction, as Newton-CG needs it).
        num_iters: CG steps taken (products with the search direction).
        num_matvecs: products with ``A`` (one per step, plus one for a nonzero ``x0``).
        residual_norm: :math:`\lVert r_k\rVert_2` of the recursively updated residual.
        converged: ``stop_reason`` is ``"tolerance"`` or ``"zero_rhs"``.
        stop_reason: one of :data:`STOP_REASONS`.
        negative_curvature: whether some :math:`p_k^T A p_k \le 0` was met.
        curvatures: :math:`p_k^T A p_k` of every search direction, in order (raw, not
            divided by :math:`\lVert p_k\rVert^2`); on negative curvature the last entry is
            the offending value.
        residual_norms: :math:`\lVert r_k\rVert_2` after every step, starting with ``r_0``.
        direction: the search direction with :math:`p^T A p \le 0` (``None`` otherwise).
    """

    x: torch.Tensor
    num_iters: int
    num_matvecs: int
    residual_norm: float
    converged: bool
    stop_reason: str
    negative_curvature: bool
    curvatures: list[float] = field(default_factory=list)
    residual_norms: list[float] = field(default_factory=list)
    direction: torch.Tensor | None = None


@dataclass(frozen=True)
class MinresResult:
    r"""The outcome of :func:`minres`.

    Attributes:
        x: the last iterate ``[P]``.
        num_iters: MINRES steps (one product with ``A`` each).
        num_matvecs: products with ``A`` (plus one for a nonzero ``x0``).
        residual_norm: :math:`\lVert b - A x\rVert` as tracked by the recurrence (in the
            :math:`M^{-1}` norm when preconditioned).
        converged: ``stop_reason`` is ``"tolerance"``, ``"least_squares"`` or ``"zero_rhs"``.
        stop_reason: ``"tolerance"`` (residual small), ``"least_squares"`` (``A r`` small: a
            singular, incompatible system has its least-squares solution), ``"max_iter"``,
            ``"callback"`` or ``"zero_rhs"``.
        norm_estimate: Frobenius-norm estimate of the Lanczos tridiagonal (a lower bound on
            :math:`\lVert A\rVert_F`).
        residual_norms: the tracked residual norm after every step, starting with ``r_0``.
    """

    x: torch.Tensor
    num_iters: int
    num_matvecs: int
    residual_norm: float
    converged: bool
    stop_reason: str
    norm_estimate: float
    residual_norms: list[float] = field(default_factory=list)


def _as_matvec(A) -> Matvec:
    if isinstance(A, torch.Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise OptionError(f"the solver needs a square matrix, got shape {tuple(A.shape)}.")
        return lambda v: A @ v
    if hasattr(A, "matvec"):
        return A.matvec
    if callable(A):
        return A
    raise OptionError(
        f"the solver needs an operator, a square tensor or a callable, got {type(A).__name__}."
    )


def _as_precond(M) -> Matvec | None:
    if M is None:
        return None
    return _as_matvec(M)


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"{what} holds NaN or Inf; the matrix or right-hand side overflows.")


def _prepare(
    b: torch.Tensor, x0, max_iter, tol, size: int | None = None
) -> tuple[torch.Tensor, int]:
    if b.dim() != 1:
        raise OptionError(f"the right-hand side must be a vector [P], got {tuple(b.shape)}.")
    if not tol > 0:
        raise OptionError(f"the solver tolerance must be positive, got {tol}.")
    n = b.shape[0] if size is None else size
    if max_iter is None:
        max_iter = 10 * n  # scipy.sparse.linalg's default for cg/minres
    if max_iter < 1:
        raise OptionError(f"the solver needs max_iter >= 1, got {max_iter}.")
    if x0 is not None and tuple(x0.shape) != tuple(b.shape):
        raise OptionError(f"x0 has shape {tuple(x0.shape)}, the right-hand side {tuple(b.shape)}.")
    return b, int(max_iter)


def cg(
    A,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int | None = None,
    preconditioner=None,
    negative_curvature: str = "stop",
    callback: CGCallback | None = None,
) -> CGResult:
    r"""(Preconditioned) conjugate gradients for :math:`A x = b`.

    Stops when :math:`\lVert r_k\rVert_2 \le \max(\mathrm{tol}\,\lVert b\rVert_2,
    \mathrm{atol})` (``"tolerance"``), after ``max_iter`` steps (``"max_iter"``), when a
    search direction has :math:`p_k^T A p_k \le 0` (``"negative_curvature"``, unless
    ``negative_curvature="continue"``; a zero curvature always stops since the step is
    undefined), or when ``callback(k, x_k, ||r_k||)`` returns ``True`` (``"callback"``).

    Args:
        A: symmetric operator, square tensor or callable ``v -> A v``.
        b: right-hand side ``[P]``.
        x0: start vector (default zero; a nonzero start costs one product).
        tol: relative residual tolerance.
        atol: absolute residual tolerance.
        max_iter: maximum steps (default ``10 P``, as scipy).
        preconditioner: ``r -> M^{-1} r`` (callable or operator) for PCG; ``M`` must be
            symmetric positive definite.
        negative_curvature: ``"stop"`` (default) or ``"continue"`` on :math:`p^T A p < 0`.
        callback: ``callback(k, x_k, residual_norm)`` after every step.

    Returns:
        A :class:`CGResult`.

    Raises:
        OptionError: for a non-vector ``b``, a bad tolerance or option.
        NonFiniteError: when the iteration produces NaN or Inf.
    """
    if negative_curvature not in ("stop", "continue"):
        raise OptionError(
            f"negative_curvature={negative_curvature!r} is not known; choose stop or continue."
        )
    matvec = _as_matvec(A)
    psolve = _as_precond(preconditioner)
    # a sharded operator (docs/sharded.md): b, x and every vector are this rank's rows, and
    # inner products and norms are summed over the ranks (the plain expressions otherwise)
    inner = Inner(A) if getattr(A, "reduce_inner", None) is not None else None
    if inner is None:
        def dot(u: torch.Tensor, v: torch.Tensor) -> float:
            return float(u @ v)

        def norm(u: torch.Tensor) -> float:
            return float(torch.linalg.vector_norm(u))
    else:
        def dot(u: torch.Tensor, v: torch.Tensor) -> float:
            return float(inner.reduce((u * v).sum().reshape(1))[0])

        def norm(u: torch.Tensor) -> float:
            return float(inner.norm(u))
    b, max_iter = _prepare(b, x0, max_iter, tol, None if inner is None else inner.size)
    matvecs = 0
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.to(b).clone()
        r = b - matvec(x)
        matvecs += 1
    bnorm = norm(b)
    threshold = max(tol * bnorm, atol)
    rnorm = norm(r)
    curvatures: list[float] = []
    rnorms = [rnorm]

    def result(k: int, reason: str, direction=None) -> CGResult:
        return CGResult(
            x=x,
            num_iters=k,
            num_matvecs=matvecs,
            residual_norm=rnorm,
            converged=reason in ("tolerance", "zero_rhs"),
            stop_reason=reason,
            negative_curvature=any(c <= 0 for c in curvatures),
            curvatures=curvatures,
            residual_norms=rnorms,
            direction=direction,
        )

    if bnorm == 0.0 and x0 is None:
        return result(0, "zero_rhs")
    if rnorm <= threshold:
        return result(0, "tolerance")
    z = r if psolve is None else psolve(r)
    rz = dot(r, z)
    if psolve is not None and not rz > 0:
        raise OptionError(
            "the preconditioner is not positive definite (r^T M^{-1} r <= 0); PCG needs an "
            "SPD preconditioner."
        )
    p = z.clone()
    for k in range(1, max_iter + 1):
        Ap = matvec(p)
        matvecs += 1
        pAp = dot(p, Ap)
        curvatures.append(pAp)
        if not math.isfinite(pAp):
            raise NonFiniteError("CG met a NaN or Inf curvature p^T A p; the product overflows.")
        if pAp == 0.0 or (pAp < 0 and negative_curvature == "stop"):
            return result(k - 1, "negative_curvature", p)
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rnorm = norm(r)
        rnorms.append(rnorm)
        if not math.isfinite(rnorm):
            raise NonFiniteError("CG produced a NaN or Inf residual.")
        if callback is not None and callback(k, x, rnorm):
            return result(k, "callback")
        if rnorm <= threshold:
            return result(k, "tolerance")
        z = r if psolve is None else psolve(r)
        rz_new = dot(r, z)
        beta = rz_new / rz
        rz = rz_new
        p = z + beta * p
    return result(max_iter, "max_iter")


def minres(
    A,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float = 1e-5,
    max_iter: int | None = None,
    preconditioner=None,
    shift: float = 0.0,
    callback: CGCallback | None = None,
) -> MinresResult:
    r"""MINRES for symmetric, possibly indefinite or singular :math:`(A - \sigma I) x = b`.

    Paige & Saunders (1975): Lanczos on :math:`A - \sigma I` (preconditioned by an SPD
    :math:`M`), QR of the tridiagonal by Givens rotations, and a three-term update of ``x``
    so that :math:`\lVert r_k\rVert` is minimal over the Krylov space. Stops when the tracked
    residual satisfies :math:`\lVert r_k\rVert \le \mathrm{tol}\,\lVert b\rVert`
    (``"tolerance"``), when :math:`\lVert A r_k\rVert \le \mathrm{tol}\,\lVert T_k\rVert_F
    \lVert r_k\rVert` (``"least_squares"``: a singular system without exact solution), after
    ``max_iter`` steps, or when ``callback`` returns ``True``.

    For a singular but consistent system (``b`` in the range of ``A``) started from zero the
    iterates stay in the range and converge to the minimum-norm solution. For a singular,
    *inconsistent* indefinite system plain MINRES (like scipy's) can let ``x`` grow without
    bound while the residual stalls at its least-squares value; MINRES-QLP (Choi, Paige &
    Saunders 2011) is the remedy and is not implemented here.

    Args:
        A: symmetric operator, square tensor or callable ``v -> A v``.
        b: right-hand side ``[P]``.
        x0: start vector (default zero).
        tol: relative residual tolerance.
        max_iter: maximum steps (default ``10 P``).
        preconditioner: ``r -> M^{-1} r`` with ``M`` symmetric positive definite.
        shift: :math:`\sigma` (solve the shifted system).
        callback: ``callback(k, x_k, residual_norm)`` after every step.

    Returns:
        A :class:`MinresResult`.

    Raises:
        OptionError: for a non-vector ``b``, a bad tolerance or an indefinite preconditioner.
        NonFiniteError: when the iteration produces NaN or Inf.
    """
    refuse_sharded(A, "a MINRES solve")
    matvec = _as_matvec(A)
    psolve = _as_precond(preconditioner)
    b, max_iter = _prepare(b, x0, max_iter, tol)
    eps = torch.finfo(b.dtype).eps
    matvecs = 0
    if x0 is None:
        x = torch.zeros_like(b)
        r1 = b.clone()
    else:
        x = x0.to(b).clone()
        r1 = b - (matvec(x) - shift * x)
        matvecs += 1
    y = r1 if psolve is None else psolve(r1)
    beta1_sq = float(r1 @ y)
    if beta1_sq < 0:
        raise OptionError("the MINRES preconditioner is not positive definite.")
    beta1 = math.sqrt(beta1_sq)
    if psolve is None:
        bnorm = float(torch.linalg.vector_norm(b))
    else:  # residuals are tracked in the M^{-1} norm, so measure b the same way
        bnorm = math.sqrt(max(float(b @ psolve(b)), 0.0))
    rnorms = [beta1]

    def result(k: int, reason: str, rnorm: float, tnorm: float) -> MinresResult:
        return MinresResult(
            x=x,
            num_iters=k,
            num_matvecs=matvecs,
            residual_norm=rnorm,
            converged=reason in ("tolerance", "least_squares", "zero_rhs"),
            stop_reason=reason,
            norm_estimate=tnorm,
            residual_norms=rnorms,
        )

    if beta1 == 0.0:
        return result(0, "zero_rhs" if bnorm == 0.0 else "tolerance", 0.0, 0.0)
    threshold = tol * bnorm
    if beta1 <= threshold:
        return result(0, "tolerance", beta1, 0.0)

    oldb, beta, dbar, epsln = 0.0, beta1, 0.0, 0.0
    phibar = beta1
    tnorm2 = 0.0
    cs, sn = -1.0, 0.0
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    r2 = r1
    for k in range(1, max_iter + 1):
        # Lanczos step: v_k = y / beta_k, new y = (A - shift I) v_k - ... (three-term).
        v = y / beta
        y = matvec(v) - shift * v
        matvecs += 1
        if k >= 2:
            y = y - (beta / oldb) * r1
        alpha = float(v @ y)
        y = y - (alpha / beta) * r2
        r1, r2 = r2, y
        y = r2 if psolve is None else psolve(r2)
        oldb = beta
        beta_sq = float(r2 @ y)
        if beta_sq < 0:
            raise OptionError("the MINRES preconditioner is not positive definite.")
        beta = math.sqrt(beta_sq)
        tnorm2 += alpha**2 + oldb**2 + beta**2
        # Apply the previous rotation, then build the next one to annihilate beta.
        oldeps = epsln
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsln = sn * beta
        dbar = -cs * beta
        root = math.hypot(gbar, dbar)
        gamma = max(math.hypot(gbar, beta), eps)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
        rnorm = abs(phibar)
        rnorms.append(rnorm)
        if not math.isfinite(rnorm) or not math.isfinite(alpha):
            raise NonFiniteError("MINRES produced NaN or Inf; the product overflows.")
        tnorm = math.sqrt(tnorm2)
        if callback is not None and callback(k, x, rnorm):
            return result(k, "callback", rnorm, tnorm)
        if rnorm <= threshold:
            return result(k, "tolerance", rnorm, tnorm)
        # ||A r_{k-1}|| = phibar_{k-1} * root; relative to ||A|| ||r||: root / ||T||.
        if tnorm > 0 and root / tnorm <= tol:
            return result(k, "least_squares", rnorm, tnorm)
        if beta <= eps * tnorm:
            # Lanczos breakdown: the Krylov space is invariant, the residual cannot shrink.
            return result(k, "least_squares", rnorm, tnorm)
    return result(max_iter, "max_iter", rnorm, tnorm)
