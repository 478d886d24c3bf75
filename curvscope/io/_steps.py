"""The training step a checkpoint records, read without loading its tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ._checkpoints import CHECKPOINT_FORMAT, _is_torchscript, _kind

__all__ = ["STEP_KEYS", "checkpoint_step"]


STEP_KEYS = ("step", "global_step", "epoch")
"""Top-level entries of a wrapped checkpoint that record its training step, in the order they
are read (Lightning writes ``global_step`` and ``epoch``; hand-written loops often ``step``)."""

_DIGITS = re.compile(r"\d+")


def _as_step(value: Any) -> int | None:
    """An integer step from an int, an integral float, a 0-d tensor or a numeric string."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _recorded_step(path: Path) -> tuple[int | None, str | None]:
    """The step a checkpoint file records, without reading its tensors where possible."""
    kind = _kind(path)
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        try:
            meta = json.loads(metadata.get("curvscope", "{}")).get("meta") or {}
        except (ValueError, AttributeError):
            meta = {}
        step = _as_step(meta.get("step"))
        if step is not None:
            return step, "meta.step"
        for key in STEP_KEYS:
            step = _as_step(metadata.get(key))
            if step is not None:
                return step, key
        return None, None
    if kind not in ("zip", "pickle") or (kind == "zip" and _is_torchscript(path)):
        return None, None
    try:
        # mmap: the tensors stay on disk; only the small entries are read
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception:  # noqa: BLE001 - unreadable here means no recorded step; load() will say why
        return None, None
    if not isinstance(obj, dict):
        return None, None
    if obj.get("format") == CHECKPOINT_FORMAT:
        step = _as_step((obj.get("meta") or {}).get("step"))
        return (step, "meta.step") if step is not None else (None, None)
    for key in STEP_KEYS:
        step = _as_step(obj.get(key))
        if step is not None:
            return step, key
    return None, None


def checkpoint_step(path: str | Path) -> tuple[int | None, str | None]:
    """The training step of a checkpoint: ``(step, where it was read)``, or ``(None, None)``.

    Read, in this order, from ``meta["step"]`` of a curvscope checkpoint (``.pt`` or
    ``.safetensors``), from a top-level ``step``, ``global_step`` or ``epoch`` entry of a
    wrapped state dict (:data:`STEP_KEYS`), and from the last integer in the file name
    (``ckpt-0300.pt`` -> 300, ``"file name"``). Tensors are memory-mapped, not read. A file
    that cannot be read here gives ``(None, None)``: loading it reports the reason.
    """
    path = Path(path)
    try:
        step, where = _recorded_step(path)
    except OSError:
        step, where = None, None
    if step is not None:
        return step, where
    found = _DIGITS.findall(path.stem)
    if found:
        return int(found[-1]), "file name"
    return None, None
