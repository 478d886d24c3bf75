"""SLQ quadrature, the broadened density and trace estimators on matrices with known spectra.

"Exact" below means: SLQ with ``m`` Lanczos steps from a unit probe ``v`` integrates
polynomials of degree <= 2m - 1 exactly against the spectral measure of ``v`` (Gauss
quadrature), so per probe the nodes and weights give ``v^T A v`` and ``v^T A^2 v`` to round-off
as soon as m >= 2. With the P unit vectors e_i as probes their average is then exactly
``tr(A^k)/P``; with random probes the average is an unbiased estimate whose error is
compared with its standard error over probes.
"""

import math

import pytest
import torch

from curvscope import OptionError
from curvscope.linalg import (
    exact_trace,
    hutchinson_trace,
    hutchpp_trace,
    slq,
    spectral_density,
)
from curvscope.operators import DenseOperator

N = 40
REL = 1e-12


def known(n=N, seed=0, lam=None):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    if lam is None:
        lam = torch.cat(
            [torch.tensor([25.0, 12.0, 6.0, 3.0]), torch.linspace(-1.0, 1.5, n - 4)]
        ).to(torch.float64)
    return (q * lam) @ q.T, lam


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_slq_with_unit_probes_reproduces_trace_moments_exactly():
    M, lam = known()
    res = slq(DenseOperator(M), probes=torch.eye(N), num_steps=N)
    assert res.distribution == "given" and res.num_probes == N
    assert torch.allclose(res.weights.sum(1), torch.ones(N, dtype=torch.float64), atol=1e-14)
    for k in (1, 2, 3):
        want = float((lam**k).sum()) / N
        got, _ = res.moment(k)
        assert got == pytest.approx(want, rel=REL)
    # Full Krylov space: the nodes of every probe are A's eigenvalues (those it sees).
    assert res.num_matvecs == int(res.num_steps.sum())
    assert torch.allclose(res.nodes[0], torch.sort(lam).values, atol=1e-10)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_slq_gauss_quadrature_exact_per_probe_with_two_steps(distribution):
    M, _ = known()
    probes = torch.randn(N, 6, generator=gen(3), dtype=torch.float64)
    res = slq(M, probes=probes, num_steps=2)
    V = probes / torch.linalg.vector_norm(probes, dim=0)
    for k in (1, 2, 3):  # degree <= 2m - 1 = 3
        want = (V * (torch.linalg.matrix_power(M, k) @ V)).sum(0)
        assert torch.allclose(res.moments(k), want, rtol=REL, atol=REL * float(want.abs().max()))
    # Random probes of either distribution are unit vectors after normalisation.
    r = slq(M, num_probes=4, num_steps=3, distribution=distribution, seed=gen(0))
    assert r.nodes.shape == (4, 3) and r.num_matvecs == 12


def test_slq_random_probes_within_standard_error():
    M, lam = known()
    zs = []
    for seed in range(5):
        res = slq(M, num_probes=30, num_steps=12, seed=gen(seed))
        for k in (1, 2):
            est, se = res.moment(k)
            zs.append((est - float((lam**k).sum()) / N) / se)
    assert max(abs(z) for z in zs) < 3.5, zs
    assert abs(sum(zs) / len(zs)) * math.sqrt(len(zs)) < 3.0


def test_slq_breakdown_on_repeated_eigenvalues_is_exact():
    lam = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0], dtype=torch.float64)
    M, _ = known(5, 1, lam)
    res = slq(M, num_probes=3, num_steps=5, seed=gen(0))
    # Only three distinct eigenvalues: every probe breaks down after at most 3 steps.
    assert int(res.num_steps.max()) <= 3
    assert res.num_matvecs == int(res.num_steps.sum())
    live = res.nodes[res.weights > 1e-12]
    distinct = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.min((live[:, None] - distinct).abs(), dim=1).values.max() < 1e-10
    unit = slq(M, probes=torch.eye(5), num_steps=5)
    assert unit.moment(2)[0] == pytest.approx(float((lam**2).mean()), rel=REL)


def test_density_integrates_to_one_with_second_moment_plus_sigma_squared():
    M, lam = known()
    res = slq(M, num_probes=10, num_steps=15, seed=gen(1))
    d = spectral_density(res)
    assert d.sigma == pytest.approx(0.01 * float(res.nodes.max() - res.nodes.min()))
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-14)
    m1 = float(torch.trapezoid(d.grid * d.density, d.grid))
    m2 = float(torch.trapezoid(d.grid**2 * d.density, d.grid))
    assert m1 == pytest.approx(res.moment(1)[0], rel=1e-10)
    assert m2 == pytest.approx(res.moment(2)[0] + d.sigma**2, rel=1e-10)
    assert (d.density >= 0).all()
    # Explicit sigma and grid are honoured and recorded.
    grid = torch.linspace(-5, 30, 4001, dtype=torch.float64)
    d2 = spectral_density(res, grid=grid, sigma=0.5)
    assert d2.sigma == 0.5 and torch.equal(d2.grid, grid)
    m2 = float(torch.trapezoid(grid**2 * d2.density, grid))
    assert m2 == pytest.approx(res.moment(2)[0] + 0.25, rel=1e-9)
    # With unit probes and full Lanczos the density's second moment is tr(A^2)/P + sigma^2.
    exact = spectral_density(slq(M, probes=torch.eye(N), num_steps=N))
    m2 = float(torch.trapezoid(exact.grid**2 * exact.density, exact.grid))
    assert m2 == pytest.approx(float((lam**2).mean()) + exact.sigma**2, rel=1e-10)


def test_density_of_a_multiple_of_identity_uses_magnitude_for_sigma():
    res = slq(3.0 * torch.eye(6, dtype=torch.float64), num_probes=2, num_steps=4, seed=gen(0))
    assert res.num_matvecs == 2  # breakdown after one step
    d = spectral_density(res)
    assert d.sigma == pytest.approx(0.03)
    assert float(d.grid[torch.argmax(d.density)]) == pytest.approx(3.0, abs=0.01)


def test_exact_trace_matches_torch_trace():
    M, _ = known()
    t = exact_trace(DenseOperator(M), batch=7)
    assert t.estimator == "exact" and t.stderr == 0.0 and t.num_matvecs == N
    assert t.estimate == pytest.approx(float(torch.trace(M)), rel=REL)
    with pytest.raises(OptionError, match="more than the limit of 10"):
        exact_trace(M, max_dim=10)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_and_hutchpp_within_three_standard_errors(distribution):
    M, _ = known()
    truth = float(torch.trace(M))
    for fn, m in ((hutchinson_trace, 60), (hutchpp_trace, 30)):
        ests = [
            fn(
                DenseOperator(M),
                num_matvecs=m,
                distribution=distribution,
                seed=gen(s),
                batch=8,
            )
            for s in range(6)
        ]
        assert all(e.num_matvecs == m for e in ests)
        # Individual estimates of this skewed quadratic form (one dominant eigenvalue) can
        # sit ~3.5 standard errors out; the average over seeds is held to 3.
        assert all(abs(e.estimate - truth) <= 5 * e.stderr for e in ests)
        mean = sum(e.estimate for e in ests) / len(ests)
        pooled = math.sqrt(sum(e.stderr**2 for e in ests)) / len(ests)
        assert abs(mean - truth) <= 3 * pooled


def test_hutchinson_stderr_matches_theory_and_hutchpp_is_better_on_decaying_spectrum():
    lam = 10.0 * 0.7 ** torch.arange(N, dtype=torch.float64)
    M, _ = known(lam=lam)
    truth = float(lam.sum())
    # Rademacher variance per probe: 2 (||A||_F^2 - sum_i a_ii^2).
    var = 2 * (float((M**2).sum()) - float((torch.diagonal(M) ** 2).sum()))
    h = hutchinson_trace(M, num_matvecs=2000, seed=gen(0))
    assert h.stderr == pytest.approx(math.sqrt(var / 2000), rel=0.1)
    errs_h, errs_pp = [], []
    for s in range(5):
        errs_h.append(abs(hutchinson_trace(M, num_matvecs=30, seed=gen(s)).estimate - truth))
        errs_pp.append(abs(hutchpp_trace(M, num_matvecs=30, seed=gen(s)).estimate - truth))
    assert sum(errs_pp) < 0.25 * sum(errs_h)


def test_hutchpp_exact_when_sketch_spans_space():
    M, _ = known()
    t = hutchpp_trace(M, num_matvecs=3 * N, seed=gen(0))
    assert t.estimate == pytest.approx(float(torch.trace(M)), rel=1e-12)
    assert t.stderr == 0.0 and t.num_matvecs == 3 * N


def test_float32_operator_keeps_dtype_and_estimates():
    M, lam = known()
    A = DenseOperator(M.to(torch.float32))
    res = slq(A, num_probes=4, num_steps=10, seed=gen(0))
    assert res.nodes.dtype == torch.float64
    assert exact_trace(A).estimate == pytest.approx(float(lam.sum()), rel=1e-5)
    assert hutchinson_trace(A, num_matvecs=10, seed=gen(0)).estimate == pytest.approx(
        hutchinson_trace(M, num_matvecs=10, seed=gen(0)).estimate, rel=1e-5
    )


def test_failure_paths():
    M, _ = known()
    with pytest.raises(OptionError, match="probe distribution 'normal' is not known"):
        hutchinson_trace(M, distribution="normal")
    with pytest.raises(OptionError, match="at least one probe"):
        hutchinson_trace(M, num_matvecs=0)
    with pytest.raises(OptionError, match="at least 3 products"):
        hutchpp_trace(M, num_matvecs=2)
    with pytest.raises(OptionError, match="at least one Lanczos step"):
        slq(M, num_steps=0)
    with pytest.raises(OptionError, match="at least one probe"):
        slq(M, num_probes=0)
    with pytest.raises(OptionError, match=r"probes must have shape \[40, k\]"):
        slq(M, probes=torch.ones(3, 2))
    with pytest.raises(OptionError, match="probe vector is zero"):
        slq(M, probes=torch.zeros(N, 1))
    res = slq(M, num_probes=2, num_steps=3, seed=gen(0))
    with pytest.raises(OptionError, match="sigma must be positive"):
        spectral_density(res, sigma=0.0)
    with pytest.raises(OptionError, match="ascending"):
        spectral_density(res, grid=torch.tensor([1.0, 0.0]))
    with pytest.raises(OptionError, match="cannot use a list as a linear operator"):
        exact_trace([[1.0]])
    with pytest.raises(OptionError, match="batch size must be >= 1"):
        hutchinson_trace(M, batch=0)


def test_slq_probes_breaking_down_at_different_steps_stay_exact():
    lam = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0, 8.0], dtype=torch.float64)
    M = torch.diag(lam)
    probes = torch.stack(
        [
            torch.tensor([1.0, 0, 0, 0, 0, 0]),  # an eigenvector: breakdown after one step
            torch.tensor([1.0, 1.0, 0, 0, 0, 0]),  # two eigenvalues: two steps
            torch.ones(6),  # five distinct eigenvalues: five steps
        ],
        dim=1,
    ).to(torch.float64)
    res = slq(M, probes=probes, num_steps=6)
    assert res.num_steps.tolist() == [1, 2, 5]
    assert res.num_matvecs == 8
    V = probes / torch.linalg.vector_norm(probes, dim=0)
    for k in (1, 2, 4, 7):
        want = (V * (torch.diag(lam**k) @ V)).sum(0)
        assert torch.allclose(res.moments(k), want, rtol=REL, atol=0)
    assert torch.allclose(res.weights.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-14)


@pytest.mark.parametrize("block", [1, 2, 5])
def test_slq_in_probe_blocks_gives_the_same_quadrature_in_the_same_products(block):
    """Blocks of probes (what the memory plan shrinks SLQ to) leave each probe's recurrence
    as it was: the same nodes and weights to round-off, the same products, and probes that
    break down at different steps inside a block still stop on their own."""
    lam = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0, 8.0], dtype=torch.float64)
    M = torch.diag(lam)
    probes = torch.stack(
        [torch.tensor([1.0, 0, 0, 0, 0, 0]), torch.tensor([1.0, 1.0, 0, 0, 0, 0]),
         torch.ones(6), torch.tensor([0.0, 1.0, 0, 1.0, 0, 0]),
         torch.tensor([0, 0, 0, 1.0, 1.0, 1.0])],
        dim=1,
    ).to(torch.float64)
    whole = slq(M, probes=probes, num_steps=6)
    parts = slq(M, probes=probes, num_steps=6, probe_block=block)
    assert parts.num_steps.tolist() == whole.num_steps.tolist() == [1, 2, 5, 2, 3]
    assert parts.num_matvecs == whole.num_matvecs
    assert torch.allclose(parts.nodes, whole.nodes, rtol=0, atol=1e-12)
    assert torch.allclose(parts.weights, whole.weights, rtol=0, atol=1e-12)
    A, _ = known()
    calls = []
    r1 = slq(A, num_probes=7, num_steps=12, seed=3)
    r2 = slq(A, num_probes=7, num_steps=12, seed=3, probe_block=block,
             progress=lambda d, t, w: calls.append((d, t)))
    assert torch.allclose(r1.nodes, r2.nodes, rtol=0, atol=1e-10)
    assert torch.allclose(r1.weights, r2.weights, rtol=0, atol=1e-12)
    assert r1.num_matvecs == r2.num_matvecs
    blocks = -(-7 // block)
    assert calls[-1] == (blocks * 12, blocks * 12)  # progress runs over all blocks once
    with pytest.raises(OptionError, match="probe block"):
        slq(A, num_probes=3, num_steps=4, probe_block=0)
