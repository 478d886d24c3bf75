"""Calibration of the printed ± sigma: over 200 seeds on matrices with an exactly known answer,
``estimate ± 2 sigma`` must hold the truth in 92-98% of runs (95.45% nominal; the band is
two binomial standard deviations of a fraction over 200 runs). ``benchmarks/coverage.py``
prints the full table (more spectra, probe counts and distributions).

Each check runs with few probes, where a plain ``s / sqrt(m)`` undercovers (Student t, not
Gaussian): with the old standard errors these fail, as
``test_the_coverage_check_fails_without_the_t_factor`` shows.
"""

import math

import pytest
import torch

from curvscope._sampling import subset_indices
from curvscope.diagnostics import spectrum
from curvscope.linalg import (
    DenseOperator,
    LinearOperator,
    _trace,
    hutchinson_trace,
    hutchpp_trace,
    slq,
    t_factor,
)

SEEDS = range(200)
N = 80
LOW, HIGH = 0.92, 0.98


def decaying(n=N, seed=7):
    """``Q diag(10 * 0.9^i) Q^T`` with a random rotation: a curvature-like spectrum."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = 10 * 0.9 ** torch.arange(n, dtype=torch.float64)
    return (q * lam) @ q.T


def coverage(pairs, truth):
    """Fraction of ``(estimate, sigma)`` pairs with ``|estimate - truth| <= 2 sigma``."""
    return sum(abs(e - truth) <= 2 * s for e, s in pairs) / len(pairs)


def trace_coverage(estimator, **kw):
    M = decaying()
    A = DenseOperator(M, symmetric=True)
    truth = float(torch.trace(M))
    if estimator == "slq":
        pairs = []
        for s in SEEDS:
            m1, se = slq(A, seed=s, **kw).moment(1)
            pairs.append((N * m1, N * se))
    else:
        fn = {"hutchinson": hutchinson_trace, "hutchpp": hutchpp_trace}[estimator]
        pairs = [(t.estimate, t.stderr) for t in (fn(A, seed=s, **kw) for s in SEEDS)]
    return coverage(pairs, truth)


CASES = [
    ("hutchinson", {"num_matvecs": 10}),
    ("hutchinson", {"num_matvecs": 10, "distribution": "gaussian"}),
    ("hutchpp", {"num_matvecs": 9}),  # 3 sketch columns, 3 products for Q^T A Q, 3 probes
    ("hutchpp", {"num_matvecs": 99}),  # the default: 33 + 33 + 33
    ("slq", {"num_probes": 5, "num_steps": 8}),
]


@pytest.mark.parametrize(("estimator", "kw"), CASES)
def test_trace_stderr_covers_the_exact_trace(estimator, kw):
    cov = trace_coverage(estimator, **kw)
    assert LOW <= cov <= HIGH, f"{estimator} {kw}: ±2 stderr covered {cov:.1%} of 200 runs"


def test_the_coverage_check_fails_without_the_t_factor(monkeypatch):
    # The old standard error, s / sqrt(m): Hutch++'s 3 probes cover ~80%, 5 SLQ probes ~88%.
    monkeypatch.setattr(_trace, "t_factor", lambda n: 1.0)
    assert trace_coverage("hutchpp", num_matvecs=9) < LOW
    assert trace_coverage("slq", num_probes=5, num_steps=8) < LOW


def test_t_factor_is_the_student_t_quantile_over_two():
    # t_{n-1} quantiles of 95.45% (two-sided), from scipy.stats.t.ppf(0.97725, n - 1) / 2.
    for n, want in [(2, 6.98386509962), (3, 2.26326834372), (10, 1.15990294913),
                    (100, 1.01278397978)]:
        assert t_factor(n) == pytest.approx(want, rel=1e-9)
    assert t_factor(1) == math.inf and t_factor(10**6) == 1.0


class Gram(LinearOperator):
    """``(1/N) X^T X`` over the rows of ``X``; ``on_subset`` draws rows without replacement."""

    SELF_ADJOINT = True
    name = "gram"

    def __init__(self, X):
        super().__init__((X.shape[1], X.shape[1]), dtype=X.dtype, device=X.device)
        self.X = X

    def _matmat(self, V):
        return self.X.T @ (self.X @ V) / self.X.shape[0]

    def on_subset(self, size, seed):
        return Gram(self.X[subset_indices(self.X.shape[0], size, seed)])

    def top(self):
        return float(torch.linalg.eigvalsh(self.X.T @ self.X / self.X.shape[0])[-1])


def test_repeats_spread_describes_the_scatter_of_a_subset_estimate():
    # spread.std is the scatter of one N-sample eigenvalue: a fresh subset's top eigenvalue
    # lies within mean ± 2 t_factor(R) sqrt(1 + 1/R) std in ~95% of runs. It is no error bar
    # on the full-data eigenvalue (subset top eigenvalues are biased upwards).
    R, n = 5, 40
    inside, full_inside = [], []
    for s in SEEDS:
        g = torch.Generator().manual_seed(10_000 + s)
        X = torch.randn(400, 8, generator=g, dtype=torch.float64) * torch.linspace(1, 3, 8)
        op = Gram(X.to(torch.float64))
        res = spectrum(op, top=1, bottom=0, repeats=R, samples=n, seed=s)
        spread = res.spectra[0].spread
        mean, std = spread["mean"][0], spread["std"][0]
        lam = op.on_subset(n, torch.Generator().manual_seed(99_999 + s)).top()
        inside.append(abs(lam - mean) <= 2 * t_factor(R) * math.sqrt(1 + 1 / R) * std)
        full_inside.append(abs(lam - op.top()) <= 2 * std)
    assert any("not an error bar" in line for line in res.notes)
    cov = sum(inside) / len(inside)
    assert LOW <= cov <= HIGH, f"fresh subset within the spread in {cov:.1%} of 200 runs"
    assert sum(full_inside) / len(full_inside) < LOW  # what the note warns about
