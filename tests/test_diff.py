"""``curvscope diff``: verdicts on constructed pairs (identical, within uncertainty, different)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import curvscope as cs
from curvscope._errors import OptionError
from curvscope.app import COVERAGE, diff_documents
from curvscope.cli import app
from curvscope.io import write_document

from .cases import CASES, build, operators

runner = CliRunner()


@pytest.fixture(scope="module")
def spectrum_doc():
    """A real spectrum document of a tiny float64 model (top 3, bottom 2)."""
    model, loss, data, reduction = build(CASES[0])
    problem = cs.Problem(model, loss, data, reduction=reduction)
    res = cs.spectrum(operators(problem), top=3, bottom=2, tol=1e-10, seed=0)
    return cs.document(res, problem)


def _spectrum(values, bounds, spread_std=None, dtype="float64"):
    entry = {"matrix": "hessian", "block": "all", "which": "top", "eigenvalues": values,
             "residual_norms": [2 * b for b in bounds], "error_bounds": bounds,
             "converged": [True] * len(values)}
    if spread_std is not None:
        entry["spread"] = {"std": spread_std}
    return {"schema": "curvscope.result/1", "command": "spectrum", "input": {"dtype": dtype},
            "settings": {}, "results": {"spectra": [entry]}}


def test_identical_documents_are_the_same(spectrum_doc):
    res = diff_documents(spectrum_doc, copy.deepcopy(spectrum_doc))
    assert res.command == "spectrum" and len(res.entries) == 5
    assert not res.changed and res.counts["same"] == 5
    assert all(e.difference == 0.0 for e in res.entries)
    assert res.entries[0].key == "hessian [all] top #1" and res.entries[0].basis == "error bound"


def test_another_seed_is_the_same_within_the_error_bounds(spectrum_doc):
    model, loss, data, reduction = build(CASES[0])
    problem = cs.Problem(model, loss, data, reduction=reduction)
    other = cs.document(cs.spectrum(operators(problem), top=3, bottom=2, tol=1e-10, seed=7),
                        problem)
    res = diff_documents(spectrum_doc, other)
    assert not res.changed, [(e.key, e.difference, e.uncertainty) for e in res.changed]


def test_verdicts_follow_the_combined_uncertainty():
    a = _spectrum([10.0, 5.0, 1.0], [0.3, 0.4, 1e-3])
    b = _spectrum([10.0, 5.0, 1.0], [0.4, 0.3, 1e-3])
    u = np.hypot(0.3, 0.4)  # 0.5
    b["results"]["spectra"][0]["eigenvalues"] = [10.0 + 0.9 * COVERAGE * u,   # within
                                                 5.0 - 1.1 * COVERAGE * u,    # beyond
                                                 1.0 + 0.5]                    # far beyond
    res = diff_documents(a, b)
    verdicts = [e.verdict for e in res.entries]
    assert verdicts == ["same", "different", "different"]
    assert res.entries[0].uncertainty == pytest.approx(u, rel=1e-12)
    assert res.entries[1].difference == pytest.approx(-1.1 * COVERAGE * u)
    # certified intervals that overlap are never called different: |d| <= e_a + e_b
    b["results"]["spectra"][0]["eigenvalues"][1] = 5.0 + 0.3 + 0.4
    assert diff_documents(a, b).entries[1].verdict == "same"


def test_spreads_and_stderrs_add_in_quadrature():
    a = _spectrum([2.0], [1e-6], spread_std=[0.1])
    b = _spectrum([2.25], [1e-6], spread_std=[0.05])
    e = diff_documents(a, b).entries[0]
    assert e.uncertainty == pytest.approx(np.sqrt(1e-12 * 2 + 0.01 + 0.0025), rel=1e-9)
    assert e.verdict == "same" and e.basis == "error bound + subset std"
    b["results"]["spectra"][0]["eigenvalues"] = [2.5]
    assert diff_documents(a, b).entries[0].verdict == "different"

    def density(estimate, stderr):
        return {"command": "density", "input": {"dtype": "float32"}, "results": {
            "traces": [{"matrix": "hessian", "block": "all", "estimator": "hutchinson",
                        "estimate": estimate, "stderr": stderr}],
            "densities": []}}

    same = diff_documents(density(10.0, 0.3), density(10.0 + 2 * 0.5, 0.4))
    assert same.entries[0].verdict == "same" and same.entries[0].basis == "stderr"
    other = diff_documents(density(10.0, 0.3), density(10.0 + 4 * 0.5, 0.4))
    assert other.entries[0].verdict == "different"


def test_numbers_without_uncertainty_compare_at_round_off():
    def surface(loss, dtype):
        return {"command": "surface", "input": {"dtype": dtype}, "results": {"surface": {
            "center_loss": loss[1][1], "loss": loss, "eigenvalues": [3.0, 1.0]}}}

    grid = [[1.0, 0.5, 1.0], [0.6, 0.1, 0.6], [1.0, 0.5, 1.0]]
    moved = copy.deepcopy(grid)
    moved[0][0] = 1.0 + 1e-7  # float32 round-off
    assert not diff_documents(surface(grid, "float32"), surface(moved, "float32")).changed
    res = diff_documents(surface(grid, "float64"), surface(moved, "float64"))
    assert [e.key for e in res.changed] == ["loss[0][0]"]
    moved[2][1] = None  # non-finite in one document only
    res = diff_documents(surface(grid, "float32"), surface(moved, "float32"))
    assert [e.key for e in res.changed] == ["loss[2][1]"]


def test_entries_present_in_one_document_only():
    a = _spectrum([3.0, 2.0], [1e-6, 1e-6])
    b = _spectrum([3.0], [1e-6])
    b["results"]["spectra"].append({**b["results"]["spectra"][0], "matrix": "ggn"})
    counts = diff_documents(a, b).counts
    assert counts == {"same": 1, "different": 0, "only in a": 1, "only in b": 1}


def test_track_documents_pair_rows_by_step():
    def doc(top, trace):
        return {"command": "track", "input": {"dtype": "float64"}, "results": {"track": [
            {"index": 0, "step": 100, "loss": 0.5, "grad_norm": 0.1,
             "eigenvalues": {"hessian": {"top": [top]}},
             "error_bounds": {"hessian": {"top": [1e-3]}},
             "trace": {"hessian": {"estimator": "hutchpp", "estimate": trace, "stderr": 0.2}},
             "per_layer_top": {"hessian": {"fc1": {"eigenvalue": 1.0, "error_bound": 1e-3}}}},
        ]}}

    res = diff_documents(doc(4.0, 20.0), doc(4.002, 20.5))
    by_key = {e.key: e.verdict for e in res.entries}
    assert by_key == {"step 100 loss": "same", "step 100 gradient norm": "same",
                      "step 100 hessian top #1": "same",
                      "step 100 hessian trace (hutchpp)": "same",
                      "step 100 hessian [fc1] top": "same"}
    assert diff_documents(doc(4.0, 20.0), doc(4.01, 20.0)).counts["different"] == 1


def test_different_commands_are_refused():
    with pytest.raises(OptionError, match="is a spectrum document and .* a density document"):
        diff_documents(_spectrum([1.0], [0.1]), {"command": "density", "results": {}})
    with pytest.raises(OptionError, match="diff compares documents of"):
        diff_documents({"command": "diff"}, {"command": "diff"})


def test_input_differences_are_listed(spectrum_doc):
    b = copy.deepcopy(spectrum_doc)
    b["input"]["dtype"] = "float32"
    b["settings"] = {**(b.get("settings") or {}), "top": 9}
    fields = {d["field"] for d in diff_documents(spectrum_doc, b).input_differences}
    assert {"dtype", "setting top"} <= fields


def test_diff_cli_exit_codes(tmp_path):
    a = _spectrum([10.0, 5.0], [0.1, 0.1])
    b = _spectrum([10.05, 7.0], [0.1, 0.1])
    pa = write_document(a, tmp_path / "a")
    pb = write_document(b, tmp_path / "b")
    same = runner.invoke(app, ["diff", str(pa), str(pa), "--fail-on-change"])
    assert same.exit_code == 0 and "2 same within uncertainty" in " ".join(same.output.split())
    changed = runner.invoke(app, ["diff", str(pa), str(pb), "--out", str(tmp_path / "d")])
    assert changed.exit_code == 0, changed.output
    text = " ".join(changed.output.split())
    assert "1 same within uncertainty, 1 different" in text and "hessian [all] top #2" in text
    doc = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert doc["command"] == "diff" and doc["results"]["counts"]["different"] == 1
    verdicts = [e["verdict"] for e in doc["results"]["entries"]]
    assert verdicts == ["same", "different"]
    failing = runner.invoke(app, ["diff", str(pa), str(pb), "--fail-on-change"])
    assert failing.exit_code == 4
    other = write_document({**a, "command": "density"}, tmp_path / "c")
    bad = runner.invoke(app, ["diff", str(pa), str(other)])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "same command" in " ".join(bad.output.split())
    missing = runner.invoke(app, ["diff", str(pa), str(tmp_path / "nope.json")])
    assert missing.exit_code == 1 and "does not exist" in " ".join(missing.output.split())


def test_diff_of_two_track_runs_from_the_command_line(tmp_path):
    """Two runs of the same track with different batch sizes: the same within round-off."""
    from .test_track import _train_checkpoints

    _train_checkpoints(tmp_path, steps=(0, 10))
    for name, batch in (("a", "512"), ("b", "7")):
        result = runner.invoke(app, ["track", str(tmp_path / "ckpt-*.pt"), "--top", "2",
                                     "--trace", "--batch-size", batch, "--figures", "none",
                                     "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    res = runner.invoke(app, ["diff", str(tmp_path / "a" / "track.json"),
                              str(tmp_path / "b" / "track.json"), "--fail-on-change"])
    assert res.exit_code == 0, res.output
    assert "setting batch_size" in res.output


def test_a_float32_rerun_differs_from_float64_only_within_uncertainty(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(10, 3, generator=g), torch.randint(0, 2, (10,), generator=g))]
    docs = []
    for dtype in (torch.float64, torch.float32):
        m = copy.deepcopy(model).to(dtype)
        p = cs.Problem(m, "cross_entropy", [(x.to(dtype), y) for x, y in data])
        docs.append(cs.document(cs.spectrum(cs.hessian(p), top=2, bottom=1, tol=1e-5), p))
    assert not diff_documents(*docs).changed


def test_near_zero_numbers_use_the_scale_of_their_family():
    def surface(cross):
        return {"command": "surface", "input": {"dtype": "float32"}, "results": {"surface": {
            "directions": {"kind": "random"},
            "curvatures": [[2.0, cross], [cross, 0.5]]}}}

    # an off-diagonal d1.H d2 at round-off of ||H|| (2.0), not of its own size
    res = diff_documents(surface(1e-8), surface(-3e-8))
    assert not res.changed and not res.notes
    assert diff_documents(surface(1e-8), surface(1e-3)).counts["different"] == 2

    def compare(min_eig):
        return {"command": "compare", "input": {"dtype": "float32"}, "settings": {"tol": 1e-4},
                "results": {"comparisons": [{"block": "fc1", "matrix": "ggn",
                                             "rel_frobenius": 0.3, "top_eigenvalues": [2.0],
                                             "min_eigenvalue": min_eig}]}}

    # Lanczos pins a small eigenvalue to tol x ||A|| (2e-4 here), not to tol x |value|
    res = diff_documents(compare(4.9e-5), compare(2.6e-5))
    assert not res.changed and res.entries[-1].basis == "tol x ||A||"
    assert diff_documents(compare(4.9e-5), compare(2e-3)).counts["different"] == 1
    eigen = {**surface(0.0), "results": {"surface": {"directions": {"kind": "eigen"}}}}
    assert "eigenvectors found from another start" in diff_documents(eigen, eigen).notes[0]


def test_diff_of_two_classes_runs(tmp_path):
    """Two `classes` runs of one model with other Lanczos seeds agree within their bounds;
    a moved class eigenvalue or cosine is different, and the table pairs them by part."""
    from .test_classes import _checkpoint

    model = _checkpoint(tmp_path)
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"c{seed}"
        res = runner.invoke(
            app,
            ["classes", str(model), "--dtype", "float64", "--tol", "1e-9", "--seed", str(seed),
             "--out", str(out)],
        )
        assert res.exit_code == 0, res.output
        outs.append(out / "classes.json")
    a, b = (json.loads(p.read_text()) for p in outs)
    d = diff_documents(a, b)
    assert d.command == "classes" and not d.changed, [e for e in d.changed][:3]
    keys = {e.key for e in d.entries}
    assert {"ggn #1", "class part #1", "cross part #1", "tr G_class"} <= keys
    assert any(k.startswith("angles class vs ggn 1..4 cos #") for k in keys)
    ggn1 = next(e for e in d.entries if e.key == "ggn #1")
    assert ggn1.basis == "error bound" and ggn1.uncertainty > 0
    cos1 = next(e for e in d.entries if e.key == "angles class vs ggn 1..4 cos #1")
    assert cos1.basis == "angle bound"
    moved = copy.deepcopy(b)
    r = moved["results"]["classes"]
    r["class_eigenvalues"][0] *= 1.001
    cls = next(x for x in r["angles"] if x["part"] == "class")
    cls["cosines"][-1] -= 10 * cls["error_bound"] + 1e-6
    changed = {e.key for e in diff_documents(a, moved).changed}
    assert changed == {"class part #1", f"angles class vs ggn 1..4 cos #{len(cls['cosines'])}"}
    path = tmp_path / "moved" / "classes.json"
    path.parent.mkdir()
    path.write_text(json.dumps(moved))
    res = runner.invoke(app, ["diff", str(outs[0]), str(path), "--fail-on-change"])
    assert res.exit_code == 4, res.output
