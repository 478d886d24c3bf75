"""Spectra, densities, traces, derivative checks, comparisons and loss surfaces."""

from ._check import CheckResult, check
from ._compare import COMPARE_MATRICES, CompareResult, Comparison, compare
from ._convexity import ConvexityLayer, ConvexityResult, convexity_certificate
from ._density import DensityEntry, DensityResult, TraceEntry, density
from ._derivatives import DirectionResult, gradient_test, taylor_test
from ._spectrum import (
    BlockMode,
    Method,
    SpectrumEntry,
    SpectrumResult,
    make_matrix,
    resolve_blocks,
    spectrum,
)
from ._surface import (
    SurfaceDirections,
    SurfaceResult,
    filter_normalized_direction,
    load_directions,
    surface,
)

__all__ = [
    "COMPARE_MATRICES",
    "CheckResult",
    "CompareResult",
    "Comparison",
    "ConvexityLayer",
    "ConvexityResult",
    "DirectionResult",
    "check",
    "compare",
    "convexity_certificate",
    "gradient_test",
    "taylor_test",
    "DensityEntry",
    "DensityResult",
    "TraceEntry",
    "density",
    "BlockMode",
    "Method",
    "SpectrumEntry",
    "SpectrumResult",
    "make_matrix",
    "resolve_blocks",
    "spectrum",
    "SurfaceDirections",
    "SurfaceResult",
    "filter_normalized_direction",
    "load_directions",
    "surface",
]
