"""Algorithms that only need ``A @ V``: Lanczos, power iteration, SLQ, traces, CG."""

from ._cg import CGResult, MinresResult, cg, minres
from ._lanczos import DEFAULT_TOL, EigenResult, LanczosResult, eigenpairs, lanczos
from ._power import power_iteration

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
]
