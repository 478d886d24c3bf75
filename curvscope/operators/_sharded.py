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
from ..problem import Problem
from ._base import CurvatureOperator

__all__ = ["ShardedHessianOperator"]

STENCIL = "central-4-point"


class ShardedHessianOperator(CurvatureOperator):
    r"""The Hessian of a sharded problem (``Problem(..., shard=True)``) on local vectors.

    FSDP2 has no double backward over sharded parameters, so each column is the 4-point
    central difference of sharded full-data gradients,

    .. math::
        H v \approx \frac{8\,(g(w + h v) - g(w - h v)) - (g(w + 2 h v) - g(w - 2 h v))}{12 h},

    truncation :math:`O(h^4)`, round-off about :math:`1.5\,\epsilon \lVert g\rVert / h`, with
    :math:`h = \epsilon^{1/5} \max(1, \lVert w\rVert_\infty) / \lVert v\rVert` (norms over all
    ranks, so every rank takes the same step); 4 gradients (4 data passes) a column. The
    weights are perturbed in place on the local shards and restored from a saved copy.

    :attr:`info` (also ``problem.hvp_record``, a document's ``hvp``) records the stencil,
    the step :math:`h \lVert v\rVert` and, from the same four gradients at no extra cost,
    ``two_point_error`` (the largest :math:`\lVert D_h - H_4 v\rVert / \lVert H_4 v\rVert`
    over the products, :math:`D_h` the 2-point difference: the 2-point formula's error,
    :math:`O((h/L)^2)`), ``truncation_estimate`` (its square, the :math:`O((h/L)^4)` scaling
    of the 4-point error) and ``roundoff_estimate``.

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
        self.local_rows = sh.local_rows
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
    def shape(self) -> tuple[int, int]:
        """``(n_local, n_local)``: this rank's rows of the ``P x P`` matrix."""
        n = self.sharding.n_local
        return (n, n)

    @property
    def roundoff_eps(self) -> float:
        """The dtype's epsilon.

        A model computing in a lower precision inside is not measured in sharded mode: the
        measurement needs a forward outside FSDP.
        """
        return float(torch.finfo(self.dtype).eps)

    # --------------------------------------------------------------- products
    def _data_matmat(self, V: torch.Tensor) -> torch.Tensor:
        sh = self.sharding
        w0 = sh.vector()
        eps = float(torch.finfo(self.dtype).eps)
        scale = max(1.0, sh.max_abs(w0))
        cols = []
        try:
            for j in range(V.shape[1]):
                v = V[:, j].to(self.dtype)
                nv = float(self.reduce_inner(torch.dot(v, v).reshape(1).to(torch.float64)).sqrt())
                if nv == 0.0:
                    cols.append(torch.zeros_like(v))
                    continue
                h = eps ** 0.2 * scale / nv
                g = {}
                for t in (1, -1, 2, -2):
                    sh.assign(w0 + (t * h) * v)
                    _, g[t] = sh.gradient()
                d1 = (g[1] - g[-1]) / (2 * h)
                d2 = (g[2] - g[-2]) / (4 * h)
                hv = (4 * d1 - d2) / 3
                self._record(h * nv, d1, hv, g, h, eps)
                cols.append(hv)
        finally:
            sh.assign(w0)
        out = torch.stack(cols, dim=1)
        bad = torch.tensor([0.0 if bool(torch.isfinite(out).all()) else 1.0], dtype=torch.float64)
        if float(self.reduce_inner(bad)[0]):
            raise NonFiniteError(
                "a sharded Hessian product is NaN or Inf: the gradients overflow along the "
                f"finite-difference steps (use {arg('dtype')} float64)."
            )
        self.problem.hvp_record.update(self.info)
        return out

    def _record(self, step: float, d1, hv, g, h: float, eps: float) -> None:
        """Step and error estimates, from the four gradients of this product."""
        sq = torch.stack([((d1 - hv) ** 2).sum(), (hv * hv).sum(), (g[1] * g[1]).sum()])
        sq = self.reduce_inner(sq.to(torch.float64))
        diff, norm, gnorm = (float(x) ** 0.5 for x in sq)
        norm = norm or 1.0
        two = diff / norm
        info = self.info
        if "step" not in info:
            info["step"] = step
            info["roundoff_estimate"] = 1.5 * eps * gnorm / (h * norm)
            info["relative_to"] = "||H v|| of the first column"
        info["two_point_error"] = max(two, info.get("two_point_error", 0.0))
        info["truncation_estimate"] = info["two_point_error"] ** 2
        info["gradients_per_column"] = 4

    def _name_nonfinite(self, V: torch.Tensor) -> None:  # pragma: no cover - checked above
        raise NonFiniteError("a sharded Hessian product is NaN or Inf.")

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
