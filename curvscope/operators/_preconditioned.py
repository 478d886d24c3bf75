r"""A curvature matrix seen through a diagonal preconditioner: :math:`P^{-1/2} A P^{-1/2}`.

Under an adaptive optimiser (Adam, RMSprop, Adagrad) the step is :math:`-\eta P^{-1} g`, so
the curvature the step sees is :math:`P^{-1} A` (Cohen et al. 2022, arXiv 2207.14484). That
matrix is not symmetric, but it is similar to :math:`P^{-1/2} A P^{-1/2}`
(:math:`P^{-1} A = P^{-1/2} (P^{-1/2} A P^{-1/2}) P^{1/2}`): the same eigenvalues, and a
symmetric matrix when :math:`A` is, so Lanczos with its residuals and error bounds applies
unchanged. An eigenvector :math:`u` of the symmetric form gives :math:`P^{-1/2} u`, an
eigenvector of :math:`P^{-1} A` (docs/DESIGN.md "Preconditioned sharpness").

Because :math:`P` is diagonal, a diagonal block of the symmetric form is the symmetric form
of :math:`A`'s block with :math:`P` restricted to it, so blocks follow :math:`A`'s blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from .._errors import OptionError
from ..linalg import BlocksOf, LinearOperator, as_operator

__all__ = ["PreconditionedOperator", "preconditioned"]


def _problem_of(op: Any) -> Any:
    """The problem behind an operator or the first of its terms that has one."""
    problem = getattr(op, "problem", None)
    if problem is not None:
        return problem
    for part in ("a", "b"):
        inner = getattr(op, part, None)
        if isinstance(inner, LinearOperator):
            found = _problem_of(inner)
            if found is not None:
                return found
    return None


def _param_names(A: LinearOperator) -> list[str] | None:
    problem = _problem_of(A)
    names = getattr(problem, "names", None)
    if names is None or sum(problem.numels) != A.shape[1]:
        return None
    return list(names)


class PreconditionedOperator(BlocksOf, LinearOperator):
    r""":math:`P^{-1/2} A P^{-1/2}` for a positive diagonal :math:`P` and any operator :math:`A`.

    Args:
        a: the matrix :math:`A` (any operator :func:`~curvscope.linalg.as_operator` takes).
        diagonal: :math:`P`'s diagonal, ``[n]``, positive; or an object with a
            ``diagonal(names)`` method (a :class:`curvscope.io.Preconditioner`) when ``a`` is a
            curvature operator with named parameters.
        name: the matrix name (default ``preconditioned <A's name>``).

    Attributes:
        a: the wrapped operator.
        scale: :math:`P^{-1/2}` as a column ``[n, 1]`` in the operator's dtype.
        source: the object the diagonal came from (kept for blocks).
    """

    def __init__(self, a: Any, diagonal: Any, *, name: str | None = None) -> None:
        a = as_operator(a)
        self.a = a
        self.source = diagonal
        d = self._flat(a, diagonal)
        if d.shape != (a.shape[1],):
            raise OptionError(
                f"the preconditioner's diagonal has {d.numel()} entries, the {a.name} matrix "
                f"{a.shape[1]} rows.",
                option="preconditioner",
            )
        if not bool((d > 0).all()) or not bool(torch.isfinite(d).all()):
            raise OptionError(
                "the preconditioner's diagonal must be positive and finite.",
                option="preconditioner",
            )
        super().__init__(
            a.shape, dtype=a.dtype, device=a.device, name=name or f"preconditioned {a.name}"
        )
        self.diagonal = d.to(torch.float64)
        self.scale = d.to(torch.float64).rsqrt().to(device=a.device, dtype=a.dtype)[:, None]
        self.SELF_ADJOINT = a.SELF_ADJOINT
        self.notes = list(a.notes)

    @staticmethod
    def _flat(a: LinearOperator, diagonal: Any) -> torch.Tensor:
        if not isinstance(diagonal, torch.Tensor) and callable(getattr(diagonal, "diagonal", None)):
            names = _param_names(a)
            if names is None:
                raise OptionError(
                    f"the {a.name} operator has no named parameters to look the "
                    "preconditioner's entries up by; pass its diagonal as a tensor.",
                    option="preconditioner",
                )
            return diagonal.diagonal(names).detach().reshape(-1)
        return torch.as_tensor(diagonal).detach().reshape(-1)

    @property
    def roundoff_eps(self) -> float:
        """The wrapped operator's round-off."""
        return self.a.roundoff_eps

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.a @ (self.scale * V))

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.scale * self.a.rmatmat(self.scale * V)

    # --------------------------------------------------------------- blocks (A's: BlocksOf)
    def on_subset(self, size: int, seed: int | torch.Generator) -> LinearOperator:
        """The same preconditioner on ``A``'s data subset."""
        return PreconditionedOperator(self.a.on_subset(size, seed), self.diagonal, name=self.name)

    def block(self, name: str) -> LinearOperator:
        """``P_b^{-1/2} A_b P_b^{-1/2}`` of the diagonal block ``A_b`` (exact: P is diagonal)."""
        if name == "all":
            return self
        sub = self.a.block(name)
        label = f"{self.name}[{name}]"
        problem = _problem_of(self.a)
        parts = self.a.block_parts(name) if problem is not None else []
        if parts:
            order = {n: i for i, n in enumerate(problem.names)}
            starts = dict(zip(problem.names, problem.offsets, strict=False))
            idx = torch.cat(
                [
                    torch.arange(starts[n], starts[n] + problem.numels[order[n]])
                    for n in sorted(parts, key=order.__getitem__)
                ]
            )
        elif name in getattr(self.a, "_blocks", {}):
            index = self.a._blocks[name]
            idx = torch.arange(self.a.shape[1])[index] if isinstance(index, slice) else index
            idx = torch.as_tensor(idx)
        else:
            raise OptionError(
                f"block {name!r} of the {self.a.name} matrix names no parameters or indices, "
                "so the preconditioner cannot be restricted to it.",
                block=name,
            )
        idx = idx.reshape(-1).long()
        if sub.shape[0] != idx.numel():
            raise OptionError(
                f"block {name!r} of the {self.a.name} matrix has {sub.shape[0]} rows but its "
                f"parameters {idx.numel()}; the preconditioner cannot be restricted to it.",
                block=name,
            )
        return PreconditionedOperator(sub, self.diagonal[idx], name=label)


def preconditioned(
    a: Any, preconditioner: Any, *, name: str | None = None
) -> PreconditionedOperator:
    r""":math:`P^{-1/2} A P^{-1/2}`, whose eigenvalues are those of :math:`P^{-1} A`.

    Args:
        a: a curvature operator (``cs.hessian(prob)``) or any operator.
        preconditioner: a :class:`curvscope.io.Preconditioner` (from a checkpoint, a file or
            a live optimiser; looked up by ``a``'s parameter names) or :math:`P`'s diagonal
            as a tensor ``[n]``.
        name: the matrix name (default ``preconditioned <name>``).
    """
    return PreconditionedOperator(a, preconditioner, name=name)
