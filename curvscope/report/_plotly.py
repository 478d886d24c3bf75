"""Interactive plotly charts for the HTML report, drawn from result documents only.

Each function takes a result document (or its ``results`` part) and returns a
``plotly.graph_objects.Figure``; :func:`figure_json` serialises one for ``Plotly.newPlot``.
Colours and labels follow the matplotlib figures in :mod:`curvscope.report._plots`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

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
    "classes_chart",
    "compare_heatmap",
    "density_chart",
    "figure_json",
    "solver_chart",
    "spectrum_chart",
    "surface_3d",
    "surface_contour",
    "surface_lines",
    "taylor_chart",
    "track_chart",
    "track_layers_chart",
    "track_loss_chart",
    "track_trace_chart",
]

FONT = {"family": "-apple-system, 'Segoe UI', Helvetica, Arial, sans-serif", "size": 13}


def _layout(title: str, **kw: Any) -> dict[str, Any]:
    base = {
        "template": "plotly_white",
        "title": {"text": title, "x": 0.02, "font": {"size": 15}},
        "font": FONT,
        "margin": {"l": 70, "r": 30, "t": 50, "b": 60},
        "legend": {"bgcolor": "rgba(255,255,255,0.7)"},
        "height": 460,
    }
    base.update(kw)
    return base


def _nan_to_none(a: np.ndarray) -> list:
    return np.where(np.isfinite(a), a, None).tolist()


def _label(surf: dict[str, Any], i: int, short: bool = False) -> str:
    return surface_axis_label(surf, i, tex=False, short=short)


def surface_3d(doc: dict[str, Any]) -> go.Figure:
    """Interactive 3-D loss surface; the quadratic model as a translucent surface (toggle)."""
    surf = results_of(doc, "surface")
    a, b = (np.asarray(v, dtype=float) for v in surf["axes"])
    z = as_array(surf["loss"])
    fig = go.Figure()
    fig.add_trace(
        go.Surface(
            x=a,
            y=b,
            z=_nan_to_none(z.T),
            colorscale="Viridis",
            name="loss",
            showlegend=True,
            colorbar={"title": {"text": "loss"}, "len": 0.75},
            contours={"z": {"show": True, "usecolormap": True, "project": {"z": True}, "width": 1}},
            hovertemplate="a=%{x:.3g}<br>b=%{y:.3g}<br>loss=%{z:.5g}<extra></extra>",
        )
    )
    quad = as_array(surf.get("quadratic_model"))
    if quad is not None:
        zmax = np.nanmax(z) if np.isfinite(z).any() else None
        q = np.where(quad > zmax * 1.5, np.nan, quad) if zmax is not None and zmax > 0 else quad
        fig.add_trace(
            go.Surface(
                x=a,
                y=b,
                z=_nan_to_none(q.T),
                colorscale=[[0, "#E69F00"], [1, "#E69F00"]],
                opacity=0.35,
                showscale=False,
                name="quadratic model",
                showlegend=True,
                visible="legendonly",
                hovertemplate="quadratic model %{z:.5g}<extra></extra>",
            )
        )
    mark = weights_marker(surf)
    if mark is not None:
        a0, b0, z0, _, top = mark
        # a vertical line from the weights' loss to above the surface, and a marker on top:
        # a point on the surface itself is hidden by it from most angles (issue 14)
        fig.add_trace(
            go.Scatter3d(
                x=[a0, a0],
                y=[b0, b0],
                z=[z0, top],
                mode="lines+markers",
                name="weights w",
                line={"color": "#D55E00", "width": 6},
                marker={"size": [3, 7], "color": "#D55E00", "symbol": ["circle", "diamond"]},
                hovertemplate=f"weights w<br>loss={z0:.5g}<extra></extra>",
            )
        )
    fig.update_layout(
        _layout(
            "Loss surface (drag to rotate)",
            height=560,
            scene={
                "xaxis": {"title": {"text": _label(surf, 0, short=True), "font": {"size": 11}}},
                "yaxis": {"title": {"text": _label(surf, 1, short=True), "font": {"size": 11}}},
                "zaxis": {"title": {"text": "loss"}},
                "camera": {"eye": {"x": 1.75, "y": -1.75, "z": 1.0}},
            },
            margin={"l": 10, "r": 10, "t": 50, "b": 10},
        )
    )
    return fig


def surface_contour(doc: dict[str, Any]) -> go.Figure:
    """Contour map of a 2-D loss surface with the quadratic model as dashed lines."""
    surf = results_of(doc, "surface")
    a, b = (np.asarray(v, dtype=float) for v in surf["axes"])
    z = as_array(surf["loss"])
    quad = as_array(surf.get("quadratic_model"))
    finite = z[np.isfinite(z)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    # Like the matplotlib figure: log-spaced levels when the loss spans more than 20x, so the
    # basin around the weights is resolved; the colour bar is labelled in loss units.
    log = lo > 0 and hi / lo > 20
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            zc = np.log10(z)
            qc = None if quad is None else np.where(quad > 0, np.log10(quad), np.nan)
        clo, chi = np.log10(lo), np.log10(hi)
        ticks = np.arange(np.floor(clo), np.ceil(chi) + 1)
        colorbar = {
            "title": {"text": "loss"},
            "tickvals": ticks.tolist(),
            "ticktext": [f"{10**t:g}" for t in ticks],
        }
    else:
        zc, qc, clo, chi = z, quad, lo, hi
        colorbar = {"title": {"text": "loss"}}
    size = (chi - clo) / 20 or 1.0
    fig = go.Figure()
    fig.add_trace(
        go.Contour(
            x=a,
            y=b,
            z=_nan_to_none(zc.T),
            customdata=_nan_to_none(z.T),
            colorscale="Viridis",
            name="loss",
            contours={"start": clo, "end": chi, "size": size},
            line={"width": 0.5, "color": "rgba(255,255,255,0.5)"},
            colorbar=colorbar,
            hovertemplate="a=%{x:.3g}<br>b=%{y:.3g}<br>loss=%{customdata:.5g}<extra></extra>",
        )
    )
    if qc is not None:
        fig.add_trace(
            go.Contour(
                x=a,
                y=b,
                z=_nan_to_none(qc.T),
                name="quadratic model",
                showscale=False,
                contours={"coloring": "none", "start": clo, "end": chi, "size": 3 * size},
                line={"color": "#FFB000", "dash": "dash", "width": 1.8},
                showlegend=True,
                hoverinfo="skip",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[0],
            y=[0],
            mode="markers",
            name="weights w",
            marker={
                "symbol": "star",
                "size": 15,
                "color": "white",
                "line": {"color": "black", "width": 1},
            },
        )
    )
    fig.update_layout(
        _layout(
            "Loss contours" + (" (log-spaced levels)" if log else ""),
            xaxis={"title": {"text": _label(surf, 0)}},
            yaxis={"title": {"text": _label(surf, 1)}, "scaleanchor": "x"}
            if (surf.get("directions") or {}).get("kind") in ("eigen", "random")
            else {"title": {"text": _label(surf, 1)}},
            legend={"x": 0.01, "y": 0.99, "bgcolor": "rgba(255,255,255,0.75)"},
            height=520,
        )
    )
    return fig


def surface_lines(doc: dict[str, Any]) -> go.Figure:
    """Loss along each direction through the weights, the quadratic model dashed."""
    surf = results_of(doc, "surface")
    axes = [np.asarray(v, dtype=float) for v in surf["axes"]]
    z = as_array(surf["loss"])
    quad = as_array(surf.get("quadratic_model"))
    if z.ndim == 1:
        lines = [(axes[0], z, quad, _label(surf, 0))]
    else:
        i0, j0 = int(np.argmin(np.abs(axes[0]))), int(np.argmin(np.abs(axes[1])))
        lines = [
            (axes[0], z[:, j0], None if quad is None else quad[:, j0], _label(surf, 0)),
            (axes[1], z[i0, :], None if quad is None else quad[i0, :], _label(surf, 1)),
        ]
    fig = go.Figure()
    finite = np.concatenate([y[np.isfinite(y)] for _, y, _, _ in lines])
    for k, (x, y, q, label) in enumerate(lines):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=_nan_to_none(y),
                name=f"loss along {label}",
                line={"color": PALETTE[k], "width": 2.5},
            )
        )
        if q is not None:
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=_nan_to_none(q),
                    name=f"quadratic model ({k + 1})",
                    line={"color": PALETTE[k], "dash": "dash", "width": 1.6},
                )
            )
    yr = None
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.08 * (hi - lo or abs(hi) or 1.0)
        yr = [lo - pad, hi + 3 * pad]
    kind = (surf.get("directions") or {}).get("kind")
    fig.update_layout(
        _layout(
            "Slices through the weights",
            xaxis={
                "title": {
                    "text": "distance from w"
                    if kind in ("eigen", "random")
                    else "step along the direction"
                },
                "zeroline": True,
            },
            yaxis={"title": {"text": "loss"}, "range": yr},
            legend={"x": 0.5, "xanchor": "center", "y": 1.0, "bgcolor": "rgba(255,255,255,0.8)"},
        )
    )
    return fig


def spectrum_chart(doc: dict[str, Any]) -> go.Figure:
    """Eigenvalues per matrix and block with residual error bars; unconverged hollow red."""
    spectra = results_of(doc, "spectra")
    fig = go.Figure()
    matrices = list(dict.fromkeys(s["matrix"] for s in spectra))
    groups = list(dict.fromkeys((s["matrix"], s["block"]) for s in spectra))
    shown: set[str] = set()
    for s in spectra:
        colour = PALETTE[matrices.index(s["matrix"]) % len(PALETTE)]
        ev = [np.nan if v is None else v for v in s["eigenvalues"]]
        res = [0 if v is None else v for v in s.get("residual_norms") or [0] * len(ev)]
        conv = list(s.get("converged") or [True] * len(ev))
        k = len(ev)
        bottom = s.get("which") == "bottom"
        x0 = groups.index((s["matrix"], s["block"])) + (0.15 if bottom else -0.15)
        xs = (x0 + np.linspace(-0.1, 0.1, k)).tolist() if k > 1 else [x0]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ev,
                mode="markers",
                name=s["matrix"],
                legendgroup=s["matrix"],
                showlegend=s["matrix"] not in shown,
                error_y={"type": "data", "array": res, "visible": True, "color": colour},
                marker={
                    "symbol": "triangle-down" if bottom else "circle",
                    "size": 9,
                    "color": [colour if c else "white" for c in conv],
                    "line": {"color": [colour if c else "#B00020" for c in conv], "width": 1.5},
                },
                customdata=[
                    [i + 1, r, "yes" if c else "no", s["block"], s.get("which", "")]
                    for i, (r, c) in enumerate(zip(res, conv, strict=False))
                ],
                hovertemplate="%{customdata[4]} λ%{customdata[0]} = %{y:.6g}<br>residual "
                "%{customdata[1]:.2e}<br>converged: %{customdata[2]}<extra>"
                + s["matrix"]
                + " · %{customdata[3]}</extra>",
            )
        )
        shown.add(s["matrix"])
    fig.add_hline(y=0, line={"color": "grey", "width": 1})
    fig.update_layout(
        _layout(
            "Extreme eigenvalues (● largest, ▼ smallest; bars: residual; hollow red: not "
            "converged)",
            xaxis={
                "title": {"text": "matrix · block"},
                "tickvals": list(range(len(groups))),
                "ticktext": [
                    block_label(b) if len(matrices) == 1 else f"{m}<br>{block_label(b)}"
                    for m, b in groups
                ],
                "range": [-0.6, len(groups) - 0.4],
                "showgrid": False,
            },
            yaxis={"title": {"text": "eigenvalue"}},
        )
    )
    return fig


def density_chart(doc: dict[str, Any]) -> go.Figure:
    """Spectral densities on a log scale, one line per matrix and block."""
    dens = results_of(doc, "densities")
    fig = go.Figure()
    for i, d in enumerate(dens):
        y = np.array([np.nan if v is None else v for v in d["density"]], dtype=float)
        floor = np.nanmax(y) * 1e-8 if np.isfinite(y).any() else 1e-12
        fig.add_trace(
            go.Scatter(
                x=d["grid"],
                y=_nan_to_none(np.maximum(y, floor)),
                name=f"{d['matrix']}, {d['block']}",
                line={"color": PALETTE[i % 8], "width": 2},
                fill="tozeroy" if len(dens) == 1 else None,
            )
        )
    fig.update_layout(
        _layout(
            "Spectral density (stochastic Lanczos quadrature)",
            xaxis={"title": {"text": "eigenvalue λ"}},
            yaxis={
                "title": {"text": "density (log scale)"},
                "type": "log",
                "exponentformat": "power",
            },
        )
    )
    return fig


def compare_heatmap(doc: dict[str, Any]) -> go.Figure:
    """Relative Frobenius error per layer block (rows) and approximation (columns)."""
    rows = results_of(doc, "comparisons")
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    matrices = list(dict.fromkeys(r["matrix"] for r in rows))
    grid = np.full((len(blocks), len(matrices)), np.nan)
    for r in rows:
        if r.get("rel_frobenius") is not None:
            grid[blocks.index(r["block"]), matrices.index(r["matrix"])] = r["rel_frobenius"]
    text = [["n/a" if not np.isfinite(v) else f"{v:.3g}" for v in row] for row in grid]
    fig = go.Figure(
        go.Heatmap(
            z=_nan_to_none(grid),
            x=matrices,
            y=[block_label(b) for b in blocks],
            text=text,
            texttemplate="%{text}",
            colorscale="Magma",
            reversescale=True,
            zmin=0,
            # 0 is exact, 1 as wrong as the zero matrix: a fixed scale, so tiny errors look tiny
            zmax=max(1.0, float(np.nanmax(grid))) if np.isfinite(grid).any() else 1.0,
            colorbar={"title": {"text": "‖H−A‖F / ‖H‖F"}},
            hovertemplate="%{y} · %{x}: %{z:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        _layout(
            "Relative error of each approximation, per layer",
            xaxis={"title": {"text": "approximation"}},
            yaxis={"title": {"text": "layer block"}, "autorange": "reversed"},
            height=max(300, 60 * len(blocks) + 180),
        )
    )
    return fig


def classes_chart(doc: dict[str, Any]) -> go.Figure | None:
    """The GGN's top eigenvalues with the class and cross-class parts' overlaid.

    As :func:`curvscope.report._plots.plot_classes`; ``None`` without any eigenvalue.
    """
    s = classes_series(doc)
    g, cls, crs, C = s["ggn"], s["class"], s["cross"], s["C"]
    if not (len(g["y"]) or len(cls["y"]) or len(crs["y"])):
        return None
    fig = go.Figure()
    if len(g["y"]):
        ok = g["ok"]
        for mask, name, marker in (
            (ok, "GGN (Lanczos)", {"color": "#262626", "size": 7}),
            (~ok, "GGN, not converged",
             {"color": "white", "size": 8, "line": {"color": "#B00020", "width": 1.5}}),
        ):
            if mask.any():
                fig.add_trace(go.Scatter(
                    x=g["x"][mask].tolist(), y=_nan_to_none(g["y"][mask]), mode="markers",
                    name=name, marker=marker,
                    error_y={"type": "data", "array": g["err"][mask].tolist(), "visible": True,
                             "color": "#555555", "thickness": 1},
                    hovertemplate="GGN λ%{x}: %{y:.6g}<extra></extra>",
                ))
    for part, name, colour, size in (
        (cls, "class means G_class", PALETTE[0], 22),
        (crs, "cross-class G_cross", PALETTE[1], 14),
    ):
        if len(part["y"]):
            fig.add_trace(go.Scatter(
                x=part["x"].tolist(), y=_nan_to_none(part["y"]), mode="markers", name=name,
                marker={"symbol": "line-ew", "size": size, "line": {"color": colour, "width": 3}},
                hovertemplate=name + " at %{x}: %{y:.6g}<extra></extra>",
            ))
    shapes = []
    if C:
        shapes.append({"type": "line", "x0": C + 0.5, "x1": C + 0.5, "yref": "paper", "y0": 0,
                       "y1": 1, "line": {"color": "#888888", "width": 1, "dash": "dash"}})
    fig.update_layout(
        _layout(
            "GGN outliers and the class / cross-class parts",
            xaxis={"title": {"text": f"eigenvalue index (C = {C}: 1..C outliers, "
                                     "C+1..C² mini-outliers)"}},
            yaxis={"title": {"text": "eigenvalue"}, "type": "log" if s["positive"] else "linear"},
            shapes=shapes,
        )
    )
    return fig


def taylor_chart(doc: dict[str, Any]) -> go.Figure | None:
    """Taylor remainders e1(h), e2(h) on log-log axes, or ``None`` without per-step data."""
    checks = results_of(doc, "checks")
    taylor = next((c for c in checks if str(c.get("name", "")).startswith("taylor")), None)
    if taylor is None:
        return None
    series = taylor_series(taylor)
    key = next((k for k in ("h", "steps", "hs") if series and k in series[0]), None)
    if key is None:
        return None
    fig = go.Figure()
    for i, s in enumerate(series):
        for name, dash in (("e1", "solid"), ("e2", "dash")):
            if name not in s:
                continue
            e = np.array([np.nan if v is None else v for v in s[name]], dtype=float)
            e = np.where(e > 0, e, np.nan)
            fig.add_trace(
                go.Scatter(
                    x=s[key],
                    y=_nan_to_none(e),
                    mode="lines+markers",
                    name=f"{name}, {s.get('label', i + 1)}",
                    line={"color": PALETTE[i % 8], "dash": dash},
                )
            )
    if not fig.data:
        return None
    fig.update_layout(
        _layout(
            "Taylor test: e1 ~ h², e2 ~ h³ until round-off",
            xaxis={"title": {"text": "step h"}, "type": "log", "exponentformat": "power"},
            yaxis={"title": {"text": "remainder"}, "type": "log", "exponentformat": "power"},
        )
    )
    return fig


def solver_chart(doc: dict[str, Any], key: str = "loss") -> go.Figure:
    """One line per solver: ``key`` (``loss`` or ``grad_norm``) against iterations."""
    solves = results_of(doc, "solves")
    fig = go.Figure()
    positive = True
    for i, s in enumerate(solves):
        cols = trace_columns(s.get("trace"))
        if key not in cols:
            continue
        y = np.array([np.nan if v is None else v for v in cols[key]], dtype=float)
        positive &= bool(np.nanmin(y) > 0) if np.isfinite(y).any() else True
        x = cols.get("iteration") or list(range(len(y)))
        fig.add_trace(
            go.Scatter(
                x=x,
                y=_nan_to_none(y),
                name=s.get("solver", f"solver {i + 1}"),
                line={"color": PALETTE[i % 8], "width": 2},
            )
        )
    fig.update_layout(
        _layout(
            {"loss": "Loss per iteration", "grad_norm": "Gradient norm per iteration"}.get(
                key, key
            ),
            xaxis={"title": {"text": "iteration"}},
            yaxis={
                "title": {"text": key.replace("_", " ")},
                "type": "log" if positive else "linear",
                "exponentformat": "power",
            },
        )
    )
    return fig


_DASHES = ["solid", "dash", "dot", "dashdot"]


def _add_thresholds(fig: go.Figure, doc: dict[str, Any]) -> None:
    for k, (value, label) in enumerate(track_thresholds(doc)):
        fig.add_hline(y=value, line={"color": "#404040", "width": 1.2,
                                     "dash": "dash" if k == 0 else "dot"},
                      annotation_text=label, annotation_position="top left")
    x, _ = track_x(doc)
    for k, s in enumerate(track_optimizer_thresholds(doc)):
        # the checkpoint's own optimiser: one line per parameter group where they differ
        fig.add_trace(go.Scatter(
            x=x.tolist(), y=_nan_to_none(s["y"]), mode="lines", name=s["label"],
            line={"color": "#7A0019", "width": 1.4, "shape": "hv",
                  "dash": _DASHES[(k + 1) % len(_DASHES)]},
        ))


def track_chart(doc: dict[str, Any]) -> go.Figure:
    """Extreme eigenvalues against step, error bars from the error bounds, 2/η lines."""
    x, xlabel = track_x(doc)
    series = track_eigen_series(doc)
    matrices = list(dict.fromkeys(s["matrix"] for s in series))
    fig = go.Figure()
    for n, s in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        bottom = s["which"] == "bottom"
        label = s["label"] if len(matrices) == 1 else f"{s['matrix']} {s['label']}"
        fig.add_trace(
            go.Scatter(
                x=x.tolist(),
                y=_nan_to_none(s["y"]),
                mode="lines+markers",
                name=label,
                line={"color": colour, "width": 2,
                      "dash": _DASHES[matrices.index(s["matrix"]) % len(_DASHES)]},
                error_y={"type": "data", "array": s["err"].tolist(), "visible": True,
                         "color": colour},
                marker={
                    "symbol": "triangle-down" if bottom else "circle",
                    "size": 7,
                    "color": [colour if ok else "white" for ok in s["ok"]],
                    "line": {"color": [colour if ok else "#B00020" for ok in s["ok"]],
                             "width": 1.5},
                },
                customdata=s["err"].tolist(),
                hovertemplate=f"{label} = %{{y:.6g}} ± %{{customdata:.1e}}<br>"
                f"{xlabel} %{{x}}<extra></extra>",
            )
        )
    _add_thresholds(fig, doc)
    fig.update_layout(
        _layout("Eigenvalues during training (bars: error bounds; hollow red: not converged)",
                xaxis={"title": {"text": xlabel}}, yaxis={"title": {"text": "eigenvalue"}})
    )
    return fig


def track_loss_chart(doc: dict[str, Any]) -> go.Figure:
    """Loss and gradient norm against step (log scales)."""
    x, xlabel = track_x(doc)
    rows = results_of(doc, "track")
    fig = go.Figure()
    for n, (key, name) in enumerate((("loss", "loss"), ("grad_norm", "gradient norm"))):
        y = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
        fig.add_trace(go.Scatter(x=x.tolist(), y=_nan_to_none(y), mode="lines+markers",
                                 name=name, yaxis="y" if n == 0 else "y2",
                                 line={"color": PALETTE[n], "width": 2,
                                       "dash": "solid" if n == 0 else "dash"}))
    fig.update_layout(
        _layout("Loss and gradient norm during training",
                xaxis={"title": {"text": xlabel}},
                yaxis={"title": {"text": "loss"}, "type": "log", "exponentformat": "power"},
                yaxis2={"title": {"text": "gradient norm"}, "overlaying": "y", "side": "right",
                        "type": "log", "exponentformat": "power", "showgrid": False},
                height=380)
    )
    return fig


def track_trace_chart(doc: dict[str, Any]) -> go.Figure | None:
    """Trace against step, error bars one standard error."""
    x, xlabel = track_x(doc)
    series = track_trace_series(doc)
    if not series:
        return None
    fig = go.Figure()
    for n, s in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        fig.add_trace(go.Scatter(
            x=x.tolist(), y=_nan_to_none(s["y"]), mode="lines+markers",
            name=f"{s['matrix']} ({s['estimator']})", line={"color": colour, "width": 2},
            error_y={"type": "data", "array": s["err"].tolist(), "visible": True,
                     "color": colour},
        ))
    fig.update_layout(_layout("Trace during training (bars: one standard error)",
                              xaxis={"title": {"text": xlabel}},
                              yaxis={"title": {"text": "trace"}}, height=380))
    return fig


def track_layers_chart(doc: dict[str, Any]) -> go.Figure | None:
    """Each module's top eigenvalue against step."""
    x, xlabel = track_x(doc)
    series = track_layer_series(doc)
    if not series:
        return None
    matrices = list(dict.fromkeys(s["matrix"] for s in series))
    blocks = list(dict.fromkeys(s["block"] for s in series))
    fig = go.Figure()
    for s in series:
        colour = PALETTE[blocks.index(s["block"]) % len(PALETTE)]
        name = block_label(s["block"]) + ("" if len(matrices) == 1 else f" ({s['matrix']})")
        fig.add_trace(go.Scatter(
            x=x.tolist(), y=_nan_to_none(s["y"]), mode="lines+markers", name=name,
            line={"color": colour, "width": 2,
                  "dash": _DASHES[matrices.index(s["matrix"]) % len(_DASHES)]},
            error_y={"type": "data", "array": s["err"].tolist(), "visible": True,
                     "color": colour},
        ))
    _add_thresholds(fig, doc)
    fig.update_layout(_layout("Per-layer sharpness during training",
                              xaxis={"title": {"text": xlabel}},
                              yaxis={"title": {"text": "top eigenvalue of the layer's block"}}))
    return fig


def figure_json(fig: go.Figure) -> str:
    """The figure as JSON for ``Plotly.newPlot`` (data and layout)."""
    return pio.to_json(fig, validate=False, remove_uids=True)
