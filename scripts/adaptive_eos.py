"""Reproduce the shape of Cohen et al. 2022, Fig. 1 (Adam at the edge of stability) with a Tracker.

J. M. Cohen, B. Ghorbani, S. Krishnan, N. Agarwal, S. Medapati, M. Badura, D. Suo, D. Cardoze,
Z. Nado, G. E. Dahl, J. Gilmer, "Adaptive Gradient Methods at the Edge of Stability"
(arXiv 2207.14484). Under full-batch Adam with step size eta and beta1 = 0.9 the
*preconditioned* sharpness lambda_1(P^-1 H), P = diag(sqrt(v_hat) + eps) the optimiser's own
diagonal, rises until it reaches (2 + 2 beta1)/((1 - beta1) eta) = 38/eta and then hovers there,
while the raw sharpness lambda_1(H) is not held at any threshold.

Setting: a 64-32-10 tanh MLP (2,410 parameters), the first 1000 samples of the built-in 8x8
digits, the MSE loss on one-hot targets (torch's ``mse_loss``, mean over samples and outputs),
float32, seed 0 (the same initial weights for every run), full-batch ``torch.optim.Adam``
(betas 0.9, 0.999, eps 1e-8, no weight decay) at three step sizes, 3000 steps each:

  eta = 2e-3 (38/eta = 19000), 4e-3 (9500), 8e-3 (4750).

Every 10 steps ``curvscope.Tracker(model, "mse", data, optimizer=opt, top=1, every=10)``
measures, on all 1000 samples, the top eigenvalue of the Hessian and of P^-1/2 H P^-1/2 (P read
from the live optimiser's state), each with its residual and error bound (Lanczos, tol 1e-4,
warm-started from the previous measurement). The tracker runs after ``loss.backward()`` and
before ``opt.step()``; it leaves training bit-identical.

Writes ``OUT/adaptive-eos.png`` (loss, preconditioned sharpness with 38/eta, raw sharpness) and
``OUT/summary.json`` (the settings, the per-measurement series and the numbers the README
quotes).

Usage:  OMP_NUM_THREADS=1 python scripts/adaptive_eos.py [--out reports/adaptive-eos]
About 40 seconds on one core. ``--quick``: 200 samples, 30 steps per run, written to
``--out`` or a fresh temporary folder (never into the repository), for a check that it runs.
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
ARCH = {"type": "mlp", "sizes": [64, 32, 10], "activation": "tanh", "bias": True}
SAMPLES = 1000
STEPS = 3000
EVERY = 10
LRS = [2e-3, 4e-3, 8e-3]
BETA1 = 0.9


def data(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` digits (pixels in [0, 1]) with one-hot float targets."""
    from curvscope.io import load_dataset

    d = load_dataset("digits")
    x = torch.as_tensor(d.x)[:samples].float()
    y = nn.functional.one_hot(torch.as_tensor(d.y)[:samples], 10).float()
    return x, y


def run(x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, every: int) -> dict:
    """Full-batch Adam from the seed-0 initialisation, measured by a Tracker every ``every``."""
    import curvscope as cs
    from curvscope.io import build_arch

    torch.manual_seed(0)
    model = build_arch(ARCH)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(BETA1, 0.999), eps=1e-8)
    tracker = cs.Tracker(model, "mse", [(x, y)], every=every, top=1, optimizer=opt, seed=0)
    losses = []
    for step in range(steps + 1):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(float(loss.detach()))
        if step == steps:
            break
        loss.backward()
        tracker(step)
        opt.step()
    rows = [r for r in tracker.rows if "preconditioned hessian" in r["eigenvalues"]]
    thresholds = {float(t) for r in rows for t in r["optimizer"]["thresholds"]}
    assert len(thresholds) == 1, thresholds
    return {
        "lr": lr,
        "threshold": thresholds.pop(),
        "loss": losses,
        "step": [r["step"] for r in rows],
        "raw": [r["eigenvalues"]["hessian"]["top"][0] for r in rows],
        "raw_bound": [r["error_bounds"]["hessian"]["top"][0] for r in rows],
        "pre": [r["eigenvalues"]["preconditioned hessian"]["top"][0] for r in rows],
        "pre_bound": [r["error_bounds"]["preconditioned hessian"]["top"][0] for r in rows],
        "converged": all(r["converged"][m]["top"][0] for r in rows for m in r["converged"]),
        "matvecs": sum(r["num_matvecs"] for r in tracker.rows),
    }


def numbers(r: dict) -> dict:
    """What the README quotes: when 38/eta is reached and how the two sharpnesses behave after."""
    thr, steps = r["threshold"], np.array(r["step"])
    pre, raw, loss = np.array(r["pre"]), np.array(r["raw"]), np.array(r["loss"])
    out = {
        "lr": r["lr"],
        "threshold": thr,
        "two_over_lr": 2 / r["lr"],
        "pre_first": pre[0],
        "raw_first": raw[0],
        "raw_last": raw[-1],
        "pre_last": pre[-1],
        "loss_first": loss[0],
        "loss_last": loss[-1],
        "max_pre_bound_relative": float(np.max(np.array(r["pre_bound"]) / pre)),
        "max_raw_bound": float(np.max(r["raw_bound"])),
        "all_converged": r["converged"],
        "matvecs": r["matvecs"],
        "measurements": len(steps),
    }
    hit = np.nonzero(pre >= thr)[0]
    out["reached_step"] = None
    if len(hit):
        i = int(hit[0])
        after = pre[i:] / thr
        out.update(
            reached_step=int(steps[i]),
            pre_over_threshold_after={k: round(float(f(after)), 4)
                                      for k, f in (("min", np.min), ("max", np.max),
                                                   ("mean", np.mean))},
            raw_at_reach=raw[i],
            raw_rise_after_reach=raw[-1] / raw[i],
            pre_rise_after_reach=pre[-1] / pre[i],
            loss_increases_before=int(np.sum(np.diff(loss[: int(steps[i]) + 1]) > 0)),
            loss_increases_after=int(np.sum(np.diff(loss[int(steps[i]) :]) > 0)),
        )
    return {k: (round(float(v), 6) if isinstance(v, np.floating) else v) for k, v in out.items()}


def _short(values: list[float]) -> list[float]:
    """Six significant digits: the series are plotted, not recomputed from."""
    return [float(f"{v:.6g}") for v in values]


def figure(runs: list[dict], path: Path) -> None:
    """Cohen et al. 2022 Fig. 1 in shape: loss, preconditioned sharpness with 38/eta, raw."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    colours = ["#0072B2", "#009E73", "#D55E00"]
    style = {"font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold",
             "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
             "grid.alpha": 0.25, "legend.frameon": False, "savefig.dpi": 150,
             "savefig.bbox": "tight"}
    with mpl.rc_context(style):
        fig = Figure(figsize=(7.4, 8.6), layout="constrained")
        ax_loss, ax_pre, ax_raw = fig.subplots(3, 1, sharex=True)
        for r, c in zip(runs, colours, strict=True):
            label = f"η = {r['lr']:g}"
            ax_loss.plot(np.arange(len(r["loss"])), r["loss"], color=c, lw=1.2, label=label)
            ax_pre.plot(r["step"], r["pre"], color=c, lw=1.1, label=label)
            ax_pre.axhline(r["threshold"], color=c, ls="--", lw=1.1,
                           label=f"38/η = {r['threshold']:.0f}")
            ax_raw.plot(r["step"], r["raw"], color=c, lw=1.3, label=label)
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("training loss (MSE)")
        ax_loss.set_title("Full-batch Adam (β1 = 0.9), 64-32-10 tanh MLP, 1000 digits")
        ax_loss.legend(loc="upper right")
        ax_pre.set_yscale("log")
        ax_pre.set_ylabel("λ1(P⁻¹H)")
        ax_pre.set_title("Preconditioned sharpness rises to 38/η and hovers there")
        ax_pre.legend(loc="lower right", ncol=2, fontsize=9)
        ax_raw.set_ylabel("λ1(H)")
        ax_raw.set_xlabel("step")
        two = ", ".join(f"{2 / r['lr']:.0f}" for r in runs)
        ax_raw.set_title(f"Raw sharpness: no plateau, far below 2/η ({two})")
        ax_raw.legend(loc="lower right")
        fig.savefig(path, metadata={"Software": "curvscope"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="default reports/adaptive-eos of this checkout")
    parser.add_argument("--quick", action="store_true", help="tiny run, a temporary folder")
    args = parser.parse_args()
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="adaptive-eos-")) if args.quick
                    else ROOT / "reports" / "adaptive-eos")
    args.out.mkdir(parents=True, exist_ok=True)
    steps, samples = (30, 200) if args.quick else (STEPS, SAMPLES)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the command line does (saturated tanh units)
    from curvscope.io import write_atomic

    x, y = data(samples)
    runs, summary = [], []
    for lr in LRS:
        t0 = time.perf_counter()
        r = run(x, y, lr, steps, EVERY)
        s = numbers(r)
        s["seconds"] = round(time.perf_counter() - t0, 1)
        runs.append(r)
        summary.append(s)
        reach = s["reached_step"]
        after = s.get("pre_over_threshold_after")
        print(f"lr {lr:g}: {len(r['step'])} measurements, {r['matvecs']} products, "
              f"{s['seconds']} s; preconditioned {s['pre_first']:.0f} -> {s['pre_last']:.0f} "
              f"(38/lr = {s['threshold']:.0f}, reached at step {reach}"
              + (f", then {after['min']:.2f}-{after['max']:.2f} x 38/lr" if after else "")
              + f"); raw {s['raw_first']:.2f} -> {s['raw_last']:.2f} (2/lr = {2 / lr:g})",
              flush=True)
    doc = {
        "what": "Cohen et al. 2022 (arXiv 2207.14484) Fig. 1 in shape: full-batch Adam, "
                "preconditioned and raw sharpness",
        "settings": {"arch": ARCH, "samples": samples, "loss": "mse (mean), one-hot targets",
                     "optimizer": "Adam", "betas": [BETA1, 0.999], "eps": 1e-8,
                     "steps": steps, "every": EVERY, "lrs": LRS, "seed": 0,
                     "measurement": "curvscope.Tracker(optimizer=opt, top=1), tol 1e-4"},
        "runs": summary,
        "series": [{"lr": r["lr"], "step": r["step"]}
                   | {k: _short(r[k]) for k in ("pre", "pre_bound", "raw", "raw_bound")}
                   | {"loss": _short([r["loss"][s] for s in r["step"]])} for r in runs],
    }
    write_atomic(args.out / "summary.json", json.dumps(doc, indent=1) + "\n")
    figure(runs, args.out / "adaptive-eos.png")
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'adaptive-eos.png'}")


if __name__ == "__main__":
    main()
