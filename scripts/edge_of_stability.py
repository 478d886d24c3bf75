"""Reproduce the shape of Cohen et al. 2021, Fig. 1 ("edge of stability") with ``curvscope track``.

J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar, "Gradient Descent on Neural Networks
Typically Occurs at the Edge of Stability", ICLR 2021. Under full-batch gradient descent with
step size eta, the sharpness (the top Hessian eigenvalue of the training loss) rises during
training ("progressive sharpening") until it reaches 2/eta, and then hovers just above it while
the loss keeps falling, non-monotonically.

Setting (digits-mlp size): the 64-128-64-10 tanh MLP of ``curvscope example digits-mlp``
(17,226 parameters), the first 1000 samples of the built-in 8x8 digits, the MSE loss on one-hot
targets (torch's ``mse_loss``, mean over samples and outputs; Cohen et al. show MSE and
cross-entropy, MSE gives the cleaner curves), float32, seed 0, plain full-batch gradient descent
(``torch.optim.SGD``, no momentum) at two step sizes:

  eta = 0.5   for 3000 steps, a checkpoint every 50 steps (61 checkpoints; 2/eta = 4);
  eta = 0.25  for 6000 steps, a checkpoint every 100 steps (61 checkpoints; 2/eta = 8).

Then, for each step size, exactly what a user runs::

  curvscope track 'CKPTS/ckpt-*.pt' --top 2 --trace --per-layer --lr ETA --out DIR

(through the library function it calls) and the figures and the HTML page from the documents.
The per-step training loss is written to ``DIR/training.json``. The checkpoints themselves are
left in a temporary folder (``--keep DIR`` keeps them).

Usage:  OMP_NUM_THREADS=1 python scripts/edge_of_stability.py [--out reports/edge-of-stability]
About 3 minutes on one core. ``--quick``: 200 samples, 20 steps per step size (3 checkpoints
each), written to ``--out`` or a fresh temporary folder (never into the repository), for a
check that it runs (seconds).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
ARCH = {"type": "mlp", "sizes": [64, 128, 64, 10], "activation": "tanh", "bias": True}
SAMPLES = 1000
RUNS = [
    {"lr": 0.5, "steps": 3000, "every": 50},
    {"lr": 0.25, "steps": 6000, "every": 100},
]


def write_data(folder: Path, samples: int = SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """The first SAMPLES digits with one-hot float targets, as ``data.npz`` beside the runs."""
    from curvscope.io import load_dataset, write_atomic

    d = load_dataset("digits")
    x = torch.as_tensor(d.x)[:samples].float()
    y = nn.functional.one_hot(torch.as_tensor(d.y)[:samples], 10).float()
    buf = io.BytesIO()
    np.savez(buf, x=x.numpy(), y=y.numpy())
    write_atomic(folder / "data.npz", buf.getvalue())
    return x, y


def train(folder: Path, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int,
          every: int) -> list[float]:
    """Full-batch GD from the same initialisation; checkpoints record their step."""
    from curvscope.io import build_arch, save_checkpoint

    torch.manual_seed(0)
    model = build_arch(ARCH)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps + 1):
        if step % every == 0:
            meta = {"data": "../data.npz", "loss": "mse", "reduction": "mean", "step": step,
                    "created_by": f"scripts/edge_of_stability.py (lr {lr}, seed 0)"}
            save_checkpoint(folder / f"ckpt-{step:05d}.pt", model, ARCH, meta)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(float(loss.detach()))
        if step < steps:
            loss.backward()
            opt.step()
    return losses


def figure(runs: list[tuple[dict, dict, list[float]]], path: Path) -> None:
    """Cohen et al. Fig. 1's two panels: training loss, and sharpness with 2/eta, per step."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    colours = ["#0072B2", "#D55E00"]
    style = {"font.size": 11, "axes.titlesize": 12, "axes.titleweight": "bold",
             "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
             "grid.alpha": 0.25, "legend.frameon": False, "savefig.dpi": 150,
             "savefig.bbox": "tight"}
    with mpl.rc_context(style):
        fig = Figure(figsize=(7.2, 6.4), layout="constrained")
        ax_loss, ax_sharp = fig.subplots(2, 1, sharex=True)
        for (spec, doc, losses), c in zip(runs, colours, strict=True):
            eta = spec["lr"]
            ax_loss.plot(np.arange(len(losses)), losses, color=c, lw=1.2, label=f"η = {eta:g}")
            rows = doc["results"]["track"]
            steps = np.array([r["step"] for r in rows])
            lam = np.array([r["eigenvalues"]["hessian"]["top"][0] for r in rows])
            err = np.array([r["error_bounds"]["hessian"]["top"][0] for r in rows])
            ax_sharp.errorbar(steps, lam, yerr=err, color=c, marker="o", ms=3, lw=1.4,
                              capsize=2, label=f"sharpness, η = {eta:g}")
            ax_sharp.axhline(2 / eta, color=c, ls="--", lw=1.1, label=f"2/η = {2 / eta:g}")
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("training loss (MSE)")
        ax_loss.set_title("Full-batch gradient descent, 64-128-64-10 tanh MLP, 1000 digits")
        ax_loss.legend(loc="upper right")
        ax_sharp.set_xlabel("step")
        ax_sharp.set_ylabel("top Hessian eigenvalue")
        ax_sharp.set_title("Sharpness rises to 2/η and hovers there (curvscope track)")
        ax_sharp.legend(loc="upper left", ncol=2)
        fig.savefig(path, metadata={"Software": "curvscope"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="default reports/edge-of-stability of this checkout")
    parser.add_argument("--keep", type=Path, default=None, help="keep the checkpoints here")
    parser.add_argument("--quick", action="store_true", help="tiny run, a temporary folder")
    args = parser.parse_args()
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="eos-out-")) if args.quick
                    else ROOT / "reports" / "edge-of-stability")
    runs = [{**r, "steps": 20, "every": 10} for r in RUNS] if args.quick else RUNS
    samples = 200 if args.quick else SAMPLES
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the command line does (saturated tanh units)
    from curvscope.app import track
    from curvscope.io import write_atomic, write_document
    from curvscope.report import render_directory

    work = args.keep or Path(tempfile.mkdtemp(prefix="eos-"))
    work.mkdir(parents=True, exist_ok=True)
    x, y = write_data(work, samples)
    results = []
    for spec in runs:
        t0 = time.perf_counter()
        folder = work / f"lr-{spec['lr']:g}"
        folder.mkdir(exist_ok=True)
        losses = train(folder, x, y, spec["lr"], spec["steps"], spec["every"])
        t1 = time.perf_counter()
        out = args.out / f"lr-{spec['lr']:g}"
        run = track(str(folder / "ckpt-*.pt"), top=2, trace=True, per_layer=True,
                    lr=spec["lr"], seed=0, out=out)
        # the document names the checkpoints by their temporary paths: write them relative to
        # the temporary folder, which the run recreates
        doc = json.loads(json.dumps(run.document).replace(str(work) + "/", ""))
        write_document(doc, out)
        write_atomic(out / "training.json", json.dumps(
            {"lr": spec["lr"], "steps": spec["steps"], "samples": samples, "arch": ARCH,
             "loss": [float(f"{v:.6g}") for v in losses]}) + "\n")
        shutil.rmtree(out / "figures", ignore_errors=True)
        render_directory(out, plotly_js="../../plotly.min.js")  # report.html and figures/
        rows = run.rows
        print(f"lr {spec['lr']:g}: trained {spec['steps']} steps in {t1 - t0:.1f} s, tracked "
              f"{len(rows)} checkpoints in {time.perf_counter() - t1:.1f} s "
              f"({run.document['counts']['matvecs']} products); sharpness "
              f"{rows[0]['eigenvalues']['hessian']['top'][0]:.3f} -> "
              f"max {max(r['eigenvalues']['hessian']['top'][0] for r in rows):.3f}, "
              f"last {rows[-1]['eigenvalues']['hessian']['top'][0]:.3f}; 2/lr = "
              f"{2 / spec['lr']:g}", flush=True)
        results.append((spec, doc, losses))
    figure(results, args.out / "edge-of-stability.png")
    print(f"figure: {args.out / 'edge-of-stability.png'}")


if __name__ == "__main__":
    main()
