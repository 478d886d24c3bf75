"""Figures, the HTML report (offline, no addresses), report runs, CLI, headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from curvscope._errors import CurvscopeError, OptionError
from curvscope.app import run_report
from curvscope.diagnostics import surface
from curvscope.io import make_document, read_document, versions, write_document
from curvscope.problem import InputRecord, Problem
from curvscope.report import _plots as plots
from curvscope.report import figures_for, render_directory, render_report, save_figures

from .cases import CASES, build

ADDRESS = re.compile(r"https?://", re.IGNORECASE)

INPUT = {
    "model": {
        "path": "model.pt",
        "sha256": "ab" * 32,
        "format": "curvscope/1",
        "num_params": 38,
        "params_selected": 38,
    },
    "data": {
        "source": "digits",
        "sha256": "cd" * 32,
        "num_samples": 7,
        "batch_size": 4,
        "subset_seed": None,
    },
    "loss": "cross_entropy",
    "reduction": "mean",
    "weight_decay": 0.0,
    "dtype": "float64",
    "device": "cpu",
    "seed": 0,
    "train_mode": False,
    "versions": versions(),
}


def _doc(command, results, notes=()):
    return make_document(
        command,
        input=INPUT,
        settings={},
        results=results,
        timings={"total_s": 0.1},
        counts={"matvecs": 3, "data_passes": 1},
        notes=list(notes),
    )


def _problem():
    model, loss, data, red = build(CASES[0])
    return Problem(model, loss, data, reduction=red)


@pytest.fixture(scope="module")
def documents():
    problem = _problem()
    g = torch.Generator().manual_seed(0)
    surf2 = surface(problem, dims=2, steps=7, seed=g)
    surf1 = surface(problem, dims=1, steps=9, directions="random", seed=g)
    grid = np.linspace(-1, 3, 50)
    dens = np.exp(-((grid - 1) ** 2)) + 1e-9
    return {
        "spectrum": _doc(
            "spectrum",
            {
                "spectra": [
                    {
                        "matrix": "hessian",
                        "block": "all",
                        "which": "top",
                        "method": "lanczos",
                        "eigenvalues": [2.5, 1.0],
                        "residual_norms": [1e-9, 2e-3],
                        "converged": [True, False],
                        "num_matvecs": 20,
                    },
                    {
                        "matrix": "hessian",
                        "block": "all",
                        "which": "bottom",
                        "method": "lanczos",
                        "eigenvalues": [-0.3],
                        "residual_norms": [1e-8],
                        "converged": [True],
                        "num_matvecs": 20,
                    },
                    {
                        "matrix": "ggn",
                        "block": "0",
                        "which": "top",
                        "method": "lanczos",
                        "eigenvalues": [2.0],
                        "residual_norms": [1e-8],
                        "converged": [True],
                        "num_matvecs": 20,
                    },
                ]
            },
        ),
        "density": _doc(
            "density",
            {
                "densities": [
                    {
                        "matrix": "hessian",
                        "block": "all",
                        "grid": grid.tolist(),
                        "density": dens.tolist(),
                        "sigma": 0.1,
                        "nodes": [],
                        "weights": [],
                        "num_probes": 5,
                        "num_matvecs": 50,
                    }
                ],
                "traces": [
                    {
                        "matrix": "hessian",
                        "block": "all",
                        "estimator": "hutchinson",
                        "estimate": 3.2,
                        "stderr": 0.1,
                        "num_matvecs": 30,
                    }
                ],
            },
        ),
        "check": _doc(
            "check",
            {
                "checks": [
                    {"name": "gradient", "passed": True, "reason": "errors fall as eps^2"},
                    {
                        "name": "taylor",
                        "passed": None,
                        "reason": "round-off floor",
                        "directions": [
                            {
                                "h": [1e-1, 1e-2, 1e-3],
                                "e1": [1e-2, 1e-4, 1e-6],
                                "e2": [1e-3, 1e-6, 1e-9],
                            }
                        ],
                    },
                    {
                        "name": "convexity",
                        "passed": None,
                        "reason": "certificate",
                        "layers": [
                            {
                                "name": "0",
                                "activation": "tanh",
                                "fraction_satisfied": 0.4,
                                "fraction_satisfied_as_printed": 0.6,
                                "certified": False,
                                "min_eigenvalue": -0.01,
                                "min_eigenvalue_residual": 1e-9,
                            }
                        ],
                    },
                ]
            },
        ),
        "compare": _doc(
            "compare",
            {
                "comparisons": [
                    {
                        "block": b,
                        "matrix": m,
                        "rel_frobenius": v,
                        "rel_frobenius_stderr": None,
                        "method": "dense",
                        "chen_metric": None,
                        "top_eigenvalues": [],
                        "hessian_top_eigenvalues": [],
                        "subspace_overlap": 0.9,
                        "min_eigenvalue": 0.0,
                    }
                    for b, m, v in [
                        ("0", "ggn", 0.2),
                        ("0", "pch-abs", 0.5),
                        ("2", "ggn", 0.01),
                        ("2", "pch-abs", None),
                    ]
                ]
            },
        ),
        "surface": _doc("surface", {"surface": surf2}, surf2.notes),
        "surface-1d": _doc("surface", {"surface": surf1}),
        "solve": _doc(
            "solve",
            {
                "solves": [
                    {
                        "solver": "gd",
                        "settings": {},
                        "trace": [
                            {"iteration": i, "loss": 1 / (i + 1), "grad_norm": 0.5 / (i + 1)}
                            for i in range(10)
                        ],
                        "findings": ["slow: small steps"],
                        "final_loss": 0.1,
                        "final_grad_norm": 0.05,
                        "num_matvecs": 0,
                        "wall_time_s": 0.1,
                    },
                    {
                        "solver": "newton-cg",
                        "settings": {},
                        "trace": {"loss": [1, 0.1, 0.01], "grad_norm": [1, 0.1, 1e-3]},
                        "findings": [],
                        "final_loss": 0.01,
                        "final_grad_norm": 1e-3,
                        "num_matvecs": 12,
                        "wall_time_s": 0.1,
                    },
                ]
            },
        ),
    }


def test_every_plot_renders_with_labels(documents, tmp_path):
    for name, doc in documents.items():
        figs = figures_for(doc)
        assert figs, name
        for stem, fig in figs.items():
            assert isinstance(fig, Figure)
            ax = fig.axes[0]
            assert ax.get_title(), (name, stem)
            assert ax.get_xlabel() and ax.get_ylabel(), (name, stem)
            fig.savefig(tmp_path / f"{name}-{stem}.png", dpi=40)
    stems = set(figures_for(documents["surface"]))
    assert stems == {"surface_contour", "surface_3d", "surface_slices"}
    contour = figures_for(documents["surface"])["surface_contour"]
    assert "lambda_1" in contour.axes[0].get_xlabel()  # the eigenvalue is in the label
    assert len(contour.axes) == 2  # the colour bar
    paths = save_figures(documents["density"], tmp_path / "figs", ("png", "pdf"))
    assert {p.suffix for p in paths} == {".png", ".pdf"} and all(p.stat().st_size for p in paths)
    assert not any(re.search(rb"https?://", p.read_bytes()) for p in paths)  # metadata too


def test_plot_into_given_axes(documents):
    fig = Figure()
    ax = fig.add_subplot()
    assert plots.plot_surface_1d(documents["surface"], ax=ax) is fig
    assert plots.plot_solver_curves(documents["solve"], ax=ax) is fig


def test_weights_marker_is_drawn_above_the_3d_surface(documents):
    from curvscope.report import _plotly

    surf = documents["surface"]["results"]["surface"]
    finite = [v for row in surf["loss"] for v in row if v is not None]
    fig = plots.plot_surface_3d(documents["surface"])
    ax = fig.axes[0]
    assert ax.computed_zorder is False  # drawn in zorder, not hidden by depth sorting
    surface_z = max(c.get_zorder() for c in ax.collections if "Poly3D" in type(c).__name__)
    marks = [c for c in ax.collections if "Path3D" in type(c).__name__]
    assert marks and min(c.get_zorder() for c in marks) > surface_z
    (line,) = ax.get_lines()
    xs, ys, zs = line.get_data_3d()
    assert xs[0] == xs[1] and ys[0] == ys[1] and zs[1] > max(finite)  # vertical, above all
    fig3 = _plotly.surface_3d(documents["surface"])
    (w,) = [t for t in fig3.data if t.name == "weights w"]
    assert w.type == "scatter3d" and w.z[1] > max(finite) and w.x[0] == w.x[1]


def test_non_finite_surface_points_are_gaps(documents):
    doc = json.loads(json.dumps(documents["surface"]))
    doc["results"]["surface"]["loss"][0][0] = None
    doc["results"]["surface"]["num_non_finite"] = 1
    fig = plots.plot_surface_contour(doc)
    assert any("non-finite" in t.get_text() for t in fig.axes[0].texts)
    html = render_report({"surface": doc})
    assert "NaN" not in html.split("<script>")[-1]


def test_report_is_offline_and_complete(documents):
    html = render_report(documents, skipped=[{"part": "solve: mk", "reason": "not here"}])
    assert not ADDRESS.search(html)
    assert "default-src 'none'" in html and "connect-src 'none'" in html
    assert "Plotly.newPlot" in html and len(html) > 3_000_000  # plotly inlined
    for section in (
        "analysed",
        "spectrum",
        "density",
        "check",
        "compare",
        "surface",
        "surface-1d",
        "solve",
        "skipped",
    ):
        assert f'id="{section}"' in html, section
    assert (
        "not here" in html
        and "inconclusive" in html
        and "failed" not in html.split('id="check"')[1].split("</table>")[0]
    )
    assert html.count('class="chart"') >= 10


def test_report_with_shared_plotly_file(documents):
    html = render_report({"surface": documents["surface"]}, plotly_js="plotly.min.js")
    assert '<script src="plotly.min.js"></script>' in html
    assert len(html) < 400_000 and not ADDRESS.search(html)
    with pytest.raises(OptionError, match="network address"):
        render_report({"surface": documents["surface"]}, plotly_js="https://cdn.plot.ly/x.js")
    with pytest.raises(OptionError, match="no result documents"):
        render_report({})


def test_addresses_in_documents_are_neutralised(documents):
    doc = json.loads(json.dumps(documents["surface"]))
    doc["notes"].append("see https://example.org/x and http://a.b")
    doc["input"]["data"]["source"] = "http://data.example/d.npz"
    html = render_report({"surface": doc})
    assert not ADDRESS.search(html)


def test_run_report_writes_documents_figures_and_page(tmp_path):
    problem = _problem()
    run = run_report(problem, out_dir=tmp_path, parts=("spectrum", "surface", "solve"))
    assert run.html == tmp_path / "report.html"
    assert set(run.documents) == {"spectrum", "surface"}
    assert read_document(tmp_path / "surface.json")["results"]["surface"]["axes"][0][10] == 0.0
    assert (tmp_path / "figures" / "surface_contour.png").is_file()
    assert any(s["part"] == "solve" for s in run.skipped)
    html = run.html.read_text()
    assert not ADDRESS.search(html) and 'id="skipped"' in html
    # the surface reused the spectrum's eigenvectors: no Lanczos run of its own
    surf = read_document(tmp_path / "surface.json")
    assert surf["settings"]["eigenvectors"] == "from the spectrum part"
    assert surf["counts"]["matvecs"] == 2
    # rendering the folder again keeps the reasons recorded by the run
    again = render_directory(tmp_path)
    reasons = {s["part"]: s["reason"] for s in again.skipped}
    assert "full preset only" in reasons["solve"] and "no density.json" in reasons["density"]
    with pytest.raises(OptionError, match="preset 'slow' is not known") as err:
        run_report(problem, out_dir=tmp_path, preset="slow")
    assert err.value.option == "preset"


def test_render_directory(documents, tmp_path):
    write_document(documents["surface"], tmp_path)
    run = render_directory(tmp_path, plotly_js="plotly.min.js")
    assert run.html.is_file() and "surface" in run.documents
    assert {s["part"] for s in run.skipped} >= {"spectrum", "density"}
    with pytest.raises(CurvscopeError, match="holds no result document"):
        render_directory(tmp_path / "figures")
    with pytest.raises(CurvscopeError, match="is not a folder"):
        render_directory(tmp_path / "nope")


def test_report_modules_never_touch_pyplot():
    # figures are matplotlib.figure.Figure objects: importing curvscope.report must not pick
    # a backend or open windows (the layering itself is tested in the lead's import test)
    import curvscope.report

    folder = Path(curvscope.report.__file__).parent
    for path in folder.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"matplotlib\.pyplot|import pyplot|\bplt\.|\.use\(", text), path


def test_surface_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from curvscope.cli import _common, app
    from curvscope.cli import surface as surface_cli

    problem = _problem().recorded(InputRecord(info=INPUT))

    def fake_session(common):
        return _common.Session(problem, common)

    monkeypatch.setattr(surface_cli, "open_session", fake_session)
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "surface",
            "model.pt",
            "--out",
            str(tmp_path),
            "--steps",
            "5",
            "--plots",
            "png,html",
            "--range",
            "-0.5,0.5",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = read_document(tmp_path / "surface.json")
    assert doc["settings"]["range"] == [-0.5, 0.5] and doc["settings"]["steps"] == 5
    assert len(doc["results"]["surface"]["loss"]) == 5
    assert (tmp_path / "surface_contour.png").is_file()
    assert not ADDRESS.search((tmp_path / "surface.html").read_text())
    assert "surface.json" in res.output
    # a 1-D run in the same folder replaces this command's figures; others' files stay
    (tmp_path / "spectrum.json").write_text("{}")
    (tmp_path / "notes.png").write_bytes(b"mine")
    res = runner.invoke(
        app, ["surface", "model.pt", "--out", str(tmp_path), "--steps", "5", "--dims", "1"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "surface_line.png").is_file()
    for stale in ("surface_contour.png", "surface_3d.png", "surface_slices.png", "surface.html"):
        assert not (tmp_path / stale).exists(), stale
    assert (tmp_path / "spectrum.json").is_file() and (tmp_path / "notes.png").is_file()
    res = runner.invoke(app, ["surface", "model.pt", "--out", str(tmp_path), "--dims", "3"])
    assert res.exit_code == 1 and "--dims 3 is not supported" in res.output
    res = runner.invoke(app, ["surface", "model.pt", "--out", str(tmp_path), "--range", "1,0"])
    assert res.exit_code == 1 and "LO < HI" in res.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Console lines that are the headless software renderer talking about itself, not the page.
BENIGN = re.compile(r"GL Driver Message|GPU stall|willReadFrequently|WebGL|swiftshader", re.I)


def _chromium(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-unsafe-swiftshader",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=20000",
        "--window-size=1200,2000",
        *extra,
        page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


@pytest.mark.browser
@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)"
)
def test_report_in_headless_chromium(documents, tmp_path):
    from matplotlib.image import imread

    # 1. the whole report: no console errors, no refused loads, every chart drawn
    page = tmp_path / "report.html"
    html = render_report(documents)
    page.write_text(html, encoding="utf-8")
    proc = _chromium(page, tmp_path, "--dump-dom")
    log = proc.stderr.splitlines()
    errors = [ln for ln in log if ":CONSOLE" in ln and not BENIGN.search(ln)]
    assert not errors, "\n".join(errors)
    assert not [ln for ln in log if "Refused to" in ln]  # the CSP blocked no load: none tried
    dom = proc.stdout
    charts = html.count('class="chart"')
    assert charts >= 10
    assert dom.count("js-plotly-plot") >= charts, "some charts did not draw"
    assert not re.search(r'class="chart"[^>]*>plotly.js did not load', dom)

    # 2. a screenshot of the surface part is not blank: coloured contour and 3-D surface
    page = tmp_path / "surface.html"
    page.write_text(render_report({"surface": documents["surface"]}), encoding="utf-8")
    shot = tmp_path / "shot.png"
    proc = _chromium(page, tmp_path, f"--screenshot={shot}")
    img = imread(shot)[..., :3]
    assert img.shape[0] >= 1000
    colourful = (img.max(axis=2) - img.min(axis=2)) > 0.25
    assert float(img.std()) > 0.1 and colourful.mean() > 0.02, (img.std(), colourful.mean())


def test_report_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import curvscope.app
    import curvscope.report
    from curvscope.app import ReportRun
    from curvscope.cli import _common, app
    from curvscope.cli import report as report_cli

    problem = _problem().recorded(InputRecord(info=INPUT, notes=["n"]))
    seen = {}

    def fake_session(common):
        seen["common"] = common
        return _common.Session(problem, common)

    def fake_run(problem_, **kw):
        seen["run"] = (problem_, kw)
        return ReportRun(
            Path(kw["out_dir"]) / "report.html", {}, [], [{"part": "check", "reason": "r"}]
        )

    def fake_render(folder, **kw):
        seen["render"] = (folder, kw)
        return ReportRun(Path(folder) / "report.html", {}, [], [])

    monkeypatch.setattr(report_cli, "open_session", fake_session)
    monkeypatch.setattr(curvscope.app, "run_report", fake_run)
    monkeypatch.setattr(curvscope.report, "render_directory", fake_render)
    out = tmp_path / "rep"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "report",
            "model.pt",
            "--out",
            str(out),
            "--plotly-js",
            "../plotly.min.js",
            "--seed",
            "3",
            "--preset",
            "full",
            "--figures",
            "png,pdf",
        ],
    )
    assert res.exit_code == 0, res.output
    assert seen["common"].seed == 3
    p, kw = seen["run"]
    assert p is problem and kw["preset"] == "full" and kw["seed"] == 3
    assert kw["plotly_js"] == "../plotly.min.js" and kw["figure_formats"] == ("png", "pdf")
    assert kw["out_dir"] == out and kw["base_settings"]["seed"] == 3
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    assert not ADDRESS.search((tmp_path / "plotly.min.js").read_text())
    assert "report.html" in res.output.replace("\n", "") and "skipped" in res.output
    out.mkdir(exist_ok=True)  # --from names a folder that exists (checked before any work)
    res = runner.invoke(app, ["report", "--from", str(out)])
    assert res.exit_code == 0, res.output
    assert seen["render"] == (out, {"plotly_js": "inline", "figure_formats": ("png",)})
    res = runner.invoke(app, ["report", "model.pt", "--from", str(out)])
    assert res.exit_code == 1 and "not both" in res.output
    res = runner.invoke(app, ["report", "--out", str(out)])
    assert res.exit_code == 1 and "give a MODEL" in res.output
    res = runner.invoke(app, ["report", "model.pt", "--preset", "slow"])
    assert res.exit_code == 1 and "--preset 'slow'" in res.output
    res = runner.invoke(app, ["report", "model.pt", "--figures", "gif"])
    assert res.exit_code == 1 and "--figures 'gif'" in res.output


def test_run_report_uses_check_and_compare_and_records_unsupported(tmp_path, monkeypatch):
    import curvscope.diagnostics as diagnostics

    calls = {}

    class Res:
        def __init__(self, key, rows):
            self.key, self.rows, self.notes, self.num_matvecs = key, rows, ["fake"], 4

        def to_results(self):
            return {self.key: self.rows}

    def fake_check(problem, *, seed=0, progress=None):
        calls["check"] = seed
        return Res("checks", [{"name": "gradient", "passed": True, "reason": "ok"}])

    def fake_compare(reference, candidates, *, skipped=(), **kw):
        calls.setdefault("compare", []).append(list(candidates))
        res = Res(
            "comparisons", [{"block": "0", "matrix": m, "rel_frobenius": 0.1} for m in candidates]
        )
        res.skipped = list(skipped)
        return res

    monkeypatch.setattr(diagnostics, "check", fake_check, raising=False)
    monkeypatch.setattr(diagnostics, "compare", fake_compare, raising=False)
    # a CNN: PCH needs an MLP, so the registry's quick set loses it and keeps the GGN
    model, loss, data, red = build(CASES[4])
    problem = Problem(model, loss, data, reduction=red)
    run = run_report(problem, out_dir=tmp_path, seed=5, parts=("check", "compare"))
    assert calls["check"] == 5
    assert calls["compare"] == [["ggn"]]
    assert {s["part"] for s in run.skipped} == {"compare: pch-abs"}
    reason = next(s["reason"] for s in run.skipped if s["part"] == "compare: pch-abs")
    assert "MLP" in reason and "--" not in reason
    cmp_doc = read_document(tmp_path / "compare.json")
    assert [r["matrix"] for r in cmp_doc["results"]["comparisons"]] == ["ggn"]
    html = run.html.read_text()
    assert 'id="check"' in html and 'id="compare"' in html and "pch-abs" in html


def test_interrupted_report_keeps_what_finished(tmp_path, monkeypatch):
    import curvscope.diagnostics as diagnostics

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(diagnostics, "density", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_report(_problem(), out_dir=tmp_path, parts=("spectrum", "density", "surface"))
    assert (tmp_path / "spectrum.json").is_file() and not (tmp_path / "surface.json").exists()
    html = (tmp_path / "report.html").read_text()
    assert "interrupted (Ctrl-C) while running" in html and "not run: interrupted" in html


def test_full_report_runs_classes_for_a_classifier_and_skips_it_otherwise(tmp_path):
    """The full preset's classes part: run (budgeted) for softmax cross-entropy, left out
    with its one-sentence reason for mse; the quick preset leaves it out silently."""
    from .test_classes import _tiny

    model, data, red = _tiny(classes=3, n=30)
    problem = Problem(model, "cross_entropy", data, reduction=red)
    run = run_report(problem, out_dir=tmp_path / "f", preset="full", parts=("classes",),
                     budget_s=120, tol=1e-8)
    assert "classes" in run.documents, run.skipped
    doc = read_document(tmp_path / "f" / "classes.json")
    r = doc["results"]["classes"]
    assert r["num_classes"] == 3 and len(r["ggn"]["eigenvalues"]) == 9
    assert doc["budget"]["planned"]["products"]["ggn"] > 0
    assert doc["settings"]["preset"] == "full" and doc["settings"]["top"] == 9
    html = run.html.read_text()
    assert 'id="classes"' in html and (tmp_path / "f" / "figures" / "classes.png").is_file()
    quick = run_report(
        problem, out_dir=tmp_path / "q", preset="quick", parts=("spectrum", "classes")
    )
    assert set(quick.documents) == {"spectrum"} and not quick.skipped
    model, loss, data, red = build(CASES[2])  # mse
    mse = Problem(model, loss, data, reduction=red)
    skipped = run_report(
        mse, out_dir=tmp_path / "m", preset="full", parts=("spectrum", "classes")
    ).skipped
    assert [s["part"] for s in skipped] == ["classes"]
    assert "has no classes" in skipped[0]["reason"]
