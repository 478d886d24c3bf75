"""Algorithms that only need ``A @ V``: Lanczos, power iteration, SLQ, traces, CG."""

from ._cg import CGResult, MinresResult, cg, minres
from ._lanczos import DEFAULT_TOL, EigenResult, LanczosResult, eigenpairs, lanczos
from ._power import power_iteration
from ._restarted import eigsh
from ._slq import Density, SLQResult, slq, spectral_density
from ._trace import TraceEstimate, exact_trace, hutchinson_trace, hutchpp_trace

__all__ = [
    "CGResult",
    "MinresResult",
    "cg",
    "minres",
    "DEFAULT_TOL",
    "EigenResult",
    "LanczosResult",
    "eigenpairs",
    "lanczos",
    "power_iteration",
    "eigsh",
    "Density",
    "SLQResult",
    "slq",
    "spectral_density",
    "TraceEstimate",
    "exact_trace",
    "hutchinson_trace",
    "hutchpp_trace",
]
