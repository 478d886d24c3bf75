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


KILL_MID_WRITE = """
import os, signal, sys
from curvscope.io import SCHEMA, write_document

out, first = sys.argv[1], sys.argv[2] == "first"
if first:
    write_document({"schema": SCHEMA, "command": "spectrum", "run": 1}, out)

real_fdopen = os.fdopen


class HalfThenKilled:
    # writes half of the document, then the process is killed (SIGKILL: no cleanup runs)
    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)


os.fdopen = lambda fd, mode, **kw: HalfThenKilled(real_fdopen(fd, mode, **kw))
write_document({"schema": SCHEMA, "command": "spectrum", "run": 2, "pad": "x" * 200_000}, out)
print("not killed")
"""


@pytest.mark.parametrize("previous", [True, False], ids=["previous-file", "no-file"])
def test_a_run_killed_while_writing_leaves_the_previous_document_or_none(tmp_path, previous):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE, str(tmp_path), "first" if previous else "none"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert res.returncode == -signal.SIGKILL, res.stderr
    path = tmp_path / "spectrum.json"
    if previous:
        assert read_document(path)["run"] == 1  # whole, and the earlier one
    else:
        assert not path.exists()
    # only the hidden temporary file holds the half-written text
    assert all(p.name.startswith(".spectrum.json.") for p in tmp_path.iterdir() if p != path)
