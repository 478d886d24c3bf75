"""The pure linear-operator type and the algorithms that only need ``A @ V``.

Lanczos, power iteration, stochastic Lanczos quadrature, trace estimators and Krylov solvers
are functions of any :class:`LinearOperator` (or anything :func:`as_operator` accepts: a
matrix, a scipy operator, a callable with a size, another library's operator); none of them
knows about models or data.
"""

from .._signs import canonical_sign
from ._cg import CGResult, MinresResult, cg, minres
from ._inner import Inner, refuse_sharded
from ._lanczos import DEFAULT_TOL, EigenResult
from ._operator import (
    DENSE_LIMIT,
    AdjointOperator,
    BlocksOf,
    CallableOperator,
    ComposedOperator,
    DenseOperator,
    IdentityOperator,
    IndexBlockOperator,
    LinearOperator,
    ScaledOperator,
    SumOperator,
    as_operator,
    identity_like,
    require_square,
)
from ._power import power_iteration
from ._restarted import (
    KEEP_FRACTION,
    RESTART_BLOCK,
    basis_placement,
    default_basis_size,
    eigsh,
)
from ._slq import Density, SLQResult, slq, spectral_density
from ._trace import (
    TraceEstimate,
    exact_trace,
    hutchinson_trace,
    hutchpp_trace,
    random_probes,
    t_factor,
)

__all__ = [
    "Inner",
    "refuse_sharded",
    "BlocksOf",
    "canonical_sign",
    "KEEP_FRACTION",
    "RESTART_BLOCK",
    "DENSE_LIMIT",
    "AdjointOperator",
    "CallableOperator",
    "ComposedOperator",
    "DenseOperator",
    "IdentityOperator",
    "IndexBlockOperator",
    "LinearOperator",
    "ScaledOperator",
    "SumOperator",
    "as_operator",
    "identity_like",
    "require_square",
    "CGResult",
    "MinresResult",
    "cg",
    "minres",
    "DEFAULT_TOL",
    "EigenResult",
    "power_iteration",
    "basis_placement",
    "default_basis_size",
    "eigsh",
    "Density",
    "SLQResult",
    "slq",
    "spectral_density",
    "TraceEstimate",
    "exact_trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "random_probes",
    "t_factor",
]
