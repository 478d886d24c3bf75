"""GPT-2-small-shaped top-3 Hessian eigenvalues on one CPU machine (issue 24 item 5).

A HuggingFace ``GPT2LMHeadModel`` with GPT-2 small's shape (12 layers, 768 wide, 12 heads,
vocabulary 50257: 124M parameters), randomly initialised with a fixed seed (no weights are
downloaded), saved as a HuggingFace folder; a token file of random ids; the command a user
types:

    curvscope spectrum DIR --data tokens.bin --block-size 128 --samples 8 --top 3 --bottom 0

in a fresh process. Recorded: products, wall time, the memory estimate it printed and the
measured peak (the document's ``memory``), the eigenvalues with their bounds. Then
hessian-eigenthings 1.0.0a5 (if installed) on the same model and the same 8 windows with the
same loss (next-token cross-entropy over the 128 targets of each window, mean), its
``lanczos(k=3, which="LA")`` in a fresh process: products, wall time, peak RSS, eigenvalues.

Usage:  OMP_NUM_THREADS=1 python benchmarks/gpt2_small.py [--quick] [--max-memory 20GB]
        [--extra '--batch-size 3'] [--no-peer]
--quick: a 2-layer, 32-wide GPT-2 with a 64-token vocabulary (seconds).
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

import numpy as np

PEER = r'''
import json, resource, sys, time
import torch
from torch import nn
import curvscope as cs
from hessian_eigenthings import HessianOperator, lanczos

folder, tokens, block = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
prob = cs.load(folder, data=tokens, block_size=block, samples=8, seed=0)
batches = [(b.inputs.args[0], b.target) for b in prob.batches()]
model = prob.model


def loss_fn(model, batch):
    x, y = batch
    logits = model(input_ids=x).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


x = torch.cat([b[0] for b in batches])
y = torch.cat([b[1] for b in batches])
op = HessianOperator(model, [(x, y)], loss_fn, full_dataset=True)
count = {"n": 0}
orig = op.matvec


def matvec(v):
    count["n"] += 1
    return orig(v)


op.matvec = matvec
t = time.perf_counter()
res = lanczos(op, k=3, which="LA", seed=0, reorthogonalize=True)
wall = time.perf_counter() - t
vals = sorted(res.eigenvalues.double().tolist(), reverse=True)
print("RESULT", json.dumps({"products": count["n"], "wall_s": wall, "eigenvalues": vals,
      "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


def build(root: Path, quick: bool) -> tuple[Path, Path]:
    """The model folder and the token file."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if quick:
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=256)
    else:
        cfg = GPT2Config()  # GPT-2 small: 12 x 768, 12 heads, 50257 tokens, 1024 positions
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    folder = root / "gpt2"
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=8 * 129 * 4, dtype=np.uint16)
    tokens = root / "tokens.bin"
    ids.tofile(tokens)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2 {cfg.n_layer} x {cfg.n_embd}, {cfg.n_head} heads, vocabulary "
          f"{cfg.vocab_size}: {n / 1e6:.1f}M parameters; {len(ids)} random tokens")
    return folder, tokens


def run_curvscope(
    folder: Path, tokens: Path, out: Path, block: int, max_memory: str | None, extra: list[str]
):
    cmd = [sys.executable, "-m", "curvscope", "spectrum", str(folder), "--data", str(tokens),
           "--block-size", str(block), "--samples", "8", "--top", "3", "--bottom", "0",
           "--out", str(out)]
    if max_memory:
        cmd += ["--max-memory", max_memory]
    cmd += extra
    print("$ " + " ".join(cmd[2:]).replace(str(out.parent), "TMP"), flush=True)
    t = time.perf_counter()
    # streamed, so that a 45-minute run shows its plan and progress as it goes
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
    proc.wait()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"curvscope spectrum failed with exit {proc.returncode}")
    doc = json.loads((out / "spectrum.json").read_text())
    res = doc["results"]["spectra"][0]
    mem = doc.get("memory") or {}
    return {
        "products": res["num_matvecs"],
        "wall_s": wall,
        "eigenvalues": res["eigenvalues"],
        "error_bounds": res["error_bounds"],
        "converged": res["converged"],
        "estimate_bytes": mem.get("total_bytes"),
        "peak_bytes": mem.get("peak_bytes"),
        "basis": mem.get("basis"),
    }


def run_peer(folder: Path, tokens: Path, block: int):
    try:
        import hessian_eigenthings  # noqa: F401
    except ImportError as exc:
        print(f"skip hessian-eigenthings: not installed ({exc}); see benchmarks/install-peers.sh")
        return None
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEER, str(folder), str(tokens), str(block)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"hessian-eigenthings failed (exit {proc.returncode}): {err[:300]}")
        return {"failed": err[:300], "wall_s": wall}
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-memory", default=None, help="passed to curvscope (default: free)")
    ap.add_argument("--no-peer", action="store_true", help="skip hessian-eigenthings")
    ap.add_argument("--extra", default="", help="more curvscope flags, e.g. '--batch-size 3'")
    ap.add_argument("--tmp", default=None, help="where the model folder and output go "
                    "(default: the system's temporary directory)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    block = 16 if args.quick else 128
    with tempfile.TemporaryDirectory(prefix="gpt2-", dir=args.tmp) as tmp:
        root = Path(tmp)
        folder, tokens = build(root, args.quick)
        ours = run_curvscope(folder, tokens, root / "out", block, args.max_memory,
                             args.extra.split())
        peer = None if args.no_peer else run_peer(folder, tokens, block)
    gb = 1e9
    print("\n| tool | products | wall s | peak GB | estimate GB | top-3 eigenvalues |")
    print("|---|---:|---:|---:|---:|---|")
    est = ours["estimate_bytes"]
    vals = ", ".join(f"{v:.6g} ± {b:.1e}" for v, b in zip(ours["eigenvalues"],
                                                          ours["error_bounds"], strict=True))
    print(f"| curvscope | {ours['products']} | {ours['wall_s']:.0f} | "
          f"{(ours['peak_bytes'] or 0) / gb:.2f} | {(est or 0) / gb:.2f} | {vals} "
          f"(converged {ours['converged']}) |")
    if peer is not None and "failed" not in peer:
        print(f"| hessian-eigenthings lanczos(k=3, LA) | {peer['products']} | "
              f"{peer['wall_s']:.0f} | {peer['peak_bytes'] / gb:.2f} | - | "
              + ", ".join(f"{v:.6g}" for v in peer["eigenvalues"]) + " |")
    elif peer is not None:
        print(f"| hessian-eigenthings | failed | {peer['wall_s']:.0f} | | | {peer['failed']} |")
    if est and ours["peak_bytes"]:
        print(f"\npeak / estimate: {ours['peak_bytes'] / est:.3f}; basis: {ours['basis']}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"benchmark process peak RSS {own:.2f} GB")


if __name__ == "__main__":
    main()
