"""Curvature matrices as operators: ``A @ V``, blocks, dense, scipy interop."""

from ._base import (
    CurvatureOperator,
    DenseOperator,
    IdentityOperator,
    ScaledOperator,
    SumOperator,
)
from ._fisher import EmpiricalFisherOperator, FisherKind, FisherOperator
from ._ggn import GGNOperator
from ._hessian import HessianOperator, HVPMode
from ._kfac import EKFACOperator, KFACFisherType, KFACOperator
from ._pch import PCHApproximation, PCHMode, PCHOperator
from ._registry import MATRIX_NAMES, make_operator

__all__ = [
    "MATRIX_NAMES",
    "CurvatureOperator",
    "DenseOperator",
    "EKFACOperator",
    "EmpiricalFisherOperator",
    "FisherKind",
    "FisherOperator",
    "GGNOperator",
    "HVPMode",
    "HessianOperator",
    "IdentityOperator",
    "KFACFisherType",
    "KFACOperator",
    "PCHApproximation",
    "PCHMode",
    "PCHOperator",
    "ScaledOperator",
    "SumOperator",
    "make_operator",
]
