"""The preconditioned sharpness of adaptive optimisers (Cohen et al. 2022, arXiv 2207.14484).

Every preconditioned eigenvalue is checked against ``eigvalsh`` of ``P^-1/2 H P^-1/2`` built
by hand in float64 from a real optimiser state after a few steps (``exp_avg_sq``, ``step``,
``betas``, ``eps`` read here, not through curvscope), and ``P`` against the step the
optimiser took; a training run with ``Tracker(optimizer=...)`` must give bit-identical
weights and optimiser state to one without.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import curvscope as cs
from curvscope._errors import CheckpointError, OptionError
from curvscope.cli import app
from curvscope.io import build_arch, read_preconditioner, save_checkpoint

from .truth import dense_hessian

runner = CliRunner()
ARCH = {"type": "mlp", "sizes": [4, 5, 3], "activation": "tanh", "bias": True}
TOL = 1e-10


def _data(tmp_path=None):
    g = np.random.default_rng(0)
    x = g.normal(size=(17, 4)).astype(np.float32)
    y = g.integers(0, 3, size=17)
    if tmp_path is not None:
        np.savez(tmp_path / "data.npz", x=x, y=y)
    return torch.from_numpy(x).double(), torch.from_numpy(y).long()


def _adam_p(opt, model):
    """P = sqrt(v / (1 - beta2^t)) + eps, by hand from the optimiser's own state (float64)."""
    (group,) = opt.param_groups
    _, beta2 = group["betas"]
    out = []
    for p in model.parameters():
        st = opt.state[p]
        t = int(st["step"])
        v = st["exp_avg_sq"].double()
        out.append(((v / (1 - beta2**t)).sqrt() + group["eps"]).reshape(-1))
    return torch.cat(out)


def _sym(H, p):
    s = p.rsqrt()
    return s[:, None] * H * s[None, :]


def _train(opt_cls, steps=5, **kw):
    x, y = _data()
    torch.manual_seed(0)
    model = build_arch(ARCH).double()
    opt = opt_cls(model.parameters(), **kw)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x, y


# ---------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (torch.optim.AdamW, {"lr": 0.02, "weight_decay": 0.1}),
        (torch.optim.Adam, {"lr": 0.02, "weight_decay": 0.05, "betas": (0.8, 0.95)}),
    ],
    ids=["adamw", "adam-weight-decay"],
)
def test_preconditioned_hessian_against_dense_float64(opt_cls, kw, tmp_path):
    model, opt, x, y = _train(opt_cls, **kw)
    p = _adam_p(opt, model)
    # P is what the optimiser divides by: one more step is -lr/(1-b1^t) m / P (AdamW also
    # shrinks by lr*wd first; Adam's L2 term is inside the gradient, hence inside m and v)
    before = torch.cat([q.detach().reshape(-1) for q in model.parameters()]).clone()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    after = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    (group,) = opt.param_groups
    b1 = group["betas"][0]
    t = int(opt.state[next(iter(model.parameters()))]["step"])
    m = torch.cat([opt.state[q]["exp_avg"].reshape(-1) for q in model.parameters()])
    p = _adam_p(opt, model)
    decay = group["lr"] * group["weight_decay"] * before if opt_cls is torch.optim.AdamW else 0
    step = -(group["lr"] / (1 - b1**t)) * m / p - decay
    assert torch.allclose(after - before, step, rtol=1e-12, atol=1e-15)

    prob = cs.load(model, [(x, y)], loss="cross_entropy", dtype="float64")
    pre = cs.preconditioner(opt, prob)
    assert pre.optimizer == ("AdamW" if opt_cls is torch.optim.AdamW else "Adam")
    assert pre.step == 6 and pre.source == "optimizer"
    assert torch.allclose(pre.diagonal(prob.names), p, rtol=1e-15, atol=0)
    assert pre.thresholds == [pytest.approx((2 + 2 * b1) / ((1 - b1) * group["lr"]))]

    H = dense_hessian(model, "cross_entropy", [(x, y)], "mean")
    M = _sym(H, p)
    ev = torch.linalg.eigvalsh(M)
    # the same eigenvalues as P^-1 H (similar matrices)
    ev_direct = torch.linalg.eigvals(torch.diag(1 / p) @ H).real.sort().values
    assert torch.allclose(ev, ev_direct, rtol=0, atol=1e-9 * float(ev.abs().max()))
    scale = float(ev.abs().max())
    A = cs.preconditioned(cs.hessian(prob), pre)
    assert A.name == "preconditioned hessian" and A.SELF_ADJOINT
    top, bottom = cs.lanczos(A, top=3, bottom=2, tol=TOL)
    assert np.allclose(top.eigenvalues, ev.flip(0)[:3], rtol=0, atol=1e-9 * scale)
    assert np.allclose(bottom.eigenvalues, ev[:2], rtol=0, atol=1e-9 * scale)
    assert (top.residual_norms < 1e-8 * scale).all() and top.converged.all()
    err = (top.eigenvalues - ev.flip(0)[:3]).abs()
    assert (err <= top.error_bounds + 1e-13 * scale).all()
    # blocks follow the Hessian's: P restricted to the block
    n0 = 4 * 5 + 5
    assert torch.allclose(A.block("0").dense(), M[:n0, :n0], rtol=0, atol=1e-12 * scale)
    assert torch.allclose(A.block("2.bias").dense(), M[-3:, -3:], rtol=0, atol=1e-12 * scale)
    assert torch.allclose(A.dense(), M, rtol=0, atol=1e-12 * scale)

    # the same state saved the way a training script saves it, read back from the file
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    named = [(n, q.shape) for n, q in model.named_parameters()]
    from_file = read_preconditioner(tmp_path / "c.pt", named, source="checkpoint")
    assert from_file.key == "optimizer" and from_file.step == 6
    assert torch.equal(from_file.diagonal(prob.names), pre.diagonal(prob.names))
    rec = from_file.to_dict()
    assert rec["betas"] == list(group["betas"]) and rec["eps"] == group["eps"]
    assert rec["lrs"] == [group["lr"]] and rec["weight_decay"] == group["weight_decay"]


def test_rmsprop_and_adagrad_preconditioners_match_their_steps():
    for cls, kw in (
        (torch.optim.RMSprop, {"lr": 0.01, "centered": True}),
        (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    ):
        model, opt, x, y = _train(cls, steps=3, **kw)
        prob = cs.load(model, [(x, y)], loss="cross_entropy", dtype="float64")
        before = torch.cat([q.detach().reshape(-1) for q in model.parameters()]).clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        g = torch.cat([q.grad.reshape(-1) for q in model.parameters()]).clone()
        opt.step()
        after = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
        pre = cs.preconditioner(opt, prob)
        lr = pre.groups[0].lr  # Adagrad: the decayed rate of the step just taken
        assert torch.allclose(after - before, -lr * g / pre.diagonal(prob.names), rtol=1e-10)
        assert pre.thresholds == [pytest.approx(2 / lr)]


def test_sgd_gives_its_threshold_and_no_preconditioner():
    model, opt, x, y = _train(torch.optim.SGD, lr=0.1, momentum=0.9)
    prob = cs.load(model, [(x, y)], loss="cross_entropy", dtype="float64")
    pre = cs.preconditioner(opt, prob)
    assert not pre.preconditions and pre.to_dict()["threshold_applies_to"] == "raw"
    assert pre.thresholds == [pytest.approx(2 * 1.9 / 0.1)]
    assert pre.thresholds[0] == pytest.approx(cs.stability_threshold(0.1, 0.9))


def test_groups_map_by_position_or_by_recorded_names(tmp_path):
    x, y = _data()
    torch.manual_seed(0)
    model = build_arch(ARCH).double()
    params = dict(model.named_parameters())
    # groups in the model's order, different learning rates: one threshold per group
    opt = torch.optim.Adam(
        [{"params": [params["0.weight"], params["0.bias"]], "lr": 0.01},
         {"params": [params["2.weight"], params["2.bias"]], "lr": 0.02}]
    )
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    named = [(n, q.shape) for n, q in model.named_parameters()]
    pre = cs.io.preconditioner_from_state(opt.state_dict(), named)
    assert pre.thresholds == [pytest.approx(3800.0), pytest.approx(1900.0)]
    assert [g.params for g in pre.groups] == [("0.weight", "0.bias"), ("2.weight", "2.bias")]
    assert any("one line per group" in n for n in pre.notes)
    # groups out of the model's order cannot be mapped by position: refused by shape
    swapped = torch.optim.Adam(
        [{"params": [params["2.weight"], params["2.bias"]]},
         {"params": [params["0.weight"], params["0.bias"]]}]
    )
    nn.functional.cross_entropy(model(x), y).backward()
    swapped.step()
    with pytest.raises(OptionError, match="does not match the model's parameters"):
        cs.io.preconditioner_from_state(swapped.state_dict(), named)
    # ...but by the names torch records when the optimiser is given named parameters
    named_opt = torch.optim.Adam(
        [{"params": [("2.weight", params["2.weight"]), ("2.bias", params["2.bias"])]},
         {"params": [("0.weight", params["0.weight"]), ("0.bias", params["0.bias"])]}]
    )
    named_opt.step()
    pre = cs.io.preconditioner_from_state(named_opt.state_dict(), named)
    live = cs.io.preconditioner_from_optimizer(named_opt, model)
    for n in params:
        assert torch.equal(pre.diagonals[n], live.diagonals[n])


def test_refusals_name_what_is_missing(tmp_path):
    model, opt, x, y = _train(torch.optim.Adam, steps=2, lr=0.01)
    named = [(n, q.shape) for n, q in model.named_parameters()]
    torch.save({"model": model.state_dict()}, tmp_path / "noopt.pt")
    with pytest.raises(CheckpointError, match="holds no optimiser state.*keys are 'model'"):
        read_preconditioner(tmp_path / "noopt.pt", named, diagonals=False)
    torch.save({"model": model.state_dict(), "o": opt.state_dict()}, tmp_path / "key.pt")
    assert read_preconditioner(tmp_path / "key.pt", named, optimizer_key="o").key == "o"
    with pytest.raises(CheckpointError, match="no key 'nope'"):
        read_preconditioner(tmp_path / "key.pt", named, optimizer_key="nope")
    # a state of another model: its count, or a shape
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with pytest.raises(OptionError, match="state of 0.weight has shape"):
        cs.io.preconditioner_from_state(
            opt.state_dict(), [(n, q.shape) for n, q in other.named_parameters()]
        )
    with pytest.raises(OptionError, match="hold 4 parameters, the model 2"):
        cs.io.preconditioner_from_state(opt.state_dict(), named[:2])
    # a parameter the optimiser never stepped
    sd = opt.state_dict()
    del sd["state"][3]
    with pytest.raises(OptionError, match="no optimiser state for parameter 2.bias"):
        cs.io.preconditioner_from_state(sd, named)
    # an optimiser whose preconditioner is not read
    nadam = torch.optim.NAdam(model.parameters())
    with pytest.raises(OptionError, match="NAdam"):
        cs.io.preconditioner_from_state(nadam.state_dict(), named)
    # diagonals: a file name -> P
    diag = {n: torch.full(q.shape, 2.0) for n, q in model.named_parameters()}
    torch.save(diag, tmp_path / "diag.pt")
    pre = read_preconditioner(tmp_path / "diag.pt", named)
    assert pre.optimizer is None and torch.equal(pre.diagonals["0.bias"], diag["0.bias"].double())
    diag["0.bias"] = torch.zeros(5)
    torch.save(diag, tmp_path / "diag0.pt")
    with pytest.raises(OptionError, match="0.bias has entries that are not positive"):
        read_preconditioner(tmp_path / "diag0.pt", named)


# ---------------------------------------------------------------------------- commands
def _adam_checkpoints(tmp_path, steps=(4, 8), opt_cls=torch.optim.Adam, **kw):
    x, y = _data(tmp_path)
    torch.manual_seed(0)
    model = build_arch(ARCH)
    opt = opt_cls(model.parameters(), **(kw or {"lr": 0.01}))
    meta = {"data": "data.npz", "loss": "cross_entropy", "reduction": "mean"}
    states = {}
    for s in range(max(steps) + 1):
        if s in steps:
            save_checkpoint(tmp_path / f"ckpt-{s}.pt", model, ARCH, {**meta, "step": s},
                            optimizer=opt)
            states[s] = (build_arch(ARCH).double(), copy.deepcopy(opt.state_dict()))
            states[s][0].load_state_dict(model.state_dict())
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.float()), y).backward()
        opt.step()
    save_checkpoint(tmp_path / "noopt.pt", model, ARCH, meta)
    return states, x, y


def _truth(model, state, x, y):
    named = [(n, q.shape) for n, q in model.named_parameters()]
    (group,) = state["param_groups"]
    p = torch.cat([
        ((state["state"][i]["exp_avg_sq"].double() / (1 - group["betas"][1]
          ** int(state["state"][i]["step"]))).sqrt() + group["eps"]).reshape(-1)
        for i in range(len(named))
    ])
    H = dense_hessian(model, "cross_entropy", [(x, y)], "mean")
    return torch.linalg.eigvalsh(_sym(H, p)), torch.linalg.eigvalsh(H)


def test_spectrum_cli_preconditioned_document(tmp_path):
    states, x, y = _adam_checkpoints(tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(app, ["spectrum", str(tmp_path / "ckpt-8.pt"), "--preconditioner",
                              "checkpoint", "--dtype", "float64", "--tol", "1e-10", "--top", "2",
                              "--bottom", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "Preconditioner: Adam state at step 8" in res.output
    doc = json.loads((out / "spectrum.json").read_text())
    rec = doc["results"]["preconditioner"]
    assert rec["optimizer"] == "Adam" and rec["step"] == 8 and rec["source"] == "checkpoint"
    assert rec["betas"] == [0.9, 0.999] and rec["eps"] == 1e-8 and rec["lrs"] == [0.01]
    assert rec["thresholds"] == [pytest.approx(38 / 0.01)]
    assert doc["settings"]["preconditioner"] == "checkpoint"
    ev, _ = _truth(*states[8], x, y)
    scale = float(ev.abs().max())
    (top,) = [e for e in doc["results"]["spectra"] if e["which"] == "top"]
    (bottom,) = [e for e in doc["results"]["spectra"] if e["which"] == "bottom"]
    assert top["matrix"] == "preconditioned hessian"
    assert np.allclose(top["eigenvalues"], ev.flip(0)[:2], rtol=0, atol=1e-9 * scale)
    assert np.allclose(bottom["eigenvalues"], ev[:1], rtol=0, atol=1e-9 * scale)
    # a checkpoint without an optimiser state: one sentence naming what is missing
    res = runner.invoke(app, ["spectrum", str(tmp_path / "noopt.pt"), "--preconditioner",
                              "checkpoint", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1
    msg = " ".join(res.output.split())
    assert "holds no optimiser state" in msg and "--optimizer-key" in msg
    assert "Traceback" not in res.output


def test_track_cli_records_raw_and_preconditioned_sharpness(tmp_path):
    states, x, y = _adam_checkpoints(tmp_path)
    out = tmp_path / "curv"
    res = runner.invoke(app, ["track", str(tmp_path / "ckpt-*.pt"), "--preconditioner",
                              "checkpoint", "--dtype", "float64", "--tol", "1e-10", "--top", "2",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "track.json").read_text())
    rows = doc["results"]["track"]
    assert [r["step"] for r in rows] == [4, 8]
    for r in rows:
        ev, ev_raw = _truth(*states[r["step"]], x, y)
        for name, want in (("preconditioned hessian", ev), ("hessian", ev_raw)):
            scale = float(want.abs().max())
            assert np.allclose(r["eigenvalues"][name]["top"], want.flip(0)[:2], rtol=0,
                               atol=1e-9 * scale)
            assert max(r["residuals"][name]["top"]) < 1e-8 * scale
        assert r["optimizer"]["step"] == r["step"] and r["optimizer"]["optimizer"] == "Adam"
        assert r["optimizer"]["thresholds"] == [pytest.approx(3800.0)]
    assert (out / "figures" / "track_eigenvalues.png").is_file()
    from curvscope.report._figures import track_optimizer_thresholds

    (line,) = track_optimizer_thresholds(doc)
    assert line["label"].startswith("Adam 38/η") and np.allclose(line["y"], 3800.0)
    # a checkpoint without a state among them: refused before the first row
    res = runner.invoke(app, ["track", str(tmp_path / "ckpt-4.pt"), str(tmp_path / "noopt.pt"),
                              "--preconditioner", "checkpoint", "--out", str(tmp_path / "o3")])
    assert res.exit_code == 1 and "noopt.pt holds no optimiser state" in " ".join(
        res.output.split()
    )
    assert not (tmp_path / "o3" / "track.json").exists()


def test_track_of_sgd_checkpoints_draws_the_heavy_ball_threshold(tmp_path):
    _adam_checkpoints(tmp_path, opt_cls=torch.optim.SGD, lr=0.05, momentum=0.9)
    run = cs.track(str(tmp_path / "ckpt-*.pt"), preconditioner="checkpoint", top=1)
    for r in run.rows:
        assert list(r["eigenvalues"]) == ["hessian"]
        assert r["optimizer"]["optimizer"] == "SGD"
        assert r["optimizer"]["threshold_applies_to"] == "raw"
        assert r["optimizer"]["thresholds"] == [pytest.approx(2 * 1.9 / 0.05)]


# ---------------------------------------------------------------------------- Tracker
def _tracked_run(tracker_kw=None, steps=7):
    x, y = _data()
    x = x.float()
    torch.manual_seed(0)
    model = build_arch(ARCH)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    tracker = None
    if tracker_kw is not None:
        tracker = cs.Tracker(model, "cross_entropy", [(x, y)], optimizer=opt, **tracker_kw)
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if tracker is not None:
            tracker(step)
        opt.step()
    return model, opt, tracker


def test_tracker_with_optimizer_leaves_training_bit_identical(tmp_path):
    plain, opt_a, _ = _tracked_run()
    tracked, opt_b, tracker = _tracked_run(
        {"every": 3, "top": 1, "per_layer": True, "dtype": "float64", "out": tmp_path / "t"}
    )
    for (na, a), (nb, b) in zip(plain.named_parameters(), tracked.named_parameters(),
                                strict=True):
        assert na == nb and torch.equal(a, b), na
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for key, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][key]), (k, key)
    doc = json.loads((tmp_path / "t" / "track.json").read_text())
    rows = doc["results"]["track"]
    assert [r["step"] for r in rows] == [0, 3, 6]
    # before the first step there is no second moment: the row says why
    assert rows[0]["optimizer"]["preconditioned"] is False
    assert "no step" in rows[0]["optimizer"]["reason"]
    assert list(rows[0]["eigenvalues"]) == ["hessian"]
    for r in rows[1:]:
        assert list(r["eigenvalues"]) == ["hessian", "preconditioned hessian"]
        assert r["optimizer"]["optimizer"] == "AdamW" and r["optimizer"]["step"] == r["step"]
        assert set(r["per_layer_top"]) == {"hessian", "preconditioned hessian"}
        assert r["residuals"]["preconditioned hessian"]["top"][0] >= 0
    assert doc["settings"]["optimizer"] == "AdamW"


def test_tracker_preconditioned_value_against_dense(tmp_path):
    x, y = _data()
    torch.manual_seed(0)
    model = build_arch(ARCH).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
    tracker = cs.Tracker(model, "cross_entropy", [(x, y)], optimizer=opt, every=1, top=2,
                         bottom=1, tol=TOL)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    row = tracker(3)
    H = dense_hessian(model, "cross_entropy", [(x, y)], "mean")
    ev = torch.linalg.eigvalsh(_sym(H, _adam_p(opt, model)))
    scale = float(ev.abs().max())
    got = row["eigenvalues"]["preconditioned hessian"]
    assert np.allclose(got["top"], ev.flip(0)[:2], rtol=0, atol=1e-9 * scale)
    assert np.allclose(got["bottom"], ev[:1], rtol=0, atol=1e-9 * scale)
    assert any("weight_decay 0.01" in n for n in row["optimizer"]["notes"])


def test_tracker_refuses_an_optimizer_it_cannot_read():
    model = build_arch(ARCH)
    with pytest.raises(OptionError, match="NAdam"):
        cs.Tracker(model, "cross_entropy", [(torch.zeros(2, 4), torch.zeros(2).long())],
                   optimizer=torch.optim.NAdam(model.parameters()))
    other = nn.Linear(2, 2)
    with pytest.raises(OptionError, match="not one of the model's"):
        cs.Tracker(model, "cross_entropy", [(torch.zeros(2, 4), torch.zeros(2).long())],
                   optimizer=torch.optim.Adam(other.parameters()))
