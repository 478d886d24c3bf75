"""Analysing a model curvscope has no built-in architecture for: state dict + --model.

Run:  python examples/own_model.py
It saves a small model's state dict and data, then prints the command line to analyse them.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn


class Net(nn.Module):
    """Your own architecture, importable as examples/own_model.py:build."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.GELU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.body(x)


def build() -> nn.Module:
    return Net()


if __name__ == "__main__":
    out = Path("own-model")
    out.mkdir(exist_ok=True)
    torch.manual_seed(0)
    x = torch.randn(400, 2)
    y = (x[:, 0] * x[:, 1] > 0).long()
    net = build()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    torch.save({"model_state_dict": net.state_dict()}, out / "checkpoint.pt")
    np.savez(out / "data.npz", x=x.numpy(), y=y.numpy())
    print("Now run:")
    print(
        f"  curvscope spectrum {out}/checkpoint.pt --model examples/own_model.py:build "
        f"--state-key model_state_dict --data {out}/data.npz --loss cross_entropy --per-layer"
    )
