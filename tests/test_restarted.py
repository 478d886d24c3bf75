"""Thick-restart Lanczos (``curvscope.linalg.eigsh``) against dense float64 truth.

Matrices with known spectra are built as ``Q diag(lam) Q^T`` with a random orthogonal ``Q``;
the truth is ``torch.linalg.eigvalsh`` of the very matrix the operator multiplies with.
"""

from __future__ import annotations

import pytest
import torch

from curvscope import OptionError, Problem
from curvscope.linalg import eigsh
from curvscope.linalg._restarted import RELATION_PROBES, ROUNDOFF
from curvscope.operators import HessianOperator

from .cases import CASES, build
from .truth import dense_hessian

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


class Dense:
    """A symmetric matrix as an operator: shape, dtype, device, ``@`` and a product count."""

    def __init__(self, M: torch.Tensor) -> None:
        self.M = M
        self.shape = M.shape
        self.dtype = M.dtype
        self.device = M.device
        self.products = 0  # counted per column, as curvscope's operators do

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        self.products += V.shape[1] if V.ndim == 2 else 1
        return self.M @ V


def with_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = lam.shape[0]
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    M = (q * lam) @ q.T
    return (M + M.T) / 2


def spectrum(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    if kind == "indefinite":
        return torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "clustered":
        # Hessian-like: a few outliers over a bulk near zero, both signs.
        bulk = 0.05 * torch.randn(n - 6, generator=g, dtype=torch.float64)
        return torch.cat([torch.tensor([10.0, 9.5, 9.4, 4.0, -1.0, -1.2]), bulk])
    if kind == "repeated":
        # Four distinct values: the Krylov space is invariant after four steps.
        counts = [3, 5, n // 2, n - 8 - n // 2]
        values = [3.0, 2.0, 1.0, -1.0]
        return torch.cat(
            [torch.full((c,), v, dtype=torch.float64) for c, v in zip(counts, values, strict=True)]
        )
    if kind == "tiny-gaps-bottom":
        # Gaps of 5e-4..1.5e-3 of the spread: resolvable by a Krylov space of a few hundred.
        low = torch.tensor([1e-3, 1.5e-3, 2.5e-3, 4e-3], dtype=torch.float64)
        return torch.cat([low, 0.01 + torch.rand(n - 4, generator=g, dtype=torch.float64)])
    raise ValueError(kind)


def truth(M: torch.Tensor, top: int, bottom: int) -> tuple[torch.Tensor, torch.Tensor]:
    ev = torch.linalg.eigvalsh(M.to(torch.float64))
    return ev.flip(0)[:top], ev[:bottom]


def check(A: Dense, results, top: int, bottom: int, tol: float, all_converged: bool = True):
    """Eigenvalues within their bounds, residuals re-measured, products counted."""
    M64 = A.M.to(torch.float64)
    want_top, want_bottom = truth(M64, top, bottom)
    expected = ([("top", want_top)] if top else []) + ([("bottom", want_bottom)] if bottom else [])
    assert [r.which for r in results] == [w for w, _ in expected]
    for res, (_, want) in zip(results, expected, strict=True):
        assert res.method == "lanczos"
        assert res.num_matvecs == A.products
        check = top + bottom if res.residual_check == "measured" else RELATION_PROBES
        assert res.num_iters + check == res.num_matvecs
        err = (res.eigenvalues - want).abs()
        bad = err > res.error_bounds
        assert not bad.any(), (
            f"{res.which}: error {err.tolist()} > bound {res.error_bounds.tolist()}"
        )
        # never looser than the residual, never below the round-off of one product
        floor = ROUNDOFF * torch.finfo(A.dtype).eps * M64.shape[0] ** 0.5 * res.norm_estimate
        assert (res.error_bounds <= res.residual_norms.clamp(min=floor) * (1 + 1e-12)).all()
        assert (res.error_bounds >= floor * (1 - 1e-12)).all()
        Y = res.eigenvectors.to(torch.float64)
        r = torch.linalg.vector_norm(M64 @ Y - Y * res.eigenvalues, dim=0)
        if res.residual_check == "measured":
            assert torch.allclose(r, res.residual_norms, rtol=1e-6, atol=1e-12 * res.norm_estimate)
        else:  # the relation's residuals bound the true ones (its check's sigma included)
            assert (r <= res.residual_norms * (1 + 1e-6) + 1e-14 * res.norm_estimate).all()
        conv = res.converged
        assert (res.residual_norms[conv] <= tol * res.norm_estimate).all()
        if all_converged:
            assert res.all_converged, f"{res.which}: residuals {res.residual_norms.tolist()}"


@pytest.mark.parametrize("kind", ["indefinite", "clustered", "repeated", "tiny-gaps-bottom"])
@pytest.mark.parametrize("n", [30, 200, 500])
def test_known_spectra_both_ends(kind, n):
    M = with_spectrum(spectrum(kind, n), seed=n)
    A = Dense(M)
    tol = 1e-8
    results = eigsh(A, top=5, bottom=3, tol=tol, seed=1)
    check(A, results, 5, 3, tol)


def test_repeated_eigenvalues_come_with_their_multiplicity():
    M = with_spectrum(spectrum("repeated", 100))
    A = Dense(M)
    top, bottom = eigsh(A, top=5, bottom=2)
    assert torch.allclose(top.eigenvalues, torch.tensor([3.0, 3, 3, 2, 2], dtype=torch.float64))
    assert torch.allclose(bottom.eigenvalues, torch.tensor([-1.0, -1.0], dtype=torch.float64))
    assert top.restarts >= 2  # fresh starts after each invariant subspace
    Y = torch.cat([top.eigenvectors, bottom.eigenvectors], dim=1)
    assert torch.allclose(Y.T @ Y, torch.eye(7, dtype=torch.float64), atol=1e-10)


def test_exact_eigenvector_as_start_vector_still_finds_the_others():
    lam = spectrum("indefinite", 80)
    M = with_spectrum(lam, seed=3)
    v0 = torch.linalg.eigh(M).eigenvectors[:, -1]
    A = Dense(M)
    results = eigsh(A, top=4, bottom=1, tol=1e-10, v0=v0)
    check(A, results, 4, 1, 1e-10)


def test_small_basis_restarts_many_times_and_still_converges():
    M = with_spectrum(spectrum("indefinite", 300), seed=5)
    A = Dense(M)
    tol = 1e-8
    results = eigsh(A, top=4, bottom=2, tol=tol, basis_size=9, max_matvecs=3000)
    check(A, results, 4, 2, tol)
    assert results[0].restarts >= 5


def test_only_bottom():
    M = with_spectrum(spectrum("tiny-gaps-bottom", 150), seed=6)
    A = Dense(M)
    (res,) = eigsh(A, top=0, bottom=3, tol=1e-10)
    assert res.which == "bottom"
    check(A, [res], 0, 3, 1e-10)


def test_float32_reports_float64_rayleigh_quotients_of_its_vectors():
    M32 = with_spectrum(spectrum("clustered", 400), seed=7).to(torch.float32)
    want, _ = truth(M32, 3, 0)  # eigenvalues of the float32 matrix itself, in float64
    (res,) = eigsh(Dense(M32), top=3, tol=1e-5)
    rel = ((res.eigenvalues - want).abs() / want.abs()).max()
    assert rel < 1e-6
    assert res.eigenvectors.dtype == torch.float32
    assert ((res.eigenvalues - want).abs() <= res.error_bounds).all()
    # the printed value is y^T (A y) / y^T y of the returned float32 vector, accumulated in
    # float64: recompute it from the vectors alone
    Y = res.eigenvectors
    Y64, AY64 = Y.double(), (M32 @ Y).double()
    rq = (Y64 * AY64).sum(0) / (Y64 * Y64).sum(0)
    assert torch.allclose(res.eigenvalues, rq, rtol=1e-12, atol=0)


def test_rtol_mode_meets_the_relative_error_bound():
    M = with_spectrum(spectrum("clustered", 200), seed=8)
    A = Dense(M)
    rtol = 1e-10
    top, bottom = eigsh(A, top=3, bottom=2, rtol=rtol)
    want_top, want_bottom = truth(M, 3, 2)
    for res, want in ((top, want_top), (bottom, want_bottom)):
        assert res.all_converged
        assert res.num_matvecs == A.products
        assert res.tol == rtol
        assert (res.error_bounds <= rtol * res.eigenvalues.abs()).all()
        assert ((res.eigenvalues - want).abs() <= rtol * want.abs()).all()


def test_warm_start_from_a_nearby_matrix_needs_fewer_products():
    lam = spectrum("clustered", 400)
    M = with_spectrum(lam, seed=9)
    g = torch.Generator().manual_seed(10)
    E = torch.randn(400, 400, generator=g, dtype=torch.float64)
    near = M + 1e-4 * (E + E.T) / 2
    v0 = torch.linalg.eigh(near).eigenvectors[:, -5:]
    cold = Dense(M)
    warm = Dense(M)
    (c,) = eigsh(cold, top=5, tol=1e-8)
    (w,) = eigsh(warm, top=5, tol=1e-8, v0=v0)
    assert c.all_converged and w.all_converged
    assert torch.allclose(w.eigenvalues, c.eigenvalues, atol=1e-10, rtol=0)
    assert w.num_matvecs < c.num_matvecs


def test_exhausted_budget_gives_unconverged_flags_not_an_exception():
    M = with_spectrum(spectrum("clustered", 300), seed=11)
    A = Dense(M)
    calls = []
    top, bottom = eigsh(
        A, top=3, bottom=2, tol=1e-12, max_matvecs=20, progress=lambda *a: calls.append(a)
    )
    assert top.num_matvecs == A.products <= 20
    assert not (top.all_converged and bottom.all_converged)
    assert [c[1] for c in calls] == [20] * len(calls)
    assert calls[-1][0] == top.num_matvecs
    assert [c[0] for c in calls] == list(range(1, top.num_iters + 1)) + [top.num_matvecs]
    # the bounds hold even without convergence
    want_top, want_bottom = truth(M, 3, 2)
    assert ((top.eigenvalues - want_top).abs() <= top.error_bounds).all()
    assert ((bottom.eigenvalues - want_bottom).abs() <= bottom.error_bounds).all()


def test_a_failed_final_check_sends_the_iteration_on_but_not_to_the_budget():
    """Products that do not quite fit the Lanczos relation (here a small antisymmetric part;
    in practice float32 round-off on millions of parameters) make the estimated residuals
    pass while the measured ones fail. The iteration then goes on, measuring again within a
    basis cycle, as long as each check halves the worst residual; the products add up."""
    n = 400
    d = torch.linspace(0, 1, n, dtype=torch.float64)
    R = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    S = (R - R.T) / torch.linalg.matrix_norm(R - R.T, 2)
    exact = Dense(torch.diag(d))
    (clean,) = eigsh(exact, top=3, tol=1e-4, max_matvecs=400)
    assert clean.all_converged and clean.num_matvecs == exact.products
    # well above the tolerance: never met, and one more cycle (not the budget) shows it
    A = Dense(torch.diag(d) + 3e-3 * S)
    phases = []
    (noisy,) = eigsh(A, top=3, tol=1e-4, max_matvecs=400, progress=lambda *a: phases.append(a))
    assert not noisy.all_converged and noisy.num_matvecs == A.products
    checks = [p for p in phases if p[2] == "residual check"]
    assert len(checks) == 2 and checks[-1][0] == noisy.num_matvecs
    assert clean.num_matvecs < noisy.num_matvecs <= clean.num_matvecs + 60
    assert (noisy.residual_norms > 1e-4).all()  # measured, not the optimistic estimates


def test_seed_generator_and_basis_device():
    M = with_spectrum(spectrum("indefinite", 60), seed=12)
    a = eigsh(Dense(M), top=2, seed=torch.Generator().manual_seed(4), basis_device="cpu")[0]
    b = eigsh(Dense(M), top=2, seed=4)[0]
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert a.eigenvectors.device == torch.device("cpu")


def test_tiny_model_hessian():
    case = next(c for c in CASES if c["id"] == "mlp-ce-mean-unequal")
    model, loss, data, reduction = build(case)
    H = HessianOperator(Problem(model, loss, data, reduction=reduction))
    Hd = dense_hessian(model, loss, data, reduction)
    tol = 1e-9
    before = H.num_matvecs
    top, bottom = eigsh(H, top=3, bottom=2, tol=tol, basis_size=12)
    assert top.num_matvecs == H.num_matvecs - before
    want_top, want_bottom = truth(Hd, 3, 2)
    for res, want in ((top, want_top), (bottom, want_bottom)):
        assert res.all_converged
        assert ((res.eigenvalues - want).abs() <= res.error_bounds).all()
        assert (res.residual_norms <= tol * res.norm_estimate).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top": 0, "bottom": 0}, "at least one eigenvalue"),
        ({"top": 8, "bottom": 3}, "ask for 11 eigenvalues of a matrix with 10 rows"),
        ({"top": 3, "basis_size": 3}, "basis_size 3 cannot hold"),
        ({"top": 3, "max_matvecs": 5}, "max_matvecs 5 leaves too little"),
        ({"top": 1, "tol": 0.0}, "tol must be positive"),
        ({"top": 1, "rtol": -1.0}, "rtol must be positive"),
        ({"top": 1, "v0": torch.ones(3)}, "v0 has shape"),
        ({"top": 1, "v0": torch.zeros(10)}, "v0 sums to zero"),
        ({"top": 1, "seed": 1.5}, "seed must be an int"),
    ],
)
def test_bad_arguments(kwargs, match):
    A = Dense(torch.eye(10, dtype=torch.float64))
    with pytest.raises(OptionError, match=match) as info:
        eigsh(A, **kwargs)
    assert "--" not in str(info.value)
