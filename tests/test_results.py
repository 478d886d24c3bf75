import json
import math
import os
import stat

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
