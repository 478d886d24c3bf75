"""KFAC and EKFAC against dense Kronecker constructions built here (per-sample Jacobians of
the logits w.r.t. each layer's output by torch.func, inputs and unfolded patches, torch.kron)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvscope import Problem
from curvscope._errors import OptionError, UnsupportedModelError
from curvscope._losses import get_loss
from curvscope.operators import (
    EKFACOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    KFACOperator,
    make_operator,
)

from .cases import CASES, build, concat
from .truth import assert_close

MC_RTOL = 0.1


def _mlp_problem(loss="cross_entropy", reduction="mean", n=(3, 4), seed=0):
    torch.manual_seed(seed)
    d_out = 3 if loss == "cross_entropy" else 2
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, d_out)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(sum(n), 4, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (sum(n),), generator=g)
    else:
        y = torch.randn(sum(n), d_out, generator=g, dtype=torch.float64)
    data = [(x[: n[0]], y[: n[0]]), (x[n[0] :], y[n[0] :])] if len(n) == 2 else [(x, y)]
    return model, loss, data, reduction


def _output_matrices(loss, reduction, out, y, fisher_type):
    """Per-sample output Fisher F_i (exact) or g g^T at the labels (empirical)."""
    fn = get_loss(loss)

    def single(o, yi):
        return fn(o.unsqueeze(0), yi.unsqueeze(0), reduction)

    if fisher_type == "exact":  # equals the output Hessian for CE and MSE (tested elsewhere)
        return torch.stack(
            [torch.func.hessian(single)(o, yi) for o, yi in zip(out, y, strict=True)]
        )
    gs = torch.stack([torch.func.grad(single)(o, yi) for o, yi in zip(out, y, strict=True)])
    return gs.unsqueeze(2) * gs.unsqueeze(1)


def _aug_to_flat(n_out, n_in):
    """Indices of the [W | b] row-major layout in the flat (weight, then bias) layout."""
    w = [o * (n_in + 1) + j for o in range(n_out) for j in range(n_in)]
    return w + [o * (n_in + 1) + n_in for o in range(n_out)]


def dense_kfac_layer(model, index, loss, data, reduction, fisher_type, conv=False):
    """Dense G kron A of layer ``model[index]`` in the flat (weight, bias) layout."""
    x, y = concat(data)
    N = len(x)
    c = 1.0 / N if reduction == "mean" else 1.0
    model.eval()
    head, layer, rest = model[:index], model[index], model[index + 1 :]
    with torch.no_grad():
        h = head(x)
        z = layer(h)
        out = rest(z)
    Fo = _output_matrices(loss, reduction, out, y, fisher_type)
    J = torch.func.vmap(torch.func.jacrev(lambda zi: rest(zi.unsqueeze(0))[0]))(z)
    if conv:
        a = F.unfold(h, layer.kernel_size, padding=layer.padding, stride=layer.stride)
        a = a.transpose(1, 2)  # [N, R, C*kh*kw]
        J = J.reshape(N, J.shape[1], layer.out_channels, -1).permute(0, 3, 1, 2)  # [N,R,d,out]
    else:
        a = h.unsqueeze(1)
        J = J.unsqueeze(1)
    R = a.shape[1]
    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    A = torch.einsum("nri,nrj->ij", a, a) / (N * R)
    G = c * torch.einsum("nrdo,nde,nrep->op", J.contiguous(), Fo, J.contiguous())
    K = torch.kron(G.contiguous(), A.contiguous())
    idx = _aug_to_flat(G.shape[0], A.shape[0] - 1)
    return K[idx][:, idx].detach(), G.detach(), A.detach()


def _module_slice(problem, module):
    slices = problem.param_slices()
    names = problem.block_param_names(module)
    return slice(slices[names[0]].start, slices[names[-1]].stop)


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize(
    "loss,reduction", [("cross_entropy", "mean"), ("cross_entropy", "sum"), ("mse", "mean")]
)
def test_kfac_mlp_matches_dense_kronecker(loss, reduction, fisher_type):
    model, loss, data, reduction = _mlp_problem(loss, reduction)
    problem = Problem(model, loss, data, reduction=reduction)
    K = KFACOperator(problem, fisher_type=fisher_type)
    assert K.name == ("kfac" if fisher_type == "exact" else "kfac-empirical")
    blocks = [dense_kfac_layer(model, i, loss, data, reduction, fisher_type)[0] for i in (0, 2)]
    truth = torch.block_diag(*blocks)
    g = torch.Generator().manual_seed(3)
    V = torch.randn(K.shape[0], 3, generator=g, dtype=torch.float64)
    assert_close(K @ V, truth @ V, what="KFAC @ V")
    assert_close(K.dense(), truth, what="KFAC dense")
    slices = problem.param_slices()
    for name in problem.names:
        s = slices[name]
        assert_close(K.block(name).dense(), truth[s, s], what=f"block {name}")
    for module in ("0", "2"):
        s = _module_slice(problem, module)
        assert_close(K.block(module).dense(), truth[s, s], what=f"block {module}")
    eigs = K.eigenvalues()
    for module in ("0", "2"):
        s = _module_slice(problem, module)
        want = torch.linalg.eigvalsh(truth[s, s]).flip(0)
        assert_close(eigs[module], want, what=f"eigenvalues {module}")


def test_kfac_is_the_fisher_block_for_one_sample():
    model, loss, data, reduction = _mlp_problem(n=(1,))
    problem = Problem(model, loss, data, reduction=reduction)
    for fisher_type, ref in (
        ("exact", FisherOperator(problem)),
        ("empirical", EmpiricalFisherOperator(problem)),
    ):
        K = KFACOperator(problem, fisher_type=fisher_type)
        R = ref.dense()
        for module in ("0", "2"):
            s = _module_slice(problem, module)
            assert_close(K.block(module).dense(), R[s, s], what=f"{fisher_type} one sample")


def test_kfac_cnn_matches_dense_kronecker():
    model, loss, data, reduction = build(CASES[4])
    problem = Problem(model, loss, data, reduction=reduction, params="0.*,5.*")
    K = KFACOperator(problem)
    conv = dense_kfac_layer(model, 0, loss, data, reduction, "exact", conv=True)[0]
    lin = dense_kfac_layer(model, 5, loss, data, reduction, "exact")[0]
    truth = torch.block_diag(conv, lin)
    assert_close(K.dense(), truth, what="KFAC CNN")
    s = _module_slice(problem, "0")
    assert_close(K.block("0").dense(), truth[s, s], what="conv block")
    assert_close(K.block("0.weight").dense(), truth[s, s][:18, :18], what="conv weight block")


def _ekfac_truth(K_factors, B, idx):
    G, A = K_factors
    qg = torch.linalg.eigh(G)[1]
    qa = torch.linalg.eigh(A)[1]
    U = torch.kron(qg, qa)[idx]  # eigenbasis in the flat layout
    S = torch.diagonal(U.T @ B @ U)
    return U @ torch.diag(S) @ U.T


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_ekfac_matches_dense_eigenbasis_rescaling(fisher_type):
    model, loss, data, reduction = _mlp_problem(reduction="sum")
    problem = Problem(model, loss, data, reduction=reduction)
    E = EKFACOperator(problem, fisher_type=fisher_type)
    ref = (FisherOperator if fisher_type == "exact" else EmpiricalFisherOperator)(problem).dense()
    blocks = []
    for index, module in ((0, "0"), (2, "2")):
        _, G, A = dense_kfac_layer(model, index, loss, data, reduction, fisher_type)
        s = _module_slice(problem, module)
        blocks.append(_ekfac_truth((G, A), ref[s, s], _aug_to_flat(G.shape[0], A.shape[0] - 1)))
    truth = torch.block_diag(*blocks)
    assert_close(E.dense(), truth, what="EKFAC dense")
    for module in ("0", "2"):
        s = _module_slice(problem, module)
        assert_close(E.block(module).dense(), truth[s, s], what=f"EKFAC block {module}")
        lam = torch.linalg.eigvalsh(truth[s, s]).flip(0)
        assert_close(E.eigenvalues()[module], lam, what="EKFAC eigenvalues")
    # EKFAC is at least as close to the true block as KFAC (George et al. 2018, sec. 3)
    K = KFACOperator(problem, fisher_type=fisher_type)
    for module in ("0", "2"):
        s = _module_slice(problem, module)
        e = torch.linalg.norm(E.block(module).dense() - ref[s, s])
        k = torch.linalg.norm(K.block(module).dense() - ref[s, s])
        assert float(e) <= float(k) * (1 + 1e-12)


def test_ekfac_cnn_matches_dense():
    model, loss, data, reduction = build(CASES[4])
    problem = Problem(model, loss, data, reduction=reduction, params="0.*,5.*")
    E = EKFACOperator(problem)
    ref = FisherOperator(problem).dense()
    blocks = []
    for index, module, conv in ((0, "0", True), (5, "5", False)):
        _, G, A = dense_kfac_layer(model, index, loss, data, reduction, "exact", conv=conv)
        s = _module_slice(problem, module)
        blocks.append(_ekfac_truth((G, A), ref[s, s], _aug_to_flat(G.shape[0], A.shape[0] - 1)))
    assert_close(E.dense(), torch.block_diag(*blocks), what="EKFAC CNN")


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_inverse_with_damping_and_weight_decay(cls):
    model, loss, data, reduction = _mlp_problem()
    problem = Problem(model, loss, data, reduction=reduction, weight_decay=0.05)
    K = cls(problem)
    dense = K.dense()
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    inv = K.inverse(0.1)
    assert_close(inv.dense() @ (dense + 0.1 * eye), eye, what="inverse")
    s = _module_slice(problem, "2")
    blk = inv.block("2").dense()
    assert_close(blk @ (dense[s, s] + 0.1 * eye[s, s]), eye[s, s], what="inverse block")
    with pytest.raises(OptionError, match="larger damping"):
        cls(Problem(model, loss, data, reduction=reduction)).inverse(-10.0)


def test_mc_kfac_is_fixed_and_converges():
    model, loss, data, reduction = _mlp_problem()
    problem = Problem(model, loss, data, reduction=reduction)
    exact = KFACOperator(problem).dense()
    K1 = make_operator("kfac-mc", problem, seed=2, mc_samples=1)
    assert K1.name == "kfac-mc"
    assert torch.equal(K1.dense(), make_operator("kfac-mc", problem, seed=2).dense())
    errs = [
        float(
            torch.linalg.norm(KFACOperator(problem, fisher_type="mc", mc_samples=s).dense() - exact)
            / torch.linalg.norm(exact)
        )
        for s in (1, 4000)
    ]
    assert errs[1] < errs[0]
    assert errs[1] < MC_RTOL


def test_unsupported_layers_are_named():
    model, loss, data, reduction = build(CASES[4])
    problem = Problem(model, loss, data, reduction=reduction)
    K = KFACOperator(problem)  # the BatchNorm layer is left out, and the note says so
    assert any("1 (BatchNorm2d)" in n for n in K.notes)
    assert K.shape[0] == problem.num_params - 4
    with pytest.raises(UnsupportedModelError, match=r"layer '1' \(BatchNorm2d\)") as err:
        K.block("1")
    assert err.value.matrix == "kfac" and err.value.layer == "1"
    with pytest.raises(UnsupportedModelError, match=r"in none \(layer '1' is BatchNorm2d\)"):
        KFACOperator(problem.select("1.*"))
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    with pytest.raises(UnsupportedModelError, match="groups=2"):
        EKFACOperator(Problem(grouped, "cross_entropy", [(x, y)]))
    with pytest.raises(OptionError, match="choose one of exact, mc, empirical"):
        KFACOperator(Problem(*_mlp_problem()[:3]), fisher_type="true")


def test_ekfac_weight_only_block_uses_the_sliced_factor():
    model, loss, data, reduction = _mlp_problem()
    problem = Problem(model, loss, data, reduction=reduction)
    E = EKFACOperator(problem)
    ref = FisherOperator(problem).dense()
    _, G, A = dense_kfac_layer(model, 0, loss, data, reduction, "exact")
    s = problem.param_slices()["0.weight"]
    Aw = A[:-1, :-1]
    truth = _ekfac_truth((G, Aw), ref[s, s], list(range(G.shape[0] * Aw.shape[0])))
    assert_close(E.block("0.weight").dense(), truth, what="EKFAC weight-only block")


def test_empirical_kfac_on_sequences_with_an_embedding_matches_its_definition():
    """Expand KFAC (Eschenhagen et al. 2023): Linear weights shared over positions; the
    Embedding's input is one-hot, so its A is the diagonal of token frequencies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5, (5, 3), generator=g)
    y = torch.randint(0, 4, (5, 3), generator=g)
    y[1, 2] = -100
    data = [(x[:2], y[:2]), (x[2:], y[2:])]
    problem = Problem(model, "cross_entropy", data)
    K = KFACOperator(problem, fisher_type="empirical")
    N, R = 5, 3
    T = int((y != -100).sum())
    emb, lin = model[0], model[1]
    h = emb(x).detach()  # [N, R, 3]: the Linear's inputs
    h_ = h.clone().requires_grad_(True)
    out = lin(h_)
    terms = (y != -100).sum(1).double()  # tokens per sample
    # per-sample label gradients scaled by 1/sqrt(T_i) (mean reduction, the EF convention)
    losses = (
        torch.nn.functional.cross_entropy(
            out.reshape(-1, 4), y.reshape(-1), ignore_index=-100, reduction="none"
        )
        .reshape(N, R)
        .sum(1)
    )
    gh = torch.autograd.grad((losses / terms.sqrt()).sum(), h_, retain_graph=True)[0]
    go = torch.autograd.grad((losses / terms.sqrt()).sum(), out)[0]  # [N, R, 4]
    a = torch.cat([h, torch.ones(N, R, 1, dtype=torch.float64)], -1)
    A_lin = torch.einsum("nri,nrj->ij", a, a) / (N * R)
    G_lin = torch.einsum("nro,nrp->op", go, go) / T
    A_emb = torch.bincount(x.reshape(-1), minlength=5).double() / (N * R)
    G_emb = torch.einsum("nro,nrp->op", gh, gh) / T
    # dense blocks: Linear row-major [W | b] -> G kron A; Embedding [V, d] -> A kron G
    B_lin = torch.kron(G_lin, A_lin)
    B_emb = torch.kron(torch.diag(A_emb), G_emb)
    sl = problem.param_slices()
    V = torch.randn(problem.num_params, 2, dtype=torch.float64)
    got = K @ V
    assert_close(got[sl["0.weight"]], B_emb @ V[sl["0.weight"]], what="Embedding block")
    # the Linear's weight and bias are one block in [W | b] order
    idx = torch.arange(12).reshape(4, 3)
    order = torch.cat([torch.cat([idx, (12 + torch.arange(4))[:, None]], 1)]).reshape(-1)
    lin_rows = torch.arange(sl["1.weight"].start, sl["1.bias"].stop)[order]
    assert_close(got[lin_rows], B_lin @ V[lin_rows], what="Linear block over positions")
    inv = K.inverse(0.1)
    back = K @ (inv @ V) + 0.1 * (inv @ V)
    assert_close(back, V, rtol=1e-10, what="damped inverse")
