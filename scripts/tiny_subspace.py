"""Reproduce the shape of Gur-Ari et al. 2018 ("Gradient Descent Happens in a Tiny Subspace").

G. Gur-Ari, D. A. Roberts, E. Dyer, arXiv 1812.04754. During SGD training of a C-class
classifier the fraction of the gradient that lies in the span of the top-C Hessian eigenvectors,
``||P_k g||^2 / ||g||^2`` with k = C, rises within the first few hundred steps and then stays
high (their Fig. 1 on MNIST and CIFAR-10); the top-k eigenspace itself changes slowly after that.

Setting: the first 1000 samples of the built-in 8x8 digits (C = 10), mean cross-entropy,
float32, plain minibatch SGD (``torch.optim.SGD``, no momentum, batch 64, seed 0), two models:

  mlp: the 64-128-64-10 tanh MLP of ``curvscope example digits-mlp`` (17,226 parameters),
       lr 0.1, 2000 steps;
  cnn: a small CNN, Conv2d(1, 8, 3) + ReLU + MaxPool(2) + Conv2d(8, 16, 3) + ReLU +
       MaxPool(2) + Linear(64, 10) on 1x8x8 images (1,898 parameters; no BatchNorm, so the
       analysed function is the one SGD trains), lr 0.1, 2000 steps.

At steps 0, 1, 2, 5, 10, 20, 50, 100, 150, 200, 300, ..., 2000 a
``curvscope.Tracker(model, "cross_entropy", data, gradient_overlap=10, top=11)`` measures, on all
1000 samples, the top 11 Hessian eigenpairs (Lanczos, tol 1e-4) and the fraction of the
full-data gradient in the top-10 eigenspace with its Davis-Kahan interval [lower, upper] (the
exact fraction lies in it when the 11th pair is resolved; docs/DESIGN.md "Gradient overlap").
The gradient is the full-data one (Gur-Ari et al. also show minibatch gradients); a random
direction would have a fraction of about 10/P.

Writes ``OUT/tiny-subspace.png`` and ``OUT/summary.json`` (every measurement with its interval).

Usage:  OMP_NUM_THREADS=1 python scripts/tiny_subspace.py [--out reports/tiny-subspace]
About 20 seconds on one core. ``--quick``: 200 samples, 20 steps, written to ``--out`` or a
fresh temporary folder (never into the repository), for a check that it runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
K = 10
SAMPLES = 1000
STEPS = 2000
BATCH = 64
MODELS = {
    "mlp": {
        "arch": {"type": "mlp", "sizes": [64, 128, 64, 10], "activation": "tanh", "bias": True},
        "shape": None,
        "lr": 0.1,
    },
    "cnn": {
        "arch": {
            "type": "sequential",
            "layers": [
                {"type": "Conv2d", "args": {"in_channels": 1, "out_channels": 8,
                                            "kernel_size": 3, "padding": 1}},
                {"type": "ReLU", "args": {}},
                {"type": "MaxPool2d", "args": {"kernel_size": 2}},
                {"type": "Conv2d", "args": {"in_channels": 8, "out_channels": 16,
                                            "kernel_size": 3, "padding": 1}},
                {"type": "ReLU", "args": {}},
                {"type": "MaxPool2d", "args": {"kernel_size": 2}},
                {"type": "Flatten", "args": {}},
                {"type": "Linear", "args": {"in_features": 64, "out_features": 10}},
            ],
        },
        "shape": [1, 8, 8],
        "lr": 0.1,
    },
}


def schedule(steps: int) -> list[int]:
    """Dense early (where the fraction rises), every 100 steps later."""
    early = [0, 1, 2, 5, 10, 20, 50, 100, 150, 200]
    return sorted({s for s in early if s <= steps} | set(range(300, steps + 1, 100)) | {steps})


def train(name: str, samples: int, steps: int) -> dict:
    """Minibatch SGD, measured by a Tracker at the scheduled steps (before that step's update)."""
    import curvscope as cs
    from curvscope.io import build_arch, load_dataset

    spec = MODELS[name]
    d = load_dataset("digits", input_shape=spec["shape"])
    x, y = torch.as_tensor(d.x)[:samples].float(), torch.as_tensor(d.y)[:samples].long()
    torch.manual_seed(0)
    model = build_arch(spec["arch"])
    num_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    tracker = cs.Tracker(model, "cross_entropy", [(x, y)], every=1, top=K + 1,
                         gradient_overlap=K, seed=0)
    gen = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(samples, generator=gen), 0
    when = set(schedule(steps))
    acc = {}
    for step in range(steps + 1):
        if step in when:
            tracker(step)
            with torch.no_grad():
                acc[step] = float((model(x).argmax(-1) == y).float().mean())
        if step == steps:
            break
        if pos + BATCH > samples:
            perm, pos = torch.randperm(samples, generator=gen), 0
        idx = perm[pos : pos + BATCH]
        pos += BATCH
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    rows = []
    for r in tracker.rows:
        ov = r["gradient_overlap"]["hessian"]
        rows.append({
            "step": r["step"],
            "loss": float(f"{r['loss']:.6g}"),
            "accuracy": acc[r["step"]],
            "grad_norm": float(f"{r['grad_norm']:.6g}"),
            "fraction": ov["fraction"],
            "error_bound": ov["error_bound"],
            "lower": ov["lower"],
            "upper": ov["upper"],
            "gap": ov["gap"],
            "eigenvalues": [float(f"{v:.6g}") for v in r["eigenvalues"]["hessian"]["top"]],
            "num_matvecs": r["num_matvecs"],
        })
    return {"name": name, "arch": spec["arch"], "lr": spec["lr"], "num_params": num_params,
            "rows": rows}


def numbers(run: dict) -> dict:
    """What the README quotes."""
    rows = run["rows"]
    frac = np.array([r["fraction"] for r in rows])
    steps = np.array([r["step"] for r in rows])
    late = steps >= 200
    hit = np.nonzero(frac >= 0.5)[0]
    resolved = [r for r in rows if r["error_bound"] < 1]
    return {
        "model": run["name"],
        "num_params": run["num_params"],
        "random_direction_fraction": K / run["num_params"],
        "fraction_at_step_0": float(frac[0]),
        "first_step_fraction_at_least_0.5": int(steps[hit[0]]) if len(hit) else None,
        "fraction_from_step_200": {"min": float(frac[late].min()), "max": float(frac[late].max()),
                                   "mean": float(frac[late].mean())} if late.any() else None,
        "measurements": len(rows),
        "intervals_resolved": len(resolved),
        "largest_resolved_error_bound": max((r["error_bound"] for r in resolved), default=None),
        "final": {k: rows[-1][k] for k in ("step", "loss", "accuracy", "fraction", "lower",
                                           "upper")},
        "eigenvalues_final": rows[-1]["eigenvalues"],
        "matvecs": sum(r["num_matvecs"] for r in rows),
    }


def figure(runs: list[dict], path: Path) -> None:
    """Per model: loss and accuracy, the fraction with its interval, the top-11 eigenvalues."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    style = {"font.size": 10, "axes.titlesize": 10.5, "axes.titleweight": "bold",
             "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
             "grid.alpha": 0.25, "legend.frameon": False, "savefig.dpi": 150,
             "savefig.bbox": "tight"}
    with mpl.rc_context(style):
        fig = Figure(figsize=(10, 8.4), layout="constrained")
        axes = fig.subplots(3, len(runs), sharex="col", squeeze=False)
        for j, run in enumerate(runs):
            rows = run["rows"]
            s = np.array([r["step"] for r in rows]) + 1.0
            ax = axes[0, j]
            ax.plot(s, [r["loss"] for r in rows], "o-", ms=3, color="#0072B2", label="loss")
            ax.set_yscale("log")
            ax.set_ylabel("full-data loss (CE)")
            ax2 = ax.twinx()
            ax2.plot(s, [r["accuracy"] for r in rows], "s--", ms=3, color="#D55E00",
                     label="train accuracy")
            ax2.set_ylim(0, 1.02)
            ax2.set_ylabel("train accuracy", color="#D55E00")
            ax2.grid(False)
            ax.set_title(f"{run['name'].upper()} ({run['num_params']:,} parameters), "
                         f"SGD lr {run['lr']:g}, batch {BATCH}")
            ax = axes[1, j]
            frac = np.array([r["fraction"] for r in rows])
            lo = np.array([r["lower"] for r in rows])
            hi = np.array([r["upper"] for r in rows])
            ax.fill_between(s, lo, hi, color="#009E73", alpha=0.25, lw=0,
                            label="Davis-Kahan interval")
            ax.errorbar(s, frac, yerr=[frac - lo, hi - frac], fmt="o-", ms=3.5, lw=1.3,
                        color="#009E73", capsize=2, label=f"fraction of g in top-{K}")
            ax.axhline(K / run["num_params"], color="grey", ls=":", lw=1,
                       label=f"random direction ({K}/P)")
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(r"$\|\Pi_{10}\, g\|^2 / \|g\|^2$")
            ax.set_title("Gradient in the top-10 Hessian eigenspace")
            ax.legend(loc="lower right", fontsize=8.5)
            ax = axes[2, j]
            ev = np.array([r["eigenvalues"] for r in rows])
            for i in range(ev.shape[1]):
                ax.plot(s, ev[:, i], lw=1.1 if i < K else 1.8,
                        color=mpl.colormaps["viridis"](i / K) if i < K else "black",
                        ls="-" if i < K else "--", label="λ11" if i == K else None)
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.set_ylabel("top-11 Hessian eigenvalues")
            ax.set_xlabel("step + 1")
            ax.set_xscale("log")
            ax.set_title("λ1..λ10 (colours) and λ11 (dashed)")
            ax.legend(loc="upper left", fontsize=8.5)
        fig.savefig(path, metadata={"Software": "curvscope"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="default reports/tiny-subspace of this checkout")
    parser.add_argument("--quick", action="store_true", help="tiny run, a temporary folder")
    args = parser.parse_args()
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="tiny-subspace-")) if args.quick
                    else ROOT / "reports" / "tiny-subspace")
    args.out.mkdir(parents=True, exist_ok=True)
    steps, samples = (20, 200) if args.quick else (STEPS, SAMPLES)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the command line does (saturated tanh units)
    from curvscope.io import write_atomic

    runs, summary = [], []
    for name in MODELS:
        t0 = time.perf_counter()
        run = train(name, samples, steps)
        s = numbers(run)
        s["seconds"] = round(time.perf_counter() - t0, 1)
        runs.append(run)
        summary.append(s)
        late = s["fraction_from_step_200"]
        print(f"{name}: {s['measurements']} measurements, {s['matvecs']} products, "
              f"{s['seconds']} s; fraction {s['fraction_at_step_0']:.3f} at step 0, >= 0.5 from "
              f"step {s['first_step_fraction_at_least_0.5']}"
              + (f", {late['min']:.3f}-{late['max']:.3f} from step 200" if late else "")
              + f"; final loss {s['final']['loss']:.4g}, accuracy {s['final']['accuracy']:.3f}; "
              f"{s['intervals_resolved']}/{s['measurements']} intervals resolved", flush=True)
    doc = {
        "what": "Gur-Ari et al. 2018 (arXiv 1812.04754) in shape: fraction of the full-data "
                "gradient in the top-10 Hessian eigenspace during SGD",
        "settings": {"samples": samples, "steps": steps, "batch": BATCH, "k": K,
                     "loss": "cross_entropy (mean)", "optimizer": "SGD, no momentum",
                     "seed": 0, "schedule": schedule(steps),
                     "measurement": "curvscope.Tracker(gradient_overlap=10, top=11), tol 1e-4"},
        "models": summary,
        "runs": runs,
    }
    write_atomic(args.out / "summary.json", json.dumps(doc, indent=1) + "\n")
    figure(runs, args.out / "tiny-subspace.png")
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'tiny-subspace.png'}")


if __name__ == "__main__":
    main()
