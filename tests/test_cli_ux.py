"""First impressions of the command line: start-up, checks before the work, progress, threads."""

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from curvscope.cli import _common, app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "scipy", "matplotlib", "plotly")

PROBE = """
import runpy, sys
sys.argv = ["curvscope", *sys.argv[1:]]
try:
    runpy.run_module("curvscope", run_name="__main__")
except SystemExit:
    pass
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print("HEAVY", heavy, file=sys.stderr)
"""


def _probe(*args):
    code = f"HEAVY = {HEAVY!r}\n" + PROBE
    res = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("HEAVY")]
    return res, line[-1] if line else res.stderr


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["spectrum", "--help"],
                                  ["solve", "--help"], ["report", "--help"]])
def test_version_and_help_import_no_torch(args):
    res, heavy = _probe(*args)
    assert heavy == "HEAVY []", heavy
    assert ("curvscope" in res.stdout) if args == ["--version"] else ("Usage" in res.stdout)


@pytest.mark.parametrize("args", [["spectrum", "missing.pt"], ["compare", "m.pt", "--matrix", "x"]])
def test_refusals_before_loading_import_no_torch(args):
    res, heavy = _probe(*args)
    assert heavy == "HEAVY []", heavy
    assert "error:" in res.stderr


def test_help_names_equal_the_registries():
    from curvscope.cli import _names
    from curvscope.diagnostics import COMPARE_MATRICES
    from curvscope.operators import MATRICES, matrix_help
    from curvscope.solvers import SOLVERS

    assert _names.MATRIX_NAMES == tuple(MATRICES)
    assert _names.matrix_help() == matrix_help()
    assert _names.COMPARE_MATRICES == tuple(COMPARE_MATRICES)
    assert sorted(_names.SOLVER_NAMES) == sorted(SOLVERS)
    from curvscope._examples import EXAMPLES

    assert list(_names.EXAMPLE_NAMES) == list(EXAMPLES)


# ------------------------------------------------------------------ checked before the work
@pytest.fixture
def no_loading(monkeypatch):
    """Loading fails the test: every refusal below must come before it."""
    import curvscope._load

    def boom(*a, **k):
        raise AssertionError("loaded before the refusal")

    monkeypatch.setattr(curvscope._load, "load", boom)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not read")
    return path


def test_out_naming_a_file_is_refused_before_loading(tmp_path, model, no_loading):
    (tmp_path / "results").write_text("a file")
    res = runner.invoke(app, ["spectrum", str(model), "--out", str(tmp_path / "results")])
    assert res.exit_code == 1
    assert "--out names a file, not a folder" in res.output
    res = runner.invoke(app, ["check", str(model), "--out", str(tmp_path / "results" / "sub")])
    assert res.exit_code == 1 and "is a file" in res.output
    res = runner.invoke(app, ["example", "digits-mlp", "--out", str(tmp_path / "results")])
    assert res.exit_code == 1 and "--out names a file, not a folder" in res.output


@pytest.mark.parametrize(
    "args, flag",
    [
        (["spectrum", "{model}", "--data", "missing.npz"], "--data missing.npz"),
        (["density", "{model}", "--model", "missing.py:build"], "--model file missing.py"),
        (["check", "{model}", "--loss", "nowhere/loss.py:fn"], "--loss file nowhere/loss.py"),
        (["solve", "{model}", "--test-data", "test.npz"], "--test-data test.npz"),
        (["surface", "{model}", "--directions", "vectors.pt"], "--directions vectors.pt"),
        (["spectrum", "{tmp}/absent.pt"], "checkpoint"),
        (["report", "--from", "{tmp}/nothing"], "--from"),
    ],
)
def test_missing_inputs_are_refused_before_loading(tmp_path, model, no_loading, args, flag):
    args = [a.format(model=model, tmp=tmp_path) for a in args]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 1, res.output
    assert flag in res.output and "does not exist" in res.output
    assert "Traceback" not in res.output


def test_builtin_data_names_pass_the_path_check(tmp_path, model):
    common = _common.CommonArgs(model_path=model, data="digits")
    _common.check_inputs(common)  # no refusal: the loader knows built-in sets


# ------------------------------------------------------------------ progress and plans
class _FakeProblem:
    num_params = 1834
    num_samples = 3000

    def __init__(self):
        self.work_done = 0


class _FakeSession:
    def __init__(self):
        self.problem = _FakeProblem()


def test_plan_line_counts_products():
    line = _common.plan_line("Hessian top-5 + bottom-2 by Lanczos", 60, _FakeSession())
    assert line == (
        "Hessian top-5 + bottom-2 by Lanczos: about 60 products of 1.8k parameters on 3k samples"
    )


def test_progress_off_a_terminal_prints_lines_with_the_figures(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(_common, "err_console", Console(file=buf, width=200))
    session = _FakeSession()
    with _common.progress_bar(session=session, planned=100, interval=0.05) as update:
        update(0, 10, "Lanczos")
        session.problem.work_done = 40
        time.sleep(0.2)
    lines = [ln for ln in buf.getvalue().splitlines() if ln]
    assert lines, "no progress line off a terminal"
    assert "Lanczos: 40 of about 100 products" in lines[-1] and "left" in lines[-1]


def test_progress_on_a_terminal_is_a_bar(monkeypatch):
    buf = io.StringIO()
    term = Console(file=buf, width=120, force_terminal=True, no_color=True)
    monkeypatch.setattr(_common, "err_console", term)
    session = _FakeSession()
    with _common.progress_bar(session=session, planned=60) as update:
        session.problem.work_done = 30
        update(3, 7, "Lanczos")
    assert "30/60 products" in buf.getvalue()


# ------------------------------------------------------------------ threads and documents
def test_threads_are_applied_and_recorded(tmp_path):
    from curvscope.io import build_arch, save_checkpoint

    arch = {"type": "mlp", "sizes": [3, 4, 2], "activation": "tanh", "bias": True}
    torch.manual_seed(0)
    torch.save((torch.randn(10, 3), torch.randint(0, 2, (10,))), tmp_path / "data.pt")
    save_checkpoint(tmp_path / "m.pt", build_arch(arch), arch,
                    {"data": "data.pt", "loss": "cross_entropy"})
    before = torch.get_num_threads()
    try:
        res = runner.invoke(app, ["spectrum", str(tmp_path / "m.pt"), "--threads", "1",
                                  "--top", "1", "--bottom", "1", "--out", str(tmp_path / "o")])
        assert res.exit_code == 0, res.output
        doc = json.loads((tmp_path / "o" / "spectrum.json").read_text())
        assert doc["settings"]["threads"] == 1
        res = runner.invoke(app, ["spectrum", str(tmp_path / "m.pt"), "--threads", "0",
                                  "--out", str(tmp_path / "o")])
        assert res.exit_code == 1 and "--threads must be at least 1" in res.output
        res = runner.invoke(app, ["spectrum", str(tmp_path / "m.pt"), "--method", "power",
                                  "--top", "1", "--out", str(tmp_path / "p")])
        assert res.exit_code == 0, res.output
        doc = json.loads((tmp_path / "p" / "spectrum.json").read_text())
        assert doc["settings"]["bottom"] == 0  # --bottom defaults to 0 with --method power
        assert [s["which"] for s in doc["results"]["spectra"]] == ["top"]
    finally:
        torch.set_num_threads(before)


def test_progress_descriptions_with_brackets_are_not_markup(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(_common, "err_console", Console(file=buf, width=200))
    with _common.progress_bar(session=_FakeSession(), planned=10, interval=0.05) as update:
        update(1, 2, "compare [fc1] ggn")
        time.sleep(0.15)
    assert "compare [fc1] ggn" in buf.getvalue()
