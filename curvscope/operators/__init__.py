"""Curvature matrices as operators: ``A @ V``, blocks, dense, scipy interop."""

from ._base import (
    CurvatureOperator,
    DenseOperator,
    IdentityOperator,
    ScaledOperator,
    SumOperator,
)
from ._hessian import HessianOperator, HVPMode

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "HVPMode",
    "HessianOperator",
    "IdentityOperator",
    "ScaledOperator",
    "SumOperator",
]
