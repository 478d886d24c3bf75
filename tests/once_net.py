"""A network with a custom autograd Function differentiable only once, as custom kernels are.

Used by the library tests (``Net(once=True)`` against its ``twin``) and, as a ``--model``
file, by the command-line test.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable


class OnceTanh(torch.autograd.Function):
    """tanh whose backward is marked ``@once_differentiable``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


class Net(nn.Module):
    """Linear, tanh, linear; ``once``: the tanh is :class:`OnceTanh` (its twin is the truth)."""

    def __init__(self, once: bool = True, width: int = 4, inputs: int = 3, classes: int = 2):
        super().__init__()
        self.a, self.b = nn.Linear(inputs, width), nn.Linear(width, classes)
        self.act = OnceTanh.apply if once else torch.tanh

    def forward(self, x):
        return self.b(self.act(self.a(x)))

    def twin(self) -> Net:
        """The same weights with torch's tanh."""
        a, b = self.a, self.b
        net = Net(False, a.out_features, a.in_features, b.out_features).to(a.weight.dtype)
        net.load_state_dict(self.state_dict())
        return net


def build() -> Net:
    """The ``--model`` builder: 4 inputs, width 6, 3 classes."""
    return Net(True, width=6, inputs=4, classes=3)
