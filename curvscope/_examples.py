"""Example models, trained deterministically in seconds on a CPU (``curvscope example``).

Each writes ``OUT/model.pt`` (``curvscope/1``; its ``meta.data`` points to ``data.npz`` beside
it, so ``curvscope spectrum OUT/model.pt`` needs no other flag) and ``OUT/data.npz``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from ._errors import OptionError
from .io._archs import build_arch
from .io._checkpoints import save_checkpoint
from .io._datasets import load_dataset
from .io._results import write_atomic

__all__ = ["EXAMPLES", "make_example"]

EXAMPLES = {
    "digits-mlp": "64-128-64-10 tanh MLP on the 8x8 digits, cross-entropy",
    "digits-sigmoid": "64-32-10 sigmoid MLP on the 8x8 digits, cross-entropy (Veitch et al.)",
    "digits-cnn": "Conv2d + BatchNorm2d + ReLU + max-pool + Linear on 1x8x8 digits, cross-entropy",
    "sinus-mlp": "1-32-32-1 tanh MLP regressing sin(x), MSE (as in the Suk thesis)",
}

_SPECS = {
    "digits-mlp": {
        "arch": {"type": "mlp", "sizes": [64, 128, 64, 10], "activation": "tanh", "bias": True},
        "data": "digits",
        "loss": "cross_entropy",
        "steps": 150,
        "lr": 1e-2,
        "shape": None,
    },
    "digits-sigmoid": {
        "arch": {"type": "mlp", "sizes": [64, 32, 10], "activation": "sigmoid", "bias": True},
        "data": "digits",
        "loss": "cross_entropy",
        "steps": 300,
        "lr": 2e-2,
        "shape": None,
    },
    "digits-cnn": {
        "arch": {
            "type": "sequential",
            "layers": [
                {
                    "type": "Conv2d",
                    "args": {"in_channels": 1, "out_channels": 8, "kernel_size": 3, "padding": 1},
                },
                {"type": "BatchNorm2d", "args": {"num_features": 8}},
                {"type": "ReLU", "args": {}},
                {"type": "MaxPool2d", "args": {"kernel_size": 2}},
                {"type": "Flatten", "args": {}},
                {"type": "Linear", "args": {"in_features": 128, "out_features": 10}},
            ],
        },
        "data": "digits",
        "loss": "cross_entropy",
        "steps": 150,
        "lr": 1e-2,
        "shape": [1, 8, 8],
    },
    "sinus-mlp": {
        "arch": {"type": "mlp", "sizes": [1, 32, 32, 1], "activation": "tanh", "bias": True},
        "data": "sinus",
        "loss": "mse",
        "steps": 800,
        "lr": 1e-2,
        "shape": None,
    },
}


def make_example(name: str, out_dir: str | Path, *, seed: int = 0) -> dict[str, str]:
    """Train example ``name`` with full-batch Adam and write it to ``out_dir``.

    Training is deterministic for a given seed and thread count.

    Returns:
        Paths and figures of what was written (model, data, loss, accuracy, seconds).

    Raises:
        OptionError: for an unknown example name.
    """
    if name not in _SPECS:
        raise OptionError(f"example {name!r} is not known; choose one of {', '.join(EXAMPLES)}.")
    spec = _SPECS[name]
    t0 = time.perf_counter()
    data = load_dataset(spec["data"], input_shape=spec["shape"])
    torch.manual_seed(seed)
    model = build_arch(spec["arch"])
    loss_fn = nn.CrossEntropyLoss() if spec["loss"] == "cross_entropy" else nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    model.train()
    # These models are tiny: one thread is as fast as two and immune to oversubscription on
    # a busy machine (seen: 10x slower with the default thread count while other jobs ran).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(spec["steps"]):
            opt.zero_grad()
            loss = loss_fn(model(data.x), data.y)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        out = model(data.x)
        final = float(loss_fn(out, data.y))
        acc = float((out.argmax(-1) == data.y).float().mean()) if spec["loss"] != "mse" else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "data": "data.npz",
        "loss": spec["loss"],
        "reduction": "mean",
        "input_shape": spec["shape"],
        "normalize": None,
        "created_by": f"curvscope {__version__} example {name} (seed {seed})",
    }
    model_path = save_checkpoint(out_dir / "model.pt", model, spec["arch"], meta)
    buf = _npz_bytes(x=data.x.numpy().astype(np.float32), y=data.y.numpy())
    data_path = write_atomic(out_dir / "data.npz", buf)
    info = {
        "model": str(model_path),
        "data": str(data_path),
        "train_loss": f"{final:.4g}",
        "seconds": f"{time.perf_counter() - t0:.1f}",
    }
    if acc is not None:
        info["train_accuracy"] = f"{acc:.4f}"
    return info


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()
