import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvscope import DeterminismError, NonFiniteError, OptionError, Problem
from curvscope.operators import HessianOperator

from .cases import CASES, build, concat
from .truth import assert_close, dense_hessian, full_loss_fn


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_loss_and_gradient_match_full_data_definition(case):
    model, loss, data, reduction = build(case)
    problem = Problem(model, loss, data, reduction=reduction, weight_decay=0.1)
    model.eval()
    f, w = full_loss_fn(model, loss, data, reduction, problem.names, weight_decay=0.1)
    value, grad = problem.loss_and_grad()
    assert_close(value, f(w), what="loss")
    assert_close(grad, torch.func.grad(f)(w), what="gradient")
    assert_close(problem.loss(), f(w), what="loss()")
    assert problem.num_samples == 7


def test_batch_weights_mean_and_sum():
    model, loss, data, _ = build(CASES[0])
    mean = Problem(model, loss, data, reduction="mean")
    total = Problem(model, loss, data, reduction="sum")
    assert [b.weight for b in mean.batches()] == [3 / 7, 4 / 7]
    assert [b.weight for b in total.batches()] == [1.0, 1.0]
    assert_close(total.loss(), 7 * mean.loss())


def test_params_glob_selection_and_blocks():
    model, loss, data, reduction = build(CASES[0])
    problem = Problem(model, loss, data, reduction=reduction, params="2.*")
    assert problem.names == ["2.weight", "2.bias"]
    assert problem.num_params == 5 * 3 + 3
    truth = dense_hessian(model, loss, data, reduction, names=problem.names)
    assert_close(HessianOperator(problem).dense(), truth)
    assert problem.module_blocks() == {"2": ["2.weight", "2.bias"]}
    with pytest.raises(OptionError, match=r"matches no parameter; the model has 0.weight"):
        Problem(model, loss, data, params="fc9.*")
    with pytest.raises(OptionError, match="block 'nope' does not exist; valid blocks: all, 2"):
        problem.block_param_names("nope")


def test_shuffling_loader_is_caught():
    model, loss, data, reduction = build(CASES[0])
    x, y = concat(data)
    # Shuffling alone changes nothing (batch weights make the pass order-free); dropping a
    # different remainder each pass does.
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True, drop_last=True)
    with pytest.raises(DeterminismError, match="drop_last with shuffling"):
        Problem(model, loss, loader, check_deterministic=True)


def test_plain_shuffling_passes_with_a_note():
    model, loss, data, reduction = build(CASES[0])
    x, y = concat(data)
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True)
    problem = Problem(model, loss, loader, reduction=reduction, check_deterministic=True)
    assert any("reorders its batches" in n for n in problem.notes)


def test_random_augmentation_is_named():
    model, loss, data, reduction = build(CASES[0])

    class Noisy:
        def __iter__(self):
            for x, y in data:
                yield x + 0.1 * torch.randn_like(x), y

    with pytest.raises(DeterminismError, match="inputs of batch 0 changed"):
        Problem(model, loss, Noisy(), reduction=reduction, check_deterministic=True)


def test_drop_last_style_change_is_caught():
    model, loss, data, _ = build(CASES[0])

    class Flaky:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter(data if self.calls % 2 else data[:1])

    with pytest.raises(DeterminismError, match="drop_last"):
        Problem(model, loss, Flaky(), check_deterministic=True)


def test_dropout_is_off_and_fixed_batches_pass_the_check():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    _, loss, data, reduction = build(CASES[0])
    model.train()
    Problem(model, loss, data, reduction=reduction, check_deterministic=True)
    assert model.training


def test_non_finite_weights_and_data_are_named():
    model, loss, data, reduction = build(CASES[0])
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match="parameter 2.bias holds NaN"):
        Problem(model, loss, data).check_finite()
    model, loss, data, _ = build(CASES[0])
    data[0][0][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="inputs of data.npz hold NaN or Inf values"):
        Problem(model, loss, data).check_finite(source="data.npz")


def test_subsample_is_seeded():
    model, loss, data, reduction = build(CASES[0])
    problem = Problem(model, loss, data, reduction=reduction)
    a = problem.subsample(5, torch.Generator().manual_seed(3))
    b = problem.subsample(5, torch.Generator().manual_seed(3))
    assert a.num_samples == 5
    assert float(a.loss()) == float(b.loss())
    with pytest.raises(OptionError, match="between 1 and the 7 samples"):
        problem.subsample(8, torch.Generator())


def test_torchscript_model_falls_back_to_double_backward():
    model, loss, data, reduction = build(CASES[0])
    truth = dense_hessian(model, loss, data, reduction)
    scripted = torch.jit.script(model)
    problem = Problem(scripted, loss, data, reduction=reduction)
    H = HessianOperator(problem)
    assert any("TorchScript" in n for n in H.notes)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert_close(H @ v, truth @ v)
    assert_close(H @ torch.stack([v, 2 * v], 1), truth @ torch.stack([v, 2 * v], 1))
    f, w = full_loss_fn(model, loss, data, reduction, problem.names)
    value, grad = problem.loss_and_grad()
    assert_close(grad, torch.func.grad(f)(w))
    # evaluating elsewhere restores the module's own weights
    before = [p.clone() for p in scripted.parameters()]
    problem.loss(problem.param_vector() + 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, scripted.parameters(), strict=True))


def test_compile_first_order_passes_agree_and_products_stay_eager():
    """``compile``: losses and gradients through torch.compile agree with eager to round-off;
    Hessian products (double backward, which compiled graphs refuse) are bitwise unchanged."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    data = [(x[:16], y[:16]), (x[16:], y[16:])]
    eager = Problem(model, "cross_entropy", data)
    comp = Problem(model, "cross_entropy", data, compile=True)
    le, ge = eager.loss_and_grad()
    lc, gc = comp.loss_and_grad()
    assert abs(float(lc - le)) < 1e-6 and float((gc - ge).norm() / ge.norm()) < 1e-5
    assert abs(float(comp.loss() - eager.loss())) < 1e-6
    v = torch.randn(eager.num_params, 2)
    assert torch.equal(HessianOperator(eager) @ v, HessianOperator(comp) @ v)
    assert comp.to(torch.float64)._compiled is None  # compiled for the float32 model
