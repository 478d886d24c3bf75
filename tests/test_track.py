"""``curvscope track`` and :class:`curvscope.Tracker`: curvature across training.

Every eigenvalue of a tracked run is checked against dense float64 eigenvalues at every
checkpoint; the warm start must give the same eigenvalues with no more products; a training
run with a tracker must give bit-identical weights to one without.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import curvscope as cs
from curvscope._errors import CheckpointError, OptionError
from curvscope._losses import get_loss
from curvscope.app import expand_checkpoints, order_checkpoints, stability_threshold, track
from curvscope.cli import app
from curvscope.io import build_arch, checkpoint_step, save_checkpoint, save_safetensors

from .truth import dense_hessian, full_loss_fn

runner = CliRunner()
ARCH = {"type": "mlp", "sizes": [4, 6, 3], "activation": "tanh", "bias": True}
N_PARAMS = 4 * 6 + 6 + 6 * 3 + 3
TOL = 1e-10
"""Residual tolerance of the float64 runs: eigenvalues then match dense ones to ~1e-12."""


def _data(tmp_path):
    g = np.random.default_rng(0)
    x = g.normal(size=(23, 4)).astype(np.float32)
    y = g.integers(0, 3, size=23)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    return torch.from_numpy(x), torch.from_numpy(y).long()


def _train_checkpoints(tmp_path, steps=(0, 10, 20, 30), lr=0.5, arch=ARCH, name="ckpt-{}.pt",
                       meta_step=True):
    """Full-batch GD on the tiny data; a curvscope checkpoint at each of ``steps``."""
    x, y = _data(tmp_path)
    torch.manual_seed(0)
    model = build_arch(arch)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    paths = []
    for s in range(max(steps) + 1):
        if s in steps:
            meta = {"data": "data.npz", "loss": "cross_entropy", "reduction": "mean"}
            if meta_step:
                meta["step"] = s
            paths.append(save_checkpoint(tmp_path / name.format(s), model, arch, meta))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return paths


def _dense(path, tmp_path):
    model = cs.io.load_checkpoint(path).model.double()
    with np.load(tmp_path / "data.npz") as f:
        x, y = torch.from_numpy(f["x"]).double(), torch.from_numpy(f["y"]).long()
    return model, [(x, y)]


def _dense_ggn(model, data):
    """G = J^T H_out J over the concatenated data: the definition, by torch.func."""
    x, y = data[0]
    names = [n for n, _ in model.named_parameters()]
    f, w = full_loss_fn(model, "cross_entropy", data, "mean", names)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]

    def outputs(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return torch.func.functional_call(model, ps, (x,)).reshape(-1)

    out = outputs(w).detach()
    loss = get_loss("cross_entropy")
    J = torch.func.jacrev(outputs)(w)
    H = torch.func.hessian(lambda o: loss(o.reshape(x.shape[0], -1), y, "mean"))(out)
    return (J.T @ H @ J).detach()


@pytest.fixture
def run_dir(tmp_path):
    _train_checkpoints(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------- numbers
def test_track_against_dense_float64_at_every_checkpoint(run_dir):
    run = track(
        str(run_dir / "ckpt-*.pt"), matrices="hessian,ggn", top=3, bottom=2, trace=True,
        trace_probes=3 * N_PARAMS, per_layer=True, dtype="float64", tol=TOL, batch_size=10,
        out=run_dir / "out",
    )
    rows = run.rows
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    on_disk = json.loads((run_dir / "out" / "track.json").read_text())
    assert on_disk["command"] == "track" and on_disk["schema"] == "curvscope.result/1"
    assert "complete" not in on_disk and len(on_disk["results"]["track"]) == 4
    for r in rows:
        model, data = _dense(r["checkpoint"], run_dir)
        assert r["sha256"] == cs.io.file_sha256(r["checkpoint"])
        f, w = full_loss_fn(model, "cross_entropy", data, "mean",
                            [n for n, _ in model.named_parameters()])
        wv = w.clone().requires_grad_(True)
        loss = f(wv)
        (g,) = torch.autograd.grad(loss, wv)
        assert r["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
        assert r["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
        for matrix, dense in (("hessian", dense_hessian(model, "cross_entropy", data, "mean")),
                              ("ggn", _dense_ggn(model, data))):
            ev = torch.linalg.eigvalsh(dense)
            scale = float(ev.abs().max())
            got = r["eigenvalues"][matrix]
            assert np.allclose(got["top"], ev.flip(0)[:3].numpy(), atol=1e-9 * scale, rtol=0)
            if matrix == "hessian":
                assert np.allclose(got["bottom"], ev[:2].numpy(), atol=1e-9 * scale, rtol=0)
            assert all(all(v) for v in r["converged"][matrix].values())
            # the error bounds hold
            err = np.abs(np.array(got["top"]) - ev.flip(0)[:3].numpy())
            assert (err <= np.array(r["error_bounds"][matrix]["top"]) + 1e-14 * scale).all()
            # the trace: Hutch++ with 3P products spans the space, so it is exact
            t = r["trace"][matrix]
            assert t["estimator"] == "hutchpp" and t["stderr"] == 0.0
            assert t["estimate"] == pytest.approx(float(dense.trace()), rel=1e-10)
            # per-layer top: the top eigenvalue of each module's own diagonal block
            sizes = {"0": 4 * 6 + 6, "2": 6 * 3 + 3}
            start = 0
            for block, size in sizes.items():
                sub = dense[start : start + size, start : start + size]
                start += size
                top = float(torch.linalg.eigvalsh(sub)[-1])
                assert r["per_layer_top"][matrix][block]["eigenvalue"] == pytest.approx(
                    top, abs=1e-9 * scale
                )
        assert r["num_matvecs"] >= r["num_matvecs_eigen"] > 0
    assert run.document["counts"]["matvecs"] == sum(r["num_matvecs"] for r in rows)


def test_warm_start_same_eigenvalues_with_no_more_products(run_dir):
    kw = {"top": 3, "bottom": 1, "dtype": "float64", "tol": TOL}
    warm = track(str(run_dir / "ckpt-*.pt"), compare_cold=True, **kw)
    cold = track(str(run_dir / "ckpt-*.pt"), warm_start=False, **kw)
    for rw, rc in zip(warm.rows, cold.rows, strict=True):
        for which in ("top", "bottom"):
            a = np.array(rw["eigenvalues"]["hessian"][which])
            b = np.array(rc["eigenvalues"]["hessian"][which])
            bound = np.array(rw["error_bounds"]["hessian"][which]) + np.array(
                rc["error_bounds"]["hessian"][which]
            )
            assert (np.abs(a - b) <= bound + 1e-14).all()
        # the cold products recorded by compare_cold are those of the cold run
        assert rw["num_matvecs_cold"] == rc["num_matvecs_eigen"]
    summary = warm.document["results"]["warm_start"]
    assert summary["enabled"] and summary["matvecs"] <= summary["matvecs_cold"]
    assert summary["matvecs_cold"] == sum(r["num_matvecs_eigen"] for r in cold.rows)
    assert summary["saving"] == pytest.approx(1 - summary["matvecs"] / summary["matvecs_cold"])
    assert summary["max_eigenvalue_difference"] < 1e-9
    # the first row has nothing to start from: the same products either way
    assert warm.rows[0]["num_matvecs_eigen"] == cold.rows[0]["num_matvecs_eigen"]
    assert cold.document["results"]["warm_start"]["matvecs_cold"] is None


def test_stability_threshold_is_where_heavy_ball_diverges():
    """2(1+beta)/eta against torch's own SGD with momentum on a 1-D quadratic."""

    def final(lam, lr, beta, steps=400):
        w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([w], lr=lr, momentum=beta)
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * lam * w * w).sum().backward()
            opt.step()
        return abs(float(w.detach()))

    for lr, beta in ((0.1, 0.0), (0.1, 0.9), (0.05, 0.5)):
        t = stability_threshold(lr, beta)
        assert t == pytest.approx(2 * (1 + beta) / lr)
        assert final(0.98 * t, lr, beta) < 1.0
        assert final(1.02 * t, lr, beta) > 1e3
    with pytest.raises(OptionError, match="lr"):
        stability_threshold(0.0)
    with pytest.raises(OptionError, match="momentum"):
        stability_threshold(0.1, 1.0)


# ---------------------------------------------------------------------------- ordering
def test_steps_are_read_from_meta_wrapped_dicts_and_names(tmp_path):
    model = build_arch(ARCH)
    save_checkpoint(tmp_path / "a-99.pt", model, ARCH, {"step": 7})
    assert checkpoint_step(tmp_path / "a-99.pt") == (7, "meta.step")
    save_safetensors(tmp_path / "s.safetensors", model, ARCH, {"step": 5})
    assert checkpoint_step(tmp_path / "s.safetensors") == (5, "meta.step")
    torch.save({"model_state_dict": model.state_dict(), "global_step": torch.tensor(44)},
               tmp_path / "w-3.pt")
    assert checkpoint_step(tmp_path / "w-3.pt") == (44, "global_step")
    torch.save({"state_dict": model.state_dict(), "epoch": 2}, tmp_path / "e.pt")
    assert checkpoint_step(tmp_path / "e.pt") == (2, "epoch")
    torch.save(model.state_dict(), tmp_path / "run3-step120.pt")
    assert checkpoint_step(tmp_path / "run3-step120.pt") == (120, "file name")
    torch.save(model.state_dict(), tmp_path / "final.pt")
    assert checkpoint_step(tmp_path / "final.pt") == (None, None)


def test_order_by_step_else_by_name_with_a_note(tmp_path):
    paths = _train_checkpoints(tmp_path, steps=(0, 5, 10), name="c{}.pt")
    # names sort as c0, c10, c5; the steps put c5 before c10
    ordered, by, notes = order_checkpoints(sorted(paths))
    assert by == "step" and [c.step for c in ordered] == [0, 5, 10]
    # a step that cannot be read: every checkpoint ordered by name, and a note says so
    torch.save(build_arch(ARCH).state_dict(), tmp_path / "final.pt")
    ordered, by, notes = order_checkpoints([*paths, tmp_path / "final.pt"])
    assert by == "name"
    assert [c.path.name for c in ordered] == ["c0.pt", "c5.pt", "c10.pt", "final.pt"]
    assert any("final.pt" in n and "ordered by file name" in n for n in notes)


def test_unreadable_step_orders_by_name_in_the_document(tmp_path):
    _train_checkpoints(tmp_path, steps=(0, 10), name="run-{}.pt", meta_step=False)
    (tmp_path / "run-0.pt").rename(tmp_path / "run-first.pt")
    run = track(str(tmp_path / "run-*.pt"), top=1)
    assert run.document["settings"]["order"] == "name"
    assert [r["step"] for r in run.rows] == [10, None]
    assert any("ordered by file name" in n for n in run.document["notes"])


def test_globs_and_duplicates(tmp_path):
    paths = _train_checkpoints(tmp_path, steps=(0, 10))
    got = expand_checkpoints([str(tmp_path / "ckpt-*.pt"), str(paths[0])])
    assert [p.name for p in got] == ["ckpt-0.pt", "ckpt-10.pt"]
    with pytest.raises(OptionError, match="matches no file"):
        expand_checkpoints([str(tmp_path / "nothing-*.pt")])


# ---------------------------------------------------------------------------- bad input
def test_different_architectures_name_the_first_that_differs(tmp_path):
    _train_checkpoints(tmp_path, steps=(0, 10))
    other = {**ARCH, "sizes": [4, 5, 3]}
    save_checkpoint(tmp_path / "ckpt-20.pt", build_arch(other), other, {"step": 20})
    relu = {**ARCH, "activation": "relu"}
    save_checkpoint(tmp_path / "ckpt-30.pt", build_arch(relu), relu, {"step": 30})
    with pytest.raises(CheckpointError, match="ckpt-20.pt does not hold the architecture of"):
        track(str(tmp_path / "ckpt-*.pt"))
    (tmp_path / "ckpt-20.pt").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt-30.pt .*'activation' is 'relu'"):
        track(str(tmp_path / "ckpt-*.pt"))


def test_cli_bad_input_is_one_sentence_exit_1(tmp_path):
    _train_checkpoints(tmp_path, steps=(0, 10))
    other = {**ARCH, "sizes": [4, 5, 3]}
    save_checkpoint(tmp_path / "ckpt-20.pt", build_arch(other), other, {"step": 20})
    cases = [
        ([str(tmp_path / "nothing-*.pt")], "matches no file"),
        ([str(tmp_path / "ckpt-*.pt")], "ckpt-20.pt does not hold the architecture"),
        ([str(tmp_path / "ckpt-0.pt"), "--momentum", "0.9"], "--momentum needs --lr"),
        ([str(tmp_path / "ckpt-0.pt"), "--lr", "-1"], "--lr must be a positive"),
        ([str(tmp_path / "ckpt-0.pt"), "--matrix", "nope"], "--matrix 'nope' is not known"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["track", *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 1, result.output
        text = " ".join(result.output.split())
        assert message in text and "Traceback" not in text


# ---------------------------------------------------------------------------- CLI
def test_track_cli_end_to_end_with_figures_and_report(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    result = runner.invoke(app, [
        "track", "ckpt-*.pt", "--top", "2", "--bottom", "1", "--trace", "--per-layer",
        "--lr", "0.5", "--momentum", "0.5", "--compare-cold", "--dtype", "float64",
        "--figures", "png,pdf", "--out", "curv",
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads((run_dir / "curv" / "track.json").read_text())
    rows = doc["results"]["track"]
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    stab = doc["results"]["stability"]
    assert stab["threshold"] == pytest.approx(2 * 1.5 / 0.5)
    assert stab["threshold_no_momentum"] == pytest.approx(4.0)
    assert doc["settings"]["top"] == 2 and doc["settings"]["trace"] == "hutchpp"
    assert set(rows[0]) >= {"step", "checkpoint", "sha256", "loss", "grad_norm", "eigenvalues",
                            "residuals", "error_bounds", "trace", "per_layer_top", "num_matvecs"}
    for stem in ("track_eigenvalues", "track_loss", "track_trace", "track_layers"):
        for ext in ("png", "pdf"):
            assert (run_dir / "curv" / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    assert "Warm start" in result.output
    report = runner.invoke(app, ["report", "--from", "curv"])
    assert report.exit_code == 0, report.output
    page = (run_dir / "curv" / "report.html").read_text()
    assert "Training: curvature across checkpoints" in page and "2(1+β)/η" in page
    assert "What was skipped" not in page


def test_track_cli_passes_options_to_the_library(tmp_path, monkeypatch):
    seen = {}

    def fake(checkpoints, data, **kw):
        seen.update(kw, checkpoints=checkpoints, data=data)
        raise OptionError("stop here.")

    monkeypatch.setattr("curvscope.app.track", fake)
    result = runner.invoke(app, ["track", "a.pt", "b.pt", "--matrix", "ggn", "--top", "4",
                                 "--bottom", "2", "--per-layer", "--cold-start", "--seed", "3",
                                 "--samples", "100", "--data", "digits"])
    assert result.exit_code == 1
    assert seen["checkpoints"] == ["a.pt", "b.pt"] and seen["data"] == "digits"
    assert seen["matrices"] == "ggn" and seen["top"] == 4 and seen["bottom"] == 2
    assert seen["per_layer"] and not seen["warm_start"] and seen["seed"] == 3
    assert seen["samples"] == 100 and seen["trace"] is False


def test_interrupted_track_keeps_its_curve(run_dir):
    def progress(done, total, what):
        if what == "checkpoints" and done == 2:  # the third checkpoint starts
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        track(str(run_dir / "ckpt-*.pt"), top=1, out=run_dir / "o", progress=progress)
    doc = json.loads((run_dir / "o" / "track.json").read_text())
    assert doc["complete"] is False
    assert [r["step"] for r in doc["results"]["track"]] == [0, 10]


# ---------------------------------------------------------------------------- Tracker
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def _train(tracker_kw=None, steps=12):
    """SGD with momentum, dropout, shuffled mini-batches and every RNG in use."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fixed = [(x[:20], y[:20]), (x[20:], y[20:])]
    tracker = cs.Tracker(model, "cross_entropy", fixed, **tracker_kw) if tracker_kw else None
    model.train()
    for step in range(steps):
        idx = torch.randperm(40)[:16]
        idx = idx[np.random.permutation(16)]
        _ = random.random()  # Python's generator is in use too
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if tracker is not None:
            grads = [p.grad.clone() for p in model.parameters()]
            tracker(step)  # between backward and step: gradients must survive untouched
            assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(),
                                                              strict=True))
            assert model.training and model.drop.training
        opt.step()
    state = opt.state_dict()["state"]
    tail = (torch.rand(3), random.random(), np.random.rand())
    return model, state, tail, tracker


def test_tracker_leaves_training_bit_identical(tmp_path):
    plain, state_a, tail_a, _ = _train()
    tracked, state_b, tail_b, tracker = _train(
        {"every": 4, "top": 2, "bottom": 1, "trace": True, "trace_probes": 9, "per_layer": True,
         "lr": 0.1, "momentum": 0.9, "out": tmp_path / "curv"}
    )
    for (na, a), (nb, b) in zip(plain.state_dict().items(), tracked.state_dict().items(),
                                strict=True):
        assert na == nb and torch.equal(a, b), na
    for k in state_a:
        assert torch.equal(state_a[k]["momentum_buffer"], state_b[k]["momentum_buffer"])
    assert torch.equal(tail_a[0], tail_b[0]) and tail_a[1:] == tail_b[1:]
    doc = json.loads((tmp_path / "curv" / "track.json").read_text())
    rows = doc["results"]["track"]
    assert [r["step"] for r in rows] == [0, 4, 8] == [r["step"] for r in tracker.rows]
    assert rows[0]["checkpoint"] is None and len(rows[0]["weights_sha256"]) == 64
    assert doc["results"]["stability"]["threshold"] == pytest.approx(2 * 1.9 / 0.1)
    assert doc["input"]["model"]["format"] == "module"


def test_tracker_rows_match_the_dense_hessian_and_the_json_file(tmp_path):
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(11, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (11,), generator=g)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    tracker = cs.Tracker(model, "cross_entropy", data, every=2, top=2, bottom=1, tol=TOL,
                         out=tmp_path / "t.json")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(5):
        row = tracker.step(step)
        assert (row is None) == (step % 2 == 1)
        if row is not None:
            ev = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", [(x, y)], "mean"))
            scale = float(ev.abs().max())
            assert np.allclose(row["eigenvalues"]["hessian"]["top"], ev.flip(0)[:2], rtol=0,
                               atol=1e-9 * scale)
            assert np.allclose(row["eigenvalues"]["hessian"]["bottom"], ev[:1], rtol=0,
                               atol=1e-9 * scale)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    doc = json.loads((tmp_path / "t.json").read_text())
    assert [r["step"] for r in doc["results"]["track"]] == [0, 2, 4]
    assert tracker.step(5, force=True)["step"] == 5


def test_tracker_in_float64_on_a_float32_model():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(9, 3, generator=g)
    y = torch.randint(0, 2, (9,), generator=g)
    tracker = cs.Tracker(model, "cross_entropy", [(x, y)], every=1, top=1, dtype="float64",
                         tol=TOL)
    before = [p.detach().clone() for p in model.parameters()]
    row = tracker(0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    ev = torch.linalg.eigvalsh(dense_hessian(model.double(), "cross_entropy",
                                             [(x.double(), y)], "mean"))
    assert row["eigenvalues"]["hessian"]["top"][0] == pytest.approx(float(ev[-1]), rel=1e-9)


def test_preserved_restores_flags_gradients_and_every_random_state():
    from curvscope.app import preserved

    model = _Net()
    model.train()
    model(torch.randn(2, 4)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    with preserved(model):
        model.eval()
        model.fc1.weight.requires_grad_(False)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(3.0)
        model.fc2.bias.grad = None
        torch.rand(7)
        random.random()
        np.random.rand(3)
        torch.set_grad_enabled(False)
    assert torch.is_grad_enabled()
    assert model.training and model.drop.training and model.fc1.weight.requires_grad
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(p.grad, v) for p, v in zip(model.parameters(), values, strict=True))
    got = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    want = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_tracker_bad_arguments():
    model = nn.Linear(2, 2)
    data = [(torch.randn(3, 2), torch.tensor([0, 1, 0]))]
    with pytest.raises(OptionError, match="every"):
        cs.Tracker(model, "cross_entropy", data, every=0)
    with pytest.raises(OptionError, match="momentum needs lr"):
        cs.Tracker(model, "cross_entropy", data, momentum=0.9)
    with pytest.raises(OptionError, match="device is the model's own"):
        cs.Tracker(model, "cross_entropy", data, device="cpu", dtype="float64")


def test_tracker_leaves_batchnorm_buffers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(12, 3)
    y = torch.randint(0, 2, (12,))
    model.train()
    model(x)  # running statistics move once, in training
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    tracker = cs.Tracker(model, "cross_entropy", [(x, y)], every=1, top=1)
    row = tracker(0)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(buffers[k], after[k]) for k in buffers)  # num_batches_tracked too
    assert len(row["weights_sha256"]) == 64


def test_track_row_without_a_matrix_has_a_dash_in_every_column_it_would_fill():
    """A row that lacks a matrix (its run failed or it was not asked at that checkpoint)
    fills each of that matrix's columns with "-", the gradient overlap's included, so the
    row has as many cells as the table has columns."""
    from curvscope.cli.track import _matrix_cells

    settings = {"bottom": 1, "trace": True, "gradient_overlap": 3}
    full = {
        "eigenvalues": {"hessian": {"top": [2.0], "bottom": [-1.0]}},
        "converged": {"hessian": {"top": [True], "bottom": [True]}},
        "trace": {"hessian": {"estimate": 3.0, "stderr": 0.1}},
        "gradient_overlap": {"hessian": {"fraction": 0.5, "lower": 0.4, "upper": 0.6}},
    }
    empty = {"eigenvalues": {}, "converged": {}}
    assert len(_matrix_cells(full, "hessian", settings)) == 4
    assert _matrix_cells(empty, "hessian", settings) == ["-"] * 4
