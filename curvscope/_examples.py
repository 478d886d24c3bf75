"""Example models, trained deterministically in seconds on a CPU (``curvscope example``).

Each writes ``OUT/model.pt`` (``curvscope/1``; its ``meta.data`` points to ``data.npz`` beside
it, so ``curvscope spectrum OUT/model.pt`` needs no other flag) and ``OUT/data.npz``. The
character-level language models (``tiny-gpt``, ``lstm``) instead write ``OUT/tokens.bin``
(the shipped KJV text as uint16 character ids) and point ``meta.data`` to it as a token file
(``{"kind": "tokens", "path": "tokens.bin", "dtype": "uint16", "block_size": 64}``); their
``meta.vocab`` is the vocabulary, one character per id, in id order.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from ._errors import OptionError
from .io import build_arch, load_dataset, load_tokens, save_checkpoint, shipped_text, write_atomic

__all__ = ["EXAMPLES", "encode_text", "make_example", "train_char_lm"]

EXAMPLES = {
    "digits-mlp": "64-128-64-10 tanh MLP on the 8x8 digits, cross-entropy",
    "digits-sigmoid": "64-32-10 sigmoid MLP on the 8x8 digits, cross-entropy (Veitch et al.)",
    "digits-cnn": "Conv2d + BatchNorm2d + ReLU + max-pool + Linear on 1x8x8 digits, cross-entropy",
    "sinus-mlp": "1-32-32-1 tanh MLP regressing sin(x), MSE (as in the Suk thesis)",
    "tiny-gpt": "2-layer, 4-head causal transformer (112k parameters) predicting the next "
    "character of KJV text, windows of 64, cross-entropy",
    "lstm": "1-layer LSTM (hidden 128, 111k parameters) predicting the next character of KJV "
    "text, windows of 64, cross-entropy",
}

BLOCK_SIZE = 64

# Character-level language models on the shipped text. Steps and learning rates were tuned
# to finish in under two minutes on one core and end well below the unigram entropy.
_TEXT_SPECS = {
    "tiny-gpt": {
        "arch": {
            "type": "tiny-gpt",
            "block_size": BLOCK_SIZE,
            "n_layer": 2,
            "n_head": 4,
            "n_embd": 64,
        },
        "steps": 1600,
        "batch_size": 32,
        "lr": 5e-3,
    },
    "lstm": {
        "arch": {"type": "char-lstm", "n_embd": 64, "hidden": 128, "num_layers": 1},
        "steps": 2000,
        "batch_size": 32,
        "lr": 1e-2,
    },
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
    """Train example ``name`` and write it to ``out_dir``.

    The MLP and CNN examples train with full-batch Adam; ``tiny-gpt`` and ``lstm`` with
    AdamW on random windows of the shipped text (:func:`train_char_lm`).

    Training is deterministic for a given seed and thread count.

    Returns:
        Paths and figures of what was written (model, data, loss, accuracy, seconds; for
        the language models also ``unigram_loss``, the text's character entropy in nats).

    Raises:
        OptionError: for an unknown example name.
    """
    if name in _TEXT_SPECS:
        return _make_text_example(name, Path(out_dir), seed)
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


def encode_text(text: str) -> tuple[str, np.ndarray]:
    """The vocabulary (sorted distinct characters) and ``text`` as uint16 ids into it."""
    vocab = "".join(sorted(set(text)))
    table = np.zeros(max(map(ord, vocab)) + 1, dtype=np.uint16)
    table[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=np.uint16)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return vocab, table[codes]


def train_char_lm(
    arch: dict,
    ids: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    block_size: int = BLOCK_SIZE,
    seed: int = 0,
    weight_decay: float = 0.01,
) -> tuple[nn.Module, list[float]]:
    """Train a next-token model built from ``arch`` with AdamW on random windows of ``ids``.

    Each step draws ``batch_size`` windows of ``block_size`` tokens (and their next-token
    targets) at starts from a generator seeded with ``seed``. The model starts from
    ``torch.manual_seed(seed)``. One thread: deterministic for a seed, and as fast as more on
    a model this small.

    Returns:
        The trained model (eval mode) and the training loss of every step.
    """
    t = block_size
    data = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    torch.manual_seed(seed)
    model = build_arch(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(t + 1)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for step in range(steps):
            # Cosine decay to a tenth of lr: the last steps settle instead of bouncing.
            frac = step / max(steps - 1, 1)
            for group in opt.param_groups:
                group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
            starts = torch.randint(len(data) - t, (batch_size, 1), generator=g)
            w = data[starts + offsets]
            logits = model(w[:, :-1])
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)
            )
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, losses


def _unigram_entropy(ids: np.ndarray) -> float:
    counts = np.bincount(ids)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _make_text_example(name: str, out_dir: Path, seed: int) -> dict[str, str]:
    spec = _TEXT_SPECS[name]
    t0 = time.perf_counter()
    vocab, ids = encode_text(shipped_text("kjv"))
    arch = {"type": spec["arch"]["type"], "vocab_size": len(vocab), **spec["arch"]}
    model, _ = train_char_lm(
        arch,
        ids,
        steps=spec["steps"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        seed=seed,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = write_atomic(out_dir / "tokens.bin", ids.astype("<u2").tobytes())
    # The reported loss: 512 seeded random windows of the file just written, as an
    # analysis with --samples 512 would see them.
    windows = load_tokens(data_path, block_size=BLOCK_SIZE, samples=512, seed=0)
    total = 0.0
    with torch.no_grad():
        for x, y in windows.batches(128):
            logits = model(x)
            total += float(
                nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
                )
            )
    final = total / (len(windows) * BLOCK_SIZE)
    meta = {
        "data": {
            "kind": "tokens",
            "path": "tokens.bin",
            "dtype": "uint16",
            "block_size": BLOCK_SIZE,
        },
        "loss": "cross_entropy",
        "reduction": "mean",
        "input_shape": None,
        "normalize": None,
        "vocab": vocab,
        "created_by": f"curvscope {__version__} example {name} (seed {seed})",
    }
    model_path = save_checkpoint(out_dir / "model.pt", model, arch, meta)
    return {
        "model": str(model_path),
        "data": str(data_path),
        "train_loss": f"{final:.4g}",
        "unigram_loss": f"{_unigram_entropy(ids):.4g}",
        "seconds": f"{time.perf_counter() - t0:.1f}",
    }
