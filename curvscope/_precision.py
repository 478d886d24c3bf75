"""Which precision a run really computes in: lower-precision operations inside a forward.

A float64 run is only as precise as its least precise operation. HuggingFace Llama and T5
compute RMSNorm and softmax in float32 (``hidden_states.to(torch.float32)``), and their
own loss takes ``logits.float()``, even when the weights and inputs are float64: every
product then carries float32 round-off, and bounds or verdicts derived from float64's
epsilon would claim accuracy the numbers do not have. One forward of a batch is watched
with a :class:`torch.overrides.TorchFunctionMode`, and every torch function that returns a
floating tensor of a lower precision than the run's is recorded with the module it ran in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["Precision", "watch_precision"]


@dataclass(frozen=True)
class Precision:
    """What a run computes in.

    Attributes:
        dtype: the run's dtype (weights, inputs, products).
        computes_in: the least precise floating dtype any operation of a forward returned
            (``dtype`` when none was lower).
        where: ``"module (function)"`` of the first lower-precision operations, in order.
        count: how many lower-precision operations one forward ran.
    """

    dtype: torch.dtype
    computes_in: torch.dtype
    where: tuple[str, ...] = field(default=())
    count: int = 0

    @property
    def lowered(self) -> bool:
        """Whether some operation computed in a lower precision than the run's dtype."""
        return self.computes_in != self.dtype

    @property
    def eps(self) -> float:
        """Machine epsilon of :attr:`computes_in`: the round-off every bound must use."""
        return float(torch.finfo(self.computes_in).eps)

    def note(self) -> str | None:
        """One line for the notes, or ``None`` when the run computes in its dtype."""
        if not self.lowered:
            return None
        low = str(self.computes_in).replace("torch.", "")
        run = str(self.dtype).replace("torch.", "")
        shown = ", ".join(self.where[:4]) + (", ..." if len(self.where) > 4 else "")
        return (
            f"the model computes in {low} inside this {run} run ({self.count} operations of "
            f"a forward, e.g. {shown}): products, bounds and checks carry {low} round-off "
            f"(eps {self.eps:.1e}), and no tolerance below it can be met; casting those "
            "operations to the run's dtype in the model's code would lift the floor."
        )

    def to_dict(self) -> dict[str, Any]:
        """The result document's ``input.precision`` section."""
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "computes_in": str(self.computes_in).replace("torch.", ""),
            "eps": self.eps,
            "lower_precision_operations": self.count,
            "where": list(self.where[:16]),
        }


class _Watch(TorchFunctionMode):
    """Record torch functions whose floating outputs are less precise than ``dtype``."""

    def __init__(self, dtype: torch.dtype, stack: list[str]) -> None:
        super().__init__()
        self.eps = torch.finfo(dtype).eps
        self.lowest = dtype
        self.stack = stack
        self.where: list[str] = []
        self.modules: set[str] = set()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                eps = torch.finfo(t.dtype).eps
                if eps > self.eps:
                    self.count += 1
                    if eps > torch.finfo(self.lowest).eps:
                        self.lowest = t.dtype
                    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", "?")
                    module = self.stack[-1] if self.stack else "model"
                    if module not in self.modules:  # the first such operation of each module
                        self.modules.add(module)
                        self.where.append(f"{module} ({name.replace('TensorBase.', '')})")
                    break
        return out


def watch_precision(model: nn.Module, dtype: torch.dtype, run: Callable[[], Any]) -> Precision:
    """Call ``run()`` (one forward and loss) and say which precision it computed in.

    Module names come from forward hooks placed for the call and removed after it.
    """
    if not dtype.is_floating_point:
        return Precision(dtype, dtype)
    stack: list[str] = []
    handles = []
    def enter(label: str) -> Callable:
        def hook(*_: Any) -> None:
            stack.append(label)

        return hook

    def leave(*_: Any) -> None:  # a forward hook that returns nothing keeps the output
        if stack:
            stack.pop()

    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):  # takes no hooks; TorchScript runs unseen
            continue
        handles.append(m.register_forward_pre_hook(enter(f"{name or 'model'}: {type(m).__name__}")))
        handles.append(m.register_forward_hook(leave))
    watch = _Watch(dtype, stack)
    try:
        with watch:
            run()
    finally:
        for h in handles:
            h.remove()
    return Precision(dtype, watch.lowest, tuple(watch.where), watch.count)
