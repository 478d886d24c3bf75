"""Products and time to reach a loss target: curvscope's solvers vs torch.optim.LBFGS and scipy.

Model 64-32-10 tanh (2,410 parameters) on 1797 samples of 64 features and 10 classes
(random inputs with the shape of sklearn's digits, labels from a random teacher network so
the problem is learnable; no download), cross-entropy, mean reduction, weight decay 1e-3,
float64. The target is ``L* + 1e-3 (L0 - L*)`` with ``L*`` from a long scipy L-BFGS-B run.
For every method: loss evaluations + gradients ("gradients"), Hessian/GGN products
("products") and wall time until the loss first reaches the target (from the traces).

    .venv/bin/python benchmarks/solvers.py [--max-iter 300] [--threads N] [--quick]

--quick: 256 samples, 5 iterations per method and the target halfway to L*, for a check
that it runs (seconds).

Prints a markdown table (paste into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import scipy.optimize
import torch
from torch import nn

from curvscope import Problem
from curvscope.operators import HessianOperator
from curvscope.solvers import ProblemObjective, run_solver


def build(n: int = 1797):
    """The model, a problem on it and the data batches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g, dtype=torch.float64)
    teacher = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    with torch.no_grad():
        y = teacher(x).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    data = [(x[i : i + 512], y[i : i + 512]) for i in range(0, n, 512)]
    return model, data, Problem(model, "cross_entropy", data, weight_decay=1e-3)


def _first(trace_loss, target):
    for i, v in enumerate(trace_loss):
        if v is not None and v <= target:
            return i
    return None


def scipy_run(problem, method, max_iter):
    """scipy.optimize.minimize with fun+jac (and hessp through ``to_scipy``): loss history."""
    obj = ProblemObjective(problem)
    w0 = problem.param_vector().numpy()
    counts = {"grad": 0, "hessp": 0}
    history = []
    t0 = time.perf_counter()

    def fun(w):
        counts["grad"] += 1
        value, grad = problem.loss_and_grad(torch.from_numpy(w))
        return float(value), grad.numpy()

    def hessp(w, p):
        counts["hessp"] += 1
        op = HessianOperator(obj.work_problem(torch.from_numpy(w))).to_scipy()
        return op @ p

    def callback(intermediate_result):
        history.append(
            (
                float(intermediate_result.fun),
                counts["grad"],
                counts["hessp"],
                time.perf_counter() - t0,
            )
        )

    kw = {"jac": True, "callback": callback, "options": {"maxiter": max_iter}}
    if method == "Newton-CG":
        kw["hessp"] = hessp
    elif method == "L-BFGS-B":
        kw["options"].update(maxcor=10, ftol=0, gtol=1e-12)
    scipy.optimize.minimize(fun, w0, method=method, **kw)
    return history


def torch_lbfgs(model, data, max_iter):
    """torch.optim.LBFGS (history 10, strong Wolfe) on the full batch: loss history."""
    model = copy.deepcopy(model)
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1, history_size=10, line_search_fn="strong_wolfe", max_iter=1
    )
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    counts = {"grad": 0}
    history = []
    t0 = time.perf_counter()

    def closure():
        counts["grad"] += 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + 0.5e-3 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(max_iter):
        opt.step(closure)
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(x), y)
            loss = loss + 0.5e-3 * sum((p * p).sum() for p in model.parameters())
        history.append((float(loss), counts["grad"], 0, time.perf_counter() - t0))
    return history


class _Rows(list):
    """Rows printed as they are added (a long run shows its progress)."""

    def append(self, row) -> None:
        super().append(row)
        label, grads, prods, secs, loss = row
        if grads is None:
            print(f"| {label} | not reached | | | {loss:.6f} |", flush=True)
        else:
            print(f"| {label} | {grads} | {prods} | {secs:.2f} | {loss:.6f} |", flush=True)


def main() -> None:
    """Run every method and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-iter", type=int, default=150)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="256 samples, 5 iterations (seconds)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.max_iter = 5
    model, data, problem = build(256 if args.quick else 1797)
    ref = scipy_run(problem, "L-BFGS-B", 100 if args.quick else 1000)
    l_star = min(h[0] for h in ref)
    l0 = float(problem.loss())
    # --quick: a loose target (halfway), so that the rows that reach it are exercised too
    target = l_star + (0.5 if args.quick else 1e-3) * (l0 - l_star)
    print(
        f"\nL0 = {l0:.6f}, L* = {l_star:.6f}, target = {target:.6f} "
        f"({problem.num_params} parameters, {problem.num_samples} samples, float64)\n"
    )
    print("| method | loss evals + gradients | Hessian/GGN products | time (s) | loss |")
    print("|---|---:|---:|---:|---:|", flush=True)
    rows = _Rows()
    for name in ("lbfgs", "nlcg", "newton-cg", "hf"):
        run = run_solver(problem, name, max_iter=args.max_iter, tol=0)
        i = _first(run.trace["loss"], target)
        if i is None:
            rows.append((f"curvscope {name}", None, None, None, run.trace["loss"][-1]))
            continue
        t = run.trace
        rows.append(
            (
                f"curvscope {name}",
                t["gradients"][i] + t["loss_evals"][i],
                t["matvecs"][i],
                t["wall_time_s"][i],
                t["loss"][i],
            )
        )
    for label, hist in (
        ("torch.optim.LBFGS", torch_lbfgs(model, data, args.max_iter)),
        ("scipy L-BFGS-B", scipy_run(problem, "L-BFGS-B", args.max_iter)),
        ("scipy Newton-CG (hessp via to_scipy)", scipy_run(problem, "Newton-CG", args.max_iter)),
    ):
        hit = [h for h in hist if h[0] <= target]
        if hit:
            rows.append((label, hit[0][1], hit[0][2], hit[0][3], hit[0][0]))
        else:
            rows.append((label, None, None, None, hist[-1][0] if hist else None))
    print(
        f"\nL0 = {l0:.6f}, L* = {l_star:.6f}, target = {target:.6f} "
        f"({problem.num_params} parameters, {problem.num_samples} samples, float64)\n"
    )
    print("| method | loss evals + gradients | Hessian/GGN products | time (s) | loss |")
    print("|---|---:|---:|---:|---:|")
    for label, grads, prods, secs, loss in rows:
        if grads is None:
            print(f"| {label} | not reached | | | {loss:.6f} |")
        else:
            print(f"| {label} | {grads} | {prods} | {secs:.2f} | {loss:.6f} |")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
