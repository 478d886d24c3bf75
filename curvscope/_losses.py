"""Loss functions on model outputs, with torch's per-sample definitions.

Each loss takes ``(output, target, reduction)`` and returns a scalar, with ``reduction``
``"mean"`` (average over samples, and for ``mse`` also over the output entries, as
``torch.nn.functional.mse_loss`` does) or ``"sum"``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F

from ._errors import OptionError

__all__ = ["LOSSES", "Loss", "get_loss", "is_classification"]

LossFn = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]


class Loss(str, Enum):
    """Loss names accepted by ``--loss``."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    BCE_WITH_LOGITS = "bce_with_logits"
    NLL = "nll"
    CHEN_NONCONVEX = "chen_nonconvex"


def _cross_entropy(out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction=reduction)


def _mse(out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    # torch's mse_loss definition written out: F.mse_loss's backward fails under forward-mode
    # AD of its gradient ("ZeroTensors are immutable", torch 2.13), which jvp-of-grad needs.
    sq = (out - y.reshape(out.shape).to(out.dtype)) ** 2
    return sq.mean() if reduction == "mean" else sq.sum()


def _bce(out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    target = y.reshape(out.shape).to(out.dtype)
    return F.binary_cross_entropy_with_logits(out, target, reduction=reduction)


def _nll(out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.nll_loss(out, y, reduction=reduction)


CHEN_DELTA = 5.0
"""delta of the non-convex criterion, fixed in Chen et al. 2018, text after eq. (14)."""
CHEN_EPSILON = 0.2
"""epsilon of the non-convex criterion, fixed in Chen et al. 2018, text after eq. (14)."""


def _chen_nonconvex(out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    r"""Non-convex criterion of Chen et al. 2018, eq. (14).

    .. math:: C(\hat y_i | y_i) = 1 / (1 + \exp(\delta (y_i^T \hat y_i - \epsilon)))

    with :math:`\hat y_i = \mathrm{softmax}(z_i)` and :math:`y_i` the one-hot label. It is bounded
    above and its Hessian in the logits is indefinite (the reason PCH applies Pos at the top).
    """
    p = torch.softmax(out, dim=-1)
    p_true = p.gather(-1, y.reshape(-1, 1)).squeeze(-1)
    per_sample = torch.sigmoid(-CHEN_DELTA * (p_true - CHEN_EPSILON))
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


LOSSES: dict[str, LossFn] = {
    Loss.CROSS_ENTROPY.value: _cross_entropy,
    Loss.MSE.value: _mse,
    Loss.BCE_WITH_LOGITS.value: _bce,
    Loss.NLL.value: _nll,
    Loss.CHEN_NONCONVEX.value: _chen_nonconvex,
}

_CLASSIFICATION = {"cross_entropy", "nll", "chen_nonconvex"}


def get_loss(name: str) -> LossFn:
    """Return the loss function called ``name``.

    Args:
        name: one of :data:`LOSSES`.

    Raises:
        OptionError: for an unknown name, listing the valid ones.
    """
    key = name.value if isinstance(name, Loss) else str(name)
    if key not in LOSSES:
        raise OptionError(f"--loss {name!r} is not known; choose one of {', '.join(LOSSES)}.")
    return LOSSES[key]


def is_classification(name: str) -> bool:
    """Whether labels of loss ``name`` are integer class indices."""
    return (name.value if isinstance(name, Loss) else str(name)) in _CLASSIFICATION
