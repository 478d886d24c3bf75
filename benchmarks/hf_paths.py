"""Wall time of the HuggingFace data-path matrix, and tiny GPT2/Llama product costs.

Issue 20's benchmark. Part 1 runs, for the five tiny HuggingFace classes of
``tests/hf_models.py`` (GPT2, Llama with grouped KV heads, BERT masked LM, ViT, T5), every
data path the README documents (token file with the default loss, ``causal_lm`` and
``cross_entropy``; dict batches with right and left padding; ``--loss model``) through
``cs.load`` + a Hessian top-2/bottom-1 Lanczos in float64, and prints each path's wall time
and products (a refused path prints its sentence). Part 2 measures, for tiny GPT2 and Llama on
token windows, one Hessian product against one gradient (interleaved rounds, medians; the
first product, which builds the kept graphs, reported separately).

Usage:  OMP_NUM_THREADS=1 python benchmarks/hf_paths.py [--quick] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import curvscope as cs  # noqa: E402
from tests import hf_models as hm  # noqa: E402


def paths(kind: str, root: Path):
    """(label, data, keyword arguments of cs.load) for every documented path of ``kind``."""
    out = []
    if kind in hm.CAUSAL:
        for loss in (None, "causal_lm", "cross_entropy", "model"):
            out.append((f"tokens/{loss or 'default'}", root / "tokens.bin",
                        {"loss": loss, "block_size": 6, "samples": 5}))
    for pad in ("right", "left") if kind != "vit" else ("right",):
        for loss in ((None,) if kind not in hm.CAUSAL else ("causal_lm",)) + ("model",):
            out.append((f"dict-{pad}/{loss or 'default'}", hm.batches(kind, seed=7, padding=pad),
                        {"loss": loss}))
    return out


def matrix(root: Path, quick: bool) -> None:
    print(f"{'model':6} {'path':24} {'wall s':>7} {'products':>8}  result")
    total = 0.0
    for kind in hm.KINDS[:2] if quick else hm.KINDS:
        for label, data, kw in paths(kind, root):
            t0 = time.perf_counter()
            try:
                prob = cs.load(root / kind, data, dtype="float64", batch_size=2, **kw)
                res = cs.lanczos(cs.hessian(prob), top=2, bottom=1, tol=1e-6, seed=0)
                products = res[0].num_matvecs
                what = f"top {float(res[0].eigenvalues[0]):.6g}, converged " + str(
                    all(bool(r.converged.all()) for r in res))
            except cs.CurvscopeError as exc:
                products, what = 0, f"refused: {str(exc)[:70]}"
            wall = time.perf_counter() - t0
            total += wall
            print(f"{kind:6} {label:24} {wall:7.2f} {products:8d}  {what}")
    print(f"matrix total: {total:.1f} s")


def product_cost(root: Path, rounds: int) -> None:
    print(f"\n{'model':6} {'params':>7} {'first HVP/G':>11} {'HVP/G (median)':>15}")
    for kind in hm.CAUSAL:
        prob = cs.load(root / kind, root / "tokens.bin", block_size=6, samples=32, seed=0,
                       batch_size=8)
        H = cs.hessian(prob)
        v = torch.randn(prob.num_params, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        H @ v
        first = time.perf_counter() - t0
        ratios, grads = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            prob.loss_and_grad()
            g = time.perf_counter() - t0
            t0 = time.perf_counter()
            H @ v
            ratios.append((time.perf_counter() - t0) / g)
            grads.append(g)
        print(f"{kind:6} {prob.num_params:7d} {first / statistics.median(grads):11.2f} "
              f"{statistics.median(ratios):15.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two classes, three rounds")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    root = Path(tempfile.mkdtemp(prefix="hf-paths-"))
    for kind in hm.KINDS[:2] if args.quick else hm.KINDS:
        hm.build(kind, root / kind, steps=5 if args.quick else 20)
    ids = np.random.default_rng(0).integers(2, hm.VOCAB, 2000).astype("<u2")
    (root / "tokens.bin").write_bytes(ids.tobytes())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    matrix(root, args.quick)
    product_cost(root, 3 if args.quick else args.rounds)


if __name__ == "__main__":
    main()
