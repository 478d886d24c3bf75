import copy

import pytest
import torch

from curvscope import Problem
from curvscope.operators import DenseOperator, HessianOperator, graph_account

from .cases import CASES, build
from .truth import assert_close, dense_hessian, hessian_by_double_backward


@pytest.fixture(params=CASES, ids=[c["id"] for c in CASES])
def case(request):
    return request.param


@pytest.mark.parametrize("mode", ["auto", "double-backward", "forward-over-reverse"])
def test_hessian_products_match_dense_truth(case, mode):
    model, loss, data, reduction = build(case)
    truth = dense_hessian(model, loss, data, reduction)
    H = HessianOperator(Problem(model, loss, data, reduction=reduction), mode=mode)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
    V = torch.randn(H.shape[0], 5, generator=g, dtype=torch.float64)
    assert_close(H @ v, truth @ v, what="A @ v")
    assert_close(H @ V, truth @ V, what="A @ V")
    assert_close(torch.from_numpy(H.to_scipy() @ V.numpy()), truth @ V, what="to_scipy")
    assert H.num_matvecs == 1 + 5 + 5


def test_dense_and_blocks_match_slices(case):
    model, loss, data, reduction = build(case)
    truth = dense_hessian(model, loss, data, reduction)
    problem = Problem(model, loss, data, reduction=reduction)
    H = HessianOperator(problem)
    assert_close(H.dense(), truth, what="dense()")
    slices = problem.param_slices()
    for name in problem.names:
        s = slices[name]
        assert_close(H.block(name).dense(), truth[s, s], what=f"block {name}")
    for module, names in problem.module_blocks().items():
        lo, hi = slices[names[0]].start, slices[names[-1]].stop
        assert_close(H.block(module).dense(), truth[lo:hi, lo:hi], what=f"block {module}")


def test_weight_decay_and_lazy_algebra():
    model, loss, data, reduction = build(CASES[0])
    truth = dense_hessian(model, loss, data, reduction, weight_decay=0.3)
    problem = Problem(model, loss, data, reduction=reduction, weight_decay=0.3)
    H = HessianOperator(problem)
    assert_close(H.dense(), truth, what="weight decay")
    from curvscope.operators import IdentityOperator

    damped = H + 1e-2 * IdentityOperator(H.shape[0], H.dtype, H.device)
    assert_close(damped.dense(), truth + 1e-2 * torch.eye(H.shape[0], dtype=torch.float64))
    name = problem.names[0]
    s = problem.param_slices()[name]
    n = s.stop - s.start
    assert_close(damped.block(name).dense(), truth[s, s] + 1e-2 * torch.eye(n, dtype=torch.float64))
    assert_close((H - H).dense(), torch.zeros_like(truth))


def test_model_untouched_and_mode_restored():
    model, loss, data, reduction = build(CASES[4])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = HessianOperator(Problem(model, loss, data, reduction=reduction))
    H @ torch.ones(H.shape[0], dtype=torch.float64)
    assert model.training
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_train_mode_uses_batch_statistics_without_updating():
    model, loss, data, reduction = build(CASES[4])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p_eval = Problem(model, loss, data, reduction=reduction)
    p_train = Problem(model, loss, data, reduction=reduction, train_mode=True)
    assert float(p_eval.loss()) != pytest.approx(float(p_train.loss()))
    HessianOperator(p_train) @ torch.ones(p_train.num_params, dtype=torch.float64)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _train_mode_loss(model, data):
    """The train-mode loss from its definition: each batch normalised by its own statistics,
    the per-sample cross-entropies summed over batches and divided by all samples (mean)."""
    twin = copy.deepcopy(model).train()
    named = dict(twin.named_parameters())
    names = list(named)
    shapes = [named[n].shape for n in names]
    buffers = {k: b.detach().clone() for k, b in twin.named_buffers()}
    total = sum(len(x) for x, _ in data)

    def f(flat):
        ps, i = {}, 0
        for n, shape in zip(names, shapes, strict=True):
            k = shape.numel()
            ps[n] = flat[i : i + k].reshape(shape)
            i += k
        value = 0.0
        for x, y in data:
            state = {**ps, **{k: b.clone() for k, b in buffers.items()}}  # running stats: copies
            out = torch.func.functional_call(twin, state, (x,))
            value = value + torch.nn.functional.cross_entropy(out, y, reduction="sum")
        return value / total

    w = torch.cat([named[n].detach().reshape(-1) for n in names])
    return f, w, names


def test_train_mode_hessian_matches_double_backward_truth():
    model, loss, data, reduction = build(CASES[4])  # BatchNorm CNN, batches of 3 and 4
    assert loss == "cross_entropy" and reduction == "mean"
    problem = Problem(model, loss, data, reduction=reduction, train_mode=True)
    f, w, names = _train_mode_loss(model, data)
    assert names == list(problem.names)
    assert float(problem.loss()) == pytest.approx(float(f(w)), rel=1e-13)
    truth = hessian_by_double_backward(f, w)  # never torch.func.hessian through train-mode BN
    # the truth itself: central differences of the gradient along a random direction
    v = torch.randn(w.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grad(at):
        at = at.detach().requires_grad_(True)
        return torch.autograd.grad(f(at), at)[0]

    eps = 1e-5
    fd = (grad(w + eps * v) - grad(w - eps * v)) / (2 * eps)
    assert_close(truth @ v, fd, rtol=1e-7, what="double backward vs differences")
    H = HessianOperator(problem)
    assert_close(H.dense(), truth, what="train-mode Hessian")
    # batch statistics matter: the eval-mode Hessian is another matrix
    eval_truth = dense_hessian(model, loss, data, reduction)
    assert float((eval_truth - truth).abs().max()) > 1e-3 * float(truth.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    model, loss, data, reduction = build(CASES[0], dtype)
    H = HessianOperator(Problem(model, loss, data, reduction=reduction))
    out = H @ torch.ones(H.shape[0], dtype=dtype)
    assert out.dtype == dtype


def test_dense_operator_blocks():
    m = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))
    D = DenseOperator(m, blocks={"a": slice(0, 2)})
    assert_close(D.block("a").dense(), m[:2, :2])
    with pytest.raises(Exception, match="block 'b' does not exist"):
        D.block("b")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.cuda
def test_cuda_products_match_cpu():
    model, loss, data, reduction = build(CASES[0])
    cpu = HessianOperator(Problem(model, loss, data, reduction=reduction))
    v = torch.randn(cpu.shape[0], dtype=torch.float64)
    expected = cpu @ v
    model = model.cuda()
    gpu = HessianOperator(Problem(model, loss, data, reduction=reduction))
    assert_close((gpu @ v.cuda()).cpu(), expected, rtol=1e-10)


def test_once_differentiable_function_falls_back_instead_of_a_wrong_product():
    # torch does not raise in the second backward here: the product silently lacked the
    # terms through the function (43% off) until the first graph was searched for them
    from curvscope import UnsupportedModelError

    from .once_net import Net

    torch.manual_seed(0)
    model = Net(once=True).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 2, (10,), generator=g)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    problem = Problem(model, "cross_entropy", data)
    truth = dense_hessian(model.twin(), "cross_entropy", data, "mean")
    H = HessianOperator(problem)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=g)
    got = H @ v
    assert H.info["hvp"] == "finite-difference" and "once_differentiable" in H.info[
        "fallback_reason"
    ]
    assert any("fell back to finite differences" in n for n in H.notes)
    assert graph_account(problem).held == 0 and "kept_graphs" not in H.info
    err = float(torch.linalg.vector_norm(got - truth @ v) / torch.linalg.vector_norm(truth @ v))
    assert err < 1e-6
    assert "OnceTanh" in H.info["fallback_reason"]
    from curvscope.app import estimate_memory

    # the memory plan measures a graph that cannot be kept: nothing planned, no traceback
    assert "kept graphs" not in estimate_memory(problem, matrices=["hessian"]).parts
    for mode in ("double-backward", "forward-over-reverse"):
        with pytest.raises(UnsupportedModelError, match=f"hvp {mode}: an operation"):
            HessianOperator(Problem(model, "cross_entropy", data), mode=mode) @ v
    # the GGN's J v by two reverse passes would lack the same terms: refused, naming it
    from curvscope.operators import EmpiricalFisherOperator, GGNOperator

    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=g)
    with pytest.raises(UnsupportedModelError, match="Function OnceTanh is differentiable"):
        GGNOperator(Problem(model, "cross_entropy", data)) @ V
    # per-sample gradients need no second derivative: one sample at a time, exact
    ef = EmpiricalFisherOperator(Problem(model, "cross_entropy", data))
    want = EmpiricalFisherOperator(Problem(model.twin(), "cross_entropy", data)) @ V
    assert_close(ef @ V, want, what="empirical Fisher by a per-sample loop")
    assert any("one sample at a time" in n for n in ef.notes)
