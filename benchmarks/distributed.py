"""Data parallelism: 2 gloo processes against 1 on the same command (issue 12 item 7).

``curvscope spectrum`` (top-5 and bottom-2 Hessian eigenpairs, float64) and ``density`` on the
digits-mlp example (17k parameters, 1797 samples in batches of 128), once as one process and
once under ``torchrun --nproc-per-node 2`` (gloo, one thread per process). Reported: products
(which must be the same), wall time of the whole command (start-up and loading included),
the ratio, and the largest relative difference of the eigenvalues and SLQ traces.

Usage:  python benchmarks/distributed.py [--quick]
--quick: 128 samples in batches of 64, top-2 and a 2-probe, 10-step density, for a check
that it runs (it still starts seven processes: about 20 s).
On this 2-core machine the two processes have a core each; a busy machine makes the ratio
meaningless (run it on an otherwise idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cli(world: int, args: list[str], cwd: Path) -> float:
    base = [sys.executable, "-m", "curvscope"]
    if world > 1:
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={world}", "-m", "curvscope"]
    t0 = time.perf_counter()
    run([*base, *args], cwd)
    return time.perf_counter() - t0


def run(cmd: list[str], cwd: Path) -> None:
    """Run a command; on failure print its output and raise (the benchmark then fails)."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a check")
    quick = ap.parse_args().quick
    batch = "64" if quick else "128"
    commands = (
        ("spectrum", ["--top", "2", "--bottom", "0", "--samples", "128"]),
        ("density", ["--probes", "2", "--lanczos-steps", "10", "--samples", "128"]),
    ) if quick else (
        ("spectrum", ["--top", "5", "--bottom", "2"]),
        ("density", ["--probes", "10", "--lanczos-steps", "40"]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        run([sys.executable, "-m", "curvscope", "example", "digits-mlp", "--out", str(d / "ex")],
            d)
        rows = []
        for command, extra in commands:
            docs, times = {}, {}
            for world in (1, 2):
                out = d / f"{command}-{world}"
                args = [command, str(d / "ex" / "model.pt"), "--dtype", "float64",
                        "--batch-size", batch, "--threads", "1", *extra, "--out", str(out)]
                times[world] = cli(world, args, d)
                docs[world] = json.loads((out / f"{command}.json").read_text())
            if command == "spectrum":
                a = [v for s in docs[1]["results"]["spectra"] for v in s["eigenvalues"]]
                b = [v for s in docs[2]["results"]["spectra"] for v in s["eigenvalues"]]
            else:
                a = [t["estimate"] for t in docs[1]["results"]["traces"]]
                b = [t["estimate"] for t in docs[2]["results"]["traces"]]
            diff = max(abs(x - y) / max(abs(x), 1e-300) for x, y in zip(a, b, strict=True))
            rows.append((command, docs[1]["counts"]["matvecs"], docs[2]["counts"]["matvecs"],
                         times[1], times[2], diff))
    print("| command | products (1 process) | products (2 processes) | wall 1 | wall 2 | "
          "2 / 1 | max rel. difference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c, p1, p2, t1, t2, diff in rows:
        print(f"| {c} | {p1} | {p2} | {t1:.1f} s | {t2:.1f} s | {t2 / t1:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
