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


TINY_ARCH = {"type": "mlp", "sizes": [4, 6, 3], "activation": "tanh", "bias": True}
"""The checkpoint the torchrun command tests run on (a 4-6-3 tanh MLP, 23 samples)."""


def write_tiny(folder: Path) -> Path:
    """A curvscope checkpoint of :data:`TINY_ARCH` and its ``data.npz`` in ``folder``."""
    import numpy as np
    import torch

    from curvscope.io import build_arch, save_checkpoint

    torch.manual_seed(0)
    g = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=g.normal(size=(23, 4)).astype(np.float32),
             y=g.integers(0, 3, size=23))
    meta = {"data": "data.npz", "loss": "cross_entropy", "reduction": "mean"}
    save_checkpoint(folder / "model.pt", build_arch(TINY_ARCH), TINY_ARCH, meta)
    return folder


def run_cli(folder: Path, world: int, *args: str) -> subprocess.CompletedProcess:
    """``curvscope ARGS`` in ``folder``: one process, or ``world`` under torchrun.

    This checkout's curvscope runs, whichever the environment installed; non-zero ranks keep
    their private folders under ``folder`` (``TMPDIR``).
    """
    if world == 1:
        cmd = [sys.executable, "-m", "curvscope"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", "-m", "curvscope"]
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**ENV, "TMPDIR": str(folder), "PYTHONPATH": path}
    return subprocess.run([*cmd, *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
