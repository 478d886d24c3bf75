"""Runs never mix (issue 21 item 3), through the command line on the digits-mlp example.

Every document records its run; ``report --from`` renders one run or refuses naming the odd
document; a report rerun leaves no stale part; an interrupted ``track`` resumes without
measuring its finished checkpoints again; another command into an interrupted folder is
refused unless ``--overwrite``; a refused command leaves no ``--out`` folder behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from curvscope.cli import app
from curvscope.io import MARKER, load_checkpoint, save_checkpoint

runner = CliRunner()
SMALL = ["--samples", "200", "--seed", "0"]
REPORT = ["--budget-s", "6", *SMALL]


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


def _refused(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    return " ".join(res.output.split())


def _doc(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Two digits MLPs (training seeds 0 and 1) and four checkpoints of the first."""
    root = tmp_path_factory.mktemp("runs")
    _ok(["example", "digits-mlp", "--out", str(root / "a")])
    _ok(["example", "digits-mlp", "--seed", "1", "--out", str(root / "b")])
    loaded = load_checkpoint(root / "a" / "model.pt")
    model = loaded.model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (0, 10, 20, 30):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] * (0.7 + step / 100))
        save_checkpoint(root / "a" / f"ckpt-{step}.pt", model, loaded.arch,
                        {**loaded.meta, "step": step})
    return root


def test_documents_record_their_run_and_a_report_shares_one(examples, tmp_path):
    model = str(examples / "a" / "model.pt")
    _ok(["spectrum", model, "--top", "1", "--bottom", "0", *SMALL, "--out", str(tmp_path / "s")])
    doc = _doc(tmp_path / "s" / "spectrum.json")
    run = doc["run"]
    assert set(run) >= {"id", "command", "started", "state"} and doc["schema"].endswith("/1")
    assert run["command"] == "spectrum" and run["state"] == "complete"
    marker = _doc(tmp_path / "s" / MARKER)
    assert marker["id"] == run["id"] and marker["state"] == "complete"
    assert marker["model_sha256"] == doc["input"]["model"]["sha256"]
    assert marker["data_sha256"] == doc["input"]["data"]["sha256"]
    # the same command again: a new run, its documents replaced
    _ok(["spectrum", model, "--top", "1", "--bottom", "0", *SMALL, "--out", str(tmp_path / "s")])
    assert _doc(tmp_path / "s" / "spectrum.json")["run"]["id"] != run["id"]
    _ok(["report", model, *REPORT, "--out", str(tmp_path / "r")])
    docs = [_doc(p) for p in (tmp_path / "r").glob("*.json") if p.name[0] not in ".r"]
    assert len(docs) >= 2
    assert len({d["run"]["id"] for d in docs}) == 1
    assert {d["run"]["command"] for d in docs} == {"report"}
    assert _doc(tmp_path / "r" / MARKER)["id"] == docs[0]["run"]["id"]


def test_report_from_refuses_a_document_of_another_model(examples, tmp_path):
    rep = tmp_path / "rep"
    _ok(["report", str(examples / "a" / "model.pt"), *REPORT, "--out", str(rep)])
    _ok(["report", "--from", str(rep)])
    # a spectrum of the other model among the report's documents
    _ok(["spectrum", str(examples / "b" / "model.pt"), "--top", "1", "--bottom", "0", *SMALL,
         "--out", str(rep)])
    text = _refused(["report", "--from", str(rep)])
    assert f"{rep / 'spectrum.json'}" in text and "b/model.pt" in text
    assert "renders the documents of one run" in text and "a/model.pt" in text


def test_report_from_renders_old_documents_only_of_the_same_model(examples, tmp_path):
    rep = tmp_path / "rep"
    _ok(["report", str(examples / "a" / "model.pt"), *REPORT, "--out", str(rep)])
    other = tmp_path / "other"
    _ok(["spectrum", str(examples / "b" / "model.pt"), "--top", "1", "--bottom", "0", *SMALL,
         "--out", str(other)])
    # documents written before runs were recorded carry no run section
    spectrum = _doc(rep / "spectrum.json")
    spectrum.pop("run")
    (rep / "spectrum.json").write_text(json.dumps(spectrum))
    _ok(["report", "--from", str(rep)])
    foreign = _doc(other / "spectrum.json")
    foreign.pop("run")
    (rep / "spectrum.json").write_text(json.dumps(foreign))
    text = _refused(["report", "--from", str(rep)])
    assert f"{rep / 'spectrum.json'} (no run id" in text


def test_an_interrupted_report_rerun_never_shows_an_earlier_runs_part(
    examples, tmp_path, monkeypatch
):
    import curvscope.diagnostics as diagnostics

    rep = tmp_path / "rep"
    model = str(examples / "a" / "model.pt")
    _ok(["report", model, *REPORT, "--out", str(rep)])
    first = _doc(rep / "spectrum.json")["run"]["id"]
    assert (rep / "density.json").is_file()

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(diagnostics, "density", interrupt)
    res = runner.invoke(app, ["report", model, *REPORT, "--out", str(rep)])
    assert res.exit_code == 130, res.output
    monkeypatch.undo()
    second = _doc(rep / "spectrum.json")["run"]["id"]
    assert second != first
    assert not (rep / "density.json").exists() and not (rep / "surface.json").exists()
    assert _doc(rep / MARKER) | {"state": "interrupted", "id": second} == _doc(rep / MARKER)
    page = (rep / "report.html").read_text()
    assert "not run: interrupted" in page
    _ok(["report", "--from", str(rep)])  # one run: rendered
    # another command into the interrupted report's folder is refused ...
    text = _refused(["check", model, *SMALL, "--out", str(rep)])
    assert f"--out {rep} holds the run {second} of curvscope report" in text
    assert "--overwrite" in text
    assert _doc(rep / MARKER)["id"] == second  # a refusal leaves the marker it found
    # ... unless --overwrite: the interrupted run's documents and page go
    _ok(["check", model, *SMALL, "--overwrite", "--out", str(rep)])
    assert not (rep / "spectrum.json").exists() and not (rep / "report.html").exists()
    assert _doc(rep / "check.json")["run"]["command"] == "check"
    assert _doc(rep / MARKER)["state"] == "complete"


def _count_measures(monkeypatch, stop_at: int | None = None) -> list[int]:
    """Count the checkpoints measured; raise KeyboardInterrupt at measurement ``stop_at``."""
    import curvscope.app._track as track_module

    real, calls = track_module._Measurer.measure, []

    def measure(self, *args, **kwargs):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(track_module._Measurer, "measure", measure)
    return calls


def test_an_interrupted_track_resumes_without_measuring_its_finished_checkpoints(
    examples, tmp_path, monkeypatch
):
    out = tmp_path / "curv"
    args = ["track", str(examples / "a" / "ckpt-*.pt"), "--top", "1", *SMALL, "--out", str(out)]
    calls = _count_measures(monkeypatch, stop_at=3)
    res = runner.invoke(app, args)
    assert res.exit_code == 130, res.output
    monkeypatch.undo()
    partial = _doc(out / "track.json")
    assert partial["complete"] is False and partial["run"]["state"] == "interrupted"
    assert [r["step"] for r in partial["results"]["track"]] == [0, 10]
    assert _doc(out / MARKER)["state"] == "interrupted" and len(calls) == 3
    # another command into it is refused; a track of other settings too
    text = _refused(["spectrum", str(examples / "a" / "model.pt"), *SMALL, "--out", str(out)])
    assert "curvscope track" in text and "--overwrite" in text
    text = _refused([*args, "--top", "2"])
    assert "interrupted track with other settings (top was 1, now 2)" in text
    assert _doc(out / "track.json")["results"]["track"] == partial["results"]["track"]
    # the same track again: two checkpoints measured, the finished rows kept as they were
    calls = _count_measures(monkeypatch)
    _ok(args)
    monkeypatch.undo()
    assert len(calls) == 2
    doc = _doc(out / "track.json")
    rows = doc["results"]["track"]
    assert [r["step"] for r in rows] == [0, 10, 20, 30] and doc.get("complete", True)
    assert rows[:2] == partial["results"]["track"]
    assert doc["run"]["id"] == partial["run"]["id"] and doc["run"]["state"] == "complete"
    assert doc["run"]["resumed"][0]["rows_kept"] == 2
    assert any("resumed run" in n for n in doc["notes"])
    assert _doc(out / MARKER) | {"state": "complete", "id": doc["run"]["id"]} == _doc(out / MARKER)
    assert (out / "figures" / "track_eigenvalues.png").stat().st_size > 1000
    # a finished track reruns afresh (as every command does into its own folder)
    calls = _count_measures(monkeypatch)
    _ok(args)
    assert len(calls) == 4


def test_overwrite_starts_an_interrupted_track_afresh(examples, tmp_path, monkeypatch):
    out = tmp_path / "curv"
    args = ["track", str(examples / "a" / "ckpt-*.pt"), "--top", "1", *SMALL, "--out", str(out)]
    _count_measures(monkeypatch, stop_at=2)
    assert runner.invoke(app, args).exit_code == 130
    monkeypatch.undo()
    old = _doc(out / "track.json")["run"]["id"]
    calls = _count_measures(monkeypatch)
    _ok([*args, "--top", "2", "--overwrite"])
    doc = _doc(out / "track.json")
    assert len(calls) == 4 and doc["run"]["id"] != old and "resumed" not in doc["run"]


REFUSED = [
    ["spectrum", "{a}", "--tol", "0"],
    ["spectrum", "{a}", "--max-iter", "0"],
    ["spectrum", "{a}", "--threads", "0"],
    ["spectrum", "{a}", "--matrix", "nope"],
    ["spectrum", "{a}", "--top", "-1"],
    ["spectrum", "{a}", "--per-layer", "--per-param"],
    ["spectrum", "{a}", "--max-memory", "1KB"],
    ["spectrum", "{a}", "--hvp-cache", "lots"],
    ["spectrum", "{tmp}/missing.pt"],
    ["spectrum", "{a}", "--data", "{tmp}/missing.npz"],
    ["spectrum", "{a}", "--model", "{tmp}/missing.py:build"],
    ["spectrum", "{a}", "--params", "nothing.*"],
    ["density", "{a}", "--matrix", "nope"],
    ["density", "{a}", "--max-memory", "1KB"],
    ["check", "{a}", "--loss", "{tmp}/loss.py:fn"],
    ["check", "{a}", "--forward-kwargs", "novalue"],
    ["compare", "{a}", "--matrix", "nope"],
    ["surface", "{a}", "--directions", "{tmp}/vectors.pt"],
    ["surface", "{a}", "--range", "x"],
    ["solve", "{a}", "--solver", "nope"],
    ["solve", "{a}", "--test-data", "{tmp}/test.npz"],
    ["report", "{a}", "--preset", "slow"],
    ["report", "{a}", "--figures", "gif"],
    ["report", "{a}", "--budget-s", "0"],
    ["report", "{a}", "--max-memory", "1KB"],
    ["track", "{tmp}/nothing-*.pt"],
    ["track", "{a}", "--momentum", "0.9"],
    ["track", "{a}", "--lr", "-1"],
    ["track", "{a}", "--matrix", "nope"],
    ["track", "{a}", "--figures", "gif"],
    ["example", "nope"],
    ["diff", "{tmp}/a.json", "{tmp}/b.json"],
]


@pytest.mark.parametrize("args", REFUSED, ids=lambda a: " ".join(a[:1] + a[2:])[:40])
def test_a_refused_command_leaves_no_new_folder(examples, tmp_path, args):
    args = [a.format(a=examples / "a" / "model.pt", tmp=tmp_path) for a in args]
    new = tmp_path / "new"
    res = runner.invoke(app, [*args, "--out", str(new / "deeper")])
    assert res.exit_code == 1, res.output
    assert "error:" in res.output and "Traceback" not in res.output
    assert not new.exists(), sorted(p.name for p in new.rglob("*"))


def test_a_refusal_into_an_existing_folder_leaves_it_as_it_was(examples, tmp_path):
    out = tmp_path / "o"
    model = str(examples / "a" / "model.pt")
    _ok(["spectrum", model, "--top", "1", "--bottom", "0", *SMALL, "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _refused(["density", model, *SMALL, "--max-memory", "1KB", "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    shutil.rmtree(out)


def test_a_tracker_writes_every_measurement_under_one_run(tmp_path):
    import curvscope as cs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    tracker = cs.Tracker(model, "cross_entropy", data, every=1, top=1, out=tmp_path)
    tracker(0)
    first = _doc(tmp_path / "track.json")["run"]
    tracker(1)
    doc = _doc(tmp_path / "track.json")
    assert len(doc["results"]["track"]) == 2 and doc["run"]["id"] == first["id"]
