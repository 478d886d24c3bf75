"""What the warm start of ``curvscope track`` saves, on a 20-checkpoint run of digits-mlp.

The run: the digits-mlp example's architecture (64-128-64-10 tanh MLP, P = 17226) trained here
with full-batch Adam (lr 1e-2, seed 0, as ``curvscope example digits-mlp`` trains it) on the
1797 digits samples, a ``curvscope/1`` checkpoint every 10 steps from step 0 to step 190 (20
checkpoints). Each setting is tracked twice over the same checkpoints, data (batches of 512)
and seed: from the previous checkpoint's Ritz vectors (warm, the default) and from a random
start at every checkpoint (``warm_start=False``). Reported: Lanczos products (counted per
column, the final residual check included; loss and gradient passes are the same in both and
left out), wall time, and how the two runs' eigenvalues compare: the largest difference, and
the pairs that differ by more than the sum of their error bounds. An error bound certifies
that *an* eigenvalue lies that close, not that it is the k-th: Lanczos at tol 1e-4 can miss one
eigenvalue of a cluster. By Cauchy interlacing the k-th largest Ritz value never exceeds the
k-th largest eigenvalue (and the k-th smallest never falls below the k-th smallest), so where
the runs disagree, the more extreme value is the better one; the table says which run had it.

Usage:  OMP_NUM_THREADS=1 python benchmarks/track_warm_start.py [--quick]
Prints a markdown table. --quick: 30 training steps (3 checkpoints), for a check that it runs
(seconds; the figures mean little then).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from curvscope import __version__
from curvscope.app import track
from curvscope.io import build_arch, load_dataset, save_checkpoint

# As the command line does (curvscope.cli): float32 subnormals from saturated tanh units made
# one digits-mlp gradient 25x slower.
torch.set_flush_denormal(True)

ARCH = {"type": "mlp", "sizes": [64, 128, 64, 10], "activation": "tanh", "bias": True}
STEPS = 200
EVERY = 10
SETTINGS = [
    {"top": 3, "bottom": 0},
    {"top": 5, "bottom": 2},
]


def train(folder: Path, steps: int = STEPS) -> list[Path]:
    """Full-batch Adam on digits; a checkpoint every EVERY steps (20 in all)."""
    data = load_dataset("digits")
    x, y = torch.as_tensor(data.x), torch.as_tensor(data.y)
    torch.manual_seed(0)
    model = build_arch(ARCH)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    paths = []
    for step in range(steps):
        if step % EVERY == 0:
            meta = {"data": "digits", "loss": "cross_entropy", "reduction": "mean",
                    "step": step, "created_by": "benchmarks/track_warm_start.py"}
            paths.append(save_checkpoint(folder / f"ckpt-{step:04d}.pt", model, ARCH, meta))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 checkpoints (seconds)")
    steps = 30 if ap.parse_args().quick else STEPS
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    paths = train(folder, steps)
    print(f"trained {len(paths)} checkpoints in {time.perf_counter() - t0:.1f} s "
          f"(curvscope {__version__}, torch {torch.__version__}, 1 thread)\n")
    print("| setting | start | Lanczos products | per checkpoint (first, median of the rest) "
          "| seconds | max eigenvalue difference | pairs apart by more than their bounds |")
    print("|---|---|---:|---|---:|---:|---|")
    for s in SETTINGS:
        runs = {}
        for warm in (True, False):
            t = time.perf_counter()
            run = track(str(folder / "ckpt-*.pt"), top=s["top"], bottom=s["bottom"],
                        warm_start=warm, seed=0)
            runs[warm] = (run, time.perf_counter() - t)
        diff, apart, warm_better = 0.0, 0, 0
        for rw, rc in zip(runs[True][0].rows, runs[False][0].rows, strict=True):
            for which, sign in (("top", 1.0), ("bottom", -1.0)):
                a = np.array(rw["eigenvalues"]["hessian"].get(which, []))
                c = np.array(rc["eigenvalues"]["hessian"].get(which, []))
                ea = np.array(rw["error_bounds"]["hessian"].get(which, []))
                ec = np.array(rc["error_bounds"]["hessian"].get(which, []))
                if not a.size:
                    continue
                diff = max(diff, float(np.abs(a - c).max()))
                far = np.abs(a - c) > ea + ec
                apart += int(far.sum())
                warm_better += int((far & (sign * (a - c) > 0)).sum())
        label = f"top {s['top']}" + (f", bottom {s['bottom']}" if s["bottom"] else "")
        for warm in (True, False):
            run, secs = runs[warm]
            per = [r["num_matvecs_eigen"] for r in run.rows]
            total = sum(per)
            pairs = len(run.rows) * (s["top"] + s["bottom"])
            verdict = (f"{apart} of {pairs}; the warm run's value is the more extreme in "
                       f"{warm_better}") if warm else ""
            print(f"| {label} | {'warm' if warm else 'cold'} | {total} | {per[0]}, "
                  f"{int(np.median(per[1:]))} | {secs:.1f} | {diff:.2e} | {verdict} |")
        warm_total = sum(r["num_matvecs_eigen"] for r in runs[True][0].rows)
        cold_total = sum(r["num_matvecs_eigen"] for r in runs[False][0].rows)
        print(f"|  | saving | {100 * (1 - warm_total / cold_total):.0f}% | | "
              f"{100 * (1 - runs[True][1] / runs[False][1]):.0f}% | | |")
    top = [r["eigenvalues"]["hessian"]["top"][0] for r in runs[True][0].rows]
    print(f"\nsharpness (top Hessian eigenvalue) from {top[0]:.3g} at step 0 to "
          f"{top[-1]:.3g} at step {steps - EVERY}.")


if __name__ == "__main__":
    main()
