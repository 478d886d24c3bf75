r"""The generalised Gauss-Newton matrix as an operator (Schraudolph 2002; Brunn eq. 33-36)."""

from __future__ import annotations

from collections.abc import Callable

import torch

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

        with p.mode():
            out, vjp_fn = torch.func.vjp(f, params)
            if k == 1:  # vmap over one column only adds overhead
                JV = jvp({n: t[0] for n, t in tangents.items()}).unsqueeze(0)
            else:
                JV = torch.func.vmap(jvp)(tangents)  # [k, n, ...]
            n = out.shape[0]
            apply = self._output_apply(out.detach(), batch)
            c = batch.weight / batch.size if p.reduction == "mean" else 1.0
            HJV = (c * apply(JV.reshape(k, n, -1))).reshape(JV.shape)
            if k == 1:
                (grads,) = vjp_fn(HJV[0])
                grads = {n: t.unsqueeze(0) for n, t in grads.items()}
            else:
                (grads,) = torch.func.vmap(vjp_fn)(HJV)
        # unselected parameters still require grad; no graph leaves an operator.
        return param_columns(p, grads, k).detach()
