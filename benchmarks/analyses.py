"""Cost of issue 23's analyses against the plain computations they stand beside.

1. Adam's preconditioned sharpness: products of a top-1 Lanczos on ``P^-1/2 H P^-1/2`` (P from
   a real AdamW state after a few steps) against a plain top-1 on H, on tiny-gpt (target:
   the same number of products within 10%; the preconditioned matrix is another matrix, so
   its count may differ by its spectrum's gaps, not by the wrapper).
2. The class decomposition (``class_structure``: one pass for the C^2 class means, exact
   eigenpairs of the class and cross parts from their Gram matrices) against a full top-C(C+1)
   Lanczos of the GGN, on the digits CNN: wall time and products.

Usage:  OMP_NUM_THREADS=1 python benchmarks/analyses.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import curvscope as cs
from curvscope._examples import make_example
from curvscope.operators import class_structure


def preconditioned_cost(quick: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="analyses-"))
    name = "digits-mlp" if quick else "tiny-gpt"
    make_example(name, root)
    prob = cs.load(str(root / "model.pt"), samples=16 if quick else 64, batch_size=16)
    opt = torch.optim.AdamW(prob.model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(3):  # a real state: three AdamW steps on the analysed data
        opt.zero_grad()
        _, g = prob.loss_and_grad()
        for p, piece in zip(prob.model.parameters(), prob.unflatten(g).values(), strict=True):
            p.grad = piece.clone()
        opt.step()
    prob = cs.load(prob.model, prob.data, loss=prob.loss_fn)
    H = cs.hessian(prob)
    P = cs.preconditioner(opt, prob)
    rows = []
    for label, op in (("H", H), ("P^-1/2 H P^-1/2", cs.preconditioned(H, P))):
        t0 = time.perf_counter()
        res = cs.lanczos(op, top=1, seed=0)
        rows.append((label, res.num_matvecs, time.perf_counter() - t0,
                     float(res.eigenvalues[0]), bool(res.converged.all())))
    print(f"\n{name}, {prob.num_params} parameters, AdamW state after 3 steps")
    print("| matrix | products | wall s | top eigenvalue | converged |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.6g} | {r[4]} |")
    print(f"product ratio preconditioned/plain: {rows[1][1] / rows[0][1]:.2f}")


def class_cost(quick: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="analyses-"))
    name = "digits-mlp" if quick else "digits-cnn"
    make_example(name, root)
    prob = cs.load(str(root / "model.pt"), samples=200 if quick else None)
    t0 = time.perf_counter()
    parts = class_structure(prob)
    vals_class, _ = parts.class_part.eigh()
    vals_cross, _ = parts.cross_part.eigh()
    t_class = time.perf_counter() - t0
    C = parts.num_classes
    k = min(C * (C + 1), prob.num_params - 1)
    t0 = time.perf_counter()
    res = cs.lanczos(cs.ggn(prob), top=k, seed=0, tol=1e-4)
    t_lanczos = time.perf_counter() - t0
    print(f"\n{name}, {prob.num_params} parameters, {prob.num_samples} samples, C = {C}")
    print("| computation | wall s | products |")
    print("|---|---:|---:|")
    print(f"| class decomposition (C^2 means, exact class/cross eigenpairs) | {t_class:.2f} | "
          f"1 pass |")
    print(f"| GGN top-{k} by Lanczos | {t_lanczos:.2f} | {res.num_matvecs} |")
    print(f"time ratio decomposition/Lanczos: {t_class / t_lanczos:.2f}; class top "
          f"{float(vals_class[0]):.4g}, cross top {float(vals_cross[0]):.4g}, GGN top "
          f"{float(res.eigenvalues[0]):.4g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits-mlp only, small subsets")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    preconditioned_cost(args.quick)
    class_cost(args.quick)


if __name__ == "__main__":
    main()
