"""Checkpoints in, recognised by content (docs/DESIGN.md "Inputs" and "Checkpoint format").

Formats: the ``curvscope/1`` dict (``torch.save``, loaded with ``weights_only=True``),
``.safetensors`` with the same ``arch``/``meta`` as JSON under the metadata key ``curvscope``,
a plain state dict with a ``model`` builder ``MODULE:CALLABLE``, TorchScript archives, and a
whole pickled ``nn.Module`` (only with ``trust_checkpoint=True``: unpickling can run arbitrary
code). Whatever the file holds, it loads or raises one sentence naming it (issue 14).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import pickle
import pickletools
import re
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import CheckpointError, NonFiniteError, arg
from ._archs import build_arch
from ._datasets import _brief
from ._results import file_sha256, write_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedModel",
    "load_checkpoint",
    "save_checkpoint",
    "save_safetensors",
]

CHECKPOINT_FORMAT = "curvscope/1"


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded from a file, with what the result document records about it.

    Attributes:
        model: the module, in eval mode as loaded (``None`` in a sharded problem's record:
            the problem holds the sharded copy, and the whole module is let go).
        path: the checkpoint file.
        format: ``curvscope/1``, ``safetensors``, ``safetensors+model``, ``state_dict``,
            ``torchscript`` or ``pickle``.
        sha256: SHA-256 of the checkpoint's bytes.
        arch: the architecture description, for the formats that carry one.
        meta: the checkpoint's ``meta`` dict (data, loss, reduction...), or empty.
        notes: what the loader decided on the user's behalf (a state dict found under a
            wrapper key, entries ignored with ``load_strict=False``...).
        files: every file read, path -> SHA-256 (the checkpoint and the model builder's
            ``.py`` file when one was given).
    """

    model: nn.Module
    path: Path
    format: str
    sha256: str
    arch: dict | None = None
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


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
    except Exception:  # noqa: BLE001 - a damaged archive is torch.load's to report
        return False


def _check_unpickled(model: nn.Module, path: Path) -> None:
    """:func:`_check_finite` for a module that came out of a pickle or TorchScript archive.

    A damaged pickle can still unpickle into an ``nn.Module`` whose inner dicts are broken
    (a flipped byte renames ``_modules``), so walking its parameters is itself a check.
    """
    try:
        _check_finite(model, path)
        model.state_dict()
    except (CheckpointError, NonFiniteError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{path} unpickles to a damaged module ({_brief(exc)}).", path=str(path)
        ) from None


def _check_finite(model: nn.Module, path: Path) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteError(
                f"{path}: parameter {name} holds NaN or Inf values.", path=str(path), layer=name
            )
    for name, b in model.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise NonFiniteError(
                f"{path}: buffer {name} holds NaN or Inf values.", path=str(path), layer=name
            )


def _import_builder(spec: str) -> tuple[Any, Path | None]:
    """Resolve ``MODULE:CALLABLE`` or ``path/to/file.py:CALLABLE``.

    Returns:
        The callable and the source file of its module, when it has one.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise CheckpointError(
            f"{arg('builder')} {spec!r} must be MODULE:CALLABLE or path/file.py:CALLABLE.",
            option="builder",
        )
    target, _, attr = spec.rpartition(":")
    name = None
    try:
        if target.endswith(".py") or Path(target).exists():
            file = Path(target)
            if not file.is_file():
                raise CheckpointError(
                    f"{arg('builder')} file {file} does not exist.",
                    path=str(file),
                    option="builder",
                )
            name = f"_curvscope_user_model_{abs(hash(str(file.resolve())))}"
            mod_spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
            source: Path | None = file
        else:
            module = importlib.import_module(target)
            where = getattr(module, "__file__", None)
            source = Path(where) if where and Path(where).is_file() else None
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        if name is not None:
            sys.modules.pop(name, None)
        raise CheckpointError(
            f"{arg('builder')} {spec}: cannot import {target} ({_brief(exc)}).", option="builder"
        ) from None
    if not hasattr(module, attr):
        raise CheckpointError(
            f"{arg('builder')} {spec}: {target} has no attribute {attr!r}.", option="builder"
        )
    return getattr(module, attr), source


def _build_user_model(spec: str, files: dict[str, str]) -> nn.Module:
    builder, source = _import_builder(spec)
    if source is not None:
        try:
            files[str(source)] = file_sha256(source)
        except OSError:  # imported a moment ago; a file that vanished since is not ours
            pass
    try:
        net = builder()
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{arg('builder')} {spec}: calling it failed ({_brief(exc)}).", option="builder"
        ) from None
    if not isinstance(net, nn.Module):
        raise CheckpointError(
            f"{arg('builder')} {spec} returned a {type(net).__name__}, not a module.",
            option="builder",
        )
    return net


def _build_arch(
    arch: Any, path: Path, state: dict, strip_prefix: str | None, strict: bool
) -> tuple[nn.Module, list[str]]:
    """Build ``arch`` after checking, on the meta device, that ``state`` fits it.

    A damaged or hostile ``arch`` (``sizes: [100000, 100000]``) would otherwise allocate
    what it claims before the state dict is compared with it; on the meta device nothing
    is allocated, and a state dict that fits holds every tensor the module needs, so the
    real module is no larger than the file.

    Returns:
        The module with the state loaded, and the notes :func:`_fit` made.
    """

    def build() -> nn.Module:
        try:
            return build_arch(arch)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc.message}", path=str(path)) from None
        except Exception as exc:  # noqa: BLE001 - bad arguments inside the arch dict
            raise CheckpointError(
                f"{path}: its arch cannot be built ({_brief(exc)}).", path=str(path)
            ) from None

    state = _strip(state, strip_prefix)
    with torch.device("meta"):
        skeleton = build()
    _fit(skeleton, state, path, strict)
    net = build()
    tensors, notes = _fit(net, state, path, strict)
    _load(net, tensors, path)
    return net, notes


def _strip(state: dict, prefix: str | None) -> dict:
    if not prefix:
        return state
    return {k.removeprefix(prefix) if isinstance(k, str) else k: v for k, v in state.items()}


def _tensor_dict(value: Any) -> bool:
    """A non-empty dict whose values are all tensors: what a nested state dict looks like."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _keys(obj: dict, limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in list(obj)[:limit])
    return shown + (f" and {len(obj) - limit} more" if len(obj) > limit else "") or "none"


def _unwrap(
    obj: dict,
    path: Path,
    net: nn.Module,
    state_key: str | None,
    strip_prefix: str | None,
    strict: bool,
) -> tuple[dict, list[str]]:
    """The state dict inside a checkpoint dict, stripped of ``strip_prefix``.

    Without ``state_key``: the dict itself when it holds tensors at its top level, else the
    one value that is a dict of tensors (``{"model_state": {...}, "epoch": 3}``), else, of
    several, the one that fits ``net``.

    Returns:
        The state dict and a note saying where it was found, when it was looked for.
    """
    if state_key is not None:
        if state_key not in obj:
            raise CheckpointError(
                f"{path} has no key {state_key!r} ({arg('state_key')}); its keys are {_keys(obj)}.",
                path=str(path),
            )
        state = obj[state_key]
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{path} holds a {type(state).__name__} under {state_key!r}, not a state dict.",
                path=str(path),
            )
        return _strip(state, strip_prefix), []
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip(obj, strip_prefix), []
    candidates = [k for k, v in obj.items() if _tensor_dict(v)]
    if not candidates:
        raise CheckpointError(
            f"{path} holds no tensors at its top level nor a dict of tensors under one key (its "
            f"keys are {_keys(obj)}); name the key of the state dict with {arg('state_key')}.",
            path=str(path),
        )
    if len(candidates) > 1:
        fitting = [k for k in candidates if _fits(net, _strip(obj[k], strip_prefix), strict)]
        if len(fitting) != 1:
            which = "none fits" if not fitting else f"{len(fitting)} fit"
            raise CheckpointError(
                f"{path} holds state dicts under {_keys(dict.fromkeys(candidates))} and {which} "
                f"the model; choose one with {arg('state_key')}.",
                path=str(path),
            )
        candidates = fitting
    key = candidates[0]
    return _strip(obj[key], strip_prefix), [f"state dict found under the key {key!r}."]


def _mismatch(net: nn.Module, state: dict, strict: bool) -> tuple[list, list, list]:
    """Missing, unexpected (empty unless ``strict``) and wrongly shaped state-dict keys."""
    expected = net.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted((k for k in tensors if k not in expected), key=str) if strict else []
    shapes = sorted(k for k in expected if k in tensors and tensors[k].shape != expected[k].shape)
    return missing, unexpected, shapes


def _fits(net: nn.Module, state: dict, strict: bool) -> bool:
    return not any(_mismatch(net, state, strict))


def _fit(net: nn.Module, state: dict, path: Path, strict: bool) -> tuple[dict, list[str]]:
    """Check that ``state`` fits ``net``; the tensors to load, and notes.

    With ``strict=False`` entries that are no parameter or buffer of ``net`` are left out
    (and listed in a note); missing entries and wrong shapes are refused either way.

    Returns:
        The tensors to load and the notes.
    """
    missing, unexpected, shapes = _mismatch(net, state, strict)
    if missing or unexpected or shapes:
        expected = net.state_dict()
        extra = [k for k, v in state.items() if isinstance(v, torch.Tensor) and k not in expected]
        nested = [k for k, v in state.items() if isinstance(v, dict)]
        prefix = None
        if extra and all(isinstance(k, str) and "." in k for k in extra):
            prefix = extra[0].split(".")[0] + "."
            if not all(k.startswith(prefix) for k in extra) or not any(
                k.removeprefix(prefix) in missing for k in extra
            ):
                prefix = None
        hint = ""
        if missing and nested:
            hint = f" It looks wrapped: try {arg('state_key')} {nested[0]}."
        elif missing and prefix:
            hint = f" Keys share the prefix {prefix!r}: try {arg('strip_prefix')} {prefix}."
        elif unexpected and not missing and not shapes:
            hint = f" To ignore entries the model lacks, pass {arg('load_strict=False')}."
        detail = []
        if missing:
            detail.append(f"missing keys {missing[:6]}")
        if unexpected:
            detail.append(f"unexpected keys {unexpected[:6]}")
        if shapes:
            detail.append(f"shape mismatch in {shapes[:6]}")
        raise CheckpointError(
            f"{path} does not fit the model: {'; '.join(detail)}.{hint}", path=str(path)
        )
    expected = net.state_dict()
    tensors = {k: state[k] for k in expected}
    for k, t in tensors.items():
        if t.is_complex() and not expected[k].is_complex():
            raise CheckpointError(
                f"{path}: entry {k} holds complex values but the model's {k} is real.",
                path=str(path),
                layer=k,
            )
    notes = []
    ignored = sorted((k for k, v in state.items() if k not in expected), key=str)
    if ignored and not strict:
        shown = ", ".join(map(str, ignored[:20])) + (" ..." if len(ignored) > 20 else "")
        notes.append(f"ignored {len(ignored)} entries that are not in the model: {shown}.")
    return tensors, notes


def _load(net: nn.Module, tensors: dict, path: Path) -> None:
    try:
        net.load_state_dict(tensors, strict=True)
    except Exception as exc:  # noqa: BLE001 - meta or quantized tensors, odd dtypes
        raise CheckpointError(
            f"{path}: its state dict cannot be loaded into the model ({_brief(exc)}).",
            path=str(path),
        ) from None


def load_checkpoint(
    path: str | Path,
    *,
    model: str | None = None,
    trust_checkpoint: bool = False,
    state_key: str | None = None,
    strip_prefix: str | None = None,
    map_location: str = "cpu",
    load_strict: bool = True,
) -> LoadedModel:
    """Load a model from any supported checkpoint format, detected from the file's content.

    Args:
        path: the checkpoint file.
        model: ``MODULE:CALLABLE`` building the module, for a plain state dict.
        trust_checkpoint: allow unpickling a whole ``nn.Module`` (can run code); the
            checkpoint's folder and the current folder are importable while it unpickles.
        state_key: key of the state dict in a wrapped checkpoint (found automatically when
            one value alone is a dict of tensors, or one alone fits the model).
        strip_prefix: prefix removed from every state-dict key.
        map_location: device tensors are loaded to.
        load_strict: refuse state-dict entries that are no parameter or buffer of the
            model; with ``False`` they are ignored and listed in ``notes``. Missing entries
            and wrong shapes are refused either way.

    Raises:
        CheckpointError: with one sentence naming the file and what to do.
        NonFiniteError: when a parameter or buffer holds NaN or Inf.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist.", path=str(path))
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file.", path=str(path))
    try:
        kind = _kind(path)
        sha = file_sha256(path)
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({_brief(exc)}).", path=str(path)
        ) from None
    files = {str(path): sha}
    if kind == "safetensors":
        return _load_safetensors(path, sha, files, model, state_key, strip_prefix, load_strict)
    if kind == "zip" and _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location=map_location)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"{path} is a damaged TorchScript archive ({_brief(exc)}).", path=str(path)
            ) from None
        _check_unpickled(module, path)
        note = (
            "TorchScript model: torch.func cannot transform it; Hessian products use "
            "double backward, one column at a time."
        )
        if model is not None:
            # a builder wraps the scripted module: builder(scripted) -> nn.Module (e.g. to
            # pick one head, add fixed arguments or a preprocessing step)
            builder, source = _import_builder(model)
            if source is not None:
                files[str(source)] = file_sha256(source)
            try:
                wrapped = builder(module)
            except Exception as exc:  # noqa: BLE001 - the user's code: one sentence
                raise CheckpointError(
                    f"{arg('builder')} {model}: calling it with the TorchScript module of "
                    f"{path} failed ({_brief(exc)}); a builder for a TorchScript file takes "
                    "the loaded module and returns the module to analyse.",
                    option="builder",
                ) from None
            if not isinstance(wrapped, nn.Module):
                raise CheckpointError(
                    f"{arg('builder')} {model} returned a {type(wrapped).__name__}, not a module.",
                    option="builder",
                )
            notes = [note, f"the TorchScript module is wrapped by {model}."]
            return LoadedModel(wrapped, path, "torchscript+builder", sha, notes=notes, files=files)
        return LoadedModel(module, path, "torchscript", sha, notes=[note], files=files)
    if kind not in ("zip", "pickle"):
        raise CheckpointError(
            f"{path} is not a checkpoint curvscope can read (expected a torch.save file, "
            "a .safetensors file or a TorchScript archive).",
            path=str(path),
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        return _maybe_pickled_module(path, sha, files, trust_checkpoint, map_location, exc)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt archives
        raise CheckpointError(
            f"{path} is corrupt or not a checkpoint ({_brief(exc)}).", path=str(path)
        ) from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        arch, meta, state = obj.get("arch"), obj.get("meta") or {}, obj.get("state_dict")
        if not isinstance(state, dict) or not isinstance(meta, dict):
            raise CheckpointError(
                f"{path} is a damaged {CHECKPOINT_FORMAT} checkpoint: its state_dict or meta is "
                "not a dict.",
                path=str(path),
            )
        net, notes = _build_arch(arch, path, state, strip_prefix, load_strict)
        _check_finite(net, path)
        return LoadedModel(
            net, path, CHECKPOINT_FORMAT, sha, arch, dict(meta), notes=notes, files=files
        )
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a model or state dict.", path=str(path)
        )
    if model is None:
        has_tensors = any(isinstance(v, torch.Tensor) or _tensor_dict(v) for v in obj.values())
        if not has_tensors:
            raise CheckpointError(
                f"{path} holds a dict with no tensors (keys {_keys(obj)}), not a model or state "
                "dict.",
                path=str(path),
            )
        raise CheckpointError(
            f"{path} is a plain state dict; pass {arg('builder')} MODULE:CALLABLE (or "
            "path/to/file.py:CALLABLE) that builds the module.",
            path=str(path),
        )
    net = _build_user_model(model, files)
    state, notes = _unwrap(obj, path, net, state_key, strip_prefix, load_strict)
    tensors, more = _fit(net, state, path, load_strict)
    _load(net, tensors, path)
    _check_finite(net, path)
    return LoadedModel(net, path, "state_dict", sha, meta={}, notes=notes + more, files=files)


def _refused_global(exc: BaseException) -> str | None:
    """The class a weights-only load refused, when that is why it failed."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    return found.group(1) if found else None


def _unpickler_reason(exc: BaseException) -> str:
    """The line of torch's long weights-only message that says what went wrong."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            return _brief(line.split("WeightsUnpickler error:", 1)[1])
    return _brief(exc)


def _cwd() -> list[Path]:
    """The current folder, or none when it was deleted under us (Path.cwd() raises then)."""
    try:
        return [Path.cwd()]
    except OSError:
        return []


@contextlib.contextmanager
def _importable(*folders: Path) -> Iterator[None]:
    """Put ``folders`` in front of ``sys.path`` for the duration, then take them out again.

    A model pickled by a training script refers to its class by module name
    (``mymodels.Net``); that module usually sits beside the checkpoint or in the folder the
    script ran from, which is how the script itself imported it.
    """
    added = [str(f) for f in dict.fromkeys(folders) if str(f) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for entry in added:
            if entry in sys.path:
                sys.path.remove(entry)


# Memo slots are numbered as a pickler fills them, 0, 1, 2...; a damaged index (a flipped bit
# in LONG_BINPUT) makes the C unpickler grow its memo to that size and zero it: gigabytes.
_MEMO_SLACK = 16


def _scan_pickles(path: Path) -> None:
    """Walk the opcodes of the pickles a trusted load will run, without running any.

    :mod:`pickletools` reads each opcode's argument and stops at the end of the data, so a
    damaged length or memo index is refused here rather than allocated by the unpickler.
    The zip format (``torch.save`` since 1.6) keeps its pickle in ``*/data.pkl``; the legacy
    format is five pickles in a row (magic number, protocol, system info, object, storage
    keys) before raw tensor bytes.
    """
    try:
        if _kind(path) == "zip":
            # zipfile checks the CRC-32 that torch's reader skips: a flipped bit is caught here.
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                streams = [io.BytesIO(zf.read(names[0]))] if names else []
            count = 1
        else:
            streams, count = [io.BytesIO(path.read_bytes())], 5
    except Exception as exc:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, OSError...
        raise CheckpointError(
            f"{path} is corrupt: its archive is damaged ({_brief(exc)}).", path=str(path)
        ) from None
    for stream in streams:
        for _ in range(count):
            if stream.tell() == len(stream.getbuffer()):
                break
            try:
                for n, (op, argument, _pos) in enumerate(pickletools.genops(stream)):
                    if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and (
                        not isinstance(argument, int) or argument > 2 * n + _MEMO_SLACK
                    ):
                        raise ValueError(f"memo index {argument} at opcode {n}")
            except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and more
                raise CheckpointError(
                    f"{path} is corrupt: its pickle is damaged ({_brief(exc)}).", path=str(path)
                ) from None


def _maybe_pickled_module(path, sha, files, trust, map_location, exc) -> LoadedModel:
    refused = _refused_global(exc)
    if not trust:
        if refused is None:
            raise CheckpointError(
                f"{path} is corrupt or not a checkpoint ({_unpickler_reason(exc)}).",
                path=str(path),
            ) from None
        raise CheckpointError(
            f"{path} is a pickled object (it needs {refused}, e.g. a whole nn.Module saved "
            "with torch.save(model)): loading it can run arbitrary code, so curvscope refuses; "
            f"pass {arg('trust_checkpoint')} only for files you trust, or save "
            "model.state_dict() or a curvscope checkpoint.",
            path=str(path),
        ) from None
    _scan_pickles(path)
    try:
        with _importable(path.resolve().parent, *_cwd()):
            obj = torch.load(path, map_location=map_location, weights_only=False)
    except ModuleNotFoundError as err:
        top = (err.name or "?").split(".")[0]
        raise CheckpointError(
            f"{path} needs the module {err.name!r} to unpickle its model, and it is not "
            f"importable from {path.resolve().parent}, the current folder or the Python path; "
            f"pass a {arg('builder')} MODULE:CALLABLE with a state dict instead, or add "
            f"the folder that holds {top}.py to PYTHONPATH.",
            path=str(path),
        ) from None
    except AttributeError as err:
        where = "the script that saved it (__main__)" if "__main__" in str(err) else "its module"
        raise CheckpointError(
            f"{path} refers to a class that {where} no longer defines ({_brief(err)}); import "
            f"the module that defines it, or pass a {arg('builder')} MODULE:CALLABLE with "
            "a state dict instead.",
            path=str(path),
        ) from None
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"{path} could not be unpickled ({_brief(err)}).", path=str(path)
        ) from None
    if not isinstance(obj, nn.Module):
        raise CheckpointError(
            f"{path} unpickles to a {type(obj).__name__}, not an nn.Module.", path=str(path)
        )
    _check_unpickled(obj, path)
    return LoadedModel(
        obj, path, "pickle", sha, notes=["loaded a pickled module (trusted)."], files=files
    )


def _load_safetensors(path, sha, files, model, state_key, strip_prefix, strict) -> LoadedModel:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{path} is a damaged safetensors file ({_brief(exc)}).", path=str(path)
        ) from None
    if state_key is not None:
        raise CheckpointError(
            f"{path} is a safetensors file, whose tensors are never wrapped under a key; leave "
            f"{arg('state_key')} out (or use {arg('strip_prefix')}).",
            path=str(path),
        )
    info: Any = {}
    if "curvscope" in metadata:
        try:
            info = json.loads(metadata["curvscope"])
        except ValueError:
            raise CheckpointError(
                f"{path}: its 'curvscope' metadata is not JSON.", path=str(path)
            ) from None
        if not isinstance(info, dict) or not isinstance(info.get("meta") or {}, dict):
            raise CheckpointError(
                f"{path}: its 'curvscope' metadata is not a dict with arch and meta.",
                path=str(path),
            )
    if info.get("arch"):
        net, notes = _build_arch(info["arch"], path, state, strip_prefix, strict)
        fmt = "safetensors"
    elif model is not None:
        net = _build_user_model(model, files)
        tensors, notes = _fit(net, _strip(state, strip_prefix), path, strict)
        _load(net, tensors, path)
        fmt = "safetensors+model"
    else:
        raise CheckpointError(
            f"{path} has no curvscope arch metadata; pass {arg('builder')} MODULE:CALLABLE.",
            path=str(path),
        )
    _check_finite(net, path)
    meta = dict(info.get("meta") or {})
    return LoadedModel(net, path, fmt, sha, info.get("arch"), meta, notes=notes, files=files)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    arch: dict,
    meta: dict,
    *,
    optimizer: torch.optim.Optimizer | dict | None = None,
) -> Path:
    """Write a ``curvscope/1`` checkpoint atomically.

    Args:
        path: destination file.
        model: the module (its state dict is saved).
        arch: the architecture description (:func:`build_arch` must rebuild it).
        meta: ``{"data", "loss", "reduction", "input_shape", "normalize", "created_by"}``.
        optimizer: an optimiser (or its ``state_dict()``), saved under ``"optimizer"`` for
            the preconditioned sharpness (docs/DESIGN.md "Preconditioned sharpness").
    """
    doc = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    if optimizer is not None:
        state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        doc["optimizer"] = _cpu_copy(state)
    buf = io.BytesIO()
    torch.save(doc, buf)
    return write_atomic(path, buf.getvalue())


def _cpu_copy(obj: Any) -> Any:
    """Tensors of a nested state copied to the CPU (lists, tuples and dicts kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def save_safetensors(path: str | Path, model: nn.Module, arch: dict, meta: dict) -> Path:
    """Write the model as ``.safetensors`` with ``arch``/``meta`` JSON under ``curvscope``."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    data = save(state, metadata={"curvscope": json.dumps({"arch": arch, "meta": meta})})
    return write_atomic(path, data)
