r"""Where the gradient lives: its fraction in the top-k eigenspace (Gur-Ari et al. 2018).

Gur-Ari, Roberts and Dyer ("Gradient Descent Happens in a Tiny Subspace", arXiv 1812.04754)
observed that after a short while the full-data gradient lies almost entirely in the span of
the top-k Hessian eigenvectors, k the number of classes. :func:`gradient_overlap` measures
:math:`\lVert \Pi_k g\rVert^2 / \lVert g\rVert^2` for any matrix and block, with the interval
the Ritz vectors' residuals allow (docs/DESIGN.md "Gradient overlap").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._errors import OptionError, arg
from ..linalg import DEFAULT_TOL, EigenResult, LinearOperator, as_operator, eigsh

__all__ = [
    "GradientOverlap",
    "block_gradient",
    "gradient_overlap",
    "overlap_from_ritz",
    "ritz_subspace_bound",
]


@dataclass(frozen=True)
class GradientOverlap:
    r"""One ``results.gradient_overlap`` entry.

    Attributes:
        matrix: the matrix name.
        block: the block (``"all"`` or a block name).
        k: eigenvectors spanning the subspace.
        fraction: :math:`\sum_{i \le k} (v_i^T g)^2 / \lVert g\rVert^2` with the Ritz vectors.
        error_bound: :math:`\min(1, \lVert R\rVert_F / \delta)`: the true fraction (with the
            exact top-k eigenspace) is within it (1: no bound, the gap is unknown).
        lower: ``max(0, fraction - error_bound)``.
        upper: ``min(1, fraction + error_bound)``.
        gap: :math:`\delta = \theta_k - (\theta_{k+1} + e_{k+1})`, or ``None`` when unknown.
        residual_norm: :math:`\lVert R\rVert_F = (\sum_{i \le k} r_i^2)^{1/2}`.
        grad_norm: :math:`\lVert g\rVert` of the block's part of the gradient.
        components: :math:`(v_i^T g)^2 / \lVert g\rVert^2` for ``i = 1..k``.
    """

    matrix: str
    block: str
    k: int
    fraction: float
    error_bound: float
    lower: float
    upper: float
    gap: float | None
    residual_norm: float
    grad_norm: float
    components: list[float]


def ritz_subspace_bound(
    eigenvalues: torch.Tensor,
    residual_norms: torch.Tensor,
    error_bounds: torch.Tensor | None,
    converged: torch.Tensor,
    lo: int,
    hi: int,
) -> tuple[float, float | None, float]:
    r"""A bound on :math:`\lVert VV^T - XX^T\rVert_2` for top Ritz vectors ``lo..hi-1``.

    ``eigenvalues`` are the top Ritz values, descending (0-based). ``V`` holds the Ritz
    vectors ``lo..hi-1``, ``X`` the exact eigenvectors of eigenvalues ``lo..hi-1``. Davis-Kahan
    (residual form): :math:`\lVert\sin\Theta\rVert_2 \le \lVert R\rVert_F / \delta` with
    :math:`\delta` the separation of the Ritz values :math:`[\theta_{hi-1}, \theta_{lo}]` from
    the other eigenvalues. Above: :math:`\lambda_{lo-1} \ge \theta_{lo-1}` (Cauchy interlacing
    of Rayleigh-Ritz values), so :math:`\theta_{lo-1} - \theta_{lo}`; below:
    :math:`\lambda_{hi} \le \theta_{hi} + e_{hi}` when pair ``hi`` converged (no eigenvalue
    missed, as for every Krylov bound), so :math:`\theta_{hi-1} - \theta_{hi} - e_{hi}`.

    Returns:
        ``(bound, gap, residual)``: ``min(1, ||R||_F / gap)`` (1 when the gap is unknown or
        not positive), the gap (``None`` when unknown) and :math:`\lVert R\rVert_F`.
    """
    m = int(eigenvalues.shape[0])
    theta = eigenvalues.detach().to("cpu", torch.float64)
    resid = residual_norms.detach().to("cpu", torch.float64)
    bounds = resid if error_bounds is None else error_bounds.detach().to("cpu", torch.float64)
    r_f = float(torch.linalg.vector_norm(resid[lo:hi]))
    gaps = []
    if lo > 0:
        gaps.append(float(theta[lo - 1] - theta[lo]))
    if hi < m and bool(converged[hi]):
        gaps.append(float(theta[hi - 1] - theta[hi] - bounds[hi]))
    else:
        gaps.append(None)
    gap = None if None in gaps else min(gaps)
    if gap is not None and not math.isfinite(gap):
        gap = None
    bound = 1.0 if gap is None or not gap > 0 else min(1.0, r_f / gap)
    return bound, gap, r_f


def overlap_from_ritz(
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    residual_norms: torch.Tensor,
    error_bounds: torch.Tensor | None,
    converged: torch.Tensor,
    gradient: torch.Tensor,
    k: int,
    *,
    matrix: str = "operator",
    block: str = "all",
) -> GradientOverlap:
    r"""The gradient's fraction in the span of the top ``k`` Ritz vectors, with its bound.

    With :math:`V = [v_1 \dots v_k]` the orthonormal Ritz vectors of the ``k`` largest Ritz
    values :math:`\theta_1 \ge \dots \ge \theta_k` (Rayleigh-Ritz: :math:`V^T A V =
    \mathrm{diag}(\theta)`) and :math:`R = AV - V\mathrm{diag}(\theta)` (its columns have the
    measured residual norms :math:`r_i`), the Davis-Kahan :math:`\sin\Theta` theorem in its
    residual form says: if every eigenvalue of :math:`A` outside the top-k eigenspace
    :math:`X_k` lies below :math:`\theta_k - \delta`, then
    :math:`\lVert \sin\Theta(V, X_k)\rVert_2 \le \lVert R\rVert_2/\delta \le
    \lVert R\rVert_F/\delta`. Because
    :math:`|g^T(VV^T - \Pi_k)g| \le \lVert VV^T - \Pi_k\rVert_2 \lVert g\rVert^2 =
    \lVert\sin\Theta\rVert_2 \lVert g\rVert^2`,

    .. math::
        \Bigl|\frac{\lVert V^T g\rVert^2}{\lVert g\rVert^2}
        - \frac{\lVert \Pi_k g\rVert^2}{\lVert g\rVert^2}\Bigr|
        \le \min\Bigl(1, \frac{(\sum_{i\le k} r_i^2)^{1/2}}{\delta}\Bigr),
        \qquad \delta = \theta_k - (\theta_{k+1} + e_{k+1}),

    with :math:`\lambda_{k+1} \le \theta_{k+1} + e_{k+1}` from the (k+1)-th Ritz pair and its
    error bound :math:`e_{k+1}` (its residual where no bound is known). That step assumes,
    as every Krylov error bound does, that no eigenvalue above :math:`\theta_{k+1}` was missed,
    and it is taken only when the (k+1)-th pair converged; otherwise, or when
    :math:`\delta \le 0` (a cluster across k), the bound is 1 and the interval is [0, 1].

    Args:
        eigenvalues: ``[m]`` top Ritz values, descending, ``m >= k`` (``k + 1`` for a bound).
        eigenvectors: ``[P, m]`` their unit Ritz vectors.
        residual_norms: ``[m]`` measured :math:`\lVert Av - \theta v\rVert`.
        error_bounds: ``[m]`` eigenvalue error bounds, or ``None`` (residuals are used).
        converged: ``[m]`` convergence flags.
        gradient: ``[P]`` the gradient (of the same block).
        k: the subspace dimension.
        matrix: name for the entry.
        block: block name for the entry.

    Raises:
        OptionError: for ``k`` outside ``1..m`` or a gradient of another length.
    """
    m = int(eigenvalues.shape[0])
    if not 1 <= k <= m:
        raise OptionError(
            f"{arg('gradient_overlap')} {k} needs 1 <= k <= {m}, the top pairs computed.",
            option="gradient_overlap",
        )
    g = gradient.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    V = eigenvectors[:, :k].detach().to(device="cpu", dtype=torch.float64)
    if g.shape[0] != V.shape[0]:
        raise OptionError(
            f"the gradient has {g.shape[0]} entries and the {matrix} block {block!r} "
            f"{V.shape[0]} rows.",
            option="gradient",
        )
    gnorm = float(torch.linalg.vector_norm(g))
    if gnorm == 0.0:
        comps = [0.0] * k
    else:
        comps = ((V.T @ g) / gnorm).pow(2).tolist()
    fraction = float(sum(comps))
    bound, gap, r_f = ritz_subspace_bound(
        eigenvalues, residual_norms, error_bounds, converged, 0, k
    )
    if gnorm == 0.0:
        bound = 1.0
    fraction_c = min(max(fraction, 0.0), 1.0)
    return GradientOverlap(
        matrix=matrix,
        block=block,
        k=int(k),
        fraction=fraction,
        error_bound=bound,
        lower=max(0.0, fraction_c - bound),
        upper=min(1.0, fraction_c + bound),
        gap=gap,
        residual_norm=r_f,
        grad_norm=gnorm,
        components=[float(c) for c in comps],
    )


def block_gradient(full: LinearOperator, block: str, gradient: torch.Tensor) -> torch.Tensor:
    """The part of a whole-operator ``gradient`` that belongs to ``full.block(block)``.

    Curvature operators slice by their problem's parameter names; a plain operator by the
    index set it was given for the block.

    Raises:
        OptionError: when the gradient's length is not the operator's.
    """
    g = gradient.reshape(-1)
    if g.shape[0] != full.shape[0]:
        raise OptionError(
            f"{arg('gradient')} has {g.shape[0]} entries; the {full.name} operator has "
            f"{full.shape[0]} rows.",
            option="gradient",
        )
    if block == "all":
        return g
    problem = getattr(full, "problem", None)
    if problem is not None:
        slices = problem.param_slices()
        parts = set(full.block_parts(block))  # a block's problem keeps the model's order
        return torch.cat([g[slices[n]] for n in problem.names if n in parts])
    index = full._blocks[block]  # noqa: SLF001 - the index set the block was built from
    return g[index]


def gradient_overlap(
    A: object,
    gradient: torch.Tensor,
    k: int,
    *,
    tol: float = DEFAULT_TOL,
    rtol: float | None = None,
    max_matvecs: int | None = None,
    basis_size: int | None = None,
    seed: int | torch.Generator = 0,
    v0: torch.Tensor | None = None,
    block: str = "all",
) -> tuple[GradientOverlap, EigenResult]:
    r""":math:`\lVert\Pi_k g\rVert^2/\lVert g\rVert^2` for the top-``k`` eigenspace of ``A``.

    Runs thick-restart Lanczos for the top ``k + 1`` pairs (the last one gives the gap) and
    calls :func:`overlap_from_ritz`, whose docstring states the bound.

    Args:
        A: a symmetric operator (anything :func:`curvscope.linalg.as_operator` takes).
        gradient: ``[P]`` the gradient, e.g. ``problem.loss_and_grad()[1]``.
        k: the subspace dimension (Gur-Ari et al. use the number of classes).
        tol: relative residual tolerance of the pairs.
        rtol: relative error-bound tolerance instead.
        max_matvecs: products at most.
        basis_size: Lanczos basis vectors at most.
        seed: start vector seed.
        v0: a start vector (or block) instead.
        block: the block name recorded in the entry.

    Returns:
        The entry and the Lanczos result of the ``k + 1`` top pairs.
    """
    op = as_operator(A)
    if k < 1 or k + 1 > op.shape[0]:
        raise OptionError(
            f"{arg('gradient_overlap')} {k} needs 1 <= k < {op.shape[0]}, the rows of the "
            "matrix (the (k+1)-th eigenvalue gives the gap).",
            option="gradient_overlap",
        )
    (res,) = eigsh(
        op,
        top=k + 1,
        tol=tol,
        rtol=rtol,
        max_matvecs=max_matvecs,
        basis_size=basis_size,
        seed=seed,
        v0=v0,
    )
    entry = overlap_from_ritz(
        res.eigenvalues,
        res.eigenvectors,
        res.residual_norms,
        res.error_bounds,
        res.converged,
        gradient,
        k,
        matrix=op.name,
        block=block,
    )
    return entry, res
