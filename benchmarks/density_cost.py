"""Cost of `density` (SLQ + Hutchinson + Hutch++) on a digits-sized MLP, in products and seconds.

Model 64-128-64-10 tanh (17,226 parameters), 1797 samples of 64 features and 10 classes
(random inputs with the shape of sklearn's digits, so the script needs no download),
cross-entropy, mean reduction, float32 by default. Usage:

    .venv/bin/python benchmarks/density_cost.py [--dtype float64] [--exact] [--threads 1]

--quick: 256 samples, SLQ 4 x 20, 30 trace products, no repeats (seconds).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from curvscope import Problem
from curvscope.diagnostics import density
from curvscope.linalg import exact_trace
from curvscope.operators import HessianOperator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--exact", action="store_true", help="also time the exact trace (P products)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a check (seconds)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 256 if args.quick else 1797
    x = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10)
    ).to(device=args.device, dtype=dtype)
    data = [
        (
            x[i : i + args.batch_size].to(args.device, dtype),
            y[i : i + args.batch_size].to(args.device),
        )
        for i in range(0, n, args.batch_size)
    ]
    problem = Problem(model, "cross_entropy", data, reduction="mean")
    print(f"P = {problem.num_params}, N = {problem.num_samples}, {args.dtype} on {args.device}")

    def timed(label, fn, reps=1, warm=True):
        if warm:
            fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / reps
        print(f"{label:<44s} {dt:8.3f} s")
        return out, dt

    reps = 1 if args.quick else 5
    _, t_grad = timed("gradient (one pass)", lambda: problem.loss_and_grad(), reps=reps)
    H = HessianOperator(problem)
    V = torch.randn(problem.num_params, 20, generator=g).to(args.device, dtype)
    _, t_hvp = timed("Hessian @ V, 20 columns (one pass)", lambda: H @ V, reps=min(reps, 3))
    sizes = dict(num_probes=4, num_steps=20, trace_probes=30) if args.quick else {}
    print(f"  per column: {t_hvp / 20:.4f} s = {t_hvp / 20 / t_grad:.2f} gradients")
    res, t_all = timed(
        "density() "
        + (
            "SLQ 4x20, 30 trace products"
            if args.quick
            else "defaults (SLQ 20x80, Hutchinson 100, Hutch++ 100)"
        ),
        lambda: density(H, exact_trace_max=0, **sizes),
        warm=False,
    )
    d = res.densities[0]
    print(
        f"  SLQ: {d.num_matvecs} products, {d.wall_time_s:.2f} s; "
        f"tr = {d.slq_trace:.6g} ± {d.slq_trace_stderr:.2g}"
    )
    for t in res.traces:
        print(
            f"  {t.estimator}: {t.num_matvecs} products, {t.wall_time_s:.2f} s; "
            f"tr = {t.estimate:.6g} ± {t.stderr:.2g}"
        )
    print(f"  total products {res.num_matvecs}")
    if args.exact:
        ex, _ = timed(
            "exact trace (P products, 64 columns each)",
            lambda: exact_trace(H, max_dim=10**6),
            warm=False,
        )
        for t in res.traces:
            z = (t.estimate - ex.estimate) / t.stderr if t.stderr else float("nan")
            print(f"  exact {ex.estimate:.8g}; {t.estimator} off by {z:+.2f} stderr")


if __name__ == "__main__":
    main()
