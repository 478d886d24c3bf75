r"""The GGN of a softmax classifier split by class: class means, cross-class means, the rest.

Papyan 2019 (arXiv 1901.08244) and Papyan 2020 ("Traces of Class/Cross-Class Structure Pervade
Deep Learning Spectra", arXiv 2008.11865, sec. 2-3). For softmax cross-entropy with ``C``
classes the output Hessian of sample ``i`` factors exactly as

.. math::
    H_i = \mathrm{diag}(p_i) - p_i p_i^T = \sum_{c'=1}^{C} q^{out}_{i,c'} q^{out\,T}_{i,c'},
    \qquad q^{out}_{i,c'} = \sqrt{p_{i,c'}}\,(p_i - e_{c'})

(:math:`\sum_{c'} p_{c'} (p - e_{c'})(p - e_{c'})^T = \mathrm{diag}(p) - pp^T` since
:math:`\sum p = 1`), so with :math:`J_i` the Jacobian of the logits and the per-sample,
per-logit vectors :math:`q_{i,c'} = J_i^T q^{out}_{i,c'}` (Papyan's
:math:`\sqrt{p_{i,c'}}\,\nabla_w \ell(x_i, c')`, the gradient the sample would have with label
:math:`c'`, weighted by the model's probability of that label) the GGN is a second moment:

.. math::
    G = s \sum_i J_i^T H_i J_i = s \sum_i \sum_{c'} q_{i,c'} q_{i,c'}^T,

``s = 1/T`` (mean reduction, ``T`` the terms) or 1 (sum). Group the samples by their true
class ``c`` (:math:`N_c` of them, :math:`\pi_c = N_c/N`) and take the means
:math:`\mu_{c,c'} = \frac{1}{N_c}\sum_{i: y_i = c} q_{i,c'}` and, as Papyan does, the class
means :math:`\delta_c = \frac{1}{C-1}\sum_{c' \ne c} \mu_{c,c'}` (the average of the
*cross* means of class ``c``: at a trained network :math:`\mu_{c,c}` is second-order small,
since :math:`p_i \to e_c`). Per pair :math:`(c, c')`, :math:`\sum_{i \in c} q q^T = N_c
\mu\mu^T + \sum_{i\in c}(q - \mu)(q - \mu)^T`, and over :math:`c' \ne c`,
:math:`\sum \mu\mu^T = (C-1)\delta_c\delta_c^T + \sum (\mu - \delta_c)(\mu - \delta_c)^T`;
hence exactly, with :math:`w_c = s N_c` (:math:`= \pi_c` for the mean),

.. math::
    G = \underbrace{\sum_c w_c\, \mu_{c,c}\mu_{c,c}^T}_{G_0 \text{ (self)}}
      + \underbrace{\sum_c w_c (C-1)\, \delta_c\delta_c^T}_{G_1 \text{ (class)}}
      + \underbrace{\sum_c \sum_{c' \ne c} w_c (\mu_{c,c'} - \delta_c)(\mu_{c,c'} -
        \delta_c)^T}_{G_2 \text{ (cross)}}
      + \underbrace{s \sum_{c, c'} \sum_{i \in c} (q_{i,c'} - \mu_{c,c'})
        (q_{i,c'} - \mu_{c,c'})^T}_{G_\mathrm{within}}.

These are the terms of Papyan's released code (``compute_G_decomp``, deep-lab/DeepnetHessian):
:math:`G_1` has rank at most ``C`` (the ``C`` outliers), :math:`G_2` at most ``C(C-2)`` (the
mini-outliers), :math:`G_0` (rank at most ``C``) is the term he neglects. All three are formed
from the ``C^2`` mean vectors, one vjp per batch vmapped over ``C^2`` cotangents, and their
eigenpairs come from small Gram matrices, with no large eigenproblem. :math:`G_\mathrm{within}
= G - G_0 - G_1 - G_2` is taken as that difference of operators (weight decay's
:math:`\lambda I` is part of it). Samples whose target is ``ignore_index`` belong to no class
and carry no term. (An earlier version called :math:`G_0` the class part and :math:`G_1 + G_2`
the cross part: the identity held, but those were not Papyan's levels.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import UnsupportedModelError
from .._losses import CrossEntropy
from ..linalg import LinearOperator
from ..problem import Problem
from ._ggn import GGNOperator
from ._outputs import LossView, param_columns, refuse_train_mode

__all__ = ["ClassStructure", "LowRankOperator", "check_classifier", "class_structure"]

MATRIX = "classes"


class LowRankOperator(LinearOperator):
    r""":math:`B B^T` for a tall ``B [P, r]``: products and exact eigenpairs from ``B^T B``.

    Args:
        factor: ``B``, ``[P, r]``.
        name: the matrix name.
    """

    SELF_ADJOINT = True

    def __init__(self, factor: torch.Tensor, *, name: str = "low-rank") -> None:
        super().__init__(
            (factor.shape[0], factor.shape[0]),
            dtype=factor.dtype,
            device=factor.device,
            name=name,
        )
        self.factor = factor

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.factor @ (self.factor.T @ V)

    def eigh(self, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Nonzero eigenvalues (descending) and orthonormal eigenvectors ``[P, m]``, in float64.

        From :math:`B^T B = U \Lambda U^T`: the eigenvectors are :math:`B U \Lambda^{-1/2}`.
        Eigenvalues at most ``rtol`` (default ``r`` eps) times the largest are dropped (the
        rank is then below ``r``).
        """
        B = self.factor.detach().to(torch.float64)
        if B.shape[1] == 0:
            return B.new_zeros(0), B.new_zeros(B.shape[0], 0)
        vals, U = torch.linalg.eigh(B.T @ B)
        vals, U = vals.flip(0), U.flip(1)
        cut = (rtol if rtol is not None else B.shape[1] * torch.finfo(torch.float64).eps) * float(
            vals[0].clamp(min=0)
        )
        keep = vals > cut
        vals, U = vals[keep], U[:, keep]
        vecs = (B @ U) / vals.sqrt()
        return vals, vecs


@dataclass
class ClassStructure:
    r"""The class and cross-class parts of a softmax classifier's GGN (see the module).

    Attributes:
        means: ``[P, C, C]``; ``means[:, c, c']`` is :math:`\mu_{c,c'}`.
        counts: ``[C]`` samples per true class :math:`N_c` (ignored targets excluded).
        scale: ``s``, the weight of one loss term (``1/T`` or 1).
        self_part: :math:`G_0`, the same-class means, as a :class:`LowRankOperator`.
        class_part: :math:`G_1`, Papyan's class means, as a :class:`LowRankOperator`.
        cross_part: :math:`G_2`, the cross-class deviations, as a :class:`LowRankOperator`.
        ggn: the GGN operator of the same problem.
    """

    means: torch.Tensor
    counts: torch.Tensor
    scale: float
    class_part: LowRankOperator
    cross_part: LowRankOperator
    ggn: GGNOperator
    self_part: LowRankOperator | None = None

    @property
    def num_classes(self) -> int:
        """``C``."""
        return int(self.counts.shape[0])

    @property
    def weights(self) -> torch.Tensor:
        r""":math:`w_c = s N_c` (:math:`\pi_c` for mean reduction)."""
        return self.scale * self.counts.to(torch.float64)

    @property
    def within_part(self) -> LinearOperator:
        r""":math:`G - G_0 - G_1 - G_2`: the within part (with weight decay)."""
        op = self.ggn - self.class_part - self.cross_part
        if self.self_part is not None:
            op = op - self.self_part
        op.name = "ggn-within"
        return op


def check_classifier(problem: Problem) -> int:
    """The number of classes ``C`` of a softmax classifier (one forward pass of one batch).

    Raises:
        UnsupportedModelError: for a loss without classes or outputs not ``[N, C]``.
    """
    view = LossView(problem, MATRIX)
    _refuse(problem, view)
    batch = next(iter(problem.batches()))
    with torch.no_grad(), problem.mode():
        out = view.forward(dict(problem.params), batch.narrow(0, 1).inputs)
    _check_shape(out)
    return int(out.shape[1])


def _check_shape(out: torch.Tensor) -> None:
    if out.dim() != 2:
        raise UnsupportedModelError(
            f"the class decomposition needs logits of shape [N, C], one class per sample; this "
            f"model's outputs are {tuple(out.shape)} (a sequence model's tokens are not split by "
            "class here).",
            matrix=MATRIX,
        )


def _refuse(problem: Problem, view: LossView) -> None:
    if not isinstance(view.loss, CrossEntropy):
        raise UnsupportedModelError(
            f"the class decomposition needs a softmax classifier (the cross_entropy or nll "
            f"loss); the {problem.loss_name} loss has no classes.",
            matrix=MATRIX,
        )


def class_structure(problem: Problem, *, chunk_entries: int = 1 << 24) -> ClassStructure:
    r"""The class means :math:`\mu_{c,c'}` and the operators built from them (module docstring).

    One pass over the data: per batch one forward pass and vjps with the ``C^2`` cotangents
    :math:`[y_i = c]\, q^{out}_{i,c'}` (vmapped, at most ``chunk_entries`` parameter entries
    at a time), summed over batches (and over processes).

    Raises:
        UnsupportedModelError: for a loss without classes (mse, bce_with_logits, a user's
            function), outputs that are not ``[N, C]`` logits, or train mode.
    """
    view = LossView(problem, MATRIX)
    _refuse(problem, view)
    refuse_train_mode(problem, "class-decomposition")
    p = problem
    params = {n: t.detach() for n, t in p.params.items()}
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    for batch in p.batches():

        def f(ps: dict[str, torch.Tensor], batch=batch) -> torch.Tensor:
            return view.forward(ps, batch.inputs)

        with p.mode():
            out, vjp_fn = torch.func.vjp(f, params)
            _check_shape(out)
            n, C = out.shape
            y = torch.as_tensor(batch.y, device=out.device).reshape(-1).long()
            keep = (y != view.loss.ignore_index).to(out.dtype)
            prob = torch.softmax(out.detach(), dim=-1)
            eye = torch.eye(C, dtype=out.dtype, device=out.device)
            q_out = prob.T.sqrt().unsqueeze(-1) * (prob.unsqueeze(0) - eye.unsqueeze(1))
            true = torch.nn.functional.one_hot(y.clamp(min=0), C).to(out.dtype) * keep[:, None]
            # cot[c, c', i, :] = [y_i = c] q_out[c', i, :]
            cot = (true.T[:, None, :, None] * q_out.unsqueeze(0)).reshape(C * C, n, C)
            if sums is None:
                sums = torch.zeros(p.num_params, C * C, dtype=p.dtype, device=p.device)
                counts = torch.zeros(C, dtype=torch.float64, device=p.device)
            step = max(1, min(C * C, chunk_entries // max(1, p.num_params, n * C)))
            for s in range(0, C * C, step):
                part = cot[s : s + step]
                (grads,) = torch.func.vmap(vjp_fn)(part)
                sums[:, s : s + step] += param_columns(p, grads, part.shape[0]).detach()
        counts += true.sum(0).to(torch.float64)
    sums = p.reduce(sums)
    counts = p.reduce(counts)
    C = int(counts.shape[0])
    scale = 1.0 / p.num_terms if p.reduction == "mean" else 1.0
    safe = counts.clamp(min=1).to(sums.dtype)
    means = sums.reshape(-1, C, C) / safe[None, :, None]
    w = (scale * counts).sqrt().to(sums.dtype)  # sqrt(w_c), per true class c
    scaled = means * w[None, :, None]
    diag = torch.arange(C, device=sums.device)
    off = ~torch.eye(C, dtype=torch.bool, device=sums.device)
    self_factor = scaled[:, diag, diag]  # [P, C]: sqrt(w_c) mu_cc
    others = means.clone()
    others[:, diag, diag] = 0
    delta = others.sum(2) / max(C - 1, 1)  # [P, C]: Papyan's class means delta_c
    class_factor = delta * (w * (C - 1) ** 0.5)[None, :]  # sqrt(w_c (C-1)) delta_c
    centred = (means - delta[:, :, None]) * w[None, :, None]
    cross_factor = centred[:, off]  # [P, C(C-1)] of rank <= C(C-2), (c, c') row-major
    return ClassStructure(
        means=means,
        counts=counts,
        scale=scale,
        class_part=LowRankOperator(class_factor, name="ggn-class"),
        cross_part=LowRankOperator(cross_factor, name="ggn-cross"),
        ggn=GGNOperator(p),
        self_part=LowRankOperator(self_factor, name="ggn-self"),
    )
