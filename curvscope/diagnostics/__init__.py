"""Spectra, densities, traces, derivative checks, comparisons and loss surfaces."""

from ._density import DensityEntry, DensityResult, TraceEntry, density
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
