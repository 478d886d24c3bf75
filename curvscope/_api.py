"""The flat public API's own functions: one name per curvature matrix, Lanczos, documents."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from .io import (
    Preconditioner,
    preconditioner_from_optimizer,
    preconditioner_from_state,
    read_preconditioner,
)
from .linalg import as_operator, eigsh
from .operators import (
    EKFACOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
    PCHOperator,
)
from .problem import Problem

__all__ = [
    "document",
    "ekfac",
    "empirical_fisher",
    "fisher",
    "ggn",
    "hessian",
    "kfac",
    "lanczos",
    "pch",
    "preconditioner",
]


def _on(problem: Problem, group: Any) -> Problem:
    """``problem``, split over ``group``'s ranks when one is given."""
    return problem if group is None else problem.distributed(group)


def hessian(problem: Problem, *, hvp: str = "auto", group: Any = None) -> HessianOperator:
    """The Hessian of the problem's loss (see :class:`~curvscope.operators.HessianOperator`).

    Every matrix function takes ``group``: a :class:`~curvscope.Group` or an initialised
    ``torch.distributed`` process group; the batches are then split over its ranks and
    every product summed over them (data parallelism; the same matrix on every rank).
    A sharded problem (``shard=True``) gives a
    :class:`~curvscope.operators.ShardedHessianOperator` on this rank's shards.
    """
    problem = _on(problem, group)
    if getattr(problem, "sharding", None) is not None:  # Problem(..., shard=True)
        from .operators import ShardedHessianOperator

        return ShardedHessianOperator(problem, mode=hvp)
    return HessianOperator(problem, mode=hvp)


def ggn(problem: Problem, *, group: Any = None) -> GGNOperator:
    """The generalised Gauss-Newton matrix (:class:`~curvscope.operators.GGNOperator`)."""
    return GGNOperator(_on(problem, group))


def fisher(
    problem: Problem,
    *,
    kind: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    group: Any = None,
) -> FisherOperator:
    """The Fisher, exact or Monte-Carlo (:class:`~curvscope.operators.FisherOperator`)."""
    return FisherOperator(_on(problem, group), kind=kind, mc_samples=mc_samples, seed=seed)


def empirical_fisher(problem: Problem, *, group: Any = None) -> EmpiricalFisherOperator:
    """The empirical Fisher (:class:`~curvscope.operators.EmpiricalFisherOperator`)."""
    return EmpiricalFisherOperator(_on(problem, group))


def pch(
    problem: Problem,
    *,
    mode: str = "abs",
    approximation: str = "expectation",
    group: Any = None,
) -> PCHOperator:
    """Chen et al.'s positive-curvature Hessian (:class:`~curvscope.operators.PCHOperator`)."""
    return PCHOperator(_on(problem, group), mode=mode, approximation=approximation)


def kfac(
    problem: Problem,
    *,
    fisher_type: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    group: Any = None,
) -> KFACOperator:
    """KFAC (:class:`~curvscope.operators.KFACOperator`)."""
    p = _on(problem, group)
    return KFACOperator(p, fisher_type=fisher_type, mc_samples=mc_samples, seed=seed)


def ekfac(
    problem: Problem,
    *,
    fisher_type: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    group: Any = None,
) -> EKFACOperator:
    """EKFAC (:class:`~curvscope.operators.EKFACOperator`)."""
    p = _on(problem, group)
    return EKFACOperator(p, fisher_type=fisher_type, mc_samples=mc_samples, seed=seed)


def lanczos(A: Any, *, top: int = 5, bottom: int = 0, **kwargs: Any):
    """Extreme eigenpairs of any symmetric operator by thick-restart Lanczos.

    Each eigenvalue carries its measured residual and an error bound. Returns the ``top``
    result (descending) when only ``top`` is asked for, the ``bottom`` one when only
    ``bottom`` is, else the list ``[top, bottom]``. Keyword arguments (``tol``, ``rtol``,
    ``basis_size``, ``max_matvecs``, ``v0``, ``seed``...) are those of
    :func:`curvscope.linalg.eigsh`.
    """
    res = eigsh(as_operator(A), top=top, bottom=bottom, **kwargs)
    return res[0] if len(res) == 1 else res


def document(
    result: Any,
    problem: Problem | None = None,
    *,
    command: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The result document the command line would write for ``result``.

    Args:
        result: a result object of :mod:`curvscope.diagnostics` (``spectrum``, ``density``,
            ``compare``, ``check``) or a surface.
        problem: the problem it was computed on (its ``input`` section).
        command: the command name (default: from the result's type).
        settings: the options used, recorded under ``settings``.
    """
    from .app import document as make

    name = command or _command_of(result)
    results = result.to_results() if hasattr(result, "to_results") else {name: result}
    return make(
        problem,
        name,
        settings=dict(settings or {}),
        results=results,
        started=time.perf_counter(),
        passes_before=problem.data_passes if problem is not None else 0,
        matvecs=int(getattr(result, "num_matvecs", 0)),
        notes=list(getattr(result, "notes", []) or []),
    )


def _command_of(result: Any) -> str:
    name = type(result).__name__.removesuffix("Result").lower()
    return {"spectrum": "spectrum", "density": "density", "compare": "compare",
            "check": "check", "surface": "surface"}.get(name, name)


def surface(problem: Problem, *, directions: Any = "eigen", model_sha256: str | None = None,
            **kwargs: Any):
    """The loss surface around the weights (:func:`curvscope.diagnostics.surface`).

    ``directions`` may also be a file, read here: an eigenvector file of ``spectrum
    --save-eigenvectors`` (checked against the model's parameters and, with
    ``model_sha256``, its checkpoint) or a ``.pt``/``.npy`` tensor ``[P]``/``[P, k]``.
    """
    from .diagnostics import DIRECTION_KINDS
    from .diagnostics import surface as _surface

    if isinstance(directions, (str, os.PathLike)) and str(directions) not in DIRECTION_KINDS:
        from .io import read_directions

        sha = model_sha256 or ((getattr(problem, "input_info", None) or {}).get("model") or {}).get(
            "sha256"
        )
        directions = read_directions(directions, problem.names, problem.shapes, model_sha256=sha)
    return _surface(problem, directions=directions, **kwargs)


def preconditioner(
    source: Any,
    model: Problem | torch.nn.Module,
    *,
    optimizer_key: str | None = None,
) -> Preconditioner:
    r"""The diagonal preconditioner :math:`P` of an adaptive optimiser, for a model's parameters.

    ``cs.preconditioned(cs.hessian(prob), cs.preconditioner(opt, prob))`` is
    :math:`P^{-1/2} H P^{-1/2}`, whose top eigenvalue is the preconditioned sharpness of Cohen
    et al. 2022 (docs/DESIGN.md "Preconditioned sharpness").

    Args:
        source: a live ``torch.optim`` optimiser (Adam, AdamW, RMSprop, Adagrad, or SGD for
            its threshold), an optimiser's ``state_dict()``, or a file: a checkpoint holding
            the state under ``optimizer``, ``optim``, ``opt`` or ``optimizer_state_dict``
            (or ``optimizer_key``), a bare ``opt.state_dict()``, or a dict parameter name ->
            tensor of :math:`P`'s diagonal.
        model: the problem (its selected parameters must be covered) or the module.
        optimizer_key: the key of the optimiser state in a checkpoint.

    Raises:
        CurvscopeError: one sentence naming what is missing or does not match.
    """
    module = model.model if isinstance(model, Problem) else model
    needed = list(model.names) if isinstance(model, Problem) else None
    named = [(n, tuple(p.shape)) for n, p in module.named_parameters()]
    if isinstance(source, torch.optim.Optimizer):
        return preconditioner_from_optimizer(source, module, needed=needed)
    if isinstance(source, dict) and "param_groups" in source:
        return preconditioner_from_state(source, named, needed=needed, source="state")
    return read_preconditioner(
        Path(source), named, optimizer_key=optimizer_key, needed=needed
    )
