"""The documentation cannot drift: every Python block of README.md and every script in
examples/ runs here (in a temporary folder, one thread)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_there_is_something_to_run():
    assert len(BLOCKS) >= 2 and len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    script = tmp_path / f"block{index}.py"
    script.write_text(BLOCKS[index])
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"README block {index}:\n{BLOCKS[index]}\n{res.stderr[-3000:]}"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_script_runs(script, tmp_path):
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip()  # each example prints what it found


def test_readme_example_document_has_the_current_version_and_schema():
    import curvscope
    from curvscope.io import SCHEMA

    text = (ROOT / "README.md").read_text()
    assert f'"curvscope_version": "{curvscope.__version__}"' in text
    assert f'"schema": "{SCHEMA}"' in text
