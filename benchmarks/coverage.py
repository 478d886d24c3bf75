"""Coverage of curvscope's printed uncertainties: how often |estimate - truth| <= 2 sigma.

For every estimator that prints a ``± sigma`` (Hutchinson, Hutch++, SLQ's trace and the
``--repeats`` spread of ``spectrum``) this runs many seeds on matrices whose answer is known
exactly and counts the runs whose truth lies within two of the printed sigmas. A calibrated
sigma covers the truth in ~95.4% of runs (Gaussian errors); with 200 seeds the binomial
standard deviation of that fraction is 1.5 points, so [92%, 98%] is the +-2 sd band.

Matrices (``P = 100``, ``--quick``: 40), each ``Q diag(lambda) Q^T`` with a random rotation:

* ``flat``: eigenvalues uniform in [0.5, 1.5];
* ``decay``: ``10 * 0.9^i``, a decaying (curvature-like) spectrum;
* ``outlier``: one eigenvalue 50, the rest uniform in [-1, 1] (indefinite);
* ``mlp``: the exact Hessian of a tiny tanh MLP (cross-entropy, float64), built densely.

The ``--repeats`` spread is measured on a data-built Gram matrix ``(1/N) sum_i x_i x_i^T``
(``N_full`` samples, subsets of ``n``): its truth is the full-data top eigenvalue, and the
interval is a fresh ``n``-sample estimate ± 2 ``spread.std`` (the uncertainty the spread
describes: that of a mini-batch estimate of size ``n``).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/coverage.py            # 200 seeds
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/coverage.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's curvscope

from curvscope import Problem
from curvscope._sampling import subset_indices
from curvscope.diagnostics import spectrum
from curvscope.linalg import (
    DenseOperator,
    LinearOperator,
    hutchinson_trace,
    hutchpp_trace,
    slq,
    t_factor,
)
from curvscope.operators import HessianOperator

K = 2.0
"""Interval half-width in printed sigmas."""


def rotated(lam: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(lam.shape[0], lam.shape[0], generator=g, dtype=torch.float64)
    )
    return (q * lam) @ q.T


def spectra(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    flat = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    decay = 10 * 0.9 ** torch.arange(n, dtype=torch.float64)
    outlier = torch.cat(
        [
            torch.tensor([50.0], dtype=torch.float64),
            2 * torch.rand(n - 1, generator=g, dtype=torch.float64) - 1,
        ]
    )
    return {"flat": flat, "decay": decay, "outlier": outlier}


def mlp_hessian(hidden: int) -> torch.Tensor:
    """The dense Hessian of a tiny tanh MLP (6 -> hidden -> 3, cross-entropy, float64)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    problem = Problem(model, "cross_entropy", [(x, y)], reduction="mean")
    H = HessianOperator(problem).dense()
    return 0.5 * (H + H.T)


def matrices(n: int, hidden: int) -> dict[str, torch.Tensor]:
    out = {name: rotated(lam, 7 + i) for i, (name, lam) in enumerate(spectra(n).items())}
    out["mlp"] = mlp_hessian(hidden)
    return out


class Gram(LinearOperator):
    """``(1/N) X^T X`` over the rows of ``X``; ``on_subset`` draws rows without replacement."""

    SELF_ADJOINT = True
    name = "gram"

    def __init__(self, X: torch.Tensor) -> None:
        super().__init__((X.shape[1], X.shape[1]), dtype=X.dtype, device=X.device)
        self.X = X

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.X.T @ (self.X @ V) / self.X.shape[0]

    def on_subset(self, size: int, seed) -> Gram:
        return Gram(self.X[subset_indices(self.X.shape[0], size, seed)])


def cover(z: list[float]) -> tuple[int, float, float]:
    """Runs, coverage of |z| <= K and the standard deviation of z."""
    t = torch.tensor(z, dtype=torch.float64)
    fin = t[torch.isfinite(t)]
    return (
        len(z),
        float((t.abs() <= K).double().mean()),
        float(fin.std()) if fin.numel() > 1 else math.nan,
    )


def zscore(est: float, se: float, truth: float) -> float:
    if se == 0:
        return 0.0 if abs(est - truth) <= 1e-9 * max(1.0, abs(truth)) else math.inf
    return (est - truth) / se


def trace_rows(mats, seeds, quick):
    hutch = (10, 100) if not quick else (10, 30)
    hpp = (9, 30, 99) if not quick else (9, 30)
    slqs = ((5, 10), (20, 10)) if not quick else ((5, 10),)
    rows = []
    for name, M in mats.items():
        A = DenseOperator(M, symmetric=True)
        truth = float(torch.trace(M))
        for dist in ("rademacher", "gaussian"):
            for m in hutch:
                z = [
                    zscore(
                        *_est(hutchinson_trace(A, num_matvecs=m, distribution=dist, seed=s)), truth
                    )
                    for s in seeds
                ]
                rows.append(("hutchinson", f"m={m} {dist}", name, *cover(z)))
            for m in hpp:
                z = [
                    zscore(*_est(hutchpp_trace(A, num_matvecs=m, distribution=dist, seed=s)), truth)
                    for s in seeds
                ]
                rows.append(("hutchpp", f"m={m} {dist}", name, *cover(z)))
            for probes, steps in slqs:
                z = []
                for s in seeds:
                    q = slq(A, num_probes=probes, num_steps=steps, distribution=dist, seed=s)
                    m1, se1 = q.moment(1)
                    z.append(zscore(M.shape[0] * m1, M.shape[0] * se1, truth))
                rows.append(("slq trace", f"v={probes} {dist}", name, *cover(z)))
    return rows


def _est(t):
    return t.estimate, t.stderr


def repeat_rows(seeds, quick):
    """The ``--repeats`` spread: what ``spread.std`` covers, and what it does not."""
    p, n_full, n_sub = (10, 400, 40) if quick else (20, 2000, 100)
    rows = []
    for R in (5, 10) if not quick else (5,):
        z_full, z_fresh, z_pred = [], [], []
        for s in seeds:
            g = torch.Generator().manual_seed(10_000 + s)
            scale = torch.linspace(1.0, 3.0, p, dtype=torch.float64)
            X = torch.randn(n_full, p, generator=g, dtype=torch.float64) * scale
            op = Gram(X)
            truth = float(torch.linalg.eigvalsh(X.T @ X / n_full)[-1])
            res = spectrum(op, top=1, bottom=0, repeats=R, samples=n_sub, seed=s)
            sp = res.spectra[0].spread
            std, mean = sp["std"][0], sp["mean"][0]
            fresh = op.on_subset(n_sub, torch.Generator().manual_seed(99_999 + s))
            lam = float(torch.linalg.eigvalsh(fresh.X.T @ fresh.X / n_sub)[-1])
            z_full.append(zscore(lam, std, truth))
            z_fresh.append(zscore(lam, std, mean))
            z_pred.append(zscore(lam, std * t_factor(R) * math.sqrt(1 + 1 / R), mean))
        where = f"gram n={n_sub}/{n_full}"
        rows += [
            (
                "repeats spread",
                f"R={R} full-data value in fresh subset ± 2 std",
                where,
                *cover(z_full),
            ),
            (
                "repeats spread",
                f"R={R} fresh subset in subset mean ± 2 std",
                where,
                *cover(z_fresh),
            ),
            (
                "repeats spread",
                f"R={R} fresh subset in mean ± 2 t_factor(R) sqrt(1+1/R) std",
                where,
                *cover(z_pred),
            ),
        ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 30 seeds (seconds)")
    ap.add_argument("--only", default=None, help="comma list: hutchinson,hutchpp,slq,repeats")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_seeds = 30 if args.quick else args.seeds
    seeds = list(range(n_seeds))
    t0 = time.perf_counter()
    mats = matrices(40 if args.quick else 100, 8 if args.quick else 16)
    dims = ", ".join(f"{k} P={v.shape[0]}" for k, v in mats.items())
    import curvscope

    print(f"curvscope from {Path(curvscope.__file__).parent}")
    print(f"{n_seeds} seeds; matrices: {dims}; interval: estimate ± {K:g} sigma")
    rows = trace_rows(mats, seeds, args.quick) + repeat_rows(seeds, args.quick)
    if args.only:
        keep = args.only.split(",")
        rows = [r for r in rows if any(r[0].startswith(k) for k in keep)]
    head = ("estimator", "setting", "matrix", "runs", "coverage", "sd(z)", "")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for est, setting, mat, runs, cov, sd in rows:
        flag = "" if 0.92 <= cov <= 0.98 else ("LOW" if cov < 0.92 else "HIGH")
        print(f"| {est} | {setting} | {mat} | {runs} | {100 * cov:.1f}% | {sd:.2f} | {flag} |")
    print(f"wall {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
