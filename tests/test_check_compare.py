"""check (gradient, Taylor, convexity) and compare, against independent dense float64 truth."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from curvscope import Problem
from curvscope._errors import OptionError
from curvscope.cli import app
from curvscope.diagnostics import (
    check,
    compare,
    convexity_certificate,
    gradient_test,
    taylor_test,
)
from curvscope.diagnostics._derivatives import (
    GRADIENT_SLOPE,
    HIGHER_ORDER,
    STEPS,
    TAYLOR_SLOPES,
    _fit,
    _verdict,
    combine,
)
from curvscope.io import build_arch, save_checkpoint
from curvscope.operators import build_operators, make_operator

from .cases import CASES, build, concat, operators
from .truth import assert_close, dense_hessian

EPS64 = torch.finfo(torch.float64).eps


class WrongTanh(torch.autograd.Function):
    """tanh whose backward is off by 10%: its gradient does not match its values."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return 1.1 * g * (1 - y * y)


class WrongAct(nn.Module):
    def forward(self, x):
        return WrongTanh.apply(x)


def _smooth(dtype=torch.float64, act=nn.Tanh):
    model, loss, data, reduction = build(CASES[0], dtype)
    if act is not nn.Tanh:
        model[1] = act()
    return Problem(model, loss, data, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid])
def test_smooth_models_pass_both_derivative_tests(dtype, act):
    problem = _smooth(dtype, act)
    g = gradient_test(problem, directions=2, seed=torch.Generator().manual_seed(0))
    t = taylor_test(problem, directions=2, seed=torch.Generator().manual_seed(0))
    assert combine(g)[0] is True, [r.reason for r in g]
    assert combine(t)[0] is True, [r.reason for r in t]
    for r in t:
        assert abs(r.slopes["e1"] - 2) < 0.3 and abs(r.slopes["e2"] - 3) < 0.3
        assert r.float32_floor["e2_min"] > 0


def test_wrong_backward_fails_both_tests():
    model, loss, data, reduction = build(CASES[0])
    model[1] = WrongAct()
    problem = Problem(model, loss, data, reduction=reduction)
    g = gradient_test(problem, directions=2, seed=torch.Generator().manual_seed(0))
    t = taylor_test(problem, directions=2, seed=torch.Generator().manual_seed(0))
    assert combine(g)[0] is False
    assert combine(t)[0] is False
    assert "do not match" in g[0].reason


class FlatTanh(torch.autograd.Function):
    """tanh with the right gradient whose backward is not differentiated: a wrong Hessian."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y.detach() ** 2)


class Apply(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


def _taylor_verdict(e1, e2, loss=1.0):
    """The Taylor verdict of one synthetic direction (float64 round-off floor of ``loss``)."""
    steps = np.array(STEPS)
    floor = np.full_like(steps, EPS64 * loss)
    e1, e2 = np.maximum(e1, floor), np.maximum(e2, floor)  # round-off: never below it
    fits = {
        "e1": _fit(steps, e1, floor, TAYLOR_SLOPES[0]),
        "e2": _fit(steps, e2, floor, TAYLOR_SLOPES[1]),
    }
    none = np.zeros(len(steps), dtype=bool)
    return _verdict(fits, {"e1": 2.0, "e2": 3.0}, ["e1", "e2"], steps, none, none, False)


def test_a_slope_above_the_order_passes_as_a_higher_order_remainder():
    # issue 22: the third derivative along d is small, so e2 ~ h^3 + 30 h^4 falls as about
    # h^4 at the larger steps and the fitted slope is well above 3
    h = np.array(STEPS)
    passed, reason = _taylor_verdict(1e-2 * h**2, 1e-6 * h**3 + 3e-5 * h**4)
    assert passed is True, reason
    assert reason.startswith(HIGHER_ORDER) and "above the order 3" in reason
    slope = float(reason.split("e2 slope ")[1].split()[0])
    assert slope > 3.3  # the numbers are in the reason


def test_a_slope_pulled_down_by_larger_steps_passes_when_the_smallest_show_the_order():
    # e2 crosses zero near h = 0.34 and round-off ends the window at h = 1e-3, as along the
    # demo model's seed-1 direction: the fit over h from 1e-3 to 0.3 is 2.66 (it was called
    # failed), the smallest steps clear of round-off fall as h^3
    h = np.array(STEPS)
    e2 = np.abs(1e-4 * h**3 - 2.9e-4 * h**4)
    passed, reason = _taylor_verdict(1e-2 * h**2, e2, loss=10.0)
    assert passed is True, reason
    assert "e2 slope 2.66 over h from 1e-03 to 3e-01" in reason
    assert "not yet asymptotic" in reason


@pytest.mark.parametrize(
    "e1, e2, order",
    [
        (lambda h: 1e-3 * h + 1e-2 * h**2, lambda h: 1e-3 * h + 1e-3 * h**3, "e1 slope 1.0"),
        (lambda h: 1e-2 * h**2, lambda h: 1e-5 * h**2 + 1e-3 * h**3 + 1e-2 * h**4, "e2 slope 2."),
    ],
    ids=["wrong gradient", "wrong Hessian under a large higher-order remainder"],
)
def test_a_lower_order_at_the_smallest_steps_fails(e1, e2, order):
    h = np.array(STEPS)
    passed, reason = _taylor_verdict(e1(h), e2(h))
    assert passed is False and reason.startswith("failed") and order in reason, reason
    assert "do not match the loss" in reason


def test_a_lower_slope_only_near_round_off_is_not_a_failure():
    # e1 ~ h^2 with round-off noise 30 x eps |L| (a loss summed over many samples): the last
    # points above the floor bend down, which is no lower order
    h = np.array(STEPS)
    noise = 30 * EPS64 * np.where(np.arange(len(h)) % 2, 1.0, 0.4)
    passed, reason = _taylor_verdict(1e-4 * h**2 + noise, 1e-6 * h**3 + noise)
    assert passed is not False, reason


@pytest.fixture(scope="module")
def demo_problem(tmp_path_factory):
    """The shipped demo model (``curvscope example digits-mlp``) on its data."""
    import curvscope as cs
    from curvscope._examples import make_example

    out = tmp_path_factory.mktemp("demo")
    make_example("digits-mlp", out)
    return cs.load(str(out / "model.pt"))


def test_demo_model_passes_both_tests(demo_problem):
    # seed 1 drew a direction whose e2 dips at h = 0.3: it was called failed (slope 2.66)
    for seed in (0, 1):
        t = taylor_test(demo_problem, directions=4, seed=seed)
        g = gradient_test(demo_problem, directions=2, seed=seed)
        assert combine(t)[0] is True, [r.reason for r in t]
        assert combine(g)[0] is True, [r.reason for r in g]


@pytest.mark.parametrize("wrong", ["gradient 1.1x", "Hessian"])
def test_demo_model_with_a_wrong_backward_fails(demo_problem, wrong):
    import copy

    model = copy.deepcopy(demo_problem.model)
    assert isinstance(model[1], nn.Tanh)
    model[1] = Apply(WrongTanh if wrong == "gradient 1.1x" else FlatTanh)
    problem = Problem(model, "cross_entropy", demo_problem.data)
    t = taylor_test(problem, directions=2, seed=0)
    g = gradient_test(problem, directions=2, seed=0)
    assert combine(t)[0] is False and all(r.passed is False for r in t), [r.reason for r in t]
    if wrong == "Hessian":  # the gradient is right: the gradient test passes
        assert combine(g)[0] is True, [r.reason for r in g]
        assert all("e2 slope 2.0" in r.reason for r in t), [r.reason for r in t]
    else:
        assert combine(g)[0] is False, [r.reason for r in g]
        assert all("e1 slope 1.0" in r.reason for r in t), [r.reason for r in t]


def test_quadratic_model_is_inconclusive_at_the_round_off_floor():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(9, 3, dtype=torch.float64)
    y = torch.randn(9, 2, dtype=torch.float64)
    problem = Problem(model, "mse", [(x, y)])
    g = gradient_test(problem, directions=1)
    assert g[0].passed is None and "round-off floor" in g[0].reason
    t = taylor_test(problem, directions=1)
    assert t[0].slopes["e2"] is None and abs(t[0].slopes["e1"] - 2) < 0.3


# ---------------------------------------------------------------- verdicts that cannot mislead
class FunctionalCNN(nn.Module):
    """ReLU and max pooling as functions: no ReLU or MaxPool module to be found by type."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))


def _module_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3)
    )


def _cnn_problem(model):
    torch.manual_seed(0)
    x, y = torch.randn(300, 1, 8, 8), torch.randint(0, 3, (300,))
    torch.manual_seed(1)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return Problem(model, "cross_entropy", [(x[:150], y[:150]), (x[150:], y[150:])])


def test_a_jump_in_the_error_curve_gets_no_slope():
    # issue 14: flat at 7e-7 for h from 3e-3 to 3e-5, then 3e-13; a slope 1.86 was fitted
    steps = np.array(STEPS)
    errors = np.where(steps >= 3e-5, 7e-7, 3e-13)
    errors = np.where(steps > 3e-3, 7e-7 * (steps / 3e-3) ** 2, errors)
    floor = EPS64 * 0.5 / steps
    fit = _fit(steps, errors, floor, GRADIENT_SLOPE)
    assert fit.slope is None and fit.jump is not None
    assert steps[fit.jump[0]] == pytest.approx(10**-4.5)
    # a smooth curve down to the floor is fitted, and so is a zero crossing that recovers
    smooth = np.maximum(1e-3 * steps**2, floor)
    assert _fit(steps, smooth, floor, GRADIENT_SLOPE).slope == pytest.approx(2, abs=0.05)
    dip = np.abs(1e-3 * steps**2 - 1e-2 * steps**4) + floor
    dipfit = _fit(steps, dip, floor, GRADIENT_SLOPE)
    assert dipfit.jump is None and dipfit.slope == pytest.approx(2, abs=0.1)


@pytest.mark.parametrize("make", [_module_cnn, FunctionalCNN], ids=["modules", "functional"])
def test_cnn_kinks_are_found_from_the_computation(make):
    problem = _cnn_problem(make())
    result = check(problem, directions=2, eigen_directions=1, seed=0)
    grad, taylor = result.checks[0], result.checks[1]
    assert [d["direction"] for d in grad["directions"]] == [
        "random 1",
        "random 2",
        "eigenvector 1",
    ]
    for entry in (grad, taylor):
        assert entry["passed"] is not False, entry["reason"]
        for d in entry["directions"]:
            assert d["passed"] is not False, d["reason"]
            # large steps flip ReLU signs and max-pool winners, the smallest ones do not
            assert d["kink_changes"][0] > 0 and d["kink_changes"][-1] == 0
    for d in grad["directions"] + taylor["directions"]:  # every direction alike
        assert "ReLU signs or max-pool winners" in d["reason"], d["reason"]
        if d["passed"]:  # fitted on the steps that crossed no kink
            assert "steps that crossed kinks left out" in d["reason"]
    # the random directions' central differences cross kinks down to the round-off floor
    assert all(d["passed"] is None for d in grad["directions"][:2])


def test_torchscript_cnn_jump_is_inconclusive():
    # TorchScript hides relu and max_pool2d from the recorder: the jump itself must tell
    problem = _cnn_problem(torch.jit.script(_module_cnn()))
    for r in gradient_test(problem, directions=2, seed=0):
        assert r.passed is None and "a jump" in r.reason and r.kink_changes is None


class Float32Inside(nn.Module):
    """Builds float32 state inside its forward: a float64 copy cannot run."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(4, 8)
        self.lin2 = nn.Linear(8, 3)

    def forward(self, x):
        mix = torch.eye(4) * 0.5
        return self.lin2(torch.tanh(self.lin1(x @ mix)))


def test_model_that_cannot_run_in_float64_is_checked_in_float32():
    torch.manual_seed(0)
    model = torch.jit.script(Float32Inside())
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    result = check(Problem(model, "cross_entropy", [(x, y)]), directions=1, eigen_directions=1)
    for entry in result.checks[:2]:
        assert entry["evaluated_in"] == "float32"
        assert "cannot run in float64" in entry["notes"][0]
        assert "same dtype" in entry["notes"][0]
        assert entry["passed"] is True, entry["reason"]


def _fractions(model, x, y, layer_acts):
    """Independent certificate fractions for a 1-hidden-layer MLP via autograd."""
    z = x @ model[0].weight.T + model[0].bias
    z = z.detach().requires_grad_(True)
    h = layer_acts(z)
    out = h @ model[2].weight.T + model[2].bias
    loss = torch.nn.functional.cross_entropy(out, y, reduction="sum")
    dx, dz = torch.autograd.grad(loss, [h, z])
    s2 = torch.func.vmap(torch.func.grad(torch.func.grad(lambda u: layer_acts(u))))(
        z.detach().reshape(-1)
    ).reshape(z.shape)
    ok = (s2 * dx >= 0).double().mean()
    printed = (torch.sign(z) == torch.sign(dz)).double().mean()
    return float(ok), float(printed)


def _constructed(sign):
    """Sigmoid MLP with Z > 0 everywhere and dL/dX of one sign (FINDINGS.md 1b).

    All labels are class 0 and only output row 0 is non-zero: dL/dZ_j has the sign of
    -W2[0, j] (p0 - 1) = sign * positive; with sign = +1 the printed eq. 32 holds everywhere
    and the corrected condition fails; with sign = -1 the corrected condition holds.
    """
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[0].weight.uniform_(0.1, 1.0)
        model[0].bias.fill_(0.5)
        model[2].weight.zero_()
        model[2].weight[0].fill_(-2.0 * sign)
        model[2].bias.zero_()
    x = torch.rand(5, 4, dtype=torch.float64)
    y = torch.zeros(5, dtype=torch.long)
    return model, x, y


def test_printed_condition_can_hold_on_an_indefinite_block():
    model, x, y = _constructed(+1)
    problem = Problem(model, "cross_entropy", [(x[:2], y[:2]), (x[2:], y[2:])])
    cert = convexity_certificate(problem, eigen_tol=1e-10)
    (layer,) = cert.layers
    ok, printed = _fractions(model, x, y, torch.sigmoid)
    assert layer.fraction_satisfied == pytest.approx(ok) and ok == 0.0
    assert layer.fraction_satisfied_as_printed == pytest.approx(printed) and printed == 1.0
    assert not layer.certified
    block = dense_hessian(model, "cross_entropy", [(x, y)], "mean", names=["0.weight", "0.bias"])
    true_min = float(torch.linalg.eigvalsh(block)[0])
    assert true_min < 0
    assert layer.min_eigenvalue == pytest.approx(true_min, abs=1e-8 * float(block.abs().max()))


def test_corrected_condition_certifies_a_psd_block():
    model, x, y = _constructed(-1)
    problem = Problem(model, "cross_entropy", [(x, y)])
    cert = convexity_certificate(problem, eigen_tol=1e-10)
    (layer,) = cert.layers
    assert layer.fraction_satisfied == 1.0 and layer.certified
    assert layer.fraction_satisfied_as_printed == 0.0
    block = dense_hessian(model, "cross_entropy", [(x, y)], "mean", names=["0.weight", "0.bias"])
    norm = float(torch.linalg.matrix_norm(block, ord=2))
    assert layer.min_eigenvalue >= -100 * EPS64 * norm - layer.min_eigenvalue_residual
    assert float(torch.linalg.eigvalsh(block)[0]) >= -100 * EPS64 * norm


def test_certificate_on_a_real_mlp_matches_independent_fractions():
    model, loss, data, reduction = build(CASES[5])  # sigmoid MLP, DataLoader
    x, y = concat(data)
    problem = Problem(model, loss, data, reduction=reduction)
    cert = convexity_certificate(problem)
    ok, printed = _fractions(model, x, y, torch.sigmoid)
    (layer,) = cert.layers
    assert layer.fraction_satisfied == pytest.approx(ok)
    assert layer.fraction_satisfied_as_printed == pytest.approx(printed)
    assert layer.certified == (ok == 1.0)


def test_cnn_names_the_unsupported_layer_and_checks_still_run():
    model, loss, data, reduction = build(CASES[4])
    problem = Problem(model, loss, data, reduction=reduction)
    result = check(problem, directions=1, eigen_directions=0)
    names = [c["name"] for c in result.checks]
    assert names == ["gradient", "taylor", "convexity"]
    conv = result.checks[2]
    assert conv["passed"] is None and conv["layers"] == []
    assert "layer '0' (Conv2d) stops it" in conv["reason"]


def test_compare_figures_against_dense_truth():
    model, loss, data, reduction = build(CASES[0])
    problem = Problem(model, loss, data, reduction=reduction)
    result = compare(
        operators(problem)["hessian"],
        operators(problem, "ggn", "kfac", "pch-abs"),
        top_k=3,
        tol=1e-10,
    )
    H = dense_hessian(model, loss, data, reduction)
    slices = problem.param_slices()
    for row in result.comparisons:
        names = problem.module_blocks()[row.block]
        lo, hi = slices[names[0]].start, slices[names[-1]].stop
        hb = H[lo:hi, lo:hi]
        ab = make_operator(row.matrix, problem).dense()[lo:hi, lo:hi]
        if row.matrix != "ggn":  # block-diagonal approximations: their own block() is the truth
            ab = make_operator(row.matrix, problem).block(row.block).dense()
        rel = float(torch.linalg.matrix_norm(ab - hb) / torch.linalg.matrix_norm(hb))
        assert row.method == "exact"
        assert row.rel_frobenius == pytest.approx(rel, rel=1e-9, abs=1e-12)
        evh, vh = torch.linalg.eigh(hb)
        eva, va = torch.linalg.eigh(ab)
        assert_close(
            torch.tensor(row.hessian_top_eigenvalues, dtype=torch.float64),
            evh.flip(0)[:3],
            rtol=1e-8,
        )
        assert_close(
            torch.tensor(row.top_eigenvalues, dtype=torch.float64), eva.flip(0)[:3], rtol=1e-8
        )
        assert row.min_eigenvalue == pytest.approx(float(eva[0]), abs=1e-8 * float(eva.abs().max()))
        cos = torch.linalg.svdvals(va[:, -3:].T @ vh[:, -3:])
        assert_close(
            torch.tensor(sorted(row.subspace_overlap), dtype=torch.float64),
            cos.sort().values,
            rtol=1e-6,
        )
        b = slices[names[-1]]
        hbias = H[b, b]
        lam, v = torch.linalg.eigh(hbias)
        absh = (v * lam.abs()) @ v.T
        abias = make_operator(row.matrix, problem).block(names[-1]).dense()
        assert row.chen_metric == pytest.approx(
            float(torch.linalg.matrix_norm(abias - absh)), rel=1e-9, abs=1e-12
        )


def test_compare_hutchinson_estimate_is_within_its_error():
    model, loss, data, reduction = build(CASES[0])
    problem = Problem(model, loss, data, reduction=reduction)
    result = compare(
        operators(problem)["hessian"],
        operators(problem, "ggn"),
        blocks=["0"],
        exact_max_dim=1,
        hutchinson_probes=400,
        top_k=2,
    )
    (row,) = result.comparisons
    H = dense_hessian(model, loss, data, reduction)
    s = slice(0, 25)
    G = make_operator("ggn", problem).dense()
    rel = float(torch.linalg.matrix_norm(G[s, s] - H[s, s]) / torch.linalg.matrix_norm(H[s, s]))
    assert row.method == "hutchinson" and row.rel_frobenius_stderr > 0
    assert abs(row.rel_frobenius - rel) <= 4 * row.rel_frobenius_stderr


def test_compare_skips_unsupported_matrices_and_goes_on():
    model, loss, data, reduction = build(CASES[4])
    problem = Problem(model, loss, data, reduction=reduction)
    candidates, skipped = build_operators(problem, ["pch-abs", "ggn"], skip_unsupported=True)
    assert skipped[0]["matrix"] == "pch-abs" and "Conv2d" in skipped[0]["reason"]
    result = compare(
        operators(problem)["hessian"], candidates, skipped=skipped, blocks=["5"], top_k=2
    )
    assert [r.matrix for r in result.comparisons] == ["ggn"]
    assert result.skipped[0]["matrix"] == "pch-abs"
    with pytest.raises(OptionError, match="no matrix to compare"):
        compare(operators(problem)["hessian"], {}, skipped=skipped)


def test_check_and_compare_commands(tmp_path):
    arch = {"type": "mlp", "sizes": [4, 5, 3], "activation": "tanh", "bias": True}
    torch.manual_seed(0)
    model = build_arch(arch)
    x = torch.randn(11, 4)
    y = torch.randint(0, 3, (11,))
    torch.save((x, y), tmp_path / "data.pt")
    save_checkpoint(tmp_path / "m.pt", model, arch, {"data": "data.pt", "loss": "cross_entropy"})
    runner = CliRunner()
    r = runner.invoke(app, ["check", str(tmp_path / "m.pt"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "o" / "check.json").read_text())
    checks = {c["name"]: c for c in doc["results"]["checks"]}
    assert checks["gradient"]["passed"] is True and checks["taylor"]["passed"] is True
    assert checks["convexity"]["passed"] is None and checks["convexity"]["layers"][0]["name"] == "0"
    r = runner.invoke(
        app,
        [
            "compare",
            str(tmp_path / "m.pt"),
            "--matrix",
            "ggn,pch-clip",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert doc["counts"]["data_passes"] > 0  # issue 14: "0 data passes" for 2237 products
    rows = doc["results"]["comparisons"]
    assert {(row["block"], row["matrix"]) for row in rows} == {
        ("0", "ggn"),
        ("0", "pch-clip"),
        ("2", "ggn"),
        ("2", "pch-clip"),
    }
    r = runner.invoke(app, ["compare", str(tmp_path / "m.pt"), "--matrix", "hessian"])
    assert r.exit_code == 1 and "cannot be compared" in r.output
