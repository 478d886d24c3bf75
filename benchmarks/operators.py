"""Operator benchmark: product cost of every curvscope matrix, and trace estimators vs peers.

(issue 4 item 8) On digits-mlp, in one process:
  - each operator's single product and 8-column product over one full-data gradient
    (targets: GGN and Fisher <= 3x, Hessian <= 2.6x), with curvlinops' GGN and Hessian
    products on the same model when installed;
  - Hutchinson and Hutch++ traces (100 products) from curvscope and curvlinops against the
    exact trace in float64 (BackPACK's exact Hessian diagonal, summed; without BackPACK,
    sum_i e_i^T H e_i from batched unit columns, P products);
  - PyHessian's density() is called to record whether it runs.

Usage:  python benchmarks/operators.py
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from curvscope import Problem
from curvscope._examples import make_example
from curvscope.io import load_checkpoint, load_dataset
from curvscope.linalg import exact_trace, hutchinson_trace, hutchpp_trace
from curvscope.operators import MATRIX_NAMES, make_operator

OUT = Path(__file__).parent / "out"

# Same setting as the curvscope command line, for every method alike: float32 subnormals
# from saturated units made one digits-mlp gradient 25x slower (700 ms against 28 ms).
torch.set_flush_denormal(True)


def interleaved(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def exact_trace_backpack(model, batches, n):
    """Exact trace (float64) from BackPACK's DiagHessian, or from P unit products without it."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagHessian
    except ImportError:
        m64 = copy.deepcopy(model).double()
        p64 = Problem(m64, "cross_entropy", [(x.double(), y) for x, y in batches])
        est = exact_trace(make_operator("hessian", p64), max_dim=p64.num_params)
        return est.estimate, "exact (float64, P unit products)"
    m = extend(copy.deepcopy(model).double())
    crit = extend(nn.CrossEntropyLoss(reduction="sum"))
    total = 0.0
    for x, y in batches:
        loss = crit(m(x.double()), y)
        with backpack(DiagHessian()):
            loss.backward()
        total += sum(float(p.diag_h.sum()) for p in m.parameters())
        m.zero_grad()
    return total / n, "exact (float64 BackPACK DiagHessian, summed)"


def main():
    d = Path(tempfile.mkdtemp())
    make_example("digits-mlp", d)
    model = load_checkpoint(d / "model.pt").model
    ds = load_dataset(d / "data.npz")
    batches = ds.batches(512)
    problem = Problem(model, "cross_entropy", batches)
    P = problem.num_params
    g = torch.Generator().manual_seed(0)
    v = torch.randn(P, generator=g)
    V = torch.randn(P, 8, generator=g)
    rows = []
    for name in MATRIX_NAMES:
        t0 = time.perf_counter()
        op = make_operator(name, problem, seed=0)
        op @ v  # first product builds caches (PCH per-sample blocks, KFAC factors)
        build = time.perf_counter() - t0
        t = interleaved(
            {
                "grad": lambda: problem.loss_and_grad(),
                "one": lambda op=op: op @ v,
                "eight": lambda op=op: op @ V,
            },
            7,
        )
        rows.append(
            {
                "matrix": name,
                "one_over_grad": t["one"] / t["grad"],
                "eight_per_column_over_grad": t["eight"] / 8 / t["grad"],
                "build_s": build,
            }
        )
    peers = []
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator

        params = list(model.parameters())
        for label, cls in (
            ("curvlinops GGN", GGNLinearOperator),
            ("curvlinops Hessian", HessianLinearOperator),
        ):
            op = cls(model, nn.CrossEntropyLoss(), params, batches, check_deterministic=False)
            vn = v
            t = interleaved(
                {"grad": lambda: problem.loss_and_grad(), "one": lambda op=op, vn=vn: op @ vn}, 7
            )
            peers.append({"matrix": label, "one_over_grad": t["one"] / t["grad"]})
    except Exception as exc:  # noqa: BLE001
        peers.append({"matrix": "curvlinops", "error": f"{type(exc).__name__}: {exc}"})

    # traces, float32 products, against the exact trace in float64: the sum of the exact
    # Hessian diagonal from BackPACK's DiagHessian (as in shared/peer-baselines.md); P unit
    # products would cost minutes here.
    t0 = time.perf_counter()
    exact, exact_method = exact_trace_backpack(model, batches, problem.num_samples)
    exact_s = time.perf_counter() - t0
    H = make_operator("hessian", problem)
    traces = [
        {
            "method": exact_method,
            "estimate": exact,
            "wall_s": exact_s,
            "products": P if "unit products" in exact_method else "-",
        }
    ]
    for label, fn in (
        ("curvscope hutchinson (100)", hutchinson_trace),
        ("curvscope hutch++ (99)", hutchpp_trace),
    ):
        t0 = time.perf_counter()
        n = 100 if "hutchinson" in label else 99
        est = fn(H, num_matvecs=n, generator=torch.Generator().manual_seed(0))
        traces.append(
            {
                "method": label,
                "estimate": est.estimate,
                "stderr": est.stderr,
                "wall_s": time.perf_counter() - t0,
                "products": est.num_matvecs,
                "rel_error": abs(est.estimate - exact) / abs(exact),
            }
        )
    try:
        from curvlinops import HessianLinearOperator
        from curvlinops import hutchinson_trace as cl_hutch
        from curvlinops import hutchpp_trace as cl_hpp

        op = HessianLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            list(model.parameters()),
            batches,
            check_deterministic=False,
        )
        for label, fn, n in (
            ("curvlinops hutchinson_trace (100)", cl_hutch, 100),
            ("curvlinops hutchpp_trace (99)", cl_hpp, 99),
        ):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            est = float(fn(op, n))
            traces.append(
                {
                    "method": label,
                    "estimate": est,
                    "wall_s": time.perf_counter() - t0,
                    "products": n,
                    "rel_error": abs(est - exact) / abs(exact),
                }
            )
    except Exception as exc:  # noqa: BLE001
        traces.append({"method": "curvlinops traces", "error": f"{type(exc).__name__}: {exc}"})
    try:
        from pyhessian import hessian as PyHessian

        hc = PyHessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
        hc.density(iter=10, n_v=1)
        pyh = "density() ran"
    except Exception as exc:  # noqa: BLE001
        pyh = f"density() failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    result = {
        "params": P,
        "products": rows,
        "peers": peers,
        "traces": traces,
        "pyhessian_density": pyh,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "operators.json").write_text(json.dumps(result, indent=1))
    print("| matrix | 1 product / gradient | 8 columns, per column / gradient | build s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['matrix']} | {r['one_over_grad']:.2f} | "
            f"{r['eight_per_column_over_grad']:.2f} | {r['build_s']:.2f} |"
        )
    for r in peers:
        print(
            f"| {r['matrix']} | {r.get('one_over_grad', float('nan')):.2f} | - | - | "
            f"{r.get('error', '')}"
        )
    print("\n| trace method | estimate | rel. error | products | wall s |")
    print("|---|---:|---:|---:|---:|")
    for r in traces:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']} | | | |")
            continue
        rel = r.get("rel_error")
        print(
            f"| {r['method']} | {r['estimate']:.5g} | {'' if rel is None else f'{rel:.1e}'} | "
            f"{r['products']} | {r['wall_s']:.2f} |"
        )
    print(f"\nPyHessian: {pyh}")


if __name__ == "__main__":
    main()
