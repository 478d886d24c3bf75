"""Inner products and norms of an operator's vectors, summed over shards when it is sharded.

A sharded operator (:class:`~curvscope.operators.ShardedHessianOperator`, docs/sharded.md)
multiplies *local* vectors: each rank holds the rows of every vector that belong to its
parameter shards. It declares

- ``reduce_inner``: a function that sums a small tensor of partial inner products over the
  ranks (in place, returned);
- ``global_size``: the dimension ``P`` of the whole vector;
- ``local_rows``: the positions of this rank's rows in the unsharded flat vector.

:class:`Inner` routes every inner product and norm of an algorithm through those. For an
operator without ``reduce_inner`` every method is exactly the expression the algorithms used
before (``Q.T @ w``, ``torch.linalg.vector_norm``), so the unsharded path is bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Inner"]


class Inner:
    """Inner products of ``A``'s vectors, all-reduced over shards when ``A`` is sharded.

    Attributes:
        reduce: the all-reduce of partial sums (``None``: one process, nothing sharded).
        size: the global dimension ``P`` (the operator's ``shape[0]`` when not sharded).
        local_rows: this rank's rows of the global vector (``None`` when not sharded).
    """

    def __init__(self, A: Any) -> None:
        self.reduce = getattr(A, "reduce_inner", None)
        n = int(A.shape[0])
        self.size = int(getattr(A, "global_size", None) or n) if self.reduce else n
        self._A = A if self.reduce else None

    @property
    def local_rows(self) -> torch.Tensor | None:
        """This rank's rows of the global vector (``None`` when not sharded).

        A new tensor each time: an int64 per local entry, twice a float32 shard, not kept.
        """
        return None if self._A is None else getattr(self._A, "local_rows", None)

    @property
    def sharded(self) -> bool:
        """Whether the vectors are shards whose inner products need summing over ranks."""
        return self.reduce is not None

    def dots(self, Q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``Q^T w`` over the whole vectors."""
        c = Q.T @ w
        return c if self.reduce is None else self.reduce(c)

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        """The 2-norm of the whole vector ``w`` (a 0-dim tensor)."""
        if self.reduce is None:
            return torch.linalg.vector_norm(w)
        sq = (w * w).sum().reshape(1)
        return self.reduce(sq).sqrt()[0]

    def col_norms(self, Y: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
        """The 2-norm of each column of ``Y`` (over the whole vectors)."""
        if self.reduce is None:
            return torch.linalg.vector_norm(Y, dim=0, keepdim=keepdim)
        sq = self.reduce((Y * Y).sum(dim=0, keepdim=keepdim))
        return sq.sqrt()

    def col_sums(self, Y: torch.Tensor) -> torch.Tensor:
        """``Y.sum(dim=0)`` over the whole vectors (inner products written as sums)."""
        s = Y.sum(dim=0)
        return s if self.reduce is None else self.reduce(s)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (so that all ranks take the same branch)."""
        if self.reduce is None:
            return bool(flag)
        bad = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64)
        return float(self.reduce(bad)[0]) == 0.0

    def randn(self, gen: torch.Generator) -> torch.Tensor:
        """A Gaussian vector in float64 on the CPU: this rank's rows of a full draw.

        Every rank draws the whole ``P``-vector from the same generator state and keeps its
        rows, so the start vectors are those of one process (one transient ``P``-vector).
        """
        full = torch.randn(self.size, generator=gen, dtype=torch.float64)
        rows = self.local_rows
        return full if rows is None else full[rows]


def refuse_sharded(A: Any, what: str) -> None:
    """Refuse a sharded operator in an algorithm whose inner products are local, in one sentence.

    Only :func:`~curvscope.linalg.eigsh` routes its inner products through :class:`Inner`;
    every other algorithm would silently take one rank's rows for the whole vector.

    Raises:
        OptionError: when ``A`` declares ``reduce_inner``.
    """
    if getattr(A, "reduce_inner", None) is not None:
        from .._errors import OptionError, arg

        raise OptionError(
            f"{what} is not available with {arg('shard')}: its inner products are not summed "
            f"over the shards (only Lanczos eigenvalues are); drop {arg('shard')} for it."
        )
