r"""Fisher information (true, Monte-Carlo) and the empirical Fisher as operators."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch

from .._errors import OptionError, UnsupportedModelError, arg
from ..problem import Batch, Inputs, Problem, batch_seed, map_tensors
from ._base import CurvatureOperator
from ._ggn import GGNOperator
from ._outputs import LossView, low_rank_apply, refuse_train_mode

__all__ = ["EmpiricalFisherOperator", "FisherKind", "FisherOperator"]

ApplyFn = Callable[[torch.Tensor], torch.Tensor]


class FisherKind(str, Enum):
    """How the expectation over the model's predictive distribution is taken."""

    EXACT = "exact"
    MC = "mc"


class FisherOperator(GGNOperator):
    r"""The Fisher information of the model's predictive distribution.

    .. math::
        F = c \sum_{i=1}^N J_i^T \, E_{y \sim p(y|f_i)}\!\left[
            \nabla_f \ell_i(y) \nabla_f \ell_i(y)^T \right] J_i + \lambda I,
        \qquad c = 1/N \text{ (mean) or } 1 \text{ (sum)}.

    The loss is read as a negative log-likelihood (docs/DESIGN.md "Mathematical conventions"):
    softmax cross-entropy (and ``nll`` after a final ``LogSoftmax``) as a categorical
    distribution; mse as a Gaussian :math:`N(f, \sigma^2 I)` with :math:`\sigma^2 = d/2` for
    torch's mean over outputs and 1/2 for sum, so that :math:`-\log p = \ell_i` + const;
    BCE-with-logits as independent Bernoullis with the loss's 1/d (mean) as temperature. Under
    these readings the exact Fisher equals the GGN (tested).

    ``kind="exact"`` sums over the predictive distribution in closed form (for cross-entropy
    an explicit sum over classes of :math:`p_c (p - e_c)(p - e_c)^T`). ``kind="mc"`` draws
    ``mc_samples`` labels per sample from the model; the generator is re-seeded with ``seed``
    at the start of every product (a local ``torch.Generator``, the global RNG is untouched),
    so every product sees the same labels and the operator is one fixed matrix, as Lanczos
    and CG require.

    Args:
        problem: model, loss, data and parameter selection.
        kind: ``exact`` or ``mc``.
        mc_samples: labels drawn per sample (``mc``).
        seed: seed of the label draws (``mc``).

    Raises:
        OptionError: for an unknown kind or ``mc_samples < 1``.
        UnsupportedModelError: for a loss that is not a negative log-likelihood
            (``chen_nonconvex``), TorchScript, or ``nll`` without a final ``LogSoftmax``.
    """

    name = "fisher"

    def __init__(
        self,
        problem: Problem,
        *,
        kind: str | FisherKind = FisherKind.EXACT,
        mc_samples: int = 1,
        seed: int = 0,
    ) -> None:
        try:
            kind = FisherKind(kind)
        except ValueError:
            valid = ", ".join(k.value for k in FisherKind)
            raise OptionError(
                f"Fisher kind {kind!r} is not known; choose one of {valid}."
            ) from None
        if int(mc_samples) < 1:
            raise OptionError(f"{arg('mc_samples')} must be at least 1, got {mc_samples}.")
        self.name = "fisher-mc" if kind is FisherKind.MC else "fisher"
        super().__init__(problem, kind=kind, mc_samples=int(mc_samples), seed=int(seed))
        self.kind = kind
        # drawn labels are seeded per batch: slices would see the same draws
        self.slice_outputs = kind is FisherKind.EXACT
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.view.require_likelihood()
        if kind is FisherKind.MC:
            self.notes.append(
                f"Monte-Carlo Fisher with {self.mc_samples} label draw(s) per sample, seed "
                f"{self.seed}, re-seeded on every product (one fixed matrix)."
            )

    def _output_apply(self, out: torch.Tensor, batch: Batch) -> ApplyFn:
        if self.kind is FisherKind.EXACT:
            return self.view.fisher_apply(out, batch.y)
        # Re-seed per product and batch: the same labels every time, so A is one fixed
        # matrix, and the same labels whichever process evaluates the batch.
        gen = torch.Generator().manual_seed(batch_seed(self.seed, batch.index))
        Q = self.view.sample_columns(out, batch.y, self.mc_samples, gen)
        n = out.shape[0]

        def apply(U: torch.Tensor) -> torch.Tensor:
            flat = low_rank_apply(Q.reshape(Q.shape[0], n, -1), U.reshape(U.shape[0], n, -1))
            return flat.reshape(U.shape)

        return apply


class EmpiricalFisherOperator(CurvatureOperator):
    r"""The empirical Fisher: outer products of per-sample gradients at the observed labels.

    .. math::
        \tilde F = \sum_{i=1}^N w_i\, g_i g_i^T + \lambda I, \qquad
        g_i = \nabla_w \bar\ell_i, \quad w_i = T_i / T \text{ (mean) or } 1 \text{ (sum)},

    with :math:`\bar\ell_i` sample ``i``'s loss with the problem's reduction over its own
    :math:`T_i` terms (its mean over its tokens, or over its outputs for ``mse``, as torch's
    per-sample loss) and ``T`` the terms in all: each sample weighs what it weighs in the loss,
    so for one term per sample :math:`w_i = 1/N`. It is not the Fisher (docs/DESIGN.md
    "Mathematical conventions"; FINDINGS.md section 5: relative Frobenius distance 10-60 on
    tiny MLPs). Per-sample gradients by ``torch.func.vmap(grad)``; they are kept in memory
    between products when they fit (``cache_limit`` numbers).

    Args:
        problem: model, loss, data and parameter selection (eval mode only).
        cache_limit: largest ``N * P`` for which per-sample gradients are cached.

    Raises:
        UnsupportedModelError: in train mode, and for TorchScript models.
    """

    name = "empirical-fisher"

    def __init__(self, problem: Problem, *, cache_limit: int = 2**25) -> None:
        super().__init__(problem, cache_limit=cache_limit)
        refuse_train_mode(problem, self.name)
        if problem.scripted:
            raise UnsupportedModelError(
                f"the {self.name} matrix needs per-sample gradients by torch.func, which cannot "
                "transform TorchScript models; load the model as an ordinary module.",
                matrix=self.name,
            )
        self.view = LossView(problem, self.name)
        self.cache_limit = int(cache_limit)
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._one_by_one = False  # per-sample gradients by a loop (torch.func refused)

    def _per_sample_grads(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of each sample's summed loss ``[n, P]`` and each sample's weight ``[n]``."""
        p = self.problem
        params = {n: t.detach() for n, t in p.params.items()}
        view = self.view

        def loss_one(ps, args, kwargs, y):
            one = Inputs(*map_tensors((args, kwargs), lambda t: t.unsqueeze(0)))
            out = view.forward(ps, one)
            return view.sum_loss(out, y.unsqueeze(0))

        args, kwargs = batch.inputs.args, batch.inputs.kwargs
        dims = (None, _row_dims(args, batch.size), _row_dims(kwargs, batch.size), 0)
        G = None
        if not self._one_by_one:
            try:
                with p.mode():
                    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=dims)(
                        params, args, kwargs, batch.y
                    )
                G = torch.cat([grads[n].reshape(batch.size, -1) for n in p.names], dim=1)
            except (RuntimeError, NotImplementedError) as exc:
                # torch.func cannot transform an operation of the model (a custom autograd
                # Function without setup_context, a fused kernel): plain autograd, per sample
                self._one_by_one = True
                self.notes.append(
                    f"torch.func cannot transform an operation of the model "
                    f"({str(exc).splitlines()[0][:120]}); the {self.name} takes per-sample "
                    "gradients one sample at a time instead."
                )
        if G is None:
            with p.mode():
                G = self._looped_grads(loss_one, params, (args, kwargs), dims[1:3], batch)
        G = G.detach()
        terms = view.loss.sample_terms(batch.y).to(G.dtype).to(G.device)
        if p.reduction == "sum":
            weights = torch.ones_like(terms)
        else:  # w_i |grad of the sample's mean|^2 = (T_i/T) |g_sum / T_i|^2
            weights = torch.where(terms > 0, 1.0 / (p.num_terms * terms.clamp(min=1)), 0.0)
        return G, weights

    def _looped_grads(self, loss_one, params, inputs, dims, batch: Batch) -> torch.Tensor:
        """``[n, P]`` per-sample gradients by ordinary autograd, one sample at a time."""
        p = self.problem
        rows = []
        with torch.enable_grad():
            leaves = {n: t.requires_grad_(True) for n, t in params.items()}
            values = list(leaves.values())
            for i in range(batch.size):
                args, kwargs = _take_row(inputs, dims, i)
                value = loss_one(leaves, args, kwargs, batch.y[i])
                gs = torch.autograd.grad(value, values, allow_unused=True) if (
                    value.requires_grad
                ) else [None] * len(values)
                rows.append(
                    torch.cat([
                        (torch.zeros_like(t) if g is None else g).reshape(-1)
                        for g, t in zip(gs, values, strict=True)
                    ])
                )
        return torch.stack(rows) if rows else torch.zeros(0, p.num_params, dtype=p.dtype)

    def _data_matmat(self, V: torch.Tensor) -> torch.Tensor:
        p = self.problem
        use_cache = p.num_samples * p.num_params <= self.cache_limit
        out = torch.zeros_like(V)
        if use_cache and self._cache is None:
            self._cache = [self._per_sample_grads(b) for b in p.batches()]
        grads = self._cache if use_cache else (self._per_sample_grads(b) for b in p.batches())
        for G, w in grads:
            out += G.T @ (w.unsqueeze(1) * (G @ V))
        return p.reduce(out)


def _take_row(obj, dims, i: int):
    """Sample ``i`` of a nested structure, without its row dimension (where ``dims`` has 0)."""
    if isinstance(obj, torch.Tensor):
        return obj[i] if dims == 0 else obj
    if isinstance(obj, dict):
        return {k: _take_row(v, dims[k], i) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take_row(v, d, i) for v, d in zip(obj, dims, strict=True))
    return obj


def _row_dims(obj, size: int):
    """Vmap ``in_dims`` for a nested structure: 0 for per-sample tensors, ``None`` otherwise."""
    if isinstance(obj, torch.Tensor):
        return 0 if obj.dim() > 0 and obj.shape[0] == size else None
    if isinstance(obj, dict):
        return {k: _row_dims(v, size) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_row_dims(v, size) for v in obj)
    return None
