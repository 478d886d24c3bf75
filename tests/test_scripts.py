"""Every script in benchmarks/ and scripts/ runs with ``--quick`` (issue 21 item 8: nothing rots).

Each runs in a fresh process from a temporary folder with ``OMP_NUM_THREADS=1`` and this
checkout first on ``PYTHONPATH``, and must exit 0 within 120 s. A script whose optional peers
(curvlinops, PyHessian, hessian-eigenthings, BackPACK, CREPE's weights) are missing still exits
0 and says so on a ``skip`` line. In quick mode no script may write into the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    str(p.relative_to(ROOT)) for d in ("benchmarks", "scripts") for p in (ROOT / d).glob("*.py")
)
# folders of the checkout that a run may touch without writing "into the repository"
NOT_REPO = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".peers"}

pytestmark = pytest.mark.slow


def _written_since(t0: float) -> list[str]:
    """Files under the checkout modified since ``t0`` (caches and the environment left out)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in NOT_REPO and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            try:
                if path.stat().st_mtime >= t0:
                    found.append(str(path.relative_to(ROOT)))
            except FileNotFoundError:
                pass
    if found:  # files git ignores are no part of the repository (CI's own .ci-test.log)
        ignored = subprocess.run(
            ["git", "check-ignore", "--stdin"], cwd=ROOT, input="\n".join(found),
            capture_output=True, text=True, check=False,
        ).stdout.split()
        found = [f for f in found if f not in set(ignored)]
    return found


def test_every_script_is_listed():
    assert len(SCRIPTS) >= 20, SCRIPTS
    assert "benchmarks/spectrum.py" in SCRIPTS and "scripts/make_reports.py" in SCRIPTS
    assert "benchmarks/products.py" in SCRIPTS  # issue 24 item 6's measurements


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_quick(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    t0 = time.time() - 1  # mtime resolution
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} --quick exited {proc.returncode}:\n{out[-6000:]}"
    assert out.strip(), f"{script} --quick printed nothing"
    if "not installed" in out:  # a missing peer is said on a skip line, not silently
        assert any(line.lstrip().startswith("skip") for line in out.splitlines()), out[-3000:]
    written = _written_since(t0)
    assert not written, f"{script} --quick wrote into the repository: {written}"


def test_install_peers_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "install-peers.sh")], check=True)
