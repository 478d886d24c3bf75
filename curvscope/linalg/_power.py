r"""Power iteration with deflation (Suk thesis, Alg. 5), for comparison with Lanczos.

Plain power iteration converges to the eigenvalue of largest magnitude; deflation
:math:`A_i = A - \sum_{j<i} \lambda_j v_j v_j^T` gives the next ones. For the top (most
positive) or bottom (most negative) eigenvalues it runs on a shifted operator
:math:`\pm A + s I` with :math:`s` an estimate of :math:`\lVert A\rVert_2`, which makes the
wanted end the largest in magnitude; the result records the shift.
"""

from __future__ import annotations

import torch

from .._errors import OptionError
from .._sampling import as_generator
from ._inner import refuse_sharded
from ._lanczos import DEFAULT_TOL, EigenResult, Progress
from ._operator import LinearOperator, as_operator, require_square

__all__ = ["power_iteration"]

INNER_MARGIN = 0.1
"""Each pair iterates to ``INNER_MARGIN * tol`` so later, deflated pairs can reach ``tol``."""


def power_iteration(
    A: LinearOperator,
    k: int = 1,
    *,
    which: str = "magnitude",
    tol: float = DEFAULT_TOL,
    max_iter: int = 1000,
    seed: int | torch.Generator | None = 0,
    progress: Progress | None = None,
) -> EigenResult:
    r"""``k`` eigenpairs by power iteration with deflation (Suk Alg. 5).

    Each pair iterates until its residual :math:`\lVert A v - \lambda v\rVert` falls below
    ``tol / 10`` times the norm estimate (the first eigenvalue's magnitude, or the shift), or
    ``max_iter`` products for that pair. The margin is needed because deflated pairs inherit
    the residuals of the pairs removed before them; iterates are also kept orthogonal to them.

    Args:
        A: symmetric operator.
        k: number of eigenpairs.
        which: ``"magnitude"`` (largest |lambda|), ``"top"`` or ``"bottom"`` (shifted).
        tol: relative residual tolerance.
        max_iter: products per eigenpair at most.
        seed: an int or a torch.Generator: the random source for start vectors.
        progress: ``progress(completed, total, description)``.

    Raises:
        OptionError: for an unknown ``which`` or ``k`` out of range.
    """
    A = as_operator(A)
    refuse_sharded(A, "power iteration")
    require_square(A, "power iteration")
    n = A.shape[0]
    if which not in ("magnitude", "top", "bottom"):
        raise OptionError(f"which={which!r} is not known; choose magnitude, top or bottom.")
    if not 1 <= k <= n:
        raise OptionError(f"power iteration needs 1 <= k <= {n}, got {k}.")
    gen = as_generator(seed)
    matvecs = 0
    shift = None
    sign = 1.0
    if which != "magnitude":
        first = power_iteration(
            A, 1, which="magnitude", tol=tol, max_iter=max_iter, seed=gen
        )
        matvecs += first.num_matvecs
        shift = float(first.eigenvalues[0].abs())
        sign = 1.0 if which == "top" else -1.0
    lambdas: list[float] = []
    vectors: list[torch.Tensor] = []
    residuals: list[float] = []
    norm_est = shift or 0.0
    total_iters = 0
    for i in range(k):
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(A.device, A.dtype)
        v = v / torch.linalg.vector_norm(v)
        lam, res = 0.0, float("inf")
        for _ in range(max_iter):
            av = A @ v
            matvecs += 1
            total_iters += 1
            # the shifted, deflated operator B = sign*A + shift*I - sum_j mu_j v_j v_j^T
            bv = sign * av + (shift or 0.0) * v
            for lj, vj in zip(lambdas, vectors, strict=True):
                mu = sign * lj + (shift or 0.0)
                bv = bv - mu * (vj @ v) * vj
            lam = float(v @ av)
            res = float(torch.linalg.vector_norm(av - lam * v))
            if i == 0 and shift is None:
                norm_est = max(norm_est, abs(lam))
            # Each pair is driven to tol/10: a deflated pair's residual on A cannot drop below
            # the residuals of the pairs deflated before it, so they need the margin.
            if res <= INNER_MARGIN * tol * max(norm_est, abs(lam), 1e-300):
                break
            for vj in vectors:
                bv = bv - (vj @ bv) * vj
            nb = torch.linalg.vector_norm(bv)
            if nb == 0:
                break
            v = bv / nb
            if progress is not None:
                progress(i, k, f"power iteration (pair {i + 1}/{k})")
        lambdas.append(lam)
        vectors.append(v)
        residuals.append(res)
    vals = torch.tensor(lambdas, dtype=torch.float64)
    order = torch.argsort(vals, descending=which != "bottom")
    if which == "magnitude":
        order = torch.argsort(vals.abs(), descending=True)
    resid = torch.tensor(residuals, dtype=torch.float64)[order]
    norm_est = max(norm_est, float(vals.abs().max()))
    return EigenResult(
        which,
        "power",
        vals[order],
        torch.stack(vectors, dim=1)[:, order],
        resid,
        resid <= tol * norm_est,
        matvecs,
        norm_est,
        tol,
        total_iters,
        shift,
    )
