"""Kinks seen in the computation: ReLU sign patterns and max-pool winners of a forward pass.

Finite differences across a kink of a piecewise-linear operation do not follow the Taylor
slopes, so a derivative check must know whether a step crossed one. Module types are not
enough (``F.relu`` and ``F.max_pool2d`` in a forward leave no module behind, issue 14), so
the forward runs under a :class:`~torch.overrides.TorchFunctionMode` that records, for every
call of a piecewise-linear function, which piece each element is on: the sign pattern of the
input of ``relu``/``leaky_relu``/``hardtanh``/``relu6``/``hardswish``/``hardsigmoid`` and the
argmax indices of every ``max_pool``/``adaptive_max_pool``. Two passes with the same data see
the same calls in the same order; a step crossed a kink when any pattern differs.

TorchScript modules run their operations in C++ where no mode sees them: nothing is recorded
(:attr:`KinkRecorder.observed` stays zero) and the checks rely on the shape of the error curve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch.overrides import TorchFunctionMode

__all__ = ["KinkRecorder", "pattern_changes"]

# name -> (lower, upper) breakpoints; None reads them from hardtanh's arguments
_BREAKS: dict[str, tuple[float, ...] | None] = {
    "relu": (0.0,),
    "relu_": (0.0,),
    "leaky_relu": (0.0,),
    "leaky_relu_": (0.0,),
    "relu6": (0.0, 6.0),
    "hardtanh": None,
    "hardtanh_": None,
    "hardswish": (-3.0, 3.0),
    "hardsigmoid": (-3.0, 3.0),
}
# max-pool name -> position of return_indices among the positional arguments
_POOLS = {
    "max_pool1d": 6,
    "max_pool2d": 6,
    "max_pool3d": 6,
    "adaptive_max_pool1d": 2,
    "adaptive_max_pool2d": 2,
    "adaptive_max_pool3d": 2,
}


def _hardtanh_breaks(args: tuple, kwargs: dict) -> tuple[float, ...]:
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return (float(lo), float(hi))


class KinkRecorder(TorchFunctionMode):
    """Records which linear piece every element of every piecewise-linear call is on.

    Use as a context manager around a forward pass; :attr:`patterns` then holds one tensor
    per call (a sign pattern or pooling indices), in call order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.patterns: list[torch.Tensor] = []

    @property
    def observed(self) -> int:
        """Piecewise-linear calls recorded."""
        return len(self.patterns)

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        x = args[0] if args else kwargs.get("input")
        if name in _BREAKS and isinstance(x, torch.Tensor):
            breaks = _BREAKS[name] or _hardtanh_breaks(args, kwargs)
            # record before calling: the in-place variants overwrite x
            self.patterns.append(torch.stack([x.detach() > b for b in breaks]))
            return func(*args, **kwargs)
        if name in _POOLS and isinstance(x, torch.Tensor):
            pos = _POOLS[name]
            want = bool(kwargs.get("return_indices", args[pos] if len(args) > pos else False))
            kw = {k: v for k, v in kwargs.items() if k != "return_indices"}
            values, indices = getattr(F, name + "_with_indices")(*args[:pos], **kw)
            self.patterns.append(indices.detach())
            return (values, indices) if want else values
        return func(*args, **kwargs)


def pattern_changes(reference: list[torch.Tensor], patterns: list[torch.Tensor]) -> int:
    """Elements on another piece than in ``reference`` (a different call sequence counts 1).

    Args:
        reference: patterns of the pass at the weights.
        patterns: patterns of a pass at shifted weights.
    """
    if len(reference) != len(patterns):
        return max(1, abs(len(reference) - len(patterns)))
    changed = 0
    for a, b in zip(reference, patterns, strict=True):
        if a.shape != b.shape:
            changed += 1
        else:
            changed += int((a != b).sum())
    return changed
