"""``curvscope density`` through typer's CliRunner, with loading patched to a tiny problem."""

import json

import pytest
import torch
from typer.testing import CliRunner

from curvscope import Problem
from curvscope.cli import app
from curvscope.cli import density as density_cmd
from curvscope.cli._common import Session
from curvscope.problem import InputRecord

from .cases import CASES, build
from .truth import dense_hessian

runner = CliRunner()


@pytest.fixture
def patched(monkeypatch):
    model, loss, data, reduction = build(CASES[0])
    truth = dense_hessian(model, loss, data, reduction)
    seen = {}

    def fake_open(common, **_):
        seen["common"] = common
        info = {
            "model": {"path": str(common.model_path), "sha256": "0" * 64},
            "loss": loss,
            "reduction": reduction,
            "dtype": "float64",
        }
        problem = Problem(model, loss, data, reduction=reduction,
                          record=InputRecord(info=info, notes=[]))
        return Session(problem, common)

    monkeypatch.setattr(density_cmd, "open_session", fake_open)
    return truth, seen


def test_density_command_writes_document(patched, tmp_path):
    truth, seen = patched
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "density",
            "model.pt",
            "--probes",
            "3",
            "--lanczos-steps",
            "10",
            "--trace-probes",
            "9",
            "--per-layer",
            "--out",
            str(out),
            "--seed",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "hutchpp" in res.output and "Spectral density" in res.output
    assert seen["common"].seed == 4
    doc = json.loads((out / "density.json").read_text())
    assert doc["command"] == "density"
    assert doc["settings"]["probes"] == 3 and doc["settings"]["blocks"] == "per-layer"
    dens = doc["results"]["densities"]
    assert [d["block"] for d in dens] == ["0", "2"]
    for d in dens:
        assert {"matrix", "block", "grid", "density", "sigma", "nodes", "weights"} <= set(d)
        assert len(d["nodes"]) == 3
    traces = doc["results"]["traces"]
    assert {t["estimator"] for t in traces} == {"hutchinson", "hutchpp", "exact"}
    exact = sum(t["estimate"] for t in traces if t["estimator"] == "exact")
    assert exact == pytest.approx(float(torch.trace(truth)), rel=1e-12)
    assert doc["counts"]["matvecs"] == sum(d["num_matvecs"] for d in dens) + sum(
        t["num_matvecs"] for t in traces
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--matrix", "nope"], "--matrix 'nope' is not known"),
        (["--per-layer", "--per-param"], "exclude each other"),
        (["--distribution", "normal"], "--distribution 'normal' is not known"),
        (["--sigma", "0"], "--sigma must be positive"),
        (["--probes", "0"], "--probes must be at least 1"),
        (["--trace-probes", "2"], "--trace-probes must be 0"),
    ],
)
def test_density_command_errors(patched, tmp_path, args, message):
    res = runner.invoke(app, ["density", "model.pt", "--out", str(tmp_path), *args])
    assert res.exit_code == 1
    assert message in " ".join(res.output.split())
