"""Density and trace on digits-mlp: curvscope against hessian-eigenthings and curvlinops.

(issue 4 item 8) Same model, same data, one process. Exact trace from BackPACK's exact Hessian
diagonal in float64 (as in shared/peer-baselines.md). hessian-eigenthings' full-dataset
operator weights batches equally, so the data go in ONE batch for it (its algorithms, not its
batch weighting, are what is compared). Usage: python benchmarks/density_trace_peers.py
"""

import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from curvscope import Problem
from curvscope._examples import make_example
from curvscope.diagnostics import density
from curvscope.io import load_checkpoint, load_dataset
from curvscope.linalg import hutchinson_trace, hutchpp_trace
from curvscope.operators import HessianOperator

torch.set_flush_denormal(True)  # for every method alike, as the CLI does (RESULTS.md)


def exact_trace(model, batches, n):
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    m = extend(copy.deepcopy(model).double())
    crit = extend(nn.CrossEntropyLoss(reduction="sum"))
    total = 0.0
    for x, y in batches:
        with backpack(DiagHessian()):
            crit(m(x.double()), y).backward()
        total += sum(float(p.diag_h.sum()) for p in m.parameters())
        m.zero_grad()
    return total / n


def main():
    d = Path(tempfile.mkdtemp())
    make_example("digits-mlp", d)
    model = load_checkpoint(d / "model.pt").model
    ds = load_dataset(d / "data.npz")
    batches = ds.batches(512)
    problem = Problem(model, "cross_entropy", batches)
    exact = exact_trace(model, batches, problem.num_samples)
    rows = []

    def add(label, est, stderr, products, wall):
        rows.append((label, est, stderr, abs(est - exact) / abs(exact), products, wall))

    H = HessianOperator(problem)
    for label, fn, m in (
        ("curvscope hutchinson", hutchinson_trace, 100),
        ("curvscope hutch++", hutchpp_trace, 99),
    ):
        t0 = time.perf_counter()
        r = fn(H, num_matvecs=m, generator=torch.Generator().manual_seed(0))
        add(label, r.estimate, r.stderr, m, time.perf_counter() - t0)
    from hessian_eigenthings import HessianOperator as ETH
    from hessian_eigenthings import hutch_plus_plus, hutchinson, supervised_loss
    from hessian_eigenthings import spectral_density as et_density

    x, y = ds.x, ds.y
    op = ETH(model, [(x, y)], supervised_loss(nn.CrossEntropyLoss()), full_dataset=True)
    t0 = time.perf_counter()
    r = hutchinson(op, num_samples=100, seed=0)
    add(
        "hessian-eigenthings hutchinson (one batch)",
        r.estimate,
        r.stderr,
        100,
        time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    r = hutch_plus_plus(op, num_matvecs=99, seed=0)
    add(
        "hessian-eigenthings hutch++ (one batch)",
        r.estimate,
        r.stderr,
        99,
        time.perf_counter() - t0,
    )
    print(f"exact trace (float64 BackPACK DiagHessian): {exact:.6g}\n")
    print("| trace method | estimate | stderr | rel. error | products | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, est, se, rel, prods, wall in rows:
        print(f"| {label} | {est:.5g} | {se:.2g} | {rel:.1e} | {prods} | {wall:.2f} |")
    print("\n| density (SLQ, 10 probes x 80 steps) | wall s | products |")
    print("|---|---:|---:|")
    t0 = time.perf_counter()
    res = density(problem, num_probes=10, num_steps=80, trace_probes=0, exact_trace_max=0)
    print(f"| curvscope density() | {time.perf_counter() - t0:.2f} | {res.num_matvecs} |")
    t0 = time.perf_counter()
    et_density(op, num_runs=10, lanczos_steps=80, seed=0)
    print(
        f"| hessian-eigenthings spectral_density (one batch) | {time.perf_counter() - t0:.2f} "
        "| 800 |"
    )


if __name__ == "__main__":
    main()
