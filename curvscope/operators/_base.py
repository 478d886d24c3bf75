"""The one abstraction every curvature matrix shares: :class:`CurvatureOperator`.

An operator is a symmetric ``P x P`` matrix we can multiply by. The base class owns the data
loop (through :class:`~curvscope.problem.Problem`), shape and dtype checks, the weight-decay
term, counting of products, ``to_scipy()``, ``dense()``, ``block(name)`` and lazy sums and
scalings (``H + 1e-3 * I``), as in ``scipy.sparse.linalg.LinearOperator``. A subclass
implements only ``_batch_matmat(batch, V)``: its share of ``A @ V`` for one batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._errors import NonFiniteError, OptionError
from ..problem import Batch, Problem

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "IdentityOperator",
    "ScaledOperator",
    "SumOperator",
]

DENSE_LIMIT = 8192
"""Largest dimension for which ``dense()`` builds the matrix without ``force=True``."""


class CurvatureOperator:
    """A symmetric linear operator on the flat vector of the selected parameters.

    Subclasses set :attr:`name` (the matrix name used in result documents) and implement
    :meth:`_batch_matmat`; operators that are not sums over the data override :meth:`_matmat`.

    Attributes:
        problem: the problem the matrix belongs to (``None`` for plain matrices).
        num_matvecs: matrix-vector products so far, counted per column.
        notes: sentences about how products are computed, for the result document.
    """

    name: str = "operator"
    is_symmetric: bool = True
    includes_weight_decay: bool = True

    def __init__(self, problem: Problem | None, **knobs: Any) -> None:
        self.problem = problem
        self._knobs = knobs
        self.num_matvecs = 0
        self.notes: list[str] = []

    # --------------------------------------------------------------- description
    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``."""
        n = self.problem.num_params
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of products (that of the parameters)."""
        return self.problem.dtype

    @property
    def device(self) -> torch.device:
        """Device of products (that of the parameters)."""
        return self.problem.device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"

    # --------------------------------------------------------------- products
    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for one vector ``[P]``."""
        return self.matmat(v)

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for a vector ``[P]`` or ``k`` columns ``[P, k]`` at once.

        Raises:
            OptionError: when ``v`` does not have ``P`` rows.
            NonFiniteError: when the product holds NaN or Inf.
        """
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)
        single = v.dim() == 1
        V = v.reshape(-1, 1) if single else v
        if V.dim() != 2 or V.shape[0] != self.shape[1]:
            raise OptionError(
                f"{self.name}: cannot multiply a {self.shape[0]}x{self.shape[1]} operator by a "
                f"tensor of shape {tuple(v.shape)}."
            )
        V = V.to(device=self.device, dtype=self.dtype)
        if V.shape[1] == 0:
            out = torch.zeros_like(V)
        else:
            out = self._matmat(V)
        self.num_matvecs += V.shape[1]
        if not torch.isfinite(out).all():
            raise NonFiniteError(
                f"the {self.name} product holds NaN or Inf: the model's loss or its derivatives "
                "overflow at these weights (try --dtype float64 or check the weights)."
            )
        return out[:, 0] if single else out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Sum of per-batch products over one pass, plus the weight-decay term."""
        out = torch.zeros_like(V)
        for batch in self.problem.batches():
            out += self._batch_matmat(batch, V)
        if self.includes_weight_decay and self.problem.weight_decay:
            out += self.problem.weight_decay * V
        return out

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        """This batch's weighted share of ``A @ V`` (``V``: ``[P, k]``)."""
        raise NotImplementedError

    # --------------------------------------------------------------- views
    def block(self, name: str) -> CurvatureOperator:
        """The diagonal block of this matrix for one parameter, one module or ``"all"``.

        For matrices defined through the loss (Hessian, GGN, Fisher...) the diagonal block of
        a parameter subset is the same matrix built for that subset alone, so the block is
        computed directly rather than by slicing full products.
        """
        names = self.problem.block_param_names(name)
        if names == list(self.problem.names):
            return self
        sub = self.problem.select(names)
        return self._with_problem(sub)

    def _with_problem(self, problem: Problem) -> CurvatureOperator:
        """The same kind of matrix over another parameter selection."""
        return type(self)(problem, **self._knobs)

    def dense(self, *, force: bool = False, chunk: int = 64) -> torch.Tensor:
        """The full matrix, built from products with identity columns (small problems only).

        Raises:
            OptionError: when ``P`` exceeds :data:`DENSE_LIMIT` and ``force`` is not set.
        """
        n = self.shape[0]
        if n > DENSE_LIMIT and not force:
            raise OptionError(
                f"the {self.name} matrix has {n} rows; building it densely is refused above "
                f"{DENSE_LIMIT} (select fewer parameters with --params)."
            )
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        cols = [self @ eye[:, i : i + chunk] for i in range(0, n, chunk)]
        return torch.cat(cols, dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) for ``eigsh``."""
        from scipy.sparse.linalg import LinearOperator

        def mm(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype)
            return (self @ t).detach().cpu().to(torch.float64).numpy()

        return LinearOperator(
            self.shape, matvec=mm, rmatvec=mm, matmat=mm, rmatmat=mm, dtype=np.float64
        )

    # --------------------------------------------------------------- algebra
    def __add__(self, other: CurvatureOperator) -> CurvatureOperator:
        return SumOperator(self, other)

    def __sub__(self, other: CurvatureOperator) -> CurvatureOperator:
        return SumOperator(self, ScaledOperator(-1.0, other))

    def __mul__(self, alpha: float) -> CurvatureOperator:
        return ScaledOperator(float(alpha), self)

    __rmul__ = __mul__

    def __neg__(self) -> CurvatureOperator:
        return ScaledOperator(-1.0, self)


class _Standalone(CurvatureOperator):
    """An operator with an explicit shape, dtype and device (no problem behind it)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(None)
        self._n = int(n)
        self._dtype = dtype
        self._device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return (self._n, self._n)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of products."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of products."""
        return self._device


class DenseOperator(_Standalone):
    """A plain symmetric matrix as an operator; the test double for solvers and estimators.

    Args:
        matrix: a square tensor.
        blocks: optional block name -> index slice, for :meth:`block`.
    """

    name = "dense"

    def __init__(self, matrix: torch.Tensor, *, blocks: dict[str, slice] | None = None) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise OptionError(f"DenseOperator needs a square matrix, got {tuple(matrix.shape)}.")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix
        self.blocks = dict(blocks or {})
        self.is_symmetric = bool(torch.allclose(matrix, matrix.T))

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V

    def block(self, name: str) -> CurvatureOperator:
        """The diagonal block ``name`` from the ``blocks`` given at construction."""
        if name == "all":
            return self
        if name not in self.blocks:
            valid = ", ".join(["all", *self.blocks])
            raise OptionError(f"block {name!r} does not exist; valid blocks: {valid}.")
        s = self.blocks[name]
        return DenseOperator(self.matrix[s, s])

    def dense(self, *, force: bool = False, chunk: int = 64) -> torch.Tensor:
        """The matrix itself."""
        return self.matrix


class IdentityOperator(_Standalone):
    """The identity ``I`` of size ``n`` (use ``alpha * I`` for damping)."""

    name = "identity"

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return V.clone()

    def block(self, name: str) -> CurvatureOperator:
        """Identity blocks are identities; only ``"all"`` is known without a problem."""
        if name == "all":
            return self
        raise OptionError("an identity operator has no named blocks; use it on the block's size.")


class SumOperator(CurvatureOperator):
    """``A + B``, evaluated lazily."""

    def __init__(self, a: CurvatureOperator, b: CurvatureOperator) -> None:
        if a.shape != b.shape:
            raise OptionError(f"cannot add operators of shapes {a.shape} and {b.shape}.")
        super().__init__(a.problem or b.problem)
        self.a, self.b = a, b
        self.name = f"{a.name}+{b.name}"
        self.is_symmetric = a.is_symmetric and b.is_symmetric

    shape = property(lambda self: self.a.shape, doc="Shape of the sum.")
    dtype = property(lambda self: self.a.dtype, doc="Dtype of the sum.")
    device = property(lambda self: self.a.device, doc="Device of the sum.")

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.a @ V + self.b @ V

    def block(self, name: str) -> CurvatureOperator:
        """Sum of the blocks (an identity term becomes the identity of the block's size)."""
        if _identity_like(self.a):
            b = self.b.block(name)
            return SumOperator(_resized(self.a, b.shape[0]), b)
        a = self.a.block(name)
        b = _resized(self.b, a.shape[0]) if _identity_like(self.b) else self.b.block(name)
        return SumOperator(a, b)


def _identity_like(op: CurvatureOperator) -> bool:
    if isinstance(op, IdentityOperator):
        return True
    return isinstance(op, ScaledOperator) and _identity_like(op.a)


def _resized(op: CurvatureOperator, n: int) -> CurvatureOperator:
    if isinstance(op, IdentityOperator):
        return IdentityOperator(n, op.dtype, op.device)
    return ScaledOperator(op.alpha, _resized(op.a, n))


class ScaledOperator(CurvatureOperator):
    """``alpha * A``, evaluated lazily."""

    def __init__(self, alpha: float, a: CurvatureOperator) -> None:
        super().__init__(a.problem)
        self.alpha, self.a = float(alpha), a
        self.name = f"{alpha:g}*{a.name}"
        self.is_symmetric = a.is_symmetric

    shape = property(lambda self: self.a.shape, doc="Shape of the product.")
    dtype = property(lambda self: self.a.dtype, doc="Dtype of the product.")
    device = property(lambda self: self.a.device, doc="Device of the product.")

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.alpha * (self.a @ V)

    def block(self, name: str) -> CurvatureOperator:
        """The scaled block."""
        return ScaledOperator(self.alpha, self.a.block(name))
