r"""Thick-restart Lanczos (Wu & Simon 2000) for both ends of a symmetric spectrum.

K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems",
SIAM J. Matrix Anal. Appl. 22(2), 2000. The basis holds at most ``m`` vectors
:math:`V_m` with :math:`A V_m = V_m T_m + \beta_m v_{m+1} e_m^T`, kept orthonormal by
classical Gram-Schmidt applied twice. When it is full, the Ritz pairs
:math:`(\theta_i, V_m s_i)` of :math:`T_m` are computed and the best ones at *both* ends are
kept (the wanted ``top`` largest and ``bottom`` smallest plus buffer vectors); the relation
then reads :math:`A Y = Y \Theta + v_{m+1} (\beta_m S_{m,:})`, so after the restart

.. math::

    T = \begin{pmatrix} \Theta & \beta_m s \\ \beta_m s^T & \alpha & \beta \\
        & \beta & \ddots \end{pmatrix}

is an arrowhead matrix followed by the usual tridiagonal continuation. This is the same
subspace as ARPACK's implicit restart with exact shifts, obtained without QR sweeps. How many
vectors each end keeps is chosen at every restart (:func:`_keep_counts`): keeping the
converged outliers of the other end deflates them, which halved the products for the bottom
end of an MLP Hessian.

For every Ritz pair the relation gives the residual
:math:`\lVert A y_i - \theta_i y_i \rVert = \beta_m |e_m^T s_i|` without a product; full
reorthogonalisation keeps it exact to round-off. At the end one product ``A @ Y`` with all
requested vectors measures the residuals and the Rayleigh quotients that are reported. When
that check fails a pair whose estimate passed (products that do not quite fit the relation:
float32 round-off on millions of parameters, an operator not exactly symmetric), the estimates
are trusted that much less and the iteration goes on, measuring again within one basis cycle,
for as long as each check at least halves the worst measured residual.

Breakdown (:math:`\beta` at round-off) means the basis spans an invariant subspace, whose
Ritz pairs are exact. A single Krylov sequence sees one vector of each eigenspace, so the
best of those pairs are locked (kept aside, at most ``top + bottom`` of them) and the search
goes on from a fresh random vector orthogonal to what was found, until a fresh search no
longer improves the wanted set: repeated eigenvalues then come out with their multiplicity.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._errors import Interrupted, NonFiniteError, OptionError, arg
from .._options import parse_basis_device
from .._sampling import as_generator
from ._inner import Inner
from ._lanczos import DEFAULT_TOL, EigenResult, orthogonalise
from ._operator import as_operator

__all__ = ["basis_storage", "eigsh", "restart_in_place"]

Progress = Callable[[int, int, str], None]

BREAKDOWN = 20.0
r"""Breakdown at least when :math:`\beta \le` ``BREAKDOWN`` :math:`\varepsilon \sqrt{P}\,
\lVert A\rVert`, the round-off of a product: at the invariant step of matrices with four
distinct eigenvalues, :math:`\beta / \lVert A v\rVert` was 2-12 such units (P = 100..1000,
float32 and float64). A breakdown declared on a larger :math:`\beta` costs only products:
pairs that do not pass the test are not locked, and the fresh search finds them again."""

_BASIS_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "curvscope_basis_device", default=None
)


@contextlib.contextmanager
def basis_placement(device: str | None) -> Iterator[None]:
    """Within the block, :func:`eigsh` calls given no ``basis_device`` use ``device``.

    The command line's ``--basis-device`` for commands whose eigensolves run deep inside
    the library (``check``, ``compare``, ``surface``, ``report``): the memory plan priced
    the basis there, so the runs put it there. ``None`` leaves the default (the operator's
    device).
    """
    token = _BASIS_DEVICE.set(device)
    try:
        yield
    finally:
        _BASIS_DEVICE.reset(token)


ROUNDOFF = 4.0
r"""Error bounds are at least ``ROUNDOFF`` :math:`\varepsilon \sqrt{P}\,\lVert A\rVert`, the
round-off of the Rayleigh quotient of one product in the operator's dtype (a float64 matrix
with ``P = 200`` gave Rayleigh quotients 1.2e-14 from ``eigvalsh``, 2.5 such units)."""

BREAKDOWN_TOL = 1e-3
r"""Breakdown also when :math:`\beta \le \min(` ``BREAKDOWN_TOL`` ``tol``,
:math:`\sqrt{\varepsilon}) \lVert A\rVert`. The products themselves carry round-off well above
:math:`\varepsilon \lVert A\rVert` (a float64 matrix with 4 distinct eigenvalues gave
:math:`\beta = 1.9 \cdot 10^{-14} \lVert A\rVert` at step 4, where the Krylov space is
invariant), and a :math:`\beta` this small means the pairs are exact far below the tolerance.
Continuing from the normalised round-off instead would never see the breakdown, and missed the
multiplicities that the fresh searches after a breakdown find."""


BASIS_BUDGET = 2**30
"""Bytes the default basis may take (1 GiB): 80 vectors of 3.3M float32 parameters."""

PREFERRED_BASIS = 80
"""Basis vectors wanted when memory allows: unrestarted runs on the example Hessians took
47-75 steps for top-5 and bottom-2, so most runs then finish without a restart, in as few
products as plain Lanczos (with 20 vectors, top-1 and bottom-1 of a 9k-parameter MLP took
72-120 products against 47-63)."""


def default_basis_size(k: int, n: int, *, itemsize: int = 4, budget: int = BASIS_BUDGET) -> int:
    """The basis size from the pairs asked for and a memory budget.

    ``max(PREFERRED_BASIS, 2 k + 10)`` vectors where ``budget`` bytes hold them, else as many
    as fit but never fewer than ``2 k + 10`` (twice the wanted pairs plus 10 leaves as many
    buffer Ritz vectors as wanted ones; 20 is ARPACK's ``ncv`` for small ``k``); at most ``n``.
    """
    floor = max(20, 2 * k + 10)
    fit = int(budget // max(1, n * itemsize))
    return min(n, max(floor, min(max(PREFERRED_BASIS, floor), fit)))


RESTART_BLOCK = 2**24
"""Bytes of the temporary a restart forms its kept Ritz vectors in, a block of rows at a time
(16 MiB): the whole ``P x p`` product beside the basis was 0.65 bases more at the peak."""


def restart_in_place(V: torch.Tensor, m: int, Sk: torch.Tensor) -> None:
    """``V[:, :p] = V[:, :m] @ Sk`` a block of rows at a time (``p`` columns of ``Sk``).

    Row ``i`` of the new columns depends only on row ``i`` of the old ones, so each block is
    overwritten once its product is formed: the temporary is :data:`RESTART_BLOCK` bytes,
    not ``P x p`` (and on a disk basis, RAM holds one block, not the kept vectors).
    """
    n, p = V.shape[0], Sk.shape[1]
    rows = max(1, RESTART_BLOCK // max(1, p * V.element_size()))
    for r in range(0, n, rows):
        V[r : r + rows, :p] = V[r : r + rows, :m] @ Sk


@contextlib.contextmanager
def basis_storage(
    columns: int, n: int, dtype: torch.dtype, device: torch.device, disk: str | None = None
) -> Iterator[torch.Tensor]:
    """A zero ``n x columns`` basis, column-major, on ``device`` or memory-mapped in ``disk``.

    ``disk``: a folder; the basis is the raw file ``curvscope-basis-*.bin`` there
    (``columns x n`` values of ``dtype``, one vector after the other), its space reserved up
    front (a full disk is an error here, not a SIGBUS at some write), mapped shared, and
    unlinked at once where the system allows it, so that nothing is left behind even when the
    process is killed (the space is freed with the mapping); else removed on exit.

    Raises:
        OptionError: when the folder has no room for the file.
    """
    if disk is None:
        yield torch.zeros(columns, n, dtype=dtype, device=device).T
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = columns * n * itemsize
    fd, path = tempfile.mkstemp(prefix="curvscope-basis-", suffix=".bin", dir=disk)
    left: str | None = path
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:  # pragma: no cover - not POSIX
                os.ftruncate(fd, size)
        except OSError as e:
            raise OptionError(
                f"{arg('basis_device')} disk:{disk} has no room for the basis's "
                f"{size / 1e9:.3g} GB ({e.strerror}); free space or give another folder.",
                option="basis_device",
            ) from None
        finally:
            os.close(fd)
        flat = torch.from_file(path, shared=True, size=columns * n, dtype=dtype)
        with contextlib.suppress(OSError):
            os.unlink(path)  # the mapping keeps the file until it goes
            left = None
        yield flat.view(columns, n).T
    finally:
        if left is not None:
            with contextlib.suppress(OSError):
                os.unlink(left)


def default_max_matvecs(k: int, n: int) -> int:
    """``max(300, 20 k)`` products, at most ``max(20 n, 2 k)``.

    Products counted per column, the final check included. 20 n is far more than the ``n``
    steps after which an unrestarted Lanczos spans the whole space, so the cap only keeps
    tiny matrices from a pointless budget.
    """
    return min(max(300, 20 * k), max(20 * n, 2 * k))


def _start(
    v0: torch.Tensor | None, n: int, gen: torch.Generator, inner: Inner | None = None
) -> torch.Tensor:
    """The start vector in float64 on the CPU: ``v0`` (its columns summed) or Gaussian.

    Sharded (``inner``): ``v0`` is this rank's rows; the Gaussian is this rank's rows of the
    full draw (:meth:`Inner.randn`).
    """
    if v0 is None:
        if inner is not None and inner.sharded:
            return inner.randn(gen)
        return torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.as_tensor(v0).detach().to("cpu", torch.float64)
    if v.ndim == 2 and v.shape[0] == n:
        v = v.sum(dim=1)
    if v.ndim != 1 or v.shape[0] != n:
        raise OptionError(
            f"{arg('v0')} has shape {tuple(v0.shape)}; a start vector needs shape [{n}] or "
            f"[{n}, j]."
        )
    if inner is not None and inner.sharded:
        ok = inner.all_true(bool(torch.isfinite(v).all())) and float(inner.norm(v)) != 0.0
    else:
        ok = bool(torch.isfinite(v).all()) and float(torch.linalg.vector_norm(v)) != 0.0
    if not ok:
        raise OptionError(f"{arg('v0')} sums to zero or is not finite; give another start.")
    return v


def _pick(values: torch.Tensor, top: int, bottom: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``top`` largest (descending) and ``bottom`` smallest (ascending)."""
    order = torch.argsort(values)
    t = min(top, values.shape[0])
    b = min(bottom, values.shape[0] - t)
    return order.flip(0)[:t], order[:b]


def _error_bounds(
    values: torch.Tensor,
    resid: torch.Tensor,
    *,
    resolved: torch.Tensor,
    side: torch.Tensor,
    complete: bool,
    floor: float,
) -> torch.Tensor:
    r"""An error bound for every value, against all the others.

    Each value :math:`\theta_i` with residual :math:`r_i` has an eigenvalue within
    :math:`r_i`. Values closer than the sum of their residuals form a cluster; when the rest
    of the spectrum is :math:`\delta` away from :math:`\theta_i`, the Kato-Temple bound
    :math:`R^2/\delta` (:math:`R^2` the cluster's summed squared residuals) is sharper when
    :math:`\delta > R`. On each side, :math:`\delta` is the distance to the nearest value
    outside the cluster less that value's residual, but only if that value is ``resolved``
    (converged): an unconverged Ritz value stands for a part of the spectrum the basis has not
    resolved, whose eigenvalues may lie closer (a Ritz vector mixing many eigenvectors has
    some of them several residuals away). A side without values is empty on the outer side of
    an end (``side`` +1: the top end, nothing above; -1: the bottom end, nothing below) and
    unknown towards the middle unless the values cover the whole space (``complete``). An
    unknown gap, or a cluster with an unconverged member, leaves :math:`r_i`. ``floor`` is the
    round-off of one product in the operator's dtype.
    """
    n = values.shape[0]
    if n == 0:
        return values.clone()
    order = torch.argsort(values)
    v, r, ok, sd = values[order], resid[order], resolved[order], side[order]
    cluster = torch.zeros(n, dtype=torch.long)
    if n > 1:
        split = (v[1:] - v[:-1]) > (r[1:] + r[:-1])
        cluster[1:] = torch.cumsum(split.long(), 0)
    bounds = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        inside = (cluster == cluster[i]).nonzero()[:, 0]
        lo, hi = int(inside[0]), int(inside[-1])
        b = float(r[i])
        gaps = []
        for j, outer, inward in (
            (hi + 1, int(sd[i]) == 1, hi + 1 < n),
            (lo - 1, int(sd[i]) == -1, lo > 0),
        ):
            if not inward:
                gaps.append(math.inf if outer or complete else 0.0)
            elif bool(ok[j]):
                gaps.append(float((v[j] - v[i]).abs() - r[j]))
            else:
                gaps.append(0.0)
        gap = min(gaps)
        if bool(ok[inside].all()) and gap > 0:
            b = min(b, float((r[inside] ** 2).sum()) / gap)
        bounds[i] = max(b, floor)
    out = torch.empty_like(bounds)
    out[order] = bounds
    return out


def _sides(n: int, top_idx: torch.Tensor, bottom_idx: torch.Tensor) -> torch.Tensor:
    """+1 for the top picks, -1 for the bottom picks, 0 elsewhere."""
    side = torch.zeros(n, dtype=torch.long)
    side[top_idx] = 1
    side[bottom_idx] = -1
    return side


def eigsh(
    A: Any,
    *,
    top: int = 5,
    bottom: int = 0,
    tol: float = DEFAULT_TOL,
    rtol: float | None = None,
    basis_size: int | None = None,
    max_matvecs: int | None = None,
    v0: torch.Tensor | None = None,
    seed: int | torch.Generator = 0,
    basis_device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> list[EigenResult]:
    r"""The ``top`` largest and ``bottom`` smallest eigenpairs by thick-restart Lanczos.

    Memory is bounded by ``basis_size`` vectors (plus the next Lanczos vector, up to
    ``top + bottom`` locked vectors after a breakdown, and the Ritz vectors formed at a
    restart). The iteration stops when every requested pair passes its test on the residual
    estimate of the Lanczos relation, or when ``max_matvecs`` would be exceeded; then one
    product with all ``k = top + bottom`` Ritz vectors measures what is reported:

    - eigenvalues: Rayleigh quotients :math:`y^T A y` accumulated in float64 (in float32 the
      Ritz values were seen 2e-5..8e-5 above the truth, the Rayleigh quotients within 1e-6);
    - residual norms :math:`\lVert A y - \lambda y\rVert` and ``converged`` flags from them:
      residual :math:`\le` ``tol`` :math:`\lVert A\rVert_2` (norm estimated by the largest
      :math:`|\theta|`), or with ``rtol``: error bound :math:`\le` ``rtol`` :math:`|\lambda|`;
    - error bounds: :math:`\min(r, R^2/\delta)` with :math:`\delta` the gap to the other Ritz
      values (see :func:`_error_bounds`), never below the round-off
      :data:`ROUNDOFF` :math:`\varepsilon \sqrt{P} \lVert A\rVert` of one product in the
      operator's dtype.
      They certify the eigenvalue the Ritz vector found; like every Krylov method, an
      eigenvector orthogonal to the whole search (a missed multiplicity without breakdown)
      cannot be seen.

    Args:
        A: a symmetric operator: ``shape`` ``(P, P)``, ``dtype``, ``device`` and ``A @ V``
            for ``V`` of shape ``[P, k]``.
        top: number of largest eigenvalues (descending in the result).
        bottom: number of smallest eigenvalues (ascending in the result).
        tol: relative residual tolerance (docs/DESIGN.md "Numerical policy", default 1e-4),
            raised to the bounds' round-off floor :data:`ROUNDOFF` :math:`\varepsilon
            \sqrt{P}` where that is larger (float32 beyond 44k parameters); each result's
            ``tol`` is the one used.
        rtol: if given, converge on the error bound relative to :math:`|\lambda|` instead of
            ``tol`` (an eigenvalue at zero then never converges; use ``tol`` for those).
        basis_size: vectors in the basis, at least ``top + bottom + 1`` (or ``P``); default
            :func:`default_basis_size`.
        max_matvecs: products at most, counted per column with the final check; at least
            ``2 (top + bottom)``; default :func:`default_max_matvecs`.
        v0: start vector ``[P]``, or a block ``[P, j]`` (e.g. the previous checkpoint's Ritz
            vectors, a warm start) whose columns are summed; default Gaussian from ``seed``.
        seed: an int or a ``torch.Generator`` for the start vector and the fresh vectors after
            a breakdown, drawn on the CPU in float64.
        basis_device: where the basis is stored (e.g. ``"cpu"`` for an operator on a GPU,
            ``"disk:DIR"`` for a memory-mapped file); vectors move to ``A.device`` for each
            product. Default: that of an enclosing :func:`basis_placement`, else
            ``A.device``; the eigenvectors are returned on this device.
        progress: ``progress(done, total, description)`` after each product, ``total`` being
            ``max_matvecs``.

    Returns:
        The ``top`` result first (if requested), then the ``bottom`` one, each with
        ``method="lanczos"``, ``num_matvecs`` (all products of the call), ``num_iters``
        (Lanczos steps), ``restarts`` (thick restarts plus fresh starts after a breakdown)
        and ``error_bounds``.

    Raises:
        OptionError: for counts, tolerances, sizes, ``v0`` or ``seed`` that cannot work.
        NonFiniteError: when a product returns NaN or Inf.
    """
    A = as_operator(A)
    n = int(A.shape[0])
    if len(A.shape) != 2 or int(A.shape[1]) != n:
        raise OptionError(f"the operator must be square, not of shape {tuple(A.shape)}.")
    # sharded operators (docs/sharded.md): n is this rank's rows, N the whole dimension, and
    # every inner product and norm goes through `inner` (all-reduced); unsharded, N = n and
    # `inner` computes exactly the plain expressions
    inner = Inner(A)
    local_n, n = n, inner.size
    if top < 0 or bottom < 0 or top + bottom == 0:
        raise OptionError(f"ask for at least one eigenvalue with {arg('top')} or {arg('bottom')}.")
    k = top + bottom
    if k > n:
        raise OptionError(
            f"{arg('top')} and {arg('bottom')} ask for {k} eigenvalues of a matrix with {n} rows."
        )
    if not tol > 0:
        raise OptionError(f"{arg('tol')} must be positive, not {tol}.")
    if rtol is not None and not rtol > 0:
        raise OptionError(f"{arg('rtol')} must be positive, not {rtol}.")
    itemsize = torch.empty((), dtype=A.dtype).element_size()
    m = default_basis_size(k, n, itemsize=itemsize) if basis_size is None else min(
        int(basis_size), n
    )
    if m < min(k + 1, n):
        raise OptionError(
            f"{arg('basis_size')} {basis_size} cannot hold the {k} requested pairs and a new "
            f"vector; give at least {min(k + 1, n)}."
        )
    total = default_max_matvecs(k, n) if max_matvecs is None else int(max_matvecs)
    if total < 2 * k:
        raise OptionError(
            f"{arg('max_matvecs')} {total} leaves too little for {k} pairs: give at least "
            f"{2 * k} ({k} steps and the final check of {k} products)."
        )
    gen = as_generator(seed)
    dtype = A.dtype
    if basis_device is None:
        basis_device = _BASIS_DEVICE.get()
    place, disk = parse_basis_device(None if basis_device is None else str(basis_device))
    bdev = torch.device(place) if place is not None else torch.device(A.device)
    # a model computing in float32 inside a float64 run has float32's floor
    eps = torch.finfo(dtype).eps  # the basis's arithmetic: breakdowns, orthogonality
    budget = total - k  # the final check needs k products
    resolution_tol = rtol if rtol is not None else tol
    breakdown_rel = BREAKDOWN_TOL * min(tol, resolution_tol)
    # the products' round-off: a lower precision's where the operator computes in one
    # (float32 inside a float64 run); bounds never fall below its floor, and a tolerance
    # under that floor would only stall the iteration, so it is raised to it (the results
    # carry the tolerance used)
    floor_eps = max(float(eps), float(getattr(A, "roundoff_eps", 0.0)))
    # where final checks are exact (a bfloat16 model checked in float32), the iteration's
    # floor is one product's round-off, ROUNDOFF eps ||A||, and its tolerance is raised only
    # to that: the final check measures what it reached. No bound falls below it either: an
    # iteration on bfloat16 products does not resolve eigenvalues closer than its round-off,
    # and may pass one by (tiny MLPs whose eigenvalues lie 0.5% of ||A|| apart: a third
    # eigenvalue missed by 1.1% of ||A||, with a residual of 0.9%; their products stall near
    # 2e-3 ||A||). Otherwise the final check shares the floor, sqrt(n) ROUNDOFF eps ||A||.
    check_eps = max(float(eps), float(getattr(A, "check_eps", floor_eps)))
    iter_floor = ROUNDOFF * floor_eps * (1.0 if check_eps < floor_eps else math.sqrt(n))
    # the gap (Kato-Temple) bound needs every value beside it resolved so finely that no
    # eigenvalue hides between them: at the precision of the final check, never at a
    # tolerance raised to the iteration's floor (bfloat16's 3e-2 ||A|| passed a third Ritz
    # value 0.0275 off with a gap bound of 0.0092 on an MLP whose eigenvalues lie 0.01 apart)
    gap_tol = max(tol, ROUNDOFF * check_eps * math.sqrt(n)) if check_eps > eps else tol
    if floor_eps > eps:
        tol = max(tol, iter_floor)
        gap_tol = min(gap_tol, tol)
    elif iter_floor > tol:
        # float32 on many parameters (4 eps sqrt(P) is 1e-4 at P = 44k, 5.3e-3 at GPT-2's
        # 124M): no bound falls below the floor, so a residual under it certifies nothing
        # more, and round-off keeps the measured residuals near it (7e-4 ||A|| on a float32
        # ResNet-18, where 1e-4 was asked for and never reached). The tolerance is raised to
        # the floor, as above; the Kato-Temple gap test keeps the tolerance asked for.
        tol = iter_floor

    # final checks take their products from A.accurate(): a bfloat16 model's float32 copy,
    # so bounds hold for exact products whatever round-off the iteration carried
    checker = None
    steps = 0
    restarts = 0
    est_scale = 1.0  # raised when a final check finds the estimated residuals too small
    checks = 0  # products of final checks that sent the iteration on
    next_check = None  # after a failed check: the step of the next one at the latest
    last_failing = None  # after a failed check: its worst residual over tol ||A||

    def matvec(V: torch.Tensor, what: str, op: Any = A) -> torch.Tensor:
        out = op @ V.to(device=op.device)
        out = out.reshape(local_n, V.shape[1]).to(device=bdev, dtype=dtype)
        if not inner.all_true(bool(torch.isfinite(out).all())):
            raise NonFiniteError(f"a product of the operator returned NaN or Inf ({what}).")
        return out

    # column-major (each basis vector contiguous): Gram-Schmidt's V^T w and V c then read
    # the basis as two plain matrix-vector products, where a column slice of a row-major
    # basis was copied on every call (2 GB/s against the memory's speed)
    stack = contextlib.ExitStack()
    V = stack.enter_context(basis_storage(m + 1, local_n, dtype, bdev, disk))
    T = torch.zeros(m, m, dtype=torch.float64)
    X = torch.zeros(local_n, 0, dtype=dtype, device=bdev)  # locked exact eigenvectors
    x_vals = torch.zeros(0, dtype=torch.float64)
    x_est = torch.zeros(0, dtype=torch.float64)
    q = _start(v0, local_n, gen, inner).to(device=bdev, dtype=dtype)
    V[:, 0] = q / inner.norm(q)
    j = 0  # columns of V whose products are taken; V[:, j] is the next vector
    beta = 0.0
    scale = 0.0
    had_breakdown = False
    theta = torch.zeros(0, dtype=torch.float64)
    S = torch.zeros(0, 0, dtype=torch.float64)
    est = torch.zeros(0, dtype=torch.float64)

    def union() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([x_vals, theta]), torch.cat([x_est, est])

    def passes(vals: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """Per value: whether its estimate passes the stopping test."""
        norm = max(float(vals.abs().max()), 1e-300)
        res = res * est_scale
        small = res <= tol * norm
        if rtol is None:
            return small
        t_idx, b_idx = _pick(vals, top, bottom)
        bounds = _error_bounds(
            vals,
            res,
            resolved=res <= gap_tol * norm,
            side=_sides(vals.shape[0], t_idx, b_idx),
            complete=X.shape[1] + j >= n,
            floor=iter_floor * norm,
        )
        return bounds <= rtol * vals.abs()

    def converged_now() -> bool:
        vals, res = union()
        if vals.shape[0] < k:
            return False
        ok = passes(vals, res)
        t_idx, b_idx = _pick(vals, top, bottom)
        if not bool(ok[torch.cat([t_idx, b_idx])].all()):
            return False
        if had_breakdown and j > 0:
            # After a breakdown the fresh search must have found its own extremes, so that
            # nothing it could still bring (a repeated eigenvalue) improves the wanted set.
            off = x_vals.shape[0]
            a_ok = ok[off:]
            if top and not bool(a_ok[torch.argmax(theta)]):
                return False
            if bottom and not bool(a_ok[torch.argmin(theta)]):
                return False
        return True

    try:
        while True:
            on_estimates = False  # whether the loop below stopped because the estimates passed
            while True:
                if j == m:
                    # Thick restart: keep the best Ritz vectors of both ends (_keep_counts).
                    vals, res = union()
                    ok = passes(vals, res)
                    t_u, b_u = _pick(vals, top, bottom)
                    kt, kb = _keep_counts(
                        theta,
                        top,
                        bottom,
                        top > 0 and not bool(ok[t_u].all()),
                        bottom > 0 and not bool(ok[b_u].all()),
                    )
                    t_idx, b_idx = _pick(theta, kt, kb)
                    keep = torch.sort(torch.cat([t_idx, b_idx])).values
                    p = keep.shape[0]
                    Sk = S[:, keep]
                    restart_in_place(V, m, Sk.to(device=bdev, dtype=dtype))
                    V[:, p] = V[:, m]
                    coupling = beta * Sk[m - 1, :]
                    T.zero_()
                    T[:p, :p] = torch.diag(theta[keep])
                    T[p, :p] = coupling
                    T[:p, p] = coupling
                    j = p
                    restarts += 1
                w = matvec(V[:, j : j + 1], "Lanczos step")[:, 0]
                steps += 1
                if progress is not None:
                    progress(steps, total, "Lanczos")
                wnorm = float(inner.norm(w))
                scale = max(scale, wnorm)
                w, coef = orthogonalise(w, [X, V[:, : j + 1]], inner)
                beta = float(inner.norm(w))
                if beta < 1e-2 * wnorm:
                    # Most of A v was in the basis: one more pass, as twice is enough only when
                    # the result is not tiny (Giraud et al. 2005).
                    w, more = orthogonalise(w, [X, V[:, : j + 1]], inner)
                    coef = coef + more
                    beta = float(inner.norm(w))
                T[j, j] = float(coef[j])
                j += 1
                theta, S = torch.linalg.eigh(T[:j, :j])
                est = beta * S[j - 1, :].abs()
                limit = max(BREAKDOWN * eps * math.sqrt(n), min(breakdown_rel, eps**0.5))
                if beta <= limit * scale or X.shape[1] + j >= n:
                    # Invariant subspace: its Ritz pairs are exact to the estimates est.
                    if X.shape[1] + j >= n or steps >= budget:
                        break
                    vals, res = union()
                    t_idx, b_idx = _pick(vals, top, bottom)
                    improved = not had_breakdown or _improves(
                        x_vals, vals, top, bottom, resolution_tol, eps, n
                    )
                    if not improved:
                        break
                    # Lock the best pairs of both ends that pass the test (a breakdown declared on a
                    # beta above round-off leaves some inexact), then search the complement afresh.
                    fresh = inner.randn(gen).to(bdev, dtype)
                    fresh, _ = orthogonalise(fresh, [X, V[:, :j]], inner)
                    fnorm = float(inner.norm(fresh))
                    if fnorm <= math.sqrt(eps):
                        break  # nothing is left outside the subspaces found
                    keep = torch.cat([t_idx, b_idx])
                    keep = keep[passes(vals, res)[keep]]
                    off = x_vals.shape[0]
                    cols = []
                    for i in keep.tolist():
                        if i < off:
                            cols.append(X[:, i])
                        else:
                            cols.append(V[:, :j] @ S[:, i - off].to(device=bdev, dtype=dtype))
                    X = torch.stack(cols).T if cols else X[:, :0]  # column-major, as V
                    x_vals, x_est = vals[keep], res[keep]
                    V[:, 0] = fresh / inner.norm(fresh)
                    T.zero_()
                    j = 0
                    theta = torch.zeros(0, dtype=torch.float64)
                    est = theta.clone()
                    had_breakdown = True
                    restarts += 1
                    continue
                V[:, j] = w / beta
                if j < m:
                    T[j - 1, j] = T[j, j - 1] = beta
                if steps >= budget:
                    break
                if converged_now() or (next_check is not None and steps >= next_check):
                    on_estimates = True
                    break

            if checker is None:  # built once, at the first final check
                checker = A.accurate() if callable(getattr(A, "accurate", None)) else A
            results, worst = _finish(
                checker,
                lambda Y, what, op=checker: matvec(Y, what, op),
                progress,
                top=top,
                bottom=bottom,
                tol=tol,
                gap_tol=gap_tol,
                min_floor=iter_floor,
                rtol=rtol,
                X=X,
                x_vals=x_vals,
                x_est=x_est,
                V=V[:, :j],
                theta=theta,
                S=S,
                est=est,
                complete=X.shape[1] + j >= n,
                inner=inner,
                steps=steps,
                total=total,
                restarts=restarts,
                checks=checks,
                est_scale=est_scale,
                # the relation's prediction holds for A's products only: a final check on
                # another operator (a bfloat16 model's float32 copy) measures every residual
                f=w if checker is A and j > 0 else None,
                gen=gen,
            )
            if worst is None or not on_estimates or steps >= budget:
                return results
            # The measured residuals of the final check contradict the Lanczos relation's
            # estimates (seen on a float32 ResNet-18: 7e-4 ||A|| measured where the estimates
            # passed 1e-4; on an operator that is not quite symmetric they never meet). Trust the
            # estimates that much less and go on, measuring again after at most one basis cycle,
            # for as long as each check at least halves the worst measured residual: what round-off
            # or asymmetry puts out of reach costs one cycle, not the budget.
            failing = max(
                float(r.residual_norms.max() / (r.tol * r.norm_estimate)) for r in results
            )
            if last_failing is not None and failing > 0.5 * last_failing:
                # stalled: a basis cycle more did not halve what the products measure
                return results if rtol is not None else _at_roundoff(results, iter_floor)
            last_failing = failing
            est_scale *= 2.0 * worst
            spent = results[0].num_matvecs - steps - checks  # k, or the relation's probes too
            checks += spent
            budget -= spent
            next_check = steps + m
            if steps >= budget:
                return results
            # the iteration goes on: let the checked Ritz vectors go (k parameter-sized
            # vectors: GPT-2-small's steps after a failed check ran 3 GB above those before)
            del results
    except KeyboardInterrupt:
        # Ctrl-C (or a budget's stop): the current Ritz pairs with their residual estimates,
        # not converged, instead of nothing (hours of products kept no eigenvalue before)
        raise Interrupted(
            _current_results(
                top, bottom, tol, X, x_vals, x_est * est_scale, V, j, theta, S,
                est * est_scale, steps + checks, restarts, inner,
            )
        ) from None
    finally:
        del V
        stack.close()  # a disk basis's file, where it could not be unlinked at once


STALL_MARGIN = 2.0
"""How far above the round-off estimate :data:`ROUNDOFF` eps sqrt(P) a stalled measured
residual may lie and still be taken for the products' round-off. A measured residual at the
floor carries two products' round-off, the checking product's and the one the iteration left
in the Ritz vector: about sqrt(2) times one (seen on a float32 operator with injected
round-off, tests/test_float32_bounds.py). GPT-2-small in float32 (124M parameters): the
estimate is 1.2 (5.3e-3 ||A||), the top pairs' residuals stalled at 1.19, 1.69 and 1.77 over
two checks a basis cycle apart, while their eigenvalues matched those of another run (another
basis size, 73 products) to 4e-3."""


def _at_roundoff(results: list[EigenResult], floor: float) -> list[EigenResult]:
    """Pairs whose measured residuals stalled at the products' round-off, converged there.

    After two final checks a basis cycle apart, the worst measured residual did not halve
    though the iteration went on: what is left is the round-off of the products that
    measure it (``floor`` is a rule of thumb for it). A pair whose residual is within
    :data:`STALL_MARGIN` of ``floor ||A||`` is converged at the tolerance of the largest
    such residual (recorded as the result's ``tol``); its bound is still at least that
    residual. Pairs above it stay not converged.
    """
    out = []
    for r in results:
        limit = STALL_MARGIN * floor * r.norm_estimate
        near = ~r.converged & (r.residual_norms <= limit)
        if not bool(near.any()):
            out.append(r)
            continue
        level = float(r.residual_norms[near | r.converged].max()) / r.norm_estimate
        out.append(dataclasses.replace(r, converged=r.converged | near, tol=max(r.tol, level)))
    return out


def _current_results(
    top: int,
    bottom: int,
    tol: float,
    X: torch.Tensor,
    x_vals: torch.Tensor,
    x_est: torch.Tensor,
    V: torch.Tensor,
    j: int,
    theta: torch.Tensor,
    S: torch.Tensor,
    est: torch.Tensor,
    num: int,
    restarts: int,
    inner: Inner | None = None,
) -> list[EigenResult]:
    """The Ritz pairs at hand when the iteration stops early, all marked not converged.

    No product is taken: residuals are the Lanczos estimates (``beta |s_last|``), bounds are
    absent (``None``), and there may be fewer pairs than asked for.
    """
    j = min(j, S.shape[0])
    vals = torch.cat([x_vals, theta[: S.shape[1]]])
    res = torch.cat([x_est, est[: S.shape[1]]])
    if vals.shape[0] == 0:
        return []
    kt = min(top, vals.shape[0])
    kb = min(bottom, vals.shape[0] - kt)
    t_idx, b_idx = _pick(vals, kt, kb)
    off = x_vals.shape[0]
    norm = max(float(vals.abs().max()), 1e-300)
    out = []
    for which, idx, descending in (("top", t_idx, True), ("bottom", b_idx, False)):
        if idx.numel() == 0:
            continue
        idx = idx[torch.argsort(vals[idx], descending=descending)]
        cols = [
            X[:, i] if i < off else V[:, :j] @ S[:j, i - off].to(device=V.device, dtype=V.dtype)
            for i in idx.tolist()
        ]
        Y = torch.stack(cols, dim=1)
        if inner is not None and inner.sharded:
            Y = Y / inner.col_norms(Y, keepdim=True).clamp_min(1e-300)
        else:
            Y = Y / torch.linalg.vector_norm(Y, dim=0, keepdim=True).clamp_min(1e-300)
        out.append(
            EigenResult(
                which, "lanczos", vals[idx], Y, res[idx],
                torch.zeros(idx.numel(), dtype=torch.bool), num, norm, tol, num,
                error_bounds=None, restarts=restarts,
            )
        )
    return out


KEEP_FRACTION = 0.65
r"""At a restart, keep the wanted pairs and this fraction of the other :math:`m - k` vectors
(at most :math:`m - 2`). Wu & Simon suggest about half; on a 9k-parameter MLP Hessian and on
dense test spectra (P = 500), 0.65 needed 342/293/120/637 products for the sets top-1 bottom-1,
top-5, bottom-2 and top-5 bottom-2 together, 0.5 needed 371/297/119/634 and 0.8
366/298/119/629."""


def _keep_counts(
    theta: torch.Tensor, top: int, bottom: int, lag_top: bool, lag_bottom: bool
) -> tuple[int, int]:
    r"""Ritz vectors kept at each end at a restart (``theta`` ascending).

    The total is fixed by :data:`KEEP_FRACTION`; the split between the ends is chosen for the
    ends still lagging (wanted, not yet passing the test). The next cycle acts on the unkept
    Ritz values :math:`[\theta_{k_b+1}, \theta_{m-k_t}]`, and a wanted value at distance
    :math:`d` outside that interval of width :math:`w` converges at a rate set by
    :math:`d/w` (Chebyshev; the criterion of Yamazaki, Bai, Simon, Wang and Wu 2010,
    "Adaptive projection subspace dimension for the thick-restart Lanczos method", ACM TOMS
    37(3), used here only for the split). Keeping more at the wanted end widens :math:`d`;
    keeping more at the other end narrows :math:`w`, which pays when that end has outliers:
    on an MLP Hessian the bottom end needed half the products once the top outliers were kept.
    The split maximising the smallest :math:`d/w` over lagging ends is taken.
    """
    m = theta.shape[0]
    k = top + bottom
    keep = min(m - 2, int(round(k + KEEP_FRACTION * (m - k))))
    if keep <= k:
        return top, min(m - 1, k) - top
    extra = keep - k
    choice = (top + extra - extra // 2, bottom + extra // 2)
    if not (lag_top or lag_bottom):
        return choice
    th = theta.tolist()
    best = -math.inf
    for et in range(extra + 1):
        kt, kb = top + et, bottom + extra - et
        lo, hi = th[kb], th[m - kt - 1]
        width = hi - lo
        if width <= 0:
            continue
        g = math.inf
        if lag_top:
            g = min(g, (th[m - top] - hi) / width)
        if lag_bottom:
            g = min(g, (lo - th[bottom - 1]) / width)
        if g > best:
            best, choice = g, (kt, kb)
    return choice


def _improves(
    old: torch.Tensor, new: torch.Tensor, top: int, bottom: int, rel: float, eps: float, n: int
) -> bool:
    """Whether the wanted values of ``new`` beat those of ``old`` by more than the resolution."""
    norm = max(float(new.abs().max()), 1e-300)
    delta = max(rel, eps * math.sqrt(n)) * norm

    def ends(vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((top,), -math.inf, dtype=torch.float64)
        b = torch.full((bottom,), math.inf, dtype=torch.float64)
        ti, bi = _pick(vals, top, bottom)
        t[: ti.shape[0]] = vals[ti]
        b[: bi.shape[0]] = vals[bi]
        return t, b

    ot, ob = ends(old)
    nt, nb = ends(new)
    return bool((nt > ot + delta).any() or (nb < ob - delta).any())


RELATION_PROBES = 2
"""Random combinations of the picked Ritz vectors the final check multiplies to verify the
Lanczos relation (:func:`_relation_check`); with fewer picked vectors than this plus one, it
measures each vector's residual instead."""

RELATION_SAFETY = 100.0
"""``sigma = RELATION_SAFETY * max_j ||E c_j||`` bounds ``||E||_2`` unless every probe's
component along ``E``'s top right singular vector is below ``1/RELATION_SAFETY`` in magnitude:
probability ``(sqrt(2/pi) / RELATION_SAFETY) ** RELATION_PROBES``, 6.4e-5 for two probes."""


def _measured_residuals(
    matvec: Callable[[torch.Tensor, str], torch.Tensor], Y: torch.Tensor, inner: Inner
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh quotients and residual norms of ``Y``'s columns, from ``A Y`` (k products)."""
    k = Y.shape[1]
    AY = matvec(Y, "final residual check")
    # float64 one column at a time: whole float64 copies of Y and AY and their products were
    # about 10 k parameter-sized float32 vectors at the peak (7 GB for k = 7 of 124M)
    lam = torch.empty(k, dtype=torch.float64)
    resid = torch.empty(k, dtype=torch.float64)
    for c in range(k):
        y64, ay64 = Y[:, c : c + 1].to(torch.float64), AY[:, c : c + 1].to(torch.float64)
        sq = inner.col_sums(y64 * y64)
        lam[c] = float((inner.col_sums(y64 * ay64) / sq)[0])
        resid[c] = float((inner.col_norms(ay64 - y64 * float(lam[c])) / sq.sqrt())[0])
    return lam, resid


def _relation_check(
    matvec: Callable[[torch.Tensor, str], torch.Tensor],
    Y: torch.Tensor,
    values: torch.Tensor,
    f: torch.Tensor,
    share: torch.Tensor,
    predicted: torch.Tensor,
    inner: Inner,
    gen: torch.Generator,
    allowed: float,
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    r"""Verify ``A Y = Y diag(values) + f share^T`` on random combinations: 2 products, not k.

    With full reorthogonalisation the Lanczos relation predicts each Ritz vector's residual
    vector exactly, up to round-off, where the operator is a fixed linear map: ``f s_j``. What
    could make it wrong (an operator whose products are not one linear map, lost
    orthogonality, a locked vector's own residual) is all in ``E = A Y - prediction``. For
    Gaussian ``c`` the component of ``c`` along ``E``'s top right singular vector is standard
    normal, so ``||E||_2 <= RELATION_SAFETY max_j ||E c_j||`` except with probability
    :data:`RELATION_SAFETY`'s figure (6.4e-5). Where that ``sigma`` is at most ``allowed``
    (what the tolerance leaves above the largest predicted residual), the residuals are
    ``predicted + sigma`` (``predicted``: ``||f|| |share_i|``) and the values the
    Ritz values (within ``sigma`` of the Rayleigh quotients); otherwise ``None``, and the
    caller measures every residual. A well-separated top-5 then costs its Lanczos steps and
    2 products, where measuring took 5 (``benchmarks/lanczos_restart.py``).
    """
    k = Y.shape[1]
    C = torch.randn(k, RELATION_PROBES, generator=gen, dtype=torch.float64)
    AZ = matvec(Y @ C.to(device=Y.device, dtype=Y.dtype), "final residual check (relation)")
    values = values.to(torch.float64)
    gaps = []
    for p in range(RELATION_PROBES):  # E c in float64, one parameter-sized vector at a time
        e = AZ[:, p].to(torch.float64) - f.to(torch.float64) * float(share @ C[:, p])
        for i in range(k):
            e -= Y[:, i].to(torch.float64) * float(values[i] * C[i, p])
        gaps.append(float(inner.norm(e)))
    sigma = RELATION_SAFETY * max(gaps)
    if not sigma <= allowed:
        return None
    return values.clone(), predicted + sigma, sigma


def _finish(
    A: Any,
    matvec: Callable[[torch.Tensor, str], torch.Tensor],
    progress: Progress | None,
    *,
    top: int,
    bottom: int,
    tol: float,
    rtol: float | None,
    X: torch.Tensor,
    gap_tol: float | None = None,
    min_floor: float = 0.0,
    x_vals: torch.Tensor,
    x_est: torch.Tensor,
    V: torch.Tensor,
    theta: torch.Tensor,
    S: torch.Tensor,
    est: torch.Tensor,
    complete: bool,
    steps: int,
    total: int,
    inner: Inner | None = None,
    restarts: int,
    checks: int = 0,
    est_scale: float = 1.0,
    f: torch.Tensor | None = None,
    gen: torch.Generator | None = None,
) -> tuple[list[EigenResult], float | None]:
    """The final check of the picked Ritz vectors: Rayleigh quotients, residuals, bounds.

    With the Lanczos remainder ``f`` (``A V = V T + f e_j^T``) and a generator, first the
    relation itself is checked on :data:`RELATION_PROBES` random combinations of the picked
    vectors (:func:`_relation_check`, that many products); where it holds, the predicted
    residuals plus the check's bound are the residuals. Otherwise, and without ``f``, one
    product with every picked vector measures them (:func:`_measured_residuals`).

    Also returns, when a pair fails its test, how far the residuals exceed the estimates the
    iteration stopped on (at least 1), else ``None``. ``checks``: products of earlier final
    checks, counted in ``num_matvecs``.
    """
    inner = inner if inner is not None else Inner(A)
    local_n, n = int(A.shape[0]), inner.size
    k = top + bottom
    vals = torch.cat([x_vals, theta])
    res_est = torch.cat([x_est, est]) * est_scale
    t_idx, b_idx = _pick(vals, top, bottom)
    sel = torch.cat([t_idx, b_idx])
    off = x_vals.shape[0]
    picked = sel.tolist()
    ritz = [c for c, i in enumerate(picked) if i >= off]
    coef = S[:, [picked[c] - off for c in ritz]].to(device=V.device, dtype=V.dtype)
    if len(ritz) == len(picked):  # the Ritz vectors in one pass over the basis, no copy
        Y = V @ coef
    else:
        Y = torch.empty(local_n, len(picked), dtype=V.dtype, device=V.device)
        if ritz:
            Y[:, ritz] = V @ coef
        for c, i in enumerate(picked):
            if i < off:
                Y[:, c] = X[:, i]
    lengths = inner.col_norms(Y, keepdim=True)
    Y.div_(lengths)  # in place: k parameter-sized vectors fewer at the check's peak
    # the residual vector the Lanczos relation predicts for each picked vector: f s_j for a
    # Ritz vector V s (f: the remainder, A V = V T + f e_j^T), none for a locked one
    share = torch.zeros(k, dtype=torch.float64)
    if f is not None and ritz:
        share[ritz] = S[-1, [picked[c] - off for c in ritz]].to(torch.float64)
    share = share / lengths.reshape(-1).to(torch.float64).cpu()
    checked = None
    used = 0
    # only where the predicted residuals pass the tolerance: the check then certifies them
    # with its margin; where the margin does not fit under the tolerance, the measured
    # residuals decide, as they always did
    tol_abs = tol * max(float(vals.abs().max()), 1e-300)
    # the predicted residual norms, ||f|| |share_i| (f in float64: its norm is the residual's)
    predicted = (
        float(inner.norm(f.to(torch.float64))) * share.abs() if f is not None else None
    )
    # float64 only: in float32 the relation holds to the products' round-off, which the
    # check's safety factor of 100 lifts above the tolerance (a 238k-parameter sigmoid MLP:
    # sigma 0.089 against 4.8e-3 left), so two products would be spent for nothing
    if (
        predicted is not None and gen is not None and k > RELATION_PROBES and rtol is None
        and Y.dtype == torch.float64 and float(predicted.max()) < tol_abs
    ):
        used = RELATION_PROBES
        checked = _relation_check(
            matvec, Y, vals[sel], f, share, predicted, inner, gen,
            tol_abs - float(predicted.max()),
        )
    sigma = 0.0
    if checked is not None:
        lam, resid, sigma = checked
        if progress is not None:
            progress(steps + checks + used, total, "residual check")
    else:
        lam, resid = _measured_residuals(matvec, Y, inner)
        used += k
        if progress is not None:
            progress(steps + checks + used, total, "residual check")
    norm = max(float(vals.abs().max()), float(lam.abs().max()), 1e-300)
    eps = max(float(torch.finfo(Y.dtype).eps), float(getattr(A, "roundoff_eps", 0.0)))
    floor = max(ROUNDOFF * eps * math.sqrt(n), min_floor) * norm
    rest = torch.ones(vals.shape[0], dtype=torch.bool)
    rest[sel] = False
    all_vals = torch.cat([lam, vals[rest]])
    all_res = torch.cat([resid, res_est[rest]])
    tk = t_idx.shape[0]
    bounds = _error_bounds(
        all_vals,
        all_res,
        resolved=all_res <= (tol if gap_tol is None else gap_tol) * norm,
        side=_sides(all_vals.shape[0], torch.arange(tk), torch.arange(tk, k)),
        complete=complete,
        floor=floor,
    )[:k]
    if sigma:
        # resid bounds ||A y - lambda y|| itself; the gap bound is the Rayleigh quotient's,
        # which the Ritz value meets to within sigma
        bounds = torch.minimum(bounds + sigma, torch.clamp(resid, min=floor))
    if rtol is None:
        converged = resid <= tol * norm
    else:
        converged = bounds <= rtol * lam.abs()
    num = steps + checks + used
    worst = None
    if not bool(converged.all()):
        floor_est = torch.clamp(res_est[sel], min=torch.finfo(torch.float64).tiny)
        worst = max(1.0, float((resid / floor_est)[~converged].max()))
    out = []
    for which, part, descending in (
        ("top", slice(0, t_idx.shape[0]), True),
        ("bottom", slice(t_idx.shape[0], k), False),
    ):
        if part.stop == part.start:
            continue
        order = torch.argsort(lam[part], descending=descending)
        idx = torch.arange(k)[part][order]
        out.append(
            EigenResult(
                which,
                "lanczos",
                lam[idx],
                Y[:, idx.to(Y.device)],
                resid[idx],
                converged[idx],
                num,
                norm,
                rtol if rtol is not None else tol,
                steps,
                error_bounds=bounds[idx],
                restarts=restarts,
                residual_check="measured" if checked is None else "relation",
            )
        )
    return out, worst
