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
    res = spectrum(
        operators(problem), blocks="per-layer", top=2, bottom=0, tol=TOL, gradient_overlap=3
    )
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


def test_tracker_rows_carry_the_overlap_of_every_measurement(tmp_path):
    model, data = _tiny(seed=2)
    tracker = cs.Tracker(
        model,
        "cross_entropy",
        data,
        every=2,
        top=2,
        tol=TOL,
        gradient_overlap=3,
        out=tmp_path / "t.json",
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = (torch.cat(t) for t in zip(*data, strict=True))
    for step in range(5):
        row = tracker.step(step)
        if row is not None:
            H, g = _truth(model, data)
            entry = row["gradient_overlap"]["hessian"]
            truth = _fraction(H, g, 3)
            assert entry["k"] == 3 and abs(entry["fraction"] - truth) < 1e-8
            assert entry["lower"] <= truth <= entry["upper"] and entry["error_bound"] < 1e-6
            assert len(row["eigenvalues"]["hessian"]["top"]) == 4
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert tracker.settings["gradient_overlap"] == 3
    with pytest.raises(OptionError, match="gradient_overlap"):
        cs.Tracker(model, "cross_entropy", data, gradient_overlap=-1)


def test_cli_spectrum_and_track_gradient_overlap(tmp_path):
    import json

    import numpy as np
    from typer.testing import CliRunner

    from curvscope.cli import app
    from curvscope.io import build_arch, save_checkpoint

    arch = {"type": "mlp", "sizes": [4, 6, 3], "activation": "tanh", "bias": True}
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x=rng.normal(size=(23, 4)).astype(np.float32),
        y=rng.integers(0, 3, size=23),
    )
    meta = {"data": "data.npz", "loss": "cross_entropy", "reduction": "mean"}
    for step in (0, 1):
        torch.manual_seed(step)
        save_checkpoint(
            tmp_path / f"ckpt-{step}.pt", build_arch(arch), arch, {**meta, "step": step}
        )
    runner = CliRunner()
    common = ["--dtype", "float64", "--tol", "1e-10"]
    res = runner.invoke(
        app,
        [
            "spectrum",
            str(tmp_path / "ckpt-0.pt"),
            *common,
            "--top",
            "2",
            "--bottom",
            "0",
            "--gradient-overlap",
            "3",
            "--matrix",
            "hessian,ggn",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Gradient in the top-k eigenspace" in res.output
    doc = json.loads((tmp_path / "s" / "spectrum.json").read_text())
    entries = doc["results"]["gradient_overlap"]
    assert [(e["matrix"], e["k"]) for e in entries] == [("hessian", 3), ("ggn", 3)]
    assert doc["settings"]["gradient_overlap"] == 3
    assert all(e["lower"] <= e["fraction"] <= e["upper"] for e in entries)
    res = runner.invoke(
        app,
        [
            "track",
            str(tmp_path / "ckpt-*.pt"),
            *common,
            "--top",
            "1",
            "--gradient-overlap",
            "2",
            "--figures",
            "none",
            "--out",
            str(tmp_path / "t"),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "t" / "track.json").read_text())["results"]["track"]
    assert [r["gradient_overlap"]["hessian"]["k"] for r in rows] == [2, 2]
    assert "grad in top-2" in res.output


def test_tracker_per_layer_overlap_matches_dense_block_hessians(tmp_path):
    """`track --per-layer --gradient-overlap K`: each module's fraction of its own gradient
    part in the top-K eigenspace of its own Hessian block, against dense float64 truth."""
    model, data = _tiny(seed=3)
    problem = Problem(model, "cross_entropy", data)
    blocks = problem.module_blocks()
    tracker = cs.Tracker(
        model, "cross_entropy", data, every=1, top=1, tol=TOL, per_layer=True,
        gradient_overlap=2, out=tmp_path / "t.json",
    )
    row = tracker.step(0)
    per = row["per_layer_gradient_overlap"]["hessian"]
    assert set(per) == set(blocks) == {"0", "2"}
    for block, names in blocks.items():
        H, g = _truth(model, data, names)
        truth = _fraction(H, g, 2)
        entry = per[block]
        assert entry["k"] == 2 and abs(entry["fraction"] - truth) < 1e-8, (block, entry, truth)
        assert entry["lower"] <= truth <= entry["upper"] and entry["error_bound"] < 1e-6
        top = float(torch.linalg.eigvalsh(H)[-1])
        assert abs(row["per_layer_top"]["hessian"][block]["eigenvalue"] - top) < 1e-8
    # without --per-layer there is none
    plain = cs.Tracker(model, "cross_entropy", data, every=1, top=1, tol=TOL,
                       gradient_overlap=2, out=tmp_path / "p.json").step(0)
    assert "per_layer_gradient_overlap" not in plain
