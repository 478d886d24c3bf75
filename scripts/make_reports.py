"""Regenerate reports/<example>/ for every ``curvscope example`` model (``make reports``).

For each example the model is trained (deterministically, in a temporary folder that is not
committed), then ``curvscope report`` runs on it exactly as a user would run it, writing the
result documents, PNG figures and ``report.html`` into ``reports/<example>/``. The committed
pages share one copy of plotly's JavaScript, ``reports/plotly.min.js`` (``--plotly-js
../plotly.min.js``), so the repository holds it once instead of once per page; users get
self-contained pages by default.

Usage: python scripts/make_reports.py [--preset quick|full] [--out DIR] [NAME ...]
(default presets per example: PRESETS below; --out defaults to reports/ of this checkout)
``--quick``: sinus-mlp only, the quick preset on 64 samples with a 10 s budget, written to
``--out`` or a fresh temporary folder (never into the repository), for a check (seconds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
EXAMPLES = ["digits-mlp", "digits-sigmoid", "digits-cnn", "sinus-mlp"]
# The committed reports show everything the MLPs support (full: per-layer spectra of every
# matrix, 41x41 surface, solver runs; ~5 min for digits-mlp on a loaded 2-core CPU); the CNN
# gets the quick preset, whose full run took over 10 minutes there.
PRESETS = {
    "digits-mlp": "full",
    "digits-sigmoid": "full",
    "digits-cnn": "quick",
    "sinus-mlp": "full",
}


def run(args: list[str], env: dict[str, str], cwd: str) -> None:
    print("$ curvscope " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "curvscope", *args], check=True, env=env, cwd=cwd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=None, help=f"default: {EXAMPLES}")
    parser.add_argument(
        "--preset", choices=["quick", "full"], help="one preset for all (default: PRESETS)"
    )
    parser.add_argument("--seed", default="0")
    parser.add_argument("--out", type=Path, default=None, help="default: reports/")
    parser.add_argument("--quick", action="store_true", help="sinus-mlp, tiny, a temp folder")
    opts = parser.parse_args()
    opts.names = opts.names or (["sinus-mlp"] if opts.quick else EXAMPLES)
    reports = opts.out or (Path(tempfile.mkdtemp()) if opts.quick else REPORTS)
    extra = ["--samples", "64", "--budget-s", "10"] if opts.quick else []
    unknown = [n for n in opts.names if n not in EXAMPLES]
    if unknown:
        parser.error(f"unknown example(s) {unknown}; choose from {EXAMPLES}")
    env = dict(os.environ)
    # One thread: on a loaded 2-core machine OpenMP threads spin against each other and a
    # Hessian product took 100x longer with two threads than with one (22:37 UTC, load 6.5).
    env.setdefault("OMP_NUM_THREADS", "1")
    reports.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="curvscope-examples-") as tmp:
        for name in opts.names:
            t0 = time.perf_counter()
            # relative paths, so the documents record "digits-mlp/model.pt", not a temp folder
            run(["example", name, "--out", name, "--seed", opts.seed], env, tmp)
            out = reports / name
            if out.exists():
                shutil.rmtree(out)
            run(
                [
                    "report",
                    f"{name}/model.pt",
                    "--data",
                    f"{name}/data.npz",
                    "--out",
                    str(out),
                    "--preset",
                    "quick" if opts.quick else opts.preset or PRESETS[name],
                    *extra,
                    "--plotly-js",
                    "../plotly.min.js",
                    "--seed",
                    opts.seed,
                ],
                env,
                tmp,
            )
            print(f"{name}: {time.perf_counter() - t0:.1f} s -> {out / 'report.html'}", flush=True)
    # --plotly-js writes reports/plotly.min.js when it is missing; refresh it so it always
    # matches the installed plotly.
    from curvscope.cli.report import write_plotly_js

    write_plotly_js(reports / "plotly.min.js")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
