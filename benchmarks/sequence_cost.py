"""Cost of curvature products on a transformer (issue 11 item 11).

(a) tiny-gpt's architecture (2 layers, 4 heads, width 64, vocabulary 65, windows of 64;
    112k parameters), random weights and tokens, 256 windows in batches of 64: one full-data
    Hessian product and one GGN product over one full-data gradient (medians over 7
    interleaved rounds of each one's time over the gradient's, after a warm-up). Targets:
    Hessian <= 2.6 gradients, GGN <= 2.5. The Hessian three ways: the first product of an
    operator (it builds and keeps each batch's first-order graph), the products after it
    (the second backward over the kept graphs: what every Lanczos step but the first
    costs), and streamed products (``graph_cache=0``: forward, first and second backward
    at every product). Beside the times, the matrix-multiply FLOPs of each
    (torch.utils.flop_counter).
(b) the cross-entropy output-Hessian product at a 50k vocabulary: a 1-layer model of that
    vocabulary (width 64), 8 windows of 64 tokens (logits of 102 MB in float32). Peak memory
    of one GGN product against one forward-backward, each in a fresh process (peak RSS minus
    the RSS after the model and data are built). Target: within 1.5x.

(c) what the kept graphs buy end to end: top-5 Hessian eigenvalues of (a)'s problem to
    residual 1e-4, with kept graphs and streamed, in this process: products and wall time.

Usage:  OMP_NUM_THREADS=1 python benchmarks/sequence_cost.py [--no-top5] [--quick]
--quick: (a) and (c) on 16 windows in batches of 8 with one round and top-1, (b) at a 5k
vocabulary with 2 windows, for a check that it runs (seconds; the figures mean little then).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from curvscope import Problem
from curvscope._device import peak_in_use
from curvscope.models import TinyGPT
from curvscope.operators import GGNOperator, HessianOperator, graph_account

torch.set_flush_denormal(True)


def _problem(vocab: int, n: int, layers: int, bs: int) -> Problem:
    torch.manual_seed(0)
    model = TinyGPT(vocab, 64, layers, 4 if layers > 1 else 2, 64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, 65), generator=g)
    data = [(ids[i : i + bs, :-1], ids[i : i + bs, 1:]) for i in range(0, n, bs)]
    return Problem(model, "cross_entropy", data)


def _rounds(fns: dict, rounds: int = 7, sync=lambda: None) -> dict:
    """Median over rounds of each function's time over the first's (``grad``), measured
    interleaved: every round times each once, so drifts of a shared machine's speed cancel
    in the ratios instead of landing on whichever was timed during a slow spell. ``sync``
    waits for the device (``torch.cuda.synchronize`` on a GPU)."""
    for fn in fns.values():
        fn()  # warm-up (and the kept graphs of the operators timed after it)
    ratios: dict = {name: [] for name in fns}
    for _ in range(rounds):
        times = {}
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name] = time.perf_counter() - t0
        for name in fns:
            ratios[name].append(times[name] / times["grad"] if name != "grad" else times[name])
    return {name: statistics.median(r) for name, r in ratios.items()}


def _first_product(p: Problem, v: torch.Tensor) -> None:
    HessianOperator(p) @ v  # a fresh operator: builds and keeps the graphs, then frees them


def product_ratios(p: Problem, streamed: Problem, rounds: int = 7, sync=lambda: None) -> dict:
    """HVP/G the one way both benchmarks measure it (gpu.py calls this too): medians of
    interleaved rounds (:func:`_rounds`) of each product's time over a full-data gradient's,
    after a warm-up; ``kept`` over the graphs the warm-up kept, ``first`` a fresh operator's
    first product (it builds the graphs), ``streamed`` with ``streamed``'s kept-graph budget
    set to 0, ``ggn`` the GGN product. Returns the ratios, ``grad`` in seconds, and the
    operators (``H``, ``G``, ``S``)."""
    graph_account(streamed).budget = 0
    v = torch.randn(p.num_params, 1, generator=torch.Generator().manual_seed(1)).to(p.device)
    H, G, S = HessianOperator(p), GGNOperator(p), HessianOperator(streamed)
    r = _rounds({"grad": lambda: p.loss_and_grad(), "first": lambda: _first_product(p, v),
                 "kept": lambda: H @ v, "streamed": lambda: S @ v, "ggn": lambda: G @ v},
                rounds, sync)
    return {**r, "H": H, "G": G, "S": S, "v": v}


def ratios(n: int = 256, bs: int = 64, rounds: int = 7) -> dict:
    p = _problem(65, n, 2, bs)
    r = product_ratios(p, _problem(65, n, 2, bs), rounds)
    H, G, S, v = r["H"], r["G"], r["S"], r["v"]
    flops = {name: _flops(fn) for name, fn in
             (("grad", p.loss_and_grad), ("hvp", lambda: H @ v), ("streamed", lambda: S @ v),
              ("ggn", lambda: G @ v))}
    return {"params": p.num_params, "gradient_s": r["grad"], "hvp_over_grad": r["kept"],
            "first_over_grad": r["first"], "streamed_over_grad": r["streamed"],
            "kept_mb": H.info["kept_graphs"]["bytes"] / 1e6,
            "ggn_over_grad": r["ggn"], "hvp_flops_over_grad": flops["hvp"] / flops["grad"],
            "streamed_flops_over_grad": flops["streamed"] / flops["grad"],
            "ggn_flops_over_grad": flops["ggn"] / flops["grad"]}


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_memory(mode: str, vocab: int = 50_000, n: int = 8) -> dict:
    p = _problem(vocab, n, 1, n)
    v = torch.randn(p.num_params, 1, generator=torch.Generator().manual_seed(1))
    G = GGNOperator(p)
    p.loss()  # warm-up allocations of a forward
    base = _rss()
    if mode == "gradient":
        p.loss_and_grad()
    else:
        G @ v
    peak = peak_in_use("cpu")  # VmHWM: ru_maxrss would carry the parent's peak over exec
    return {"mode": mode, "params": p.num_params, "increment_bytes": peak - base}


def top5(n: int = 256, bs: int = 64, top: int = 5) -> dict:
    """Top-5 with kept graphs and streamed, twice each in the order kept, streamed, streamed,
    kept, so that a drift of the machine's speed falls on both alike."""
    from curvscope.linalg import eigsh

    out: dict = {"kept": [], "streamed": []}
    for name in ("kept", "streamed", "streamed", "kept"):
        p = _problem(65, n, 2, bs)
        graph_account(p).budget = None if name == "kept" else 0
        t0 = time.perf_counter()
        (res,) = eigsh(HessianOperator(p), top=top, tol=1e-4, seed=0)
        out[name].append({"products": int(res.num_matvecs), "seconds": time.perf_counter() - t0,
                          "eigenvalues": res.eigenvalues.tolist()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-top5", action="store_true", help="leave out (c)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a check (seconds)")
    ap.add_argument("--one", choices=["gradient", "ggn"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    vocab, windows = (5_000, 2) if args.quick else (50_000, 8)
    if args.one:
        print(json.dumps(one_memory(args.one, vocab, windows)))
        return
    n, bs = (16, 8) if args.quick else (256, 64)
    if not args.no_top5:
        t = top5(n, bs, 1 if args.quick else 5)
        k, s = t["kept"], t["streamed"]
        pairs = zip(k[0]["eigenvalues"], s[0]["eigenvalues"], strict=True)
        diff = max(abs(a - b) / abs(b) for a, b in pairs)
        tk, ts = sum(r["seconds"] for r in k), sum(r["seconds"] for r in s)
        print(f"(c) top-{len(k[0]['eigenvalues'])} to 1e-4: kept graphs {k[0]['products']} "
              f"products in "
              f"{k[0]['seconds']:.1f} s and {k[1]['seconds']:.1f} s, streamed "
              f"{s[0]['products']} in {s[0]['seconds']:.1f} s and {s[1]['seconds']:.1f} s "
              f"(time ratio {tk / ts:.2f}; eigenvalues agree to {diff:.1e})")
    r = ratios(n, bs, 1 if args.quick else 7)
    print(f"(a) tiny-gpt shape, P = {r['params']}: gradient {r['gradient_s'] * 1e3:.0f} ms; "
          f"Hessian product over kept graphs {r['hvp_over_grad']:.2f} gradients (first "
          f"product {r['first_over_grad']:.2f}, streamed {r['streamed_over_grad']:.2f}; kept "
          f"{r['kept_mb']:.0f} MB), GGN product {r['ggn_over_grad']:.2f} gradients; matmul "
          f"FLOPs over the gradient's: Hessian {r['hvp_flops_over_grad']:.2f} (streamed "
          f"{r['streamed_flops_over_grad']:.2f}), GGN {r['ggn_flops_over_grad']:.2f}")
    mem = {}
    for mode in ("gradient", "ggn"):
        quick = ["--quick"] if args.quick else []
        out = subprocess.run([sys.executable, __file__, "--one", mode, *quick], check=True,
                             stdout=subprocess.PIPE, text=True,  # stderr shows a failure
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        mem[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = mem["gradient"]["increment_bytes"], mem["ggn"]["increment_bytes"]
    print(f"(b) vocabulary {vocab // 1000}k, P = {mem['ggn']['params']}: forward-backward "
          f"+{a / 1e6:.0f} MB, "
          f"GGN product +{b / 1e6:.0f} MB, ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
