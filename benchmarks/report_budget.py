"""Does ``curvscope report --preset quick`` hold its budget? Wall time against the budget.

Issue 21 item 4: the quick report finished in 58 s of 300 with ``--threads 1`` yet left the
surface out, dropped four parts at default threads, and another run took 527 s of 300. The
report now times products as they run and decides before each part on the time left; this
script runs the real command (fresh processes, the examples' checkpoints made with
``curvscope example``) with default threads and with ``--threads 1`` and prints, per run, the
wall time against the budget, the parts left out or reduced, and each part's planned against
measured seconds (from the documents' ``budget`` sections and ``report-skipped.json``).

A run holds its budget when its parts took at most the budget plus the largest part's
measured seconds (what the report promises: it decides before each part, so only the part
running when the time ran out can overrun); the page is rendered after the parts.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/report_budget.py [--budget-s 300]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/report_budget.py --quick  # digits-mlp, 20 s

The full run makes ``digits-cnn`` and ``tiny-gpt`` (about two minutes to train) and runs four
reports of up to ``--budget-s`` each.
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

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "curvscope", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
        check=False,
    )


def _example(name: str, folder: Path) -> Path:
    res = _cli("example", name, "--out", str(folder))
    if res.returncode:
        raise SystemExit(f"curvscope example {name} failed:\n{res.stdout}{res.stderr}")
    return folder / "model.pt"


def _report(
    model: Path, out: Path, budget_s: float, threads: str | None, samples: int | None = None
) -> dict:
    args = ["report", str(model), "--preset", "quick", "--budget-s", str(budget_s)]
    if samples:
        args += ["--samples", str(samples)]
    args += ["--out", str(out)]
    if threads is not None:
        args += ["--threads", threads]
    t0 = time.perf_counter()
    # a report past twice its budget is broken: stop it rather than wait
    res = _cli(*args, timeout=3 * budget_s + 120)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"report failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    record = json.loads((out / "report-skipped.json").read_text())
    budget = record.get("budget", {})
    parts = budget.get("parts", {})
    measured = {p: e["measured"]["seconds"] for p, e in parts.items() if "measured" in e}
    spent = budget.get("calibration_s", 0.0) + sum(measured.values())
    return {
        "wall_s": wall,
        "parts_s": spent,
        "holds": spent <= budget_s + max(measured.values(), default=0.0),
        "parts": parts,
        "skipped": [s["part"] for s in record["skipped"] if s["part"] != "solve"],
    }


def _print(label: str, budget_s: float, r: dict) -> None:
    verdict = "holds" if r["holds"] else "OVER (more than the budget plus one part)"
    print(
        f"{label}: {r['wall_s']:.1f} s wall (parts {r['parts_s']:.1f} s) against "
        f"{budget_s:.0f} s: {verdict}"
    )
    for part, e in r["parts"].items():
        planned = e["planned"]["seconds"]
        done = e.get("measured", {}).get("seconds")
        measured = "not run" if done is None else f"{done:.1f} s measured"
        print(
            f"    {part:9s} {e['decision']:9s} planned {planned:7.1f} s, {measured} "
            f"({e['left_before_s']:.1f} s left before)"
        )
    if r["skipped"]:
        print(f"    skipped: {', '.join(r['skipped'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits-mlp only, 20 s budget")
    ap.add_argument("--budget-s", type=float, default=None, help="default 300 (20 with --quick)")
    ap.add_argument("--models", default=None, help="comma-separated (default digits-cnn,tiny-gpt)")
    ap.add_argument("--samples", type=int, default=None, help="passed to the report")
    args = ap.parse_args()
    budget_s = args.budget_s or (20.0 if args.quick else 300.0)
    models = ["digits-mlp"] if args.quick else ["digits-cnn", "tiny-gpt"]
    if args.models:
        models = args.models.split(",")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            model = _example(name, Path(tmp) / name)
            for threads in (None, "1"):
                label = f"{name}, {'default threads' if threads is None else '--threads 1'}"
                out = Path(tmp) / f"{name}-{threads or 'default'}"
                r = _report(model, out, budget_s, threads, args.samples)
                _print(label, budget_s, r)
                failed |= not r["holds"]
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
