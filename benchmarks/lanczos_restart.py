"""Thick-restart Lanczos (``curvscope.linalg.eigsh``) against scipy ARPACK and its peers.

Top-5 and bottom-2 Hessian eigenpairs, at the default tolerance (residual <= 1e-4 ||A||):
products (counted per column by the operator, final residual check included), wall time,
and the error against a float64 reference (scipy ``eigsh`` with ``tol=1e-12`` on a float64
copy of the same model and data), on

  (a) the digits-mlp example (float32, P = 17226, 1797 samples in batches of 512);
  (b) a 64-64-64-10 tanh MLP (P = 8970) trained here in float64 with full-batch Adam (lr 3e-3,
      800 steps, seed 0) on the first 1000 digits samples (one batch).

Peers: scipy ``eigsh(which="LA" / "SA", tol=1e-4)`` on ``HessianOperator.to_scipy()`` (the same
products; the one-shot ``eigenpairs`` it replaced is gone, its figures stay in RESULTS.md),
and hessian-eigenthings'
Lanczos if it imports (fed ONE full batch: with several batches it weights them equally, not
by size, and is off by 8% on digits-mlp; shared/peer-baselines.md).

Usage:  OMP_NUM_THREADS=1 python benchmarks/lanczos_restart.py [--quick]
Prints markdown tables. --quick: (a) on 128 samples, (b) 50 Adam steps on 200 samples, for a
check that it runs (seconds; the figures mean nothing then).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from curvscope import Problem
from curvscope._examples import make_example
from curvscope.io import load_checkpoint, load_dataset
from curvscope.linalg import eigsh
from curvscope.operators import HessianOperator

# Same setting as the curvscope command line (benchmarks/spectrum.py): float32 subnormals from
# saturated units made one digits-mlp gradient 25x slower.
torch.set_flush_denormal(True)


def digits():
    d = Path(tempfile.mkdtemp())
    make_example("digits-mlp", d)
    model = load_checkpoint(d / "model.pt").model
    ds = load_dataset(d / "data.npz")
    return model, torch.as_tensor(ds.x), torch.as_tensor(ds.y)


def model_a(quick=False):
    model, x, y = digits()
    if quick:
        x, y = x[:128], y[:128]
    batches = [(x[i : i + 512], y[i : i + 512]) for i in range(0, x.shape[0], 512)]
    return "(a) digits-mlp, float32", model, batches


def model_b(quick=False):
    _, x, y = digits()
    n = 200 if quick else 1000
    x, y = x[:n].double(), y[:n]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    ).double()
    # lr 3e-3 and 800 steps: ||H|| = 0.132, the tolerance 1.3e-5 of the run where the one-shot
    # eigenpairs(top=1, bottom=1) was seen to stop unconverged at 100 steps.
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(50 if quick else 800):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    return f"(b) 64-64-64-10 tanh, float64, train loss {loss:.2e}", model, [(x, y)]


def reference(model, batches):
    """Top-5 and bottom-2 eigenvalues of the float64 Hessian (ARPACK, tol 1e-12)."""
    from scipy.sparse.linalg import eigsh as sp_eigsh

    m64 = copy.deepcopy(model).double()
    b64 = [(x.double(), y) for x, y in batches]
    op = HessianOperator(Problem(m64, "cross_entropy", b64)).to_scipy()
    top = sp_eigsh(op, k=5, which="LA", tol=1e-12, ncv=40, return_eigenvectors=False)
    bottom = sp_eigsh(op, k=2, which="SA", tol=1e-12, ncv=40, return_eigenvectors=False)
    return np.sort(top)[::-1], np.sort(bottom)


def errors(vals, ref):
    vals = np.asarray(vals, dtype=np.float64)
    err = np.abs(vals - ref[: len(vals)])
    return float(err.max()), float((err / np.abs(ref[: len(vals)])).max())


def run_model(name, model, batches):
    H = HessianOperator(Problem(model, "cross_entropy", batches))
    P = H.shape[0]
    t0 = time.perf_counter()
    ref_top, ref_bottom = reference(model, batches)
    t_ref = time.perf_counter() - t0
    refs = {"top": ref_top, "bottom": ref_bottom}
    rows = []

    def add(method, which, products, wall, vals, note=""):
        ea, er = errors(vals, refs[which])
        rows.append((method, which, products, wall, ea, er, note))

    def counted(fn):
        before = H.num_matvecs
        t = time.perf_counter()
        out = fn()
        return out, H.num_matvecs - before, time.perf_counter() - t

    def conv_note(res):
        worst = float((res.residual_norms / (res.tol * res.norm_estimate)).max())
        ok = "converged" if res.all_converged else "NOT converged"
        return f"{ok}; max residual / (tol ||A||) = {worst:.2f}"

    # curvscope thick-restart Lanczos, each end alone and both ends in one call
    for top, bottom in ((5, 0), (0, 2), (5, 2)):
        out, n, wall = counted(lambda t=top, b=bottom: eigsh(H, top=t, bottom=b))
        assert n == out[0].num_matvecs
        label = "eigsh (both ends, one call)" if top and bottom else "eigsh"
        for res in out:
            extra = f"restarts {res.restarts}; " if res.restarts else ""
            add(f"curvscope {label}", res.which, n, wall, res.eigenvalues, extra + conv_note(res))

    # scipy ARPACK on the same operator
    from scipy.sparse.linalg import eigsh as sp_eigsh

    sp = H.to_scipy()
    for which, k, end in (("LA", 5, "top"), ("SA", 2, "bottom")):
        vals, n, wall = counted(
            lambda w=which, kk=k: sp_eigsh(sp, k=kk, which=w, tol=1e-4, return_eigenvectors=False)
        )
        vals = np.sort(vals)[::-1] if end == "top" else np.sort(vals)
        add(f"scipy eigsh ({which}, tol=1e-4)", end, n, wall, vals, "")

    # hessian-eigenthings, one full batch so its average is the true mean
    try:
        from hessian_eigenthings import HessianOperator as ETH
        from hessian_eigenthings import lanczos as et_lanczos
        from hessian_eigenthings import supervised_loss
    except ImportError as exc:
        print(f"skip hessian-eigenthings: not installed ({exc}); see benchmarks/install-peers.sh")
        rows.append(("hessian-eigenthings", "-", None, None, None, None, f"missing: {exc}"))
    else:
        xs = torch.cat([x for x, _ in batches])
        ys = torch.cat([y for _, y in batches])
        op = ETH(model, [(xs, ys)], supervised_loss(nn.CrossEntropyLoss()), full_dataset=True)
        count = {"n": 0}
        orig = op.matvec

        def matvec(v):
            count["n"] += 1
            return orig(v)

        op.matvec = matvec
        for which, k, end in (("LA", 5, "top"), ("SA", 2, "bottom")):
            for steps in (None, 100):
                count["n"] = 0
                t = time.perf_counter()
                res = et_lanczos(op, k=k, max_iter=steps, which=which, seed=0, reorthogonalize=True)
                wall = time.perf_counter() - t
                vals = res.eigenvalues.detach().double().cpu().numpy()
                vals = np.sort(vals)[::-1] if end == "top" else np.sort(vals)
                label = "default max_iter=2k" if steps is None else f"max_iter={steps}"
                add(f"hessian-eigenthings lanczos ({label})", end, count["n"], wall, vals, "")
        for p in model.parameters():
            p.grad = None

    print(f"\n### {name}: P = {P}\n")
    print(
        f"reference (float64 ARPACK, tol 1e-12, {t_ref:.1f} s): top-5 "
        + ", ".join(f"{v:.6g}" for v in ref_top)
        + "; bottom-2 "
        + ", ".join(f"{v:.6g}" for v in ref_bottom)
        + "\n"
    )
    print("| method | end | products | wall s | max abs err | max rel err | notes |")
    print("|---|---|---:|---:|---:|---:|---|")
    for method, which, n, wall, ea, er, note in rows:
        cells = [
            method,
            which,
            "-" if n is None else str(n),
            "-" if wall is None else f"{wall:.2f}",
            "-" if ea is None else f"{ea:.1e}",
            "-" if er is None else f"{er:.1e}",
            note,
        ]
        print("| " + " | ".join(cells) + " |")
    return H


def old_vs_new_both_ends(H):
    """(b): the one-shot Lanczos at its defaults against eigsh at its defaults, top=1 bottom=1."""
    print("\n### (b) top=1, bottom=1 at the defaults\n")
    print("| method | products | steps | end | eigenvalue | residual | tol x ||A|| | converged |")
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for label, fn in (
        ("eigsh (thick restart)", lambda: eigsh(H, top=1, bottom=1)),
    ):
        for res in fn():
            print(
                f"| {label} | {res.num_matvecs} | {res.num_iters} | {res.which} | "
                f"{float(res.eigenvalues[0]):.6g} | {float(res.residual_norms[0]):.2e} | "
                f"{res.tol * res.norm_estimate:.2e} | {bool(res.converged[0])} |"
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a check (seconds)")
    quick = ap.parse_args().quick
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    run_model(*model_a(quick))
    H = run_model(*model_b(quick))
    old_vs_new_both_ends(H)


if __name__ == "__main__":
    main()
