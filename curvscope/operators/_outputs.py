r"""What the loss sees of the network, shared by the GGN, Fisher, PCH and KFAC operators.

Every approximation of the Hessian here splits the loss into a network ``f`` (whose outputs
are the logits) and a per-sample loss :math:`\ell_i` convex in those outputs. The total loss
is :math:`L = c \sum_i \ell_i(f(x_i))` with :math:`c = 1/N` for mean reduction and 1 for sum
(DESIGN.md "Mathematical conventions"); :math:`\ell_i` is torch's per-sample loss: with mean
reduction ``mse`` and ``bce_with_logits`` also average over the ``d`` output entries.

``nll`` takes log-probabilities, which are linear in the loss: the matrices built on the
output Hessian then treat a final ``LogSoftmax`` module as part of the loss (cross-entropy on
its input) and refuse a model that does not end in one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .._errors import UnsupportedModelError
from .._losses import get_loss
from ..problem import Batch, Problem

__all__ = ["LossView", "refuse_train_mode"]

ApplyFn = Callable[[torch.Tensor], torch.Tensor]


def refuse_train_mode(problem: Problem, matrix: str) -> None:
    """Raise for matrices built from per-sample quantities in train mode (DESIGN.md "Modes").

    Raises:
        UnsupportedModelError: when ``problem.train_mode`` is set.
    """
    if problem.train_mode:
        raise UnsupportedModelError(
            f"the {matrix} matrix is built from per-sample quantities, which train-mode "
            "BatchNorm couples through its batch statistics; drop --train-mode for it."
        )


def _last_leaf(model: nn.Module) -> tuple[str, nn.Module]:
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    return leaves[-1]


class LossView:
    """The network output the loss is convex in, and the per-sample loss on it.

    Args:
        problem: the problem.
        matrix: the matrix name, for error messages.

    Raises:
        UnsupportedModelError: for TorchScript models (``torch.func`` cannot transform them)
            and for ``nll`` on a model that does not end in a ``LogSoftmax`` module.
    """

    def __init__(self, problem: Problem, matrix: str) -> None:
        if problem.scripted:
            raise UnsupportedModelError(
                f"the {matrix} matrix needs torch.func, which cannot transform TorchScript "
                "models; use --matrix hessian or load the model as an ordinary module."
            )
        self.problem = problem
        self.matrix = matrix
        self.logsoftmax: nn.Module | None = None
        self.loss_name = problem.loss_name
        if problem.loss_name == "nll":
            name, last = _last_leaf(problem.model)
            if not isinstance(last, nn.LogSoftmax) or last.dim not in (1, -1):
                raise UnsupportedModelError(
                    f"the {matrix} matrix with --loss nll needs a model that ends in a "
                    "LogSoftmax module over its last dimension (nll takes log-probabilities, "
                    f"linear in the loss); its last module {name or 'model'!r} is "
                    f"{type(last).__name__}."
                )
            self.logsoftmax = last
            self.loss_name = "cross_entropy"
            self._check_ends_in_logsoftmax(name)
        self.loss_fn = get_loss(self.loss_name)
        self.c = 1.0 / problem.num_samples if problem.reduction == "mean" else 1.0

    def _check_ends_in_logsoftmax(self, name: str) -> None:
        p = self.problem
        batch = next(iter(p.batches()))
        seen: list[torch.Tensor] = []
        handle = self.logsoftmax.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            with torch.no_grad(), p.mode():
                out = p.forward(dict(p.params), batch.x)
        finally:
            handle.remove()
        if len(seen) != 1 or not torch.equal(seen[0], out):
            raise UnsupportedModelError(
                f"the {self.matrix} matrix with --loss nll needs the LogSoftmax module "
                f"{name!r} to give the model's output, once; this model's forward does not."
            )

    # ------------------------------------------------------------------ forward
    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Model output the loss is convex in (the logits for ``nll``); call inside ``mode()``."""
        if self.logsoftmax is None:
            return self.problem.forward(params, x)
        handle = self.logsoftmax.register_forward_hook(lambda m, i, o: i[0])
        try:
            return self.problem.forward(params, x)
        finally:
            handle.remove()

    def sum_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_i \ell_i` over the batch (per-sample losses, unweighted)."""
        value = self.loss_fn(out, y, self.problem.reduction)
        return value * out.shape[0] if self.problem.reduction == "mean" else value

    def output_scale(self, out: torch.Tensor) -> float:
        """``w``: 1/d for mse and bce_with_logits under mean reduction, else 1."""
        d = out[0].numel() if out.dim() > 0 and out.shape[0] else 1
        if self.problem.reduction == "mean" and self.loss_name in ("mse", "bce_with_logits"):
            return 1.0 / d
        return 1.0

    # ------------------------------------------------------------------ output Hessian
    def hessian_apply(self, out: torch.Tensor, y: torch.Tensor) -> ApplyFn:
        r"""``U [k, n, d] -> [k, n, d]``: per-sample :math:`\nabla^2_f \ell_i` times ``U``.

        Analytic for cross-entropy (:math:`\mathrm{diag}(p) - p p^T`), mse (:math:`2w I`) and
        BCE-with-logits (:math:`w\,\mathrm{diag}(s(1-s))`), ``w`` from :meth:`output_scale`;
        autograd (dense per-sample Hessians) for any other loss.
        """
        n = out.shape[0]
        o2 = out.reshape(n, -1)
        w = self.output_scale(out)
        if self.loss_name == "cross_entropy" and out.dim() == 2:
            p = torch.softmax(o2, dim=-1)
            return lambda U: p * U - p * (p * U).sum(-1, keepdim=True)
        if self.loss_name == "mse":
            return lambda U: (2.0 * w) * U
        if self.loss_name == "bce_with_logits":
            s = torch.sigmoid(o2)
            diag = w * s * (1 - s)
            return lambda U: diag * U
        H = self.dense_hessians(out, y)
        return lambda U: torch.einsum("nab,knb->kna", H, U)

    def _single(self, out: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        shape = out.shape[1:]
        fn, reduction = self.loss_fn, self.problem.reduction

        def single(o: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return fn(o.reshape(1, *shape), yi.unsqueeze(0), reduction)

        return single

    def dense_hessians(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Per-sample :math:`\nabla^2_f \ell_i`, ``[n, d, d]``: analytic or by autograd."""
        n = out.shape[0]
        o2 = out.reshape(n, -1)
        w = self.output_scale(out)
        if self.loss_name == "cross_entropy" and out.dim() == 2:
            p = torch.softmax(o2, dim=-1)
            return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        if self.loss_name == "mse":
            eye = torch.eye(o2.shape[1], dtype=o2.dtype, device=o2.device)
            return (2.0 * w) * eye.expand(n, -1, -1).clone()
        if self.loss_name == "bce_with_logits":
            s = torch.sigmoid(o2)
            return torch.diag_embed(w * s * (1 - s))
        single = self._single(out)
        return torch.func.vmap(torch.func.hessian(single))(o2, y)

    def dense_gradients(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Per-sample :math:`\nabla_f \ell_i`, ``[n, d]`` (analytic for cross-entropy)."""
        n = out.shape[0]
        if self.loss_name == "cross_entropy" and out.dim() == 2 and not y.is_floating_point():
            p = torch.softmax(out, dim=-1)
            return p - torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
        single = self._single(out)
        return torch.func.vmap(torch.func.grad(single))(out.reshape(n, -1), y)

    # ------------------------------------------------------------------ Fisher
    def _require_likelihood(self) -> None:
        if self.loss_name not in ("cross_entropy", "mse", "bce_with_logits"):
            raise UnsupportedModelError(
                f"the {self.matrix} matrix needs a loss that is a negative log-likelihood "
                f"(cross_entropy, mse, bce_with_logits, nll); --loss {self.loss_name} is not."
            )

    def fisher_sqrt(self, out: torch.Tensor) -> torch.Tensor:
        r"""Columns ``Q [m, n, d]`` with :math:`\sum_j q_{ij} q_{ij}^T = F_{out,i}`, exact.

        Cross-entropy: :math:`q_{ic} = \sqrt{p_{ic}}(p_i - e_c)`, the exact sum over the
        model's predictive distribution. mse: Gaussian with :math:`\sigma^2 = d/2` (mean) or
        1/2 (sum), :math:`F_{out} = 2w I`. BCE: Bernoulli per output with the loss scale ``w``
        as temperature, :math:`F_{out} = w\,\mathrm{diag}(s(1-s))`. All equal the output
        Hessian of the GGN.
        """
        self._require_likelihood()
        n = out.shape[0]
        o2 = out.reshape(n, -1)
        d = o2.shape[1]
        w = self.output_scale(out)
        eye = torch.eye(d, dtype=o2.dtype, device=o2.device)
        if self.loss_name == "cross_entropy":
            if out.dim() != 2:
                raise UnsupportedModelError(
                    f"the {self.matrix} matrix supports cross-entropy on [N, C] outputs only."
                )
            p = torch.softmax(o2, dim=-1)
            # diff[c, i, :] = p_i - e_c
            diff = p.unsqueeze(0) - eye.unsqueeze(1)
            return p.T.sqrt().unsqueeze(-1) * diff
        if self.loss_name == "mse":
            return math.sqrt(2.0 * w) * eye.unsqueeze(1).expand(d, n, d)
        s = torch.sigmoid(o2)
        return (w * s * (1 - s)).sqrt().T.unsqueeze(-1) * eye.unsqueeze(1)

    def fisher_apply(self, out: torch.Tensor) -> ApplyFn:
        """``U -> F_out U`` with the exact output Fisher (an explicit sum over classes)."""
        Q = self.fisher_sqrt(out)
        return lambda U: low_rank_apply(Q, U)

    def sample_columns(self, out: torch.Tensor, samples: int, gen: torch.Generator) -> torch.Tensor:
        r"""Monte-Carlo columns ``Q [S, n, d]`` with :math:`E[\sum_j q q^T] = F_{out}`.

        Labels are drawn from the model's predictive distribution with ``gen``: categorical
        for cross-entropy, :math:`y \sim N(f, \sigma^2 I)` for mse, Bernoulli per output for
        BCE; each column is the per-sample loss gradient (times :math:`1/\sqrt{w}` for BCE,
        the temperature) divided by :math:`\sqrt{S}`.
        """
        self._require_likelihood()
        n = out.shape[0]
        o2 = out.reshape(n, -1)
        d = o2.shape[1]
        w = self.output_scale(out)
        root = 1.0 / math.sqrt(samples)
        if self.loss_name == "cross_entropy":
            p = torch.softmax(o2, dim=-1)
            probs = p.detach().to("cpu", torch.float64)
            labels = torch.multinomial(probs, samples, replacement=True, generator=gen)
            onehot = torch.nn.functional.one_hot(labels.T, d).to(o2.device, o2.dtype)
            return root * (p.unsqueeze(0) - onehot)
        if self.loss_name == "mse":
            sigma = math.sqrt(d / 2.0) if self.problem.reduction == "mean" else math.sqrt(0.5)
            eps = torch.randn(samples, n, d, generator=gen, dtype=torch.float64)
            eps = eps.to(o2.device, o2.dtype)
            # gradient of l_i = w ||f - y||^2 at y = f + sigma eps is -2 w sigma eps
            return root * (-2.0 * w * sigma) * eps
        s = torch.sigmoid(o2)
        u = torch.rand(samples, n, d, generator=gen, dtype=torch.float64).to(o2.device, o2.dtype)
        y = (u < s.unsqueeze(0)).to(o2.dtype)
        return root * math.sqrt(w) * (s.unsqueeze(0) - y)

    def label_columns(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""The observed-label gradients :math:`\nabla_f \ell_i`, as ``Q [1, n, d]``."""
        o = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.sum_loss(o, y), o)
        return g.reshape(1, out.shape[0], -1)


def low_rank_apply(Q: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``sum_j q_j q_j^T u`` per sample: ``Q [m, n, d]``, ``U [k, n, d]`` -> ``[k, n, d]``."""
    coef = torch.einsum("jnb,knb->jkn", Q, U)
    return torch.einsum("jna,jkn->kna", Q, coef)


def param_columns(problem: Problem, tree: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Dict of ``[k, *shape]`` tensors (selected names) -> flat columns ``[P, k]``."""
    return torch.cat([tree[n].reshape(k, -1) for n in problem.names], dim=1).T


def batch_weight_per_sample(problem: Problem, batch: Batch) -> float:
    """``c``: the weight of one sample's loss in the total (1/N or 1)."""
    return batch.weight / batch.size if problem.reduction == "mean" else 1.0
