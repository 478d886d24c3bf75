r"""The self-contained HTML report, rendered from result documents only.

One file that opens from disk with no network access: plotly's JavaScript is inlined (or, with
``plotly_js=PATH``, loaded from a relative path next to the page), charts are drawn by
``Plotly.newPlot`` from JSON embedded in the page, and a Content-Security-Policy forbids the
browser every network load (``default-src 'none'``). The page text holds no ``http://`` or
``https://`` at all: plotly's bundle mentions addresses in comments, licence headers, map-tile
defaults we never use and XML namespace names (which identify, not load); those are written
with an escaped slash (``http:\\/\\/``), which JavaScript reads as the same string, so a plain
text scan of the page finds no address.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
from collections.abc import Iterable
from typing import Any

from . import _plotly as charts

__all__ = ["CSP", "render_report"]

CSP = (
    "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'{extra}; "
    "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; connect-src 'none'; "
    "worker-src blob:"
)
_URL = re.compile(r"(https?:)//", re.IGNORECASE)

SECTION_ORDER = [
    "spectrum", "density", "check", "compare", "surface", "solve", "classes", "track"
]

TITLES = {
    "spectrum": "Spectrum",
    "density": "Spectral density and trace",
    "check": "Derivative checks and convexity certificate",
    "compare": "How well the approximations match the Hessian",
    "surface": "Loss surface",
    "solve": "Solver runs",
    "classes": "Class structure: where the GGN's outliers come from",
    "track": "Training: curvature across checkpoints",
}

NAV = {
    "spectrum": "Spectrum",
    "density": "Density",
    "check": "Checks",
    "compare": "Comparison",
    "surface": "Surface",
    "solve": "Solvers",
    "classes": "Classes",
    "track": "Training",
}

HOW_TO_READ = {
    "spectrum": (
        "The largest and smallest eigenvalues of each matrix, found by Lanczos. Each comes "
        "with its residual ‖Av − λv‖, which bounds its distance to a true eigenvalue; a pair "
        "is converged when the residual is below tol × ‖A‖₂. Large positive eigenvalues are "
        "sharp directions; a clearly negative smallest Hessian eigenvalue means the weights "
        "sit at a saddle or on a slope, not in a minimum."
    ),
    "density": (
        "The smoothed distribution of all eigenvalues (stochastic Lanczos quadrature with "
        "random probes), on a log scale so that the few outliers next to the bulk near zero "
        "stay visible. Mass left of zero is negative curvature. The trace estimates carry "
        "their standard errors."
    ),
    "check": (
        "Whether the derivatives curvscope uses are right: the gradient test compares finite "
        "differences with g·d, the Taylor test checks that the remainders fall as h² and h³. "
        "Failed means the smallest steps clear of round-off show a lower order (a wrong "
        "derivative); a faster fall is a higher-order remainder and passes. "
        "Inconclusive means round-off or kinks (ReLU, max-pool) hid the answer, not a failure. "
        "The convexity certificate (Veitch Thm 4.1, sign corrected) says which layer blocks "
        "are provably positive semi-definite at these weights, and nothing more."
    ),
    "compare": (
        "For each layer block, ‖H_b − A_b‖_F / ‖H_b‖_F: how far each approximation A (GGN, "
        "Fisher, PCH, KFAC...) is from the true Hessian block. 0 is exact; 1 is as wrong as "
        "the zero matrix. Block-diagonal approximations carry the cross-layer terms they drop "
        "into this error."
    ),
    "surface": (
        "The loss on a grid around the weights (star, at 0). Along unit eigenvectors the axes "
        "are distances in parameter space. The dashed lines are the quadratic model "
        "L + h g·d + h²/2 d·Hd: where they part from the loss, the Hessian stops describing "
        "the surface."
    ),
    "solve": (
        "Each solver's loss and gradient norm per iteration, started from the same weights. "
        "The findings list what the curvature trace explains: negative curvature met, "
        "damping changes, line-search failures, stalls."
    ),
    "classes": (
        "The GGN of a softmax classifier split as Papyan (2019, 2020) does: G_class, built "
        "from the C class means, should carry the C outliers of the spectrum, G_cross, built "
        "from the cross-class means, the next C(C−1) mini-outliers; the rest is the bulk. The "
        "parts' eigenvalues are exact; each GGN eigenvalue carries its error bound. The "
        "principal-angle cosines say how well a part's range matches the GGN eigenvectors of "
        "those indices: 1 is the same space, 0 orthogonal; each cosine lies within its bound "
        "of the exact one."
    ),
    "track": (
        "The same measurements at every checkpoint of a training run, on the same samples with "
        "the same seeds: loss, gradient norm, the extreme eigenvalues with their error bounds "
        "as bars, and, when recorded, the trace with its standard error and each layer's own "
        "top eigenvalue. The dashed line is 2/η for the step size η of training (dotted: "
        "2(1+β)/η with heavy-ball momentum β): gradient descent cannot stay stable where the "
        "sharpness is above it, and full-batch training typically rises to it and hovers "
        "there (Cohen et al. 2021, the edge of stability)."
    ),
}

_CSS = """
:root { --ink:#1d2330; --muted:#5b6472; --line:#e3e6eb; --accent:#0072B2; --ok:#0a7d45;
        --bad:#b00020; --warn:#a35f00; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.55 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;
       color:var(--ink); background:#f6f7f9; }
header { background:#1d2330; color:#fff; padding:22px 0 18px; }
header .wrap, main { max-width:1120px; margin:0 auto; padding:0 24px; }
header h1 { margin:0 0 4px; font-size:24px; font-weight:650; }
header p { margin:0; color:#c9d1dc; font-size:14px; }
nav { margin-top:10px; font-size:14px; }
nav a { color:#9fd3ff; margin-right:14px; text-decoration:none; }
section { background:#fff; border:1px solid var(--line); border-radius:8px;
          margin:22px 0; padding:18px 22px 20px; }
h2 { margin:0 0 6px; font-size:19px; }
h3 { margin:16px 0 6px; font-size:15px; color:var(--muted); }
p.read { margin:2px 0 12px; color:var(--muted); max-width:900px; }
table { border-collapse:collapse; margin:6px 0 10px; font-size:13.5px; }
th, td { border-bottom:1px solid var(--line); padding:4px 10px; text-align:left;
         vertical-align:top; }
th { background:#f1f3f6; font-weight:600; }
td.num { text-align:right; font-variant-numeric:tabular-nums; font-family:ui-monospace,
         "DejaVu Sans Mono",monospace; }
td.list { text-align:left; }
.pass { color:var(--ok); font-weight:600; } .fail { color:var(--bad); font-weight:600; }
.inc { color:var(--warn); font-weight:600; }
.chart { width:100%; min-height:300px; }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:10px; }
@media (max-width:900px) { .grid2 { grid-template-columns:1fr; } }
ul.notes { color:var(--muted); font-size:13.5px; margin:6px 0; }
.kv td:first-child { color:var(--muted); white-space:nowrap; }
code { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:13px; }
footer { color:var(--muted); font-size:13px; text-align:center; padding:10px 0 30px; }
"""


def _esc(value: Any) -> str:
    """HTML-escape text; addresses are written so that the page holds no ``scheme://``."""
    text = html.escape("" if value is None else str(value))
    return _URL.sub(r"\1&#47;&#47;", text)


def _num(x: Any, digits: int = 6) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        if isinstance(x, float) and not math.isfinite(x):
            return "n/a"
        return f"{x:.{digits}g}" if isinstance(x, float) else str(x)
    return _esc(x)


def _verdict(passed: Any, name: str = "") -> str:
    if passed is True:
        return '<span class="pass">passed</span>'
    if passed is False:
        return '<span class="fail">failed</span>'
    if name == "convexity":
        return '<span class="inc">certificate (not a test)</span>'
    return '<span class="inc">inconclusive</span>'


def _table(header: list[str] | None, rows: Iterable[list[str]], cls: str = "") -> str:
    head = (
        "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead>"
        if header
        else ""
    )
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _td(value: Any, num: bool = False) -> str:
    if isinstance(value, (list, tuple)):
        return '<td class="num list">' + ", ".join(_num(v, 4) for v in value) + "</td>"
    return f'<td class="num">{_num(value)}</td>' if num else f"<td>{_esc(value)}</td>"


class _Page:
    """Collects chart JSON so every chart is drawn by one script at the end of the page."""

    def __init__(self) -> None:
        self.charts: list[tuple[str, str]] = []

    def chart(self, fig) -> str:
        if fig is None:
            return ""
        cid = f"chart{len(self.charts) + 1}"
        self.charts.append((cid, charts.figure_json(fig)))
        return f'<div class="chart" id="{cid}"></div>'

    def script(self) -> str:
        items = ",\n".join(f'["{cid}", {spec}]' for cid, spec in self.charts)
        payload = f"[{items}]"
        # JSON inside <script>: never close the element early, and keep addresses escaped.
        payload = payload.replace("</", "<\\/")
        payload = _URL.sub(r"\1\\/\\/", payload)
        return (
            "<script>\n(function () {\n"
            "  var specs = " + payload + ";\n"
            "  var config = {displaylogo: false, responsive: true, showLink: false,\n"
            "                showSendToCloud: false, showEditInChartStudio: false,\n"
            "                plotlyServerURL: '',\n"
            "                toImageButtonOptions: {format: 'png', scale: 2}};\n"
            "  specs.forEach(function (s) {\n"
            "    var el = document.getElementById(s[0]);\n"
            "    if (!window.Plotly) { el.textContent = 'plotly.js did not load; charts are "
            "unavailable.'; return; }\n"
            "    Plotly.newPlot(el, s[1].data, s[1].layout, config);\n"
            "  });\n"
            "})();\n</script>"
        )


# ----------------------------------------------------------------------------- sections
def _analysed(documents: dict[str, dict]) -> str:
    first = next(iter(documents.values()))
    inp = first.get("input") or {}
    model = inp.get("model") or {}
    data = inp.get("data") or {}
    vers = inp.get("versions") or {}
    sha = model.get("sha256") or ""
    dsha = data.get("sha256") or ""
    rows = [
        ("model file", model.get("path")),
        ("model format", model.get("format")),
        ("model SHA-256", sha[:16] + "…" if sha else None),
        (
            "parameters",
            f"{model.get('num_params')} in the model, {model.get('params_selected')} analysed",
        ),
        ("data", data.get("source")),
        ("data SHA-256", dsha[:16] + "…" if dsha else None),
        (
            "samples",
            f"{data.get('num_samples')} (batches of {data.get('batch_size')})"
            + (
                f", subset seed {data.get('subset_seed')}"
                if data.get("subset_seed") is not None
                else ""
            ),
        ),
        (
            "loss",
            f"{inp.get('loss')} ({inp.get('reduction')})"
            + (f", weight decay {inp.get('weight_decay')}" if inp.get("weight_decay") else ""),
        ),
        ("dtype, device", f"{inp.get('dtype')}, {inp.get('device')}"),
        (
            "mode",
            (
                "train mode (BatchNorm batch statistics: every number depends on the batch "
                "composition and holds for this batching only)"
                if inp.get("batch_dependent")
                else "train mode (BatchNorm batch statistics)"
                if inp.get("train_mode")
                else "eval mode"
            ),
        ),
        ("seed", inp.get("seed")),
        (
            "versions",
            ", ".join(f"{k} {v}" for k, v in vers.items())
            + f", curvscope {first.get('curvscope_version')}",
        ),
    ]
    table = _table(None, ([_td(k), _td(v)] for k, v in rows if v is not None), "kv")
    docs = []
    for name, doc in documents.items():
        t = (doc.get("timings") or {}).get("total_s")
        c = doc.get("counts") or {}
        docs.append(
            [
                _td(name),
                _td(f"{name}.json"),
                _td(None if t is None else round(t, 2), True),
                _td(c.get("matvecs"), True),
                _td(c.get("data_passes"), True),
            ]
        )
    doc_table = _table(
        ["part", "result document", "seconds", "matrix-vector products", "data passes"], docs
    )
    return (
        '<section id="analysed"><h2>What was analysed</h2>'
        '<p class="read">Every number below comes from the result documents listed here, '
        "written next to this page.</p>"
        + table
        + "<h3>Result documents</h3>"
        + doc_table
        + "</section>"
    )


def _spectrum(doc: dict, page: _Page) -> str:
    spectra = (doc.get("results") or {}).get("spectra") or []
    rows = []
    for s in spectra:
        vals = s.get("eigenvalues") or []
        res = [r for r in (s.get("residual_norms") or []) if r is not None]
        conv = list(s.get("converged") or [])
        n_ok = sum(bool(c) for c in conv)
        cls = "pass" if n_ok == len(conv) else "fail"
        rows.append(
            [
                _td(s.get("matrix")),
                _td(s.get("block")),
                _td(s.get("which")),
                '<td class="num list">' + ", ".join(_num(v, 5) for v in vals) + "</td>",
                _td(max(res) if res else None, True),
                f'<td class="{cls}">{n_ok}/{len(conv)}</td>',
                _td(s.get("num_matvecs"), True),
            ]
        )
    table = _table(
        ["matrix", "block", "end", "eigenvalues", "largest residual", "converged", "products"],
        rows,
    )
    return page.chart(charts.spectrum_chart(doc)) + table


def _density(doc: dict, page: _Page) -> str:
    res = doc.get("results") or {}
    out = page.chart(charts.density_chart(doc)) if res.get("densities") else ""
    traces = res.get("traces") or []
    if traces:
        out += "<h3>Trace estimates</h3>" + _table(
            ["matrix", "block", "estimator", "estimate", "std. error", "products"],
            (
                [
                    _td(t.get("matrix")),
                    _td(t.get("block")),
                    _td(t.get("estimator")),
                    _td(t.get("estimate"), True),
                    _td(t.get("stderr"), True),
                    _td(t.get("num_matvecs"), True),
                ]
                for t in traces
            ),
        )
    return out


def _check(doc: dict, page: _Page) -> str:
    checks = (doc.get("results") or {}).get("checks") or []
    rows = [
        [
            _td(c.get("name")),
            f"<td>{_verdict(c.get('passed'), str(c.get('name')))}</td>",
            _td(c.get("reason")),
        ]
        for c in checks
    ]
    out = _table(["check", "verdict", "reason"], rows)
    for c in checks:
        layers = c.get("layers")
        if layers:
            out += f"<h3>{_esc(c.get('name'))}: per layer</h3>" + _table(
                [
                    "layer",
                    "activation",
                    "condition holds",
                    "as printed in the paper",
                    "certified PSD",
                    "smallest eigenvalue",
                    "residual",
                ],
                (
                    [
                        _td(x.get("name")),
                        _td(x.get("activation")),
                        _td(x.get("fraction_satisfied"), True),
                        _td(x.get("fraction_satisfied_as_printed"), True),
                        f"<td>{'yes' if x.get('certified') else 'no'}</td>",
                        _td(x.get("min_eigenvalue"), True),
                        _td(x.get("min_eigenvalue_residual"), True),
                    ]
                    for x in layers
                ),
            )
    out += page.chart(charts.taylor_chart(doc))
    return out


def _compare(doc: dict, page: _Page) -> str:
    rows = (doc.get("results") or {}).get("comparisons") or []
    table = _table(
        [
            "block",
            "matrix",
            "rel. Frobenius error",
            "± std. error",
            "method",
            "Chen metric",
            "subspace overlap",
            "smallest eigenvalue",
        ],
        (
            [
                _td(r.get("block")),
                _td(r.get("matrix")),
                _td(r.get("rel_frobenius"), True),
                _td(r.get("rel_frobenius_stderr"), True),
                _td(r.get("method")),
                _td(r.get("chen_metric"), True),
                _td(r.get("subspace_overlap"), True),
                _td(r.get("min_eigenvalue"), True),
            ]
            for r in rows
        ),
    )
    return page.chart(charts.compare_heatmap(doc)) + table


def _surface(doc: dict, page: _Page) -> str:
    surf = (doc.get("results") or {}).get("surface") or {}
    d = surf.get("directions") or {}
    parts = [
        f'<p class="read"><b>Directions:</b> {_esc(d.get("description"))}.'
        + (f" {_esc(d.get('bias_bn'))}." if d.get("bias_bn") else "")
        + "</p>"
    ]
    if len(surf.get("axes", [])) == 2:
        parts.append(
            '<div class="grid2">'
            + page.chart(charts.surface_contour(doc))
            + page.chart(charts.surface_3d(doc))
            + "</div>"
        )
    parts.append(page.chart(charts.surface_lines(doc)))
    rows = [
        ("loss at the weights", surf.get("center_loss")),
        ("g · d", ", ".join(_num(v) for v in surf.get("gradient_projections") or [])),
        ("d · H d", ", ".join(_num(r[i]) for i, r in enumerate(surf.get("curvatures") or []))),
        (
            "grid",
            " × ".join(str(len(a)) for a in surf.get("axes", []))
            + f" points, evaluated by {surf.get('evaluation')}",
        ),
        ("non-finite points", surf.get("num_non_finite")),
    ]
    parts.append(
        _table(
            None, ([_td(k), _td(v if not isinstance(v, float) else _num(v))] for k, v in rows), "kv"
        )
    )
    return "".join(parts)


def _solve(doc: dict, page: _Page) -> str:
    solves = (doc.get("results") or {}).get("solves") or []
    out = (
        '<div class="grid2">'
        + page.chart(charts.solver_chart(doc, "loss"))
        + page.chart(charts.solver_chart(doc, "grad_norm"))
        + "</div>"
    )
    out += _table(
        ["solver", "stopped", "final loss", "final gradient norm", "products", "seconds"],
        (
            [
                _td(s.get("solver")),
                _td(s.get("stop_reason")),
                _td(s.get("final_loss"), True),
                _td(s.get("final_grad_norm"), True),
                _td(s.get("num_matvecs"), True),
                _td(s.get("wall_time_s"), True),
            ]
            for s in solves
        ),
    )
    for s in solves:
        findings = s.get("findings") or []
        if findings:
            out += (
                f"<h3>{_esc(s.get('solver'))}: findings</h3><ul class='notes'>"
                + "".join(f"<li>{_esc(_finding_text(f))}</li>" for f in findings)
                + "</ul>"
            )
    return out


def _track(doc: dict, page: _Page) -> str:
    res = doc.get("results") or {}
    rows = res.get("track") or []
    settings = doc.get("settings") or {}
    matrices = list(settings.get("matrix") or [])
    out = page.chart(charts.track_chart(doc)) + page.chart(charts.track_loss_chart(doc))
    trace = charts.track_trace_chart(doc)
    layers = charts.track_layers_chart(doc)
    if trace is not None and layers is not None:
        out += '<div class="grid2">' + page.chart(trace) + page.chart(layers) + "</div>"
    else:
        out += page.chart(trace) + page.chart(layers)
    header = ["step", "checkpoint", "loss", "gradient norm"]
    for m in matrices:
        header += [f"{m} top", "error bound"]
        if settings.get("bottom"):
            header.append(f"{m} bottom")
        if settings.get("trace"):
            header += [f"{m} trace", "std. error"]
    header.append("products")
    body = []
    for r in rows:
        ckpt = r.get("checkpoint")
        cells = [_td(r.get("step") if r.get("step") is not None else f"#{r.get('index')}"),
                 _td(ckpt.replace("\\", "/").rsplit("/", 1)[-1] if ckpt else "(in training)"),
                 _td(r.get("loss"), True), _td(r.get("grad_norm"), True)]
        for m in matrices:
            ends = (r.get("eigenvalues") or {}).get(m) or {}
            bounds = (r.get("error_bounds") or {}).get(m) or {}
            top = ends.get("top") or []
            cells += [_td(top[0] if top else None, True),
                      _td((bounds.get("top") or [None])[0], True)]
            if settings.get("bottom"):
                bot = ends.get("bottom") or []
                cells.append(_td(bot[0] if bot else None, True))
            if settings.get("trace"):
                t = (r.get("trace") or {}).get(m) or {}
                cells += [_td(t.get("estimate"), True), _td(t.get("stderr"), True)]
        cells.append(_td(r.get("num_matvecs"), True))
        body.append(cells)
    out += _table(header, body)
    lines = []
    stab = res.get("stability")
    if stab:
        lines.append(
            f"Stability threshold 2(1+β)/η = {_num(stab.get('threshold'))} for step size "
            f"η = {_num(stab.get('lr'))} and momentum β = {_num(stab.get('momentum'))}."
        )
    ws = res.get("warm_start") or {}
    if ws.get("matvecs_cold"):
        lines.append(
            f"Warm start: {ws.get('matvecs')} Lanczos products against "
            f"{ws.get('matvecs_cold')} from random starts "
            f"({_num(100 * (ws.get('saving') or 0.0), 3)}% saved; largest eigenvalue "
            f"difference {_num(ws.get('max_eigenvalue_difference'), 2)})."
        )
    elif ws:
        lines.append(f"Lanczos products: {ws.get('matvecs')} ({_esc(ws.get('start'))}).")
    if lines:
        out += "<ul class='notes'>" + "".join(f"<li>{_esc(x)}</li>" for x in lines) + "</ul>"
    return out


def _classes(doc: dict, page: _Page) -> str:
    r = (doc.get("results") or {}).get("classes") or {}
    C = int(r.get("num_classes") or 0)
    g = r.get("ggn") or {}
    ev = g.get("eigenvalues") or []
    bounds = g.get("error_bounds") or g.get("residual_norms") or []
    conv = g.get("converged") or []
    cls = (r.get("class_eigenvalues") or [])[:C]
    crs = r.get("cross_eigenvalues") or []
    out = page.chart(charts.classes_chart(doc))
    rows = []
    for i in range(max(len(ev), len(cls), C + len(crs) if crs else 0)):
        ok = conv[i] if i < len(conv) else None
        rows.append(
            [
                _td(i + 1, True),
                _td(ev[i] if i < len(ev) else None, True),
                _td(bounds[i] if i < len(bounds) else None, True),
                "<td></td>" if ok is None else
                f'<td class="{"pass" if ok else "fail"}">{"yes" if ok else "no"}</td>',
                _td(cls[i], True) if i < len(cls) else "<td></td>",
                _td(crs[i - C], True) if 0 <= i - C < len(crs) else "<td></td>",
            ]
        )
    out += "<h3>Eigenvalues: the GGN's against the parts'</h3>" + _table(
        ["#", "GGN eigenvalue", "error bound", "converged", "class means", "cross-class"], rows
    )
    angles = r.get("angles") or []
    if angles:
        out += "<h3>Principal angles between each part's range and the GGN eigenvectors</h3>"
        out += _table(
            ["part", "GGN pairs", "dimension", "mean cos²", "cosines", "± bound"],
            (
                [
                    _td(a.get("part")),
                    _td("{}..{}".format(*(a.get("ggn_pairs") or ["?", "?"]))),
                    _td(a.get("dimension"), True),
                    _td(a.get("mean_squared_cosine"), True),
                    _td(a.get("cosines") or []),
                    _td(a.get("error_bound"), True),
                ]
                for a in angles
            ),
        )
    facts = [
        ("classes", C),
        ("samples per class", ", ".join(str(c) for c in r.get("class_counts") or [])),
        ("tr G_class, tr G_cross, tr G_self",
         ", ".join(_num(r.get(k)) for k in ("class_trace", "cross_trace", "self_trace"))),
        ("next GGN eigenvalue (for the gap)", _num(g.get("next_eigenvalue"))),
        ("GGN products", g.get("num_matvecs")),
    ]
    out += _table(None, ([_td(k), _td(v)] for k, v in facts), "kv")
    return out


def _finding_text(f: Any) -> str:
    if isinstance(f, str):
        return f
    if isinstance(f, dict) and f.get("text"):
        return f"{f['text']}" + (f" ({f['rule']})" if f.get("rule") else "")
    return json.dumps(f)


_RENDER = {
    "spectrum": _spectrum,
    "density": _density,
    "check": _check,
    "compare": _compare,
    "surface": _surface,
    "solve": _solve,
    "classes": _classes,
    "track": _track,
}


def _section(key: str, doc: dict, page: _Page) -> str:
    command = doc.get("command", key)
    body = _RENDER[command](doc, page)
    notes = doc.get("notes") or []
    notes_html = (
        "<h3>Notes</h3><ul class='notes'>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>"
        if notes
        else ""
    )
    title = TITLES[command] + ("" if key == command else f" ({_esc(key)})")
    return (
        f'<section id="{_esc(key)}"><h2>{title}</h2>'
        f'<p class="read">{_esc(HOW_TO_READ[command])}</p>{body}{notes_html}</section>'
    )


def _skipped(skipped: list[dict[str, str]]) -> str:
    if not skipped:
        return ""
    rows = [[_td(s.get("part")), _td(s.get("reason"))] for s in skipped]
    return (
        '<section id="skipped"><h2>What was skipped, and why</h2>'
        '<p class="read">Parts of the analysis left out: not supported for this model or by '
        "this version of curvscope, over the time budget or the memory limit, or interrupted "
        "(each reason says which, and what would let it run). Nothing on this page stands in "
        "for them.</p>"
        + _table(["part", "reason"], rows)
        + "</section>"
    )


def _plotly_tag(plotly_js: str) -> tuple[str, str]:
    if plotly_js == "inline":
        from plotly.offline import get_plotlyjs

        js = _URL.sub(r"\1\\/\\/", get_plotlyjs())
        return f'<script type="text/javascript">{js}</script>', ""
    if _URL.search(plotly_js) or plotly_js.startswith("//"):
        from .._errors import OptionError, arg

        raise OptionError(
            f"{arg('plotly_js')} {plotly_js!r} is a network address; the report must open offline: "
            "give 'inline' or a relative path to a local plotly.min.js."
        )
    return f'<script src="{html.escape(plotly_js, quote=True)}"></script>', " file: 'self'"


def plotly_js_text() -> str:
    """Plotly's JavaScript with its web addresses neutralised, for a shared ``plotly.min.js``."""
    from plotly.offline import get_plotlyjs

    return _URL.sub(r"\1\\/\\/", get_plotlyjs())


def render_report(
    documents: dict[str, dict[str, Any]],
    *,
    plotly_js: str = "inline",
    skipped: list[dict[str, str]] | None = None,
    title: str | None = None,
) -> str:
    """Render result documents to one self-contained HTML page.

    Args:
        documents: result documents by name (``spectrum``, ``density``, ``check``,
            ``compare``, ``surface``, ``solve``; extra names such as ``surface-random`` are
            rendered by their ``command``).
        plotly_js: ``"inline"`` (plotly's JavaScript in the page) or a relative path to a
            ``plotly.min.js`` next to the page (for many reports sharing one copy).
        skipped: ``{"part", "reason"}`` entries for what was not run, shown on the page.
        title: page title (default: from the model file).

    Returns:
        The HTML text. It contains no ``http://`` or ``https://``.

    Raises:
        OptionError: for an empty ``documents`` or a network address as ``plotly_js``.
    """
    from .._errors import OptionError

    if not documents:
        raise OptionError("there are no result documents to render into a report.")
    page = _Page()
    first = next(iter(documents.values()))
    model_path = ((first.get("input") or {}).get("model") or {}).get("path") or "model"
    title = title or f"curvscope report: {model_path}"
    known = [(k, d) for k, d in documents.items() if d.get("command") in _RENDER]
    known.sort(key=lambda kd: SECTION_ORDER.index(kd[1]["command"]))
    sections = [_section(k, d, page) for k, d in known]
    nav = "".join(
        f'<a href="#{_esc(k)}">{_esc(NAV[d["command"]] if k == d["command"] else k)}</a>'
        for k, d in known
    )
    nav = (
        '<a href="#analysed">Input</a>'
        + nav
        + ('<a href="#skipped">Skipped</a>' if skipped else "")
    )
    js_tag, csp_extra = _plotly_tag(plotly_js)
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP.format(extra=csp_extra)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style>{js_tag}</head><body>"
        f'<header><div class="wrap"><h1>{_esc(title)}</h1>'
        f"<p>Generated {created} by curvscope {_esc(first.get('curvscope_version'))} from "
        f"{len(documents)} result document(s). Works offline.</p><nav>{nav}</nav></div></header>"
        "<main>"
        + _analysed(documents)
        + "".join(sections)
        + _skipped(skipped or [])
        + "</main><footer>curvscope: a curvature microscope for trained PyTorch models. "
        "This page makes no network request.</footer>" + page.script() + "</body></html>\n"
    )
    leftover = _URL.search(body)
    if leftover:  # a bug, not a user mistake: every insertion point above escapes addresses
        raise RuntimeError(
            f"report would contain an address near {body[leftover.start() :][:60]!r}"
        )
    return body
