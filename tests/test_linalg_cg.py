"""CG, PCG and MINRES against numpy.linalg.solve on matrices with known spectra."""

import numpy as np
import pytest
import torch

from curvscope import NonFiniteError, OptionError
from curvscope.linalg import cg, minres
from curvscope.operators import DenseOperator

N = 30


def with_spectrum(lam, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    lam = torch.as_tensor(lam, dtype=torch.float64)
    return (q * lam) @ q.T


def rhs(seed=1):
    return torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def np_solve(A, b):
    return torch.from_numpy(np.linalg.solve(A.numpy(), b.numpy()))


SPD = with_spectrum(torch.linspace(0.1, 10.0, N))
INDEF = with_spectrum(torch.linspace(-3.0, 10.0, N))


@pytest.mark.parametrize("form", ["operator", "tensor", "callable"])
def test_cg_solves_spd_system(form):
    b = rhs()
    A = {"operator": DenseOperator(SPD), "tensor": SPD, "callable": lambda v: SPD @ v}[form]
    res = cg(A, b, tol=1e-12)
    assert res.converged and res.stop_reason == "tolerance"
    assert not res.negative_curvature
    assert torch.allclose(res.x, np_solve(SPD, b), rtol=0, atol=1e-10)
    assert res.num_matvecs == res.num_iters == len(res.curvatures)
    assert res.num_iters <= N + 5
    true_res = float(torch.linalg.vector_norm(b - SPD @ res.x))
    assert true_res <= 1e-12 * float(torch.linalg.vector_norm(b)) * 10
    assert all(c > 0 for c in res.curvatures)
    assert res.residual_norms[0] == pytest.approx(float(torch.linalg.vector_norm(b)))


def test_pcg_with_jacobi_and_operator_preconditioner_converges_faster():
    # A badly scaled SPD matrix: Jacobi preconditioning fixes the scaling.
    d = torch.logspace(0, 4, N, dtype=torch.float64)
    A = d.sqrt()[:, None] * with_spectrum(torch.linspace(1.0, 3.0, N)) * d.sqrt()[None, :]
    b = rhs()
    plain = cg(A, b, tol=1e-10)
    diag = torch.diag(A)
    pre = cg(A, b, tol=1e-10, preconditioner=lambda r: r / diag)
    pre_op = cg(A, b, tol=1e-10, preconditioner=DenseOperator(torch.diag(1 / diag)))
    truth = np_solve(A, b)
    for res in (plain, pre, pre_op):
        assert res.converged
        assert torch.allclose(res.x, truth, rtol=1e-7, atol=0)
    assert pre.num_iters < plain.num_iters
    assert pre_op.num_iters == pre.num_iters


def test_cg_x0_and_max_iter_and_callback():
    b = rhs()
    truth = np_solve(SPD, b)
    warm = cg(SPD, b, x0=truth + 1e-3 * rhs(2), tol=1e-12)
    assert warm.converged and warm.num_matvecs == warm.num_iters + 1
    assert torch.allclose(warm.x, truth, atol=1e-10, rtol=0)
    short = cg(SPD, b, max_iter=3)
    assert short.stop_reason == "max_iter" and not short.converged and short.num_iters == 3
    seen = []
    cb = cg(SPD, b, callback=lambda k, x, r: seen.append((k, r)) or k == 2)
    assert cb.stop_reason == "callback" and [k for k, _ in seen] == [1, 2]
    zero = cg(SPD, torch.zeros(N, dtype=torch.float64))
    assert zero.stop_reason == "zero_rhs" and zero.converged and zero.num_matvecs == 0


def test_cg_detects_negative_curvature():
    b = rhs()
    res = cg(DenseOperator(INDEF), b)
    assert res.stop_reason == "negative_curvature" and res.negative_curvature
    assert not res.converged
    p = res.direction
    assert float(p @ INDEF @ p) == pytest.approx(res.curvatures[-1], rel=1e-12)
    assert res.curvatures[-1] <= 0
    assert all(c > 0 for c in res.curvatures[:-1])
    # x is the iterate before the offending step; num_iters counts completed steps.
    assert res.num_iters == len(res.curvatures) - 1
    # Along a negative-curvature eigenvector CG stops at once with x = 0.
    w, V = torch.linalg.eigh(INDEF)
    first = cg(INDEF, V[:, 0])
    assert first.stop_reason == "negative_curvature" and first.num_iters == 0
    assert first.curvatures[0] == pytest.approx(float(w[0]), rel=1e-12)
    assert torch.equal(first.x, torch.zeros(N, dtype=torch.float64))


def test_cg_continue_through_negative_curvature_still_solves_nonsingular_system():
    b = rhs()
    res = cg(INDEF, b, tol=1e-10, negative_curvature="continue", max_iter=200)
    assert res.negative_curvature
    if res.converged:  # CG may break down on indefinite matrices; it did not here
        assert torch.allclose(res.x, np_solve(INDEF, b), atol=1e-7, rtol=0)


@pytest.mark.parametrize("precond", [False, True])
def test_minres_solves_indefinite_system(precond):
    b = rhs()
    M = (lambda r: r / torch.diag(INDEF).abs().clamp_min(0.1)) if precond else None
    res = minres(DenseOperator(INDEF), b, tol=1e-12, preconditioner=M)
    assert res.converged and res.stop_reason == "tolerance"
    assert torch.allclose(res.x, np_solve(INDEF, b), atol=1e-10, rtol=0)
    true_res = float(torch.linalg.vector_norm(b - INDEF @ res.x))
    assert true_res <= 1e-10 * float(torch.linalg.vector_norm(b))
    # Minimal residual: the tracked norms never increase.
    r = res.residual_norms
    assert all(r[i + 1] <= r[i] * (1 + 1e-12) for i in range(len(r) - 1))
    if not precond:
        assert res.residual_norm == pytest.approx(true_res, rel=1e-3, abs=1e-13)


def test_minres_shift_and_singular_consistent_system():
    b = rhs()
    shifted = minres(INDEF, b, tol=1e-12, shift=0.7)
    assert torch.allclose(
        shifted.x, np_solve(INDEF - 0.7 * torch.eye(N, dtype=torch.float64), b), atol=1e-10
    )
    lam = torch.linspace(-3.0, 10.0, N)
    lam[:5] = 0.0
    C = with_spectrum(lam)
    bc = C @ rhs(3)  # in the range of C: consistent
    res = minres(C, bc, tol=1e-12)
    assert res.converged
    min_norm = torch.from_numpy(np.linalg.lstsq(C.numpy(), bc.numpy(), rcond=None)[0])
    assert torch.allclose(res.x, min_norm, atol=1e-9, rtol=0)


def test_solver_failure_paths():
    b = rhs()
    with pytest.raises(OptionError, match="right-hand side must be a vector"):
        cg(SPD, b[:, None])
    with pytest.raises(OptionError, match="tolerance must be positive"):
        cg(SPD, b, tol=0)
    with pytest.raises(OptionError, match="negative_curvature='ignore' is not known"):
        cg(SPD, b, negative_curvature="ignore")
    with pytest.raises(OptionError, match="square matrix"):
        minres(torch.ones(3, 4, dtype=torch.float64), b)
    with pytest.raises(OptionError, match="preconditioner is not positive definite"):
        cg(SPD, b, preconditioner=lambda r: -r)
    with pytest.raises(OptionError, match="MINRES preconditioner is not positive definite"):
        minres(INDEF, b, preconditioner=lambda r: -r)
    with pytest.raises(OptionError, match="max_iter >= 1"):
        minres(INDEF, b, max_iter=0)
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        cg(lambda v: v * float("nan"), b)
