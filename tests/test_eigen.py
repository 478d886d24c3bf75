import pytest
import torch

from curvscope import OptionError, Problem
from curvscope.linalg import eigsh, power_iteration
from curvscope.operators import DenseOperator, HessianOperator

from .cases import CASES, build
from .truth import dense_hessian


def known_spectrum(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [
            torch.tensor([10.0, 7.0, 5.0, 4.0, 3.5]),
            torch.linspace(-0.5, 2.0, n - 8, dtype=torch.float64),
            torch.tensor([-2.0, -3.0, -6.0]),
        ]
    ).to(torch.float64)
    return (q * lam) @ q.T, torch.sort(lam).values


def check_pairs(A, res, tol):
    for i in range(len(res.eigenvalues)):
        v = res.eigenvectors[:, i].to(torch.float64)
        r = torch.linalg.vector_norm(A @ v - res.eigenvalues[i] * v)
        assert float(r) == pytest.approx(float(res.residual_norms[i]), rel=1e-6, abs=1e-12)
        assert abs(float(torch.linalg.vector_norm(v)) - 1) < 1e-12


def test_lanczos_both_ends_on_known_spectrum():
    M, lam = known_spectrum()
    A = DenseOperator(M)
    tol = 1e-10
    top, bottom = eigsh(A, top=4, bottom=3, tol=tol, seed=torch.Generator().manual_seed(0))
    assert torch.allclose(top.eigenvalues, lam.flip(0)[:4], atol=1e-8 * 10)
    assert torch.allclose(bottom.eigenvalues, lam[:3], atol=1e-8 * 10)
    assert top.all_converged and bottom.all_converged
    assert (top.residual_norms <= tol * 10).all()
    check_pairs(M, top, tol)
    check_pairs(M, bottom, tol)
    assert top.num_matvecs < 60


def test_lanczos_breakdown_gives_exact_eigenvalues():
    """An invariant subspace (repeated eigenvalues) ends the Krylov space early: exact pairs."""
    M = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0], dtype=torch.float64))
    top, bottom = eigsh(DenseOperator(M), top=1, bottom=1, tol=1e-12,
                        seed=torch.Generator().manual_seed(0))
    assert float(top.eigenvalues[0]) == pytest.approx(3.0, abs=1e-14)
    assert float(bottom.eigenvalues[0]) == pytest.approx(1.0, abs=1e-14)
    assert top.all_converged and bottom.all_converged


def test_non_convergence_is_reported():
    M, _ = known_spectrum(200, seed=3)
    (top,) = eigsh(
        DenseOperator(M), top=5, tol=1e-14, max_matvecs=13, seed=torch.Generator().manual_seed(0)
    )
    assert not top.all_converged


@pytest.mark.parametrize("which", ["magnitude", "top", "bottom"])
def test_power_iteration_known_spectrum(which):
    M, lam = known_spectrum()
    res = power_iteration(
        DenseOperator(M),
        2,
        which=which,
        tol=1e-8,
        max_iter=3000,
        seed=torch.Generator().manual_seed(0),
    )
    expected = {
        "magnitude": torch.tensor([10.0, 7.0]),
        "top": torch.tensor([10.0, 7.0]),
        "bottom": torch.tensor([-6.0, -3.0]),
    }[which].to(torch.float64)
    assert torch.allclose(res.eigenvalues, expected, atol=1e-6)
    assert res.all_converged
    check_pairs(M, res, 1e-8)
    if which != "magnitude":
        assert res.shift == pytest.approx(10.0, rel=1e-6)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]], ids=lambda c: c["id"])
def test_eigsh_of_tiny_model_hessian(case):
    model, loss, data, reduction = build(case)
    truth = torch.linalg.eigvalsh(dense_hessian(model, loss, data, reduction))
    H = HessianOperator(Problem(model, loss, data, reduction=reduction))
    top, bottom = eigsh(H, top=3, bottom=2, tol=1e-10, seed=torch.Generator().manual_seed(0))
    scale = float(truth.abs().max())
    assert torch.allclose(top.eigenvalues, truth.flip(0)[:3], atol=1e-8 * scale)
    assert torch.allclose(bottom.eigenvalues, truth[:2], atol=1e-8 * scale)
    assert (top.residual_norms <= 1e-10 * scale * 1.01).all()
    p = power_iteration(
        H, 1, which="top", tol=1e-8, max_iter=5000, seed=torch.Generator().manual_seed(0)
    )
    assert float(p.eigenvalues[0]) == pytest.approx(float(truth[-1]), abs=1e-5 * scale)


def test_bad_requests():
    A = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(OptionError, match="at least one eigenvalue"):
        eigsh(A, top=0, bottom=0)
    with pytest.raises(OptionError, match="5 eigenvalues of a matrix with 4 rows"):
        eigsh(A, top=5)
