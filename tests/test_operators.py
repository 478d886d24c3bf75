"""GGN, Fisher (exact, MC), empirical Fisher and the matrix registry against dense float64
constructions built here from torch.func Jacobians on the concatenated data."""

import pytest
import torch
from torch import nn

from curvscope import Problem
from curvscope._errors import OptionError, UnsupportedModelError
from curvscope._losses import get_loss
from curvscope.operators import (
    MATRIX_NAMES,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    IdentityOperator,
    make_operator,
)

from .cases import CASES, build, concat
from .truth import assert_close

MC_RTOL = 0.1  # Monte-Carlo Fisher with many draws: relative Frobenius error bound


@pytest.fixture(params=CASES, ids=[c["id"] for c in CASES])
def case(request):
    return request.param


def _flat_fn(model, names):
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    numels = [params[n].numel() for n in names]
    w = torch.cat([params[n].detach().reshape(-1) for n in names])

    def unflat(flat):
        ps, i = {}, 0
        for n, s, k in zip(names, shapes, numels, strict=True):
            ps[n] = flat[i : i + k].reshape(s)
            i += k
        return ps

    return unflat, w


def _per_sample_loss(loss, reduction):
    fn = get_loss(loss)

    def single(o, y):
        return fn(o.unsqueeze(0), y.unsqueeze(0), reduction)

    return single


def dense_ggn(model, loss, data, reduction, names=None, final=None):
    """c sum_i J_i^T H_i J_i with J from jacrev and H_i from torch.func.hessian."""
    names = names or [n for n, _ in model.named_parameters()]
    model.eval()
    x, y = concat(data)
    unflat, w = _flat_fn(model, names)
    net = final or (lambda ps, xx: torch.func.functional_call(model, ps, (xx,)))
    out = net(unflat(w), x).detach()
    J = torch.func.jacrev(lambda f: net(unflat(f), x))(w).reshape(len(x), -1, len(w))
    single = _per_sample_loss("cross_entropy" if final else loss, reduction)
    H = torch.func.vmap(torch.func.hessian(single))(out.reshape(len(x), -1), y)
    c = 1.0 / len(x) if reduction == "mean" else 1.0
    return c * torch.einsum("nap,nab,nbq->pq", J, H, J)


def dense_empirical_fisher(model, loss, data, reduction):
    names = [n for n, _ in model.named_parameters()]
    model.eval()
    x, y = concat(data)
    unflat, w = _flat_fn(model, names)
    single = _per_sample_loss(loss, reduction)

    def losses(flat):
        out = torch.func.functional_call(model, unflat(flat), (x,))
        return torch.func.vmap(single)(out, y)

    Jl = torch.func.jacrev(losses)(w)  # [N, P] per-sample gradients
    c = 1.0 / len(x) if reduction == "mean" else 1.0
    return c * Jl.T @ Jl


def _columns_check(op, truth):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(op.shape[0], generator=g, dtype=torch.float64)
    V = torch.randn(op.shape[0], 4, generator=g, dtype=torch.float64)
    assert_close(op @ v, truth @ v, what=f"{op.name} A @ v")
    assert_close(op @ V, truth @ V, what=f"{op.name} A @ V")
    assert_close(torch.from_numpy(op.to_scipy() @ V.numpy()), truth @ V, what="to_scipy")


def _blocks_check(op, truth, problem):
    slices = problem.param_slices()
    for name in problem.names:
        s = slices[name]
        assert_close(op.block(name).dense(), truth[s, s], what=f"{op.name} block {name}")
    for module, names in problem.module_blocks().items():
        lo, hi = slices[names[0]].start, slices[names[-1]].stop
        assert_close(op.block(module).dense(), truth[lo:hi, lo:hi], what=f"{op.name} {module}")


def test_ggn_matches_dense_and_blocks(case):
    model, loss, data, reduction = build(case)
    truth = dense_ggn(model, loss, data, reduction)
    problem = Problem(model, loss, data, reduction=reduction)
    G = GGNOperator(problem)
    _columns_check(G, truth)
    _blocks_check(G, truth, problem)
    assert G.num_matvecs == 1 + 4 + 4
    assert float(torch.linalg.eigvalsh(truth).min()) > -1e-12


def test_exact_fisher_equals_ggn(case):
    """Plumbing only (name, blocks): FisherOperator is a GGNOperator whose exact output Fisher
    is the loss's output Hessian, so this compares a function with itself. The values are
    checked against likelihoods written out by hand in the class-sum, Gaussian and Bernoulli
    tests."""
    model, loss, data, reduction = build(case)
    problem = Problem(model, loss, data, reduction=reduction)
    truth = GGNOperator(problem).dense()
    F = FisherOperator(problem, kind="exact")
    assert F.name == "fisher"
    assert_close(F.dense(), truth, what="exact Fisher vs GGN")
    _blocks_check(F, truth, problem)


def test_exact_fisher_is_the_sum_over_classes():
    """(1/N) sum_i sum_c p_ic grad log p(c|x_i) grad log p(c|x_i)^T, built independently."""
    model, loss, data, reduction = build(CASES[0])
    x, _ = concat(data)
    names = [n for n, _ in model.named_parameters()]
    unflat, w = _flat_fn(model, names)
    model.eval()

    def logp(flat):
        return torch.log_softmax(torch.func.functional_call(model, unflat(flat), (x,)), -1)

    J = torch.func.jacrev(logp)(w)  # [N, C, P]
    p = logp(w).exp().detach()
    truth = torch.einsum("nc,ncp,ncq->pq", p, J, J) / len(x)
    F = FisherOperator(Problem(model, loss, data, reduction=reduction))
    assert_close(F.dense(), truth, what="Fisher by class sum")


def _per_sample_jacobians(model, x):
    """``J [N, d, P]``: one torch.autograd.grad per sample and output entry (no torch.func)."""
    params = list(model.parameters())
    out = model(x)
    rows = []
    for i in range(out.shape[0]):
        per_entry = []
        for j in range(out.shape[1]):
            grads = torch.autograd.grad(out[i, j], params, retain_graph=True)
            per_entry.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_entry))
    return out.detach(), torch.stack(rows)


def _gaussian_information(f, sigma2):
    """E_y[grad_f log p grad_f log p^T] for y ~ N(f, sigma2 I): grad = (y - f) / sigma2 and
    E[(y - f)(y - f)^T] = sigma2 I, so the information is I / sigma2 (per sample)."""
    n, d = f.shape
    return torch.eye(d, dtype=f.dtype).expand(n, d, d) / sigma2


def _bernoulli_information(f):
    """E_y[grad_f log p grad_f log p^T] for independent y_j ~ Bernoulli(sigmoid(f_j)), by
    enumerating every label vector y in {0, 1}^d: log p = sum_j y_j f_j - log(1 + e^f_j), so
    grad = y - sigmoid(f)."""
    n, d = f.shape
    s = torch.sigmoid(f)
    info = torch.zeros(n, d, d, dtype=f.dtype)
    for bits in range(2**d):
        y = torch.tensor([(bits >> j) & 1 for j in range(d)], dtype=f.dtype)
        prob = torch.prod(torch.where(y.bool(), s, 1 - s), dim=1)  # [N]
        g = y - s
        info += prob[:, None, None] * g[:, :, None] * g[:, None, :]
    return info


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_fisher_of_mse_is_the_gaussian_fisher(reduction):
    """mse is N(f, sigma^2 I), sigma^2 = d/2 (mean over outputs) or 1/2 (sum).

    docs/DESIGN.md "Mathematical conventions".
    """
    model, loss, data, _ = build(CASES[2])
    x, y = concat(data)
    f, J = _per_sample_jacobians(model, x)
    n, d = f.shape
    sigma2 = d / 2 if reduction == "mean" else 0.5
    c = 1 / n if reduction == "mean" else 1.0  # the loss is c sum_i (-log p_i) + const
    nll = ((f - y) ** 2).sum(1) / (2 * sigma2)  # -log p_i without its constant
    assert float(get_loss(loss)(f, y, reduction)) == pytest.approx(float(c * nll.sum()), 1e-14)
    truth = c * torch.einsum("nap,nab,nbq->pq", J, _gaussian_information(f, sigma2), J)
    F = FisherOperator(Problem(model, loss, data, reduction=reduction), kind="exact")
    assert_close(F.dense(), truth, what=f"Gaussian Fisher ({reduction})")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_fisher_of_bce_is_the_bernoulli_fisher(reduction):
    """BCE-with-logits: independent Bernoullis; the mean over the d outputs is the 1/d."""
    model = _small_mlp()
    data = _data(target="multi")
    x, y = concat(data)
    f, J = _per_sample_jacobians(model, x)
    n, d = f.shape
    c = 1 / (n * d) if reduction == "mean" else 1.0  # the loss is c sum_i (-log p_i)
    s = torch.sigmoid(f)
    nll = -(y * torch.log(s) + (1 - y) * torch.log(1 - s)).sum(1)
    value = float(get_loss("bce_with_logits")(f, y, reduction))
    assert value == pytest.approx(float(c * nll.sum()), 1e-12)
    truth = c * torch.einsum("nap,nab,nbq->pq", J, _bernoulli_information(f), J)
    F = FisherOperator(Problem(model, "bce_with_logits", data, reduction=reduction))
    assert_close(F.dense(), truth, what=f"Bernoulli Fisher ({reduction})")


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=lambda c: c["id"])
def test_mc_fisher_converges_and_is_fixed(case):
    model, loss, data, reduction = build(case)
    problem = Problem(model, loss, data, reduction=reduction)
    exact = GGNOperator(problem).dense()
    errors = []
    for s in (1, 64, 4096):
        F = FisherOperator(problem, kind="mc", mc_samples=s, seed=3)
        errors.append(float(torch.linalg.norm(F.dense() - exact) / torch.linalg.norm(exact)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < MC_RTOL
    F = FisherOperator(problem, kind="mc", mc_samples=2, seed=5)
    assert F.name == "fisher-mc"
    v = torch.randn(F.shape[0], dtype=torch.float64)
    state = torch.get_rng_state()
    first = F @ v
    assert torch.equal(first, F @ v)
    assert torch.equal(state, torch.get_rng_state())
    other = FisherOperator(problem, kind="mc", mc_samples=2, seed=6) @ v
    assert not torch.allclose(first, other)
    dense = F.dense()
    assert_close(dense, dense.T, what="MC Fisher symmetric")


def test_empirical_fisher_matches_dense(case):
    model, loss, data, reduction = build(case)
    truth = dense_empirical_fisher(model, loss, data, reduction)
    problem = Problem(model, loss, data, reduction=reduction)
    E = EmpiricalFisherOperator(problem)
    _columns_check(E, truth)
    _blocks_check(E, truth, problem)
    uncached = EmpiricalFisherOperator(problem, cache_limit=0)
    assert_close(uncached.dense(), truth, what="empirical Fisher without cache")


def _small_mlp(out_layer=None, d_out=3):
    torch.manual_seed(11)
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, d_out)]
    if out_layer is not None:
        layers.append(out_layer)
    return nn.Sequential(*layers).double()


def _data(n=(3, 4), d=4, classes=3, target="class", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(n), d, generator=g, dtype=torch.float64)
    if target == "class":
        y = torch.randint(0, classes, (sum(n),), generator=g)
    else:
        y = (torch.rand(sum(n), classes, generator=g) > 0.5).double()
    return [(x[: n[0]], y[: n[0]]), (x[n[0] :], y[n[0] :])]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_and_autograd_losses(reduction):
    model = _small_mlp()
    data = _data(target="multi")
    problem = Problem(model, "bce_with_logits", data, reduction=reduction)
    truth = dense_ggn(model, "bce_with_logits", data, reduction)
    _columns_check(GGNOperator(problem), truth)
    assert_close(FisherOperator(problem).dense(), truth, what="BCE Fisher = GGN")
    # chen_nonconvex: output Hessian by autograd, indefinite
    data = _data()
    problem = Problem(model, "chen_nonconvex", data, reduction=reduction)
    truth = dense_ggn(model, "chen_nonconvex", data, reduction)
    _columns_check(GGNOperator(problem), truth)
    with pytest.raises(UnsupportedModelError, match="negative log-likelihood"):
        FisherOperator(problem)


def test_nll_reads_final_logsoftmax_as_part_of_the_loss():
    model = _small_mlp(nn.LogSoftmax(dim=-1))
    data = _data()
    problem = Problem(model, "nll", data)

    def logits(ps, xx):  # the model without its LogSoftmax: same parameter names
        return torch.func.functional_call(model[:3], ps, (xx,))

    truth = dense_ggn(model, "nll", data, "mean", final=logits)
    _columns_check(GGNOperator(problem), truth)
    assert_close(FisherOperator(problem).dense(), truth, what="nll Fisher")
    plain = _small_mlp()
    with pytest.raises(UnsupportedModelError, match="ends in a LogSoftmax"):
        GGNOperator(Problem(plain, "nll", data))


def test_weight_decay_and_damping():
    model, loss, data, reduction = build(CASES[0])
    problem = Problem(model, loss, data, reduction=reduction, weight_decay=0.2)
    truth = dense_ggn(model, loss, data, reduction)
    n = truth.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    G = GGNOperator(problem)
    assert_close(G.dense(), truth + 0.2 * eye, what="GGN with decay")
    damped = G + 1e-3 * IdentityOperator(n, G.dtype, G.device)
    assert_close(damped.dense(), truth + 0.201 * eye, what="damped GGN")


def test_train_mode_refusals_and_block_errors():
    model, loss, data, reduction = build(CASES[4])
    problem = Problem(model, loss, data, reduction=reduction, train_mode=True)
    for name in ("empirical-fisher", "kfac", "kfac-empirical", "ekfac", "pch-abs-persample"):
        with pytest.raises(UnsupportedModelError, match="train-mode"):
            make_operator(name, problem if "pch" not in name else _mlp_train_problem())
    G = GGNOperator(problem)  # batch-coupled GGN is defined in train mode
    assert G.dense().shape == (G.shape[0], G.shape[0])
    with pytest.raises(OptionError, match="valid blocks: all"):
        GGNOperator(Problem(*build(CASES[0])[:3])).block("nope")


def _mlp_train_problem():
    model, loss, data, reduction = build(CASES[0])
    return Problem(model, loss, data, reduction=reduction, train_mode=True)


def test_registry_builds_every_name_and_lists_them():
    model, loss, data, reduction = build(CASES[0])
    problem = Problem(model, loss, data, reduction=reduction)
    v = torch.randn(problem.num_params, dtype=torch.float64)
    for name in MATRIX_NAMES:
        op = make_operator(name, problem, seed=1, mc_samples=2)
        assert op.name == name
        assert (op @ v).shape == v.shape
    with pytest.raises(OptionError, match="choose from hessian, ggn, fisher, fisher-mc") as err:
        make_operator("gauss-newton", problem)
    assert err.value.option == "matrices" and "--" not in str(err.value)


def test_scripted_ggn_uses_reverse_passes_and_empirical_fisher_is_refused():
    model, loss, data, reduction = build(CASES[0])
    truth = dense_ggn(model, loss, data, reduction)
    problem = Problem(torch.jit.script(model), loss, data, reduction=reduction)
    G = GGNOperator(problem)
    assert any("two reverse passes" in n for n in G.notes)
    V = torch.randn(problem.num_params, 3, dtype=torch.float64)
    assert_close(G @ V, truth @ V, what="scripted GGN @ V")
    with pytest.raises(UnsupportedModelError, match="TorchScript") as err:
        EmpiricalFisherOperator(problem)
    assert err.value.matrix == "empirical-fisher"


def test_float32_products_keep_dtype():
    model, loss, data, reduction = build(CASES[0], dtype=torch.float32)
    problem = Problem(model, loss, data, reduction=reduction)
    for name in ("ggn", "fisher", "empirical-fisher", "pch-abs", "kfac", "ekfac"):
        op = make_operator(name, problem)
        out = op @ torch.ones(op.shape[0])
        assert out.dtype == torch.float32, name


def test_ggn_in_train_mode_uses_batch_statistics():
    """Per batch J_b^T H J_b with J_b of the whole batch (BatchNorm couples its samples)."""
    import copy

    model, loss, data, reduction = build(CASES[4])
    problem = Problem(model, loss, data, reduction=reduction, train_mode=True)
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
    twin.train()
    names = [n for n, _ in twin.named_parameters()]
    unflat, w = _flat_fn(twin, names)
    single = _per_sample_loss(loss, reduction)
    N = sum(len(x) for x, _ in data)
    truth = 0.0
    for x, y in data:
        out = torch.func.functional_call(twin, unflat(w), (x,)).detach()
        J = torch.func.jacrev(lambda f, x=x: torch.func.functional_call(twin, unflat(f), (x,)))(w)
        H = torch.func.vmap(torch.func.hessian(single))(out, y)
        truth = truth + torch.einsum("nap,nab,nbq->pq", J, H, J) / N
    G = GGNOperator(problem)
    _columns_check(G, truth)
    eval_ggn = GGNOperator(Problem(model, loss, data, reduction=reduction)).dense()
    assert not torch.allclose(G.dense(), eval_ggn)
