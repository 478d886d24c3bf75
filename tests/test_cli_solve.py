"""``curvscope solve`` through typer's CliRunner, with loading patched to a tiny problem."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from curvscope import Problem
from curvscope.cli import app
from curvscope.cli import solve as solve_cmd
from curvscope.cli._common import Session

runner = CliRunner()


@pytest.fixture
def patched(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    seen = {}

    def fake_open(common, **_):
        seen["common"] = common
        problem = Problem(model, "cross_entropy", data)
        info = {
            "model": {"path": str(common.model_path), "sha256": "0" * 64},
            "loss": "cross_entropy",
            "reduction": "mean",
            "dtype": "float64",
        }
        problem.input_info = info
        problem.notes = []
        return Session(problem, common)

    monkeypatch.setattr(solve_cmd, "open_session", fake_open)
    return seen


def test_solve_command_writes_document(patched, tmp_path):
    out = tmp_path / "run"
    args = ["solve", "model.pt", "--solver", "lbfgs,newton-cg", "--max-iter", "3"]
    args += ["--curvature-every", "2", "--out", str(out), "--grad-tol", "0"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "lbfgs" in res.output and "newton-cg" in res.output
    doc = json.loads((out / "solve.json").read_text())
    assert doc["command"] == "solve"
    assert doc["settings"]["solver"] == ["lbfgs", "newton-cg"]
    solves = doc["results"]["solves"]
    assert [s["solver"] for s in solves] == ["lbfgs", "newton-cg"]
    for s in solves:
        assert {
            "solver",
            "settings",
            "trace",
            "findings",
            "final_loss",
            "final_grad_norm",
            "num_matvecs",
            "wall_time_s",
        } <= set(s)
        assert len(s["trace"]["iteration"]) == 4
        assert s["trace"]["hessian_max"][2] is not None
        assert all({"rule", "text", "evidence"} <= set(f) for f in s["findings"])
    assert solves[1]["num_matvecs"] > 0


def test_solve_command_refuses_unknown_solver(patched, tmp_path):
    res = runner.invoke(app, ["solve", "model.pt", "--solver", "adam", "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert "adam" in res.output
