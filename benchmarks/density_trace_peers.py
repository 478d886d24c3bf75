"""Density and trace on digits-mlp: curvscope against hessian-eigenthings.

(issue 4 item 8) Same model, same data, one process. Exact trace from BackPACK's exact Hessian
diagonal in float64 (as in shared/peer-baselines.md). hessian-eigenthings' full-dataset
operator weights batches equally, so the data go in ONE batch for it (its algorithms, not its
batch weighting, are what is compared). A peer that is not installed (BackPACK,
hessian-eigenthings; benchmarks/install-peers.sh) is skipped with a printed line.

Usage: python benchmarks/density_trace_peers.py [--quick]
--quick: 256 samples, 30 trace products, SLQ 4 probes x 20 steps (seconds).
"""

import argparse
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
    """The float64 trace from BackPACK's exact Hessian diagonal; None without BackPACK."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagHessian
    except ImportError as exc:
        print(f"skip the exact trace: BackPACK not installed ({exc}); rel. error left out")
        return None
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a check (seconds)")
    args = ap.parse_args()
    m_hutch, m_hpp = (30, 30) if args.quick else (100, 99)
    probes, steps = (4, 20) if args.quick else (10, 80)

    d = Path(tempfile.mkdtemp())
    make_example("digits-mlp", d)
    model = load_checkpoint(d / "model.pt").model
    ds = load_dataset(d / "data.npz")
    x, y = (ds.x[:256], ds.y[:256]) if args.quick else (ds.x, ds.y)
    batches = [(x, y)] if args.quick else ds.batches(512)
    problem = Problem(model, "cross_entropy", batches)
    exact = exact_trace(model, batches, problem.num_samples)
    rows = []

    def add(label, est, stderr, products, wall):
        rel = None if exact is None else abs(est - exact) / abs(exact)
        rows.append((label, est, stderr, rel, products, wall))

    H = HessianOperator(problem)
    for label, fn, m in (
        ("curvscope hutchinson", hutchinson_trace, m_hutch),
        ("curvscope hutch++", hutchpp_trace, m_hpp),
    ):
        t0 = time.perf_counter()
        r = fn(H, num_matvecs=m, seed=0)
        add(label, r.estimate, r.stderr, m, time.perf_counter() - t0)
    try:
        from hessian_eigenthings import HessianOperator as ETH
        from hessian_eigenthings import hutch_plus_plus, hutchinson, supervised_loss
        from hessian_eigenthings import spectral_density as et_density
    except ImportError as exc:
        print(f"skip hessian-eigenthings: not installed ({exc}); see benchmarks/install-peers.sh")
        op = None
    else:
        op = ETH(model, [(x, y)], supervised_loss(nn.CrossEntropyLoss()), full_dataset=True)
        t0 = time.perf_counter()
        r = hutchinson(op, num_samples=m_hutch, seed=0)
        add(
            "hessian-eigenthings hutchinson (one batch)",
            r.estimate,
            r.stderr,
            m_hutch,
            time.perf_counter() - t0,
        )
        t0 = time.perf_counter()
        r = hutch_plus_plus(op, num_matvecs=m_hpp, seed=0)
        add(
            "hessian-eigenthings hutch++ (one batch)",
            r.estimate,
            r.stderr,
            m_hpp,
            time.perf_counter() - t0,
        )
    if exact is not None:
        print(f"exact trace (float64 BackPACK DiagHessian): {exact:.6g}\n")
    print("| trace method | estimate | stderr | rel. error | products | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, est, se, rel, prods, wall in rows:
        rel_s = "-" if rel is None else f"{rel:.1e}"
        print(f"| {label} | {est:.5g} | {se:.2g} | {rel_s} | {prods} | {wall:.2f} |")
    print(f"\n| density (SLQ, {probes} probes x {steps} steps) | wall s | products |")
    print("|---|---:|---:|")
    t0 = time.perf_counter()
    res = density(H, num_probes=probes, num_steps=steps, trace_probes=0, exact_trace_max=0)
    print(f"| curvscope density() | {time.perf_counter() - t0:.2f} | {res.num_matvecs} |")
    if op is not None:
        t0 = time.perf_counter()
        et_density(op, num_runs=probes, lanczos_steps=steps, seed=0)
        print(
            f"| hessian-eigenthings spectral_density (one batch) "
            f"| {time.perf_counter() - t0:.2f} | {probes * steps} |"
        )


if __name__ == "__main__":
    main()
