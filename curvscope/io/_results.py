"""Result documents: versioned, strict JSON, written atomically.

Every command writes ``DIR/<command>.json`` with the same top-level fields (docs/DESIGN.md
"Result document"): ``schema``, ``command``, ``created``, ``curvscope_version``, ``input``,
``settings``, ``results``, ``timings``, ``counts``, ``notes``. Non-finite numbers are written
as ``null`` with a note naming where they were; NaN never reaches the file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import hashlib
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import CurvscopeError
from ._runs import Run, current_run

__all__ = [
    "SCHEMA",
    "file_sha256",
    "make_document",
    "read_document",
    "to_jsonable",
    "versions",
    "write_atomic",
    "write_document",
]

SCHEMA = "curvscope.result/1"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (of every file, in name order, for a directory)."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the libraries the numbers depend on."""
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def to_jsonable(obj: Any, _path: str = "$", _notes: list[str] | None = None) -> Any:
    """Convert dataclasses, tensors, arrays and enums to strict-JSON values.

    Non-finite floats become ``None``; each such place is appended to ``_notes`` as a
    JSON path, so the caller can add a sibling note.
    """
    notes = _notes if _notes is not None else []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        obj = obj.item() if obj.dim() == 0 else obj.tolist()
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, f"{_path}.{k}", notes) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{_path}[{i}]", notes) for i, v in enumerate(obj)]
    if isinstance(obj, float):
        if not math.isfinite(obj):
            notes.append(f"{_path} was {obj} (written as null)")
            return None
        return obj
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, torch.device):
        return str(obj)
    return str(obj)


def make_document(
    command: str,
    *,
    input: dict[str, Any],
    settings: dict[str, Any],
    results: dict[str, Any],
    timings: dict[str, float],
    counts: dict[str, int],
    notes: list[str] | None = None,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a result document; non-finite numbers become null with a note each.

    Args:
        command: the command name (``spectrum``, ``density``...), also the file name.
        input: what was analysed (see :func:`curvscope.io.describe_input`).
        settings: every option the command used, defaults included.
        results: the command's results (docs/DESIGN.md "Result document").
        timings: seconds, at least ``total_s``.
        counts: at least ``matvecs`` and ``data_passes``.
        notes: sentences for the reader.
        run: the ``run`` section (default: the current run's, complete; a run of its own
            when there is none, see :class:`curvscope.io.Run`).
    """
    from .. import __version__

    nan_notes: list[str] = []
    doc = {
        "schema": SCHEMA,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "curvscope_version": __version__,
        "run": dict(run) if run is not None else (current_run() or Run(command)).section(),
        "input": to_jsonable(input, "$.input", nan_notes),
        "settings": to_jsonable(settings, "$.settings", nan_notes),
        "results": to_jsonable(results, "$.results", nan_notes),
        "timings": to_jsonable(timings, "$.timings", nan_notes),
        "counts": to_jsonable(counts, "$.counts", nan_notes),
        "notes": list(notes or []),
    }
    if nan_notes:
        doc["notes"].append("non-finite values written as null: " + "; ".join(nan_notes[:20]))
    return doc


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written.

    Raises:
        CurvscopeError: when the folder cannot be created or written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "wb" if isinstance(data, bytes) else "w"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as fh:
                fh.write(data)
            # mkstemp creates 0600 files; give the result the permissions open() would.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise CurvscopeError(f"cannot write {path}: {exc.strerror or exc}.") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_document(doc: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``doc`` to ``out_dir/<command>.json`` atomically; return the path."""
    text = json.dumps(doc, indent=1, allow_nan=False)
    return write_atomic(Path(out_dir) / f"{doc['command']}.json", text + "\n")


def read_document(path: str | os.PathLike) -> dict[str, Any]:
    """Read a result document and check its schema.

    Raises:
        CurvscopeError: when the file is missing, not JSON or of another schema.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CurvscopeError(f"result document {path} does not exist.") from None
    except (OSError, ValueError) as exc:
        raise CurvscopeError(f"{path} is not a readable JSON result document ({exc}).") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise CurvscopeError(f"{path} is not a curvscope result document (schema {SCHEMA}).")
    return doc
