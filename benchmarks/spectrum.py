"""Spectrum benchmark: curvscope against PyHessian, hessian-eigenthings and curvlinops.

One process, the same models and data for everyone (issue 3 item 12):
  (a) one full-data HVP over one full-data gradient;
  (b) A @ V with 8 columns over 8 single products (curvscope);
  (c) top-5 Hessian eigenvalues: products, wall time and max relative error against a float64
      reference (scipy eigsh tol=1e-10 on a float64 copy), each method at residual 1e-4 of
      ||A|| or the best it reaches.

Usage:  python benchmarks/spectrum.py [--quick] [--models digits-mlp,veitch-mlp] [--out DIR]
Writes a markdown table to stdout and JSON to DIR/spectrum.json (default benchmarks/out; with
--quick a fresh temporary folder). Peers that are not installed (benchmarks/install-peers.sh)
are skipped with a printed line and a "not installed" row; any other error fails the run.
--quick: digits-mlp on 256 samples, 2 repeats, for a check that the script runs (seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from curvscope import Problem
from curvscope._examples import make_example
from curvscope.io import load_checkpoint, load_dataset
from curvscope.linalg import eigsh as cs_eigsh
from curvscope.linalg import power_iteration
from curvscope.operators import HessianOperator

OUT = Path(__file__).parent / "out"

# Same setting as the curvscope command line, for every method alike: float32 subnormals
# from saturated units made one digits-mlp gradient 25x slower (700 ms against 28 ms).
torch.set_flush_denormal(True)


# ------------------------------------------------------------------ models
def digits_mlp(samples: int | None = None):
    d = Path(tempfile.mkdtemp())
    make_example("digits-mlp", d)
    model = load_checkpoint(d / "model.pt").model
    ds = load_dataset(d / "data.npz")
    if samples is None:
        return "digits-mlp", model, ds.x, ds.y, 512
    return f"digits-mlp ({samples} samples)", model, ds.x[:samples], ds.y[:samples], 128


def veitch_mlp():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4096, 784, generator=g)
    teacher = torch.randn(784, 10, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(4096, 10, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 300), nn.Sigmoid(), nn.Linear(300, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return "veitch-mlp (784-300-10 sigmoid, 4096 synthetic)", model, x, y, 1024


# ------------------------------------------------------------------ helpers
def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, run round-robin so load drifts hit all alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def reference_top5(model, batches):
    m64 = copy.deepcopy(model).double()
    b64 = [(x.double(), y) for x, y in batches]
    problem = Problem(m64, "cross_entropy", b64)
    from scipy.sparse.linalg import eigsh

    vals = eigsh(
        HessianOperator(problem).to_scipy(), k=5, which="LA", tol=1e-10, return_eigenvectors=False
    )
    return np.sort(vals)[::-1]


def rel_err(values, ref):
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1][: len(ref)]
    return float(np.max(np.abs(values - ref[: len(values)]) / np.abs(ref[: len(values)])))


# ------------------------------------------------------------------ peers
def missing(peer: str, exc: ImportError, rows: list) -> None:
    """A peer that is not installed: a printed skip line and a row saying so."""
    print(f"skip {peer}: not installed ({exc}); see benchmarks/install-peers.sh")
    rows.append((peer, None, None, None, "not installed"))


def peer_rows(model, batches, ref, norm):
    rows = []
    loader = batches

    try:
        from pyhessian import hessian as PyHessian
    except ImportError as exc:
        missing("pyhessian", exc, rows)
    else:
        crit = nn.CrossEntropyLoss()
        t0 = time.perf_counter()
        hc = PyHessian(model, crit, dataloader=loader, cuda=False)
        counter = {"n": 0}
        orig = hc.dataloader_hv_product

        def counted(v):
            counter["n"] += 1
            return orig(v)

        hc.dataloader_hv_product = counted
        vals, _ = hc.eigenvalues(maxIter=100, tol=1e-3, top_n=5)
        rows.append(
            (
                "pyhessian power (maxIter=100, tol=1e-3; its default)",
                time.perf_counter() - t0,
                counter["n"],
                rel_err(vals, ref),
                None,
            )
        )
        for p in model.parameters():
            p.grad = None

    try:
        from hessian_eigenthings import HessianOperator as ETH
        from hessian_eigenthings import lanczos as et_lanczos
        from hessian_eigenthings import supervised_loss
    except ImportError as exc:
        missing("hessian-eigenthings", exc, rows)
    else:
        op = ETH(model, loader, supervised_loss(nn.CrossEntropyLoss()), full_dataset=True)
        counter = {"n": 0}
        orig_matvec = op.matvec

        def matvec(v):
            counter["n"] += 1
            return orig_matvec(v)

        op.matvec = matvec
        for steps in (None, 30):
            counter["n"] = 0
            t0 = time.perf_counter()
            res = et_lanczos(op, k=5, max_iter=steps, tol=1e-4, which="LA", seed=0)
            vals = res.eigenvalues if hasattr(res, "eigenvalues") else res[0]
            label = "default max_iter=2k" if steps is None else f"max_iter={steps}"
            rows.append(
                (
                    f"hessian-eigenthings lanczos ({label})",
                    time.perf_counter() - t0,
                    counter["n"],
                    rel_err(torch.as_tensor(vals).numpy(), ref),
                    "weights batches equally, not by size (see notes)",
                )
            )

    try:
        from curvlinops import HessianLinearOperator
    except ImportError as exc:
        missing("curvlinops", exc, rows)
    else:
        from scipy.sparse.linalg import eigsh

        params = [p for p in model.parameters()]
        H = HessianLinearOperator(
            model, nn.CrossEntropyLoss(), params, loader, check_deterministic=False
        )
        Hs = H.to_scipy() if hasattr(H, "to_scipy") else H
        counter = {"n": 0}
        from scipy.sparse.linalg import LinearOperator

        def mv(v):
            counter["n"] += 1
            return Hs @ v

        lin = LinearOperator(Hs.shape, matvec=mv, dtype=np.float32)
        t0 = time.perf_counter()
        vals = eigsh(lin, k=5, which="LA", tol=1e-4, return_eigenvectors=False)
        rows.append(
            (
                "curvlinops + scipy eigsh (LA, tol=1e-4)",
                time.perf_counter() - t0,
                counter["n"],
                rel_err(vals, ref),
                None,
            )
        )
    return rows


# ------------------------------------------------------------------ main
def run_model(spec, repeats, peers):
    name, model, x, y, bs = spec
    batches = [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]
    problem = Problem(model, "cross_entropy", batches)
    H = HessianOperator(problem)
    P = problem.num_params
    g = torch.Generator().manual_seed(0)
    v = torch.randn(P, generator=g)
    V = torch.randn(P, 8, generator=g)
    t = interleaved({"grad": lambda: problem.loss_and_grad(), "hvp": lambda: H @ v}, repeats)
    t8 = interleaved(
        {"single8": lambda: [H @ V[:, i] for i in range(8)], "batched8": lambda: H @ V},
        max(3, repeats // 3),
    )
    ref = reference_top5(model, batches)
    rows = []
    t0 = time.perf_counter()
    (top,) = cs_eigsh(H, top=5, tol=1e-4, seed=0)
    rows.append(
        (
            "curvscope lanczos (tol=1e-4, measured residuals)",
            time.perf_counter() - t0,
            top.num_matvecs,
            rel_err(top.eigenvalues.numpy(), ref),
            f"all converged: {bool(top.converged.all())}, max residual/||A|| "
            f"{float(top.residual_norms.max()) / top.norm_estimate:.1e}",
        )
    )
    t0 = time.perf_counter()
    pw = power_iteration(H, 5, which="magnitude", tol=1e-4, max_iter=300, seed=0)
    rows.append(
        (
            "curvscope power iteration + deflation (Suk Alg. 5, tol=1e-4)",
            time.perf_counter() - t0,
            pw.num_matvecs,
            rel_err(pw.eigenvalues.numpy(), ref),
            f"converged {int(pw.converged.sum())}/5",
        )
    )
    from scipy.sparse.linalg import eigsh

    lin = H.to_scipy()
    before = H.num_matvecs
    t0 = time.perf_counter()
    vals = eigsh(lin, k=5, which="LA", tol=1e-4, return_eigenvectors=False)
    rows.append(
        (
            "curvscope HVP + scipy eigsh (LA, tol=1e-4)",
            time.perf_counter() - t0,
            H.num_matvecs - before,
            rel_err(vals, ref),
            None,
        )
    )
    if peers:
        rows.extend(peer_rows(model, batches, ref, top.norm_estimate))
    return {
        "model": name,
        "params": P,
        "samples": len(x),
        "batch_sizes": [len(b[0]) for b in batches],
        "grad_s": t["grad"],
        "hvp_over_grad": t["hvp"] / t["grad"],
        "batched8_over_single8": t8["batched8"] / t8["single8"],
        "reference_top5": ref.tolist(),
        "top5": [
            {"method": r[0], "wall_s": r[1], "products": r[2], "max_rel_error": r[3], "note": r[4]}
            for r in rows
        ],
    }


def markdown(results):
    lines = []
    for r in results:
        lines.append(f"### {r['model']}\n")
        lines.append(
            f"P = {r['params']}, N = {r['samples']}, batches = {r['batch_sizes']}, "
            f"one gradient = {1000 * r['grad_s']:.1f} ms\n"
        )
        lines.append(
            f"- HVP / gradient (median, interleaved): **{r['hvp_over_grad']:.2f}** (target <= 2.6)"
        )
        lines.append(
            f"- A @ V, 8 columns / 8 single products: "
            f"**{r['batched8_over_single8']:.2f}** (target <= 0.6)\n"
        )
        lines.append("| top-5 method | wall s | products | max rel. error | note |")
        lines.append("|---|---:|---:|---:|---|")
        for row in r["top5"]:
            wall = "-" if row["wall_s"] is None else f"{row['wall_s']:.2f}"
            prods = "-" if row["products"] is None else str(row["products"])
            err = "-" if row["max_rel_error"] is None else f"{row['max_rel_error']:.1e}"
            lines.append(f"| {row['method']} | {wall} | {prods} | {err} | {row['note'] or ''} |")
        lines.append(
            f"\nreference top-5 (float64 eigsh, tol 1e-10): "
            f"{', '.join(f'{v:.6g}' for v in r['reference_top5'])}\n"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--quick", action="store_true", help="digits-mlp on 256 samples, 2 repeats (seconds)"
    )
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--models", default="digits-mlp,veitch-mlp")
    ap.add_argument("--out", type=Path, default=None, help="folder for spectrum.json")
    args = ap.parse_args()
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else OUT)
    specs = {"digits-mlp": digits_mlp, "veitch-mlp": veitch_mlp}
    if args.quick:
        specs, names, repeats = {"digits-mlp": lambda: digits_mlp(256)}, ["digits-mlp"], 2
    else:
        names, repeats = args.models.split(","), 15
    results = [run_model(specs[n](), repeats, not args.no_peers) for n in names]
    out.mkdir(parents=True, exist_ok=True)
    (out / "spectrum.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"wrote {out / 'spectrum.json'}")


if __name__ == "__main__":
    main()
