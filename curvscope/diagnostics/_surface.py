r"""Loss surfaces around the weights along eigen, random or filter-normalised directions.

For directions :math:`d_1, d_2` and the weights :math:`w` the surface is

.. math:: S(a, b) = L(w + a\, d_1 + b\, d_2)

on a grid ``axes[0] x axes[1]`` (``loss[i][j] = S(axes[0][i], axes[1][j])``; one direction and
a line for ``dims=1``). Beside it we evaluate the second-order Taylor model of the loss,

.. math::
    Q(a, b) = L(w) + a\, g^\top d_1 + b\, g^\top d_2
    + \tfrac12 \left(a^2\, d_1^\top H d_1 + 2ab\, d_1^\top H d_2 + b^2\, d_2^\top H d_2\right),

(one gradient and one Hessian product with both directions), so a plot shows where the Hessian
stops describing the surface. Along unit-norm Hessian eigenvectors (the default, as in the Suk
thesis, Fig. 15.1) the axes are distances in parameter space and :math:`d_i^\top H d_j` is
:math:`\lambda_i \delta_{ij}` up to the eigenpairs' residuals.

Filter-normalised directions follow Li et al. 2018 ("Visualizing the Loss Landscape of Neural
Nets", Sec. 4): a Gaussian direction is rescaled filter by filter (a row of a Linear weight, an
output channel of a Conv weight: index 0 of every parameter with two or more dimensions) to the
norm of the matching filter of the weights; one-dimensional parameters (biases, BatchNorm and
LayerNorm scales and shifts) are set to zero, as Li et al.'s ``ignore='biasbn'`` option does.
Their axes are multiples of those directions, not distances.

The model's weights are never modified: every grid point is evaluated functionally
(``torch.func.functional_call``), several points per batch with ``torch.func.vmap``, so the
whole grid costs one pass over the data (a point-by-point loop where vmap cannot be used, e.g.
TorchScript models).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .._errors import Interrupted, OptionError, arg
from .._losses import is_classification
from .._sampling import as_generator
from ..linalg import EigenResult, canonical_sign, eigsh
from ..operators import HessianOperator
from ..problem import Problem

__all__ = [
    "DIRECTION_KINDS",
    "SurfaceDirections",
    "SurfaceResult",
    "filter_normalized_direction",
    "surface",
]

Progress = Callable[[int, int, str], None]

DIRECTION_KINDS = ("eigen", "random", "filter-normalized")
DEFAULT_CHUNK = 32
"""Grid points evaluated together in one vmapped forward pass per batch."""


@dataclass(frozen=True)
class SurfaceDirections:
    """How the surface's directions were made.

    Attributes:
        kind: ``eigen``, ``random``, ``filter-normalized``, ``file`` or ``tensor``.
        description: one sentence for the reader (what the axes mean).
        norms: Euclidean norm of each direction.
        source: the file the directions came from, else ``None``.
        matrix: the matrix whose eigenvectors they are (eigen and eigenvector files).
        eigenvalues: their eigenvalues, when they are eigenvectors.
        residual_norms: ``||H v - lambda v||`` of each (computed eigenvectors only).
        converged: whether each eigenpair converged (computed eigenvectors only).
        bias_bn: how one-dimensional parameters were treated (filter-normalised only).
    """

    kind: str
    description: str
    norms: list[float]
    source: str | None = None
    matrix: str | None = None
    eigenvalues: list[float] | None = None
    residual_norms: list[float] | None = None
    converged: list[bool] | None = None
    bias_bn: str | None = None


@dataclass(frozen=True)
class SurfaceResult:
    """A loss surface on a 1-D line or 2-D grid.

    ``results.surface`` of a surface document (docs/DESIGN.md "Result document").

    Attributes:
        directions: how the directions were made.
        dims: 1 or 2.
        axes: grid coordinates per direction (``[[...]]`` or ``[[...], [...]]``).
        loss: ``[steps]`` (1-D) or ``[steps0][steps1]`` with ``loss[i][j]`` at
            ``axes[0][i], axes[1][j]``; non-finite values are NaN here and null in JSON.
        accuracy: the same shape for classification losses, else ``None``.
        quadratic_model: the second-order Taylor model on the same grid.
        eigenvalues: the directions' eigenvalues (eigen directions), else ``None``.
        center_loss: ``L(w)``.
        gradient_projections: ``g . d_i``.
        curvatures: ``d_i . H d_j`` (``dims x dims``).
        num_points: grid points evaluated.
        num_non_finite: grid points whose loss was NaN or Inf.
        evaluation: ``vmap`` (points batched) or ``loop`` (one point at a time).
        num_matvecs: Hessian products (eigenvectors and the quadratic model).
        notes: sentences for the reader.
    """

    directions: SurfaceDirections
    dims: int
    axes: list[list[float]]
    loss: list
    accuracy: list | None
    quadratic_model: list | None
    eigenvalues: list[float] | None
    center_loss: float
    gradient_projections: list[float]
    curvatures: list[list[float]]
    num_points: int
    num_non_finite: int
    evaluation: str
    num_matvecs: int
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- directions
def filter_normalized_direction(
    problem: Problem, *, seed: int | torch.Generator = 0
) -> torch.Tensor:
    """One filter-normalised Gaussian direction (Li et al. 2018, Sec. 4), flat ``[P]``.

    Every filter of the direction (index 0 of each parameter with two or more dimensions: a
    row of a Linear weight, an output channel of a Conv weight) gets the norm of the matching
    filter of the weights. One-dimensional parameters (biases, BatchNorm/LayerNorm scales and
    shifts) are set to zero, as Li et al.'s ``ignore='biasbn'`` option does.

    Args:
        problem: gives the weights and the parameter layout.
        seed: random source of the Gaussian direction (an int or a generator).

    Raises:
        OptionError: when every selected parameter is one-dimensional (nothing is left).
    """
    gen = as_generator(seed)
    parts = []
    for name, w in problem.params.items():
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(
            device=w.device, dtype=w.dtype
        )
        if w.dim() <= 1:
            parts.append(torch.zeros_like(w).reshape(-1))
            continue
        wf = w.detach().reshape(w.shape[0], -1)
        df = d.reshape(w.shape[0], -1)
        dn = torch.linalg.vector_norm(df, dim=1, keepdim=True)
        wn = torch.linalg.vector_norm(wf, dim=1, keepdim=True)
        parts.append((df / dn.clamp_min(torch.finfo(w.dtype).tiny) * wn).reshape(-1))
        del name
    vec = torch.cat(parts)
    if not bool((vec != 0).any()):
        raise OptionError(
            f"{arg('directions')} filter-normalized leaves nothing to move: every selected "
            "parameter is a bias or normalisation parameter (set to zero as in Li et al. "
            f"2018); select weights with {arg('params')} or use {arg('directions')} random."
        )
    return vec


def _resolve_directions(
    problem: Problem,
    directions,
    dims: int,
    *,
    eigen: EigenResult | None,
    gen: torch.Generator,
    tol: float | None,
    max_iter: int | None,
    progress: Progress | None,
) -> tuple[torch.Tensor, SurfaceDirections, int, list[str]]:
    notes: list[str] = []
    matvecs = 0
    P = problem.num_params
    if isinstance(directions, (str, os.PathLike)) and str(directions) not in DIRECTION_KINDS and (
        isinstance(directions, os.PathLike) or any(c in str(directions) for c in "./\\")
    ):
        # diagnostics read no files: cs.surface, the command line and the report read it
        raise OptionError(
            f"{arg('directions')} {directions}: this function takes the directions as a "
            "tensor; read a file with curvscope.io.read_directions (cs.surface does it for you)."
        )
    if isinstance(directions, torch.Tensor) or isinstance(directions, tuple):
        if isinstance(directions, tuple):  # (tensor, info) from io.read_directions
            D, info = directions
            D = D.to(torch.float64)
        elif isinstance(directions, torch.Tensor):
            D = directions.detach().to(torch.float64)
            D = D.unsqueeze(1) if D.dim() == 1 else D
            if D.dim() != 2 or D.shape[0] != P:
                raise OptionError(
                    f"directions of shape {list(directions.shape)} do not fit the {P} selected "
                    f"parameters (expected [{P}] or [{P}, k])."
                )
            info = {"kind": "tensor", "source": None}
        if D.shape[1] < dims:
            raise OptionError(
                f"{arg('dims')} {dims} needs {dims} directions but "
                f"{info['source'] or 'the tensor'} holds {D.shape[1]}."
            )
        if D.shape[1] > dims:
            notes.append(f"used the first {dims} of the {D.shape[1]} directions given.")
        D = D[:, :dims]
        norms = [float(n) for n in torch.linalg.vector_norm(D, dim=0)]
        if any(n == 0 for n in norms):
            raise OptionError(f"a direction given with {arg('directions')} is zero.")
        if info["kind"] == "eigen":
            ev = info["eigenvalues"][:dims]
            desc = (
                f"top {info['matrix']} eigenvectors read from {info['source']}; "
                "axes are distances in parameter space along these unit vectors"
            )
            sd = SurfaceDirections("eigen", desc, norms, info["source"], info["matrix"], ev)
        else:
            src = info["source"] or "a tensor passed in"
            desc = (
                f"directions from {src}, used as given (norms "
                f"{', '.join(f'{n:.3g}' for n in norms)}); axes are multiples of them"
            )
            sd = SurfaceDirections(info["kind"], desc, norms, info["source"])
        return D.to(device=problem.device, dtype=problem.dtype), sd, matvecs, notes

    kind = str(getattr(directions, "value", directions))
    if kind == "eigen":
        if eigen is None:
            res = eigsh(
                HessianOperator(problem),
                top=dims,
                seed=gen,
                progress=progress,
                **({"tol": tol} if tol is not None else {}),
                **({"max_matvecs": max_iter} if max_iter is not None else {}),
            )[0]
            matvecs += int(res.num_matvecs)
        else:
            res = eigen
        V = res.eigenvectors
        if V.dim() != 2 or V.shape[0] != P or V.shape[1] < dims:
            raise OptionError(
                f"the eigenpairs passed in have eigenvectors of shape {list(V.shape)}; "
                f"{dims} columns of length {P} are needed."
            )
        V = V[:, :dims].to(torch.float64)
        V = canonical_sign(V / torch.linalg.vector_norm(V, dim=0, keepdim=True))
        evs = [float(v) for v in res.eigenvalues[:dims]]
        resid = [float(v) for v in res.residual_norms[:dims]]
        conv = [bool(c) for c in res.converged[:dims]]
        if not all(conv):
            notes.append(
                "not every eigenvector converged (residuals "
                + ", ".join(f"{r:.2e}" for r in resid)
                + "): the axes are still unit directions, but not exact eigenvectors."
            )
        which = getattr(res, "which", "top")
        desc = (
            f"{which} Hessian eigenvectors (unit norm, eigenvalues "
            + ", ".join(f"{e:.4g}" for e in evs)
            + "); axes are distances in parameter space"
        )
        sd = SurfaceDirections("eigen", desc, [1.0] * dims, None, "hessian", evs, resid, conv)
        return V.to(device=problem.device, dtype=problem.dtype), sd, matvecs, notes
    if kind == "random":
        D = torch.randn(P, dims, generator=gen, dtype=torch.float64)
        D = D / torch.linalg.vector_norm(D, dim=0, keepdim=True)
        desc = "Gaussian random directions scaled to unit norm; axes are distances"
        sd = SurfaceDirections("random", desc, [1.0] * dims)
        return D.to(device=problem.device, dtype=problem.dtype), sd, matvecs, notes
    if kind == "filter-normalized":
        cols = [filter_normalized_direction(problem, seed=gen) for _ in range(dims)]
        D = torch.stack(cols, dim=1)
        norms = [float(n) for n in torch.linalg.vector_norm(D, dim=0)]
        bias_bn = (
            "biases and BatchNorm/LayerNorm parameters (all one-dimensional parameters) are "
            "set to zero in the directions, as Li et al. 2018 do (ignore='biasbn')"
        )
        desc = (
            "filter-normalised Gaussian directions (Li et al. 2018): each filter scaled to the "
            "norm of the matching weight filter; axes are multiples of these directions, "
            "not distances"
        )
        sd = SurfaceDirections("filter-normalized", desc, norms, bias_bn=bias_bn)
        return D, sd, matvecs, notes
    raise OptionError(
        f"{arg('directions')} {directions!r} is not known; choose eigen, random, filter-normalized "
        "or a file."
    )


# ----------------------------------------------------------------------------- evaluation
def _accuracy_counts(problem: Problem, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions of a batch, as a tensor (vmap-able).

    Per sample for BCE, per live target otherwise (class ids, tokens: the loss's own rows,
    so causal_lm's shift too).
    """
    if problem.loss_name == "bce_with_logits":
        pred = (out > 0).to(y.dtype).reshape(y.shape)
        if y.dim() > 1:
            return (pred == y).all(dim=-1).sum()
        return (pred == y).sum()
    rows, t, keep = problem.loss_fn.rows(out, y)
    return ((rows.argmax(dim=-1) == t) & keep).sum()


def _predictions(problem: Problem) -> int:
    """How many predictions the accuracy counts: samples for BCE, loss terms otherwise."""
    return problem.num_samples if problem.loss_name == "bce_with_logits" else problem.num_terms


class _GridInterrupted(KeyboardInterrupt):
    """Ctrl-C during the grid: the first ``finished`` points are evaluated."""

    def __init__(self, loss: torch.Tensor, correct: torch.Tensor | None, finished: int):
        super().__init__()
        self.loss, self.correct, self.finished = loss, correct, finished


def _evaluate_vmap(
    problem: Problem, W: torch.Tensor, classify: bool, chunk: int, progress: Progress | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    G = W.shape[0]
    loss = torch.zeros(G, dtype=torch.float64, device=W.device)
    correct = torch.zeros(G, dtype=torch.float64, device=W.device) if classify else None
    starts = list(range(0, G, chunk))
    total = len(starts) * len(problem.batch_sizes)
    done = 0

    def batched(b):
        # the batch (any structure: tensors, tuples, dicts) is closed over, not mapped
        def one(flat):
            out = problem.forward(problem.unflatten(flat), b.inputs)
            value = problem.batch_value(out, b)
            if classify:
                return value, _accuracy_counts(problem, out, b.target)
            return value, value

        return torch.func.vmap(one)

    # chunks of points outside, batches inside: after each chunk its points are final, so
    # Ctrl-C keeps them (one pass over the data per chunk)
    finished = 0
    try:
        with torch.no_grad(), problem.mode():
            for s in starts:
                for b in problem.batches():
                    values, counts = batched(b)(W[s : s + chunk])
                    loss[s : s + chunk] += values.to(torch.float64)
                    if classify:
                        correct[s : s + chunk] += counts.to(torch.float64)
                    done += 1
                    if progress is not None:
                        progress(done, total, "surface")
                finished = min(G, s + chunk)
    except KeyboardInterrupt:
        raise _GridInterrupted(loss, correct, finished) from None
    return loss, correct


def _evaluate_loop(
    problem: Problem, W: torch.Tensor, classify: bool, progress: Progress | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    G = W.shape[0]
    loss = torch.zeros(G, dtype=torch.float64)
    correct = torch.zeros(G, dtype=torch.float64) if classify else None
    g = 0
    try:
        for g in range(G):
            params = problem.unflatten(W[g])
            # Problem.loss adds weight decay; the caller adds it for every point instead.
            loss[g] = float(problem.loss(params) - problem.regulariser(params))
            if classify:
                acc = problem.accuracy(params)
                correct[g] = acc * _predictions(problem) if acc is not None else math.nan
            if progress is not None:
                progress(g + 1, G, "surface")
    except KeyboardInterrupt:
        raise _GridInterrupted(loss, correct, g) from None
    return loss, correct


def _evaluate_grid(
    problem: Problem,
    W: torch.Tensor,
    classify: bool,
    chunk: int,
    progress: Progress | None,
    notes: list[str],
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Loss (and correct predictions) at every grid point: vmap, or a loop where it fails.

    Data-parallel runs split the grid, not the batches: each rank evaluates every
    ``world_size``-th point on all the data, and the rows are summed over the ranks.
    """
    group = problem.group
    local, rows = problem, None
    if group.active:
        local = problem.alone()
        rows = torch.arange(W.shape[0], device=W.device) % group.world_size == group.rank
        W = W[rows]
    evaluation = "vmap"
    if local.scripted:
        evaluation = "loop"
        notes.append("TorchScript model: grid points were evaluated one at a time.")
        loss, correct = _evaluate_loop(local, W, classify, progress)
    else:
        try:
            loss, correct = _evaluate_vmap(local, W, classify, chunk, progress)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            evaluation = "loop"
            notes.append(
                "grid points were evaluated one at a time (torch.func.vmap could not batch "
                f"this model: {str(exc).splitlines()[0][:120]})."
            )
            loss, correct = _evaluate_loop(local, W, classify, progress)
    if rows is not None:
        rows = rows.to(loss.device)
        full = torch.zeros(rows.shape[0], dtype=loss.dtype, device=loss.device)
        full[rows] = loss
        loss = problem.reduce(full)
        if correct is not None:
            full = torch.zeros(rows.shape[0], dtype=correct.dtype, device=correct.device)
            full[rows.to(correct.device)] = correct
            correct = problem.reduce(full)
    return loss, correct, evaluation


def _grid_points(axes: list[torch.Tensor]) -> torch.Tensor:
    if len(axes) == 1:
        return axes[0].unsqueeze(1)
    a, b = torch.meshgrid(axes[0], axes[1], indexing="ij")
    return torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)


def _nested(values: torch.Tensor, shape: tuple[int, ...]) -> list:
    return values.reshape(shape).tolist()


def surface(
    problem: Problem,
    *,
    dims: int = 2,
    directions: str | torch.Tensor | tuple[torch.Tensor, dict] = "eigen",
    range_: tuple[float, float] | tuple[tuple[float, float], tuple[float, float]] = (-1.0, 1.0),
    steps: int | tuple[int, int] = 41,
    eigen: EigenResult | None = None,
    seed: int | torch.Generator = 0,
    quadratic: bool = True,
    tol: float | None = None,
    max_iter: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
) -> SurfaceResult:
    r"""The loss on a line or grid around the weights, with its quadratic model.

    Args:
        problem: model, loss, data and selected parameters (the weights are not modified).
        dims: 1 (a line) or 2 (a grid).
        directions: ``"eigen"`` (top Hessian eigenvectors, unit norm), ``"random"`` (Gaussian,
            unit norm), ``"filter-normalized"`` (Li et al. 2018, biases and BatchNorm zeroed),
            a tensor ``[P]``/``[P, k]``, or ``(tensor, info)`` from
            :func:`curvscope.io.read_directions` (this function reads no file:
            ``curvscope.surface`` and the command line read eigenvector files).
        range_: ``(lo, hi)`` of the grid coordinates, or one pair per direction.
        steps: points per axis (one int, or one per direction).
        eigen: precomputed top eigenpairs (``eigsh(...)[0]``) for ``"eigen"``.
        seed: random source (Lanczos start vector, random directions): an int or a generator.
        quadratic: also evaluate the second-order Taylor model (one gradient and one Hessian
            product with the directions).
        tol: eigenpair tolerance (default that of :func:`curvscope.linalg.eigsh`).
        max_iter: maximum Lanczos steps.
        chunk_size: grid points evaluated together per batch with ``vmap``.
        progress: ``progress(completed, total, description)``.

    Returns:
        A :class:`SurfaceResult`; non-finite losses are NaN in it, counted and noted.

    Raises:
        OptionError: for ``dims`` other than 1 or 2, a bad range or step count, unknown
            directions, or directions that do not fit.
    """
    if dims not in (1, 2):
        raise OptionError(
            f"{arg('dims')} {dims} is not supported; a surface has 1 or 2 dimensions."
        )
    steps_t = (steps,) * dims if isinstance(steps, int) else tuple(int(s) for s in steps)
    if len(steps_t) != dims or any(s < 2 for s in steps_t):
        raise OptionError(f"{arg('steps')} {steps} must give at least 2 points per axis.")
    if range_ and isinstance(range_[0], (tuple, list)):
        ranges = [tuple(float(v) for v in r) for r in range_]
    else:
        ranges = [tuple(float(v) for v in range_)] * dims
    if len(ranges) != dims or any(len(r) != 2 or not r[0] < r[1] for r in ranges):
        raise OptionError(f"{arg('range_')} {range_} must be LO,HI with LO < HI.")
    if any(not math.isfinite(v) for r in ranges for v in r):
        raise OptionError(f"{arg('range_')} {range_} must be finite.")
    if chunk_size < 1:
        raise OptionError("chunk_size must be at least 1.")

    D, sd, matvecs, notes = _resolve_directions(
        problem,
        directions,
        dims,
        eigen=eigen,
        gen=as_generator(seed),
        tol=tol,
        max_iter=max_iter,
        progress=progress,
    )
    D = D.to(device=problem.device, dtype=problem.dtype)
    axes = []
    for (lo, hi), n in zip(ranges, steps_t, strict=True):
        axis = torch.linspace(lo, hi, n, dtype=torch.float64)
        # the weights themselves sit exactly at 0 (linspace leaves round-off there)
        axis[axis.abs() < 1e-12 * (hi - lo)] = 0.0
        axes.append(axis)
    coords = _grid_points(axes)  # [G, dims], float64
    w = problem.param_vector()
    W = w.unsqueeze(0) + coords.to(device=w.device, dtype=w.dtype) @ D.T  # [G, P]

    classify = is_classification(problem.loss_name) or problem.loss_name == "bce_with_logits"
    finished = None
    try:
        loss, correct, evaluation = _evaluate_grid(
            problem, W, classify, chunk_size, progress, notes
        )
    except _GridInterrupted as stop:
        if problem.group.active:  # ranks hold different points: nothing whole to keep
            raise KeyboardInterrupt from None
        loss, correct, evaluation, finished = stop.loss, stop.correct, "interrupted", stop.finished
        loss[finished:] = math.nan
        if correct is not None:
            correct[finished:] = math.nan
    loss = loss.cpu()
    if problem.weight_decay:
        loss = loss + 0.5 * problem.weight_decay * (W.to(torch.float64) ** 2).sum(dim=1).cpu()
    acc = None if correct is None else (correct.cpu() / _predictions(problem))

    bad = ~torch.isfinite(loss)
    if finished is not None:  # Ctrl-C: keep the evaluated points, compute nothing more
        bad[finished:] = False
    num_bad = int(bad.sum())
    if finished is not None:
        notes.append(
            f"interrupted (Ctrl-C) after {finished} of {loss.numel()} grid points (in grid "
            "order, the last axis fastest); the others are null, and no quadratic model was "
            "computed."
        )
        shape = tuple(steps_t)
        raise Interrupted(
            SurfaceResult(
                directions=sd,
                dims=dims,
                axes=[a.tolist() for a in axes],
                loss=_nested(loss, shape),
                accuracy=None if acc is None else _nested(acc, shape),
                quadratic_model=None,
                eigenvalues=sd.eigenvalues,
                center_loss=math.nan,
                gradient_projections=[],
                curvatures=[],
                num_points=int(loss.numel()),
                num_non_finite=num_bad,
                evaluation=evaluation,
                num_matvecs=matvecs,
                notes=notes,
            )
        )
    if num_bad:
        loss[bad] = math.nan
        if acc is not None:
            acc[bad] = math.nan
        notes.append(
            f"the loss was NaN or Inf at {num_bad} of {loss.numel()} grid points (null in the "
            "JSON, gaps in the plots)."
        )

    # Second-order model: one gradient and one Hessian product with all directions.
    L0, g = problem.loss_and_grad()
    L0 = float(L0)
    gd = (g.to(torch.float64) @ D.to(torch.float64)).cpu()
    if quadratic:
        HD = HessianOperator(problem) @ D
        matvecs += dims
        C = (D.to(torch.float64).T @ HD.to(torch.float64)).cpu()
        C = 0.5 * (C + C.T)
        q = L0 + coords @ gd + 0.5 * ((coords @ C) * coords).sum(dim=1)
        quad = _nested(q, tuple(steps_t))
    else:
        C = torch.full((dims, dims), math.nan, dtype=torch.float64)
        quad = None

    shape = tuple(steps_t)
    return SurfaceResult(
        directions=sd,
        dims=dims,
        axes=[a.tolist() for a in axes],
        loss=_nested(loss, shape),
        accuracy=None if acc is None else _nested(acc, shape),
        quadratic_model=quad,
        eigenvalues=sd.eigenvalues,
        center_loss=L0,
        gradient_projections=gd.tolist(),
        curvatures=C.tolist(),
        num_points=int(loss.numel()),
        num_non_finite=num_bad,
        evaluation=evaluation,
        num_matvecs=matvecs,
        notes=notes,
    )
