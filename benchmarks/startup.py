"""Start-up cost of the command line, in CPU seconds (user + sys) of fresh processes.

Issue 14 asked for: ``curvscope --version``, ``--help`` and every subcommand's ``--help`` at
most 0.5 s of CPU without importing torch, and any other command at most 0.2 s of CPU beyond
``python -c "import torch"`` before its first product. This script measures both:

- each help/version call, and whether it imported torch (``sys.modules`` after the call);
- ``python -c "import torch"`` against ``curvscope spectrum`` on a small checkpoint (an MLP on
  random data written to a temporary folder), stopped by a hook at its first curvature
  product, so that everything before it (imports, argument parsing, the checks of ``--out``
  and the input paths, loading) is counted and nothing after;
- with ``--importtime``, the largest imports of ``--version`` and of the command path
  (``python -X importtime``).

curvscope's modules are byte-compiled first, as an installed package is. CPU time is
``resource.getrusage(RUSAGE_CHILDREN)`` around each subprocess; each figure is the
median of ``--repeats`` runs. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/startup.py [--repeats 5] [--importtime]

A help call that exits non-zero, or a spectrum run that stops before its first product,
fails the benchmark. --quick: one repeat and no byte-compiling (seconds; figures not
comparable with the limits then).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN_CLI = """
import runpy, sys
sys.argv = ["curvscope", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("curvscope", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("TORCH", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""

# stop at the first curvature product: everything before it is the start-up being measured
UNTIL_FIRST_PRODUCT = """
import os, runpy, sys
from curvscope.operators import _base

def stop(self, V):
    sys.stderr.write("FIRST PRODUCT\\n")
    sys.stderr.flush()
    os._exit(0)

_base.CurvatureOperator._matmat = stop
sys.argv = ["curvscope", *sys.argv[1:]]
runpy.run_module("curvscope", run_name="__main__")
"""

MAKE_CHECKPOINT = """
import sys, torch
from curvscope.io import build_arch, save_checkpoint
arch = {"type": "mlp", "sizes": [64, 32, 10], "activation": "tanh", "bias": True}
torch.manual_seed(0)
torch.save((torch.randn(1000, 64), torch.randint(0, 10, (1000,))), sys.argv[1] + "/data.pt")
save_checkpoint(sys.argv[1] + "/model.pt", build_arch(arch), arch,
                {"data": "data.pt", "loss": "cross_entropy"})
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cpu(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """User + sys CPU seconds of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return used, res


def median_cpu(cmd: list[str], repeats: int) -> tuple[float, subprocess.CompletedProcess]:
    runs = [cpu(cmd) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def importtime(args: list[str], top: int = 12) -> list[tuple[float, str]]:
    """The ``top`` largest cumulative imports (seconds, module) of ``python -X importtime``."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
        env=_env(), cwd=ROOT,
    )
    rows = []
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and len(m.group(2)) <= 3:  # top-level imports and their direct children
            rows.append((int(m.group(1)) / 1e6, m.group(3)))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--importtime", action="store_true", help="print the import breakdowns")
    ap.add_argument("--quick", action="store_true", help="one repeat, no byte-compiling")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 1
    py = sys.executable
    # byte-compiled, as an installed package is: with PYTHONDONTWRITEBYTECODE set (as on the
    # development machine) edited modules are otherwise compiled from source on every run
    if not args.quick:
        subprocess.run([py, "-m", "compileall", "-q", str(ROOT / "curvscope")], check=True,
                       capture_output=True)

    print("help and version (limit 0.5 s CPU, no torch):")
    worst = 0.0
    calls = [["--version"], ["--help"]] + [
        [c, "--help"]
        for c in ("example", "spectrum", "density", "check", "compare", "surface", "solve",
                  "report")
    ]
    for call in calls:
        t, res = median_cpu([py, "-c", RUN_CLI, *call], args.repeats)
        if res.returncode != 0:
            raise SystemExit(f"curvscope {' '.join(call)} exited {res.returncode}:\n{res.stderr}")
        torch_loaded = "TORCH True" in res.stderr
        worst = max(worst, t)
        print(f"  curvscope {' '.join(call):<18} {t:6.3f} s  torch imported: {torch_loaded}")
    print(f"  worst {worst:.3f} s")

    # both end with os._exit: the interpreter's teardown (torch's atexit work) is not start-up
    baseline = [py, "-c", "import os, torch; os._exit(0)"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([py, "-c", MAKE_CHECKPOINT, tmp], check=True, env=_env(), cwd=ROOT)
        cmd = [py, "-c", UNTIL_FIRST_PRODUCT, "spectrum", f"{tmp}/model.pt", "--out",
               f"{tmp}/out", "--threads", "1"]
        # interleaved, so that load from other jobs drifts over both alike
        pairs = [(cpu(baseline)[0], cpu(cmd)) for _ in range(args.repeats)]
        t_torch = statistics.median(t for t, _ in pairs)
        t_cmd = statistics.median(t for _, (t, _) in pairs)
        extra = statistics.median(c - t for t, (c, _) in pairs)
        res = pairs[-1][1][1]
        if "FIRST PRODUCT" not in res.stderr:
            raise SystemExit(f"spectrum did not reach its first product:\n{res.stderr}")
        print("\nbefore the first product (limit: import torch + 0.2 s CPU):")
        print(f"  python -c 'import torch'           {t_torch:6.3f} s")
        print(f"  curvscope spectrum (to product 1)  {t_cmd:6.3f} s  "
              f"(median of the paired differences: +{extra:.3f} s beyond import torch)")
        if args.importtime:
            print("\nlargest imports of curvscope --version (cumulative s):")
            for s, mod in importtime(["-m", "curvscope", "--version"]):
                print(f"  {s:6.3f}  {mod}")
            print("\nlargest imports of spectrum before its first product (cumulative s):")
            for s, mod in importtime(["-c", UNTIL_FIRST_PRODUCT, "spectrum",
                                      f"{tmp}/model.pt", "--out", f"{tmp}/out2"]):
                print(f"  {s:6.3f}  {mod}")


if __name__ == "__main__":
    main()
