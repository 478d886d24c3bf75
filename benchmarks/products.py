"""Faster products (issue 24 item 6): batched columns, --compile, tiny-gpt HVP/G.

(a) Columns over kept graphs on the digits MLP (the example: 17k parameters, 1797 samples,
    batches of 512): the time of k Hessian columns, per column, over k single products
    (each a full-data product over the kept graphs), for each route:
      block     the operator's k-column product (a loop of second backwards over each
                kept graph, the graph retained): what curvscope runs for k > 1
      igb       torch.autograd.grad(..., is_grads_batched=True) over the kept graph
      func_vjp  torch.func.vjp of torch.func.grad per batch, kept as a closure, vmapped
                over the k cotangents
      fwd_rev   forward-over-reverse (jvp of grad) vmapped over the columns (no kept graph)
    Medians over interleaved rounds; each route's agreement with the block product.
    Beside it, what bounds any batching: the matmul share of a product's time (profiler)
    and the single-thread GEMM rate at 512 and 4096 rows.
(b) --compile: full-data gradients per second with and without (loss_and_grad; what
    compile changes: the solvers and finite-difference Hessian products), the first
    compiled pass (compile seconds) apart, on digits-mlp, digits-cnn and tiny-gpt (the
    examples); the loss and gradient differences, and whether a Hessian product (double
    backward, eager either way) is unchanged.
(c) tiny-gpt's HVP/G over kept graphs and streamed with the first product apart, by
    benchmarks/sequence_cost.py's product_ratios (the function gpu.py also calls).

Usage:  OMP_NUM_THREADS=1 python benchmarks/products.py [--quick] [--no-compile]
--quick: k = 4 with one round, compile on digits-mlp only (256 samples), (c) on 16 windows
(seconds to a minute; the figures mean little then).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import curvscope as cs  # noqa: E402
from curvscope._examples import make_example  # noqa: E402
from curvscope.operators import HessianOperator  # noqa: E402

torch.set_flush_denormal(True)


def _example(name: str, root: Path, samples: int | None = None, compile: bool = False):  # noqa: A002
    folder = root / name
    if not (folder / "model.pt").exists():
        make_example(name, folder)
    return cs.load(folder / "model.pt", samples=samples, compile=compile)


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds of each function over ``rounds`` interleaved rounds (after a warm-up)."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _cotangents(p, V: torch.Tensor) -> dict:
    k, out, off = V.shape[1], {}, 0
    for name, t in p.params.items():
        out[name] = V[off : off + t.numel()].T.reshape(k, *t.shape)
        off += t.numel()
    return out


def columns(p, k: int, rounds: int) -> dict:
    """(a): per-column time of each route over single products, and agreement."""
    H = HessianOperator(p)
    F = HessianOperator(p, mode="forward-over-reverse")
    V = torch.randn(p.num_params, k, generator=torch.Generator().manual_seed(1))
    H @ V[:, :1]  # keeps the graphs
    graphs = list(H._graphs.entries.values())
    params = {n: t.detach() for n, t in p.params.items()}
    closures = []
    with p.mode():
        for b in p.batches():
            grad = torch.func.grad(lambda ps, b=b: p.batch_loss(ps, b))
            closures.append(torch.func.vjp(grad, params)[1])

    def igb():
        cot = _cotangents(p, V)
        out = torch.zeros_like(V)
        for g in graphs:
            hv = torch.autograd.grad([t for _, t in g.live], g.values,
                                     [cot[p.names[i]] for i, _ in g.live], retain_graph=True,
                                     allow_unused=True, is_grads_batched=True)
            out += torch.cat([h.reshape(k, -1) for h in hv], 1).T
        return p.reduce(out)

    def func_vjp():
        cot = _cotangents(p, V)
        out = torch.zeros_like(V)
        for fn in closures:
            (hv,) = torch.func.vmap(fn)(cot)
            out += torch.cat([hv[n].reshape(k, -1) for n in p.names], 1).T
        return out

    routes = {"singles": lambda: torch.cat([H @ V[:, j : j + 1] for j in range(k)], 1),
              "block": lambda: H @ V, "igb": igb, "func_vjp": func_vjp, "fwd_rev": lambda: F @ V}
    ref = (H @ V).double()
    agree = {n: float((fn().double() - ref).norm() / ref.norm()) for n, fn in routes.items()}
    t = _interleaved(routes, rounds)
    return {n: {"per_column_over_single": t[n] / t["singles"], "rel_diff": agree[n]}
            for n in routes}


def bounds(p) -> dict:
    """What bounds batching columns: matmul share of a kept product's time, GEMM rates."""
    from torch.profiler import ProfilerActivity, profile

    H = HessianOperator(p)
    v = torch.randn(p.num_params, 1)
    H @ v
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            H @ v
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    rates = {}
    for rows in (512, 4096):
        a, b = torch.randn(rows, 128), torch.randn(128, 64)
        s = _interleaved({"mm": lambda a=a, b=b: a @ b}, 50)["mm"]
        rates[rows] = 2 * rows * 128 * 64 / s / 1e9
    return {"matmul_share": mm / total, "gemm_gflops_512": rates[512],
            "gemm_gflops_4096": rates[4096]}


def compiled(name: str, root: Path, rounds: int, samples: int | None) -> dict:
    """(b): gradients per second eager and compiled, compile seconds, differences."""
    eager = _example(name, root, samples)
    comp = _example(name, root, samples, compile=True)
    t0 = time.perf_counter()
    lc, gc = comp.loss_and_grad()
    first = time.perf_counter() - t0
    le, ge = eager.loss_and_grad()
    t = _interleaved({"eager": eager.loss_and_grad, "compiled": comp.loss_and_grad}, rounds)
    v = torch.randn(eager.num_params, 1, generator=torch.Generator().manual_seed(2))
    same_hvp = bool(torch.equal(HessianOperator(eager) @ v, HessianOperator(comp) @ v))
    return {"params": eager.num_params, "compile_s": first - t["compiled"],
            "grads_per_s_eager": 1 / t["eager"], "grads_per_s_compiled": 1 / t["compiled"],
            "speedup": t["eager"] / t["compiled"], "loss_diff": abs(float(lc - le)),
            "grad_rel_diff": float((gc - ge).norm() / ge.norm()), "hvp_identical": same_hvp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a check")
    ap.add_argument("--no-compile", action="store_true", help="leave out (b)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="curvscope-products-"))
    rounds = 1 if args.quick else 9
    p = _example("digits-mlp", root, 256 if args.quick else None)
    for k in (4,) if args.quick else (8, 16, 32):
        r = columns(p, k, rounds)
        print(f"(a) digits-mlp, k = {k}: per column over single products: " + ", ".join(
            f"{n} {x['per_column_over_single']:.2f} (rel. diff {x['rel_diff']:.0e})"
            for n, x in r.items() if n != "singles"), flush=True)
    b = bounds(p)
    print(f"    bounds: matmuls {b['matmul_share']:.2f} of a kept product's time; GEMM "
          f"{b['gemm_gflops_512']:.0f} GFLOP/s at 512 rows, {b['gemm_gflops_4096']:.0f} at "
          "4096 (more rows buy nothing)", flush=True)
    if not args.no_compile:
        names = ("digits-mlp",) if args.quick else ("digits-mlp", "digits-cnn", "tiny-gpt")
        for name in names:
            c = compiled(name, root, 1 if args.quick else 7, 256 if args.quick else None)
            print(f"(b) {name} (P = {c['params']}): gradients/s {c['grads_per_s_eager']:.2f} "
                  f"eager, {c['grads_per_s_compiled']:.2f} compiled ({c['speedup']:.2f}x; "
                  f"compile {c['compile_s']:.1f} s); loss diff {c['loss_diff']:.1e}, gradient "
                  f"rel. diff {c['grad_rel_diff']:.1e}; Hessian product identical: "
                  f"{c['hvp_identical']}", flush=True)
    from sequence_cost import _problem, product_ratios

    n, bs = (16, 8) if args.quick else (256, 64)
    r = product_ratios(_problem(65, n, 2, bs), _problem(65, n, 2, bs), 1 if args.quick else 7)
    print(f"(c) tiny-gpt shape, {n} windows in batches of {bs}: gradient "
          f"{r['grad'] * 1e3:.0f} ms; HVP/G over kept graphs {r['kept']:.2f}, an operator's "
          f"first product {r['first']:.2f}, streamed {r['streamed']:.2f}; GGN/G {r['ggn']:.2f}")


if __name__ == "__main__":
    main()
