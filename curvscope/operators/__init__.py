"""Curvature matrices as operators: the data loop on top of :mod:`curvscope.linalg`'s type.

:class:`CurvatureOperator` derives from :class:`~curvscope.linalg.LinearOperator` and adds the
pass over a :class:`~curvscope.problem.Problem`'s data; the Hessian, GGN, Fisher, empirical
Fisher, PCH, KFAC and EKFAC derive from it. :data:`MATRICES` is the one registry of names.
"""

from ..linalg import DenseOperator, IdentityOperator, LinearOperator, ScaledOperator, SumOperator
from ._base import CurvatureOperator, work_dtype
from ._classes import ClassStructure, LowRankOperator, check_classifier, class_structure
from ._fisher import EmpiricalFisherOperator, FisherKind, FisherOperator
from ._ggn import GGNOperator
from ._hessian import (
    GRAPH_CACHE_SHARE,
    GraphAccount,
    HessianOperator,
    HVPMode,
    graph_account,
    hvp_record,
)
from ._kfac import EKFACOperator, KFACFisherType, KFACOperator
from ._pch import (
    ELEMENTWISE_ACTIVATIONS,
    PCHApproximation,
    PCHMode,
    PCHOperator,
    activation_derivatives,
    mlp_chain,
)
from ._preconditioned import PreconditionedOperator, preconditioned
from ._registry import (
    MATRICES,
    MATRIX_NAMES,
    MatrixSpec,
    build_operators,
    compare_defaults,
    make_operator,
    matrix_help,
    report_matrices,
    resolve_matrices,
)
from ._sharded import ShardedHessianOperator

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "MATRICES",
    "MATRIX_NAMES",
    "ClassStructure",
    "CurvatureOperator",
    "LowRankOperator",
    "check_classifier",
    "graph_account",
    "hvp_record",
    "class_structure",
    "DenseOperator",
    "EKFACOperator",
    "EmpiricalFisherOperator",
    "FisherKind",
    "FisherOperator",
    "GGNOperator",
    "HVPMode",
    "GRAPH_CACHE_SHARE",
    "GraphAccount",
    "HessianOperator",
    "IdentityOperator",
    "KFACFisherType",
    "KFACOperator",
    "LinearOperator",
    "MatrixSpec",
    "PCHApproximation",
    "ShardedHessianOperator",
    "PCHMode",
    "PCHOperator",
    "PreconditionedOperator",
    "ScaledOperator",
    "SumOperator",
    "activation_derivatives",
    "build_operators",
    "compare_defaults",
    "preconditioned",
    "make_operator",
    "matrix_help",
    "mlp_chain",
    "report_matrices",
    "resolve_matrices",
    "work_dtype",
]
