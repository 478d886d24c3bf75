"""Cost of curvature products on a transformer (issue 11 item 11).

(a) tiny-gpt's architecture (2 layers, 4 heads, width 64, vocabulary 65, windows of 64;
    112k parameters), random weights and tokens, 256 windows in batches of 64: one full-data
    Hessian product and one GGN product over one full-data gradient (medians of 5, after a
    warm-up). Targets: Hessian <= 2.6 gradients, GGN <= 2.5. The Hessian three ways: the
    first product of an operator (it builds and keeps each batch's first-order graph), the
    products after it (the second backward over the kept graphs: what every Lanczos step
    but the first costs), and streamed products (``graph_cache=0``: forward, first and
    second backward at every product). Beside the times, the matrix-multiply FLOPs of each
    (torch.utils.flop_counter).
(b) the cross-entropy output-Hessian product at a 50k vocabulary: a 1-layer model of that
    vocabulary (width 64), 8 windows of 64 tokens (logits of 102 MB in float32). Peak memory
    of one GGN product against one forward-backward, each in a fresh process (peak RSS minus
    the RSS after the model and data are built). Target: within 1.5x.

Usage:  OMP_NUM_THREADS=1 python benchmarks/sequence_cost.py
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from curvscope import Problem
from curvscope.models import TinyGPT
from curvscope.operators import GGNOperator, HessianOperator

torch.set_flush_denormal(True)


def _problem(vocab: int, n: int, layers: int, bs: int) -> Problem:
    torch.manual_seed(0)
    model = TinyGPT(vocab, 64, layers, 4 if layers > 1 else 2, 64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, 65), generator=g)
    data = [(ids[i : i + bs, :-1], ids[i : i + bs, 1:]) for i in range(0, n, bs)]
    return Problem(model, "cross_entropy", data)


def _median(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _first_product(p: Problem, v: torch.Tensor) -> None:
    HessianOperator(p) @ v  # a fresh operator: builds and keeps the graphs, then frees them


def ratios() -> dict:
    p = _problem(65, 256, 2, 64)
    streamed = _problem(65, 256, 2, 64)
    streamed.graph_cache = 0
    v = torch.randn(p.num_params, 1, generator=torch.Generator().manual_seed(1))
    H, G, S = HessianOperator(p), GGNOperator(p), HessianOperator(streamed)
    t_g = _median(lambda: p.loss_and_grad())
    t_first = _median(lambda: _first_product(p, v))
    t_h = _median(lambda: H @ v)  # the warm-up keeps the graphs
    t_s = _median(lambda: S @ v)
    t_ggn = _median(lambda: G @ v)
    flops = {name: _flops(fn) for name, fn in
             (("grad", p.loss_and_grad), ("hvp", lambda: H @ v), ("streamed", lambda: S @ v),
              ("ggn", lambda: G @ v))}
    return {"params": p.num_params, "gradient_s": t_g, "hvp_over_grad": t_h / t_g,
            "first_over_grad": t_first / t_g, "streamed_over_grad": t_s / t_g,
            "kept_mb": H.info["kept_graphs"]["bytes"] / 1e6,
            "ggn_over_grad": t_ggn / t_g, "hvp_flops_over_grad": flops["hvp"] / flops["grad"],
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


def one_memory(mode: str) -> dict:
    p = _problem(50_000, 8, 1, 8)
    v = torch.randn(p.num_params, 1, generator=torch.Generator().manual_seed(1))
    G = GGNOperator(p)
    p.loss()  # warm-up allocations of a forward
    base = _rss()
    if mode == "gradient":
        p.loss_and_grad()
    else:
        G @ v
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "params": p.num_params, "increment_bytes": peak - base}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(one_memory(sys.argv[2])))
        return
    r = ratios()
    print(f"(a) tiny-gpt shape, P = {r['params']}: gradient {r['gradient_s'] * 1e3:.0f} ms; "
          f"Hessian product over kept graphs {r['hvp_over_grad']:.2f} gradients (first "
          f"product {r['first_over_grad']:.2f}, streamed {r['streamed_over_grad']:.2f}; kept "
          f"{r['kept_mb']:.0f} MB), GGN product {r['ggn_over_grad']:.2f} gradients; matmul "
          f"FLOPs over the gradient's: Hessian {r['hvp_flops_over_grad']:.2f} (streamed "
          f"{r['streamed_flops_over_grad']:.2f}), GGN {r['ggn_flops_over_grad']:.2f}")
    mem = {}
    for mode in ("gradient", "ggn"):
        out = subprocess.run([sys.executable, __file__, "--one", mode], capture_output=True,
                             text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        mem[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = mem["gradient"]["increment_bytes"], mem["ggn"]["increment_bytes"]
    print(f"(b) vocabulary 50k, P = {mem['ggn']['params']}: forward-backward +{a / 1e6:.0f} MB, "
          f"GGN product +{b / 1e6:.0f} MB, ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
