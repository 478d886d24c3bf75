r"""The Hessian of a sharded problem: finite differences of FSDP2-sharded gradients.

docs/sharded.md has the design. The operator's vectors are this rank's shards (the
concatenation of the local shards of the selected parameters, :class:`curvscope._sharded.Sharding`),
its ``shape`` is local, and it declares ``reduce_inner``, ``global_size`` and ``local_rows``
so that :func:`~curvscope.linalg.eigsh` sums every inner product over the ranks
(:class:`~curvscope.linalg._inner.Inner`).
"""

from __future__ import annotations

from typing import Any

import torch

from .._errors import NonFiniteError, OptionError, arg
from ..linalg import LinearOperator, refuse_sharded
from ..problem import Problem
from ._base import CurvatureOperator
from ._hessian import graph_account

__all__ = ["ShardedHessianOperator"]

STENCIL = "central-4-point"

KINK_LIMIT = 1e-2
"""A 2-point and a 4-point difference further apart than this (relative to ``||H v||``) means a
kink (ReLU, max pooling) inside the stencil: smooth losses give ``O((h/L)^2)``, 1e-7..4e-5 on
the test models."""

KINK_RETRIES = 2
"""Times a column's step is cut before the product is kept as it is."""

CUT_RATIO = 10.0
"""A column whose predicted truncation exceeds this many times its round-off is taken again
with a smaller step."""


class ShardedHessianOperator(CurvatureOperator):
    r"""The Hessian of a sharded problem (``Problem(..., shard=True)``) on local vectors.

    FSDP2 has no double backward over sharded parameters, so each column is the 4-point
    central difference of sharded full-data gradients,

    .. math::
        H v \approx \frac{8\,(g(w + h v) - g(w - h v)) - (g(w + 2 h v) - g(w - 2 h v))}{12 h},

    truncation :math:`O(h^4)`, round-off about :math:`1.5\,\epsilon \lVert g\rVert / h`;
    4 gradients (4 data passes) a column. The step length :math:`h \lVert v\rVert` is chosen
    once, on the first column (:meth:`_calibrate`: Richardson estimate of the truncation,
    round-off estimate, the step minimising their sum), the same on every rank (all norms are
    global). A column whose 2-point and 4-point results disagree by more than
    :data:`KINK_LIMIT` crossed a kink (ReLU, max pooling) and is taken again with a 100-fold
    smaller step. The weights are perturbed in place on the local shards and restored from
    a saved copy.

    A column whose own error estimate says the step is too long is taken again with a
    shorter one (:meth:`_column`).

    :attr:`info` (also ``hvp_record(problem)``, a document's ``hvp``) records the stencil,
    the step length, the first column's relative ``truncation_estimate`` (Richardson) and
    ``roundoff_estimate``, ``two_point_error`` (the largest
    :math:`\lVert D_h - H_4 v\rVert / \lVert H_4 v\rVert` over the columns, :math:`D_h` the
    2-point difference), ``error_estimate`` (the largest predicted relative error of a column,
    ``two_point_error^2`` plus round-off) and how often the step was cut.

    Args:
        problem: a sharded problem.
        mode: ``auto`` or ``finite-difference`` (the same here); other modes are refused.
    """

    name = "hessian"
    SHARDABLE = True

    def __init__(self, problem: Problem, *, mode: str = "auto") -> None:
        if getattr(problem, "sharding", None) is None:
            raise OptionError(
                "ShardedHessianOperator needs a sharded problem (Problem(..., shard=True)); "
                "use HessianOperator otherwise."
            )
        mode = getattr(mode, "value", mode)
        if mode not in ("auto", "finite-difference"):
            raise OptionError(
                f"{arg('hvp')} {mode} is not available with {arg('shard')}: FSDP2 has no double "
                "backward, so sharded Hessian products are finite differences (auto or "
                "finite-difference).",
                option="hvp",
            )
        super().__init__(problem, mode=mode)
        sh = problem.sharding
        self.sharding = sh
        self.reduce_inner = sh.reduce_inner
        self.global_size = int(problem.num_params)
        self.info: dict[str, Any] = {
            "hvp": "finite-difference",
            "stencil": STENCIL,
            "sharded": True,
            "world_size": sh.world_size,
        }
        self.notes.append(
            f"Sharded mode over {sh.world_size} process(es) (FSDP2): Hessian products by "
            "4-point central differences of sharded gradients (step and error estimates in "
            "the document's hvp section)."
            + (" The run is in float32: expect relative errors near 1e-4."
               if problem.dtype == torch.float32 else "")
        )

    # --------------------------------------------------------------- description
    @property
    def local_rows(self) -> torch.Tensor:
        """This rank's positions in the unsharded flat vector (built when asked for)."""
        return self.sharding.local_rows

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_local, n_local)``: this rank's rows of the ``P x P`` matrix."""
        n = self.sharding.n_local
        return (n, n)

    @property
    def roundoff_eps(self) -> float:
        r"""The relative error of one product, for error bounds and the tolerance floor.

        :math:`\epsilon^{4/5}` (3e-13 in float64), the design error of the 4-point stencil at
        its step (truncation :math:`h^4` and round-off :math:`\epsilon/h` with
        :math:`h \approx \epsilon^{1/5}`), or the largest ``error_estimate`` of the products
        taken so far where that is larger. A model computing in a lower precision inside is
        not detected in sharded mode (the measurement needs a forward outside FSDP).
        """
        eps = float(torch.finfo(self.dtype).eps)
        return max(eps ** 0.8, float(self.info.get("error_estimate", 0.0)))

    # --------------------------------------------------------------- products
    def _data_matmat(self, V: torch.Tensor) -> torch.Tensor:
        sh = self.sharding
        w0 = sh.vector()
        cols = []
        try:
            for j in range(V.shape[1]):
                v = V[:, j].to(self.dtype)
                nv = float(self.reduce_inner(torch.dot(v, v).reshape(1).to(torch.float64)).sqrt())
                if nv == 0.0:
                    cols.append(torch.zeros_like(v))
                    continue
                if self._length is None:
                    self._calibrate(w0, v, nv)
                cols.append(self._column(w0, v, nv))
        finally:
            sh.assign(w0)
        out = torch.stack(cols, dim=1)
        bad = torch.tensor([0.0 if bool(torch.isfinite(out).all()) else 1.0], dtype=torch.float64)
        if float(self.reduce_inner(bad)[0]):
            raise NonFiniteError(
                "a sharded Hessian product is NaN or Inf: the gradients overflow along the "
                f"finite-difference steps (use {arg('dtype')} float64)."
            )
        graph_account(self.problem).record.update(self.info)
        return out

    _length: float | None = None  # the step length h ||v|| in weight space, once calibrated

    def _gradients(self, w0: torch.Tensor, v: torch.Tensor, h: float, ts) -> dict:
        out = {}
        for t in ts:
            self.sharding.assign(w0 + (t * h) * v)
            _, out[t] = self.sharding.gradient()
        return out

    def _norms(self, *xs: torch.Tensor) -> list[float]:
        """Global 2-norms of local vectors, in one all-reduce."""
        sq = self.reduce_inner(torch.stack([(x.to(torch.float64) ** 2).sum() for x in xs]))
        return [float(x) ** 0.5 for x in sq]

    def _stencils(self, g: dict, h: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2-point and 4-point central differences from gradients at ``t h``."""
        d1 = (g[1] - g[-1]) / (2 * h)
        d2 = (g[2] - g[-2]) / (4 * h)
        return d1, (4 * d1 - d2) / 3

    def _calibrate(self, w0: torch.Tensor, v: torch.Tensor, nv: float) -> None:
        r"""Choose the step length on the first column (6 gradients, once).

        Starts from :math:`h_0 \lVert v\rVert = \epsilon^{1/5} \max(1, \lVert w\rVert_\infty)`;
        shrinks it 100-fold (at most :data:`KINK_RETRIES` times) while the 2-point and
        4-point results disagree by more than :data:`KINK_LIMIT` (a kink of ReLU or max
        pooling crossed inside the stencil); then measures the 4-point truncation error by
        Richardson (the 4-point difference at ``2h`` against ``h``: their errors differ
        16-fold) and the round-off :math:`1.5 \epsilon \lVert g\rVert / h`, and takes the
        step minimising their sum (never above the start).
        """
        eps = float(torch.finfo(self.dtype).eps)
        length = eps ** 0.2 * max(1.0, self.sharding.max_abs(w0))
        retries = 0
        while True:
            h = length / nv
            g = self._gradients(w0, v, h, (1, -1, 2, -2, 4, -4))
            d1, h4 = self._stencils(g, h)
            h4_2h = (8 * (g[2] - g[-2]) - (g[4] - g[-4])) / (24 * h)
            diff, norm, rich, gnorm = self._norms(d1 - h4, h4, h4_2h - h4, g[1])
            norm = norm or 1.0
            if diff / norm <= KINK_LIMIT or retries == KINK_RETRIES:
                break
            retries += 1
            length /= 100.0
        trunc = rich / 15.0 / norm
        roundoff = 1.5 * eps * gnorm / (h * norm)
        best = length
        if trunc > 0:
            best = min(length, length * (roundoff / (4.0 * trunc)) ** 0.2)
            best = max(best, length / 100.0)
        ratio = best / length
        self._length = best
        self.info.update(
            step=best,
            calibration_step=length,
            kink_retries=retries,
            truncation_estimate=trunc * ratio**4,
            roundoff_estimate=roundoff / ratio,
            relative_to="||H v|| of the first column",
            gradients_per_column=4,
            calibration_gradients=6 * (retries + 1),
        )

    def _column(self, w0: torch.Tensor, v: torch.Tensor, nv: float) -> torch.Tensor:
        """One column by the 4-point stencil at the current step, the step cut where needed.

        The column's own 2-point error ``e2`` (relative to ``||H v||``) predicts its 4-point
        truncation as ``e2^2`` (the :math:`(h/L)^4` scaling of a loss analytic within
        :math:`L`; 1.2 times the measured error on the tiny transformer). A kink (``e2`` above
        :data:`KINK_LIMIT`) cuts the step 100-fold; a predicted truncation above
        :data:`CUT_RATIO` times the round-off cuts it to the step minimising their sum
        (at most 100-fold). Either way the column is taken again, and the cut step is kept
        for the later columns (it only decreases).
        """
        eps = float(torch.finfo(self.dtype).eps)
        for attempt in range(KINK_RETRIES + 2):
            length = float(self._length)
            h = length / nv
            g = self._gradients(w0, v, h, (1, -1, 2, -2))
            d1, hv = self._stencils(g, h)
            diff, norm, gnorm = self._norms(d1 - hv, hv, g[1])
            norm = norm or 1.0
            two = diff / norm
            roundoff = 1.5 * eps * gnorm / (h * norm)
            if attempt == KINK_RETRIES + 1:
                break
            if two > KINK_LIMIT:
                self._length = length / 100.0
                self.info["kinked_columns"] = self.info.get("kinked_columns", 0) + 1
                continue
            if two * two > CUT_RATIO * roundoff:
                ratio = max(0.01, (roundoff / (4.0 * two * two)) ** 0.2)
                self._length = length * ratio
                self.info["step_cuts"] = self.info.get("step_cuts", 0) + 1
                continue
            break
        info = self.info
        info["step"] = float(self._length)
        info["two_point_error"] = max(two, info.get("two_point_error", 0.0))
        info["error_estimate"] = max(two * two + roundoff, info.get("error_estimate", 0.0))
        return hv

    def _name_nonfinite(self, V: torch.Tensor) -> None:  # pragma: no cover - checked above
        raise NonFiniteError("a sharded Hessian product is NaN or Inf.")

    # --------------------------------------------------------------- algebra
    def _combined(self, *_: Any) -> Any:
        refuse_sharded(self, "combining the sharded Hessian with other operators")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = _combined
    __neg__ = _combined

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            self._combined()
        return self.matmat(other)

    def dense(self, *, force: bool = False, chunk: int = 64) -> torch.Tensor:
        """Refused: the matrix is spread over the ranks."""
        self._combined()
        raise AssertionError  # pragma: no cover

    def to_scipy(self, dtype: Any = None):
        """Refused: scipy would take one rank's rows for the whole vector."""
        self._combined()

    # --------------------------------------------------------------- views
    def block(self, name: str) -> CurvatureOperator:
        """Only ``"all"``: blocks need other parameter selections, refused in sharded mode."""
        if self.problem.block_param_names(name) == list(self.problem.names):
            return self
        self.problem._refuse_sharded(f"the block {name!r}")
        raise AssertionError  # pragma: no cover

    def _with_problem(self, problem: Problem) -> CurvatureOperator:
        self.problem._refuse_sharded("another parameter selection or sample set")
        raise AssertionError  # pragma: no cover
