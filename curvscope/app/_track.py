r"""Curvature across training: ``curvscope track`` over checkpoints, and :class:`Tracker`.

Both measure the same row at each set of weights (the loss, the gradient norm, the extreme
eigenvalues of each requested matrix with residuals and error bounds, optionally a trace
with its standard error and each layer's top eigenvalue) on one fixed sample set with one
seed, and both write the same ``track`` result document, rewritten atomically after every
row so that a run killed half-way keeps its curve.

Warm start: each Lanczos run (:func:`curvscope.linalg.eigsh`) starts from the previous
row's Ritz vectors of the same matrix and block (top and bottom, summed into one start
vector), since between neighbouring checkpoints the dominant eigenvectors turn slowly. With
``compare_cold`` every solve is repeated from the usual random start and both product counts
are recorded, so the document says what the warm start saved.

Stability threshold (the ``2/eta`` line of the figures): gradient descent with step
:math:`\eta` on a quadratic with curvature :math:`\lambda` multiplies the error along that
eigenvector by :math:`1 - \eta\lambda` per step, and diverges when :math:`\lambda > 2/\eta`.
With heavy-ball momentum :math:`\beta` (``torch.optim.SGD(momentum=beta)``, dampening 0,
not Nesterov) the error obeys :math:`e_{t+1} = (1 + \beta - \eta\lambda) e_t - \beta e_{t-1}`,
whose roots stay inside the unit circle exactly when :math:`\eta\lambda < 2(1+\beta)`
(for :math:`0 \le \beta < 1`): the threshold is :math:`2(1+\beta)/\eta`. Cohen, Kaur, Li,
Kolter and Talwalkar, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
Stability", ICLR 2021, use the same :math:`(2 + 2\beta)/\eta` for Polyak momentum (their
Nesterov threshold differs and is not drawn here); ``tests/test_track.py`` checks it against
``torch.optim.SGD``. The threshold is that of full-batch gradient descent: with small mini-batches
and momentum the sharpness has been seen to settle lower (arXiv:2604.14108, "Momentum Further
Constrains Sharpness at the Edge of Stochastic Stability").
"""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import CheckpointError, CurvscopeError, OptionError, arg
from .._load import load
from ..diagnostics import overlap_from_ritz
from ..io import (
    Preconditioner,
    Run,
    active_run,
    checkpoint_step,
    file_sha256,
    load_checkpoint,
    now_iso,
    preconditioner_from_optimizer,
    read_document,
    read_preconditioner,
    rename_marker,
    run_of,
    to_jsonable,
    write_atomic,
    write_document,
)
from ..linalg import DEFAULT_TOL, LinearOperator, eigsh, hutchinson_trace, hutchpp_trace
from ..operators import build_operators, preconditioned, resolve_matrices
from ..problem import Problem
from ..report import TRACK_FIGURES, remove_stale_figures
from ._documents import document

__all__ = [
    "TRACE_ESTIMATORS",
    "TrackRun",
    "Tracker",
    "expand_checkpoints",
    "order_checkpoints",
    "preserved",
    "stability_threshold",
    "track",
]

Progress = Callable[[int, int, str], None]

TRACE_ESTIMATORS = ("hutchpp", "hutchinson")
"""Trace estimators a track can record (Hutch++ by default: O(1/m) error on decaying spectra)."""

STABILITY_SOURCE = (
    "2(1+momentum)/lr: the largest curvature along which gradient descent with heavy-ball "
    "momentum is stable on a quadratic (2/lr without momentum); Cohen et al. 2021, 'Gradient "
    "Descent on Neural Networks Typically Occurs at the Edge of Stability'."
)

_GLOB = re.compile(r"[*?\[]")

PRECONDITIONED = "preconditioned"
"""Prefix of a preconditioned matrix's name in rows (``preconditioned hessian``)."""


def stability_threshold(lr: float, momentum: float = 0.0) -> float:
    r"""The sharpness :math:`2(1+\beta)/\eta` above which gradient descent is unstable.

    For step size :math:`\eta` and heavy-ball momentum :math:`\beta` (PyTorch's SGD with
    ``momentum=beta``, no dampening, not Nesterov): the recurrence
    :math:`e_{t+1} = (1 + \beta - \eta\lambda) e_t - \beta e_{t-1}` along an eigenvector of
    curvature :math:`\lambda` is stable exactly when :math:`\eta\lambda < 2(1+\beta)`. Without
    momentum this is the :math:`2/\eta` of Cohen et al. 2021 ("edge of stability"), who state
    :math:`(2+2\beta)/\eta` for Polyak momentum.

    Raises:
        OptionError: for a step size that is not positive or a momentum outside [0, 1).
    """
    if not lr > 0 or not math.isfinite(lr):
        raise OptionError(f"{arg('lr')} must be a positive step size, not {lr}.", option="lr")
    if not 0.0 <= momentum < 1.0:
        raise OptionError(
            f"{arg('momentum')} must lie in [0, 1), not {momentum}.", option="momentum"
        )
    return 2.0 * (1.0 + momentum) / lr


# ---------------------------------------------------------------------------- checkpoints
def expand_checkpoints(specs: Sequence[str | Path]) -> list[Path]:
    """Paths from file names and globs (``runs/ckpt-*.pt``), each file once.

    Raises:
        OptionError: when a glob matches no file, or nothing is given.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    out: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        text = str(spec)
        if _GLOB.search(text) and not Path(text).exists():
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            matches = [m for m in matches if m.exists()]
            if not matches:
                raise OptionError(
                    f"the pattern {text!r} among {arg('checkpoints')} matches no file.",
                    option="checkpoints",
                    path=text,
                )
        else:
            matches = [Path(text)]
        for m in matches:
            key = m.resolve()
            if key not in seen:
                seen.add(key)
                out.append(m)
    if not out:
        raise OptionError(f"{arg('checkpoints')}: give at least one checkpoint.")
    return out


def _natural(path: Path) -> list:
    """Sort key reading digit runs as numbers (``ckpt-9`` before ``ckpt-10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


@dataclass(frozen=True)
class _Checkpoint:
    path: Path
    step: int | None
    step_source: str | None


def order_checkpoints(paths: Sequence[Path]) -> tuple[list[_Checkpoint], str, list[str]]:
    """Checkpoints in training order: ``(checkpoints, "step" or "name", notes)``.

    Each checkpoint's step is what :func:`curvscope.io.checkpoint_step` reads (the recorded
    step, else the last integer of the file name). When every step is known the order is by
    step (ties by name); when one is not, the order is by file name and a note says which
    files had no step.
    """
    items = [_Checkpoint(p, *checkpoint_step(p)) for p in paths]
    notes: list[str] = []
    missing = [c for c in items if c.step is None]
    if missing:
        shown = ", ".join(str(c.path) for c in missing[:5]) + (" ..." if len(missing) > 5 else "")
        notes.append(
            f"no training step could be read from {shown} (neither recorded in the file nor "
            "an integer in its name): the checkpoints are ordered by file name, and figures "
            "use their position as the x axis."
        )
        return sorted(items, key=lambda c: _natural(c.path)), "name", notes
    items.sort(key=lambda c: (c.step, _natural(c.path)))
    sources = sorted({str(c.step_source) for c in items})
    notes.append(f"checkpoints ordered by training step (read from {', '.join(sources)}).")
    steps = [c.step for c in items]
    if len(set(steps)) < len(steps):
        dup = sorted({s for s in steps if steps.count(s) > 1})
        notes.append(f"several checkpoints record the same step ({dup[:5]}); ties by name.")
    return items, "step", notes


def _signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _first_difference(
    ref: dict[str, tuple[int, ...]],
    other: dict[str, tuple[int, ...]],
    ref_arch: Any,
    other_arch: Any,
) -> str | None:
    """What first differs between two architectures, in words, or ``None``."""
    if ref_arch and other_arch and ref_arch != other_arch:
        for key in list(dict.fromkeys([*ref_arch, *other_arch])):
            if ref_arch.get(key) != other_arch.get(key):
                return f"its arch {key!r} is {other_arch.get(key)!r}, not {ref_arch.get(key)!r}"
    for name in list(dict.fromkeys([*ref, *other])):
        if name not in other:
            return f"it has no entry {name}"
        if name not in ref:
            return f"it has an extra entry {name}"
        if ref[name] != other[name]:
            return f"{name} has shape {list(other[name])}, not {list(ref[name])}"
    return None


def _check_architectures(
    checkpoints: Sequence[_Checkpoint], checkpoint_options: Mapping[str, Any]
) -> None:
    """Every checkpoint must hold the first one's architecture (names, shapes, ``arch``).

    Each checkpoint is loaded once here, before any analysis, so that a mismatch stops the
    run at once (the analysis then loads each again: twice the reading, none of it wasted on
    a run that cannot finish).

    Raises:
        CheckpointError: naming the first checkpoint that differs and how.
    """
    ref = None
    for c in checkpoints:
        loaded = load_checkpoint(c.path, **checkpoint_options)
        sig = (_signature(loaded.model), loaded.arch)
        del loaded
        if ref is None:
            ref = (c.path, *sig)
            continue
        diff = _first_difference(ref[1], sig[0], ref[2], sig[1])
        if diff is not None:
            raise CheckpointError(
                f"{c.path} does not hold the architecture of {ref[0]} ({diff}); one track "
                "follows one model, so give checkpoints of the same architecture.",
                path=str(c.path),
            )


# ---------------------------------------------------------------------------- measuring
@dataclass
class _Measurer:
    """Measures one row of a track; keeps the Ritz vectors for the next row's warm start."""

    matrices: list[str]
    top: int
    bottom: int
    trace: str | None
    trace_probes: int
    per_layer: bool
    tol: float
    rtol: float | None
    max_matvecs: int | None
    basis_size: int | None
    seed: int
    warm_start: bool
    compare_cold: bool
    hvp: str = "auto"
    basis_device: str | None = None
    gradient_overlap: int = 0
    vectors: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    def _generator(self) -> torch.Generator:
        # the same seed at every row: differences between rows are the weights', not the
        # random start's or the probes'
        return torch.Generator().manual_seed(self.seed)

    def _solve(
        self, op, key: tuple[str, str], top: int, bottom: int, progress: Progress | None
    ) -> tuple[list, int, int | None, float | None]:
        """Eigenpairs from a warm start; ``(results, products, cold products, max |diff|)``."""
        v0 = self.vectors.get(key) if self.warm_start else None
        if v0 is not None and v0.shape[0] != op.shape[0]:
            v0 = None
        kw = {
            "top": top,
            "bottom": bottom,
            "tol": self.tol,
            "rtol": self.rtol,
            "basis_size": self.basis_size,
            "max_matvecs": self.max_matvecs,
            "basis_device": self.basis_device,
        }
        results = eigsh(op, v0=v0, seed=self._generator(), progress=progress, **kw)
        used = results[0].num_matvecs
        cold, diff = None, None
        if self.compare_cold:
            if v0 is None:
                cold, diff = used, 0.0
            else:
                ref = eigsh(op, v0=None, seed=self._generator(), **kw)
                cold = ref[0].num_matvecs
                diff = max(
                    float((a.eigenvalues - b.eigenvalues).abs().max())
                    for a, b in zip(results, ref, strict=True)
                )
        self.vectors[key] = torch.cat([r.eigenvectors for r in results], dim=1).detach().clone()
        return results, used, cold, diff

    def measure(
        self,
        problem: Problem,
        progress: Progress | None = None,
        preconditioner: Preconditioner | None = None,
        unavailable: str | None = None,
    ) -> dict[str, Any]:
        """One row (without its step and checkpoint) at the problem's current weights.

        With a ``preconditioner`` that preconditions (not SGD's), each matrix ``A`` is
        measured twice: as it is and as ``preconditioned A`` (:math:`P^{-1/2} A P^{-1/2}`);
        the row's ``optimizer`` records the optimiser, its hyper-parameters and thresholds.
        ``unavailable`` says why a row that should have had one has none.
        """
        loss, grad = problem.loss_and_grad()
        ops = self._operators(problem, preconditioner)
        row: dict[str, Any] = {
            "loss": float(loss),
            "grad_norm": float(torch.linalg.vector_norm(grad.to(torch.float64))),
            "eigenvalues": {},
            "residuals": {},
            "error_bounds": {},
            "converged": {},
        }
        tally = _Tally(self.compare_cold)
        k = self.gradient_overlap
        top = max(self.top, k + 1) if k else self.top  # the (k+1)-th pair gives the gap
        for name, op in ops.items():
            tick = _labelled(progress, name)
            results, used, cold, diff = self._solve(op, (name, "all"), top, self.bottom, tick)
            tally.solved(used, cold, diff)
            _record_pairs(row, name, results)
            if k:
                row.setdefault("gradient_overlap", {})[name] = _gradient_overlap(
                    results, grad, k, name
                )
            if self.trace:
                row.setdefault("trace", {})[name] = trace = self._trace(op)
                tally.other += trace["num_matvecs"]
            if self.per_layer:
                layers, overlaps = self._per_layer(op, name, tally, problem, grad)
                row.setdefault("per_layer_top", {})[name] = layers
                if overlaps:
                    row.setdefault("per_layer_gradient_overlap", {})[name] = overlaps
        if preconditioner is not None:
            row["optimizer"] = preconditioner.to_dict(params=False)
        elif unavailable is not None:
            row["optimizer"] = {"preconditioned": False, "reason": unavailable}
        row["num_matvecs"] = tally.other + tally.eigen
        row["num_matvecs_eigen"] = tally.eigen
        if tally.cold is not None:
            row["num_matvecs_cold"] = tally.cold
            row["warm_cold_max_diff"] = tally.max_diff
        return row

    def _operators(
        self, problem: Problem, preconditioner: Preconditioner | None
    ) -> dict[str, Any]:
        """The row's matrices, each also preconditioned when the optimiser preconditions."""
        ops, _ = build_operators(problem, self.matrices, seed=self.seed, hvp=self.hvp)
        if preconditioner is not None and preconditioner.preconditions:
            ops = {
                **ops,
                **{
                    f"{PRECONDITIONED} {name}": preconditioned(op, preconditioner)
                    for name, op in ops.items()
                },
            }
        return ops

    def _trace(self, op: LinearOperator) -> dict[str, Any]:
        """The trace estimate of ``op`` (Hutchinson or Hutch++) for the row."""
        estimate = (hutchpp_trace if self.trace == "hutchpp" else hutchinson_trace)(
            op, num_matvecs=self.trace_probes, seed=self._generator()
        )
        return {
            "estimator": estimate.estimator,
            "estimate": float(estimate.estimate),
            "stderr": float(estimate.stderr),
            "num_matvecs": int(estimate.num_matvecs),
        }

    def _per_layer(
        self, op: LinearOperator, name: str, tally: _Tally, problem: Problem, grad: torch.Tensor
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Each layer block's top eigenpair, and its gradient overlap with ``--gradient-overlap``.

        With K, each block's gradient part in the block's top-K eigenspace (K + 1 pairs: the
        (K + 1)-th gives the gap).
        """
        layers, overlaps = {}, {}
        k = self.gradient_overlap
        for block in op.named_blocks("per-layer"):
            size = op.block(block).shape[0]
            kb = min(k, size - 1) if k else 0
            (res,), used, cold, diff = self._solve(
                op.block(block), (name, block), kb + 1 if kb else 1, 0, None
            )
            tally.solved(used, cold, diff)
            if kb:
                ov = overlap_from_ritz(
                    res.eigenvalues, res.eigenvectors, res.residual_norms, res.error_bounds,
                    res.converged, _block_part(problem, block, grad), kb,
                    matrix=name, block=block,
                )
                overlaps[block] = _overlap_record(ov)
            layers[block] = {
                "eigenvalue": float(res.eigenvalues[0]),
                "residual": float(res.residual_norms[0]),
                "error_bound": float(res.error_bounds[0]),
                "converged": bool(res.converged[0]),
            }
        return layers, overlaps


class _Tally:
    """Products a row took: Lanczos (warm), the cold comparison, the rest (traces)."""

    def __init__(self, compare_cold: bool) -> None:
        self.eigen = 0
        self.other = 0
        self.cold: int | None = 0 if compare_cold else None
        self.max_diff = 0.0

    def solved(self, used: int, cold: Any, diff: Any) -> None:
        """Count one eigen-solve (and its cold counterpart, when compared)."""
        self.eigen += used
        if self.cold is not None:
            self.cold += int(cold)
            self.max_diff = max(self.max_diff, float(diff))


def _record_pairs(row: dict[str, Any], name: str, results: list) -> None:
    """Matrix ``name``'s eigenvalues, residuals, bounds and convergence flags into ``row``."""
    for key, attr in (
        ("eigenvalues", "eigenvalues"),
        ("residuals", "residual_norms"),
        ("error_bounds", "error_bounds"),
        ("converged", "converged"),
    ):
        row[key][name] = {
            r.which: [
                bool(v) if key == "converged" else float(v)
                for v in getattr(r, attr).tolist()
            ]
            for r in results
        }


def _gradient_overlap(results: list, grad: torch.Tensor, k: int, name: str) -> dict[str, Any]:
    """The fraction of the gradient in the top-``k`` eigenspace, with its interval."""
    res = next(r for r in results if r.which == "top")
    ov = overlap_from_ritz(
        res.eigenvalues,
        res.eigenvectors,
        res.residual_norms,
        res.error_bounds,
        res.converged,
        grad,
        k,
        matrix=name,
    )
    return _overlap_record(ov)


def _overlap_record(ov) -> dict[str, Any]:
    """A row's record of one :class:`~curvscope.diagnostics.GradientOverlap`."""
    return {
        "k": ov.k,
        "fraction": ov.fraction,
        "error_bound": ov.error_bound,
        "lower": ov.lower,
        "upper": ov.upper,
        "gap": ov.gap,
    }


def _block_part(problem: Problem, block: str, grad: torch.Tensor) -> torch.Tensor:
    """The entries of the whole-model gradient that belong to module ``block``.

    In the order of the block's operator: the problem's parameter order.
    """
    slices = problem.param_slices()
    parts = set(problem.block_param_names(block))
    g = grad.reshape(-1)
    return torch.cat([g[slices[n]] for n in problem.names if n in parts])


def _labelled(progress: Progress | None, label: str) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total, what: progress(done, total, f"{what} {label}".strip())


def _warm_summary(rows: list[dict], measurer: _Measurer) -> dict[str, Any]:
    warm = sum(int(r.get("num_matvecs_eigen", 0)) for r in rows)
    colds = [r.get("num_matvecs_cold") for r in rows]
    cold = sum(int(c) for c in colds) if rows and all(c is not None for c in colds) else None
    return {
        "enabled": measurer.warm_start,
        "start": (
            "the previous row's Ritz vectors of the same matrix and block (top and bottom), "
            "summed into one start vector"
            if measurer.warm_start
            else "a random start from the seed at every row"
        ),
        "matvecs": warm,
        "matvecs_cold": cold,
        "saving": None if not cold else 1.0 - warm / cold,
        "max_eigenvalue_difference": (
            max((float(r.get("warm_cold_max_diff") or 0.0) for r in rows), default=0.0)
            if cold is not None
            else None
        ),
    }


def _stability(lr: float | None, momentum: float | None) -> dict[str, Any] | None:
    if lr is None:
        if momentum:
            raise OptionError(
                f"{arg('momentum')} needs {arg('lr')}: the threshold is 2(1+momentum)/lr.",
                option="momentum",
            )
        return None
    beta = float(momentum or 0.0)
    return {
        "lr": float(lr),
        "momentum": beta,
        "threshold": stability_threshold(lr, beta),
        "threshold_no_momentum": stability_threshold(lr, 0.0),
        "source": STABILITY_SOURCE,
    }


def _validate(
    matrices,
    top: int,
    bottom: int,
    trace: bool | str,
    trace_probes: int,
    tol: float,
    gradient_overlap: int = 0,
) -> tuple[list[str], str | None]:
    names = resolve_matrices(matrices)
    if isinstance(gradient_overlap, bool) or not isinstance(gradient_overlap, int) or (
        gradient_overlap < 0
    ):
        raise OptionError(
            f"{arg('gradient_overlap')} must be a number of eigenvectors >= 0, not "
            f"{gradient_overlap!r}.",
            option="gradient_overlap",
        )
    if top < 0 or bottom < 0 or top + bottom == 0:
        raise OptionError(
            f"{arg('top')} {top} and {arg('bottom')} {bottom}: ask for at least one eigenvalue "
            "(and none negative)."
        )
    if not tol > 0:
        raise OptionError(f"{arg('tol')} must be positive, got {tol}.")
    estimator: str | None
    if trace is True:
        estimator = "hutchpp"
    elif not trace:
        estimator = None
    else:
        estimator = str(trace)
        if estimator not in TRACE_ESTIMATORS:
            raise OptionError(
                f"{arg('trace')} {estimator!r} is not known; choose {', '.join(TRACE_ESTIMATORS)}."
            )
    if estimator == "hutchpp" and trace_probes < 3:
        raise OptionError(f"{arg('trace_probes')} must be at least 3 for Hutch++.")
    if estimator == "hutchinson" and trace_probes < 2:
        raise OptionError(f"{arg('trace_probes')} must be at least 2 for a standard error.")
    return names, estimator


def _settings(measurer: _Measurer, **extra: Any) -> dict[str, Any]:
    return {
        "matrix": list(measurer.matrices),
        "top": measurer.top,
        "bottom": measurer.bottom,
        "trace": measurer.trace,
        "trace_probes": measurer.trace_probes if measurer.trace else None,
        "per_layer": measurer.per_layer,
        "gradient_overlap": measurer.gradient_overlap or None,
        "tol": measurer.tol,
        "rtol": measurer.rtol,
        "max_matvecs": measurer.max_matvecs,
        "basis_size": measurer.basis_size,
        "seed": measurer.seed,
        "warm_start": measurer.warm_start,
        "compare_cold": measurer.compare_cold,
        **extra,
    }


def _results(
    rows: list[dict], measurer: _Measurer, stability: dict | None, **extra: Any
) -> dict[str, Any]:
    return {
        "track": rows,
        "warm_start": _warm_summary(rows, measurer),
        "stability": stability,
        **extra,
    }


# ---------------------------------------------------------------------------- resuming
RESUME_IGNORED = frozenset(
    {
        "out",
        "overwrite",
        "threads",
        "max_memory",
        "hvp_cache",
        "basis_device",
        "world_size",
        "figures",
        "checkpoints",
    }
)
"""Settings that do not change a track's rows: a resumed run may differ in them."""


def _resume_mismatch(
    doc: dict[str, Any],
    settings: Mapping[str, Any],
    ordered: Sequence[_Checkpoint],
    problem: Problem,
) -> str | None:
    """How an unfinished track document differs from this run, in words, or ``None``."""
    old = doc.get("settings") or {}
    new = to_jsonable(dict(settings))
    for key in sorted((set(old) | set(new)) - RESUME_IGNORED):
        if old.get(key) != new.get(key):
            return f"with other settings ({key} was {old.get(key)!r}, now {new.get(key)!r})"
    info = problem.input_info or {}
    for what in ("data", "model"):
        then = ((doc.get("input") or {}).get(what) or {}).get(
            "sha256" if what == "data" else "param_names"
        )
        now = (info.get(what) or {}).get("sha256" if what == "data" else "param_names")
        if then is not None and now is not None and then != now:
            return f"of other {'data' if what == 'data' else 'parameters'}"
    rows = (doc.get("results") or {}).get("track") or []
    for i, row in enumerate(rows):
        if i >= len(ordered):
            return f"of more checkpoints ({len(rows)} rows, {len(ordered)} checkpoints now)"
        ckpt = ordered[i]
        if row.get("checkpoint") != str(ckpt.path) or row.get("sha256") != file_sha256(ckpt.path):
            return (
                f"whose checkpoint {i + 1} was {row.get('checkpoint')} (sha256 "
                f"{str(row.get('sha256'))[:12]}), not {ckpt.path}"
            )
    return None


def _resumable(
    out: str | Path | None,
    resume: bool | None,
    settings: Mapping[str, Any],
    ordered: Sequence[_Checkpoint],
    problem: Problem,
    run: Run,
) -> list[dict[str, Any]]:
    """The rows of an interrupted track in ``out`` this run takes over (``[]``: none).

    The run then takes the interrupted run's id and records ``resumed``.

    Raises:
        OptionError: with ``resume=True``, for an unfinished track that differs from this run.
    """
    if out is None or resume is False:
        return []
    path = Path(out) / "track.json"
    if not path.is_file():
        return []
    try:
        doc = read_document(path)
    except CurvscopeError:
        return []
    if doc.get("command") != "track" or doc.get("complete", True) is not False:
        return []
    reason = _resume_mismatch(doc, settings, ordered, problem)
    if reason is not None:
        if resume:
            raise OptionError(
                f"{path} is an interrupted track {reason}; rerun it with the same checkpoints "
                f"and options to resume it, give another {arg('out')}, or {arg('resume=False')} "
                "to start afresh.",
                option="out",
            )
        return []
    rows = [dict(r) for r in (doc.get("results") or {}).get("track") or []]
    if not rows:
        return []
    old = run_of(doc)
    fresh = run.id
    if old.get("id"):
        run.id = str(old["id"])
        run.started = str(old.get("started") or run.started)
        run.resumed = [dict(r) for r in old.get("resumed") or []]
    run.resumed.append({"at": now_iso(), "rows_kept": len(rows)})
    rename_marker(out, fresh, run.id)
    return rows


# ---------------------------------------------------------------------------- preconditioners
def _preconditioners(
    problem: Problem,
    ordered: Sequence[_Checkpoint],
    spec: str | Path | None,
    optimizer_key: str | None,
) -> Callable[[Path], Preconditioner | None]:
    """The row's preconditioner for a checkpoint path; every one is checked here, up front.

    Raises:
        CurvscopeError: a checkpoint without an optimiser state, or one that does not match
            the parameters (naming the checkpoint and what is missing).
    """
    if spec is None:
        if optimizer_key is not None:
            raise OptionError(
                f"{arg('optimizer_key')} needs {arg('preconditioner')} (checkpoint or a file).",
                option="optimizer_key",
            )
        return lambda path: None
    named = [(n, tuple(p.shape)) for n, p in problem.model.named_parameters()]
    own = str(spec) == "checkpoint"

    def read(path: Path) -> Preconditioner:
        return read_preconditioner(
            path,
            named,
            optimizer_key=optimizer_key,
            needed=list(problem.names),
            source="checkpoint" if own else "file",
            diagonals=not own,
        )

    if not own:
        fixed = read(Path(spec))
        return lambda path: fixed
    for c in ordered:
        read(c.path)  # refuse before the first row, not after hours of them
    return read


# ---------------------------------------------------------------------------- the command
@dataclass(frozen=True)
class TrackRun:
    """What :func:`track` produced: the document, where it was written, and its rows."""

    document: dict[str, Any]
    path: Path | None

    @property
    def rows(self) -> list[dict[str, Any]]:
        """``results.track``: one row per checkpoint, in training order."""
        return self.document["results"]["track"]


def track(
    checkpoints: str | Path | Sequence[str | Path],
    data: Any = None,
    *,
    matrices: str | Sequence[str] = "hessian",
    top: int = 3,
    bottom: int = 0,
    trace: bool | str = False,
    trace_probes: int = 99,
    per_layer: bool = False,
    gradient_overlap: int = 0,
    lr: float | None = None,
    momentum: float | None = None,
    tol: float = DEFAULT_TOL,
    rtol: float | None = None,
    max_matvecs: int | None = None,
    basis_size: int | None = None,
    seed: int = 0,
    warm_start: bool = True,
    compare_cold: bool = False,
    hvp: str = "auto",
    basis_device: str | None = None,
    out: str | Path | None = None,
    settings: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    resume: bool | None = None,
    preconditioner: str | Path | None = None,
    optimizer_key: str | None = None,
    **load_options: Any,
) -> TrackRun:
    r"""Measure curvature at every checkpoint of a training run (``curvscope track``).

    The checkpoints (paths or globs) are ordered by the step they record, or by the last
    integer in their names (:func:`order_checkpoints`); all must hold one architecture. The
    data are loaded once, with the first checkpoint (:func:`curvscope.load`), and each
    checkpoint's weights are copied into that model, so every row sees the same samples; every
    random choice uses ``seed``.

    Args:
        checkpoints: checkpoint files or globs (``runs/ckpt-*.pt``).
        data: the data (default: what the first checkpoint records); see
            :func:`curvscope.load`.
        matrices: matrix names (``hessian``, ``ggn``...), a list or a comma-separated string.
        top: largest eigenvalues per matrix.
        bottom: smallest eigenvalues per matrix.
        trace: ``True`` (Hutch++), ``"hutchpp"`` or ``"hutchinson"``: record the trace with
            its standard error.
        trace_probes: products of each trace estimate.
        per_layer: record each module's top eigenvalue (its own diagonal block).
        gradient_overlap: K > 0 records, per matrix, the fraction of the full-data gradient
            in the top-K eigenspace with its Davis-Kahan interval (``gradient_overlap`` of a
            row; Gur-Ari et al. 2018); the Lanczos runs then find ``max(top, K + 1)`` pairs.
        lr: the step size of training, for the stability threshold ``2(1+momentum)/lr``.
        momentum: heavy-ball momentum of training.
        tol: relative residual tolerance of the eigenpairs.
        rtol: converge each eigenvalue to this relative error bound instead.
        max_matvecs: products per Lanczos run at most.
        basis_size: Lanczos basis vectors at most.
        seed: start vectors, probes and the data subset (with ``samples``).
        warm_start: start each Lanczos run from the previous row's Ritz vectors.
        compare_cold: also run every solve from a random start and record both counts.
        hvp: how Hessian products are taken.
        basis_device: where the Lanczos basis lives (default: the model's device).
        out: folder for ``track.json`` (rewritten after every checkpoint); ``None``: not written.
        settings: more settings to record (the command line's own).
        progress: ``progress(done, total, description)``.
        resume: what to do with an unfinished ``out/track.json`` (``complete: false``, left
            by an interrupted run): ``None`` resumes it when it is a track of the same
            settings, data and checkpoints (its rows are kept and not measured again; the
            document keeps its run id and records ``run.resumed``), else starts afresh;
            ``True`` resumes it or refuses one that differs (the command line); ``False``
            always starts afresh (``--overwrite``).
        preconditioner: ``"checkpoint"``: each checkpoint's own optimiser state (Adam,
            AdamW, RMSprop, Adagrad; SGD for its threshold) gives the row's preconditioner
            :math:`P`, and every matrix is also measured as ``preconditioned <matrix>``
            (:math:`P^{-1/2} A P^{-1/2}`, docs/DESIGN.md "Preconditioned sharpness"); a path:
            one file's (an optimiser state or a dict of diagonals) for every row. Every
            checkpoint's state is checked before the first row.
        optimizer_key: the key of the optimiser state in the checkpoints.
        **load_options: what :func:`curvscope.load` takes besides model and data
            (``loss``, ``batch_size``, ``samples``, ``dtype``, ``model``, ``state_key``...).

    Returns:
        A :class:`TrackRun`; ``results.track`` holds one row per checkpoint: ``step``,
        ``checkpoint``, ``sha256``, ``loss``, ``grad_norm``, ``eigenvalues``, ``residuals``,
        ``error_bounds`` and ``converged`` (``{matrix: {"top": [...], "bottom": [...]}}``),
        ``trace`` and ``per_layer_top`` when asked, ``num_matvecs``.

    Raises:
        CurvscopeError: for every user mistake (a glob matching nothing, checkpoints of
            different architectures, bad options), with one sentence.
    """
    started = time.perf_counter()
    names, estimator = _validate(
        matrices, top, bottom, trace, trace_probes, tol, gradient_overlap
    )
    stability = _stability(lr, momentum)
    paths = expand_checkpoints(checkpoints)
    ordered, order_by, notes = order_checkpoints(paths)
    ckpt_options = _checkpoint_options(load_options)
    _check_architectures(ordered, ckpt_options)
    problem = load(ordered[0].path, data, seed=seed, **load_options)
    passes_before = problem.data_passes
    precondition = _preconditioners(problem, ordered, preconditioner, optimizer_key)
    measurer = _Measurer(
        names,
        top,
        bottom,
        estimator,
        trace_probes,
        per_layer,
        tol,
        rtol,
        max_matvecs,
        basis_size,
        seed,
        warm_start,
        compare_cold,
        hvp,
        basis_device,
        gradient_overlap=gradient_overlap,
    )
    all_settings = {
        **dict(settings or {}),  # the caller's own (the command line's flags) first
        **_settings(
            measurer,
            lr=lr,
            momentum=momentum,
            checkpoints=_checkpoint_names(checkpoints),
            order=order_by,
            preconditioner=None if preconditioner is None else str(preconditioner),
            optimizer_key=optimizer_key,
        ),
    }
    with active_run("track") as run:
        kept = _kept_rows(out, resume, all_settings, ordered, problem, run, notes)
        rows: list[dict[str, Any]] = list(kept)
        out_path: Path | None = None

        def write(complete: bool, state: str | None = None) -> dict[str, Any]:
            nonlocal out_path
            doc = document(
                problem,
                "track",
                settings=all_settings,
                results=_results(rows, measurer, stability, order=order_by),
                started=started,
                passes_before=passes_before,
                matvecs=sum(int(r["num_matvecs"]) for r in rows),
                notes=notes,
                complete=complete,
                state=state,
                run=run,
            )
            if out is not None:
                out_path = write_document(doc, out)
            return doc

        try:
            for row in _measured_rows(
                ordered, len(kept), problem, ckpt_options, measurer, precondition, progress
            ):
                rows.append(row)
                write(complete=False, state="running")
                if progress is not None:
                    progress(row["index"] + 1, len(ordered), "checkpoints")
        except KeyboardInterrupt:
            write(complete=False, state="interrupted")
            raise
        doc = write(complete=True)
    return TrackRun(doc, out_path)


def _kept_rows(
    out: str | Path | None,
    resume: bool | None,
    settings: Mapping[str, Any],
    ordered: Sequence[_Checkpoint],
    problem: Problem,
    run: Run,
    notes: list[str],
) -> list[dict[str, Any]]:
    """The rows an interrupted run in ``out`` finished (a note says so), or none.

    A fresh track removes the figures of an earlier one, which would sit beside its rows.
    """
    kept = _resumable(out, resume, settings, ordered, problem, run)
    if out is not None and not kept:
        remove_stale_figures(Path(out) / "figures", [], TRACK_FIGURES)
    if kept:
        notes.append(
            f"resumed run {run.id}: the {len(kept)} checkpoint(s) it had finished were kept, "
            "not measured again; the first new one started from a random vector (no Ritz "
            "vectors were kept)."
        )
    return kept


def _checkpoint_options(load_options: Mapping[str, Any]) -> dict[str, Any]:
    """What reading each later checkpoint takes of :func:`curvscope.load`'s options."""
    return {
        "model": load_options.get("model", load_options.get("builder")),
        "trust_checkpoint": bool(load_options.get("trust_checkpoint", False)),
        "state_key": load_options.get("state_key"),
        "strip_prefix": load_options.get("strip_prefix"),
        **({"load_strict": False} if load_options.get("load_strict") is False else {}),
    }


def _checkpoint_names(checkpoints: Any) -> list[str]:
    """The checkpoints as given (one path or glob, or several), as strings."""
    given = [checkpoints] if isinstance(checkpoints, (str, Path)) else checkpoints
    return [str(c) for c in given]


def _measured_rows(
    ordered: Sequence[_Checkpoint],
    start: int,
    problem: Problem,
    ckpt_options: Mapping[str, Any],
    measurer: _Measurer,
    precondition: Callable[[Path], Any],
    progress: Progress | None,
) -> Iterator[dict[str, Any]]:
    """One row a checkpoint from ``ordered[start]`` on, its weights loaded into ``problem``.

    The first checkpoint is the one ``problem`` was loaded from; each later one is read and
    copied into the model (the problem's parameter views see the new weights).
    """
    first_loaded = problem.loaded
    for i, ckpt in enumerate(ordered):
        if i < start:
            continue
        if i == 0:
            loaded = first_loaded
        else:
            loaded = load_checkpoint(ckpt.path, **ckpt_options)
            with torch.no_grad():
                # copy_ converts to the analysis dtype and device; the problem's
                # parameter views share storage with the model: they see the weights
                problem.model.load_state_dict(loaded.model.state_dict())
        if progress is not None:
            progress(i, len(ordered), "checkpoints")
        yield {
            "index": i,
            "step": ckpt.step,
            "step_source": ckpt.step_source,
            "checkpoint": str(ckpt.path),
            "sha256": loaded.sha256 or None,
            **measurer.measure(problem, progress, precondition(ckpt.path)),
        }


# ---------------------------------------------------------------------------- in training
def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Leave a model as it was: train/eval flags, ``requires_grad``, ``.grad`` and the RNGs.

    The random-number states saved and restored are torch's CPU generator, every CUDA
    device's (when CUDA is initialised), Python's ``random`` and numpy's global one. Gradients
    are restored to the same tensor objects with their saved values.
    """
    flags = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [
        (p, p.requires_grad, p.grad, None if p.grad is None else p.grad.detach().clone())
        for p in params
    ]
    rng = _rng_state()
    grad_mode = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad_mode)
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for p, req, g, saved in grads:
                p.requires_grad_(req)
                p.grad = g
                if g is not None:
                    g.copy_(saved)
        _set_rng_state(rng)


def _weights_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        flat = t.detach().cpu().reshape(-1).contiguous()
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


class Tracker:
    r"""Curvature measured from inside a training loop, written as a ``track`` document.

    ::

        tracker = cs.Tracker(model, "cross_entropy", batches, every=100, top=3,
                             lr=0.05, out="runs/curv")
        for step in range(steps):
            ...
            loss.backward()
            tracker(step)            # or tracker.step(step): measures when step % every == 0
            opt.step()

    A measurement leaves the model, its ``.grad`` tensors, its train/eval flags, the optimiser
    (never touched) and the random-number states (torch CPU and CUDA, Python, numpy) exactly
    as they were, so training with a tracker gives the same weights, bit for bit, as training
    without. After every measurement the whole document is rewritten atomically to
    ``out/track.json`` (or ``out`` itself when it ends in ``.json``).

    Args:
        model: the model being trained (analysed in place, in its own dtype and device,
            unless ``dtype`` asks for another: then a copy is refreshed at each measurement).
        loss: a loss name or :class:`~curvscope._losses.Loss`.
        data: fixed batches to measure on (a list, a non-shuffling ``DataLoader``, a data
            file or a built-in set): the same samples at every measurement.
        every: measure when ``step % every == 0``.
        top: largest eigenvalues per matrix.
        bottom: smallest eigenvalues per matrix.
        matrices: matrix names.
        trace: ``True``, ``"hutchpp"`` or ``"hutchinson"``.
        trace_probes: products per trace estimate.
        per_layer: each module's top eigenvalue.
        gradient_overlap: K > 0: the gradient's fraction in the top-K eigenspace per matrix,
            with its interval (see :func:`track`).
        lr: training step size (stability threshold in the document and figures).
        momentum: heavy-ball momentum of training.
        out: folder (or ``.json`` file) for the document; ``None`` keeps rows in memory only.
        seed: start vectors and probes; an int or a torch.Generator (its initial seed is
            used, so every measurement starts alike).
        tol: relative residual tolerance.
        rtol: relative error-bound tolerance instead of ``tol``.
        max_matvecs: products per Lanczos run at most.
        basis_size: Lanczos basis vectors at most.
        warm_start: start from the previous measurement's Ritz vectors.
        compare_cold: also solve from a random start and record both product counts.
        dtype: analyse in this dtype (``"float64"``) on a copy of the model.
        optimizer: the training loop's ``torch.optim`` optimiser (Adam, AdamW, RMSprop,
            Adagrad; SGD for its threshold): every row also records each matrix preconditioned
            by its current :math:`P` (``preconditioned <matrix>``) and its hyper-parameters and
            thresholds, read without touching it (rows before its first step say why they
            have none).
        **load_options: what :func:`curvscope.load` takes besides model, data, loss, dtype
            and device (``reduction``, ``batch_size``, ``samples``, ``params``...).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Any,
        data: Any,
        *,
        every: int = 100,
        top: int = 3,
        bottom: int = 0,
        matrices: str | Sequence[str] = "hessian",
        trace: bool | str = False,
        trace_probes: int = 99,
        per_layer: bool = False,
        gradient_overlap: int = 0,
        lr: float | None = None,
        momentum: float | None = None,
        out: str | Path | None = None,
        seed: int | torch.Generator = 0,
        tol: float = DEFAULT_TOL,
        rtol: float | None = None,
        max_matvecs: int | None = None,
        basis_size: int | None = None,
        warm_start: bool = True,
        compare_cold: bool = False,
        dtype: str | torch.dtype | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **load_options: Any,
    ) -> None:
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise OptionError(
                    f"{arg('optimizer')} must be a torch.optim optimiser, not a "
                    f"{type(optimizer).__name__}.",
                    option="optimizer",
                )
            try:  # the optimiser's kind and parameters are checked now, not at step 1000
                preconditioner_from_optimizer(optimizer, model)
            except OptionError as exc:
                if getattr(exc, "missing", None) != "state":
                    raise
        self.optimizer = optimizer
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise OptionError(f"{arg('every')} must be a positive number of steps, not {every}.")
        for key in ("dtype", "device"):
            if key in load_options:
                raise OptionError(f"{arg(key)} is the model's own; the tracker takes no {key}.")
        names, estimator = _validate(
            matrices, top, bottom, trace, trace_probes, tol, gradient_overlap
        )
        self.stability = _stability(lr, momentum)
        seed_int = seed if isinstance(seed, int) else int(seed.initial_seed())
        self.model = model
        self.every = every
        self.out = None if out is None else Path(out)
        self._measurer = _Measurer(
            names,
            top,
            bottom,
            estimator,
            trace_probes,
            per_layer,
            tol,
            rtol,
            max_matvecs,
            basis_size,
            seed_int,
            warm_start,
            compare_cold,
            gradient_overlap=gradient_overlap,
        )
        self._loss = loss
        self._data = data
        self._dtype = dtype
        self._load_options = dict(load_options)
        self._seed = seed_int
        self._problem: Problem | None = None
        self._copy: nn.Module | None = None
        self._ptrs: list[int] = []
        self._started = time.perf_counter()
        self._run = Run("tracker")  # one run id for every rewrite of the document
        self.rows: list[dict[str, Any]] = []
        self.document: dict[str, Any] | None = None
        self.path: Path | None = None
        self.settings = _settings(
            self._measurer,
            lr=lr,
            momentum=momentum,
            every=every,
            dtype=None if dtype is None else str(dtype),
            optimizer=None if optimizer is None else type(optimizer).__name__,
        )

    def _target(self) -> nn.Module:
        """The module analysed: the model itself, or its copy in ``dtype``."""
        first = next(self.model.parameters(), None)
        if self._dtype is None or first is None:
            return self.model
        from .._load import parse_dtype

        want = parse_dtype(self._dtype)
        if want == first.dtype:
            return self.model
        if self._copy is None:
            self._copy = copy.deepcopy(self.model).to(want)
            for p in self._copy.parameters():
                p.grad = None
        with torch.no_grad():
            self._copy.load_state_dict(self.model.state_dict())
        return self._copy

    def _problem_for(self, target: nn.Module) -> Problem:
        ptrs = [p.data_ptr() for p in target.parameters()]
        if self._problem is None or ptrs != self._ptrs:
            # built once; rebuilt only if the parameters were replaced (not updated in place)
            first = next(target.parameters())
            self._problem = load(
                target,
                self._data,
                loss=self._loss,
                dtype=first.dtype,
                device=first.device,
                seed=self._seed,
                **self._load_options,
            )
            self._ptrs = ptrs
        return self._problem

    def step(self, step: int, *, force: bool = False) -> dict[str, Any] | None:
        """Measure at ``step`` when it is a multiple of ``every`` (or ``force``).

        Returns:
            The new row, or ``None`` when this step is not measured.
        """
        if not force and step % self.every:
            return None
        with preserved(self.model):
            target = self._target()
            with preserved(target):
                problem = self._problem_for(target)
                passes = problem.data_passes
                pre, why = self._preconditioner(problem)
                row = {
                    "index": len(self.rows),
                    "step": int(step),
                    "step_source": "tracker",
                    "checkpoint": None,
                    "sha256": None,
                    "weights_sha256": _weights_sha256(self.model),
                    **self._measurer.measure(problem, None, pre, why),
                }
                row["data_passes"] = problem.data_passes - passes
        self.rows.append(row)
        self._write()
        return row

    __call__ = step

    def _preconditioner(self, problem: Problem) -> tuple[Preconditioner | None, str | None]:
        """The optimiser's preconditioner now, or why there is none yet."""
        if self.optimizer is None:
            return None, None
        try:
            return preconditioner_from_optimizer(
                self.optimizer, self.model, needed=list(problem.names)
            ), None
        except OptionError as exc:
            if getattr(exc, "missing", None) != "state":
                raise
            return None, str(exc)

    def _write(self) -> None:
        problem = self._problem
        doc = document(
            problem,
            "track",
            settings=self.settings,
            results=_results(self.rows, self._measurer, self.stability, order="step"),
            started=self._started,
            matvecs=sum(int(r["num_matvecs"]) for r in self.rows),
            notes=["measured inside the training loop by curvscope.Tracker."],
            run=self._run,
        )
        doc["counts"]["data_passes"] = sum(int(r.get("data_passes", 0)) for r in self.rows)
        self.document = doc
        if self.out is not None:
            if self.out.suffix == ".json":
                self.path = write_atomic(
                    self.out, json.dumps(doc, indent=1, allow_nan=False) + "\n"
                )
            else:
                self.path = write_document(doc, self.out)
