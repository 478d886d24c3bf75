"""The gradient's fraction in the top-k eigenspace (Gur-Ari et al. 2018) against dense truth."""

import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope import OptionError, Problem
from curvscope.diagnostics import gradient_overlap, overlap_from_ritz, spectrum

from .cases import operators
from .truth import full_loss_fn, hessian_by_double_backward

TOL = 1e-10


def _tiny(seed=0, classes=4):
    """A 6-8-4 tanh MLP (92 parameters) on 40 samples of 4 classes, float64."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, classes)).double()
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (40,), generator=g)
    return model, [(x[:25], y[:25]), (x[25:], y[25:])]


def _truth(model, data, names=None):
    """Dense Hessian (double backward, row by row) and gradient of the full-data loss."""
    names = names or [n for n, _ in model.named_parameters()]
    f, w = full_loss_fn(model, "cross_entropy", data, "mean", names)
    wr = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(wr), wr)
    return hessian_by_double_backward(f, w), g.detach()


def _fraction(H, g, k):
    _, vecs = torch.linalg.eigh(H)
    V = vecs[:, -k:]
    return float((V.T @ g).pow(2).sum() / g.pow(2).sum())


@pytest.mark.parametrize("k", [1, 3, 4])
def test_overlap_matches_dense_eigenvectors(k):
    model, data = _tiny()
    H, g = _truth(model, data)
    truth = _fraction(H, g, k)
    problem = Problem(model, "cross_entropy", data)
    entry, res = gradient_overlap(cs.hessian(problem), problem.loss_and_grad()[1], k, tol=TOL)
    assert entry.k == k and res.eigenvalues.shape[0] == k + 1
    assert abs(entry.fraction - truth) < 1e-8
    assert entry.lower <= truth <= entry.upper
    assert entry.error_bound < 1e-6 and entry.gap is not None and entry.gap > 0
    assert abs(sum(entry.components) - entry.fraction) < 1e-12
    assert abs(entry.grad_norm - float(g.norm())) < 1e-12


def test_loose_tolerance_interval_still_contains_the_truth():
    """Few products: a wide interval, which must still hold the dense fraction."""
    model, data = _tiny(seed=1)
    H, g = _truth(model, data)
    truth = _fraction(H, g, 2)
    evals, vecs = torch.linalg.eigh(H)
    # perturbed Ritz data: vectors rotated a little towards the rest of the spectrum
    V = vecs[:, [-1, -2, -3]].clone()
    V[:, :2] += 1e-3 * vecs[:, :2]
    V = torch.linalg.qr(V)[0]
    theta, S = torch.linalg.eigh(V.T @ H @ V)  # Rayleigh-Ritz in the perturbed subspace
    theta, V = theta.flip(0), (V @ S).flip(1)
    resid = torch.linalg.vector_norm(H @ V - V * theta, dim=0)
    entry = overlap_from_ritz(theta, V, resid, resid, torch.tensor([True] * 3), g, 2)
    assert entry.error_bound > 1e-5
    assert entry.lower <= truth <= entry.upper
    # an unconverged (k+1)-th pair leaves the gap unknown: the interval is [0, 1]
    loose = overlap_from_ritz(theta, V, resid, resid, torch.tensor([True, True, False]), g, 2)
    assert loose.gap is None and (loose.lower, loose.upper) == (0.0, 1.0)


def test_spectrum_entries_per_block_and_top_raised():
    model, data = _tiny()
    problem = Problem(model, "cross_entropy", data)
    res = spectrum(operators(problem), blocks="per-layer", top=2, bottom=0, tol=TOL,
                   gradient_overlap=3)
    assert [e.block for e in res.gradient_overlap] == ["0", "2"]
    assert all(len(e.eigenvalues) == 4 for e in res.spectra)  # top raised to k + 1
    assert any("top raised from 2 to 4" in n for n in res.notes)
    slices = problem.param_slices()
    for entry in res.gradient_overlap:
        names = problem.module_blocks()[entry.block]
        H, g = _truth(model, data, names)
        truth = _fraction(H, g, 3)
        assert entry.k == 3 and abs(entry.fraction - truth) < 1e-8
        assert entry.lower <= truth <= entry.upper
        lo, hi = slices[names[0]].start, slices[names[-1]].stop
        assert hi - lo == g.numel()
    assert "gradient_overlap" in res.to_results()
    assert "gradient_overlap" not in spectrum(operators(problem), top=1, bottom=0).to_results()


def test_plain_operator_needs_a_gradient():
    model, data = _tiny()
    H, g = _truth(model, data)
    with pytest.raises(OptionError, match="gradient"):
        spectrum({"dense": H}, top=2, bottom=0, gradient_overlap=1)
    res = spectrum({"dense": H}, top=2, bottom=0, gradient_overlap=1, gradient=g, tol=TOL)
    assert abs(res.gradient_overlap[0].fraction - _fraction(H, g, 1)) < 1e-8
