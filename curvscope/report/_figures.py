"""Helpers both figure renderers share (matplotlib and plotly): colours, labels, data access.

Everything here reads result documents; nothing draws.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "PALETTE",
    "as_array",
    "block_label",
    "classes_series",
    "fmt",
    "results_of",
    "surface_axis_label",
    "taylor_series",
    "trace_columns",
    "track_eigen_series",
    "track_layer_series",
    "track_optimizer_thresholds",
    "track_thresholds",
    "track_trace_series",
    "track_x",
]

# Okabe-Ito: distinguishable with the common colour-vision deficiencies, and in grey print.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]

def results_of(doc: dict[str, Any], key: str) -> Any:
    """The ``key`` entry of a document, of its ``results``, or the object itself."""
    if "results" in doc and isinstance(doc["results"], dict) and key in doc["results"]:
        return doc["results"][key]
    if key in doc:
        return doc[key]
    return doc


def as_array(values) -> np.ndarray:
    """Nested lists with ``None`` (non-finite in JSON) as a float array with NaN."""
    if values is None:
        return None
    return np.array(
        [[np.nan if v is None else v for v in row] for row in values]
        if values and isinstance(values[0], (list, tuple))
        else [np.nan if v is None else v for v in values],
        dtype=float,
    )


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def block_label(block: str) -> str:
    """``"0"`` reads as a number on an axis: call Sequential indices modules."""
    return f"module {block}" if block.replace(".", "").isdigit() else block


def surface_axis_label(
    surf: dict[str, Any], i: int, *, tex: bool = True, short: bool = False
) -> str:
    """Axis label of direction ``i``: what it is and, for eigenvectors, its eigenvalue."""
    d = surf.get("directions") or {}
    kind = d.get("kind", "")
    evs = surf.get("eigenvalues") or d.get("eigenvalues")
    if kind == "eigen" and evs and i < len(evs):
        lam = fmt(evs[i])
        sym = (f"$v_{i + 1}$", f"$\\lambda_{i + 1}$") if tex else (f"v{i + 1}", f"λ{i + 1}")
        if short:
            return f"{sym[0]} ({sym[1]} = {lam})"
        matrix = d.get("matrix") or "hessian"
        name = "Hessian" if matrix == "hessian" else matrix
        return f"{sym[0]}, {name} eigenvector ({sym[1]} = {lam})"
    if kind == "random":
        return f"random d{i + 1}" if short else f"random direction {i + 1} (unit norm)"
    if kind == "filter-normalized":
        return (
            f"filter-norm. d{i + 1}"
            if short
            else f"filter-normalised direction {i + 1} (multiples)"
        )
    return f"direction {i + 1}"


def weights_marker(surf: dict[str, Any]) -> tuple[float, float, float, float, float] | None:
    """Where the 3-D views mark the weights: ``(a, b, z, z_low, z_top)``.

    ``(a, b)`` is the grid point nearest the origin and ``z`` its loss; ``z_top`` lies a
    little above the highest finite loss and ``z_low`` at the lowest, so a vertical line
    through the weights spans the surface and a marker at ``z_top`` is never hidden by it.
    ``None`` when the loss there is not finite.
    """
    a, b = (np.asarray(v, dtype=float) for v in surf["axes"])
    z = as_array(surf["loss"])
    i, j = int(np.argmin(np.abs(a))), int(np.argmin(np.abs(b)))
    if not np.isfinite(z[i, j]):
        return None
    finite = z[np.isfinite(z)]
    lo, hi = float(finite.min()), float(finite.max())
    top = hi + 0.08 * ((hi - lo) or abs(hi) or 1.0)
    return float(a[i]), float(b[j]), float(z[i, j]), lo, top


def taylor_series(check: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-direction series of a Taylor/gradient check entry, in whatever form it has."""
    subs = check.get("directions") or check.get("results") or check.get("subresults") or []
    out = []
    for i, s in enumerate(x for x in subs if isinstance(x, dict)):
        # curvscope check writes {"direction", "steps", "errors": {"e1", "e2"}, ...}
        flat = {**s, **(s.get("errors") or {})}
        if "h" not in flat and "steps" in flat:
            flat["h"] = flat["steps"]
        flat["label"] = str(s.get("direction") or f"direction {i + 1}")
        out.append(flat)
    return out


def trace_columns(trace: Any) -> dict[str, list]:
    """A solver trace as columns, whether it is stored as rows or as columns."""
    if isinstance(trace, dict):
        return {k: list(v) for k, v in trace.items() if isinstance(v, list)}
    if isinstance(trace, list) and trace and isinstance(trace[0], dict):
        keys = list(dict.fromkeys(k for row in trace for k in row))
        return {k: [row.get(k) for row in trace] for k in keys}
    return {}


# ----------------------------------------------------------------------------- track
def _rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = results_of(doc, "track")
    return rows if isinstance(rows, list) else []


def _nan(v: Any) -> float:
    return np.nan if v is None else float(v)


def track_x(doc: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The x values of a track's rows and the axis label.

    The training step when every row has one; otherwise the rows' positions (the order by
    file name).
    """
    rows = _rows(doc)
    if rows and all(r.get("step") is not None for r in rows):
        return np.array([r["step"] for r in rows], dtype=float), "training step"
    return (
        np.array([r.get("index", i) for i, r in enumerate(rows)], dtype=float),
        "checkpoint (in file-name order)",
    )


def track_eigen_series(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One series per matrix, end and index: ``{matrix, which, index, label, y, err, ok}``.

    ``err`` is the error bound of each eigenvalue (its residual where no bound was recorded).
    """
    rows = _rows(doc)
    keys: list[tuple[str, str, int]] = []
    for r in rows:
        for m, ends in (r.get("eigenvalues") or {}).items():
            for which, vals in ends.items():
                for i in range(len(vals or [])):
                    if (m, which, i) not in keys:
                        keys.append((m, which, i))
    out = []
    for m, which, i in keys:
        y, err, ok = [], [], []
        for r in rows:
            vals = ((r.get("eigenvalues") or {}).get(m) or {}).get(which) or []
            bounds = ((r.get("error_bounds") or {}).get(m) or {}).get(which)
            if bounds is None:
                bounds = ((r.get("residuals") or {}).get(m) or {}).get(which) or []
            conv = ((r.get("converged") or {}).get(m) or {}).get(which) or []
            y.append(_nan(vals[i]) if i < len(vals) else np.nan)
            err.append(_nan(bounds[i]) if i < len(bounds) else 0.0)
            ok.append(bool(conv[i]) if i < len(conv) else True)
        label = f"λ{i + 1}" if which == "top" else f"λmin{'' if i == 0 else i + 1}"
        out.append({"matrix": m, "which": which, "index": i, "label": label,
                    "y": np.array(y), "err": np.nan_to_num(np.array(err)), "ok": np.array(ok)})
    return out


def track_trace_series(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One series per matrix with a trace: ``{matrix, estimator, y, err}`` (err: stderr)."""
    rows = _rows(doc)
    matrices = list(dict.fromkeys(m for r in rows for m in (r.get("trace") or {})))
    out = []
    for m in matrices:
        ts = [(r.get("trace") or {}).get(m) or {} for r in rows]
        est = next((t.get("estimator") for t in ts if t.get("estimator")), "")
        out.append({"matrix": m, "estimator": est,
                    "y": np.array([_nan(t.get("estimate")) for t in ts]),
                    "err": np.nan_to_num(np.array([_nan(t.get("stderr")) for t in ts]))})
    return out


def track_layer_series(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One series per matrix and module: ``{matrix, block, y, err, ok}``."""
    rows = _rows(doc)
    keys = list(dict.fromkeys(
        (m, b) for r in rows for m, layers in (r.get("per_layer_top") or {}).items()
        for b in layers
    ))
    out = []
    for m, b in keys:
        es = [((r.get("per_layer_top") or {}).get(m) or {}).get(b) or {} for r in rows]
        out.append({"matrix": m, "block": b,
                    "y": np.array([_nan(e.get("eigenvalue")) for e in es]),
                    "err": np.nan_to_num(np.array([_nan(e.get("error_bound")) for e in es])),
                    "ok": np.array([bool(e.get("converged", True)) for e in es])})
    return out


def track_optimizer_thresholds(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The thresholds the rows' own optimiser records give: ``{label, y, applies_to}``.

    One series per parameter group where the groups' thresholds differ (the label names the
    group), else one; ``y`` holds each row's value (NaN where a row has none), so a learning
    rate that changes across checkpoints draws a line that follows it. ``applies_to`` is
    ``preconditioned`` (Adam, AdamW, RMSprop, Adagrad) or ``raw`` (SGD).
    """
    rows = _rows(doc)
    records = [r.get("optimizer") or {} for r in rows]
    groups = max((len(rec.get("thresholds") or []) for rec in records), default=0)
    if not groups:
        return []
    per_row = [
        [None if t is None else float(t) for t in (rec.get("thresholds") or [])]
        for rec in records
    ]
    differ = any(len({t for t in ts if t is not None}) > 1 for ts in per_row)
    kinds = [rec.get("optimizer") for rec in records if rec.get("optimizer")]
    kind = kinds[-1] if kinds else ""
    applies = next(
        (rec.get("threshold_applies_to") for rec in records if rec.get("threshold_applies_to")),
        "preconditioned",
    )
    out = []
    for g in range(groups if differ else 1):
        y = np.array([_nan(ts[g]) if g < len(ts) else np.nan for ts in per_row])
        if not np.isfinite(y).any():
            continue
        lrs = [(rec.get("lrs") or [None] * groups)[g] if g < len(rec.get("lrs") or []) else None
               for rec in records]
        coef = [t * lr for t, lr in zip(y, lrs, strict=True) if lr and np.isfinite(t)]
        finite = y[np.isfinite(y)]
        what = f"{fmt(coef[-1])}/η" if coef and np.allclose(coef, coef[-1]) else "threshold"
        value = f" = {fmt(finite[-1])}" if np.allclose(finite, finite[-1]) else ""
        where = f", group {g}" if differ else ""
        target = "λ1(P⁻¹H)" if applies == "preconditioned" else "λ1"
        out.append({"label": f"{kind} {what}{value} ({target}{where})".strip(), "y": y,
                    "applies_to": applies, "group": g if differ else None})
    return out


def track_thresholds(doc: dict[str, Any]) -> list[tuple[float, str]]:
    """Horizontal reference lines: ``2/lr`` and, with momentum, ``2(1+momentum)/lr``."""
    stab = results_of(doc, "stability")
    if not isinstance(stab, dict) or not stab.get("lr"):
        return []
    lr, beta = stab["lr"], stab.get("momentum") or 0.0
    lines = [(float(stab.get("threshold_no_momentum") or 2.0 / lr), f"2/η = {fmt(2.0 / lr)}")]
    if beta:
        lines.append((float(stab["threshold"]), f"2(1+β)/η = {fmt(stab['threshold'])}"))
    return lines


# ----------------------------------------------------------------------------- classes
def classes_series(doc: dict[str, Any]) -> dict[str, Any]:
    """What the classes figures draw: the GGN's top pairs and the parts' eigenvalues.

    ``{C, ggn: {x, y, err, ok}, class: {x, y}, cross: {x, y}, positive}``: the GGN's
    eigenvalues at their 1-based index (``err`` the error bound, else the residual; ``ok``
    converged), the class part's ``C`` eigenvalues at indices ``1..C`` (Papyan's outliers)
    and the cross part's at ``C+1..`` (the mini-outliers), so a part's eigenvalue sits beside
    the GGN eigenvalue it should match. ``positive``: every value is positive (log axis).
    """
    r = results_of(doc, "classes")
    C = int(r.get("num_classes") or 0)
    g = r.get("ggn") or {}
    ev = [_nan(v) for v in g.get("eigenvalues") or []]
    bounds = g.get("error_bounds") or g.get("residual_norms") or [0.0] * len(ev)
    conv = g.get("converged") or [True] * len(ev)
    cls = [_nan(v) for v in r.get("class_eigenvalues") or []][:C]
    crs = [_nan(v) for v in r.get("cross_eigenvalues") or []][: max(0, C * C - C)]
    every = np.array([*ev, *cls, *crs], dtype=float)
    every = every[np.isfinite(every)]
    return {
        "C": C,
        "ggn": {
            "x": np.arange(1, len(ev) + 1),
            "y": np.array(ev, dtype=float),
            "err": np.nan_to_num(np.array([_nan(b) for b in bounds][: len(ev)], dtype=float)),
            "ok": np.array([bool(c) for c in conv][: len(ev)], dtype=bool),
        },
        "class": {"x": np.arange(1, len(cls) + 1), "y": np.array(cls, dtype=float)},
        "cross": {"x": np.arange(C + 1, C + len(crs) + 1), "y": np.array(crs, dtype=float)},
        "positive": bool(every.size) and bool((every > 0).all()),
    }
