r"""Curvature matrices as operators: :class:`CurvatureOperator` adds the data loop.

A curvature operator is a symmetric ``P x P`` :class:`~curvscope.linalg.LinearOperator` on
the flat vector of a :class:`~curvscope.problem.Problem`'s selected parameters. This class
owns what every such matrix shares: the shape, dtype and device of the parameters, the pass
over the data (a subclass implements only ``_batch_matmat(batch, V)``, its share of
``A @ V`` for one batch; matrices that are not sums over the data implement
``_data_matmat(V)``), the weight-decay term :math:`\lambda I` added once here, outside every
per-matrix product, and diagonal blocks of named parameter sets computed as the same matrix
over fewer parameters.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .._errors import OptionError, arg
from ..linalg import LinearOperator
from ..problem import Batch, Problem

__all__ = ["CurvatureOperator", "autograd_nodes", "once_differentiable_functions", "work_dtype"]

HALF = (torch.bfloat16, torch.float16)
"""Model dtypes whose products are summed, and solved with, in float32."""


def work_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of vectors for a model computing in ``model_dtype``: float32 for half types."""
    return torch.float32 if model_dtype in HALF else model_dtype


def autograd_nodes(tensors):
    """Every autograd node the graphs of ``tensors`` reach, once, from the tensors down."""
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)


def once_differentiable_functions(tensors) -> list[str]:
    """Custom autograd Functions differentiable only once in a graph built with ``create_graph``.

    A ``torch.autograd.Function`` whose backward is marked ``@once_differentiable`` leaves an
    ``Error`` node in the graph of the gradients it produced, which torch (2.13) does not
    always reach when that graph is differentiated: a second derivative through it then
    silently lacks that function's terms (a Hessian product 43% off, a GGN's J v by two
    reverse passes 50% off, on a two-layer test model) instead of failing. Returns the names
    of the custom Functions in the graph when such a node is there, else ``[]``.
    """
    found, functions = False, []
    for node in autograd_nodes(tensors):
        kind = type(node).__name__
        if kind in ("Error", "DelayedError"):
            found = True
        elif isinstance(node, torch.autograd.function.BackwardCFunction):
            functions.append(kind.removesuffix("Backward"))
    if not found:
        return []
    return sorted(set(functions)) or ["(unnamed)"]


class CurvatureOperator(LinearOperator):
    r"""A symmetric curvature matrix of a problem's loss, with the data loop.

    .. math:: A = A_{\text{data}} + \lambda I

    with :math:`\lambda` the problem's weight decay (added here, once, for every matrix).

    Subclasses set :attr:`name` and implement :meth:`_batch_matmat` (or :meth:`_data_matmat`
    for matrices that are not a sum over batches).

    Args:
        problem: model, loss, data and parameter selection.
        **knobs: the subclass's keyword options, kept so blocks rebuild the same matrix.

    Attributes:
        problem: the problem the matrix belongs to.
    """

    SELF_ADJOINT = True
    SHARDABLE = False
    """Whether the matrix is built on sharded problems (``Problem(..., shard=True)``)."""

    def __init__(self, problem: Problem, **knobs: Any) -> None:
        if not self.SHARDABLE and getattr(problem, "sharding", None) is not None:
            from .._sharded import refuse_unsharded

            refuse_unsharded(problem, f"the {getattr(self, 'name', type(self).__name__)} matrix")
        self.problem = problem
        self._knobs = knobs
        super().__init__()

    # --------------------------------------------------------------- description
    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)`` for the selected parameters."""
        n = self.problem.num_params
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of vectors and products: the parameters', float32 for a bfloat16 model.

        A bfloat16 model computes each batch's product in bfloat16; the vectors it is given,
        the sum over batches and everything a solver builds on them stay float32
        (bfloat16's 8 bits would lose a Lanczos basis's orthogonality in a few steps).
        """
        return work_dtype(self.problem.dtype)

    @property
    def device(self) -> torch.device:
        """Device of products (that of the parameters)."""
        return self.problem.device

    @property
    def roundoff_eps(self) -> float:
        """Epsilon of what the model computes in, at least the dtype's.

        A float64 run through float32 operations carries float32 round-off
        (:attr:`Problem.precision`).
        """
        return max(float(torch.finfo(self.problem.dtype).eps), self.problem.precision.eps)

    @property
    def check_eps(self) -> float:
        """The round-off of :meth:`accurate`'s products (float32's for a bfloat16 model).

        The copy computes in the work dtype unless the model itself casts lower than its own
        dtype (then that floor stays).
        """
        precision = self.problem.precision
        low = precision.eps if precision.lowered else 0.0
        return max(float(torch.finfo(self.dtype).eps), low)

    def accurate(self) -> CurvatureOperator:
        """The same matrix computed in float32 where the model computes in bfloat16, else self.

        Solvers take their final residual checks with it, so that the bounds they print hold
        for the model's exact products and include what bfloat16's round-off did to the
        iteration. It is a float32 copy of the model, built on each call (the iteration's
        bfloat16 model is not touched), as :meth:`Problem.to` builds it.
        """
        if self.problem.dtype == self.dtype:
            return self
        return self._with_problem(self.problem.to(self.dtype))

    # --------------------------------------------------------------- products
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        meter = self.problem.product_meter
        if meter is not None and not meter.depth:
            return self._metered_matmat(V, meter)
        return self._counted_matmat(V)

    def _metered_matmat(self, V: torch.Tensor, meter: Any) -> torch.Tensor:
        """The product, timed into ``meter`` (see :mod:`curvscope._meter`)."""
        from .._meter import Product

        first = not self.__dict__.get("_metered", False)
        passes, t0 = self.problem.data_passes, time.perf_counter()
        meter.depth += 1
        try:
            out = self._counted_matmat(V)
        finally:
            meter.depth -= 1
        self._metered = True
        meter.record(
            Product(
                matrix=getattr(self, "name", type(self).__name__),
                dtype=str(self.dtype).removeprefix("torch."),
                dim=int(V.shape[0]),
                columns=int(V.shape[1]),
                seconds=time.perf_counter() - t0,
                passes=self.problem.data_passes - passes,
                first=first,
            )
        )
        return out

    def _counted_matmat(self, V: torch.Tensor) -> torch.Tensor:
        before = self.problem.work_done
        low = self.problem.dtype
        # a bfloat16 model takes bfloat16 vectors; its sum comes back in the work dtype
        out = self._data_matmat(V.to(low) if low != V.dtype else V).to(V.dtype)
        # progress counts k columns as k products, however many passes they took
        self.problem.add_work(V.shape[1] - (self.problem.work_done - before))
        if not bool(torch.isfinite(out).all()):
            self._name_nonfinite(V)
        if self.problem.weight_decay:
            out = out + self.problem.weight_decay * V
        return out

    def _name_nonfinite(self, V: torch.Tensor) -> None:
        """A product came out NaN or Inf: find the first batch and parameters, and say so.

        One more pass, batch by batch, only on this failure path (it is no nondeterminism,
        and a solver fed NaN would report nonsense).

        Raises:
            NonFiniteError: naming the matrix, the batch and the parameters.
        """
        from .._errors import NonFiniteError, arg

        p = self.problem
        name = getattr(self, "name", type(self).__name__)
        for batch in p.batches():
            part = self._batch_matmat(batch, V)
            bad = ~torch.isfinite(part)
            if bool(bad.any()):
                rows = bad.any(dim=1) if bad.dim() > 1 else bad
                names = [n for n, piece in zip(p.names, p.unflatten(rows.to(torch.int8)).values(),
                                               strict=True) if bool(piece.any())]
                raise NonFiniteError(
                    f"the {name} product is NaN or Inf for batch {batch.index}, in "
                    f"{', '.join(names[:4])}{'...' if len(names) > 4 else ''}: the model's "
                    "second derivatives overflow there (saturated units in float16/bfloat16, "
                    "or a NaN the forward hides)."
                )
        raise NonFiniteError(
            f"the {name} product is NaN or Inf, though no single batch's is: the sum over "
            f"batches overflows (use {arg('dtype')} float64)."
        )

    def _data_matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The data term: the sum of per-batch products over one pass."""
        # summed in the work dtype: float32 for a bfloat16 model's per-batch products
        out = torch.zeros_like(V, dtype=self.dtype)
        for batch in self.problem.batches():
            out += self._batch_matmat(batch, V)
        return self.problem.reduce(out)

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        """This batch's weighted share of ``A @ V`` (``V``: ``[P, k]``)."""
        raise NotImplementedError

    # --------------------------------------------------------------- blocks
    def block_names(self) -> list[str]:
        """Module names (``--per-layer`` blocks), then parameter names, then groups."""
        return self.problem.block_names()

    def named_blocks(self, mode: str) -> list[str]:
        """``all``; module names (``per-layer``); parameter names; group names (``per-group``).

        Raises:
            OptionError: for an unknown mode, or ``per-group`` without groups.
        """
        p = self.problem
        if mode == "all":
            return ["all"]
        if mode == "per-layer":
            return list(p.module_blocks())
        if mode == "per-param":
            return list(p.names)
        if mode == "per-group":
            if not p.groups:
                raise OptionError(
                    f"{arg('blocks')} per-group needs parameter groups ({arg('group')}).",
                    option="group",
                )
            return list(p.groups)
        raise OptionError(
            f"{arg('blocks')} {mode!r} is not known; choose all, per-layer, per-param, per-group "
            "or block names.",
            option="blocks",
        )

    def block_parts(self, name: str) -> list[str]:
        """The parameter names of block ``name``."""
        return self.problem.block_param_names(name)

    def block(self, name: str) -> CurvatureOperator:
        """The diagonal block of one parameter, one module, one group or ``"all"``.

        For matrices defined through the loss (Hessian, GGN, Fisher...) the diagonal block of
        a parameter subset is the same matrix built for that subset alone, so the block is
        computed directly rather than by slicing full products.
        """
        names = self.problem.block_param_names(name)
        if names == list(self.problem.names):
            return self
        return self._with_problem(self.problem.select(names))

    def _with_problem(self, problem: Problem) -> CurvatureOperator:
        """The same kind of matrix over another parameter selection or sample set."""
        return type(self)(problem, **self._knobs)

    def on_subset(self, size: int, seed: int | torch.Generator) -> CurvatureOperator:
        """The same matrix on a seeded random subset of ``size`` samples (for repeats)."""
        return self._with_problem(self.problem.subsample(size, seed))
