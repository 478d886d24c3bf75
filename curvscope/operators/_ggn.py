r"""The generalised Gauss-Newton matrix as an operator (Schraudolph 2002; Brunn eq. 33-36)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD

from ..problem import Batch, Problem
from ._base import CurvatureOperator
from ._outputs import LossView, param_columns

__all__ = ["GGNOperator"]

ApplyFn = Callable[[torch.Tensor], torch.Tensor]


class GGNOperator(CurvatureOperator):
    r"""The generalised Gauss-Newton matrix of the loss.

    .. math::
        G = c \sum_{i=1}^N J_i^T \, \nabla^2_f \ell_i \, J_i + \lambda I,
        \qquad c = 1/N \text{ (mean) or } 1 \text{ (sum)},

    with :math:`J_i` the Jacobian of the network output (the logits) for sample ``i`` and
    :math:`\nabla^2_f \ell_i` the Hessian of torch's per-sample loss in those outputs:
    :math:`\mathrm{diag}(p_i) - p_i p_i^T` for cross-entropy, :math:`2/d\,I` for mse with
    mean reduction (2 I for sum), :math:`\mathrm{diag}(s(1-s))` for BCE-with-logits (divided
    by ``d`` under mean reduction, which also averages over outputs), and autograd for any
    other loss (``chen_nonconvex``: indefinite, so this GGN is too). ``nll`` is read as
    cross-entropy on the input of the model's final ``LogSoftmax``.

    Product (Brunn 2018, eq. 33-36): per batch, ``J V`` by ``torch.func.jvp`` vmapped over the
    ``k`` columns, the output-Hessian product, then ``J^T`` by one ``torch.func.vjp`` (shared
    forward pass) vmapped over the columns. Batch weights follow the problem (``n_b/N`` or 1),
    so the matrix carries the same normalisation as :class:`HessianOperator`.

    Args:
        problem: model, loss, data and parameter selection.

    Raises:
        UnsupportedModelError: for TorchScript models, and for ``nll`` without a final
            ``LogSoftmax``.
    """

    name = "ggn"

    def __init__(self, problem: Problem, **knobs) -> None:
        super().__init__(problem, **knobs)
        self.view = LossView(problem, self.name)

    def _output_apply(self, out: torch.Tensor, batch: Batch) -> ApplyFn:
        """Per-sample output matrix (unscaled by ``c``) as ``U [k, n, d] -> [k, n, d]``."""
        return self.view.hessian_apply(out, batch.y)

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        p = self.problem
        k = V.shape[1]
        params = {n: t.detach() for n, t in p.params.items()}
        tangents = p.unflatten(V)

        def f(ps: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.view.forward(ps, batch.x)

        def jvp(t: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.jvp(f, (params,), (t,))[1]

        c = batch.weight / batch.size if p.reduction == "mean" else 1.0
        with p.mode():
            if k == 1:
                return self._one_column(batch, V, c)
            out, vjp_fn = torch.func.vjp(f, params)
            JV = torch.func.vmap(jvp)(tangents)  # [k, n, ...]
            n = out.shape[0]
            apply = self._output_apply(out.detach(), batch)
            HJV = (c * apply(JV.reshape(k, n, -1))).reshape(JV.shape)
            (grads,) = torch.func.vmap(vjp_fn)(HJV)
        # unselected parameters still require grad; no graph leaves an operator.
        return param_columns(p, grads, k).detach()

    def _one_column(self, batch: Batch, V: torch.Tensor, c: float) -> torch.Tensor:
        """One column: one forward pass carries the tangent (dual numbers) and the graph.

        This saves the second forward pass of jvp followed by vjp.
        """
        p = self.problem
        tangents = p.unflatten(V[:, 0])
        with torch.enable_grad(), fwAD.dual_level():
            leaves = {n: t.detach().requires_grad_(True) for n, t in p.params.items()}
            duals = {n: fwAD.make_dual(leaves[n], tangents[n]) for n in leaves}
            primal, JV = fwAD.unpack_dual(self.view.forward(duals, batch.x))
            JV = torch.zeros_like(primal) if JV is None else JV.detach()
        # outside the dual level: autograd output Hessians use forward mode themselves
        with torch.enable_grad():
            n = primal.shape[0]
            apply = self._output_apply(primal.detach(), batch)
            HJV = (c * apply(JV.reshape(1, n, -1))).reshape(primal.shape)
            grads = torch.autograd.grad(primal, list(leaves.values()), HJV, allow_unused=True)
        cols = [
            torch.zeros_like(t) if g is None else g
            for g, t in zip(grads, leaves.values(), strict=True)
        ]
        return torch.cat([g.reshape(-1) for g in cols]).unsqueeze(1).detach()
