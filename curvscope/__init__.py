"""curvscope: a curvature microscope for trained PyTorch models."""

from ._errors import (
    CheckpointError,
    CurvscopeError,
    DataError,
    DeterminismError,
    NonFiniteError,
    OptionError,
    UnsupportedModelError,
)
from .problem import Problem

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CurvscopeError",
    "DataError",
    "DeterminismError",
    "NonFiniteError",
    "OptionError",
    "Problem",
    "UnsupportedModelError",
    "__version__",
]
