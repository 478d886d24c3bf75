r"""What the loss sees of the network, shared by the GGN, Fisher, PCH and KFAC operators.

Every approximation of the Hessian here splits the loss into a network ``f`` (whose outputs
are the logits) and a loss :math:`\ell` on those outputs. The total loss is
:math:`L = c \sum_b S_b(f(x_b))` with :math:`S_b` the batch's *sum over its terms*
(:mod:`curvscope._losses`) and :math:`c = 1/T` (``T`` terms in all) for mean reduction, 1 for
sum (docs/DESIGN.md "Mathematical conventions"). The output Hessian of :math:`S_b` is analytic
for the built-in losses (softmax cross-entropy: ``p*u - p (p.u)`` per term, never a double
backward through log-softmax) and taken by autograd otherwise.

``nll`` takes log-probabilities, which are linear in the loss: the matrices built on the
output Hessian then treat a final ``LogSoftmax`` module as part of the loss (cross-entropy on
its input) and refuse a model that does not end in one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._errors import UnsupportedModelError, arg
from .._losses import CrossEntropy, Loss, ModelLoss, get_loss
from ..problem import Batch, Inputs, Problem

__all__ = ["LossView", "low_rank_apply", "param_columns", "per_term_scale", "refuse_train_mode"]

ApplyFn = Callable[[torch.Tensor], torch.Tensor]


def refuse_train_mode(problem: Problem, matrix: str) -> None:
    """Raise for matrices built from per-sample quantities in train mode (docs/DESIGN.md "Modes").

    Raises:
        UnsupportedModelError: when ``problem.train_mode`` is set.
    """
    if problem.train_mode:
        raise UnsupportedModelError(
            f"the {matrix} matrix is built from per-sample quantities, which train-mode "
            f"BatchNorm couples through its batch statistics; analyse it without "
            f"{arg('train_mode')}.",
            matrix=matrix,
        )


def per_term_scale(problem: Problem, batch: Batch) -> float:
    """``c``: the weight of one loss term of ``batch`` in the total (``1/T`` or 1)."""
    if problem.reduction == "sum":
        return 1.0
    return batch.weight / batch.terms if batch.terms else 0.0


def _last_leaf(model: nn.Module) -> tuple[str, nn.Module]:
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    return leaves[-1]


class LossView:
    """The network output the loss is convex in, and the loss on it.

    Args:
        problem: the problem.
        matrix: the matrix name, for error messages.

    Raises:
        UnsupportedModelError: for a model that computes its own loss, and for ``nll`` on a
            model that does not end in a ``LogSoftmax`` module.
    """

    def __init__(self, problem: Problem, matrix: str) -> None:
        self.problem = problem
        self.matrix = matrix
        if isinstance(problem.loss_fn, ModelLoss):
            raise UnsupportedModelError(
                f"the {matrix} matrix needs the loss as a function of the model's outputs; with "
                f"the model's own loss ({arg('loss')} model) that function is inside the model: "
                "use the causal_lm or cross_entropy loss on its logits instead.",
                matrix=matrix,
            )
        self.logsoftmax: nn.Module | None = None
        self.loss: Loss = problem.loss_fn
        if problem.loss_name == "nll":
            name, last = _last_leaf(problem.model)
            if not isinstance(last, nn.LogSoftmax) or last.dim not in (1, -1):
                raise UnsupportedModelError(
                    f"the {matrix} matrix with the nll loss needs a model that ends in a "
                    "LogSoftmax module over its last dimension (nll takes log-probabilities, "
                    f"linear in the loss); its last module {name or 'model'!r} is "
                    f"{type(last).__name__}.",
                    matrix=matrix,
                    layer=name,
                )
            self.logsoftmax = last
            self.loss = get_loss("cross_entropy", ignore_index=problem.loss_fn.ignore_index)
            self._check_ends_in_logsoftmax(name)
        self.c = 1.0 / problem.num_terms if problem.reduction == "mean" else 1.0

    def _check_ends_in_logsoftmax(self, name: str) -> None:
        p = self.problem
        batch = next(iter(p.batches()))
        seen: list[torch.Tensor] = []
        handle = self.logsoftmax.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            with torch.no_grad(), p.mode():
                out = p.forward(dict(p.params), batch.inputs)
        finally:
            handle.remove()
        if len(seen) != 1 or not torch.equal(seen[0], out):
            raise UnsupportedModelError(
                f"the {self.matrix} matrix with the nll loss needs the LogSoftmax module "
                f"{name!r} to give the model's output, once; this model's forward does not.",
                matrix=self.matrix,
                layer=name,
            )

    # ------------------------------------------------------------------ forward
    def forward(self, params: dict[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
        """Model output the loss is convex in (the logits for ``nll``); call inside ``mode()``."""
        if self.logsoftmax is None:
            return self.problem.forward(params, inputs)
        handle = self.logsoftmax.register_forward_hook(lambda m, i, o: i[0])
        try:
            return self.problem.forward(params, inputs)
        finally:
            handle.remove()

    def sum_loss(self, out: torch.Tensor, y: Any) -> torch.Tensor:
        r""":math:`S_b`: the batch's loss summed over its terms (unweighted)."""
        return self.loss.sum_loss(out, y)

    # ------------------------------------------------------------------ output Hessian
    def hessian_apply(self, out: torch.Tensor, y: Any) -> ApplyFn:
        r"""``U [k, *out.shape] -> [k, *out.shape]``: the output Hessian of :math:`S_b` times U.

        Analytic for the built-in losses; for any other loss (a user's function,
        ``chen_nonconvex``) a forward-over-reverse product of :math:`S_b` in the outputs.
        """
        analytic = self.loss.hessian_apply(out, y)
        if analytic is not None:
            return analytic
        out = out.detach()
        grad_fn = torch.func.grad(lambda o: self.loss.sum_loss(o, y))

        def hvp(u: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(grad_fn, (out,), (u,))[1]

        def apply(U: torch.Tensor) -> torch.Tensor:
            if U.shape[0] == 1:
                return hvp(U[0]).unsqueeze(0)
            try:
                return torch.func.vmap(hvp)(U)
            except RuntimeError:  # a user loss vmap cannot batch: one column at a time
                return torch.stack([hvp(u) for u in U])

        return apply

    def _rows(self, out: torch.Tensor, y: Any) -> tuple[torch.Tensor, Any, torch.Tensor]:
        return self.loss.rows(out, y)

    def dense_hessians(self, out: torch.Tensor, y: Any) -> torch.Tensor:
        r"""Per-row :math:`\nabla^2 \ell`, ``[R, d, d]`` (rows: samples of ``[N, d]`` outputs)."""
        rows, t, keep = self._rows(out, y)
        name = self.loss.name
        if isinstance(self.loss, CrossEntropy):
            p = torch.softmax(rows, dim=-1) * keep.to(rows.dtype).unsqueeze(-1)
            return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        if name == "mse":
            eye = torch.eye(rows.shape[1], dtype=rows.dtype, device=rows.device)
            return 2.0 * eye.expand(rows.shape[0], -1, -1).clone()
        if name == "bce_with_logits":
            s = torch.sigmoid(rows)
            return torch.diag_embed(s * (1 - s))
        shape = out.shape[1:]

        def single(o: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return self.loss.sum_loss(o.reshape(1, *shape), yi.unsqueeze(0))

        return torch.func.vmap(torch.func.hessian(single))(rows, t)

    def dense_gradients(self, out: torch.Tensor, y: Any) -> torch.Tensor:
        r"""Per-row :math:`\nabla \ell`, ``[R, d]`` (analytic for cross-entropy)."""
        rows, t, keep = self._rows(out, y)
        if isinstance(self.loss, CrossEntropy):
            p = torch.softmax(rows, dim=-1)
            safe = t.clamp(min=0)
            g = p - torch.nn.functional.one_hot(safe, p.shape[1]).to(p.dtype)
            return g * keep.to(p.dtype).unsqueeze(-1)
        o = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.loss.sum_loss(o, y), o)
        return g.reshape(rows.shape)

    # ------------------------------------------------------------------ Fisher
    def require_likelihood(self) -> None:
        """Raise unless the loss is a known negative log-likelihood.

        Raises:
            UnsupportedModelError: for any other loss, naming it.
        """
        if self.loss.likelihood is None:
            raise UnsupportedModelError(
                f"the {self.matrix} matrix needs a loss that is a negative log-likelihood "
                f"(cross_entropy, causal_lm, mse, bce_with_logits, nll); the "
                f"{self.problem.loss_name} loss is not.",
                matrix=self.matrix,
            )

    def fisher_apply(self, out: torch.Tensor, y: Any) -> ApplyFn:
        r"""``U -> F_out U`` with the exact output Fisher.

        For every supported likelihood the output Fisher equals the output Hessian of the
        sum loss (categorical: :math:`\mathrm{diag}(p) - p p^T` per term; Gaussian with
        variance 1/2 per output entry, the scale of the squared error: :math:`2 I`;
        Bernoulli per entry: :math:`\mathrm{diag}(s(1-s))`), so the product is that one.
        """
        self.require_likelihood()
        return self.loss.hessian_apply(out, y)

    def _per_sample_rows(self, out: torch.Tensor) -> torch.Tensor:
        if out.dim() != 2:
            raise UnsupportedModelError(
                f"the {self.matrix} matrix with exact label expectations supports outputs of "
                f"shape [N, d]; these are {tuple(out.shape)} (one row per position): use its "
                "Monte-Carlo or empirical variant.",
                matrix=self.matrix,
            )
        return out

    def fisher_sqrt(self, out: torch.Tensor) -> torch.Tensor:
        r"""Columns ``Q [m, N, d]`` with :math:`\sum_j q_{ij} q_{ij}^T = F_{out,i}`, exact.

        Cross-entropy: :math:`q_{ic} = \sqrt{p_{ic}}(p_i - e_c)`, the exact sum over the
        model's predictive distribution. mse: :math:`\sqrt{2} e_j`. BCE:
        :math:`\sqrt{s(1-s)}` on each entry. All equal the output Hessian of the GGN.
        """
        self.require_likelihood()
        o2 = self._per_sample_rows(out)
        n, d = o2.shape
        eye = torch.eye(d, dtype=o2.dtype, device=o2.device)
        if isinstance(self.loss, CrossEntropy):
            p = torch.softmax(o2, dim=-1)
            diff = p.unsqueeze(0) - eye.unsqueeze(1)  # diff[c, i, :] = p_i - e_c
            return p.T.sqrt().unsqueeze(-1) * diff
        if self.loss.name == "mse":
            return math.sqrt(2.0) * eye.unsqueeze(1).expand(d, n, d)
        s = torch.sigmoid(o2)
        return (s * (1 - s)).sqrt().T.unsqueeze(-1) * eye.unsqueeze(1)

    def fisher_sqrt_columns(self, out: torch.Tensor, y: Any, block: int = 1 << 22):
        r"""Chunks ``Q [m, *out.shape]`` of exact output-Fisher square-root columns, any shape.

        Per sample, :math:`\sum q_i q_i^T` over all yielded columns is :math:`F_{out,i}`
        (the per-sample output flattened). ``[N, d]`` outputs: :meth:`fisher_sqrt`.
        Cross-entropy over ``[N, ..., V]`` (one categorical per position, independent given
        the input, so :math:`F_{out,i}` is block-diagonal over positions): one column per
        position ``t`` and class ``c``, :math:`\sqrt{p_{tc}}(p_t - e_c)` at ``t`` and zero
        elsewhere (positions without a term: none). mse / BCE: one column per output entry.
        Chunks hold at most about ``block`` entries.
        """
        self.require_likelihood()
        if out.dim() == 2:
            yield self.fisher_sqrt(out)
            return
        n = out.shape[0]
        if isinstance(self.loss, CrossEntropy):
            rows, _, keep = self._rows(out, y)
            p = torch.softmax(rows, dim=-1) * keep.to(rows.dtype).unsqueeze(-1)
            P = self._rows_to_out(p.unsqueeze(0), out)[0]
            V = P.shape[-1]
            P = P.reshape(n, -1, V)  # [n, L, V]
            m = max(1, block // out.numel())
            for t in range(P.shape[1]):
                pt = P[:, t]  # [n, V]
                if not bool((pt != 0).any()):
                    continue  # no term at this position in the batch
                for s in range(0, V, m):
                    cls = torch.arange(s, min(s + m, V), device=out.device)
                    diff = pt.unsqueeze(0) - torch.nn.functional.one_hot(cls, V).to(pt).unsqueeze(1)
                    Q = out.new_zeros(len(cls), n, P.shape[1], V)
                    Q[:, :, t] = pt.T[cls].sqrt().unsqueeze(-1) * diff
                    yield Q.reshape(len(cls), *out.shape)
            return
        flat = out.reshape(n, -1)
        D = flat.shape[1]
        if self.loss.name == "mse":
            w = torch.full_like(flat, math.sqrt(2.0))
        else:
            s = torch.sigmoid(flat)
            w = (s * (1 - s)).sqrt()
        m = max(1, block // out.numel())
        for s0 in range(0, D, m):
            idx = torch.arange(s0, min(s0 + m, D), device=out.device)
            Q = out.new_zeros(len(idx), n, D)
            Q[torch.arange(len(idx)), :, idx] = w[:, idx].T
            yield Q.reshape(len(idx), *out.shape)

    def sample_columns(self, out: torch.Tensor, y: Any, samples: int, gen: torch.Generator):
        r"""Monte-Carlo columns ``Q [S, *out.shape]`` with :math:`E[\sum_j q q^T] = F_{out}`.

        Labels are drawn from the model's predictive distribution with ``gen``, independently
        per term: categorical for cross-entropy (ignored positions get zero columns),
        :math:`y \sim N(f, \frac12 I)` for mse, Bernoulli per output for BCE; each column is the
        sum-loss gradient at the drawn labels divided by :math:`\sqrt{S}`.
        """
        self.require_likelihood()
        root = 1.0 / math.sqrt(samples)
        if isinstance(self.loss, CrossEntropy):
            rows, _, keep = self._rows(out, y)
            p = torch.softmax(rows, dim=-1)
            probs = p.detach().to("cpu", torch.float64)
            labels = torch.multinomial(probs, samples, replacement=True, generator=gen)
            onehot = torch.nn.functional.one_hot(labels.T, p.shape[1]).to(p.device, p.dtype)
            cols = root * (p.unsqueeze(0) - onehot) * keep.to(p.dtype).unsqueeze(-1)
            return self._rows_to_out(cols, out)
        shape = (samples, *out.shape)
        if self.loss.name == "mse":
            eps = torch.randn(shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
            # the gradient of (f - y)^2 at y = f + eps / sqrt(2) is -sqrt(2) eps
            return root * (-math.sqrt(2.0)) * eps
        s = torch.sigmoid(out)
        u = torch.rand(shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        return root * (s.unsqueeze(0) - (u < s.unsqueeze(0)).to(out.dtype))

    def _rows_to_out(self, cols: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Row columns ``[S, R, d]`` back to the output's layout ``[S, *out.shape]``."""
        S = cols.shape[0]
        if cols[0].numel() == out.numel():
            return cols.reshape(S, *out.shape)
        # causal_lm: rows cover positions 0..T-2; the last position has no term
        B, T, V = out.shape
        body = cols.reshape(S, B, T - 1, V)
        return torch.cat([body, torch.zeros_like(body[:, :, :1])], dim=2)

    def label_columns(self, out: torch.Tensor, y: Any) -> torch.Tensor:
        r"""Observed-label gradients, as ``Q [1, *out.shape]``, for the empirical Fisher.

        Sample ``i``'s row is :math:`\nabla_f S_i / \sqrt{T_i}` with mean reduction (so that
        ``c q q^T`` is :math:`(T_i/T)\, \nabla \bar\ell_i \nabla \bar\ell_i^T`, the sample's
        share of the empirical Fisher, :class:`EmpiricalFisherOperator`), and
        :math:`\nabla_f S_i` with sum reduction.
        """
        o = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.sum_loss(o, y), o)
        if self.problem.reduction == "mean":
            terms = self.loss.sample_terms(y).to(g.device, g.dtype).clamp(min=1)
            g = g / terms.sqrt().reshape(-1, *([1] * (g.dim() - 1)))
        return g.unsqueeze(0)


def low_rank_apply(Q: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``sum_j q_j q_j^T u`` per sample: ``Q [m, n, d]``, ``U [k, n, d]`` -> ``[k, n, d]``."""
    coef = torch.einsum("jnb,knb->jkn", Q, U)
    return torch.einsum("jna,jkn->kna", Q, coef)


def param_columns(problem: Problem, tree: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Dict of ``[k, *shape]`` tensors (selected names) -> flat columns ``[P, k]``."""
    return torch.cat([tree[n].reshape(k, -1) for n in problem.names], dim=1).T
