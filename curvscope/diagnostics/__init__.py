"""Spectra, densities, traces, derivative checks, comparisons and loss surfaces."""

__all__: list[str] = []
