"""compare benchmark (issue 5 item 9): time and products per approximation on digits-mlp.

Each approximation is compared with the Hessian in its own ``compare(H, {name: op})`` call
(per-layer blocks, top-5): the wall time is that call's (the Hessian reference included), the
products are split into the reference's and the approximation's own.

Usage:  python benchmarks/compare.py [--quick] [--out DIR]
Writes a markdown table to stdout and JSON to DIR/compare.json (default benchmarks/out; with
--quick a fresh temporary folder). --quick: 256 samples, three approximations (seconds).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import curvscope as cs
from curvscope._examples import make_example
from curvscope.diagnostics import COMPARE_MATRICES, compare
from curvscope.io import load_checkpoint, load_dataset
from curvscope.operators import make_operator

OUT = Path(__file__).parent / "out"
torch.set_flush_denormal(True)  # as the CLI does (see RESULTS.md)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 samples, 3 matrices (seconds)")
    ap.add_argument("--out", type=Path, default=None, help="folder for compare.json")
    args = ap.parse_args()
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else OUT)

    d = Path(tempfile.mkdtemp())
    make_example("digits-mlp", d)
    model = load_checkpoint(d / "model.pt").model
    data = load_dataset(d / "data.npz")
    if args.quick:
        problem = cs.Problem(model, "cross_entropy", [(data.x[:256], data.y[:256])])
        names = ["ggn", "empirical-fisher", "kfac"]
    else:
        problem = cs.Problem(model, "cross_entropy", data.batches(512))
        names = list(COMPARE_MATRICES)
    H = cs.hessian(problem)
    rows = []
    for name in names:
        try:
            op = make_operator(name, problem)
        except cs.UnsupportedModelError as exc:  # a finding, recorded with its reason
            rows.append({"matrix": name, "skipped": str(exc)})
            continue
        t0 = time.perf_counter()
        res = compare(H, {name: op}, top_k=5)
        wall = time.perf_counter() - t0
        own = sum(r.num_matvecs for r in res.comparisons)
        rows.append(
            {
                "matrix": name,
                "wall_s": wall,
                "reference_products": res.num_matvecs - own,
                "products": own,
                "rel_frobenius": {r.block: round(r.rel_frobenius, 3) for r in res.comparisons},
                "skipped": "; ".join(s["reason"] for s in res.skipped),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    print(
        "| matrix | wall s (with the Hessian reference) | reference products | own products "
        "| rel. Frobenius error per layer |"
    )
    print("|---|---:|---:|---:|---|")
    for r in rows:
        if "wall_s" not in r:
            print(f"| {r['matrix']} | - | - | - | skipped: {r['skipped']} |")
            continue
        errs = " / ".join(f"{v:.2f}" for v in r["rel_frobenius"].values())
        print(
            f"| {r['matrix']} | {r['wall_s']:.2f} | {r['reference_products']} | {r['products']} "
            f"| {errs} {r['skipped']} |"
        )
    print(f"wrote {out / 'compare.json'}")


if __name__ == "__main__":
    main()
