"""Figures and the HTML report, rendered from result documents only."""

from ._html import render_report
from ._plots import (
    figures_for,
    plot_check_taylor,
    plot_compare,
    plot_density,
    plot_solver_curves,
    plot_spectrum,
    plot_surface_1d,
    plot_surface_3d,
    plot_surface_contour,
    save_figures,
)
from ._run import PRESETS, ReportRun, render_directory, run_report

__all__ = [
    "PRESETS",
    "ReportRun",
    "figures_for",
    "plot_check_taylor",
    "plot_compare",
    "plot_density",
    "plot_solver_curves",
    "plot_spectrum",
    "plot_surface_1d",
    "plot_surface_3d",
    "plot_surface_contour",
    "render_directory",
    "render_report",
    "run_report",
    "save_figures",
]
