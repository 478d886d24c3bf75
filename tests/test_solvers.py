"""Solvers against known minimisers, hand-computed steps and hand-built traces (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvscope import Problem
from curvscope._errors import OptionError, UnsupportedModelError
from curvscope.operators import DenseOperator, make_operator
from curvscope.solvers import (
    RULES,
    QuadraticObjective,
    attribute,
    compare_runs,
    lm_damping_update,
    martens_pcg,
    martens_should_stop,
    run_solver,
)
from curvscope.solvers._mk import mk_closed_form_direction
from curvscope.solvers._objective import ProblemObjective

from .truth import assert_close, dense_hessian, full_loss_fn

F64 = torch.float64
GRAD_TOL = 1e-8


# ----------------------------------------------------------------------------- fixtures
def _quadratic(kappa=10.0, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.logspace(0, math.log10(kappa), n, dtype=F64)) @ Q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(n, generator=g, dtype=F64)
    return A, b, torch.linalg.solve(A, b)


def _logistic():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=F64)
    y = (x[:, 0] + 0.5 * torch.randn(40, generator=g, dtype=F64) > 0).long()
    torch.manual_seed(2)
    model = nn.Linear(3, 2).double()
    data = [(x[:17], y[:17]), (x[17:], y[17:])]
    return model, data


def _logistic_minimiser(model, data, wd):
    """Plain Newton on the dense float64 Hessian of the definition (tests/truth.py)."""
    names = [n for n, _ in model.named_parameters()]
    f, w = full_loss_fn(model, "cross_entropy", data, "mean", names, wd)
    w = w.clone()
    for _ in range(30):
        grad = torch.func.grad(f)(w)
        H = torch.func.hessian(f)(w)
        w = w - torch.linalg.solve(H, grad)
    assert float(torch.linalg.vector_norm(torch.func.grad(f)(w))) < 1e-13
    return w


def _mlp(n=12, act=nn.Sigmoid, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 3)).double()
    return model, [(x[:5], y[:5]), (x[5:], y[5:])]


# ----------------------------------------------------------------------------- quadratic
QUAD_SOLVERS = [
    ("gd", {"lr": None}),
    ("gd-armijo", {}),
    ("lbfgs", {}),
    ("nlcg", {}),
    ("nlcg", {"beta": "fr"}),
    ("newton-cg", {}),
    ("hf", {}),
]


@pytest.mark.parametrize(("name", "settings"), QUAD_SOLVERS, ids=lambda v: str(v))
def test_solvers_reach_quadratic_minimiser(name, settings):
    A, b, x_star = _quadratic()
    settings = dict(settings)
    if "lr" in settings:
        ev = torch.linalg.eigvalsh(A)
        settings["lr"] = float(2 / (ev[0] + ev[-1]))  # optimal fixed step
    run = run_solver(QuadraticObjective(A, b), name, max_iter=2000, tol=GRAD_TOL, **settings)
    assert run.stop_reason == "converged", run.findings
    assert run.final_grad_norm <= GRAD_TOL
    assert_close(run.weights, x_star, rtol=1e-7, what=f"{name} minimiser")
    assert run.findings[0].rule == "converged"


def test_newton_cg_and_hf_take_few_iterations_on_quadratic():
    A, b, _ = _quadratic(kappa=100.0)
    nc = run_solver(QuadraticObjective(A, b), "newton-cg", max_iter=50, tol=GRAD_TOL)
    hf = run_solver(QuadraticObjective(A, b), "hf", max_iter=50, tol=GRAD_TOL)
    assert nc.stop_reason == hf.stop_reason == "converged"
    assert len(nc.trace["iteration"]) - 1 <= 6
    assert len(hf.trace["iteration"]) - 1 <= 20
    assert nc.num_matvecs > 0 and hf.num_matvecs > 0


def test_curvature_tracking_matches_dense_eigenvalues():
    A, b, _ = _quadratic(kappa=50.0)
    run = run_solver(QuadraticObjective(A, b), "lbfgs", max_iter=4, curvature_every=2, tol=0)
    ev = torch.linalg.eigvalsh(A)
    tracked = [
        i for i, v in zip(run.trace["iteration"], run.trace["hessian_max"], strict=False) if v
    ]
    assert tracked == [0, 2, 4]
    for hi, lo in zip(run.trace["hessian_max"], run.trace["hessian_min"], strict=False):
        if hi is not None:
            assert abs(hi - float(ev[-1])) <= 1e-8 * float(ev[-1])
            assert abs(lo - float(ev[0])) <= 1e-8 * float(ev[-1])
    assert run.diagnostic_matvecs > 0 and run.num_matvecs == 0
    kappa = [f for f in run.findings if f.rule == "ill_conditioned"]
    assert not kappa  # kappa = 50 is below the threshold


# ----------------------------------------------------------------------------- logistic
@pytest.mark.parametrize(
    ("name", "max_steps"),
    [("gd-armijo", 100), ("lbfgs", 40), ("nlcg", 60), ("newton-cg", 6), ("hf", 20)],
)
def test_solvers_reach_logistic_regression_minimiser(name, max_steps):
    model, data = _logistic()
    wd = 1.0  # well conditioned enough for steepest descent to finish in a few seconds
    w_star = _logistic_minimiser(model, data, wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    problem = Problem(model, "cross_entropy", data, weight_decay=wd)
    run = run_solver(problem, name, max_iter=max_steps, tol=GRAD_TOL)
    assert run.stop_reason == "converged", [f.text for f in run.findings]
    assert run.final_grad_norm <= GRAD_TOL
    assert_close(run.weights, w_star, rtol=1e-7, what=f"{name} minimiser")
    for n, p in model.named_parameters():  # the caller's model is untouched
        assert torch.equal(p.detach(), before[n])


def test_trace_has_every_field_and_counts_work():
    model, data = _logistic()
    problem = Problem(model, "cross_entropy", data, weight_decay=0.1)
    test = Problem(model, "cross_entropy", data[:1], weight_decay=0.0)
    run = run_solver(problem, "newton-cg", max_iter=3, tol=0, test_problem=test)
    n = len(run.trace["iteration"])
    assert n == 4 and all(len(v) == n for v in run.trace.values())
    assert run.trace["cg_iters"][0] is None and run.trace["cg_iters"][1] >= 1
    assert run.trace["matvecs"][-1] == run.num_matvecs
    assert run.trace["test_loss"][-1] == pytest.approx(float(test.loss(run.weights)), rel=1e-12)
    assert 0 <= run.trace["test_accuracy"][-1] <= 1
    assert run.trace["wall_time_s"] == sorted(run.trace["wall_time_s"])


def test_budget_stops_the_run():
    model, data = _logistic()
    problem = Problem(model, "cross_entropy", data, weight_decay=0.1)
    run = run_solver(problem, "newton-cg", max_iter=50, budget_matvecs=6, tol=0)
    assert run.stop_reason == "budget"
    assert run.num_matvecs + run.num_gradients >= 6
    assert any(f.rule == "budget_exhausted" for f in run.findings)


def test_mini_batch_mode_is_seeded():
    model, data = _logistic()
    problem = Problem(model, "cross_entropy", data, weight_decay=0.1)
    runs = [
        run_solver(problem, "gd", max_iter=3, mini_batch=8, seed=torch.Generator().manual_seed(5))
        for _ in range(2)
    ]
    assert runs[0].trace["loss"] == runs[1].trace["loss"]
    assert runs[0].trace["batch_loss"][1] is not None
    assert runs[0].trace["loss"][-1] == pytest.approx(float(problem.loss(runs[0].weights)))
    # curvature solvers build their matrix on the batch, at the current weights
    nc = run_solver(problem, "newton-cg", max_iter=2, mini_batch=8, tol=0)
    assert nc.stop_reason == "max_iter" and nc.num_matvecs > 0
    assert nc.trace["loss"][-1] < nc.trace["loss"][0]


# ----------------------------------------------------------------------------- Newton-CG
def test_newton_cg_falls_back_on_indefinite_matrix():
    A = torch.diag(torch.tensor([1.0, -4.0], dtype=F64))
    b = torch.tensor([1.0, 1.0], dtype=F64)  # first CG direction b: b^T A b = -3 < 0
    run = run_solver(QuadraticObjective(A, b), "newton-cg", max_iter=1, tol=0)
    assert run.trace["fallback"][1] == "negative_curvature"
    assert run.trace["negative_curvature"][1] is True
    assert run.trace["cg_stop_reason"][1] == "negative_curvature"
    w1 = run.weights  # a step along -g = b
    assert_close(w1 / w1[0], torch.ones(2, dtype=F64), what="fall-back direction")
    finding = [f for f in run.findings if f.rule == "fallbacks"][0]
    assert "1 of 1 iterations" in finding.text


# ----------------------------------------------------------------------------- HF pieces
def test_martens_stopping_rule_hand_values():
    # i = 5, j = max(3, ceil(0.5)) = 3: s = (psi5 - psi2) / psi5
    slow = [0.0, -1.0, -1.9999, -2.0, -2.0001, -2.0002]  # s = 1.5e-4 <= 3 * 5e-4
    fast = [0.0, -1.0, -1.5, -1.8, -1.9, -1.9005]  # s = 0.2107 > 1.5e-3
    assert martens_should_stop(slow)
    assert not martens_should_stop(fast)
    assert not martens_should_stop(slow[:4])  # i = 3 <= j
    assert not martens_should_stop([0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # psi_i >= 0
    # j grows as ceil(0.1 i): i = 40 -> j = 4, compares psi_40 with psi_36
    psi = [-float(k) for k in range(37)] + [-36.0, -36.0, -36.0, -36.01]
    s = (psi[40] - psi[36]) / psi[40]
    assert martens_should_stop(psi) == (s <= 5e-4 * 4)


def test_martens_pcg_tracks_the_quadratic_model():
    A, b, x_star = _quadratic(kappa=1e3, n=30)
    res = martens_pcg(lambda v: A @ v, b, max_iter=200)
    x = res["x"]
    assert res["psi"][-1] == pytest.approx(float(0.5 * x @ A @ x - b @ x), rel=1e-10)
    assert res["stop_reason"] in ("martens", "converged")
    assert res["iters"] >= 3
    psi_star = float(-0.5 * b @ x_star)
    # stopped once relative progress over the window fell below eps * j
    assert (res["psi"][-1] - psi_star) / abs(psi_star) < 0.05


def test_damping_update_hand_values():
    assert lm_damping_update(2.0, 0.1) == pytest.approx(3.0)  # rho < 1/4: times r = 1.5
    assert lm_damping_update(2.0, 0.9) == pytest.approx(2.0 / 1.5)  # rho > 3/4
    assert lm_damping_update(2.0, 0.5) == 2.0
    assert lm_damping_update(2.0, float("nan")) == pytest.approx(3.0)
    assert lm_damping_update(2.0, 0.1, ratio=1.01) == pytest.approx(2.02)


def test_hf_reduction_ratio_is_one_on_a_quadratic():
    # the undamped model g^T p + p^T A p / 2 is the quadratic's change exactly, whatever step
    # CG and its backtracking chose: rho = 1, so the damping falls by r = 1.5 every step
    A, b, _ = _quadratic(kappa=100.0)
    run = run_solver(QuadraticObjective(A, b), "hf", max_iter=4, tol=0, damping=3.0)
    rhos = run.trace["rho"][1:]
    assert len(rhos) == 4
    assert rhos == pytest.approx([1.0] * 4, abs=1e-9)
    assert run.trace["damping"][1:] == pytest.approx([3.0 / 1.5**k for k in range(4)])


class _ScaledCurvature(QuadraticObjective):
    """f(w) = beta/2 |w|^2 - b^T w, whose curvature is given as a I instead of beta I."""

    def __init__(self, beta: float, a: float, b: torch.Tensor):
        super().__init__(beta * torch.eye(len(b), dtype=b.dtype), b)
        self.a = a

    def curvature(self, name, w, **knobs):
        return DenseOperator(self.a * torch.eye(len(w), dtype=w.dtype))


def test_hf_reduction_ratio_in_closed_form_when_the_model_is_off():
    # CG on (a + lam) I solves in one step: p = -g / (a + lam). The actual change is
    # -|g|^2 / (a + lam) + beta |g|^2 / (2 (a + lam)^2), the model's the same with a for
    # beta, so rho = (a + lam - beta / 2) / (a / 2 + lam) at every step, whatever g is.
    a, beta = 2.0, 5.5
    b = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    run = run_solver(_ScaledCurvature(beta, a, b), "hf", max_iter=3, tol=0, damping=1.0)

    def rho(lam):
        return (a + lam - beta / 2) / (a / 2 + lam)

    # lam = 1: rho = 0.125 < 1/4 raises lam to 1.5; rho = 0.3 then keeps it
    assert rho(1.0) == pytest.approx(0.125) and rho(1.5) == pytest.approx(0.3)
    assert run.trace["damping"][1:] == pytest.approx([1.0, 1.5, 1.5])
    assert run.trace["rho"][1:] == pytest.approx([rho(1.0), rho(1.5), rho(1.5)], rel=1e-10)
    # and the iterates: w <- w - g / (a + lam) with g = beta w - b, from w = 0
    w = torch.zeros(3, dtype=F64)
    for lam in (1.0, 1.5, 1.5):
        w = w - (beta * w - b) / (a + lam)
    assert_close(run.weights, w, rtol=1e-12, what="HF iterates")


# ----------------------------------------------------------------------------- EA-CG / MK
@pytest.mark.parametrize("name", ["eacg", "eacg-clip", "mk"])
def test_eacg_and_mk_decrease_mlp_loss(name):
    model, data = _mlp()
    problem = Problem(model, "cross_entropy", data)
    # MK's constant step (value not given in the paper) can overshoot; its direction is a
    # positive rescaling of the gradient, so Armijo backtracking from it must decrease.
    settings = {"line_search": "armijo"} if name == "mk" else {}
    run = run_solver(problem, name, max_iter=4, tol=0, **settings)
    assert all(b < a for a, b in zip(run.trace["loss"], run.trace["loss"][1:], strict=False))
    assert run.stop_reason == "max_iter"


def test_eacg_step_matches_eq_9_10():
    model, data = _mlp()
    problem = Problem(model, "cross_entropy", data, weight_decay=0.01)
    alpha, lr = 0.05, 0.2
    run = run_solver(
        problem, "eacg", max_iter=1, tol=0, alpha=alpha, lr=lr, max_cg=200, eps_cg=1e-14
    )
    pch = make_operator("pch-abs", problem).dense()
    w0 = problem.param_vector()
    _, g = problem.loss_and_grad()
    d = torch.zeros_like(g)
    for sl in problem.param_slices().values():  # eq. 10a/10b block by block
        M = (1 - alpha) * pch[sl, sl] + alpha * torch.eye(sl.stop - sl.start, dtype=F64)
        d[sl] = torch.linalg.solve(M, -g[sl])
    assert_close(run.weights, w0 + lr * d, rtol=1e-10, what="EA-CG step")


def _single_pattern():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, generator=g, dtype=F64)
    y = torch.randn(1, 2, generator=g, dtype=F64)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).double()
    return model, [(x, y)]


def _pattern_pieces(model, data):
    ((x, y),) = data
    W1, b1, W2, b2 = (p.detach() for p in model.parameters())
    a1 = x[0] @ W1.T + b1
    x1 = torch.sigmoid(a1)
    out = (x1 @ W2.T + b2).requires_grad_(True)
    loss = torch.nn.functional.mse_loss(out, y[0])
    (dl,) = torch.autograd.grad(loss, out)
    problem = Problem(model, "mse", data)
    _, grad = problem.loss_and_grad()
    G = problem.unflatten(grad)
    fp1 = torch.sigmoid(a1) * (1 - torch.sigmoid(a1))
    return problem, grad, G, x[0], x1, -dl.detach(), fp1


def test_mk_step_matches_eq_40_with_layer_regularisation():
    model, data = _single_pattern()
    problem, grad, G, x0, x1, b2, fp1 = _pattern_pieces(model, data)
    g1, g2 = G["0.bias"], G["2.bias"]
    lam0 = float(g1.norm())  # white layer (Fig. 4)
    lam1 = float(g2.norm()) / float(fp1.abs().max())  # eq. 65
    lam2 = float(b2.norm())  # eq. 68 with F' = 1 at the output
    c1 = lam0 * float(x0 @ x0)
    c2 = lam1 * float(x1 @ x1) + lam2 * float(b2 @ b2)
    d = {
        "0.weight": lam0 / float(g1 @ g1) * G["0.weight"],  # eq. 40, mu = 0
        "0.bias": c1 / float(g1 @ g1) * g1,
        "2.weight": lam1 / float(g2 @ g2) * G["2.weight"],
        "2.bias": c2 / float(g2 @ g2) * g2,
    }
    lr = 0.05
    run = run_solver(problem, "mk", max_iter=1, tol=0, damping=0.0, lr=lr)
    assert_close(run.weights, problem.param_vector() - lr * problem.flatten(d), what="MK step")
    assert all(abs(c - 1) < 1e-12 for c in run.trace["layer_cosines"][1])
    finding = [f for f in run.findings if f.rule == "mk_scaled_gradient"][0]
    assert "positive per-tensor rescaling" in finding.text


def test_mk_closed_form_matches_eq_35_and_measures_newton_residual():
    model, data = _single_pattern()
    problem, grad, G, x0, x1, b2, fp1 = _pattern_pieces(model, data)
    lam = 0.3
    g2 = G["2.bias"]
    N2 = lam * torch.outer(g2, x1) / float(g2 @ g2)
    expected = {
        "0.weight": torch.zeros_like(G["0.weight"]),  # N(1) = 0: eq. 35 starts at k = 2
        "0.bias": torch.zeros_like(G["0.bias"]),
        "2.weight": N2,
        "2.bias": b2 - N2 @ x1,  # identity output: grad F^{-1} = I
    }
    obj = ProblemObjective(problem)
    s, _ = mk_closed_form_direction(obj, problem.param_vector(), grad, regularization=lam)
    assert_close(s, problem.flatten(expected), what="eq. 35 direction")
    run = run_solver(problem, "mk-closed-form", max_iter=1, tol=0, regularization=lam)
    H = dense_hessian(model, "mse", data, "mean")
    resid = float(torch.linalg.vector_norm(H @ s - grad) / torch.linalg.vector_norm(grad))
    assert run.trace["newton_residual"][1] == pytest.approx(resid, rel=1e-10)
    assert resid > 0.1  # eq. 35 does not solve the Newton system (FINDINGS.md section 3)


def test_mk_refuses_layers_without_bias():
    model, data = _mlp()
    model[2] = nn.Linear(5, 3, bias=False).double()
    problem = Problem(model, "cross_entropy", data)
    run = run_solver(problem, "mk", max_iter=1)
    assert run.stop_reason == "error"
    assert "bias" in run.message
    with pytest.raises(UnsupportedModelError, match="needs a bias"):
        mk_closed_form_direction(
            ProblemObjective(problem),
            problem.param_vector(),
            problem.loss_and_grad()[1],
            regularization=1.0,
        )


# ----------------------------------------------------------------------------- errors
def test_unknown_solver_and_setting_are_refused():
    A, b, _ = _quadratic()
    with pytest.raises(OptionError, match="is not known"):
        run_solver(QuadraticObjective(A, b), "adam")
    with pytest.raises(OptionError, match="has no setting"):
        run_solver(QuadraticObjective(A, b), "lbfgs", lr=0.1)
    with pytest.raises(OptionError, match="budget"):
        run_solver(QuadraticObjective(A, b), "lbfgs", budget_matvecs=0)
    with pytest.raises(OptionError, match="beta rule"):
        run_solver(QuadraticObjective(A, b), "nlcg", beta="hs")


# ----------------------------------------------------------------------------- attribution
def _run(trace, *, stop="max_iter", solver="x", **settings):
    n = len(trace.get("iteration", []))
    full = {"iteration": list(range(n)), **trace}
    return {
        "solver": solver,
        "settings": {"tol": 1e-8, **settings},
        "trace": full,
        "stop_reason": stop,
        "message": "boom",
    }


def _it(n, **cols):
    return {"iteration": list(range(n)), **cols}


FIRE = {
    "converged": _run(_it(3, grad_norm=[1.0, 1e-3, 1e-9]), stop="converged"),
    "budget_exhausted": _run(
        _it(3, grad_norm=[1, 0.5, 0.2], matvecs=[0, 5, 10], gradients=[1, 2, 3]),
        stop="budget",
        budget_matvecs=12,
    ),
    "iteration_limit": _run(_it(3, grad_norm=[1, 0.5, 0.2])),
    "stalled": _run(_it(12, loss=[1.0] * 12, grad_norm=[0.1] * 12)),
    "error": _run(_it(2, grad_norm=[1, 1]), stop="error"),
    "fallbacks": _run(
        _it(
            4,
            fallback=[None, "negative_curvature", None, "not_descent"],
            hessian_min=[-0.31, None, None, -0.2],
        )
    ),
    "negative_curvature": _run(_it(3, negative_curvature=[None, False, True])),
    "damping_growth": _run(
        _it(5, damping=[None, 1.0, 1.5, 15.0, 22.5], rho=[None, 0.5, 0.1, 0.05, 0.1])
    ),
    "rejected_steps": _run(_it(3, rejected=[None, True, False])),
    "line_search_failures": _run(_it(3, line_search_failed=[None, False, True])),
    "ill_conditioned": _run(_it(2, hessian_max=[4.0, 4.0], hessian_min=[1e-4, 1e-4])),
    "indefinite": _run(_it(2, curvature_max=[2.0, 2.0], curvature_min=[-0.3, -0.31])),
    "mk_scaled_gradient": _run(
        _it(2, layer_cosines=[None, [1.0, 1.0 - 1e-13]], layer_scales=[None, [2.0, 3.0]]),
        solver="mk",
    ),
    "newton_residual": _run(_it(3, newton_residual=[None, 1.8, 1.95])),
    # MK on a GELU MLP took the loss from 0.167 to 887 (issue 14)
    "diverged": _run(_it(4, loss=[0.167, 0.12, 3.0, 887.0], grad_norm=[1, 1, 1, 1])),
    "non_finite": _run(_it(3, loss=[1.0, None, float("inf")], grad_norm=[1, None, None])),
}

SILENT = {
    "converged": _run(_it(3, grad_norm=[1.0, 1e-3, 1e-5])),
    "budget_exhausted": _run(_it(2, grad_norm=[1, 0.5]), stop="max_iter"),
    "iteration_limit": _run(_it(3, grad_norm=[1.0, 1e-3, 1e-9]), stop="converged"),
    "stalled": _run(_it(12, loss=[1.0 - 0.01 * i for i in range(12)], grad_norm=[0.1] * 12)),
    "error": _run(_it(2, grad_norm=[1, 1])),
    "fallbacks": _run(_it(3, fallback=[None, None, None])),
    "negative_curvature": _run(_it(3, negative_curvature=[None, False, False])),
    "damping_growth": _run(_it(4, damping=[None, 1.0, 1.5, 1.0], rho=[None, 0.1, 0.9, 0.9])),
    "rejected_steps": _run(_it(3, rejected=[None, False, False])),
    "line_search_failures": _run(_it(3, line_search_failed=[None, False, False])),
    "ill_conditioned": _run(_it(2, hessian_max=[4.0, 4.0], hessian_min=[1.0, 1.0])),
    "indefinite": _run(_it(2, curvature_max=[2.0, 2.0], curvature_min=[0.1, 1e-12])),
    "mk_scaled_gradient": _run(_it(2, layer_cosines=[None, None])),
    "newton_residual": _run(_it(2, newton_residual=[None, None])),
    "diverged": _run(_it(4, loss=[1.0, 0.5, 0.6, 0.4], grad_norm=[1, 1, 1, 1])),
    "non_finite": _run(_it(3, loss=[1.0, 0.5, 0.4], grad_norm=[1, 0.5, 0.4])),
}


def _rule_fn(name):
    fn_name = {
        "ill_conditioned": "conditioning",
        "indefinite": "conditioning",
        "error": "error",
    }.get(name, name)
    return {r.__name__: r for r in RULES}[fn_name]


@pytest.mark.parametrize("rule", sorted(FIRE))
def test_attribution_rule_fires_and_stays_silent(rule):
    fn = _rule_fn(rule)
    finding = fn(FIRE[rule])
    assert finding is not None and finding.rule == rule
    assert finding.text and finding.evidence
    silent = fn(SILENT[rule])
    assert silent is None or silent.rule != rule


def test_attribution_texts_carry_the_numbers():
    f = _rule_fn("fallbacks")(FIRE["fallbacks"])
    assert f.text.startswith("fell back to gradient steps in 2 of 3 iterations")
    assert "-0.31" in f.text
    d = _rule_fn("damping_growth")(FIRE["damping_growth"])
    assert "from 1 to 22.5 after iteration 1" in d.text and "rho < 0.25 in 3 of 4" in d.text
    k = _rule_fn("ill_conditioned")(FIRE["ill_conditioned"])
    assert "kappa ~ 4.0e+04" in k.text
    n = _rule_fn("newton_residual")(FIRE["newton_residual"])
    assert "does not solve the Newton system" in n.text and "1.95" in n.text
    good = _rule_fn("newton_residual")(_run(_it(2, newton_residual=[None, 1e-9])))
    assert "solves the Newton system" in good.text
    assert [x.rule for x in attribute(FIRE["converged"])] == ["converged"]


def test_attribution_names_divergence_and_growth():
    d = _rule_fn("diverged")(FIRE["diverged"])
    assert "from 0.167 to 887" in d.text
    rising = _run(_it(6, loss=[5.0, 1.0, 0.5, 0.6, 0.7, 0.8], grad_norm=[1] * 6))
    g = _rule_fn("diverged")(rising)
    assert g is not None and "rose in each of the last 3 iterations" in g.text
    rules = [f.rule for f in attribute({**FIRE["diverged"], "stop_reason": "max_iter"})]
    assert "diverged" in rules and "iteration_limit" in rules
    # flat to round-off (gradient descent near a minimum, float32): neither diverged nor
    # diverging, though each of the last losses is a little higher
    flat = [0.0024339, 0.00243320, 0.00243321, 0.00243322, 0.00243323]
    assert _rule_fn("diverged")(_run(_it(5, loss=flat, grad_norm=[1] * 5))) is None
    above = [0.0024332, 0.0024331, 0.00243321, 0.00243322, 0.00243323]
    assert _rule_fn("diverged")(_run(_it(5, loss=above, grad_norm=[1] * 5))) is None
    nf = _rule_fn("non_finite")(FIRE["non_finite"])
    assert "from iteration 1" in nf.text


def test_compare_runs_rows():
    A, b, _ = _quadratic()
    runs = [run_solver(QuadraticObjective(A, b), s, max_iter=30) for s in ("lbfgs", "newton-cg")]
    rows = compare_runs(runs)
    assert [r["solver"] for r in rows] == ["lbfgs", "newton-cg"]
    assert rows[1]["num_matvecs"] == runs[1].num_matvecs
    assert rows[0]["loss_curve"]["loss"] == runs[0].trace["loss"]
