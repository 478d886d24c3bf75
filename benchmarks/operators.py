"""Operator benchmark: product cost of every curvscope matrix, and trace estimators vs peers.

(issue 4 item 8) On digits-mlp, in one process:
  - each operator's single product and 8-column product over one full-data gradient
    (targets: GGN and Fisher <= 3x, Hessian <= 2.6x), with curvlinops' GGN and Hessian
    products on the same model when installed;
  - Hutchinson and Hutch++ traces (100 products) from curvscope and curvlinops against the
    exact trace in float64 (BackPACK's exact Hessian diagonal, summed; without BackPACK,
    sum_i e_i^T H e_i from batched unit columns, P products);
  - PyHessian's density() is called to record whether it runs (its failure is a finding,
    printed and written).
A peer that is not installed (benchmarks/install-peers.sh) is skipped with a printed line.

Usage:  python benchmarks/operators.py [--quick] [--out DIR]
Writes DIR/operators.json (default benchmarks/out; with --quick a fresh temporary folder).
--quick: 64 samples, one repeat, 30 trace products (seconds).
"""

from __future__ import annotations

import argparse
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


def exact_trace_backpack(model, batches, n, quick=False):
    """Exact trace (float64) from BackPACK's DiagHessian, or from P unit products without it.

    With ``quick`` and no BackPACK: ``(None, reason)``, as P products take too long there.
    """
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagHessian
    except ImportError as exc:
        if quick:
            print(f"skip the exact trace: BackPACK not installed ({exc}) and --quick")
            return None, "exact: left out (--quick without BackPACK)"
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


def skip(peer: str, exc: ImportError) -> None:
    print(f"skip {peer}: not installed ({exc}); see benchmarks/install-peers.sh")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a check (seconds)")
    ap.add_argument("--out", type=Path, default=None, help="folder for operators.json")
    args = ap.parse_args()
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else OUT)
    repeats = 1 if args.quick else 7
    n_hutch, n_hpp = (30, 30) if args.quick else (100, 99)

    d = Path(tempfile.mkdtemp())
    make_example("digits-mlp", d)
    model = load_checkpoint(d / "model.pt").model
    ds = load_dataset(d / "data.npz")
    batches = [(ds.x[:64], ds.y[:64])] if args.quick else ds.batches(512)
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
            repeats,
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
    except ImportError as exc:
        skip("curvlinops", exc)
    else:
        params = list(model.parameters())
        for label, cls in (
            ("curvlinops GGN", GGNLinearOperator),
            ("curvlinops Hessian", HessianLinearOperator),
        ):
            op = cls(model, nn.CrossEntropyLoss(), params, batches, check_deterministic=False)
            vn = v
            t = interleaved(
                {"grad": lambda: problem.loss_and_grad(), "one": lambda op=op, vn=vn: op @ vn},
                repeats,
            )
            peers.append({"matrix": label, "one_over_grad": t["one"] / t["grad"]})

    # traces, float32 products, against the exact trace in float64: the sum of the exact
    # Hessian diagonal from BackPACK's DiagHessian (as in shared/peer-baselines.md); P unit
    # products would cost minutes here.
    t0 = time.perf_counter()
    exact, exact_method = exact_trace_backpack(model, batches, problem.num_samples, args.quick)
    exact_s = time.perf_counter() - t0
    H = make_operator("hessian", problem)
    traces = [
        {
            "method": exact_method,
            "estimate": exact,
            "wall_s": exact_s,
            "products": P if "unit products" in exact_method else "-",
            "rel_error": None,
        }
    ]
    for label, fn in (
        (f"curvscope hutchinson ({n_hutch})", hutchinson_trace),
        (f"curvscope hutch++ ({n_hpp})", hutchpp_trace),
    ):
        t0 = time.perf_counter()
        n = n_hutch if "hutchinson" in label else n_hpp
        est = fn(H, num_matvecs=n, seed=0)
        traces.append(
            {
                "method": label,
                "estimate": est.estimate,
                "stderr": est.stderr,
                "wall_s": time.perf_counter() - t0,
                "products": est.num_matvecs,
                "rel_error": None if exact is None else abs(est.estimate - exact) / abs(exact),
            }
        )
    try:
        from curvlinops import HessianLinearOperator
        from curvlinops import hutchinson_trace as cl_hutch
        from curvlinops import hutchpp_trace as cl_hpp
    except ImportError as exc:
        skip("curvlinops traces", exc)
    else:
        op = HessianLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            list(model.parameters()),
            batches,
            check_deterministic=False,
        )
        for label, fn, n in (
            (f"curvlinops hutchinson_trace ({n_hutch})", cl_hutch, n_hutch),
            (f"curvlinops hutchpp_trace ({n_hpp})", cl_hpp, n_hpp),
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
                    "rel_error": None if exact is None else abs(est - exact) / abs(exact),
                }
            )
    try:
        from pyhessian import hessian as PyHessian
    except ImportError as exc:
        skip("pyhessian", exc)
        pyh = "not installed"
    else:
        hc = PyHessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
        try:
            hc.density(iter=10, n_v=1)
            pyh = "density() ran"
        except Exception as exc:  # noqa: BLE001  (whether it runs is what is measured)
            pyh = f"density() failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    result = {
        "params": P,
        "products": rows,
        "peers": peers,
        "traces": traces,
        "pyhessian_density": pyh,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "operators.json").write_text(json.dumps(result, indent=1))
    print("| matrix | 1 product / gradient | 8 columns, per column / gradient | build s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['matrix']} | {r['one_over_grad']:.2f} | "
            f"{r['eight_per_column_over_grad']:.2f} | {r['build_s']:.2f} |"
        )
    for r in peers:
        print(f"| {r['matrix']} | {r['one_over_grad']:.2f} | - | - |")
    print("\n| trace method | estimate | rel. error | products | wall s |")
    print("|---|---:|---:|---:|---:|")
    for r in traces:
        est, rel = r["estimate"], r["rel_error"]
        print(
            f"| {r['method']} | {'-' if est is None else f'{est:.5g}'} | "
            f"{'' if rel is None else f'{rel:.1e}'} | {r['products']} | {r['wall_s']:.2f} |"
        )
    print(f"\nPyHessian: {pyh}")
    print(f"wrote {out / 'operators.json'}")


if __name__ == "__main__":
    main()
