import dataclasses
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from curvscope import CurvscopeError
from curvscope.io import make_document, read_document, write_atomic, write_document


def _doc(results):
    return make_document(
        "spectrum",
        input={"loss": "mse"},
        settings={"top": 2},
        results=results,
        timings={"total_s": 1.0},
        counts={"matvecs": 3, "data_passes": 4},
    )


def test_non_finite_values_become_null_with_a_note(tmp_path):
    doc = _doc({"values": [1.0, float("nan"), math.inf], "t": torch.tensor([2.0, float("inf")])})
    path = write_document(doc, tmp_path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["results"]["values"] == [1.0, None, None]
    assert back["results"]["t"] == [2.0, None]
    assert any("$.results.values[1]" in n for n in back["notes"])
    assert read_document(path)["schema"] == "curvscope.result/1"


def test_atomic_write_leaves_no_partial_file_and_normal_permissions(tmp_path):
    path = write_atomic(tmp_path / "a" / "x.json", "{}")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "a" / "y.json", object())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json"]


def test_read_document_errors(tmp_path):
    with pytest.raises(CurvscopeError, match="does not exist"):
        read_document(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CurvscopeError, match="not a readable JSON"):
        read_document(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"schema": "x"}')
    with pytest.raises(CurvscopeError, match="not a curvscope result document"):
        read_document(tmp_path / "other.json")


KILL_MID_WRITE = """
import os, signal, sys
from curvscope.io import SCHEMA, write_document

out, first = sys.argv[1], sys.argv[2] == "first"
if first:
    write_document({"schema": SCHEMA, "command": "spectrum", "run": 1}, out)

real_fdopen = os.fdopen


class HalfThenKilled:
    # writes half of the document, then the process is killed (SIGKILL: no cleanup runs)
    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)


os.fdopen = lambda fd, mode, **kw: HalfThenKilled(real_fdopen(fd, mode, **kw))
write_document({"schema": SCHEMA, "command": "spectrum", "run": 2, "pad": "x" * 200_000}, out)
print("not killed")
"""


@pytest.mark.parametrize("previous", [True, False], ids=["previous-file", "no-file"])
def test_a_run_killed_while_writing_leaves_the_previous_document_or_none(tmp_path, previous):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE, str(tmp_path), "first" if previous else "none"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert res.returncode == -signal.SIGKILL, res.stderr
    path = tmp_path / "spectrum.json"
    if previous:
        assert read_document(path)["run"] == 1  # whole, and the earlier one
    else:
        assert not path.exists()
    # only the hidden temporary file holds the half-written text
    assert all(p.name.startswith(".spectrum.json.") for p in tmp_path.iterdir() if p != path)


# ---------------------------------------------------------------- Ctrl-C keeps what finished
def _interrupt_when(predicate):
    def progress(done, total, description):
        if predicate(done, description):
            raise KeyboardInterrupt

    return progress


def _mlp_problem():
    from curvscope import Problem
    from tests import cases

    model, loss, data, reduction = cases.build(cases.CASES[0])
    return Problem(model, loss, data, reduction=reduction)


def test_interrupted_spectrum_keeps_the_finished_blocks():
    from curvscope import Interrupted
    from curvscope.diagnostics import spectrum

    from .cases import operators

    prob = _mlp_problem()
    ops = operators(prob)
    blocks = prob.block_names()[:2]
    with pytest.raises(Interrupted) as stop:
        spectrum(
            ops,
            blocks=blocks,
            top=2,
            bottom=1,
            tol=1e-10,
            progress=_interrupt_when(lambda done, what: blocks[1] in what and done == 4),
        )
    part = stop.value.partial
    done = [e for e in part.spectra if e.block == blocks[0]]
    assert len(done) == 2 and all(all(e.converged) for e in done)
    # the block cut after 4 Lanczos steps keeps its Ritz values, not converged, with
    # the residual estimate and no bound (issue 24 item 3)
    cut = [e for e in part.spectra if e.block == blocks[1]]
    assert cut and not any(any(e.converged) for e in cut)
    assert all(e.error_bounds is None and len(e.residual_norms) for e in cut)
    assert any("interrupted during Lanczos" in n for n in part.notes)
    assert "interrupted" in part.notes[-1]
    full = spectrum(ops, blocks=blocks[:1], top=2, bottom=1, tol=1e-10)
    assert [e.eigenvalues for e in done] == [e.eigenvalues for e in full.spectra]


def test_an_interrupted_lanczos_keeps_its_ritz_values_with_residual_estimates():
    """Stopped after 30 steps on a 200 x 200 matrix, the Ritz values at hand are returned,
    not converged, each within its residual estimate of an eigenvalue (Lanczos relation)."""
    from curvscope import Interrupted
    from curvscope.linalg import DenseOperator, eigsh

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    ev = torch.linspace(-1.0, 10.0, 200, dtype=torch.float64)
    A = DenseOperator((Q * ev) @ Q.T)

    def stop_at_30(done, total, what):
        if done == 30:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as stop:
        eigsh(A, top=3, bottom=1, tol=1e-14, progress=stop_at_30, seed=0)
    top, bottom = stop.value.partial
    assert (top.which, bottom.which) == ("top", "bottom")
    assert not top.converged.any() and not bottom.converged.any()
    assert top.num_matvecs == 30 and top.error_bounds is None
    for r in (top, bottom):
        for lam, res in zip(r.eigenvalues, r.residual_norms, strict=True):
            assert float((ev - lam).abs().min()) <= float(res) + 1e-12
        measured = (A @ r.eigenvectors) - r.eigenvectors * r.eigenvalues
        assert torch.allclose(measured.norm(dim=0), r.residual_norms, rtol=1e-6, atol=1e-12)


def test_interrupted_surface_keeps_the_evaluated_points():
    import math

    from curvscope import Interrupted
    from curvscope.diagnostics import surface

    prob = _mlp_problem()
    full = surface(prob, dims=1, directions="random", steps=10, seed=0, chunk_size=4)
    with pytest.raises(Interrupted) as stop:  # 2 batches: chunk 2 starts at progress 3
        surface(
            prob,
            dims=1,
            directions="random",
            steps=10,
            seed=0,
            chunk_size=4,
            progress=_interrupt_when(lambda done, what: what == "surface" and done == 3),
        )
    part = stop.value.partial
    assert part.loss[:4] == full.loss[:4]
    assert all(math.isnan(v) for v in part.loss[4:])
    assert part.quadratic_model is None and part.num_non_finite == 0
    assert "after 4 of 10 grid points" in part.notes[-1]


def test_ctrl_c_writes_a_partial_document_and_exits_130(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import curvscope.diagnostics._spectrum as spectrum_module
    from curvscope.cli import app

    _tiny_checkpoint(tmp_path)
    _interrupt_nth(monkeypatch, spectrum_module, "eigsh", 2)
    res = CliRunner().invoke(
        app, ["spectrum", str(tmp_path / "model.pt"), "--per-layer", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 130, res.output
    doc = json.loads((tmp_path / "o" / "spectrum.json").read_text())
    assert doc["complete"] is False
    blocks = {s["block"] for s in doc["results"]["spectra"]}
    assert len(blocks) == 1 and doc["counts"]["matvecs"] > 0


def _tiny_checkpoint(tmp_path):
    from curvscope.io import build_arch, save_checkpoint

    arch = {"type": "mlp", "sizes": [4, 6, 3], "activation": "tanh", "bias": True}
    torch.manual_seed(0)
    g = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x=g.normal(size=(20, 4)).astype(np.float32),
        y=g.integers(0, 3, size=20),
    )
    save_checkpoint(
        tmp_path / "model.pt", build_arch(arch), arch, {"data": "data.npz", "loss": "cross_entropy"}
    )
    return tmp_path / "model.pt"


def _interrupt_nth(monkeypatch, module, name, n):
    """Make the n-th call of ``module.name`` raise KeyboardInterrupt (Ctrl-C mid-run)."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_ctrl_c_in_compare_check_and_solve_keeps_what_finished(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import curvscope.diagnostics._check as check_module
    import curvscope.diagnostics._compare as compare_module
    import curvscope.solvers._driver as driver_module
    from curvscope.cli import app

    model = str(_tiny_checkpoint(tmp_path))
    runner = CliRunner()
    # compare: stopped in the second layer's reference; the first layer's rows are kept
    _interrupt_nth(monkeypatch, compare_module, "_reference", 2)
    res = runner.invoke(
        app, ["compare", model, "--matrix", "ggn,kfac", "--out", str(tmp_path / "c")]
    )
    assert res.exit_code == 130, res.output
    doc = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert doc["complete"] is False
    rows = doc["results"]["comparisons"]
    assert {r["block"] for r in rows} == {"0"} and {r["matrix"] for r in rows} == {"ggn", "kfac"}
    assert "interrupted" in doc["notes"][-1]
    # check: stopped in the convexity certificate; gradient and Taylor tests are kept
    _interrupt_nth(monkeypatch, check_module, "convexity_certificate", 1)
    res = runner.invoke(app, ["check", model, "--out", str(tmp_path / "k")])
    assert res.exit_code == 130, res.output
    doc = json.loads((tmp_path / "k" / "check.json").read_text())
    assert doc["complete"] is False
    assert [c["name"] for c in doc["results"]["checks"]] == ["gradient", "taylor"]
    # solve: Ctrl-C in the first solver's 4th step; its first iterations are kept, the
    # second solver does not start
    steps = []
    real_run = driver_module._run

    def run(spec, *args, **kwargs):
        step = spec.step

        def counted(*a, **k):
            steps.append(1)
            if len(steps) == 4:
                raise KeyboardInterrupt
            return step(*a, **k)

        return real_run(dataclasses.replace(spec, step=counted), *args, **kwargs)

    monkeypatch.setattr(driver_module, "_run", run)
    res = runner.invoke(
        app,
        ["solve", model, "--solver", "gd,lbfgs", "--max-iter", "10", "--out", str(tmp_path / "s")],
    )
    assert res.exit_code == 130, res.output
    doc = json.loads((tmp_path / "s" / "solve.json").read_text())
    assert doc["complete"] is False
    (run_doc,) = doc["results"]["solves"]
    assert run_doc["stop_reason"] == "interrupted" and len(run_doc["trace"]["iteration"]) >= 3
    assert "not run: lbfgs" in doc["notes"][-1]


def test_ctrl_c_in_lanczos_prints_and_keeps_the_ritz_values(tmp_path, monkeypatch):
    """The CLI's table and partial document hold the interrupted Lanczos's Ritz values."""
    from typer.testing import CliRunner

    import curvscope.linalg._restarted as restarted
    from curvscope.cli import app

    _tiny_checkpoint(tmp_path)
    real, calls = restarted.orthogonalise, []

    def stop_at_six(*args, **kwargs):  # Ctrl-C during the sixth Lanczos step
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(restarted, "orthogonalise", stop_at_six)
    res = CliRunner().invoke(app, ["spectrum", str(tmp_path / "model.pt"), "--top", "2",
                                   "--bottom", "1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 130, res.output
    doc = json.loads((tmp_path / "o" / "spectrum.json").read_text())
    assert doc["complete"] is False
    (top,) = [s for s in doc["results"]["spectra"] if s["which"] == "top"]
    assert len(top["eigenvalues"]) == 2 and not any(top["converged"])
    assert "interrupted during Lanczos" in " ".join(doc["notes"])
    assert f"{top['eigenvalues'][0]: .6g}".strip() in res.output  # the table was printed
