"""What a batch is: :class:`Inputs`, :class:`Batch`, and the tensor-tree helpers they use.

Owns the batch types every layer sees (re-exported by :mod:`curvscope.problem`),
:func:`map_tensors`, :func:`batch_seed` and the collection of a batch's tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .._errors import OptionError


def map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict, keeping the structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index``'s random draws for a matrix seeded with ``seed``.

    Per-batch seeds make Monte-Carlo matrices the same whichever process evaluates which
    batch (data parallelism) and whatever batches come before.
    """
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


def _tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensors(obj, lambda t: out.append(t) or t)
    return out


@dataclass(frozen=True)
class Inputs:
    """A batch's model inputs: positional ``args`` and keyword ``kwargs`` of ``forward``."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def map(self, fn) -> Inputs:
        """The same inputs with ``fn`` applied to every tensor."""
        return Inputs(map_tensors(self.args, fn), map_tensors(self.kwargs, fn))

    @property
    def tensor(self) -> torch.Tensor:
        """The only input, when the model takes one tensor.

        Raises:
            OptionError: when the inputs are not a single tensor.
        """
        if len(self.args) == 1 and not self.kwargs and isinstance(self.args[0], torch.Tensor):
            return self.args[0]
        raise OptionError(
            "this method needs a model that takes one input tensor; the batches give "
            f"{len(self.args)} positional and {len(self.kwargs)} keyword inputs."
        )


@dataclass(frozen=True)
class Batch:
    """One batch on the parameters' device, with its weight in the total loss.

    Attributes:
        inputs: what the model's forward takes.
        target: the loss's target (``None`` for a model that computes its own loss).
        weight: ``terms / total terms`` (mean reduction) or 1 (sum).
        size: samples in the batch (the leading dimension).
        terms: loss terms in the batch.
        index: the batch's position in a pass over the data (seeds per-batch random draws,
            so they do not depend on which process evaluates the batch).
    """

    inputs: Inputs
    target: Any
    weight: float
    size: int
    terms: int = 0
    index: int = 0

    @property
    def x(self) -> torch.Tensor:
        """The single input tensor (see :attr:`Inputs.tensor`)."""
        return self.inputs.tensor

    @property
    def y(self) -> Any:
        """The target."""
        return self.target

    def narrow(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop``: every tensor whose leading dimension is the batch's, cut.

        The weight and terms stay the whole batch's (an operator that sums the parts of a
        batch scales them as the batch); call only where samples do not interact.
        """

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[start:stop] if t.dim() and t.shape[0] == self.size else t

        return replace(
            self,
            inputs=self.inputs.map(cut),
            target=map_tensors(self.target, cut),
            size=min(stop, self.size) - start,
        )
