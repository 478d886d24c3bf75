r"""The generalised Gauss-Newton matrix as an operator (Schraudolph 2002; Brunn eq. 33-36)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD

from .._errors import UnsupportedModelError
from ..problem import Batch, Problem
from ._base import CurvatureOperator, once_differentiable_functions
from ._outputs import LossView, param_columns, per_term_scale

__all__ = ["GGNOperator", "missing_forward_ad"]

ApplyFn = Callable[[torch.Tensor], torch.Tensor]


def missing_forward_ad(exc: BaseException) -> bool:
    """Whether ``exc`` says an operation has no forward-mode derivative (or torch.func refused).

    Seen: ``NotImplementedError`` for ``mkldnn_rnn_layer`` (LSTM on the CPU) and the
    stateless API's refusal of TorchScript modules.
    """
    text = str(exc)
    return isinstance(exc, NotImplementedError) or any(
        key in text
        for key in ("forward AD", "forward-mode", "Forward AD", "jvp", "Jitted", "not implemented")
    )


class GGNOperator(CurvatureOperator):
    r"""The generalised Gauss-Newton matrix of the loss.

    .. math::
        G = c \sum_b J_b^T \, \nabla^2_f S_b \, J_b + \lambda I,
        \qquad c = 1/T \text{ (mean) or } 1 \text{ (sum)},

    with :math:`J_b` the Jacobian of the network outputs (the logits) of batch ``b``,
    :math:`S_b` its loss summed over its terms and ``T`` the terms in all: per term
    :math:`\mathrm{diag}(p) - p p^T` for cross-entropy (also over ``[B, T, V]`` logits and for
    ``causal_lm``), :math:`2 I` for the squared error per output entry,
    :math:`\mathrm{diag}(s(1-s))` for BCE-with-logits, and autograd for any other loss
    (``chen_nonconvex``, a user's function: indefinite when the loss is not convex in the
    outputs). ``nll`` is read as cross-entropy on the input of the model's final ``LogSoftmax``.

    Product (Brunn 2018, eq. 33-36): per batch, ``J V`` by ``torch.func.jvp`` vmapped over the
    ``k`` columns, the output-Hessian product, then ``J^T`` by one ``torch.func.vjp`` (shared
    forward pass) vmapped over the columns. Where forward mode is missing (TorchScript
    modules, an operation without a forward derivative such as the CPU LSTM kernel) ``J v``
    is taken as a derivative of a vector-Jacobian product (two reverse passes), and
    :attr:`notes` says so.

    Args:
        problem: model, loss, data and parameter selection.

    Raises:
        UnsupportedModelError: for a model that computes its own loss, and for ``nll`` without
            a final ``LogSoftmax``.
    """

    name = "ggn"
    max_output_entries = 1 << 23
    """Output entries (times columns) of one slice of a batch; see :meth:`_slice_samples`."""
    slice_outputs = True

    def __init__(self, problem: Problem, **knobs) -> None:
        super().__init__(problem, **knobs)
        self.view = LossView(problem, self.name)
        self._reverse = problem.scripted
        self._entries_per_sample: int | None = None
        if problem.scripted:
            self.notes.append(
                f"TorchScript model: the {self.name} products take J v by two reverse passes "
                "(torch.func cannot transform it)."
            )

    def _output_apply(self, out: torch.Tensor, batch: Batch) -> ApplyFn:
        """The output matrix of the batch's sum loss as ``U [k, *out.shape] -> same``."""
        return self.view.hessian_apply(out, batch.y)

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        c = per_term_scale(self.problem, batch)
        step = self._slice_samples(batch, V.shape[1])
        if step >= batch.size:
            return self._product(batch, V, c)
        out = None
        for s in range(0, batch.size, step):
            part = self._product(batch.narrow(s, s + step), V, c)
            out = part if out is None else out.add_(part)
        return out

    def _slice_samples(self, batch: Batch, k: int) -> int:
        """Samples per slice, so that ``k`` columns of outputs stay under ``max_output_entries``.

        A large output (the logits of a 50k vocabulary) and the tangents and products the size
        of it set the memory of a product: above ``max_output_entries`` entries a batch is
        taken in slices of samples and the parts summed (exact: in eval mode the samples do not
        interact). Slicing is used only when the first batch shows that they do not: sample 1
        gives the same output alone as after sample 0 (an RNN or attention over the leading
        dimension fails this and is never sliced).
        """
        if not self.slice_outputs or batch.size < 2:
            return batch.size
        if self._entries_per_sample is None:
            self._entries_per_sample = self._independent_entries(batch)
        entries = self._entries_per_sample
        if not entries or entries * batch.size * k <= self.max_output_entries:
            return batch.size
        return max(1, self.max_output_entries // (entries * k))

    def _independent_entries(self, batch: Batch) -> int:
        """Output entries per sample when samples are independent along dim 0, else 0."""
        p = self.problem
        try:
            with torch.no_grad(), p.mode():
                both = self.view.forward(p.params, batch.narrow(0, 2).inputs)
                alone = self.view.forward(p.params, batch.narrow(1, 2).inputs)
        except Exception:  # noqa: BLE001 - a model that cannot run on a slice is never sliced
            return 0
        if not (
            isinstance(both, torch.Tensor)
            and isinstance(alone, torch.Tensor)
            and both.dim()
            and both.shape[0] == 2
            and alone.shape[0] == 1
            and torch.allclose(both[1:], alone, rtol=1e-4, atol=1e-6 * float(both.abs().max()))
        ):
            return 0
        return alone.numel()

    def _product(self, batch: Batch, V: torch.Tensor, c: float) -> torch.Tensor:
        if not self._reverse:
            try:
                return self._forward_mode(batch, V, c)
            except (NotImplementedError, RuntimeError) as exc:
                if not missing_forward_ad(exc):
                    raise
                self._reverse = True
                self.notes.append(
                    f"an operation of the model has no forward-mode derivative "
                    f"({str(exc).splitlines()[0][:120]}); the {self.name} products take J v by "
                    "two reverse passes instead."
                )
        return self._reverse_mode(batch, V, c)

    def _forward_mode(self, batch: Batch, V: torch.Tensor, c: float) -> torch.Tensor:
        p = self.problem
        k = V.shape[1]
        if k == 1:
            return self._one_column(batch, V, c)
        params = {n: t.detach() for n, t in p.params.items()}
        tangents = p.unflatten(V)

        def f(ps: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.view.forward(ps, batch.inputs)

        def jvp(t: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.jvp(f, (params,), (t,))[1]

        with p.mode():
            out, vjp_fn = torch.func.vjp(f, params)
            JV = torch.func.vmap(jvp)(tangents)  # [k, *out.shape]
            apply = self._output_apply(out.detach(), batch)
            HJV = c * apply(JV)
            (grads,) = torch.func.vmap(vjp_fn)(HJV)
        # unselected parameters still require grad; no graph leaves an operator.
        return param_columns(p, grads, k).detach()

    def _one_column(self, batch: Batch, V: torch.Tensor, c: float) -> torch.Tensor:
        """One column: one forward pass carries the tangent (dual numbers) and the graph.

        This saves the second forward pass of jvp followed by vjp.
        """
        p = self.problem
        tangents = p.unflatten(V[:, 0])
        with p.mode(), torch.enable_grad(), fwAD.dual_level():
            leaves = {n: t.detach().requires_grad_(True) for n, t in p.params.items()}
            duals = {n: fwAD.make_dual(leaves[n], tangents[n]) for n in leaves}
            primal, JV = fwAD.unpack_dual(self.view.forward(duals, batch.inputs))
            JV = torch.zeros_like(primal) if JV is None else JV.detach()
        # outside the dual level: autograd output Hessians use forward mode themselves
        with torch.enable_grad():
            apply = self._output_apply(primal.detach(), batch)
            # an analytic product may write over J v (no third logits-sized tensor)
            HJV = getattr(apply, "in_place", apply)(JV.unsqueeze(0))[0]
            del JV
            HJV = HJV.mul_(c) if c != 1 else HJV
            if not primal.requires_grad:
                return torch.zeros_like(V)
            grads = torch.autograd.grad(primal, list(leaves.values()), HJV, allow_unused=True)
        cols = [
            torch.zeros_like(t) if g is None else g
            for g, t in zip(grads, leaves.values(), strict=True)
        ]
        return torch.cat([g.reshape(-1) for g in cols]).unsqueeze(1).detach()

    def _reverse_mode(self, batch: Batch, V: torch.Tensor, c: float) -> torch.Tensor:
        r"""``J v`` as the derivative in ``u`` of ``v . (J^T u)``: two reverse passes, no jvp."""
        p = self.problem
        k = V.shape[1]
        with p.mode(), torch.enable_grad(), p.leaves() as leaves:
            values = list(leaves.values())
            out = self.view.forward(leaves, batch.inputs)
            if not out.requires_grad:
                return torch.zeros_like(V)
            u = torch.zeros_like(out, requires_grad=True)
            g = torch.autograd.grad(out, values, u, create_graph=True, allow_unused=True)
            live = [(i, gi) for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
            once = once_differentiable_functions([gi for _, gi in live])
            if once:  # torch would give a J v without those functions' terms, silently
                raise UnsupportedModelError(
                    f"the {self.name} matrix needs J v, and this model supports neither "
                    f"forward mode nor double backward (the custom autograd Function "
                    f"{', '.join(once)} is differentiable only once); analyse the Hessian with "
                    "finite-difference products instead.",
                    matrix=self.name,
                )
            cols = []
            for j in range(k):
                vs = p.unflatten(V[:, j])
                if not live:
                    cols.append(torch.zeros_like(V[:, j]))
                    continue
                gv = sum((gi * vs[p.names[i]]).sum() for i, gi in live)
                try:
                    (jv,) = torch.autograd.grad(gv, u, retain_graph=True)
                except RuntimeError as exc:
                    raise UnsupportedModelError(
                        f"the {self.name} matrix needs J v, and this model supports neither "
                        f"forward mode nor double backward ({str(exc).splitlines()[0][:160]})"
                        "; analyse the Hessian with finite-difference products instead.",
                        matrix=self.name,
                    ) from None
                hjv = c * self._output_apply(out.detach(), batch)(jv.detach().unsqueeze(0))[0]
                gs = torch.autograd.grad(out, values, hjv, retain_graph=True, allow_unused=True)
                cols.append(
                    p.flatten(
                        [
                            torch.zeros_like(t) if x is None else x
                            for x, t in zip(gs, values, strict=True)
                        ]
                    )
                )
        return torch.stack(cols, dim=1).detach()
