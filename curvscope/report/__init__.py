"""Figures and the HTML report, rendered from result documents only.

Nothing here computes: the analyses live in :mod:`curvscope.app` and the diagnostics; this
package draws what their documents say (matplotlib figures, plotly charts, the HTML page).
"""

from ._html import plotly_js_text, render_report
from ._plots import (
    CLASSES_FIGURES,
    FIGURE_STEMS,
    SURFACE_FIGURES,
    TRACK_FIGURES,
    figures_for,
    plot_check_taylor,
    plot_classes,
    plot_compare,
    plot_density,
    plot_solver_curves,
    plot_spectrum,
    plot_surface_1d,
    plot_surface_3d,
    plot_surface_contour,
    plot_track,
    plot_track_layers,
    plot_track_loss,
    plot_track_trace,
    remove_stale_figures,
    save_figures,
)
from ._render import PARTS, SKIPPED_FILE, Rendered, render_directory, render_documents

__all__ = [
    "CLASSES_FIGURES",
    "FIGURE_STEMS",
    "PARTS",
    "SKIPPED_FILE",
    "Rendered",
    "SURFACE_FIGURES",
    "TRACK_FIGURES",
    "figures_for",
    "plot_check_taylor",
    "plot_classes",
    "plot_compare",
    "plot_density",
    "plot_solver_curves",
    "plot_spectrum",
    "plot_surface_1d",
    "plot_surface_3d",
    "plot_surface_contour",
    "plot_track",
    "plot_track_layers",
    "plot_track_loss",
    "plot_track_trace",
    "plotly_js_text",
    "render_directory",
    "render_documents",
    "render_report",
    "remove_stale_figures",
    "save_figures",
]
