r"""Paper-style matplotlib figures, drawn from result documents only (STYLE.md section 7).

Every function takes a result document (or its ``results`` part, or the single result the
figure is about) and an optional matplotlib ``ax``, and returns the figure. Nothing here calls
``pyplot``: figures are :class:`matplotlib.figure.Figure` objects, so importing this module
never switches the backend and nothing is shown; save them with ``fig.savefig`` or
:func:`save_figures`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from ._figures import (
    PALETTE,
    as_array,
    block_label,
    classes_series,
    results_of,
    surface_axis_label,
    taylor_series,
    trace_columns,
    track_eigen_series,
    track_layer_series,
    track_optimizer_thresholds,
    track_thresholds,
    track_trace_series,
    track_x,
    weights_marker,
)

__all__ = [
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
    "remove_stale_figures",
    "plot_track",
    "plot_track_layers",
    "plot_track_loss",
    "plot_track_trace",
    "save_figures",
]


STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "legend.fontsize": 9.5,
    "legend.frameon": False,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.8,
    "mathtext.fontset": "dejavusans",
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
}


@contextmanager
def _style() -> Iterator[None]:
    with mpl.rc_context(STYLE):
        yield


def _new(ax, figsize=(6.4, 4.4), projection: str | None = None):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot(projection=projection) if projection else fig.add_subplot()
    return fig, ax


# ----------------------------------------------------------------------------- surfaces
def _surface_title(surf: dict[str, Any]) -> str:
    kind = (surf.get("directions") or {}).get("kind", "")
    return {
        "eigen": "Loss along the top Hessian eigenvectors",
        "random": "Loss along random directions",
        "filter-normalized": "Loss along filter-normalised directions",
    }.get(kind, "Loss surface")


def _centre_index(axis: np.ndarray) -> int:
    return int(np.argmin(np.abs(axis)))


def plot_surface_1d(doc: dict[str, Any], ax=None) -> Figure:
    """Loss along each direction through the weights, with the quadratic model dashed.

    A 2-D surface is shown as its two slices through the weights (``b = 0`` and ``a = 0``).
    """
    surf = results_of(doc, "surface")
    with _style():
        fig, ax = _new(ax)
        axes = [np.asarray(a, dtype=float) for a in surf["axes"]]
        loss = as_array(surf["loss"])
        quad = as_array(surf.get("quadratic_model"))
        if surf.get("dims", loss.ndim) == 1 or loss.ndim == 1:
            lines = [(axes[0], loss, quad, surface_axis_label(surf, 0))]
        else:
            i0, j0 = _centre_index(axes[0]), _centre_index(axes[1])
            lines = [
                (
                    axes[0],
                    loss[:, j0],
                    None if quad is None else quad[:, j0],
                    surface_axis_label(surf, 0),
                ),
                (
                    axes[1],
                    loss[i0, :],
                    None if quad is None else quad[i0, :],
                    surface_axis_label(surf, 1),
                ),
            ]
        finite = np.concatenate([y[np.isfinite(y)] for _, y, _, _ in lines])
        for k, (x, y, q, label) in enumerate(lines):
            colour = PALETTE[k]
            ax.plot(x, y, color=colour, label=f"loss along {label}")
            if q is not None:
                ax.plot(
                    x,
                    q,
                    color=colour,
                    ls="--",
                    lw=1.4,
                    alpha=0.85,
                    label="quadratic model" if k == len(lines) - 1 else None,
                )
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            pad = 0.08 * (hi - lo or abs(hi) or 1.0)
            ax.set_ylim(lo - pad, hi + 3 * pad)
        ax.axvline(0.0, color="0.45", lw=0.8, ls=":")
        centre = surf.get("center_loss")
        if centre is not None:
            ax.plot([0.0], [centre], "o", color="black", ms=5, zorder=5, label="weights $w$")
        kind = (surf.get("directions") or {}).get("kind")
        ax.set_xlabel(
            "distance from $w$ in parameter space"
            if kind in ("eigen", "random")
            else "step along the direction"
        )
        ax.set_ylabel("loss")
        ax.set_title(_surface_title(surf))
        if len(lines) == 1:
            ax.set_xlabel(f"{ax.get_xlabel()}: {lines[0][3]}")
        ax.legend(loc="upper center", ncols=1)
        _note_non_finite(ax, surf)
    return fig


def _note_non_finite(ax, surf: dict[str, Any]) -> None:
    bad = surf.get("num_non_finite") or 0
    if bad:
        ax.text(
            0.01,
            0.01,
            f"{bad} grid point(s) non-finite (left blank)",
            transform=ax.transAxes,
            fontsize=9,
            color="#B00020",
            va="bottom",
            ha="left",
        )


def _levels(z: np.ndarray, n: int = 24) -> tuple[np.ndarray, Normalize]:
    finite = z[np.isfinite(z)]
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1e-12 * max(abs(lo), 1.0)
    if lo > 0 and hi / lo > 20:
        return np.geomspace(lo, hi, n), LogNorm(vmin=lo, vmax=hi)
    return np.linspace(lo, hi, n), Normalize(vmin=lo, vmax=hi)


def plot_surface_contour(doc: dict[str, Any], ax=None) -> Figure:
    """Filled contours of a 2-D loss surface, the quadratic model as dashed lines."""
    surf = results_of(doc, "surface")
    if len(surf["axes"]) != 2:
        return plot_surface_1d(doc, ax)
    with _style():
        fig, ax = _new(ax, figsize=(6.4, 5.2))
        a, b = (np.asarray(v, dtype=float) for v in surf["axes"])
        z = as_array(surf["loss"])  # z[i, j] at a[i], b[j]
        A, B = np.meshgrid(a, b, indexing="ij")
        levels, norm = _levels(z)
        zm = np.ma.masked_invalid(z)
        cf = ax.contourf(A, B, zm, levels=levels, norm=norm, cmap="viridis", extend="neither")
        ax.contour(A, B, zm, levels=levels[::3], colors="white", linewidths=0.5, alpha=0.55)
        quad = as_array(surf.get("quadratic_model"))
        handles = []
        if quad is not None:
            qs = ax.contour(
                A,
                B,
                np.ma.masked_invalid(quad),
                levels=levels[::3],
                colors="#FFB000",
                linewidths=1.1,
                linestyles="--",
            )
            if qs.allsegs and any(len(s) for s in qs.allsegs):
                handles.append(
                    mpl.lines.Line2D([], [], color="#FFB000", ls="--", label="quadratic model")
                )
        ax.plot([0], [0], marker="*", color="white", mec="black", ms=13, ls="", zorder=6)
        handles.append(
            mpl.lines.Line2D(
                [], [], marker="*", color="white", mec="black", ms=11, ls="", label="weights $w$"
            )
        )
        ax.legend(handles=handles, loc="upper right", framealpha=0.85, frameon=True)
        cb = fig.colorbar(cf, ax=ax, shrink=0.92, pad=0.02)
        cb.set_label("loss")
        if isinstance(norm, LogNorm):
            cb.ax.set_yscale("log")
        ax.set_xlabel(surface_axis_label(surf, 0))
        ax.set_ylabel(surface_axis_label(surf, 1))
        ax.set_title(_surface_title(surf))
        ax.set_aspect("equal" if _same_units(surf) else "auto")
        ax.grid(False)
        _note_non_finite(ax, surf)
    return fig


def _same_units(surf: dict[str, Any]) -> bool:
    kind = (surf.get("directions") or {}).get("kind")
    a, b = surf["axes"]
    span = (a[-1] - a[0]) / max(b[-1] - b[0], 1e-300)
    return kind in ("eigen", "random") and 0.5 <= span <= 2


def plot_surface_3d(doc: dict[str, Any], ax=None) -> Figure:
    """A 3-D view of a 2-D loss surface with a colour bar."""
    surf = results_of(doc, "surface")
    if len(surf["axes"]) != 2:
        return plot_surface_1d(doc, ax)
    with _style():
        fig, ax = _new(ax, figsize=(7.0, 5.6), projection="3d")
        a, b = (np.asarray(v, dtype=float) for v in surf["axes"])
        z = as_array(surf["loss"])
        A, B = np.meshgrid(a, b, indexing="ij")
        _, norm = _levels(z)
        s = ax.plot_surface(
            A,
            B,
            z,
            cmap="viridis",
            norm=norm,
            linewidth=0.15,
            edgecolor=(1, 1, 1, 0.25),
            antialiased=True,
            rcount=min(80, len(a)),
            ccount=min(80, len(b)),
        )
        s.set_zorder(1)
        mark = weights_marker(surf)
        if mark is not None:
            a0, b0, z0, _, top = mark
            # mplot3d sorts artists by depth, which put the marker behind the surface
            # (issue 14); draw in zorder instead, and mark the weights by a vertical line from
            # their loss to above the surface, topped by the marker
            ax.computed_zorder = False
            ax.plot([a0, a0], [b0, b0], [z0, top], color="#D55E00", lw=1.6, zorder=9)
            ax.scatter([a0], [b0], [z0], color="#D55E00", s=18, depthshade=False, zorder=10)
            ax.scatter(
                [a0],
                [b0],
                [top],
                color="#D55E00",
                edgecolor="black",
                s=60,
                marker="v",
                depthshade=False,
                zorder=11,
                label=f"weights $w$ (loss {z0:.4g})",
            )
            ax.legend(loc="upper left")
        ax.set_xlabel(surface_axis_label(surf, 0), labelpad=8, fontsize=9)
        ax.set_ylabel(surface_axis_label(surf, 1), labelpad=8, fontsize=9)
        ax.set_zlabel("loss", labelpad=6)
        ax.view_init(elev=32, azim=-58)
        ax.set_title(_surface_title(surf))
        cb = fig.colorbar(s, ax=ax, shrink=0.6, pad=0.08)
        cb.set_label("loss")
        _note_non_finite(ax, surf)
    return fig


# ----------------------------------------------------------------------------- spectra
def plot_spectrum(doc: dict[str, Any], ax=None) -> Figure:
    r"""Eigenvalues per matrix and block, with residual error bars; unconverged pairs hollow.

    The residual :math:`\lVert Av - \lambda v\rVert` bounds the distance from each Ritz
    value to the nearest true eigenvalue, so it is drawn as an error bar.
    """
    spectra = results_of(doc, "spectra")
    with _style():
        n_groups = len({(s["matrix"], s["block"]) for s in spectra})
        fig, ax = _new(ax, figsize=(max(6.4, 0.9 * n_groups + 2.5), 4.6))
        groups: list[tuple[str, str]] = []
        for s in spectra:
            key = (s["matrix"], s["block"])
            if key not in groups:
                groups.append(key)
        matrices = list(dict.fromkeys(m for m, _ in groups))
        colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(matrices)}
        vals_all = []
        labelled: set[str] = set()
        for s in spectra:
            x0 = groups.index((s["matrix"], s["block"]))
            ev = np.array([np.nan if v is None else v for v in s["eigenvalues"]], dtype=float)
            res = np.array(
                [np.nan if v is None else v for v in s.get("residual_norms") or [0] * len(ev)],
                dtype=float,
            )
            conv = list(s.get("converged") or [True] * len(ev))
            k = len(ev)
            offset = 0.12 if s.get("which") == "bottom" else -0.12 if len(spectra) > 1 else 0
            xs = x0 + offset + np.linspace(-0.08, 0.08, k) if k > 1 else np.array([x0 + offset])
            c = colours[s["matrix"]]
            ax.errorbar(xs, ev, yerr=res, fmt="none", ecolor=c, elinewidth=1.2, capsize=3)
            ok = np.array(conv, dtype=bool)
            marker = "v" if s.get("which") == "bottom" else "o"
            ax.scatter(
                xs[ok],
                ev[ok],
                marker=marker,
                color=c,
                s=34,
                zorder=3,
                label=s["matrix"] if s["matrix"] not in labelled else None,
            )
            labelled.add(s["matrix"])
            if (~ok).any():
                ax.scatter(
                    xs[~ok],
                    ev[~ok],
                    marker=marker,
                    facecolor="white",
                    edgecolor="#B00020",
                    s=40,
                    lw=1.4,
                    zorder=4,
                    label="not converged" if "nc" not in labelled else None,
                )
                labelled.add("nc")
            vals_all.extend(ev[np.isfinite(ev)].tolist())
        if vals_all:
            vmax = max(abs(v) for v in vals_all) or 1.0
            if min(vals_all) < 0 and max(abs(v) for v in vals_all if v != 0) / vmax < 1e-2:
                ax.set_yscale("symlog", linthresh=max(vmax * 1e-3, 1e-12))
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(
            [
                block_label(b) if len(matrices) == 1 else f"{m}\n{block_label(b)}"
                for m, b in groups
            ],
            rotation=30 if len(groups) > 4 else 0,
            ha="right" if len(groups) > 4 else "center",
        )
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_xlabel("block")
        ax.set_ylabel("eigenvalue")
        ax.set_title("Extreme eigenvalues (error bars: residual $\\|Av-\\lambda v\\|$)")
        handles, _ = ax.get_legend_handles_labels()
        ends = {s.get("which") for s in spectra}
        if "bottom" in ends:
            handles += [
                mpl.lines.Line2D([], [], marker="o", color="0.3", ls="", label="largest"),
                mpl.lines.Line2D([], [], marker="v", color="0.3", ls="", label="smallest"),
            ]
        ax.legend(handles=handles, loc="best")
    return fig


def plot_density(doc: dict[str, Any], ax=None) -> Figure:
    """Spectral densities (stochastic Lanczos quadrature) on a log scale."""
    dens = results_of(doc, "densities")
    with _style():
        fig, ax = _new(ax, figsize=(6.8, 4.4))
        peaks = [
            np.nanmax(np.array([np.nan if v is None else v for v in d["density"]], dtype=float))
            for d in dens
        ]
        peaks = [p for p in peaks if np.isfinite(p) and p > 0]
        floor = max(peaks) * 1e-6 if peaks else 1e-12
        for i, d in enumerate(dens):
            x = np.asarray(d["grid"], dtype=float)
            y = np.array([np.nan if v is None else v for v in d["density"]], dtype=float)
            ax.fill_between(x, np.maximum(y, floor), floor, color=PALETTE[i % 8], alpha=0.12)
            ax.semilogy(
                x,
                np.maximum(y, floor),
                color=PALETTE[i % 8],
                label=f"{d['matrix']}, {d['block']}"
                + (f" ({d['num_probes']} probes)" if d.get("num_probes") else ""),
            )
        ax.set_ylim(bottom=floor)
        ax.axvline(0, color="0.4", lw=0.8, ls=":")
        ax.set_xlabel("eigenvalue $\\lambda$")
        ax.set_ylabel("density (log scale)")
        ax.set_title("Spectral density (stochastic Lanczos quadrature)")
        ax.legend(loc="upper right")
    return fig


def plot_compare(doc: dict[str, Any], ax=None) -> Figure:
    """Heatmap of the relative Frobenius error of each approximation per layer."""
    rows = results_of(doc, "comparisons")
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    matrices = list(dict.fromkeys(r["matrix"] for r in rows))
    grid = np.full((len(blocks), len(matrices)), np.nan)
    for r in rows:
        v = r.get("rel_frobenius")
        if v is not None:
            grid[blocks.index(r["block"]), matrices.index(r["matrix"])] = v
    with _style():
        fig, ax = _new(ax, figsize=(1.25 * len(matrices) + 3.2, 0.55 * len(blocks) + 2.2))
        # 0 is exact and 1 as wrong as the zero matrix: a fixed linear scale (as on the HTML
        # page), so round-off-level errors look like the zeros they are
        finite = grid[np.isfinite(grid)]
        norm = Normalize(vmin=0, vmax=max(1.0, float(finite.max()) if finite.size else 1.0))
        cmap = mpl.colormaps["magma_r"].with_extremes(bad="#DDDDDD")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
        for i in range(len(blocks)):
            for j in range(len(matrices)):
                v = grid[i, j]
                txt = "n/a" if not np.isfinite(v) else f"{v:.2g}"
                dark = np.isfinite(v) and norm(v) > 0.55
                ax.text(
                    j,
                    i,
                    txt,
                    ha="center",
                    va="center",
                    fontsize=9.5,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(len(matrices)), matrices, rotation=30, ha="right")
        ax.set_yticks(range(len(blocks)), blocks)
        ax.set_xlabel("approximation")
        ax.set_ylabel("layer block")
        ax.grid(False)
        ax.set_title("Relative error vs the Hessian")
        cb = fig.colorbar(im, ax=ax, pad=0.02)
        cb.set_label("$\\|H_b - A_b\\|_F \\,/\\, \\|H_b\\|_F$")
    return fig


def plot_classes(doc: dict[str, Any], ax=None) -> Figure | None:
    """The GGN's top eigenvalues with the class and cross-class parts' eigenvalues overlaid.

    Papyan's picture: the ``C`` class-part eigenvalues sit beside the GGN's ``C`` outliers
    (indices ``1..C``), the cross part's beside the next ``C(C-1)`` (the mini-outliers).
    ``None`` when the document holds no eigenvalue at all.
    """
    s = classes_series(doc)
    g, cls, crs, C = s["ggn"], s["class"], s["cross"], s["C"]
    if not (len(g["y"]) or len(cls["y"]) or len(crs["y"])):
        return None
    with _style():
        fig, ax = _new(ax, figsize=(7.2, 4.6))
        if len(g["y"]):
            ok = g["ok"]
            ax.errorbar(g["x"], g["y"], yerr=g["err"], fmt="none", ecolor="0.25", elinewidth=1)
            ax.scatter(g["x"][ok], g["y"][ok], marker="o", s=30, color="0.15", zorder=3,
                       label="GGN (Lanczos)")
            if (~ok).any():
                ax.scatter(g["x"][~ok], g["y"][~ok], marker="o", s=36, facecolor="white",
                           edgecolor="#B00020", lw=1.3, zorder=3, label="GGN, not converged")
        if len(cls["y"]):
            ax.scatter(cls["x"], cls["y"], marker="_", s=260, lw=2.4, color=PALETTE[0],
                       zorder=4, label="class means $G_{class}$")
        if len(crs["y"]):
            ax.scatter(crs["x"], crs["y"], marker="_", s=140, lw=2.0, color=PALETTE[1],
                       zorder=4, label="cross-class $G_{cross}$")
        if C:
            ax.axvline(C + 0.5, color="0.5", lw=0.8, ls="--")
            if C * C <= max(len(g["y"]), C + len(crs["y"])):
                ax.axvline(C * C + 0.5, color="0.5", lw=0.8, ls=":")
        if s["positive"]:
            ax.set_yscale("log")
        ax.set_xlabel(f"eigenvalue index (C = {C}: 1..C outliers, C+1..C² mini-outliers)")
        ax.set_ylabel("eigenvalue")
        ax.set_title("GGN outliers and the class / cross-class parts")
        ax.legend(loc="upper right")
    return fig


# ----------------------------------------------------------------------------- checks
def plot_check_taylor(doc: dict[str, Any], ax=None) -> Figure | None:
    """Taylor-test errors e1(h) ~ h^2 and e2(h) ~ h^3 on log-log axes, one line per direction.

    Returns ``None`` when the document holds no Taylor check with per-step errors.
    """
    checks = results_of(doc, "checks")
    taylor = next((c for c in checks if str(c.get("name", "")).startswith("taylor")), None)
    if taylor is None:
        return None
    series = taylor_series(taylor)
    hs_key = next((k for k in ("h", "steps", "hs") if series and k in series[0]), None)
    if hs_key is None:
        return None
    with _style():
        fig, ax = _new(ax, figsize=(6.4, 4.6))
        drawn = False
        for i, s in enumerate(series):
            h = np.asarray(s[hs_key], dtype=float)
            for key, ls, lab in (("e1", "-", "$e_1(h)$"), ("e2", "--", "$e_2(h)$")):
                if key not in s:
                    continue
                e = np.array([np.nan if v is None else v for v in s[key]], dtype=float)
                ok = np.isfinite(e) & (e > 0)
                ax.loglog(
                    h[ok],
                    e[ok],
                    ls=ls,
                    marker="o",
                    ms=3,
                    color=PALETTE[i % 8],
                    label=lab if i == 0 else None,
                )
                drawn = True
        if not drawn:
            return None
        h = np.sort(np.asarray(series[0][hs_key], dtype=float))
        for key, p in (("e1", 2), ("e2", 3)):
            first = [v for v in series[0].get(key, []) if v is not None and v > 0]
            if not first:
                continue
            anchor = max(first)
            ref = anchor * (h / h.max()) ** p
            keep = ref >= anchor * 1e-12
            ax.loglog(h[keep], ref[keep], color="0.55", lw=0.9, ls=":")
            mid = h[keep][len(h[keep]) // 2]
            ax.text(
                mid,
                anchor * (mid / h.max()) ** p,
                f"  slope {p}",
                fontsize=8.5,
                color="0.35",
                va="top",
                ha="left",
            )
        ax.legend(
            handles=[
                mpl.lines.Line2D(
                    [], [], color="0.2", ls="-", marker="o", ms=3, label="$e_1(h)$ ~ $h^2$"
                ),
                mpl.lines.Line2D(
                    [], [], color="0.2", ls="--", marker="o", ms=3, label="$e_2(h)$ ~ $h^3$"
                ),
                mpl.lines.Line2D([], [], color="0.55", ls=":", label="reference slopes"),
            ],
            loc="lower right",
        )
        ax.set_xlabel("step $h$")
        ax.set_ylabel("Taylor remainder")
        ax.set_title("Taylor test (one colour per direction)")
    return fig


# ----------------------------------------------------------------------------- solvers
_X_KEYS = {
    "iterations": ("iteration", "iter", "k", "step"),
    "matvecs": ("num_matvecs", "matvecs", "cumulative_matvecs", "hvps"),
    "time": ("time_s", "wall_time_s", "time", "elapsed_s"),
}


def _solver_x(cols: dict[str, list], x: str) -> tuple[np.ndarray | None, str]:
    for k in _X_KEYS[x]:
        if k in cols:
            return np.array([np.nan if v is None else v for v in cols[k]], dtype=float), k
    if x == "iterations":
        n = len(next(iter(cols.values()), []))
        return np.arange(n, dtype=float), "iteration"
    return None, x


def plot_solver_curves(doc: dict[str, Any], ax=None, *, x: str = "iterations") -> Figure:
    """Loss (and, without ``ax``, gradient norm) against iterations, products or time.

    Args:
        doc: a ``solve`` result document (or its ``solves`` list).
        ax: draw the loss curves into this axes only.
        x: ``iterations``, ``matvecs`` or ``time``.
    """
    solves = results_of(doc, "solves")
    with _style():
        if ax is None:
            fig = Figure(figsize=(11.0, 4.2), layout="constrained")
            ax_loss, ax_grad = fig.subplots(1, 2)
        else:
            fig, ax_loss, ax_grad = ax.figure, ax, None
        for i, s in enumerate(solves):
            cols = trace_columns(s.get("trace"))
            xs, _ = _solver_x(cols, x)
            if xs is None:
                xs, _ = _solver_x(cols, "iterations")
            c = PALETTE[i % 8]
            for target, key in ((ax_loss, "loss"), (ax_grad, "grad_norm")):
                if target is None or key not in cols:
                    continue
                y = np.array([np.nan if v is None else v for v in cols[key]], dtype=float)
                n = min(len(xs), len(y))
                target.plot(xs[:n], y[:n], color=c, label=s.get("solver", f"solver {i + 1}"))
        xlabel = {
            "iterations": "iteration",
            "matvecs": "matrix-vector products",
            "time": "wall time (s)",
        }[x]
        for target, ylabel, title in (
            (ax_loss, "loss", "Loss"),
            (ax_grad, "gradient norm", "Gradient norm"),
        ):
            if target is None:
                continue
            ys = [ln.get_ydata() for ln in target.get_lines()]
            if ys and all(np.nanmin(y) > 0 for y in ys if np.isfinite(y).any()):
                target.set_yscale("log")
            target.set_xlabel(xlabel)
            target.set_ylabel(ylabel)
            target.set_title(title)
        ax_loss.legend(loc="best")
    return fig


# ----------------------------------------------------------------------------- track
_LINESTYLES = ["-", "--", ":", "-."]


def _thresholds(ax, doc: dict[str, Any]) -> None:
    for k, (value, label) in enumerate(track_thresholds(doc)):
        ax.axhline(value, color="0.25", lw=1.1, ls="--" if k == 0 else ":", label=label,
                   zorder=1)
    x, _ = track_x(doc)
    series = track_optimizer_thresholds(doc)
    for k, s in enumerate(series):
        # the checkpoint's own optimiser: one line per parameter group where they differ
        ax.plot(x, s["y"], color="#7A0019", lw=1.2, ls=_LINESTYLES[(k + 1) % len(_LINESTYLES)],
                drawstyle="steps-post", label=s["label"], zorder=1)


def _hollow(ax, x, y, ok, marker: str) -> None:
    """Unconverged points: hollow red markers on top of the line."""
    bad = ~np.asarray(ok, dtype=bool)
    if bad.any():
        ax.scatter(x[bad], y[bad], marker=marker, facecolor="white", edgecolor="#B00020",
                   s=36, lw=1.3, zorder=4)


def plot_track(doc: dict[str, Any], ax=None) -> Figure:
    r"""Extreme eigenvalues against training step, with their error bounds as error bars.

    Top eigenvalues are circles, bottom ones triangles; one line style per matrix. With a
    step size recorded (``--lr``) the stability threshold :math:`2/\eta` is drawn dashed, and
    with momentum :math:`2(1+\beta)/\eta` dotted (see
    :func:`curvscope.app.stability_threshold`). Unconverged pairs are hollow red.
    """
    x, xlabel = track_x(doc)
    series = track_eigen_series(doc)
    with _style():
        fig, ax = _new(ax, figsize=(7.2, 4.6))
        matrices = list(dict.fromkeys(s["matrix"] for s in series))
        for n, s in enumerate(series):
            ls = _LINESTYLES[matrices.index(s["matrix"]) % len(_LINESTYLES)]
            colour = PALETTE[n % len(PALETTE)]
            marker = "v" if s["which"] == "bottom" else "o"
            label = s["label"] if len(matrices) == 1 else f"{s['matrix']} {s['label']}"
            ax.errorbar(x, s["y"], yerr=s["err"], color=colour, ls=ls, marker=marker, ms=4,
                        capsize=2.5, elinewidth=1.0, label=label)
            _hollow(ax, x, s["y"], s["ok"], marker)
        _thresholds(ax, doc)
        if any(s["which"] == "bottom" for s in series):
            ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eigenvalue")
        name = matrices[0] if len(matrices) == 1 else "curvature"
        title = f"{'Hessian' if name == 'hessian' else name} eigenvalues during training"
        if any(t["group"] is not None for t in track_optimizer_thresholds(doc)):
            title += "\n(the parameter groups' thresholds differ: one line per group)"
        ax.set_title(title)
        ax.legend(loc="best", ncol=2 if len(series) > 4 else 1)
    return fig


def plot_track_loss(doc: dict[str, Any], ax=None) -> Figure:
    """Training loss (left axis) and gradient norm (right axis) at each checkpoint."""
    x, xlabel = track_x(doc)
    rows = results_of(doc, "track")
    loss = np.array([np.nan if r.get("loss") is None else r["loss"] for r in rows], dtype=float)
    grad = np.array([np.nan if r.get("grad_norm") is None else r["grad_norm"] for r in rows],
                    dtype=float)
    with _style():
        fig, ax = _new(ax, figsize=(7.2, 3.8))
        ax.plot(x, loss, color=PALETTE[0], marker="o", ms=3.5, label="loss")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss", color=PALETTE[0])
        if np.isfinite(loss).any() and np.nanmin(loss) > 0:
            ax.set_yscale("log")
        ax2 = ax.twinx()
        ax2.plot(x, grad, color=PALETTE[1], marker="s", ms=3, ls="--", label="gradient norm")
        ax2.set_ylabel("gradient norm", color=PALETTE[1])
        ax2.grid(False)
        ax2.spines["right"].set_visible(True)
        ax.set_title("Loss and gradient norm during training")
    return fig


def plot_track_trace(doc: dict[str, Any], ax=None) -> Figure | None:
    """The trace estimate against step, error bars one standard error."""
    x, xlabel = track_x(doc)
    series = track_trace_series(doc)
    if not series:
        return None
    with _style():
        fig, ax = _new(ax, figsize=(7.2, 4.0))
        for n, s in enumerate(series):
            ax.errorbar(x, s["y"], yerr=s["err"], color=PALETTE[n % len(PALETTE)], marker="o",
                        ms=4, capsize=2.5, label=f"{s['matrix']} ({s['estimator']})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("trace")
        ax.set_title("Trace during training (error bars: one standard error)")
        ax.legend(loc="best")
    return fig


def plot_track_layers(doc: dict[str, Any], ax=None) -> Figure | None:
    """Each module's top eigenvalue (its own diagonal block) against step."""
    x, xlabel = track_x(doc)
    series = track_layer_series(doc)
    if not series:
        return None
    with _style():
        fig, ax = _new(ax, figsize=(7.2, 4.4))
        matrices = list(dict.fromkeys(s["matrix"] for s in series))
        blocks = list(dict.fromkeys(s["block"] for s in series))
        for s in series:
            ls = _LINESTYLES[matrices.index(s["matrix"]) % len(_LINESTYLES)]
            colour = PALETTE[blocks.index(s["block"]) % len(PALETTE)]
            label = block_label(s["block"]) + ("" if len(matrices) == 1 else f" ({s['matrix']})")
            ax.errorbar(x, s["y"], yerr=s["err"], color=colour, ls=ls, marker="o", ms=3.5,
                        capsize=2, label=label)
            _hollow(ax, x, s["y"], s["ok"], "o")
        _thresholds(ax, doc)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top eigenvalue of the layer's block")
        ax.set_title("Per-layer sharpness during training")
        ax.legend(loc="best", ncol=2 if len(series) > 5 else 1)
    return fig


# ----------------------------------------------------------------------------- all figures
SURFACE_FIGURES = ("surface_contour", "surface_3d", "surface_slices", "surface_line")
"""File stems of the surface figures (2-D: contour, 3-D, slices; 1-D: line)."""
TRACK_FIGURES = ("track_eigenvalues", "track_loss", "track_trace", "track_layers")
"""The figures of a ``track`` document, by file stem."""

CLASSES_FIGURES = ("classes",)
"""The figure of a ``classes`` document, by file stem."""

FIGURE_STEMS = (
    *SURFACE_FIGURES, "spectrum", "density", "compare", "taylor", "solver_loss", *CLASSES_FIGURES
)
"""Every file stem :func:`figures_for` can give."""
FIGURE_FORMATS = ("png", "pdf", "svg")
"""Formats :func:`save_figures` writes."""


def remove_stale_figures(
    out_dir: str | os.PathLike, written: list[Path], stems: tuple[str, ...] = FIGURE_STEMS
) -> list[Path]:
    """Remove figures ``stems`` x :data:`FIGURE_FORMATS` in ``out_dir`` not in ``written``.

    A run replaces the figures it wrote before; one that was not written this time (a 2-D
    surface's contour after a 1-D run, a PDF no longer asked for) would otherwise sit beside
    the new results as if it belonged to them. Files with other names are left alone.

    Returns:
        The paths removed.
    """
    keep = {Path(p).resolve() for p in written}
    removed = []
    for stem in stems:
        for fmt in FIGURE_FORMATS:
            path = Path(out_dir) / f"{stem}.{fmt}"
            if path.is_file() and path.resolve() not in keep:
                path.unlink()
                removed.append(path)
    return removed


def figures_for(doc: dict[str, Any]) -> dict[str, Figure]:
    """Every figure a result document supports, by file stem (``surface_contour``...)."""
    command = doc.get("command")
    results = doc.get("results") or {}
    out: dict[str, Figure] = {}
    makers: list[tuple[str, Callable[[dict], Figure | None]]] = []
    if command == "surface" or "surface" in results:
        surf = results.get("surface", {})
        if len(surf.get("axes", [])) == 2:
            makers += [
                ("surface_contour", plot_surface_contour),
                ("surface_3d", plot_surface_3d),
                ("surface_slices", plot_surface_1d),
            ]
        else:
            makers.append(("surface_line", plot_surface_1d))
    if results.get("spectra"):
        makers.append(("spectrum", plot_spectrum))
    if results.get("densities"):
        makers.append(("density", plot_density))
    if results.get("comparisons"):
        makers.append(("compare", plot_compare))
    if results.get("checks"):
        makers.append(("taylor", plot_check_taylor))
    if results.get("solves"):
        makers.append(("solver_loss", plot_solver_curves))
    if results.get("classes"):
        makers.append(("classes", plot_classes))
    if command == "track" and results.get("track"):
        makers += list(
            zip(
                TRACK_FIGURES,
                (plot_track, plot_track_loss, plot_track_trace, plot_track_layers),
                strict=True,
            )
        )
    for name, make in makers:
        fig = make(doc)
        if fig is not None:
            out[name] = fig
    return out


# matplotlib's default metadata names its web site; the figures carry no address.
_METADATA = {
    "png": {"Software": f"curvscope with matplotlib {mpl.__version__}"},
    "pdf": {"Creator": f"curvscope with matplotlib {mpl.__version__}"},
}


def save_figures(
    doc: dict[str, Any], out_dir: str | os.PathLike, formats: tuple[str, ...] = ("png",)
) -> list[Path]:
    """Write every figure of ``doc`` to ``out_dir/<stem>.<format>``; return the paths.

    Args:
        doc: a result document.
        out_dir: destination folder (created if missing).
        formats: any of ``png``, ``pdf``, ``svg``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures_for(doc).items():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            with _style():
                fig.savefig(path, format=fmt, metadata=_METADATA.get(fmt))
            paths.append(path)
    return paths
