"""compare benchmark (issue 5 item 9): time and products per approximation on digits-mlp.

Usage:  python benchmarks/compare.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from curvscope import Problem
from curvscope._examples import make_example
from curvscope.diagnostics import COMPARE_MATRICES, compare
from curvscope.io import load_checkpoint, load_dataset

OUT = Path(__file__).parent / "out"
torch.set_flush_denormal(True)  # as the CLI does (see RESULTS.md)


def main():
    d = Path(tempfile.mkdtemp())
    make_example("digits-mlp", d)
    model = load_checkpoint(d / "model.pt").model
    problem = Problem(model, "cross_entropy", load_dataset(d / "data.npz").batches(512))
    t0 = time.perf_counter()
    base = compare(problem, matrices=[], top_k=5)
    hessian_s = time.perf_counter() - t0
    rows = [
        {"matrix": "(hessian reference only)", "wall_s": hessian_s, "products": base.num_matvecs}
    ]
    for name in COMPARE_MATRICES:
        t0 = time.perf_counter()
        res = compare(problem, matrices=[name], top_k=5)
        wall = time.perf_counter() - t0
        errs = {r.block: round(r.rel_frobenius, 3) for r in res.comparisons}
        rows.append(
            {
                "matrix": name,
                "wall_s": wall - hessian_s,
                "products": res.num_matvecs - base.num_matvecs,
                "rel_frobenius": errs,
                "skipped": [s["reason"] for s in res.skipped],
            }
        )
    OUT.mkdir(exist_ok=True)
    (OUT / "compare.json").write_text(json.dumps(rows, indent=1))
    print(
        "| matrix | wall s (beyond the Hessian reference) | products | rel. Frobenius error |"
    )
    print("|---|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['matrix']} | {r['wall_s']:.2f} | {r['products']} | "
            f"{r.get('rel_frobenius', '')} {'; '.join(r.get('skipped', []))} |"
        )


if __name__ == "__main__":
    main()
