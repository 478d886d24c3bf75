r"""Two result documents of one command side by side: every number, its change, a verdict.

:func:`diff_documents` pairs the numbers of two documents by what they are (matrix, block, end
and index of an eigenvalue; matrix, block and estimator of a trace; step of a track row; grid
point of a surface...), and for each pair computes the difference ``b - a`` and a combined
uncertainty

.. math::

    u = \sqrt{\textstyle\sum_k u_{a,k}^2 + \sum_k u_{b,k}^2},

the quadrature sum of every uncertainty the two documents carry for that number: the error
bound of an eigenvalue (its residual where no bound was recorded), the standard deviation of
its subset spread (``--repeats``), the standard error of a trace or of a relative Frobenius
error. A number that carries none (a loss, a surface point, a gradient norm) gets the
round-off of its dtype, :data:`ROUNDOFF_REL` times its magnitude.

The verdict is ``"same"`` when :math:`|b - a| \le` :data:`COVERAGE` :math:`\cdot u`, else
``"different"``; a number present in one document only is ``"only in a"`` or
``"only in b"``. With three combined standard uncertainties, two estimates of one quantity are
called different by chance about 0.3% of the time (Gaussian errors); for error bounds, which
are worst-case, :math:`3\sqrt{e_a^2 + e_b^2} \ge e_a + e_b`, so two eigenvalues whose
certified intervals overlap are never called different.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .._errors import OptionError

__all__ = [
    "COVERAGE",
    "DIFF_COMMANDS",
    "ROUNDOFF_REL",
    "DiffEntry",
    "DiffResult",
    "diff_documents",
]

COVERAGE = 3.0
"""How many combined uncertainties a difference may reach and still be called the same."""

ROUNDOFF_REL = {"float32": 10 * 2.0**-23, "float64": 10 * 2.0**-52}
"""Relative uncertainty of numbers without one, by the documents' dtype: ten units of
round-off (sums over thousands of samples in float32 agree to a few 1e-7, measured on the
digits examples between runs with different batch sizes)."""

DIFF_COMMANDS = (
    "spectrum", "density", "check", "compare", "surface", "solve", "track", "classes"
)
"""Commands whose documents :func:`diff_documents` compares."""


@dataclass(frozen=True)
class DiffEntry:
    """One number of both documents.

    Attributes:
        section: where it lives (``spectra``, ``traces``, ``track``, ``surface``...).
        key: what it is, in words (``hessian [all] top #1``).
        a: its value in the first document (``None``: absent or non-finite).
        b: its value in the second.
        difference: ``b - a``.
        uncertainty: the combined uncertainty :math:`u` (quadrature sum of both documents').
        basis: what :math:`u` is made of (``error bound``, ``stderr``, ``round-off``...).
        verdict: ``same``, ``different``, ``only in a`` or ``only in b``.
    """

    section: str
    key: str
    a: Any
    b: Any
    difference: float | None
    uncertainty: float | None
    basis: str
    verdict: str


@dataclass(frozen=True)
class DiffResult:
    """The comparison of two documents of one command.

    Attributes:
        command: the command both documents come from.
        entries: one per number, in document order.
        input_differences: ``{"field", "a", "b"}`` for what was analysed or set differently
            (model or data hash, dtype, samples, settings): context for the verdicts.
        notes: sentences for the reader.
    """

    command: str
    entries: list[DiffEntry]
    input_differences: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> list[DiffEntry]:
        """Entries that are not the same within their uncertainty."""
        return [e for e in self.entries if e.verdict != "same"]

    @property
    def counts(self) -> dict[str, int]:
        """How many entries got each verdict."""
        out = {"same": 0, "different": 0, "only in a": 0, "only in b": 0}
        for e in self.entries:
            out[e.verdict] += 1
        return out

    def to_results(self) -> dict[str, Any]:
        """The ``results`` part of a ``diff`` document."""
        return {
            "command": self.command,
            "coverage": COVERAGE,
            "counts": self.counts,
            "input_differences": self.input_differences,
            "entries": self.entries,
        }


# --------------------------------------------------------------------------- collection
Item = tuple[str, str, Any, list[tuple[str, float]]]
"""(section, key, value, [(basis, uncertainty), ...]) of one number of one document."""

SCALE = "scale"
"""An entry ``(SCALE, s)`` among the uncertainties is no uncertainty: it says that the
number's round-off is relative to ``s`` (the largest of its family, e.g. of a surface's
loss grid or of ``d_i . H d_j``) rather than to its own magnitude, for numbers that come
out of cancellation and should be near zero."""


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x) if math.isfinite(float(x)) else None
    return None


def _at(values: Any, i: int) -> Any:
    if isinstance(values, list) and i < len(values):
        return values[i]
    return None


def _eigen_uncertainty(bounds: Any, residuals: Any, spread: Any, i: int) -> list:
    out = []
    b = _num(_at(bounds, i))
    if b is not None:
        out.append(("error bound", b))
    else:
        r = _num(_at(residuals, i))
        if r is not None:
            out.append(("residual", r))
    if isinstance(spread, dict):
        s = _num(_at(spread.get("std"), i))
        if s is not None:
            out.append(("subset std", s))
    return out


def _spectrum(doc: dict) -> Iterator[Item]:
    for s in (doc.get("results") or {}).get("spectra") or []:
        head = f"{s.get('matrix')} [{s.get('block')}] {s.get('which')}"
        for i, v in enumerate(s.get("eigenvalues") or []):
            yield (
                "spectra",
                f"{head} #{i + 1}",
                v,
                _eigen_uncertainty(
                    s.get("error_bounds"), s.get("residual_norms"), s.get("spread"), i
                ),
            )


def _density(doc: dict) -> Iterator[Item]:
    res = doc.get("results") or {}
    for t in res.get("traces") or []:
        u = _num(t.get("stderr"))
        yield (
            "traces",
            f"{t.get('matrix')} [{t.get('block')}] trace, {t.get('estimator')}",
            t.get("estimate"),
            [("stderr", u)] if u else [],
        )
    for d in res.get("densities") or []:
        u = _num(d.get("slq_trace_stderr"))
        yield (
            "densities",
            f"{d.get('matrix')} [{d.get('block')}] SLQ trace",
            d.get("slq_trace"),
            [("stderr", u)] if u else [],
        )


def _tol_of(doc: dict) -> float:
    tol = _num((doc.get("settings") or {}).get("tol"))
    return tol if tol else 1e-4


def _norm(values: Any) -> float:
    """The largest magnitude among numbers (0 for none)."""
    nums = [abs(x) for x in (_num(v) for v in (values or [])) if x is not None]
    return max(nums, default=0.0)


def _compare(doc: dict) -> Iterator[Item]:
    tol = _tol_of(doc)
    for r in (doc.get("results") or {}).get("comparisons") or []:
        head = f"{r.get('matrix')} vs hessian [{r.get('block')}]"
        u = _num(r.get("rel_frobenius_stderr"))
        yield (
            "comparisons",
            f"{head} rel. Frobenius error",
            r.get("rel_frobenius"),
            [("stderr", u)] if u else [],
        )
        if r.get("chen_metric") is not None:
            yield ("comparisons", f"{head} Chen metric", r.get("chen_metric"), [])
        # Lanczos converges to a residual of tol x ||A||, ||A|| the largest |eigenvalue|
        own = tol * max(_norm(r.get("top_eigenvalues")), abs(_num(r.get("min_eigenvalue")) or 0))
        for name, bound in (
            ("top_eigenvalues", own),
            ("hessian_top_eigenvalues", tol * _norm(r.get("hessian_top_eigenvalues"))),
        ):
            for i, v in enumerate(r.get(name) or []):
                yield (
                    "comparisons",
                    f"{head} {name.replace('_', ' ')} #{i + 1}",
                    v,
                    [("tol x ||A||", bound)],
                )
        if r.get("min_eigenvalue") is not None:
            yield (
                "comparisons",
                f"{head} smallest eigenvalue",
                r.get("min_eigenvalue"),
                [("tol x ||A||", own)],
            )


def _surface(doc: dict) -> Iterator[Item]:
    surf = (doc.get("results") or {}).get("surface") or {}
    tol = _tol_of(doc)
    loss = surf.get("loss")
    flat = list(_flat(loss)) if isinstance(loss, list) else []
    loss_scale = [(SCALE, _norm([v for _, v in flat] + [surf.get("center_loss")]))]
    if "center_loss" in surf:
        yield ("surface", "loss at the weights", surf.get("center_loss"), loss_scale)
    norm = _norm(surf.get("eigenvalues"))
    for i, v in enumerate(surf.get("eigenvalues") or []):
        yield ("surface", f"direction eigenvalue #{i + 1}", v, [("tol x ||A||", tol * norm)])
    projections = surf.get("gradient_projections") or []
    for i, v in enumerate(projections):
        yield ("surface", f"g . d{i + 1}", v, [(SCALE, _norm(projections))])
    curv = [
        c for row in surf.get("curvatures") or [] for c in (row if isinstance(row, list) else [row])
    ]
    for i, row in enumerate(surf.get("curvatures") or []):
        for j, v in enumerate(row if isinstance(row, list) else [row]):
            yield ("surface", f"d{i + 1} . H d{j + 1}", v, [(SCALE, _norm(curv))])
    for idx, v in flat:
        yield ("surface", f"loss{idx}", v, loss_scale)


def _flat(values: list, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for i, v in enumerate(values):
        if isinstance(v, list):
            yield from _flat(v, f"{prefix}[{i}]")
        else:
            yield f"{prefix}[{i}]", v


def _check(doc: dict) -> Iterator[Item]:
    for c in (doc.get("results") or {}).get("checks") or []:
        name = c.get("name")
        yield ("checks", f"{name} passed", c.get("passed"), [])
        for layer in c.get("layers") or []:
            head = f"{name} [{layer.get('name')}]"
            yield ("checks", f"{head} fraction satisfied", layer.get("fraction_satisfied"), [])
            yield ("checks", f"{head} certified", layer.get("certified"), [])
            r = _num(layer.get("min_eigenvalue_residual"))
            yield (
                "checks",
                f"{head} smallest eigenvalue",
                layer.get("min_eigenvalue"),
                [("residual", r)] if r is not None else [],
            )


def _solve(doc: dict) -> Iterator[Item]:
    for s in (doc.get("results") or {}).get("solves") or []:
        name = s.get("solver")
        yield ("solves", f"{name} final loss", s.get("final_loss"), [])
        yield ("solves", f"{name} final gradient norm", s.get("final_grad_norm"), [])


def _track(doc: dict) -> Iterator[Item]:
    rows = (doc.get("results") or {}).get("track") or []
    by_step = all(r.get("step") is not None for r in rows)
    for r in rows:
        head = f"step {r.get('step')}" if by_step else f"row {r.get('index')}"
        yield ("track", f"{head} loss", r.get("loss"), [])
        yield ("track", f"{head} gradient norm", r.get("grad_norm"), [])
        bounds = r.get("error_bounds") or {}
        resid = r.get("residuals") or {}
        for matrix, ends in (r.get("eigenvalues") or {}).items():
            for which, values in ends.items():
                for i, v in enumerate(values or []):
                    yield (
                        "track",
                        f"{head} {matrix} {which} #{i + 1}",
                        v,
                        _eigen_uncertainty(
                            (bounds.get(matrix) or {}).get(which),
                            (resid.get(matrix) or {}).get(which),
                            None,
                            i,
                        ),
                    )
        for matrix, t in (r.get("trace") or {}).items():
            u = _num(t.get("stderr"))
            yield (
                "track",
                f"{head} {matrix} trace ({t.get('estimator')})",
                t.get("estimate"),
                [("stderr", u)] if u else [],
            )
        for matrix, layers in (r.get("per_layer_top") or {}).items():
            for block, e in layers.items():
                b = _num(e.get("error_bound"))
                yield (
                    "track",
                    f"{head} {matrix} [{block}] top",
                    e.get("eigenvalue"),
                    [("error bound", b)] if b is not None else [],
                )


def _classes(doc: dict) -> Iterator[Item]:
    """A classes document's numbers, each with what bounds it.

    The GGN's eigenvalues with their bounds, the parts' exact eigenvalues and traces to
    round-off of the largest of their family (small eigenvalues of a Gram matrix are exact
    only to eps times its largest), and each angle's cosines within its error bound.
    """
    r = (doc.get("results") or {}).get("classes") or {}
    yield ("classes", "classes", r.get("num_classes"), [])
    for c, n in enumerate(r.get("class_counts") or []):
        yield ("classes", f"samples of class {c}", n, [])
    g = r.get("ggn") or {}
    for i, v in enumerate(g.get("eigenvalues") or []):
        yield (
            "classes",
            f"ggn #{i + 1}",
            v,
            _eigen_uncertainty(g.get("error_bounds"), g.get("residual_norms"), None, i),
        )
    for part in ("class", "cross", "means", "self"):
        values = r.get(f"{part}_eigenvalues") or []
        for i, v in enumerate(values):
            yield ("classes", f"{part} part #{i + 1}", v, [(SCALE, _norm(values))])
    traces = [r.get(f"{p}_trace") for p in ("class", "cross", "self")]
    for part in ("class", "cross", "self"):
        if f"{part}_trace" in r:
            yield ("classes", f"tr G_{part}", r.get(f"{part}_trace"), [(SCALE, _norm(traces))])
    for a in r.get("angles") or []:
        pairs = "..".join(str(p) for p in a.get("ggn_pairs") or [])
        head = f"angles {a.get('part')} vs ggn {pairs}"
        e = _num(a.get("error_bound"))
        bound = [("angle bound", e)] if e is not None else []
        yield ("classes", f"{head} dimension", a.get("dimension"), [])
        for i, c in enumerate(a.get("cosines") or []):
            yield ("classes", f"{head} cos #{i + 1}", c, bound)
        # every cosine within e: each cos^2 within 2e + e^2, and so is their mean
        sq = [("angle bound", min(1.0, 2 * e + e * e))] if e is not None else []
        yield ("classes", f"{head} mean cos^2", a.get("mean_squared_cosine"), sq)


_COLLECT = {
    "spectrum": _spectrum,
    "density": _density,
    "check": _check,
    "compare": _compare,
    "surface": _surface,
    "solve": _solve,
    "track": _track,
    "classes": _classes,
}


# --------------------------------------------------------------------------- comparing
def _roundoff(doc_a: dict, doc_b: dict) -> float:
    dtypes = {str((d.get("input") or {}).get("dtype") or "float32") for d in (doc_a, doc_b)}
    return max(ROUNDOFF_REL.get(t, ROUNDOFF_REL["float32"]) for t in dtypes)


def _compare_pair(
    section: str, key: str, a: Any, ua: list, b: Any, ub: list, roundoff: float
) -> DiffEntry:
    if isinstance(a, bool) or isinstance(b, bool) or (a is None) != (b is None):
        same = a == b
        return DiffEntry(section, key, a, b, None, None, "exact", "same" if same else "different")
    xa, xb = _num(a), _num(b)
    if xa is None or xb is None:
        same = a == b
        return DiffEntry(section, key, a, b, None, None, "exact", "same" if same else "different")
    parts = [u for name, u in (*ua, *ub) if u is not None and name != SCALE]
    bases = list(dict.fromkeys(name for name, _ in (*ua, *ub) if name != SCALE))
    scales = [u for name, u in (*ua, *ub) if name == SCALE and u is not None]
    floor = roundoff * max(abs(xa), abs(xb), *scales)
    u = math.sqrt(sum(p * p for p in parts) + floor * floor)
    diff = xb - xa
    basis = " + ".join(bases) if bases else "round-off"
    verdict = "same" if abs(diff) <= COVERAGE * u else "different"
    return DiffEntry(section, key, a, b, diff, u, basis, verdict)


_INPUT_FIELDS = (
    ("model sha256", ("input", "model", "sha256")),
    ("model parameters", ("input", "model", "num_params")),
    ("data sha256", ("input", "data", "sha256")),
    ("samples", ("input", "data", "num_samples")),
    ("loss", ("input", "loss")),
    ("reduction", ("input", "reduction")),
    ("dtype", ("input", "dtype")),
    ("device", ("input", "device")),
    ("seed", ("input", "seed")),
    ("curvscope version", ("curvscope_version",)),
)


def _get(doc: dict, path: tuple[str, ...]) -> Any:
    cur: Any = doc
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


_SETTINGS_FROM_INPUT = {
    "batch_size": ("input", "data", "batch_size"),
    "train_mode": ("input", "train_mode"),
}
"""Settings that change what is computed in train mode, read from the ``input`` section
where a document's ``settings`` lack them (documents written by the library)."""


def _batch_dependent(doc: dict) -> bool:
    """Whether a document's numbers depend on its batching (train mode with BatchNorm).

    ``input.batch_dependent`` says so; a document without that field (written before it
    existed) counts as batch-dependent when it was computed in train mode.
    """
    inp = doc.get("input") or {}
    flag = inp.get("batch_dependent")
    return bool(inp.get("train_mode")) if flag is None else bool(flag)


def _settings(doc: dict) -> dict[str, Any]:
    out = dict(doc.get("settings") or {})
    for key, path in _SETTINGS_FROM_INPUT.items():
        if key not in out and _get(doc, path) is not None:
            out[key] = _get(doc, path)
    return out


def _input_differences(a: dict, b: dict) -> list[dict[str, Any]]:
    out = []
    for name, path in _INPUT_FIELDS:
        va, vb = _get(a, path), _get(b, path)
        if va != vb:
            out.append({"field": name, "a": va, "b": vb})
    sa, sb = _settings(a), _settings(b)
    skip = {"out", "model_path"}
    dependent = _batch_dependent(a) or _batch_dependent(b)
    for key in dict.fromkeys([*sa, *sb]):
        if key in skip:
            continue
        if sa.get(key) != sb.get(key):
            entry = {"field": f"setting {key}", "a": sa.get(key), "b": sb.get(key)}
            if key in ("batch_size", "samples") and dependent:
                entry["changes_results"] = True  # BatchNorm batch statistics
            out.append(entry)
    return out


def _batch_note(a: dict, b: dict, differences: list[dict[str, Any]]) -> str | None:
    """A sentence on train-mode batch dependence, when it bears on the comparison."""
    if not (_batch_dependent(a) or _batch_dependent(b)):
        return None
    changed = [d["field"].removeprefix("setting ") for d in differences
               if d.get("changes_results")]
    which = "both documents were" if _batch_dependent(a) and _batch_dependent(b) else (
        "one document was")
    if changed:
        return (
            f"{which} computed in train mode with BatchNorm, whose batch statistics make the "
            f"batch composition part of the function, and their {' and '.join(changed)} "
            f"{'differs' if len(changed) == 1 else 'differ'}: "
            "the two analyse different functions, so their numbers may differ beyond their "
            "uncertainties."
        )
    return (
        f"{which} computed in train mode with BatchNorm: the numbers hold for their "
        "batching only (batch size, subset and sample order)."
    )


def diff_documents(
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    names: tuple[str, str] = ("a", "b"),
) -> DiffResult:
    """Compare two result documents of the same command, number by number.

    Args:
        a: the first document (as :func:`curvscope.io.read_document` returns it).
        b: the second document.
        names: how the two are called in messages (e.g. their file names).

    Returns:
        A :class:`DiffResult`: one :class:`DiffEntry` per number with its verdict, and what
        differs in the inputs and settings.

    Raises:
        OptionError: when the documents come from different commands, or from a command
            whose documents are not compared.
    """
    ca, cb = a.get("command"), b.get("command")
    if ca != cb:
        raise OptionError(
            f"{names[0]} is a {ca} document and {names[1]} a {cb} document; diff compares two "
            "documents of the same command."
        )
    if ca not in _COLLECT:
        raise OptionError(
            f"{names[0]} and {names[1]} are {ca} documents; diff compares documents of "
            f"{', '.join(DIFF_COMMANDS)}."
        )
    collect = _COLLECT[ca]
    items_a = {(s, k): (v, u) for s, k, v, u in collect(a)}
    items_b = {(s, k): (v, u) for s, k, v, u in collect(b)}
    roundoff = _roundoff(a, b)
    entries: list[DiffEntry] = []
    for sk in dict.fromkeys([*items_a, *items_b]):
        section, key = sk
        if sk not in items_b:
            entries.append(
                DiffEntry(section, key, items_a[sk][0], None, None, None, "", "only in a")
            )
        elif sk not in items_a:
            entries.append(
                DiffEntry(section, key, None, items_b[sk][0], None, None, "", "only in b")
            )
        else:
            (va, ua), (vb, ub) = items_a[sk], items_b[sk]
            entries.append(_compare_pair(section, key, va, ua, vb, ub, roundoff))
    notes = []
    kinds = (
        {
            ((d.get("results") or {}).get("surface") or {}).get("directions", {}).get("kind")
            for d in (a, b)
        }
        if ca == "surface"
        else set()
    )
    if "eigen" in kinds:
        notes.append(
            "surface values carry no uncertainty of their directions: eigenvectors found from "
            "another start (another seed) differ by about residual/gap, which moves g . d, "
            "d . H d and the loss grid beyond round-off; compare the direction eigenvalues, "
            "or surfaces along the same saved directions (surface --directions FILE)."
        )
    if a.get("complete") is False or b.get("complete") is False:
        notes.append("one of the documents is partial (an interrupted run).")
    differences = _input_differences(a, b)
    batch_note = _batch_note(a, b, differences)
    if batch_note:
        notes.append(batch_note)
    return DiffResult(ca, entries, differences, notes)
