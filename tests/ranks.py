"""Launch a test worker as ``world`` processes (ranks) and fail naming the rank that failed.

Each process runs ``python WORKER RANK WORLD STORE OUT CASES`` with one thread
(``OMP_NUM_THREADS=1``): the data-parallel and the sharded tests share this launcher.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_ranks(worker: Path, world: int, store: str, out: Path, cases: str) -> None:
    """Run ``worker`` on ``world`` ranks (a file store ``store``; ``-`` for none) to the end."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), str(world), store, str(out), cases],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{log}"
