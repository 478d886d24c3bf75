"""The report's budget holds (issue 21 item 4): costs measured as products run, decisions on
the time left, and the report end to end through the command line on the digits example.

The timing tests slow every curvature product down by a known sleep (the first product of
an operator apart), so the measured cost, not this machine's speed, decides.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from curvscope._errors import OptionError
from curvscope.app import run_report
from curvscope.io import read_document
from curvscope.operators import CurvatureOperator
from curvscope.problem import Problem

from .cases import CASES, build

PARTS = ("spectrum", "density", "check", "compare", "surface")


def _problem():
    model, loss, data, red = build(CASES[0])
    return Problem(model, loss, data, reduction=red)


def _slow_products(monkeypatch, *, first: float, later) -> dict:
    """A fake clock on which every product takes a known time (no real sleep).

    ``time.perf_counter`` runs ahead of the real one by the seconds products "took": an
    operator's first product ``first`` s, a later one ``later`` s a column (a number, or a
    function of how many later columns were taken before).
    """
    clock = {"ahead": 0.0, "later": 0}
    real = time.perf_counter
    counted = CurvatureOperator._counted_matmat

    def slow(self, V):
        out = counted(self, V)
        if not self.__dict__.get("_metered", False):  # the meter marks it after the first
            clock["ahead"] += first
        else:
            per = later(clock["later"]) if callable(later) else later
            clock["ahead"] += per * V.shape[1]
            clock["later"] += V.shape[1]
        return out

    monkeypatch.setattr(time, "perf_counter", lambda: real() + clock["ahead"])
    monkeypatch.setattr(CurvatureOperator, "_counted_matmat", slow)
    return clock


def _record(folder) -> dict:
    return json.loads((folder / "report-skipped.json").read_text())


def test_part_left_out_only_when_its_measured_cost_does_not_fit(tmp_path, monkeypatch):
    # 1 s a product: the spectrum takes 26 (50 planned); density needs 660 products at its
    # default, 70 at its smallest (70 s)
    _slow_products(monkeypatch, first=0.0, later=1.0)
    problem = _problem()
    run = run_report(problem, out_dir=tmp_path / "out", budget_s=80, parts=("spectrum", "density"))
    assert set(run.documents) == {"spectrum"}
    (skip,) = [s for s in run.skipped if s["part"] == "density"]
    entry = skip["budget"]
    assert entry["decision"] == "left out"
    assert entry["planned"]["products"] == {"hessian": 70}
    assert entry["planned"]["seconds"] == pytest.approx(70, rel=0.05)  # the measured 1 s
    assert entry["planned"]["seconds"] > entry["left_before_s"]
    assert re.search(r"at the measured 1 s a hessian product", skip["reason"]), skip["reason"]
    assert "left out to stay within the budget of 80 s" in skip["reason"]
    assert _record(tmp_path / "out")["budget"]["parts"]["density"]["decision"] == "left out"
    spectrum = read_document(tmp_path / "out" / "spectrum.json")["budget"]
    # 1 s each product after the operator's first
    assert spectrum["measured"]["seconds"] >= spectrum["measured"]["products"]["hessian"] - 1

    # with 250 s the smallest fits: density runs, reduced, never left out
    run = run_report(
        problem, out_dir=tmp_path / "fits", budget_s=250, parts=("spectrum", "density")
    )
    assert set(run.documents) == {"spectrum", "density"}
    dens = read_document(tmp_path / "fits" / "density.json")
    assert dens["settings"]["probes"] < 20 and dens["budget"]["decision"] == "reduced"
    plan = dens["budget"]["planned"]
    assert 70 <= plan["seconds"] <= dens["budget"]["left_before_s"]
    # every product the plan priced was taken (SLQ and both trace estimators)
    assert dens["budget"]["measured"]["products"] == plan["products"]
    # (less by the first product: 9 columns that took no time on this clock)
    assert plan["seconds"] - 10 < dens["budget"]["measured"]["seconds"] <= plan["seconds"]
    assert any("probes 20 ->" in n and "measured" in n for n in dens["notes"])


def test_slow_first_products_do_not_drop_parts_that_fit(tmp_path, monkeypatch):
    # an operator's first product takes 20 s (graphs built), later ones 0.1 s: priced at the
    # first, the spectrum alone (about 45 products) would be 900 s of the 250 s budget
    _slow_products(monkeypatch, first=20.0, later=0.1)
    t0 = time.perf_counter()
    run = run_report(
        _problem(), out_dir=tmp_path, budget_s=250, parts=("spectrum", "density", "surface")
    )
    wall = time.perf_counter() - t0
    assert set(run.documents) == {"spectrum", "density", "surface"}, run.skipped
    dens = read_document(tmp_path / "density.json")
    assert dens["settings"]["probes"] == 20 and dens["budget"]["decision"] == "planned"
    assert read_document(tmp_path / "surface.json")["settings"]["steps"] == 21
    rates = dens["budget"]["rates"]["hessian"]
    assert rates["s_per_product"] == pytest.approx(0.1, rel=0.05)
    assert rates["first_extra_s"] == pytest.approx(20, rel=0.05)
    assert wall < 250
    for part in ("spectrum", "density", "surface"):
        budget = read_document(tmp_path / f"{part}.json")["budget"]
        assert budget["planned"]["seconds"] <= budget["left_before_s"]
        # the plans hold (a surface point is priced at a product: an upper bound)
        assert budget["measured"]["seconds"] <= budget["planned"]["seconds"] * 1.1
    assert dens["budget"]["measured"]["seconds"] == pytest.approx(86, rel=0.05)


def test_total_stays_within_budget_and_one_part(tmp_path, monkeypatch):
    # the calibration's later product takes 10 ms, every other one 1 s: the spectrum is
    # priced far too low, runs long, and leaves no time for the others
    _slow_products(monkeypatch, first=0.0, later=lambda done: 0.01 if done < 1 else 1.0)
    budget_s = 20
    run = run_report(
        _problem(), out_dir=tmp_path, budget_s=budget_s, parts=("spectrum", "density", "surface")
    )
    record = _record(tmp_path)["budget"]
    assert set(run.documents) == {"spectrum"}
    assert record["parts"]["spectrum"]["planned"]["seconds"] < 1
    spent = record["calibration_s"] + sum(run.timings.values())
    assert spent > budget_s  # the spectrum overran its price ...
    assert spent <= budget_s + run.timings["spectrum"]  # ... by less than its own cost
    for part in ("density", "surface"):
        entry = record["parts"][part]
        assert entry["decision"] == "left out" and entry["left_before_s"] < 0
        reason = next(s["reason"] for s in run.skipped if s["part"] == part)
        assert "0.0 s were left" in reason


def test_budget_records_are_additive(tmp_path):
    run = run_report(_problem(), out_dir=tmp_path, budget_s=60, parts=("check", "surface"))
    assert set(run.documents) == {"check", "surface"}
    record = _record(tmp_path)
    assert set(record) >= {"run", "skipped", "budget"}
    assert set(record["budget"]) >= {"budget_s", "calibration_s", "spent_s", "parts"}
    check = read_document(tmp_path / "check.json")
    assert check["settings"]["budget_s"] == 60
    plan = check["budget"]["planned"]
    # check's loss and gradient evaluations are in its plan and measured
    assert plan["passes"] > 100 and check["budget"]["measured"]["passes"] > 100
    surf = read_document(tmp_path / "surface.json")["budget"]
    assert surf["planned"]["points"] == 21 * 21 and "point" in surf["rates"]


def test_surface_shrinks_or_is_left_out_and_a_large_budget_changes_nothing(tmp_path, monkeypatch):
    from curvscope.app import report_plan

    _slow_products(monkeypatch, first=0.0, later=1.0)
    problem = _problem()
    # after the spectrum (26 s), a surface needs at least 7 x 7 points (priced at a product
    # each) and its quadratic model: 43 s left do not hold them
    both = ("spectrum", "surface")
    run = run_report(problem, out_dir=tmp_path / "s", budget_s=70, parts=both)
    assert set(run.documents) == {"spectrum"}
    reasons = [s["reason"] for s in run.skipped if s["part"] == "surface"]
    assert reasons and "left out to stay within the budget of 70 s" in reasons[0]
    assert "49 surface points" in reasons[0] and "1 s a surface point" in reasons[0]
    # with 220 s it runs on fewer points, the reduction a note of its document
    run = run_report(problem, out_dir=tmp_path / "r", budget_s=220, parts=both)
    surf = read_document(tmp_path / "r" / "surface.json")
    assert 7 <= surf["settings"]["steps"] < 21
    assert any("steps 21 ->" in n and "budget of 220 s" in n for n in surf["notes"])
    # a budget that covers everything changes nothing
    plan = report_plan(problem, "quick")
    run = run_report(
        problem, out_dir=tmp_path / "all", budget_s=10 * sum(plan.values()), parts=("density",)
    )
    dens = read_document(tmp_path / "all" / "density.json")
    assert dens["settings"]["probes"] == 20 and dens["budget"]["decision"] == "planned"
    with pytest.raises(OptionError, match="budget_s must be positive"):
        run_report(problem, out_dir=tmp_path, budget_s=0)


# ------------------------------------------------------------------ end to end, CLI
@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    from typer.testing import CliRunner

    from curvscope.cli import app

    out = tmp_path_factory.mktemp("digits-mlp")
    res = CliRunner().invoke(app, ["example", "digits-mlp", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out / "model.pt"


def test_quick_report_end_to_end(digits_mlp, tmp_path):
    from typer.testing import CliRunner

    from curvscope.cli import app

    out = tmp_path / "report"
    t0 = time.perf_counter()
    res = CliRunner().invoke(
        app, ["report", str(digits_mlp), "--preset", "quick", "--budget-s", "60", "--out", str(out)]
    )
    wall = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    html = (out / "report.html").read_text()
    for part in PARTS:
        doc = read_document(out / f"{part}.json")
        assert doc["settings"]["preset"] == "quick" and doc["settings"]["budget_s"] == 60
        assert doc["budget"]["planned"]["seconds"] <= doc["budget"]["left_before_s"]
        assert doc["budget"]["measured"]["seconds"] > 0
        assert f'id="{part}"' in html
    record = _record(out)
    assert [s["part"] for s in record["skipped"]] == ["solve"]  # full preset only
    assert wall < 60 + max(p["measured"]["seconds"] for p in record["budget"]["parts"].values())


def test_a_budget_no_part_fits_is_refused_in_one_sentence(tmp_path, monkeypatch):
    # 30 s a product against 20 s: calibrating alone spends the budget, every part is left out;
    # the report says what would run instead of "no result documents to render"
    _slow_products(monkeypatch, first=30.0, later=30.0)
    with pytest.raises(OptionError) as err:
        run_report(_problem(), out_dir=tmp_path / "out", budget_s=20, parts=("spectrum", "density"))
    text = err.value.render(lambda k: "--" + k.replace("_", "-"))
    assert text.startswith("no part of the report fits --budget-s 20, at 30 s a Hessian product")
    assert "--samples" in text and text.count(". ") == 0
    assert not (tmp_path / "out" / "report.html").exists()
