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
from curvscope.problem import InputRecord

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
        info = {
            "model": {"path": str(common.model_path), "sha256": "0" * 64},
            "loss": "cross_entropy",
            "reduction": "mean",
            "dtype": "float64",
        }
        problem = Problem(model, "cross_entropy", data, record=InputRecord(info=info, notes=[]))
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


def _lbfgs_final_loss(out):
    doc = json.loads((out / "solve.json").read_text())
    (run,) = [s for s in doc["results"]["solves"] if s["solver"] == "lbfgs"]
    text = format(run["final_loss"], ".6g")
    assert "e-" in text  # the case of issue 14: 1.087e-06 printed as "1.087…"
    return text


@pytest.mark.parametrize("width", [60, 80])
def test_solve_table_keeps_every_number_on_a_narrow_terminal(patched, tmp_path, monkeypatch, width):
    import io

    from rich.console import Console

    from curvscope.cli import _common

    buf = io.StringIO()
    term = Console(file=buf, width=width, force_terminal=True, no_color=True)
    monkeypatch.setattr(_common, "console", term)
    out = tmp_path / "run"
    args = ["solve", "model.pt", "--solver", "lbfgs,gd", "--max-iter", "40", "--grad-tol", "0"]
    res = runner.invoke(app, [*args, "--curvature-every", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = buf.getvalue()
    assert _lbfgs_final_loss(out) in table
    assert "…" not in table


def test_solve_table_through_a_pipe_is_printed_at_full_width(patched, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # a pipe ignores the terminal's width
    out = tmp_path / "run"
    args = ["solve", "model.pt", "--solver", "lbfgs,gd", "--max-iter", "40", "--grad-tol", "0"]
    res = runner.invoke(app, [*args, "--curvature-every", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert _lbfgs_final_loss(out) in res.output and "…" not in res.output
    header = next(line for line in res.output.splitlines() if "final loss" in line)
    assert "grad norm" in header and "stop" in header  # one line: nothing wrapped
