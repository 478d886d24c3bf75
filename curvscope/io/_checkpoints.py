"""Checkpoints in, recognised by content (DESIGN.md "Inputs" and "Contracts").

Formats: the ``curvscope/1`` dict (``torch.save``, loaded with ``weights_only=True``),
``.safetensors`` with the same ``arch``/``meta`` as JSON under the metadata key ``curvscope``,
a plain state dict with ``--model MODULE:CALLABLE``, TorchScript archives, and a whole pickled
``nn.Module`` (only with ``trust_checkpoint=True``: unpickling can run arbitrary code).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import CheckpointError, NonFiniteError
from ._archs import build_arch
from ._results import file_sha256, write_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedModel",
    "load_checkpoint",
    "save_checkpoint",
    "save_safetensors",
]

CHECKPOINT_FORMAT = "curvscope/1"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded from a file, with what the result document records about it."""

    model: nn.Module
    path: Path
    format: str
    sha256: str
    arch: dict | None = None
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _kind(path: Path) -> str:
    """``zip`` (torch.save / TorchScript), ``safetensors``, ``pickle`` or ``unknown``."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _check_finite(model: nn.Module, path: Path) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteError(f"{path}: parameter {name} holds NaN or Inf values.")


def _import_builder(spec: str) -> Any:
    """Resolve ``MODULE:CALLABLE`` or ``path/to/file.py:CALLABLE``."""
    if ":" not in spec:
        raise CheckpointError(f"--model {spec!r} must be MODULE:CALLABLE or path/file.py:CALLABLE.")
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py") or Path(target).exists():
            file = Path(target)
            if not file.exists():
                raise CheckpointError(f"--model file {file} does not exist.")
            name = f"_curvscope_user_model_{abs(hash(str(file.resolve())))}"
            mod_spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        raise CheckpointError(f"--model {spec}: cannot import {target} ({exc}).") from None
    if not hasattr(module, attr):
        raise CheckpointError(f"--model {spec}: {target} has no attribute {attr!r}.")
    return getattr(module, attr)


def _unwrap(state: dict, path: Path, state_key: str | None, strip_prefix: str | None) -> dict:
    if state_key is not None:
        if state_key not in state:
            raise CheckpointError(
                f"{path} has no key {state_key!r} (--state-key); its keys are "
                f"{', '.join(map(str, list(state)[:10]))}."
            )
        state = state[state_key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict under the given key.")
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    return state


def _load_state(model: nn.Module, state: dict, path: Path) -> None:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    wrapped = [k for k in state if k in _WRAPPER_KEYS and isinstance(state[k], dict)]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError:
        expected = set(model.state_dict())
        missing = sorted(expected - set(tensors))
        unexpected = sorted(set(tensors) - expected)
        hint = ""
        if wrapped:
            hint = f" It looks wrapped: try --state-key {wrapped[0]}."
        elif unexpected and all("." in k for k in unexpected):
            prefix = unexpected[0].split(".")[0] + "."
            if all(k.startswith(prefix) for k in unexpected):
                hint = f" Keys share the prefix {prefix!r}: try --strip-prefix {prefix}."
        shapes = [
            k for k in expected & set(tensors) if model.state_dict()[k].shape != tensors[k].shape
        ]
        detail = []
        if missing:
            detail.append(f"missing keys {missing[:6]}")
        if unexpected:
            detail.append(f"unexpected keys {unexpected[:6]}")
        if shapes:
            detail.append(f"shape mismatch in {sorted(shapes)[:6]}")
        raise CheckpointError(
            f"{path} does not fit the model: {'; '.join(detail)}.{hint}"
        ) from None


def load_checkpoint(
    path: str | Path,
    *,
    model: str | None = None,
    trust_checkpoint: bool = False,
    state_key: str | None = None,
    strip_prefix: str | None = None,
    map_location: str = "cpu",
) -> LoadedModel:
    """Load a model from any supported checkpoint format, detected from the file's content.

    Args:
        path: the checkpoint file.
        model: ``MODULE:CALLABLE`` building the module, for a plain state dict.
        trust_checkpoint: allow unpickling a whole ``nn.Module`` (can run code).
        state_key: key of the state dict in a wrapped checkpoint.
        strip_prefix: prefix removed from every state-dict key.
        map_location: device tensors are loaded to.

    Raises:
        CheckpointError: with one sentence naming the file and what to do.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file.")
    try:
        kind = _kind(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror}).") from None
    sha = file_sha256(path)
    if kind == "safetensors":
        return _load_safetensors(path, sha, model, state_key, strip_prefix)
    if kind == "zip" and _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location=map_location)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path} is a damaged TorchScript archive ({exc}).") from None
        _check_finite(module, path)
        return LoadedModel(
            module,
            path,
            "torchscript",
            sha,
            notes=[
                "TorchScript model: torch.func cannot transform it; Hessian products use "
                "double backward, one column at a time."
            ],
        )
    if kind not in ("zip", "pickle"):
        raise CheckpointError(
            f"{path} is not a checkpoint curvscope can read (expected a torch.save file, "
            "a .safetensors file or a TorchScript archive)."
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        return _maybe_pickled_module(path, sha, trust_checkpoint, map_location, exc)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt archives
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({exc}).") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        arch = obj.get("arch")
        meta = dict(obj.get("meta") or {})
        net = build_arch(arch)
        _load_state(net, _unwrap(obj["state_dict"], path, None, strip_prefix), path)
        _check_finite(net, path)
        return LoadedModel(net, path, CHECKPOINT_FORMAT, sha, arch, meta)
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never returns modules
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a model or state dict.")
    if model is None:
        wrapped = [k for k in obj if k in _WRAPPER_KEYS]
        extra = f" (it looks wrapped under {wrapped[0]!r}: add --state-key)" if wrapped else ""
        raise CheckpointError(
            f"{path} is a plain state dict{extra}; pass --model MODULE:CALLABLE (or "
            "path/to/file.py:CALLABLE) that builds the module."
        )
    builder = _import_builder(model)
    try:
        net = builder()
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"--model {model}: calling it failed ({exc}).") from None
    if not isinstance(net, nn.Module):
        raise CheckpointError(f"--model {model} returned a {type(net).__name__}, not a module.")
    _load_state(net, _unwrap(obj, path, state_key, strip_prefix), path)
    _check_finite(net, path)
    return LoadedModel(net, path, "state_dict", sha, meta={})


def _maybe_pickled_module(path, sha, trust, map_location, exc) -> LoadedModel:
    if not trust:
        raise CheckpointError(
            f"{path} is a pickled object (e.g. a whole nn.Module saved with torch.save(model)): "
            "loading it can run arbitrary code, so curvscope refuses; pass --trust-checkpoint "
            "only for files you trust, or save model.state_dict() or a curvscope checkpoint."
        ) from None
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path} could not be unpickled ({err}).") from None
    if not isinstance(obj, nn.Module):
        raise CheckpointError(f"{path} unpickles to a {type(obj).__name__}, not an nn.Module.")
    _check_finite(obj, path)
    return LoadedModel(obj, path, "pickle", sha, notes=["loaded a pickled module (trusted)."])


def _load_safetensors(path, sha, model, state_key, strip_prefix) -> LoadedModel:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path} is a damaged safetensors file ({exc}).") from None
    info = {}
    if "curvscope" in metadata:
        try:
            info = json.loads(metadata["curvscope"])
        except ValueError:
            raise CheckpointError(f"{path}: its 'curvscope' metadata is not JSON.") from None
    if info.get("arch"):
        net = build_arch(info["arch"])
        fmt = "safetensors"
    elif model is not None:
        net = _import_builder(model)()
        fmt = "safetensors+model"
    else:
        raise CheckpointError(
            f"{path} has no curvscope arch metadata; pass --model MODULE:CALLABLE."
        )
    _load_state(net, _unwrap(state, path, state_key, strip_prefix), path)
    _check_finite(net, path)
    return LoadedModel(net, path, fmt, sha, info.get("arch"), dict(info.get("meta") or {}))


def save_checkpoint(path: str | Path, model: nn.Module, arch: dict, meta: dict) -> Path:
    """Write a ``curvscope/1`` checkpoint atomically.

    Args:
        path: destination file.
        model: the module (its state dict is saved).
        arch: the architecture description (:func:`build_arch` must rebuild it).
        meta: ``{"data", "loss", "reduction", "input_shape", "normalize", "created_by"}``.
    """
    doc = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    buf = io.BytesIO()
    torch.save(doc, buf)
    return write_atomic(path, buf.getvalue())


def save_safetensors(path: str | Path, model: nn.Module, arch: dict, meta: dict) -> Path:
    """Write the model as ``.safetensors`` with ``arch``/``meta`` JSON under ``curvscope``."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    data = save(state, metadata={"curvscope": json.dumps({"arch": arch, "meta": meta})})
    return write_atomic(path, data)
