"""The eigenvector file written by ``spectrum --save-eigenvectors`` and read by ``surface``.

Format (docs/DESIGN.md "Eigenvector file"): ``torch.save`` of
``{"format": "curvscope.eigenvectors/1", "model_sha256", "param_names", "param_shapes",
"entries": [{"matrix", "block", "which", "eigenvalues": [k], "vectors": [P_block, k]}]}``,
loadable with ``weights_only=True``. Vectors are unit-norm and signed so that their
largest-magnitude entry is positive.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import CurvscopeError, OptionError, arg
from .._signs import canonical_sign
from ._results import write_atomic

__all__ = [
    "EIGENVECTOR_FORMAT",
    "canonical_sign",
    "load_eigenvectors",
    "read_directions",
    "save_eigenvectors",
]

EIGENVECTOR_FORMAT = "curvscope.eigenvectors/1"


def save_eigenvectors(
    path: str | os.PathLike,
    *,
    model_sha256: str,
    param_names: list[str],
    param_shapes: list[tuple[int, ...]],
    entries: list[dict[str, Any]],
) -> Path:
    """Write an eigenvector file atomically.

    Args:
        path: destination, usually ``DIR/eigenvectors.pt``.
        model_sha256: hash of the model file the vectors belong to.
        param_names: the selected parameter names (flat layout order).
        param_shapes: their shapes.
        entries: ``{"matrix", "block", "which", "eigenvalues", "vectors"}`` dicts.
    """
    doc = {
        "format": EIGENVECTOR_FORMAT,
        "model_sha256": model_sha256,
        "param_names": list(param_names),
        "param_shapes": [list(s) for s in param_shapes],
        "entries": [
            {
                "matrix": e["matrix"],
                "block": e["block"],
                "which": e["which"],
                "eigenvalues": torch.as_tensor(e["eigenvalues"], dtype=torch.float64).cpu(),
                "vectors": canonical_sign(e["vectors"].detach().cpu()).contiguous(),
            }
            for e in entries
        ],
    }
    buf = io.BytesIO()
    torch.save(doc, buf)
    return write_atomic(path, buf.getvalue())


def load_eigenvectors(path: str | os.PathLike, *, allow_tensor: bool = False) -> Any:
    """Read an eigenvector file (``weights_only=True``) and check its format.

    Args:
        path: the file.
        allow_tensor: also accept a plain tensor (``.pt`` via ``torch.save``, or ``.npy``),
            returned as a float64 tensor instead of the document.

    Raises:
        CurvscopeError: when the file is missing, unreadable or of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise CurvscopeError(f"eigenvector file {path} does not exist.", path=str(path))
    if allow_tensor and path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
            return torch.from_numpy(np.asarray(arr, dtype=np.float64))
        except (OSError, ValueError, TypeError) as exc:
            raise CurvscopeError(
                f"{path} is not a readable .npy array of numbers ({exc}).", path=str(path)
            ) from None
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our file"
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise CurvscopeError(
            f"{path} is neither an eigenvector file nor a tensor saved with torch.save "
            f"({type(exc).__name__}: {first}).",
            path=str(path),
        ) from None
    if allow_tensor and isinstance(doc, torch.Tensor):
        return doc.detach().to(torch.float64)
    if not isinstance(doc, dict) or doc.get("format") != EIGENVECTOR_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CurvscopeError(
            f"{path} is not a curvscope eigenvector file (format {EIGENVECTOR_FORMAT!r} "
            f"expected, got {got!r}).",
            path=str(path),
        )
    return doc


def _check_eigen_file(
    obj: dict, names_now: list[str], shapes_now: list, path: Path, model_sha256: str | None
) -> None:
    names = list(obj.get("param_names") or [])
    shapes = [tuple(s) for s in (obj.get("param_shapes") or [])]
    if model_sha256 and obj.get("model_sha256") and obj["model_sha256"] != model_sha256:
        raise OptionError(
            f"eigenvector file {path} was computed for another model (its model_sha256 "
            f"{str(obj['model_sha256'])[:12]}... differs from this checkpoint's "
            f"{model_sha256[:12]}...); recompute it with spectrum {arg('save_eigenvectors')}."
        )
    if names != names_now:
        raise OptionError(
            f"eigenvector file {path} belongs to another model or parameter selection: its "
            f"parameters are {', '.join(names[:6]) or 'not listed'}"
            f"{'...' if len(names) > 6 else ''}, the selected ones "
            f"{', '.join(names_now[:6])}{'...' if len(names_now) > 6 else ''}."
        )
    if shapes != [tuple(s) for s in shapes_now]:
        bad = next(
            (n, s, t) for n, s, t in zip(names, shapes, shapes_now, strict=False) if s != t
        )
        raise OptionError(
            f"eigenvector file {path} belongs to another model: parameter {bad[0]} has shape "
            f"{list(bad[1])} there and {list(bad[2])} here."
        )


def read_directions(
    path: str | os.PathLike,
    names: list[str],
    shapes: list,
    *,
    model_sha256: str | None = None,
) -> tuple[torch.Tensor, dict]:
    """Read directions from a file: an eigenvector file, or a ``.pt``/``.npy`` tensor.

    Eigenvector files (``spectrum --save-eigenvectors``, docs/DESIGN.md "Eigenvector file") must
    come from the same model: same parameter names and shapes and, when both are known, the
    same checkpoint hash. The entry used is the top Hessian entry for block ``all`` (else the
    first ``all`` entry). A plain tensor must have shape ``[P]`` or ``[P, k]``.

    Args:
        path: the file.
        names: the selected parameters' names (``Problem.names``) the directions must fit.
        shapes: their shapes (``Problem.shapes``).
        model_sha256: SHA-256 of the analysed checkpoint, checked against the file's.

    Returns:
        ``(directions [P, k], info)`` with ``info`` holding ``kind``, ``source`` and, for
        eigenvector files, ``matrix`` and ``eigenvalues``.

    Raises:
        OptionError: for a missing or unreadable file, another model's file, or a size that
            does not fit the selected parameters.
    """
    path = Path(path)
    num_params = sum(int(np.prod(s)) for s in shapes)
    info: dict = {"kind": "file", "source": str(path)}
    try:
        obj = load_eigenvectors(path, allow_tensor=True)
    except CurvscopeError as exc:
        raise OptionError(f"{arg('directions')}: {exc}", option="directions") from None
    if isinstance(obj, torch.Tensor):
        vec = obj
    else:
        _check_eigen_file(obj, list(names), list(shapes), path, model_sha256)
        entries = [e for e in obj.get("entries", []) if e.get("block") == "all"]
        if not entries:
            blocks = sorted({str(e.get("block")) for e in obj.get("entries", [])})
            raise OptionError(
                f"eigenvector file {path} has no entry for block 'all' (it has "
                f"{', '.join(blocks) or 'no entries'}); compute the spectrum of the whole "
                "model, not per layer."
            )
        entries.sort(key=lambda e: (e.get("matrix") != "hessian", e.get("which") != "top"))
        entry = entries[0]
        vec = torch.as_tensor(entry["vectors"]).to(torch.float64)
        info.update(
            kind="eigen",
            matrix=str(entry.get("matrix")),
            which=str(entry.get("which")),
            eigenvalues=[float(v) for v in torch.as_tensor(entry["eigenvalues"]).reshape(-1)],
        )
    if vec.dim() == 1:
        vec = vec.unsqueeze(1)
    if vec.dim() != 2 or vec.shape[0] != num_params:
        raise OptionError(
            f"{arg('directions')} file {path} holds a tensor of shape {list(vec.shape)}, which "
            f"does not fit the {num_params} selected parameters (expected "
            f"[{num_params}] or [{num_params}, k])."
        )
    if not torch.isfinite(vec).all():
        raise OptionError(f"{arg('directions')} file {path} holds NaN or Inf values.")
    return vec, info
