"""Test cases as data (STYLE.md section 5): tiny models, both losses, both reductions,
unequal batches, a CNN with BatchNorm in eval mode, and a real DataLoader.

Each case is a dict of factories plus a seed; ``build(case, dtype)`` returns a fresh
``(model, loss, batches, reduction)`` in the requested dtype, so tests never share state.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

RTOL = 1000 * torch.finfo(torch.float64).eps  # ~2.2e-13; batch-accumulated HVPs match to ~2 eps


def _mlp(act=nn.Tanh):
    return nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 3))


def _mlp_mse():
    return nn.Sequential(nn.Linear(3, 6), nn.Sigmoid(), nn.Linear(6, 2))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def _ce_data(n, d, classes, g):
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def _split(x, y, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], y[i : i + s]))
        i += s
    return out


def _make_mlp_ce(g, sizes=(3, 4)):
    x, y = _ce_data(sum(sizes), 4, 3, g)
    return _mlp(), "cross_entropy", _split(x, y, sizes)


def _make_mlp_mse(g, sizes=(3, 4)):
    x = torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64)
    y = torch.randn(sum(sizes), 2, generator=g, dtype=torch.float64)
    return _mlp_mse(), "mse", _split(x, y, sizes)


def _make_cnn(g, sizes=(3, 4)):
    x = torch.randn(sum(sizes), 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes),), generator=g)
    return _randomise_bn(_cnn()), "cross_entropy", _split(x, y, sizes)


def _make_loader(g):
    x, y = _ce_data(7, 4, 3, g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    return _mlp(nn.Sigmoid), "cross_entropy", loader


CASES = [
    {"id": "mlp-ce-mean-unequal", "make": _make_mlp_ce, "reduction": "mean", "seed": 0},
    {"id": "mlp-ce-sum-unequal", "make": _make_mlp_ce, "reduction": "sum", "seed": 1},
    {"id": "mlp-mse-mean-unequal", "make": _make_mlp_mse, "reduction": "mean", "seed": 2},
    {"id": "mlp-mse-sum-unequal", "make": _make_mlp_mse, "reduction": "sum", "seed": 3},
    {"id": "cnn-bn-eval-ce-mean", "make": _make_cnn, "reduction": "mean", "seed": 4},
    {"id": "mlp-sigmoid-dataloader", "make": _make_loader, "reduction": "mean", "seed": 5},
]


def build(case, dtype=torch.float64):
    """Fresh (model, loss, data, reduction) for ``case`` in ``dtype``."""
    g = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    model, loss, data = case["make"](g)
    model = model.to(dtype)
    if not isinstance(data, DataLoader):
        data = [
            (
                x.to(dtype) if x.is_floating_point() else x,
                y.to(dtype) if y.is_floating_point() else y,
            )
            for x, y in data
        ]
    return model, loss, data, case["reduction"]


def concat(data):
    """All batches concatenated: the ground truth sees the whole sample set at once."""
    xs, ys = zip(*[(x, y) for x, y in data], strict=True)
    return torch.cat(xs), torch.cat(ys)


def operators(problem, *names, **kw):
    """``{name: operator}`` for matrix names (default: the Hessian), through the registry."""
    from curvscope.operators import build_operators

    return build_operators(problem, list(names) or ["hessian"], **kw)[0]
