r"""The pure linear-operator type every algorithm in :mod:`curvscope.linalg` works on.

:class:`LinearOperator` knows its shape, dtype and device, multiplies a vector ``[n]`` or a
block of columns ``[n, k]`` (``A @ V``), counts its products, declares whether it is
self-adjoint (a class constant, never an ``allclose`` per product), and combines lazily as
in ``scipy.sparse.linalg``: ``A + B``, ``alpha * A``, ``A - B``, ``A @ B`` (composition),
``A.T``. ``A.block(name)`` is the diagonal block of a named index set, and
``A.to_scipy(dtype=...)`` hands the operator to scipy with its adjoint honoured.

Nothing here knows about models or data: :class:`~curvscope.operators.CurvatureOperator`
derives from this type and adds the data loop. :func:`as_operator` is the one coercion:
a torch or numpy matrix, a scipy ``LinearOperator``, a callable ``V -> A V`` with a size, or
another library's PyTorch operator (duck-typed, e.g. curvlinops'), so that every algorithm
and diagnostic takes any of them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from .._errors import NonFiniteError, OptionError, arg

__all__ = [
    "BlocksOf",
    "DENSE_LIMIT",
    "AdjointOperator",
    "CallableOperator",
    "ComposedOperator",
    "DenseOperator",
    "IdentityOperator",
    "IndexBlockOperator",
    "LinearOperator",
    "ScaledOperator",
    "SumOperator",
    "as_operator",
    "identity_like",
]

DENSE_LIMIT = 8192
"""Largest dimension for which ``dense()`` builds the matrix without ``force=True``."""


def _as_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


class LinearOperator:
    r"""A linear map :math:`\mathbb{R}^n \to \mathbb{R}^m` we can multiply by.

    Subclasses implement :meth:`_matmat` (``[n, k] -> [m, k]``) and, unless they are
    self-adjoint, :meth:`_rmatmat`. Everything else (checks, casts, product counting, the
    non-finite guard, algebra, blocks, scipy export) lives here.

    Args:
        shape: ``(m, n)``; subclasses whose shape is computed may override :attr:`shape`.
        dtype: dtype of products.
        device: device of products.
        blocks: optional named index sets (name -> index tensor or slice) for
            :meth:`block`, e.g. one per layer.
        name: the matrix name used in result documents.

    Attributes:
        SELF_ADJOINT: class constant; ``True`` when the operator is symmetric by
            construction, so ``A.T`` is ``A`` and algorithms for symmetric matrices accept it.
        num_matvecs: products so far, counted per column.
        notes: sentences about how products are computed, for the result document.
    """

    SELF_ADJOINT: ClassVar[bool] = False
    name: str = "operator"

    def __init__(
        self,
        shape: tuple[int, int] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        blocks: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        if shape is not None:
            self._shape = (int(shape[0]), int(shape[1]))
        if dtype is not None:
            self._dtype = dtype
        if device is not None or not hasattr(self, "_device"):
            self._device = _as_device(device)
        self._blocks = dict(blocks or {})
        if name is not None:
            self.name = name
        self.num_matvecs = 0
        self.notes: list[str] = []

    # --------------------------------------------------------------- description
    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of products."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of products."""
        return self._device

    @property
    def roundoff_eps(self) -> float:
        """Machine epsilon of the least precise arithmetic inside a product.

        The dtype's epsilon, unless a part computes in a lower precision (a model that casts
        to float32 inside a float64 run): error bounds and floors use this one.
        """
        eps = float(torch.finfo(self.dtype).eps)
        for part in (getattr(self, "a", None), getattr(self, "b", None)):
            if isinstance(part, LinearOperator):
                eps = max(eps, part.roundoff_eps)
        return eps

    @property
    def check_eps(self) -> float:
        """The round-off of :meth:`accurate`'s products (the least precise part's)."""
        eps = float(torch.finfo(self.dtype).eps)
        for part in (getattr(self, "a", None), getattr(self, "b", None)):
            if isinstance(part, LinearOperator):
                eps = max(eps, part.check_eps)
        return eps

    def accurate(self) -> LinearOperator:
        """The operator for final residual checks: the same matrix in its most exact products.

        ``self``, unless a part computes in a lower precision than its vectors (a bfloat16
        model) and can compute in theirs; composites rebuild themselves over their parts'.
        """
        parts = {
            key: part for key in ("a", "b")
            if isinstance(part := getattr(self, key, None), LinearOperator)
        }
        swapped = {key: part.accurate() for key, part in parts.items()}
        if all(swapped[key] is parts[key] for key in parts):
            return self
        out = copy.copy(self)
        out.__dict__.update(swapped)
        return out

    @property
    def is_symmetric(self) -> bool:
        """Whether the operator is self-adjoint (:attr:`SELF_ADJOINT`)."""
        return bool(self.SELF_ADJOINT)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, shape={self.shape}, dtype={self.dtype})"

    # --------------------------------------------------------------- products
    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return ComposedOperator(self, other)
        return self.matmat(other)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for one vector ``[n]``."""
        return self.matmat(v)

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for a vector ``[n]`` or ``k`` columns ``[n, k]`` at once.

        Raises:
            OptionError: when ``v`` does not have ``n`` rows.
            NonFiniteError: when the product holds NaN or Inf.
        """
        return self._apply(v, adjoint=False)

    def rmatmat(self, v: torch.Tensor) -> torch.Tensor:
        """``A^T @ V`` (the adjoint product)."""
        return self._apply(v, adjoint=True)

    def _apply(self, v: Any, *, adjoint: bool) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(np.asarray(v))
        single = v.dim() == 1
        V = v.reshape(-1, 1) if single else v
        rows = self.shape[0] if adjoint else self.shape[1]
        if V.dim() != 2 or V.shape[0] != rows:
            raise OptionError(
                f"cannot multiply the {self.shape[0]}x{self.shape[1]} {self.name} operator"
                f"{' (adjoint)' if adjoint else ''} by a tensor of shape {tuple(v.shape)}."
            )
        V = V.to(device=self.device, dtype=self.dtype)
        if V.shape[1] == 0:
            out = V.new_zeros(self.shape[1] if adjoint else self.shape[0], 0)
        elif adjoint and not self.SELF_ADJOINT:
            out = self._rmatmat(V)
        else:
            out = self._matmat(V)
        self.num_matvecs += V.shape[1]
        if not torch.isfinite(out).all():
            raise NonFiniteError(
                f"the {self.name} product holds NaN or Inf: the model's loss or its derivatives "
                f"overflow at these weights (try {arg('dtype')} float64 or check the weights).",
                matrix=self.name,
            )
        return out[:, 0] if single else out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` of shape ``[n, k]`` on the operator's device and dtype."""
        raise NotImplementedError

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A^T @ V``; only needed when the operator is not self-adjoint."""
        raise NotImplementedError(f"{type(self).__name__} has no adjoint product.")

    # --------------------------------------------------------------- algebra
    @property
    def T(self) -> LinearOperator:  # noqa: N802 - numpy/scipy name
        """The adjoint (the operator itself when self-adjoint)."""
        return self if self.SELF_ADJOINT else AdjointOperator(self)

    def adjoint(self) -> LinearOperator:
        """The adjoint operator."""
        return self.T

    def __add__(self, other: Any) -> LinearOperator:
        if isinstance(other, (int, float)) and other == 0:
            return self
        return SumOperator(self, as_operator(other))

    def __radd__(self, other: Any) -> LinearOperator:
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        return SumOperator(as_operator(other), self)

    def __sub__(self, other: Any) -> LinearOperator:
        return SumOperator(self, ScaledOperator(-1.0, as_operator(other)))

    def __mul__(self, alpha: Any) -> LinearOperator:
        if not isinstance(alpha, (int, float)) and not (
            isinstance(alpha, torch.Tensor) and alpha.numel() == 1
        ):
            return NotImplemented
        return ScaledOperator(float(alpha), self)

    __rmul__ = __mul__

    def __truediv__(self, alpha: float) -> LinearOperator:
        return ScaledOperator(1.0 / float(alpha), self)

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(-1.0, self)

    # --------------------------------------------------------------- blocks
    def block_names(self) -> list[str]:
        """Names accepted by :meth:`block` besides ``"all"``."""
        return list(self._blocks)

    def named_blocks(self, mode: str) -> list[str]:
        """Block names for a blocking mode: ``all``, ``per-layer``, ``per-param``, ``per-group``.

        A plain operator knows only the named index sets it was given, whatever the mode.

        Raises:
            OptionError: when the operator has no named blocks.
        """
        if mode == "all":
            return ["all"]
        names = self.block_names()
        if not names:
            raise OptionError(
                f"the {self.name} operator has no named blocks, so {arg('blocks')} {mode!r} "
                "cannot split it (give it blocks, or analyse it whole).",
                option="blocks",
            )
        return names

    def block_parts(self, name: str) -> list[str]:
        """The parameter names a block consists of, where the operator knows them."""
        return []

    def on_subset(self, size: int, seed: int | torch.Generator) -> LinearOperator:
        """The same matrix on a random subset of the data (operators built from data only).

        Raises:
            OptionError: for an operator with no data behind it.
        """
        raise OptionError(
            f"the {self.name} operator has no data to draw subsets from; {arg('repeats')} "
            "needs a curvature operator built from a problem.",
            option="repeats",
        )

    def block(self, name: str) -> LinearOperator:
        """The diagonal block of the named index set (``"all"``: the operator itself).

        Without a cheaper way known to the operator, a block product embeds the columns in
        the full space and restricts the full product (one full product per block product).

        Raises:
            OptionError: for an unknown block name, listing the valid ones.
        """
        if name == "all":
            return self
        if name not in self._blocks:
            valid = ", ".join(["all", *self.block_names()])
            raise OptionError(
                f"block {name!r} does not exist for the {self.name} operator; valid blocks: "
                f"{valid}.",
                block=name,
            )
        return IndexBlockOperator(self, self._blocks[name], name=f"{self.name}[{name}]")

    # --------------------------------------------------------------- exports
    def dense(self, *, force: bool = False, chunk: int = 64) -> torch.Tensor:
        """The full matrix, built from products with identity columns (small operators only).

        Raises:
            OptionError: when the operator has more than :data:`DENSE_LIMIT` columns and
                ``force`` is not set.
        """
        m, n = self.shape
        if max(m, n) > DENSE_LIMIT and not force:
            raise OptionError(
                f"the {self.name} matrix has {n} columns; building it densely is refused above "
                f"{DENSE_LIMIT} (select fewer parameters with {arg('params')})."
            )
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        cols = [self @ eye[:, i : i + chunk] for i in range(0, n, chunk)]
        return torch.cat(cols, dim=1)

    def to_scipy(self, dtype: Any = np.float64):
        """A ``scipy.sparse.linalg.LinearOperator`` (numpy in and out) with the adjoint.

        Args:
            dtype: numpy dtype of the vectors scipy sees (products still run in the
                operator's own dtype and device).
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        np_dtype = np.dtype(dtype)

        def apply(x: np.ndarray, adjoint: bool) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype)
            out = self.rmatmat(t) if adjoint else self.matmat(t)
            return out.detach().cpu().numpy().astype(np_dtype, copy=False)

        return ScipyLinearOperator(
            self.shape,
            matvec=lambda x: apply(x, False),
            rmatvec=lambda x: apply(x, True),
            matmat=lambda x: apply(x, False),
            rmatmat=lambda x: apply(x, True),
            dtype=np_dtype,
        )


class DenseOperator(LinearOperator):
    """A plain matrix as an operator; the test double for solvers and estimators.

    Args:
        matrix: a 2-D tensor (or array).
        blocks: optional block name -> index slice (or index tensor), for :meth:`block`.
        symmetric: declare the matrix symmetric (default: checked once here, never per
            product).
        name: matrix name.
    """

    name = "dense"

    def __init__(
        self,
        matrix: torch.Tensor,
        *,
        blocks: Mapping[str, Any] | None = None,
        symmetric: bool | None = None,
        name: str | None = None,
    ) -> None:
        matrix = torch.as_tensor(matrix)
        if matrix.dim() != 2:
            raise OptionError(f"a dense operator needs a matrix, got shape {tuple(matrix.shape)}.")
        super().__init__(
            tuple(matrix.shape), dtype=matrix.dtype, device=matrix.device, blocks=blocks, name=name
        )
        self.matrix = matrix
        if symmetric is None:
            symmetric = matrix.shape[0] == matrix.shape[1] and bool(
                torch.allclose(matrix, matrix.T)
            )
        # an instance-level declaration: the class constant is a default for the type
        self.SELF_ADJOINT = bool(symmetric)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix.T @ V

    def block(self, name: str) -> LinearOperator:
        """The diagonal block ``name``, sliced from the matrix."""
        if name == "all":
            return self
        if name not in self._blocks:
            return super().block(name)  # raises with the valid names
        idx = self._blocks[name]
        sub = self.matrix[idx][:, idx]
        return DenseOperator(sub, symmetric=self.SELF_ADJOINT, name=f"{self.name}[{name}]")

    def dense(self, *, force: bool = False, chunk: int = 64) -> torch.Tensor:
        """The matrix itself."""
        return self.matrix


class IdentityOperator(LinearOperator):
    """The identity ``I`` of size ``n`` (``alpha * I`` for damping or a shift)."""

    SELF_ADJOINT = True
    name = "identity"

    def __init__(
        self, n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__((n, n), dtype=dtype, device=device)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return V.clone()

    def block(self, name: str) -> LinearOperator:
        """Blocks of the identity are identities; their size comes from the other term of a sum."""
        if name == "all":
            return self
        raise OptionError(
            "an identity operator has no named blocks of its own; add it to an operator that "
            "has them (H + 1e-3 * identity_like(H)) and take the block of the sum."
        )


def identity_like(A: LinearOperator) -> IdentityOperator:
    """The identity with the size, dtype and device of ``A`` (to write ``H + 1e-3 * I``)."""
    A = as_operator(A)
    return IdentityOperator(A.shape[1], A.dtype, A.device)


def _identity_like(op: LinearOperator) -> bool:
    if isinstance(op, IdentityOperator):
        return True
    return isinstance(op, ScaledOperator) and _identity_like(op.a)


def _resized(op: LinearOperator, n: int) -> LinearOperator:
    if isinstance(op, IdentityOperator):
        return IdentityOperator(n, op.dtype, op.device)
    return ScaledOperator(op.alpha, _resized(op.a, n))


class SumOperator(LinearOperator):
    """``A + B``, evaluated lazily."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.shape != b.shape:
            raise OptionError(f"cannot add operators of shapes {a.shape} and {b.shape}.")
        super().__init__(a.shape, dtype=a.dtype, device=a.device, name=f"{a.name}+{b.name}")
        self.a, self.b = a, b
        self.SELF_ADJOINT = a.SELF_ADJOINT and b.SELF_ADJOINT
        self.notes = [*a.notes, *(n for n in b.notes if n not in a.notes)]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.a @ V + self.b @ V

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.a.rmatmat(V) + self.b.rmatmat(V)

    def named_blocks(self, mode: str) -> list[str]:
        """Block names of the non-identity terms for ``mode``."""
        if mode == "all":
            return ["all"]
        terms = [t for t in (self.a, self.b) if not _identity_like(t)]
        names: list[str] = []
        for t in terms:
            names += [n for n in t.named_blocks(mode) if n not in names]
        return names

    def block_parts(self, name: str) -> list[str]:
        """The parameter names of the block in a non-identity term."""
        term = self.b if _identity_like(self.a) else self.a
        return term.block_parts(name)

    def on_subset(self, size: int, seed: int | torch.Generator) -> LinearOperator:
        """The sum on a data subset (an identity term stays as it is)."""
        a = self.a if _identity_like(self.a) else self.a.on_subset(size, seed)
        b = self.b if _identity_like(self.b) else self.b.on_subset(size, seed)
        return SumOperator(a, b)

    def block_names(self) -> list[str]:
        """The block names of the non-identity terms."""
        names = [] if _identity_like(self.a) else self.a.block_names()
        more = [] if _identity_like(self.b) else self.b.block_names()
        return names + [n for n in more if n not in names]

    def block(self, name: str) -> LinearOperator:
        """Sum of the blocks (an identity term becomes the identity of the block's size)."""
        if name == "all":
            return self
        if _identity_like(self.a):
            b = self.b.block(name)
            return SumOperator(_resized(self.a, b.shape[0]), b)
        a = self.a.block(name)
        b = _resized(self.b, a.shape[0]) if _identity_like(self.b) else self.b.block(name)
        return SumOperator(a, b)


class BlocksOf:
    """Block names of a wrapper operator: those of the operator ``a`` it wraps.

    For operators that change the values of ``a`` but not its parameter layout (a scaling,
    a diagonal preconditioning): their blocks are ``a``'s.
    """

    a: LinearOperator

    def block_names(self) -> list[str]:
        """The wrapped operator's block names."""
        return self.a.block_names()

    def named_blocks(self, mode: str) -> list[str]:
        """The wrapped operator's block names for ``mode``."""
        return self.a.named_blocks(mode)

    def block_parts(self, name: str) -> list[str]:
        """The wrapped operator's block parts."""
        return self.a.block_parts(name)


class ScaledOperator(BlocksOf, LinearOperator):
    """``alpha * A``, evaluated lazily."""

    def __init__(self, alpha: float, a: LinearOperator) -> None:
        super().__init__(a.shape, dtype=a.dtype, device=a.device, name=f"{alpha:g}*{a.name}")
        self.alpha, self.a = float(alpha), a
        self.SELF_ADJOINT = a.SELF_ADJOINT
        self.notes = list(a.notes)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.alpha * (self.a @ V)

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.a.rmatmat(V)

    def on_subset(self, size: int, seed: int | torch.Generator) -> LinearOperator:
        """The scaled operator on a data subset."""
        return ScaledOperator(self.alpha, self.a.on_subset(size, seed))

    def block(self, name: str) -> LinearOperator:
        """The scaled block."""
        return self if name == "all" else ScaledOperator(self.alpha, self.a.block(name))


class ComposedOperator(LinearOperator):
    """``A @ B`` (apply ``B`` first), evaluated lazily; not self-adjoint in general."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.shape[1] != b.shape[0]:
            raise OptionError(f"cannot compose operators of shapes {a.shape} and {b.shape}.")
        super().__init__(
            (a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device, name=f"{a.name}@{b.name}"
        )
        self.a, self.b = a, b

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.a @ (self.b @ V)

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.b.rmatmat(self.a.rmatmat(V))


class AdjointOperator(LinearOperator):
    """``A^T`` of an operator that is not self-adjoint."""

    def __init__(self, a: LinearOperator) -> None:
        super().__init__(
            (a.shape[1], a.shape[0]), dtype=a.dtype, device=a.device, name=f"{a.name}^T"
        )
        self.a = a

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.a.rmatmat(V)

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.a @ V

    @property
    def T(self) -> LinearOperator:  # noqa: N802
        """The original operator."""
        return self.a


class IndexBlockOperator(LinearOperator):
    """The diagonal block ``A[idx, idx]`` by embedding, one full product per block product."""

    def __init__(self, a: LinearOperator, index: Any, *, name: str | None = None) -> None:
        n = a.shape[1]
        idx = torch.arange(n)[index] if isinstance(index, slice) else torch.as_tensor(index)
        idx = idx.reshape(-1).to(torch.long)
        k = idx.numel()
        super().__init__((k, k), dtype=a.dtype, device=a.device, name=name or f"{a.name}[block]")
        self.a = a
        self.index = idx.to(a.device)
        self.SELF_ADJOINT = a.SELF_ADJOINT

    def _embed(self, V: torch.Tensor) -> torch.Tensor:
        full = V.new_zeros(self.a.shape[1], V.shape[1])
        full[self.index] = V
        return full

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return (self.a @ self._embed(V))[self.index]

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.a.rmatmat(self._embed(V))[self.index]


class CallableOperator(LinearOperator):
    """An operator from a function ``V [n, k] -> A V [n, k]`` (see :func:`as_operator`)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        n: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        symmetric: bool,
        rfn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__((n, n), dtype=dtype, device=device, name=name or "operator")
        self.fn, self.rfn = fn, rfn
        self.SELF_ADJOINT = bool(symmetric)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.fn(V)
        return torch.as_tensor(out).reshape(V.shape[0], V.shape[1]).to(V)

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.rfn is None:
            raise NotImplementedError("this callable operator was given no adjoint function.")
        return torch.as_tensor(self.rfn(V)).reshape(V.shape[0], V.shape[1]).to(V)


class _ScipyWrapped(LinearOperator):
    """A scipy ``LinearOperator`` (numpy float64 products on the CPU)."""

    def __init__(self, op: Any, *, symmetric: bool | None, name: str | None) -> None:
        dtype = torch.float32 if np.dtype(op.dtype) == np.float32 else torch.float64
        super().__init__(tuple(op.shape), dtype=dtype, device="cpu", name=name or "scipy")
        self.op = op
        sym = getattr(op, "SELF_ADJOINT", None) if symmetric is None else symmetric
        self.SELF_ADJOINT = bool(sym) if sym is not None else op.shape[0] == op.shape[1]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.op.matmat(V.detach().cpu().numpy())
        return torch.from_numpy(np.asarray(out)).to(V)

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.op.rmatmat(V.detach().cpu().numpy())
        return torch.from_numpy(np.asarray(out)).to(V)


class _TorchWrapped(LinearOperator):
    """Another library's PyTorch operator (shape, dtype, device, ``@`` on ``[n, k]``).

    curvlinops' ``PyTorchLinearOperator`` is the model: ``SELF_ADJOINT``, ``shape``,
    ``dtype``, ``device`` and ``op @ V`` for a tensor ``V`` of shape ``[n, k]``; its adjoint
    is ``op.adjoint()``. Nothing of that library is imported here.
    """

    def __init__(self, op: Any, *, symmetric: bool | None, name: str | None) -> None:
        shape = tuple(int(s) for s in op.shape)
        super().__init__(
            shape,
            dtype=getattr(op, "dtype", torch.float32),
            device=getattr(op, "device", "cpu"),
            name=name or type(op).__name__,
        )
        self.op = op
        sym = getattr(op, "SELF_ADJOINT", None) if symmetric is None else symmetric
        # an operator that declares nothing is taken as symmetric when square, as a callable
        self.SELF_ADJOINT = bool(sym) if sym is not None else shape[0] == shape[1]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.op @ V
        return torch.as_tensor(out).reshape(self.shape[0], V.shape[1]).to(V)

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        adj = self.op.adjoint() if hasattr(self.op, "adjoint") else self.op.T
        return torch.as_tensor(adj @ V).reshape(self.shape[1], V.shape[1]).to(V)


def _is_scipy_operator(obj: Any) -> bool:
    try:
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
    except ImportError:  # pragma: no cover - scipy is a dependency
        return False
    return isinstance(obj, ScipyLinearOperator)


def as_operator(
    A: Any,
    *,
    size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    symmetric: bool | None = None,
    name: str | None = None,
) -> LinearOperator:
    """The operator behind ``A``: the one coercion every algorithm applies to its input.

    Accepts:

    - a :class:`LinearOperator` (returned as it is);
    - a square torch tensor or numpy array (:class:`DenseOperator`);
    - a ``scipy.sparse.linalg.LinearOperator`` (products in numpy on the CPU);
    - a callable ``V [n, k] -> A V [n, k]`` together with ``size=n`` (``dtype`` and
      ``device`` default to float64 and the CPU; ``symmetric`` defaults to ``True``);
    - another library's PyTorch operator with ``shape``, ``dtype``, ``device`` and ``@``
      (such as curvlinops' operators; recognised by those attributes, never imported).

    Args:
        A: the matrix or operator.
        size: ``n`` for a callable.
        dtype: dtype for a callable.
        device: device for a callable.
        symmetric: declare symmetry (callables, wrapped operators); default as described.
        name: the name results use.

    Raises:
        OptionError: for anything else, or a callable without ``size``.
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(A)
        if t.dim() != 2:
            raise OptionError(f"a matrix operand needs 2 dimensions, got {tuple(t.shape)}.")
        return DenseOperator(t, symmetric=symmetric, name=name)
    if _is_scipy_operator(A):
        return _ScipyWrapped(A, symmetric=symmetric, name=name)
    if hasattr(A, "shape") and hasattr(A, "__matmul__") and hasattr(A, "dtype"):
        shape = tuple(getattr(A, "shape", ()))
        if len(shape) == 2:
            return _TorchWrapped(A, symmetric=symmetric, name=name)
    if callable(A):
        if size is None:
            raise OptionError(
                f"a callable operator needs its size: as_operator(fn, {arg('size')}=n)."
            )
        return CallableOperator(
            A,
            int(size),
            dtype=dtype or torch.float64,
            device=device or "cpu",
            symmetric=True if symmetric is None else symmetric,
            name=name,
        )
    raise OptionError(
        f"cannot use a {type(A).__name__} as a linear operator; pass a matrix, a scipy "
        "LinearOperator, a curvscope operator, or a callable with its size."
    )


def require_square(A: LinearOperator, what: str) -> None:
    """Raise unless ``A`` is square and self-adjoint (what symmetric eigensolvers need).

    Raises:
        OptionError: naming ``what`` needs it.
    """
    if A.shape[0] != A.shape[1]:
        raise OptionError(f"{what} needs a square operator; {A.name} is {A.shape}.")
    if not A.SELF_ADJOINT:
        raise OptionError(
            f"{what} needs a symmetric operator; {A.name} is not declared self-adjoint "
            f"(pass {arg('symmetric')}=True to as_operator if it is)."
        )
