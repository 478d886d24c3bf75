"""Sharded mode (issue 24 item 1): per-rank Lanczos basis memory at 1, 2 and 4 processes.

A ~1M-parameter MLP (256-1024-768-10, tanh, float64) on 512 random samples in batches of
128, cross-entropy. The top-3 Hessian eigenvalues by thick-restart Lanczos with a basis of 40
vectors: once in one process without sharding (double-backward products, the reference), then
with ``shard=True`` (FSDP2 shards, gloo, products by 4-point finite differences of sharded
gradients) in 1, 2 and 4 processes. Reported per run: this rank's vector length (largest over
ranks), the basis bytes that gives (``(basis + 1) x n_local x 8``), the peak RSS of the
largest rank (``ru_maxrss``: model copies, activations and the basis together), products,
wall time of the solve, and the largest relative difference of the eigenvalues from the
reference.

Usage:  python benchmarks/sharded.py [--quick]
--quick: a 5k-parameter MLP on 64 samples, basis 10, at 1 and 2 processes (about 20 s).
Each process runs one thread; with more processes than cores the wall times mean nothing (run
the full size on an otherwise idle machine with at least 4 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = {"sizes": (256, 1024, 768, 10), "samples": 512, "batch": 128, "basis": 40, "top": 3,
        "tol": 1e-8, "worlds": (1, 2, 4)}
QUICK = {"sizes": (32, 96, 16, 4), "samples": 64, "batch": 16, "basis": 10, "top": 2,
         "tol": 1e-8, "worlds": (1, 2)}


def _problem(cfg: dict, group, shard: bool):
    import torch
    from torch import nn

    import curvscope as cs

    torch.manual_seed(0)
    sizes = cfg["sizes"]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["samples"], sizes[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (cfg["samples"],), generator=g)
    b = cfg["batch"]
    data = [(x[i : i + b], y[i : i + b]) for i in range(0, cfg["samples"], b)]
    return cs.Problem(model, "cross_entropy", data, group=group, shard=shard)


def worker(rank: int, world: int, store: str, out: str, quick: bool, shard: bool) -> None:
    """One rank: build, solve, write this rank's numbers to ``out``."""
    import torch

    import curvscope as cs
    from curvscope.linalg import eigsh
    from curvscope.operators import hvp_record

    torch.set_num_threads(1)
    cfg = QUICK if quick else FULL
    group = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
        group = cs.Group(rank, world)
    prob = _problem(cfg, group, shard)
    op = cs.hessian(prob)
    t0 = time.perf_counter()
    (res,) = eigsh(op, top=cfg["top"], tol=cfg["tol"], basis_size=cfg["basis"], seed=0)
    seconds = time.perf_counter() - t0
    n_local = int(op.shape[0])
    record = {
        "rank": rank,
        "n_local": n_local,
        "n": int(prob.num_params),
        "basis_bytes": (cfg["basis"] + 1) * n_local * 8,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "products": int(res.num_matvecs),
        "seconds": seconds,
        "eigenvalues": res.eigenvalues.tolist(),
        "converged": bool(res.converged.all()),
        "hvp": dict(hvp_record(prob) or {}),
    }
    Path(out).with_suffix(f".{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def launch(world: int, shard: bool, quick: bool, tmp: Path) -> list[dict]:
    """Run ``world`` ranks of this script and return their records."""
    tag = f"{'shard' if shard else 'plain'}-{world}"
    store, out = tmp / f"store-{tag}", tmp / f"{tag}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", str(world), str(store), str(out),
           "1" if shard else "0"] + (["--quick"] if quick else [])
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate()[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        if p.returncode != 0:
            print(log[-4000:], file=sys.stderr)
            raise subprocess.CalledProcessError(p.returncode, cmd)
    return [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(world)]


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a check")
    ap.add_argument("--worker", nargs=4, metavar=("WORLD", "STORE", "OUT", "SHARD"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        world, store, out, shard = args.worker
        worker(args.rank, int(world), store, out, args.quick, shard == "1")
        return
    cfg = QUICK if args.quick else FULL
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = launch(1, False, args.quick, Path(tmp))[0]
        runs = [("1 process, unsharded", ref, [ref])]
        for world in cfg["worlds"]:
            recs = launch(world, True, args.quick, Path(tmp))
            runs.append((f"{world} process(es), --shard", recs[0], recs))
        want = ref["eigenvalues"]
        for label, first, recs in runs:
            diff = max(abs(a - b) / abs(b) for a, b in zip(first["eigenvalues"], want,
                                                             strict=True))
            rows.append((label, max(r["n_local"] for r in recs),
                         max(r["basis_bytes"] for r in recs), max(r["peak_rss"] for r in recs),
                         first["products"], max(r["seconds"] for r in recs), diff,
                         all(r["converged"] for r in recs), first["hvp"].get("step")))
    print(f"MLP {'-'.join(map(str, cfg['sizes']))}: {ref['n']} parameters, "
          f"{cfg['samples']} samples, top-{cfg['top']}, basis {cfg['basis']}")
    print("| run | n_local (max rank) | basis bytes / rank | peak RSS (max rank) | products | "
          "solve wall | max rel. diff. | converged | FD step |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for label, n_local, basis, rss, products, secs, diff, ok, step in rows:
        shown = "-" if step is None else f"{step:.1e}"
        print(f"| {label} | {n_local} | {_mb(basis)} | {_mb(rss)} | {products} | {secs:.1f} s "
              f"| {diff:.1e} | {'yes' if ok else 'no'} | {shown} |")


if __name__ == "__main__":
    main()
