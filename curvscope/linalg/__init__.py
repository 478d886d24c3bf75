"""Algorithms that only need ``A @ V``: Lanczos, power iteration, SLQ, traces, CG."""

from ._lanczos import DEFAULT_TOL, EigenResult, LanczosResult, eigenpairs, lanczos
from ._power import power_iteration

__all__ = [
    "DEFAULT_TOL",
    "EigenResult",
    "LanczosResult",
    "eigenpairs",
    "lanczos",
    "power_iteration",
]
