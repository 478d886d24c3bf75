r"""Losses on model outputs, each reporting how many terms it averages.

A loss is :math:`\ell(\text{output}, \text{target})` with ``reduction`` ``"mean"`` (the average
over its *terms*) or ``"sum"``. The terms are what the loss averages over: samples for
classification on ``[N, C]`` outputs, the tokens that are not ``ignore_index`` for
cross-entropy over ``[B, T, V]`` logits and for causal language modelling, the output entries
for ``mse`` and ``bce_with_logits`` with mean (as torch's ``mse_loss`` averages over them).
:class:`~curvscope.problem.Problem` weighs batch ``b`` by ``terms_b / terms_total`` for mean
reduction, so unequal batches and padded sequences give the full-data loss exactly.

Built-in losses (``cross_entropy``, ``causal_lm``, ``mse``, ``bce_with_logits``, ``nll``,
``chen_nonconvex``) know their likelihood (what the Fisher needs) and their output Hessian
(what the GGN needs: analytic, never a double backward through log-softmax). A user callable
(:class:`CallableLoss`, ``FN(output, target) -> scalar`` or ``(scalar, num_terms)``) and a
model's own loss (:class:`ModelLoss`, e.g. HuggingFace ``output.loss``) are supported too.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F

from ._errors import OptionError, UnsupportedModelError, arg

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "CallableLoss",
    "Loss",
    "LossName",
    "ModelLoss",
    "get_loss",
    "is_classification",
]

IGNORE_INDEX = -100
"""Targets equal to this are not loss terms (torch's and HuggingFace's convention)."""

CHEN_DELTA = 5.0
"""delta of the non-convex criterion, fixed in Chen et al. 2018, text after eq. (14)."""
CHEN_EPSILON = 0.2
"""epsilon of the non-convex criterion, fixed in Chen et al. 2018, text after eq. (14)."""


class LossName(str, Enum):
    """Loss names accepted by name (``FILE.py:FN`` and ``model`` are the other two forms)."""

    CROSS_ENTROPY = "cross_entropy"
    CAUSAL_LM = "causal_lm"
    MSE = "mse"
    BCE_WITH_LOGITS = "bce_with_logits"
    NLL = "nll"
    CHEN_NONCONVEX = "chen_nonconvex"


class Loss:
    """A loss on model outputs, with its term count, likelihood and output Hessian.

    Attributes:
        name: the loss name recorded in result documents.
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or ``None`` when the
            loss is not a known negative log-likelihood (the Fisher refuses those).
        classification: targets are integer class indices.
        convex_in_outputs: the loss is convex in the outputs (what the convexity certificate
            and a PSD GGN need).
        per_sample: ``sum_loss`` is a sum of per-sample terms (what per-sample matrices need).
        ignore_index: target value that marks no term (class-index losses).
    """

    name: str = "loss"
    likelihood: str | None = None
    classification: bool = False
    convex_in_outputs: bool = False
    per_sample: bool = True
    ignore_index: int = IGNORE_INDEX

    def value(self, out: torch.Tensor, target: Any, reduction: str) -> torch.Tensor:
        """The loss of one batch: the mean over its terms, or their sum."""
        total = self.sum_loss(out, target)
        if reduction == "sum":
            return total
        n = self.terms(out, target)
        return total / n if n else total * 0.0

    def __call__(self, out: torch.Tensor, target: Any, reduction: str) -> torch.Tensor:
        return self.value(out, target, reduction)

    def sum_loss(self, out: torch.Tensor, target: Any) -> torch.Tensor:
        r""":math:`\sum_t \ell_t` over the batch's terms (no reduction)."""
        raise NotImplementedError

    def terms(self, out: torch.Tensor | None, target: Any) -> int:
        """How many terms the batch's mean averages over."""
        raise NotImplementedError

    @property
    def terms_need_output(self) -> bool:
        """Whether :meth:`terms` needs the model's output (else the target suffices)."""
        return False

    def sample_terms(self, target: Any) -> torch.Tensor:
        """Terms of each sample of a batch, ``[n]`` (int64)."""
        n = target.shape[0] if isinstance(target, torch.Tensor) and target.dim() else 1
        per = target[0].numel() if isinstance(target, torch.Tensor) and target.dim() else 1
        return torch.full((n,), per, dtype=torch.int64)

    # ---- what the GGN, Fisher and PCH need (class-index and elementwise losses) -------
    def rows(self, out: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """``(out [R, d], target [R], keep [R])``: one row per term group, ``keep`` the live rows.

        The sum loss is the sum of a per-row loss over the live rows (cross-entropy: one row
        per position, ``d`` classes; elementwise losses: one row per sample).
        """
        n = out.shape[0]
        rows = out.reshape(n, -1)
        return rows, target, torch.ones(n, dtype=torch.bool, device=out.device)

    def hessian_apply(self, out: torch.Tensor, target: Any) -> Callable | None:
        r"""``U [k, *out.shape] -> [k, *out.shape]``: the output Hessian of ``sum_loss`` times U.

        ``None`` when no analytic form is known (callers then use autograd).
        """
        return None


_BLOCK_ELEMENTS = 1 << 22
"""Entries of a block of softmax rows in the cross-entropy output-Hessian product."""


def _flat_classes(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[..., C]`` and class ids ``[...]`` as ``[R, C]`` and ``[R]``."""
    c = out.shape[-1]
    if target.shape != out.shape[:-1]:
        raise OptionError(
            f"targets of shape {tuple(target.shape)} do not fit outputs of shape "
            f"{tuple(out.shape)}: class-index targets need the output's shape without its last "
            "(class) dimension."
        )
    return out.reshape(-1, c), target.reshape(-1)


class CrossEntropy(Loss):
    r"""Softmax cross-entropy over the last dimension: ``[N, C]`` or ``[B, T, V]`` logits.

    Terms: the targets that are not ``ignore_index``. Output Hessian per term:
    :math:`\mathrm{diag}(p) - p p^T`, applied as ``p*u - p (p.u)`` (never a double backward
    through log-softmax, whose memory is about ten times the logits).
    """

    name = "cross_entropy"
    likelihood = "categorical"
    classification = True
    convex_in_outputs = True

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = int(ignore_index)

    def _pair(self, out: torch.Tensor, target: torch.Tensor):
        return _flat_classes(out, target)

    def sum_loss(self, out: torch.Tensor, target: Any) -> torch.Tensor:
        o, t = self._pair(out, target)
        return F.cross_entropy(o, t, ignore_index=self.ignore_index, reduction="sum")

    def value(self, out: torch.Tensor, target: Any, reduction: str) -> torch.Tensor:
        o, t = self._pair(out, target)
        return F.cross_entropy(o, t, ignore_index=self.ignore_index, reduction=reduction)

    def terms(self, out: torch.Tensor | None, target: Any) -> int:
        t = self._target(target)
        return int((t != self.ignore_index).sum())

    def _target(self, target: Any) -> torch.Tensor:
        return target

    def sample_terms(self, target: Any) -> torch.Tensor:
        t = self._target(target)
        return (t != self.ignore_index).reshape(t.shape[0], -1).sum(1).cpu()

    def rows(self, out: torch.Tensor, target: Any):
        o, t = self._pair(out, target)
        return o, t, t != self.ignore_index

    def hessian_apply(self, out: torch.Tensor, target: Any) -> Callable:
        o, t = self._pair(out, target)
        keep = (t != self.ignore_index).to(o.dtype).unsqueeze(-1)

        def apply_in_place(U: torch.Tensor) -> torch.Tensor:
            # softmax by blocks of rows, the product written over U: at a 50k vocabulary
            # the logits are the largest tensors of the model, and this holds none beside
            # the logits and U (the result may share U's storage; use the returned tensor)
            u = U.reshape(U.shape[0], *o.shape)
            rows = max(1, _BLOCK_ELEMENTS // (o.shape[-1] * u.shape[0]))
            for s in range(0, o.shape[0], rows):
                p = torch.softmax(o[s : s + rows], dim=-1).mul_(keep[s : s + rows])
                r = u[:, s : s + rows]
                r.mul_(p)
                r.addcmul_(p, r.sum(-1, keepdim=True), value=-1.0)
            return u.reshape(U.shape)

        def apply(U: torch.Tensor) -> torch.Tensor:
            return apply_in_place(U.clone())

        apply.in_place = apply_in_place
        return apply


class CausalLM(CrossEntropy):
    """Cross-entropy of next-token prediction: logits ``[B, T, V]``, targets the inputs ``[B, T]``.

    Position ``t`` predicts token ``t + 1`` (as language models train): the loss is
    cross-entropy of ``logits[:, :-1]`` against ``targets[:, 1:]``, terms the predicted
    tokens that are not ``ignore_index``. With ``shift=False`` the targets are already the
    next tokens (a token file's windows ``y = t[i+1:i+T+1]``) and are taken as they are, so
    the targets are shifted exactly once whatever the data source.
    """

    name = "causal_lm"

    def __init__(self, ignore_index: int = IGNORE_INDEX, *, shift: bool = True) -> None:
        super().__init__(ignore_index)
        self.shift = bool(shift)

    def _pair(self, out: torch.Tensor, target: torch.Tensor):
        if out.dim() != 3 or target.dim() != 2 or out.shape[:2] != target.shape:
            raise OptionError(
                f"the causal_lm loss needs logits [B, T, V] and token ids [B, T]; got outputs "
                f"{tuple(out.shape)} and targets {tuple(target.shape)}."
            )
        if not self.shift:
            return _flat_classes(out, target)
        return _flat_classes(out[:, :-1], target[:, 1:])

    def _target(self, target: Any) -> torch.Tensor:
        return target[:, 1:] if self.shift else target

    def hessian_apply(self, out: torch.Tensor, target: Any) -> Callable:
        inner = super().hessian_apply(out, target)  # over positions 0..T-2 when shifting
        if not self.shift:
            return inner

        def apply(U: torch.Tensor) -> torch.Tensor:
            body = inner(U[:, :, :-1].contiguous())
            return torch.cat([body, torch.zeros_like(U[:, :, -1:])], dim=2)

        return apply

    def rows(self, out: torch.Tensor, target: Any):
        o, t = self._pair(out, target)
        return o, t, t != self.ignore_index


class NLL(CrossEntropy):
    """Negative log-likelihood of log-probabilities (``[N, C]`` or ``[..., C]``).

    The GGN and Fisher read it as cross-entropy on the input of the model's final
    ``LogSoftmax`` (log-probabilities are linear in this loss).
    """

    name = "nll"

    def sum_loss(self, out: torch.Tensor, target: Any) -> torch.Tensor:
        o, t = self._pair(out, target)
        return F.nll_loss(o, t, ignore_index=self.ignore_index, reduction="sum")

    def value(self, out: torch.Tensor, target: Any, reduction: str) -> torch.Tensor:
        o, t = self._pair(out, target)
        return F.nll_loss(o, t, ignore_index=self.ignore_index, reduction=reduction)

    def hessian_apply(self, out: torch.Tensor, target: Any) -> Callable:
        # linear in the log-probabilities: its output Hessian vanishes
        return lambda U: torch.zeros_like(U)


class MSE(Loss):
    r"""Squared error, torch's ``mse_loss``: the mean averages over every output entry.

    Terms: output entries. Output Hessian: :math:`2 I` on the sum. Read as a Gaussian
    likelihood whose variance matches the loss scale (docs/DESIGN.md "Mathematical conventions").
    """

    name = "mse"
    likelihood = "gaussian"
    convex_in_outputs = True

    def sum_loss(self, out: torch.Tensor, target: Any) -> torch.Tensor:
        # written out: F.mse_loss's backward fails under forward-mode AD of its gradient
        # ("ZeroTensors are immutable", torch 2.13), which jvp-of-grad needs.
        return ((out - target.reshape(out.shape).to(out.dtype)) ** 2).sum()

    def value(self, out: torch.Tensor, target: Any, reduction: str) -> torch.Tensor:
        sq = (out - target.reshape(out.shape).to(out.dtype)) ** 2
        return sq.mean() if reduction == "mean" else sq.sum()

    def terms(self, out: torch.Tensor | None, target: Any) -> int:
        return int(target.numel())

    def hessian_apply(self, out: torch.Tensor, target: Any) -> Callable:
        return lambda U: 2.0 * U


class BCEWithLogits(Loss):
    r"""Binary cross-entropy on logits; the mean averages over every output entry.

    Output Hessian: :math:`\mathrm{diag}(s(1-s))` on the sum.
    """

    name = "bce_with_logits"
    likelihood = "bernoulli"
    convex_in_outputs = True

    def sum_loss(self, out: torch.Tensor, target: Any) -> torch.Tensor:
        t = target.reshape(out.shape).to(out.dtype)
        return F.binary_cross_entropy_with_logits(out, t, reduction="sum")

    def value(self, out: torch.Tensor, target: Any, reduction: str) -> torch.Tensor:
        t = target.reshape(out.shape).to(out.dtype)
        return F.binary_cross_entropy_with_logits(out, t, reduction=reduction)

    def terms(self, out: torch.Tensor | None, target: Any) -> int:
        return int(target.numel())

    def hessian_apply(self, out: torch.Tensor, target: Any) -> Callable:
        s = torch.sigmoid(out)
        d = s * (1 - s)
        return lambda U: d * U


class ChenNonconvex(Loss):
    r"""Non-convex criterion of Chen et al. 2018, eq. (14), one term per sample.

    .. math:: C(\hat y_i | y_i) = 1 / (1 + \exp(\delta (y_i^T \hat y_i - \epsilon)))

    with :math:`\hat y_i = \mathrm{softmax}(z_i)` and :math:`y_i` the one-hot label. It is bounded
    above and its Hessian in the logits is indefinite (the reason PCH applies Pos at the top).
    """

    name = "chen_nonconvex"
    classification = True

    def sum_loss(self, out: torch.Tensor, target: Any) -> torch.Tensor:
        p = torch.softmax(out, dim=-1)
        p_true = p.gather(-1, target.reshape(-1, 1)).squeeze(-1)
        return torch.sigmoid(-CHEN_DELTA * (p_true - CHEN_EPSILON)).sum()

    def value(self, out: torch.Tensor, target: Any, reduction: str) -> torch.Tensor:
        per = self.sum_loss(out, target)
        return per / out.shape[0] if reduction == "mean" else per

    def terms(self, out: torch.Tensor | None, target: Any) -> int:
        return int(target.shape[0])

    def sample_terms(self, target: Any) -> torch.Tensor:
        return torch.ones(target.shape[0], dtype=torch.int64)


class CallableLoss(Loss):
    """A user's ``FN(output, target)``: a scalar with the declared reduction, or ``(scalar, n)``.

    With mean reduction a batch enters with weight ``samples_b / samples_total``, or
    ``n_b / n_total`` when the function returns its term count ``n`` beside the value. Its
    output Hessian is taken by autograd; the Fisher refuses it (no known likelihood).

    Args:
        fn: the function.
        name: its name for result documents (``file.py:FN``).
        reduction: the reduction ``fn`` applies (``mean`` or ``sum``).
    """

    per_sample = False

    def __init__(self, fn: Callable, *, name: str, reduction: str = "mean") -> None:
        self.fn = fn
        self.name = name
        self.declared = reduction
        self._returns_count: bool | None = None

    def _call(self, out: torch.Tensor, target: Any) -> tuple[torch.Tensor, int | None]:
        try:
            res = self.fn(out, target)
        except Exception as exc:  # noqa: BLE001 - the user's code: one sentence, no traceback
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise OptionError(
                f"the loss function {self.name} raised {type(exc).__name__}: {first}.",
                option="loss",
            ) from None
        count = None
        if isinstance(res, (tuple, list)):
            if len(res) != 2:
                raise OptionError(
                    f"the loss function {self.name} returned {len(res)} values; return a "
                    "scalar, or (scalar, number_of_terms).",
                    option="loss",
                )
            res, count = res
            count = int(count)
        if not isinstance(res, torch.Tensor) or res.numel() != 1:
            shape = tuple(res.shape) if isinstance(res, torch.Tensor) else type(res).__name__
            raise OptionError(
                f"the loss function {self.name} must return a scalar tensor (or (scalar, "
                f"number_of_terms)), got {shape}.",
                option="loss",
            )
        self._returns_count = count is not None
        return res.reshape(()), count

    def sample_terms(self, target: Any) -> torch.Tensor:
        return torch.ones(self._samples(target), dtype=torch.int64)

    def _samples(self, target: Any) -> int:
        if isinstance(target, torch.Tensor) and target.dim() > 0:
            return int(target.shape[0])
        return 1

    def sum_loss(self, out: torch.Tensor, target: Any) -> torch.Tensor:
        value, count = self._call(out, target)
        if self.declared == "sum":
            return value
        n = count if count is not None else self._samples(target)
        return value * n

    def value(self, out: torch.Tensor, target: Any, reduction: str) -> torch.Tensor:
        value, count = self._call(out, target)
        if reduction == self.declared:
            return value
        n = count if count is not None else self._samples(target)
        return value * n if reduction == "sum" else value / max(n, 1)

    def terms(self, out: torch.Tensor | None, target: Any) -> int:
        if self._returns_count is not False and out is not None:
            _, count = self._call(out, target)
            if count is not None:
                return count
        return self._samples(target)

    @property
    def terms_need_output(self) -> bool:
        return self._returns_count is not False


class ModelLoss(Loss):
    """The model's own loss (HuggingFace ``output.loss``), with ``labels`` inside the inputs.

    HuggingFace losses are means over their terms, so a batch enters with the weight of its
    loss terms, counted from the labels the model sees by the rule of the built-in losses:
    labels that are not ``ignore_index`` (integer labels: class ids, masked tokens, target
    tokens), after the model's own shift by one for a causal LM (``shifted``); every entry of
    float labels (regression, multi-label). Only the Hessian and the empirical Fisher apply:
    the GGN and Fisher need the loss as a function of the outputs, which is inside the model.
    """

    name = "model"
    per_sample = False

    def __init__(self, *, shifted: bool = False, ignore_index: int = IGNORE_INDEX) -> None:
        self.shifted = shifted
        self.ignore_index = int(ignore_index)

    def sum_loss(self, out: torch.Tensor, target: Any) -> torch.Tensor:  # pragma: no cover
        raise UnsupportedModelError(
            "the model computes its own loss; curvscope cannot separate it from the outputs."
        )

    def terms(self, out: torch.Tensor | None, target: Any) -> int:
        if not isinstance(target, torch.Tensor) or target.dim() == 0:
            raise OptionError(
                f"{arg('loss')} model weighs each batch by its loss terms, counted from the "
                "batch's 'labels', and this batch has "
                + ("none" if target is None else f"a {type(target).__name__} there")
                + f"; pass dict batches with 'labels', or name the loss with {arg('loss')} "
                "(cross_entropy, causal_lm, FILE.py:FN).",
                option="loss",
            )
        if target.is_floating_point():
            return int(target.numel())
        t = target[:, 1:] if self.shifted and target.dim() >= 2 else target
        return int((t != self.ignore_index).sum())


LOSSES: dict[str, type[Loss]] = {
    LossName.CROSS_ENTROPY.value: CrossEntropy,
    LossName.CAUSAL_LM.value: CausalLM,
    LossName.MSE.value: MSE,
    LossName.BCE_WITH_LOGITS.value: BCEWithLogits,
    LossName.NLL.value: NLL,
    LossName.CHEN_NONCONVEX.value: ChenNonconvex,
}
"""The losses known by name."""


def get_loss(name: str | Loss | Any, *, ignore_index: int = IGNORE_INDEX) -> Loss:
    """The loss called ``name`` (a :class:`Loss` is returned as it is).

    Args:
        name: one of :data:`LOSSES`, ``"model"``, or a :class:`Loss`.
        ignore_index: target value that marks no term (class-index losses).

    Raises:
        OptionError: for an unknown name, listing the valid ones.
    """
    if isinstance(name, Loss):
        return name
    key = str(getattr(name, "value", name))
    if key == "model":
        return ModelLoss(ignore_index=ignore_index)
    if key not in LOSSES:
        valid = ", ".join([*LOSSES, "model", "FILE.py:FN"])
        raise OptionError(f"{arg('loss')} {key!r} is not known; choose one of {valid}.")
    cls = LOSSES[key]
    if issubclass(cls, CrossEntropy):
        return cls(ignore_index=ignore_index)
    return cls()


def is_classification(name: str | Loss) -> bool:
    """Whether targets of loss ``name`` are integer class indices."""
    if isinstance(name, Loss):
        return name.classification
    cls = LOSSES.get(str(getattr(name, "value", name)))
    return bool(cls and cls.classification)

