"""GPU benchmark (issue 12 item 4): one script, under ten minutes on one GPU.

For three networks on the same device, in one run:
  (a) one full-data Hessian product and one GGN product over one full-data gradient (HVP/G;
      the Hessian over kept graphs, as every product after an operator's first, an operator's
      first product (it builds the graphs) apart, and streamed as with --hvp-cache off; one
      measurement with benchmarks/sequence_cost.py: its product_ratios, interleaved rounds),
  (b) top-5 Hessian eigenpairs to residual 1e-4 of ||A||: products and wall time for curvscope
      (thick-restart Lanczos), curvlinops + scipy eigsh (tol 1e-4) and PyHessian's power
      iteration (its defaults, maxIter=100, tol=1e-3), each on the device,
  (c) curvscope's peak device memory (torch.cuda.max_memory_allocated) against the estimate
      the command line prints (curvscope.app.estimate_memory).

Networks: digits-mlp (the example, trained here: 17k parameters, 1797 samples), tiny-gpt's
architecture (2 layers, 4 heads, width 64, 112k parameters; random weights and tokens,
256 windows of 64) and a ResNet-18-shaped CNN for CIFAR (11.2M parameters, BatchNorm in eval
mode; 256 synthetic 3x32x32 samples, batch 128).

Usage:  python benchmarks/gpu.py [--device cuda] [--quick] [--products-only] [--json OUT.json]
Peers missing from the environment are skipped with a printed line; a peer that is installed
but fails on a network is a finding, printed and recorded. Without CUDA and without --device
the full run prints a skip line and exits 0 (on a CPU it takes hours: name --device cpu).
--quick: tiny data (256 digits samples, 16 windows, 4 CIFAR samples, the ResNet products
only), on the CPU when there is no CUDA, for a check that it works (seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curvscope import Problem  # noqa: E402
from curvscope.app import estimate_memory  # noqa: E402
from curvscope.linalg import default_basis_size, eigsh  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sequence_cost import product_ratios  # noqa: E402  (one HVP/G measurement for both)

torch.set_flush_denormal(True)


# ------------------------------------------------------------------ networks
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as CIFAR papers use it."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU())
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class FlatLogits(nn.Module):
    """``[B, T, V]`` logits as ``[B T, V]``, so every library sees one classification loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.reshape(-1, out.shape[-1])


def digits_mlp(quick: bool):
    from curvscope._examples import make_example
    from curvscope.io import load_checkpoint, load_dataset

    d = Path(tempfile.mkdtemp())
    make_example("digits-mlp", d)
    model = load_checkpoint(d / "model.pt").model
    ds = load_dataset(d / "data.npz")
    x, y = (ds.x[:256], ds.y[:256]) if quick else (ds.x, ds.y)
    return "digits-mlp", model, [(x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512)]


def tiny_gpt(quick: bool):
    from curvscope.models import TinyGPT

    torch.manual_seed(0)
    vocab, T = 65, 64
    model = FlatLogits(TinyGPT(vocab, T, 2, 4, 64))
    g = torch.Generator().manual_seed(0)
    n = 16 if quick else 256
    ids = torch.randint(0, vocab, (n, T + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:].reshape(n, T)
    bs = 8 if quick else 64
    return "tiny-gpt", model, [(x[i : i + bs], y[i : i + bs].reshape(-1))
                               for i in range(0, n, bs)]


def resnet18(quick: bool, samples: int = 256):
    torch.manual_seed(0)
    model = ResNet18()
    g = torch.Generator().manual_seed(0)
    n = 4 if quick else samples
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    bs = 4 if quick else 128
    return "resnet18-cifar", model, [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


# ------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


REPEATS = 7  # interleaved rounds after the warm-up (--quick: 1)


def on_device(batches, device):
    return [(x.to(device), y.to(device)) for x, y in batches]


# ------------------------------------------------------------------ peers
def pyhessian_top5(model, batches, device):
    from pyhessian import hessian as PyHessian

    hc = PyHessian(model, nn.CrossEntropyLoss(), dataloader=batches,
                   cuda=device.type == "cuda")
    count = {"n": 0}
    orig = hc.dataloader_hv_product

    def counted(v):
        count["n"] += 1
        return orig(v)

    hc.dataloader_hv_product = counted
    sync(device)
    t0 = time.perf_counter()
    vals, _ = hc.eigenvalues(maxIter=100, tol=1e-3, top_n=5)
    sync(device)
    for p in model.parameters():
        p.grad = None
    return sorted(vals, reverse=True), count["n"], time.perf_counter() - t0


def curvlinops_top5(model, batches, device):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator
    from scipy.sparse.linalg import eigsh as scipy_eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, batches,
                              check_deterministic=False)
    Hs = H.to_scipy() if hasattr(H, "to_scipy") else H
    count = {"n": 0}

    def mv(v):
        count["n"] += 1
        return Hs @ v

    lin = LinearOperator(Hs.shape, matvec=mv, dtype=np.float32)
    sync(device)
    t0 = time.perf_counter()
    vals = scipy_eigsh(lin, k=5, which="LA", tol=1e-4, return_eigenvectors=False)
    sync(device)
    return sorted(vals.tolist(), reverse=True), count["n"], time.perf_counter() - t0


# ------------------------------------------------------------------ one network
def run(spec, device: torch.device, peers: bool, products_only: bool = False) -> dict:
    name, model, batches = spec
    model = model.to(device).eval()
    batches = on_device(batches, device)
    problem = Problem(model, "cross_entropy", batches)
    P = problem.num_params
    row: dict = {"model": name, "params": P, "samples": problem.num_samples,
                 "device": str(device)}
    # HVP/G as benchmarks/sequence_cost.py measures it (one function): interleaved rounds,
    # over kept graphs (the warm-up keeps them), an operator's first product apart, and
    # streamed (--hvp-cache off)
    r = product_ratios(problem, Problem(model, "cross_entropy", batches), REPEATS,
                       lambda: sync(device))
    H = r["H"]
    row.update(grad_s=r["grad"], hvp_over_grad=r["kept"], hvp_first_over_grad=r["first"],
               hvp_streamed_over_grad=r["streamed"], ggn_over_grad=r["ggn"])
    print(f"{name}: P={P}, gradient {r['grad'] * 1e3:.1f} ms, HVP/G {r['kept']:.2f} (first "
          f"product {r['first']:.2f}, streamed {r['streamed']:.2f}), GGN/G {r['ggn']:.2f}",
          flush=True)
    if products_only:
        return row

    # (b, c) top-5 by curvscope with the memory estimate and the measured peak; the graphs
    # the timing kept are dropped first, so the estimate (which counts them) is not doubled
    H.release()
    basis = default_basis_size(5, P)
    est = estimate_memory(problem, matrices=["hessian"], vectors=10, basis=basis)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    (res,) = eigsh(H, top=5, tol=1e-4, seed=0)
    sync(device)
    row["curvscope"] = {
        "eigenvalues": res.eigenvalues.tolist(),
        "max_residual_over_norm": float(res.residual_norms.max() / res.eigenvalues.abs().max()),
        "products": int(res.num_matvecs),
        "time_s": time.perf_counter() - t0,
        "converged": bool(all(res.converged)),
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["memory"] = {"estimate_bytes": est.total, "peak_bytes": int(peak),
                         "ratio": peak / est.total, "parts": est.parts}
    print(f"  curvscope top-5: {res.num_matvecs} products, {row['curvscope']['time_s']:.2f} s"
          + (f", peak {row['memory']['peak_bytes'] / 1e6:.0f} MB against an estimate of "
             f"{est.total / 1e6:.0f} MB" if "memory" in row else ""), flush=True)
    ref = np.asarray(row["curvscope"]["eigenvalues"])
    if peers:
        for label, fn in (("curvlinops + scipy eigsh", curvlinops_top5),
                          ("pyhessian power", pyhessian_top5)):
            try:
                vals, n, t = fn(model, batches, device)
            except ImportError as exc:
                print(f"  skip {label}: not installed ({exc}); see benchmarks/install-peers.sh")
                row[label] = {"missing": str(exc)}
                continue
            except Exception as exc:  # noqa: BLE001  (a peer's failure is a finding)
                row[label] = {"failed": f"{type(exc).__name__}: {exc}"}
                print(f"  {label}: failed ({type(exc).__name__}: {exc})", flush=True)
                traceback.print_exc(limit=2)
                continue
            err = float(np.max(np.abs(np.asarray(vals[:5]) - ref) / np.abs(ref)))
            row[label] = {"eigenvalues": vals[:5], "products": n, "time_s": t,
                          "max_rel_diff_to_curvscope": err}
            print(f"  {label}: {n} products, {t:.2f} s, max rel. diff {err:.1e}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None,
                    help="default cuda; without CUDA: cpu with --quick, else a skip")
    ap.add_argument("--quick", action="store_true", help="tiny data, for a CPU check")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--products-only", action="store_true",
                    help="only the product ratios (no top-5 runs)")
    ap.add_argument("--models", default="digits-mlp,tiny-gpt,resnet18")
    ap.add_argument("--json", default=None)
    ap.add_argument("--resnet-samples", type=int, default=256,
                    help="samples of the ResNet-18-shaped network (fewer for a CPU run)")
    args = ap.parse_args()
    if args.device is None:
        if torch.cuda.is_available():
            args.device = "cuda"
        elif args.quick:
            args.device = "cpu"
        else:
            print("skip benchmarks/gpu.py: no CUDA device (name --device cpu to run it on the "
                  "CPU: hours for the ResNet)")
            return
    global REPEATS
    REPEATS = 1 if args.quick else REPEATS
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    makers = {"digits-mlp": digits_mlp, "tiny-gpt": tiny_gpt,
              "resnet18": lambda quick: resnet18(quick, args.resnet_samples)}
    rows = []
    for name in args.models.split(","):
        # --quick: an 11M-parameter top-5 is not seconds on a CPU; its products still run
        only = args.products_only or (args.quick and name == "resnet18")
        rows.append(run(makers[name](args.quick), device, not args.no_peers, only))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
