r"""The Hessian of the loss as an operator: double backward, jvp of grad, or differences."""

from __future__ import annotations

from enum import Enum

import torch

from .._errors import OptionError, arg
from ..problem import Batch, Problem, zeros_for_none
from ._base import CurvatureOperator

__all__ = ["HVPMode", "HessianOperator", "missing_double_backward"]


class HVPMode(str, Enum):
    """How Hessian-vector products are taken."""

    AUTO = "auto"
    DOUBLE_BACKWARD = "double-backward"
    FORWARD_OVER_REVERSE = "forward-over-reverse"
    FINITE_DIFFERENCE = "finite-difference"


MAX_VMAP_COLUMNS = 32
"""Columns vmapped together; more are processed in chunks of this size to bound memory."""


def missing_double_backward(exc: BaseException) -> bool:
    """Whether ``exc`` says an operation of the model has no second derivative.

    Seen: cuDNN RNNs ("double backward ... not supported"), fused attention kernels and
    custom autograd functions whose backward is not differentiable.
    """
    text = str(exc).lower()
    return isinstance(exc, NotImplementedError) or any(
        key in text
        for key in (
            "double backward",
            "not implemented",
            "does not support",
            "is not differentiable",
            "derivative for",
            "backward can only be called in training mode",
        )
    )


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_w L(w)` of the full-data loss.

    .. math::
        H = c \sum_b \nabla^2_w S_b(w) + \lambda I,
        \qquad c = 1/T \text{ (mean) or } 1 \text{ (sum)}.

    ``mode``:

    - ``double-backward`` (reverse-over-reverse): exact; ``k`` columns share one forward and
      first backward pass (graph retained). Measured on the 2-core CPU (digits-mlp, 1797
      samples): one product costs 2.5 gradients, 8 columns 9.6 gradients against 13.3 for
      vmap of jvp-of-grad and 18.5 for 8 separate products.
    - ``forward-over-reverse``: ``torch.func.jvp`` of ``torch.func.grad``, vmapped over
      columns; agrees with double backward to round-off.
    - ``finite-difference``: the central difference of two full-data gradients,
      :math:`(g(w + h v) - g(w - h v)) / (2h)`, for models whose operations have no second
      derivative. The step is :math:`h = \epsilon^{1/3} \max(1, \lVert w\rVert_\infty) /
      \lVert v\rVert` (balancing truncation :math:`O(h^2)` against round-off
      :math:`O(\epsilon/h)`); the first product measures both (Richardson against a
      doubled step, and :math:`\epsilon \lVert g\rVert / h`) and :attr:`info` records them.
      Use float64: in float32 the relative error is about 1e-3 at best.
    - ``auto``: double backward; when an operation of the model has no double backward, it
      switches to finite differences and :attr:`notes` says so.

    TorchScript modules use double backward through their own parameters, one column at a
    time (torch.func cannot transform them).

    Args:
        problem: model, loss, data and parameter selection.
        mode: see above.
    """

    name = "hessian"

    def __init__(self, problem: Problem, *, mode: str | HVPMode = HVPMode.AUTO) -> None:
        try:
            mode = HVPMode(mode)
        except ValueError:
            valid = ", ".join(m.value for m in HVPMode)
            raise OptionError(
                f"{arg('hvp')} {mode!r} is not known; choose one of {valid}.", option="hvp"
            ) from None
        super().__init__(problem, mode=mode)
        self.mode = mode
        self.info: dict = {"hvp": mode.value}
        if problem.scripted:
            self.notes.append(
                "TorchScript model: torch.func cannot transform it, so Hessian products use "
                "double backward, one column at a time."
            )
        if mode is HVPMode.FINITE_DIFFERENCE:
            self._fd_note()

    def _fd_note(self) -> None:
        self.notes.append(
            "Hessian products by central differences of full-data gradients (step and error "
            "estimates in the document); use float64 for accuracy."
            + (
                " The run is in float32: expect relative errors near 1e-3."
                if self.problem.dtype == torch.float32
                else ""
            )
        )

    # ------------------------------------------------------------------ dispatch
    def _data_matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.mode is HVPMode.FINITE_DIFFERENCE:
            return self._finite_difference(V)
        try:
            return super()._data_matmat(V)
        except (RuntimeError, NotImplementedError) as exc:
            if self.mode is not HVPMode.AUTO or not missing_double_backward(exc):
                raise
            self.mode = HVPMode.FINITE_DIFFERENCE
            self.info["hvp"] = "finite-difference"
            self.info["fallback_reason"] = str(exc).splitlines()[0][:200]
            self.notes.append(
                "an operation of the model has no double backward "
                f"({self.info['fallback_reason']}); Hessian products fell back to finite "
                "differences of gradients."
            )
            self._fd_note()
            return self._finite_difference(V)

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        if self.problem.scripted or self.mode in (HVPMode.DOUBLE_BACKWARD, HVPMode.AUTO):
            return self._double_backward(batch, V)
        k = V.shape[1]
        return torch.cat(
            [
                self._forward_over_reverse(batch, V[:, i : i + MAX_VMAP_COLUMNS])
                for i in range(0, k, MAX_VMAP_COLUMNS)
            ],
            dim=1,
        )

    # ------------------------------------------------------------------ exact products
    def _double_backward(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        p = self.problem
        k = V.shape[1]
        with p.mode(), torch.enable_grad(), p.leaves() as leaves:
            values = list(leaves.values())
            loss = p.batch_loss(leaves, batch)
            if not loss.requires_grad:  # no selected parameter affects this batch
                return torch.zeros_like(V)
            grads = torch.autograd.grad(loss, values, create_graph=True, allow_unused=True)
            # parameters that do not affect the loss (unused heads) have no gradient:
            # their rows and columns of H are zero
            live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
            out = []
            # TorchScript modules rebuild the graph per column (their own tensors)
            for j in range(k):
                if not live:
                    out.append(torch.zeros_like(V[:, j]))
                    continue
                vs = p.unflatten(V[:, j])
                gv = sum((g * vs[p.names[i]]).sum() for i, g in live)
                hv = torch.autograd.grad(gv, values, retain_graph=j + 1 < k, allow_unused=True)
                out.append(p.flatten(zeros_for_none(hv, values)))
        return torch.stack(out, dim=1).detach()

    def _forward_over_reverse(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        p = self.problem
        params = {n: t.detach() for n, t in p.params.items()}

        def loss(ps):
            return p.batch_loss(ps, batch)

        grad_fn = torch.func.grad(loss)

        def hvp(v_flat):
            tangents = p.unflatten(v_flat)
            return p.flatten(torch.func.jvp(grad_fn, (params,), (tangents,))[1])

        with p.mode():
            out = (
                torch.func.vmap(hvp, in_dims=1, out_dims=1)(V)
                if V.shape[1] > 1
                else hvp(V[:, 0]).unsqueeze(1)
            )
        return out

    # ------------------------------------------------------------------ differences
    def _gradient(self, w: torch.Tensor) -> torch.Tensor:
        """The data term's gradient at flat weights ``w`` (weight decay is added outside)."""
        p = self.problem
        _, g = p.loss_and_grad(w)
        if p.weight_decay:
            g = g - p.weight_decay * w
        return g

    def step(self, v: torch.Tensor) -> float:
        """The finite-difference step for direction ``v`` (see the class docstring)."""
        w = self.problem.param_vector()
        eps = torch.finfo(self.dtype).eps
        scale = max(1.0, float(w.abs().max()))
        norm = float(torch.linalg.vector_norm(v))
        return eps ** (1.0 / 3.0) * scale / max(norm, 1e-300)

    def _finite_difference(self, V: torch.Tensor) -> torch.Tensor:
        w = self.problem.param_vector()
        cols = []
        for j in range(V.shape[1]):
            v = V[:, j]
            if not bool((v != 0).any()):
                cols.append(torch.zeros_like(v))
                continue
            h = self.step(v)
            d1 = (self._gradient(w + h * v) - self._gradient(w - h * v)) / (2 * h)
            if "truncation_estimate" not in self.info:
                self._calibrate(w, v, h, d1)
            cols.append(d1)
        return torch.stack(cols, dim=1)

    def _calibrate(self, w: torch.Tensor, v: torch.Tensor, h: float, d1: torch.Tensor) -> None:
        """Estimate the relative truncation (Richardson) and round-off errors once."""
        d2 = (self._gradient(w + 2 * h * v) - self._gradient(w - 2 * h * v)) / (4 * h)
        scale = float(torch.linalg.vector_norm(d1)) or 1.0
        g = self._gradient(w)
        eps = torch.finfo(self.dtype).eps
        vnorm = float(torch.linalg.vector_norm(v))
        self.info.update(
            step=h * vnorm,
            truncation_estimate=float(torch.linalg.vector_norm(d2 - d1)) / 3.0 / scale,
            roundoff_estimate=eps * float(torch.linalg.vector_norm(g)) / (h * scale),
            relative_to="||H v|| of the first column",
            extra_gradients=3,
        )
