"""The sign convention of eigenvectors, shared by the numerics and the eigenvector file.

An eigenvector is defined up to its sign; curvscope flips each so that its largest-magnitude
entry is positive (docs/DESIGN.md "Eigenvector file"), so that two runs, a saved file and a
surface's axes agree. A base module: :mod:`curvscope.linalg` exports it, and :mod:`curvscope.io`
applies it when writing, without either importing the other.
"""

from __future__ import annotations

import torch

__all__ = ["canonical_sign"]


def canonical_sign(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    if vectors.numel() == 0:
        return vectors
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs
