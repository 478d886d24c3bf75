"""Batching and train mode: eval-mode numbers do not depend on the batch size; train-mode
numbers of a BatchNorm model do, and the document, the table and ``diff`` say so."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import curvscope as cs
from curvscope.app import diff_documents
from curvscope.cli import app
from curvscope.io import build_arch, read_document, save_checkpoint

from .cases import CASES, build

runner = CliRunner()
CNN = next(c for c in CASES if c["id"].startswith("cnn-bn"))
N = 24


def _cnn_problem(batch: int, train_mode: bool) -> cs.Problem:
    """The cases' BatchNorm CNN (float64) on N samples cut into batches of ``batch``."""
    model, loss, _, reduction = build(CNN)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    data = [(x[i : i + batch], y[i : i + batch]) for i in range(0, N, batch)]
    return cs.Problem(model, loss, data, reduction=reduction, train_mode=train_mode)


def _top(problem: cs.Problem) -> tuple[list[float], dict]:
    res = cs.spectrum(cs.hessian(problem), top=3, bottom=0, tol=1e-10, seed=0)
    return res.spectra[0].eigenvalues, cs.document(res, problem)


def test_eval_mode_eigenvalues_do_not_depend_on_the_batch_size():
    (one, doc_one), (five, doc_five) = (_top(_cnn_problem(b, False)) for b in (N, 5))
    np.testing.assert_allclose(five, one, rtol=1e-10, atol=0)
    for doc in (doc_one, doc_five):
        assert doc["input"]["train_mode"] is False and doc["input"]["batch_dependent"] is False
        assert not any(n.startswith("train mode") for n in doc["notes"])
    res = diff_documents(doc_one, doc_five)
    assert not res.changed
    assert not any("BatchNorm" in n for n in res.notes)


def test_train_mode_records_batch_dependence_and_diff_reports_the_batch_size():
    (one, doc_one), (eight, doc_eight) = (_top(_cnn_problem(b, True)) for b in (N, 8))
    # another batching is another function: the top eigenvalue moves far beyond its bound
    bound = doc_one["results"]["spectra"][0]["error_bounds"][0]
    assert abs(one[0] - eight[0]) > 1e3 * max(bound, 1e-12)
    for doc, size in ((doc_one, N), (doc_eight, 8)):
        assert doc["schema"] == "curvscope.result/1"
        assert doc["input"]["train_mode"] is True and doc["input"]["batch_dependent"] is True
        assert doc["input"]["data"]["batch_size"] == size
        note = next(n for n in doc["notes"] if n.startswith("train mode"))
        assert "batch composition" in note and f"batches of {size} samples" in note
    res = diff_documents(doc_one, doc_eight)
    batch = [d for d in res.input_differences if d["field"] == "setting batch_size"]
    assert batch == [{"field": "setting batch_size", "a": N, "b": 8, "changes_results": True}]
    assert res.changed
    assert any("train mode with BatchNorm" in n and "batch_size" in n for n in res.notes)
    # the same batching twice: no setting differs and the numbers are the same
    again = diff_documents(doc_eight, copy.deepcopy(doc_eight))
    assert not again.input_differences and not again.changed


def test_train_mode_without_batchnorm_is_not_batch_dependent():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    problem = cs.Problem(model, "cross_entropy", data, train_mode=True)
    assert not problem.batch_dependent
    assert "no BatchNorm" in problem.mode_note()


ARCH = {
    "type": "sequential",
    "layers": [
        {"type": "Conv2d", "args": {"in_channels": 1, "out_channels": 2, "kernel_size": 3}},
        {"type": "BatchNorm2d", "args": {"num_features": 2}},
        {"type": "ReLU", "args": {}},
        {"type": "Flatten", "args": {}},
        {"type": "Linear", "args": {"in_features": 32, "out_features": 3}},
    ],
}


@pytest.fixture
def bn_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_arch(ARCH)
    g = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=g.normal(size=(N, 1, 6, 6)).astype(np.float32),
             y=g.integers(0, 3, size=N))
    save_checkpoint(tmp_path / "model.pt", model, ARCH,
                    {"data": "data.npz", "loss": "cross_entropy", "reduction": "mean"})
    return tmp_path


def test_train_mode_from_the_command_line(bn_checkpoint):
    outs = []
    for batch in ("24", "6"):
        out = bn_checkpoint / f"b{batch}"
        result = runner.invoke(app, ["spectrum", str(bn_checkpoint / "model.pt"), "--top", "1",
                                     "--bottom", "0", "--dtype", "float64", "--train-mode",
                                     "--batch-size", batch, "--out", str(out)])
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert f"train mode: BatchNorm batch statistics make every number depend on the " \
            f"batch composition (batches of {batch})" in text
        doc = read_document(out / "spectrum.json")
        assert doc["input"]["batch_dependent"] is True
        assert doc["settings"]["batch_size"] == int(batch)
        outs.append(out / "spectrum.json")
    res = runner.invoke(app, ["diff", str(outs[0]), str(outs[1])])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "setting batch_size (changes the function)" in text
    assert "train mode with BatchNorm" in text
    # eval mode: the line is absent
    result = runner.invoke(app, ["spectrum", str(bn_checkpoint / "model.pt"), "--top", "1",
                                 "--bottom", "0", "--out", str(bn_checkpoint / "eval")])
    assert result.exit_code == 0 and "batch composition" not in result.output
