"""Diagnostics as functions of operators and of problems.

Spectra, densities and comparisons take operators; derivative checks, the convexity
certificate and loss surfaces take a problem. Each returns a result object whose
``to_results()`` is the ``results`` part of the result document.
"""

from ._check import CheckResult, check
from ._classes import ClassAngles, ClassesResult, check_classifier, classes
from ._common import BLOCK_MODES, named_operators, resolve_blocks
from ._compare import COMPARE_MATRICES, CompareResult, Comparison, compare
from ._convexity import ConvexityLayer, ConvexityResult, convexity_certificate
from ._density import DensityEntry, DensityResult, TraceEntry, density
from ._derivatives import STEPS as DERIVATIVE_STEPS
from ._derivatives import DirectionResult, gradient_test, taylor_test
from ._overlap import GradientOverlap, block_gradient, gradient_overlap, overlap_from_ritz
from ._spectrum import BlockMode, Method, SpectrumEntry, SpectrumResult, spectrum
from ._surface import (
    DIRECTION_KINDS,
    SurfaceDirections,
    SurfaceResult,
    filter_normalized_direction,
    surface,
)

__all__ = [
    "BLOCK_MODES",
    "COMPARE_MATRICES",
    "DERIVATIVE_STEPS",
    "CheckResult",
    "ClassAngles",
    "ClassesResult",
    "check_classifier",
    "classes",
    "CompareResult",
    "Comparison",
    "ConvexityLayer",
    "ConvexityResult",
    "DirectionResult",
    "check",
    "compare",
    "convexity_certificate",
    "gradient_test",
    "named_operators",
    "resolve_blocks",
    "taylor_test",
    "DensityEntry",
    "DensityResult",
    "TraceEntry",
    "density",
    "GradientOverlap",
    "block_gradient",
    "gradient_overlap",
    "overlap_from_ritz",
    "BlockMode",
    "Method",
    "SpectrumEntry",
    "SpectrumResult",
    "spectrum",
    "SurfaceDirections",
    "SurfaceResult",
    "DIRECTION_KINDS",
    "filter_normalized_direction",
    "surface",
]
