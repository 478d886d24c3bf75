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

from .._errors import CurvscopeError
from ._results import write_atomic

__all__ = ["EIGENVECTOR_FORMAT", "canonical_sign", "load_eigenvectors", "save_eigenvectors"]

EIGENVECTOR_FORMAT = "curvscope.eigenvectors/1"


def canonical_sign(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    if vectors.numel() == 0:
        return vectors
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


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
