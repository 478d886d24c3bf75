"""PCH (Chen et al. 2018) against the layer recursion built densely here, sample by sample,
with analytic activation derivatives, torch.kron and explicit expectations."""

import pytest
import torch
from torch import nn

from curvscope import Problem
from curvscope._errors import UnsupportedModelError
from curvscope._losses import get_loss
from curvscope.operators import GGNOperator, PCHOperator

from .cases import CASES, build, concat
from .truth import assert_close, dense_hessian

PSD_TOL = 1e-12  # smallest eigenvalue >= -PSD_TOL * largest

ACTS = {
    "tanh": (
        nn.Tanh,
        lambda z: 1 - torch.tanh(z) ** 2,
        lambda z: -2 * torch.tanh(z) * (1 - torch.tanh(z) ** 2),
    ),
    "sigmoid": (
        nn.Sigmoid,
        lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
        lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)) * (1 - 2 * torch.sigmoid(z)),
    ),
}


def _mlp(act, sizes=(4, 5, 4, 3), seed=0):
    torch.manual_seed(seed)
    mods = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            mods.append(ACTS[act][0]())
    return nn.Sequential(*mods).double()


def _data(loss, n=(3, 4), d_in=4, d_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(n), d_in, generator=g, dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(sum(n), d_out, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, d_out, (sum(n),), generator=g)
    return [(x[: n[0]], y[: n[0]]), (x[n[0] :], y[n[0] :])]


def _pos_matrix(M, mode):
    lam, Q = torch.linalg.eigh(M)
    lam = lam.abs() if mode == "abs" else lam.clamp(min=0)
    return Q @ torch.diag(lam) @ Q.T


def _pos_vec(d, mode):
    return d.abs() if mode == "abs" else d.clamp(min=0)


def _forward_record(model, x, act):
    """Per Linear layer: (W, input h, pre-activation z); and the output."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    rec, h = [], x
    for t, lin in enumerate(linears):
        z = h @ lin.weight.T + lin.bias
        rec.append((lin.weight.detach(), h, z))
        h = torch.tanh(z) if act == "tanh" else torch.sigmoid(z)
        if t == len(linears) - 1:
            h = z
    return rec, h


def _out_derivatives(loss, reduction, out, y):
    fn = get_loss(loss)

    def single(o, yi):
        return fn(o.unsqueeze(0), yi.unsqueeze(0), reduction)

    H = torch.stack([torch.func.hessian(single)(o, yi) for o, yi in zip(out, y, strict=True)])
    g = torch.stack([torch.func.grad(single)(o, yi) for o, yi in zip(out, y, strict=True)])
    return H, g


def dense_pch(model, act, loss, data, reduction, mode, approximation):
    """Dense block-diagonal PCH, one block per tensor, in named_parameters order."""
    x, y = concat(data)
    N = len(x)
    c = 1.0 / N if reduction == "mean" else 1.0
    d1, d2 = ACTS[act][1], ACTS[act][2]
    with torch.no_grad():
        rec, out = _forward_record(model, x, act)
    H, g = _out_derivatives(loss, reduction, out, y)
    L = len(rec)
    blocks = {}
    if approximation == "per-sample":
        wsum = [0.0] * L
        bsum = [0.0] * L
        for i in range(N):
            M = _pos_matrix(H[i], mode)
            gi = g[i]
            for t in reversed(range(L)):
                W, h, z = rec[t]
                if t < L - 1:
                    s1, s2 = d1(z[i]), d2(z[i])
                    M = torch.diag(s1) @ M @ torch.diag(s1) + torch.diag(_pos_vec(s2 * gi, mode))
                    gi = s1 * gi
                bsum[t] = bsum[t] + c * M
                wsum[t] = wsum[t] + c * torch.kron(M, torch.outer(h[i], h[i]))
                M = W.T @ M @ W
                gi = W.T @ gi
        for t in range(L):
            blocks[2 * t] = wsum[t]
            blocks[2 * t + 1] = bsum[t]
    else:
        M = _pos_matrix(H.mean(0), mode)
        gs = g.clone()
        for t in reversed(range(L)):
            W, h, z = rec[t]
            if t < L - 1:
                s1, s2 = d1(z), d2(z)
                ess = (s1.unsqueeze(2) * s1.unsqueeze(1)).mean(0)
                M = M * ess + torch.diag(_pos_vec((s2 * gs).mean(0), mode))
                gs = s1 * gs
            ehh = (h.unsqueeze(2) * h.unsqueeze(1)).mean(0)
            blocks[2 * t] = c * N * torch.kron(M, ehh)
            blocks[2 * t + 1] = c * N * M
            M = W.T @ M @ W
            gs = gs @ W
    return torch.block_diag(*[blocks[j] for j in range(2 * L)])


@pytest.mark.parametrize("approximation", ["expectation", "per-sample"])
@pytest.mark.parametrize("mode", ["abs", "clip"])
@pytest.mark.parametrize(
    "act,loss,reduction",
    [
        ("tanh", "cross_entropy", "mean"),
        ("sigmoid", "cross_entropy", "sum"),
        ("tanh", "mse", "mean"),
        ("tanh", "chen_nonconvex", "mean"),
    ],
)
def test_pch_matches_dense_recursion_and_is_psd(act, loss, reduction, mode, approximation):
    model = _mlp(act)
    data = _data(loss)
    truth = dense_pch(model, act, loss, data, reduction, mode, approximation)
    problem = Problem(model, loss, data, reduction=reduction)
    P = PCHOperator(problem, mode=mode, approximation=approximation)
    suffix = "-persample" if approximation == "per-sample" else ""
    assert P.name == f"pch-{mode}{suffix}"
    g = torch.Generator().manual_seed(2)
    V = torch.randn(P.shape[0], 3, generator=g, dtype=torch.float64)
    assert_close(P @ V, truth @ V, what="PCH @ V")
    dense = P.dense()
    assert_close(dense, truth, what="PCH dense")
    lam = torch.linalg.eigvalsh(dense)
    assert float(lam.min()) >= -PSD_TOL * float(lam.abs().max())
    # blocks: per tensor, and a module's block has no weight-bias cross terms
    slices = problem.param_slices()
    for name in problem.names:
        s = slices[name]
        assert_close(P.block(name).dense(), truth[s, s], what=f"block {name}")
    for module, names in problem.module_blocks().items():
        lo, hi = slices[names[0]].start, slices[names[-1]].stop
        assert_close(P.block(module).dense(), truth[lo:hi, lo:hi], what=f"block {module}")


@pytest.mark.parametrize(
    "case", [CASES[0], CASES[1], CASES[2], CASES[3], CASES[5]], ids=lambda c: c["id"]
)
def test_per_sample_without_pos_gives_exact_hessian_blocks(case):
    model, loss, data, reduction = build(case)
    H = dense_hessian(model, loss, data, reduction)
    problem = Problem(model, loss, data, reduction=reduction)
    P = PCHOperator(problem, approximation="per-sample", _pos="identity").dense()
    for s in problem.param_slices().values():
        assert_close(P[s, s], H[s, s], what="identity-Pos PCH block vs Hessian block")


def test_relu_per_sample_pch_equals_ggn_blocks():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    model = model.double()
    data = _data("cross_entropy")
    problem = Problem(model, "cross_entropy", data, reduction="sum")
    G = GGNOperator(problem).dense()
    P = PCHOperator(problem, mode="clip", approximation="per-sample").dense()
    for s in problem.param_slices().values():
        assert_close(P[s, s], G[s, s], what="ReLU PCH vs GGN block")


def test_nll_with_logsoftmax_and_flatten_and_trailing_activation():
    model = _mlp("tanh")
    data = _data("cross_entropy")
    truth = PCHOperator(Problem(model, "cross_entropy", data)).dense()
    wrapped = nn.Sequential(nn.Flatten(), *model, nn.LogSoftmax(dim=-1))
    got = PCHOperator(Problem(wrapped, "nll", data)).dense()
    assert_close(got, truth, what="nll + LogSoftmax read as cross-entropy")
    # a trailing activation is one more step of the recursion: exact blocks with identity Pos
    torch.manual_seed(4)
    head = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Sigmoid()).double()
    mse = _data("mse")
    problem = Problem(head, "mse", mse, reduction="sum")
    H = dense_hessian(head, "mse", mse, "sum")
    P = PCHOperator(problem, approximation="per-sample", _pos="identity").dense()
    for s in problem.param_slices().values():
        assert_close(P[s, s], H[s, s], what="trailing sigmoid")


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_unsupported_layers_are_named():
    model, loss, data, reduction = build(CASES[4])
    with pytest.raises(UnsupportedModelError, match=r"layer '0' \(Conv2d\)"):
        PCHOperator(Problem(model, loss, data, reduction=reduction))
    functional = _Functional().double()
    with pytest.raises(UnsupportedModelError, match="forward is the chain"):
        PCHOperator(Problem(functional, "cross_entropy", _data("cross_entropy")))
    with pytest.raises(UnsupportedModelError, match="train-mode"):
        PCHOperator(
            Problem(_mlp("tanh"), "cross_entropy", _data("cross_entropy"), train_mode=True),
            approximation="per-sample",
        )


def test_per_sample_cache_gives_the_same_products():
    model = _mlp("sigmoid")
    data = _data("cross_entropy")
    problem = Problem(model, "cross_entropy", data)
    cached = PCHOperator(problem, approximation="per-sample")
    uncached = PCHOperator(problem, approximation="per-sample", cache_limit=0)
    V = torch.randn(problem.num_params, 2, dtype=torch.float64)
    assert_close(cached @ V, uncached @ V, what="cache")
    assert_close(cached @ V, uncached @ V, what="cache, second product")
