r"""The Hessian of the loss as an operator: double backward, jvp of grad, or differences."""

from __future__ import annotations

import weakref
from enum import Enum

import torch

from .._device import free_memory
from .._errors import OptionError, UnsupportedModelError, arg
from ..problem import Batch, Problem, zeros_for_none
from ._base import CurvatureOperator, autograd_nodes, once_differentiable_functions

__all__ = [
    "GRAPH_CACHE_SHARE",
    "GraphAccount",
    "HVPMode",
    "HessianOperator",
    "graph_account",
    "hvp_record",
    "missing_double_backward",
]


class HVPMode(str, Enum):
    """How Hessian-vector products are taken."""

    AUTO = "auto"
    DOUBLE_BACKWARD = "double-backward"
    FORWARD_OVER_REVERSE = "forward-over-reverse"
    FINITE_DIFFERENCE = "finite-difference"


MAX_VMAP_COLUMNS = 32
"""Columns vmapped together; more are processed in chunks of this size to bound memory."""

GRAPH_CACHE_SHARE = 0.5
"""Share of the device's free memory that kept graphs may take when no budget is set."""


class GraphAccount:
    """The Hessian's account of kept graphs, for one problem and every view of it.

    Blocks, subsets, dtype and distributed copies of a problem keep their graphs against
    one budget, so the account is found by the problem's :attr:`~curvscope.problem.Problem.family`
    (:func:`graph_account`); the problem itself knows nothing of graphs.

    Attributes:
        budget: bytes kept graphs may take: ``None`` for :data:`GRAPH_CACHE_SHARE` of what
            the device has free at the first product, ``0`` for none. It starts as the
            problem's ``graph_cache``; the memory plan sets the budget it chose.
        held: bytes the kept graphs of every view hold now.
        record: how Hessian products were taken (backend, fallback, finite-difference step
            and errors, kept graphs); result documents carry it as ``hvp``.
    """

    def __init__(self, budget: float | None) -> None:
        self.budget = budget
        self.held = 0
        self.record: dict = {}

    def hold(self, amount: int) -> None:
        """Count ``amount`` more bytes of kept graphs (negative: given back)."""
        self.held += int(amount)

    def room(self) -> float | None:
        """Bytes that may still be kept under the budget (``None``: no budget set)."""
        return None if self.budget is None else max(0.0, self.budget - self.held)


_ACCOUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The account of each problem family, dropped with the last view of the problem."""


def graph_account(problem: Problem) -> GraphAccount:
    """The kept-graph account of ``problem`` and its views (opened on first use)."""
    account = _ACCOUNTS.get(problem.family)
    if account is None:
        account = _ACCOUNTS[problem.family] = GraphAccount(problem.graph_cache)
    return account


def hvp_record(problem: Problem | None) -> dict | None:
    """How ``problem``'s Hessian products were taken (``None`` when none was taken)."""
    family = getattr(problem, "family", None)
    account = None if family is None else _ACCOUNTS.get(family)
    return None if account is None else account.record


def missing_double_backward(exc: BaseException) -> bool:
    """Whether ``exc`` says an operation of the model has no second derivative.

    Seen: cuDNN RNNs ("double backward ... not supported"), fused attention kernels,
    custom autograd functions whose backward is not differentiable (``once_differentiable``,
    found by :func:`_refuse_once_differentiable`) and custom functions that torch.func cannot
    transform (forward-over-reverse).
    """
    text = str(exc).lower()
    return isinstance(exc, NotImplementedError) or any(
        key in text
        for key in (
            "double backward",
            "not implemented",
            "does not support",
            "is not differentiable",
            "derivative for",
            "backward can only be called in training mode",
            "with functorch transforms",  # a custom Function torch.func cannot transform
        )
    )


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_w L(w)` of the full-data loss.

    .. math::
        H = c \sum_b \nabla^2_w S_b(w) + \lambda I,
        \qquad c = 1/T \text{ (mean) or } 1 \text{ (sum)}.

    ``mode``:

    - ``double-backward`` (reverse-over-reverse): exact; ``k`` columns share one forward and
      first backward pass (graph retained). Measured on the 2-core CPU (digits-mlp, 1797
      samples): one product costs 2.5 gradients, 8 columns 9.6 gradients against 13.3 for
      vmap of jvp-of-grad and 18.5 for 8 separate products.

      **Kept graphs.** The forward pass and the first backward (with its graph) are the same
      at every product, since the weights are fixed; only the second backward depends on
      ``V``. The first product therefore keeps each batch's first-order graph while they fit
      in the budget of the problem's :class:`GraphAccount` (shared with its blocks and
      subsets; it starts as the problem's ``graph_cache``), and later
      products run only the second backward over the kept batches, without reading them
      again: on tiny-gpt 2.0 gradients a product instead of 3.4 (benchmarks/RESULTS.md). The
      batches that do not fit are streamed as before. Kept graphs are dropped when a
      parameter tensor changes in place (its version counter), when the operator is freed,
      or by :meth:`release`.
    - ``forward-over-reverse``: ``torch.func.jvp`` of ``torch.func.grad``, vmapped over
      columns; agrees with double backward to round-off.
    - ``finite-difference``: the central difference of two full-data gradients,
      :math:`(g(w + h v) - g(w - h v)) / (2h)`, for models whose operations have no second
      derivative. The step is :math:`h = \epsilon^{1/3} \max(1, \lVert w\rVert_\infty) /
      \lVert v\rVert` (balancing truncation :math:`O(h^2)` against round-off
      :math:`O(\epsilon/h)`); the first product measures both (Richardson against a
      doubled step, and :math:`\epsilon \lVert g\rVert / h`) and :attr:`info` records them.
      Use float64: in float32 the relative error is about 1e-3 at best.
    - ``auto``: double backward; when an operation of the model has no double backward, it
      switches to finite differences and :attr:`notes` says so.

    TorchScript modules use double backward through their own parameters, one column at a
    time (torch.func cannot transform them).

    Args:
        problem: model, loss, data and parameter selection.
        mode: see above.
    """

    name = "hessian"

    def __init__(self, problem: Problem, *, mode: str | HVPMode = HVPMode.AUTO) -> None:
        try:
            mode = HVPMode(mode)
        except ValueError:
            valid = ", ".join(m.value for m in HVPMode)
            raise OptionError(
                f"{arg('hvp')} {mode!r} is not known; choose one of {valid}.", option="hvp"
            ) from None
        super().__init__(problem, mode=mode)
        self.mode = mode
        self.info: dict = {"hvp": mode.value}
        self.account = graph_account(problem)
        self._graphs: _KeptGraphs | None = None
        self._twice_checked = False  # the first graph was searched for once-only functions
        if problem.scripted:
            self.notes.append(
                "TorchScript model: torch.func cannot transform it, so Hessian products use "
                "double backward, one column at a time."
            )
        if mode is HVPMode.FINITE_DIFFERENCE:
            self._fd_note()

    def _fd_note(self) -> None:
        self.notes.append(
            "Hessian products by central differences of full-data gradients (step and error "
            "estimates in the document); use float64 for accuracy."
            + (
                " The run is in float32: expect relative errors near 1e-3."
                if self.problem.dtype == torch.float32
                else ""
            )
        )

    # ------------------------------------------------------------------ dispatch
    def _data_matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self._products(V)
        # the document's ``hvp`` section: how this command's Hessian products were taken
        self.account.record.update(self.info)
        return out

    def _products(self, V: torch.Tensor) -> torch.Tensor:
        if self.mode is HVPMode.FINITE_DIFFERENCE:
            return self._finite_difference(V)
        try:
            if self._keeps_graphs():
                return self._kept_matmat(V)
            return super()._data_matmat(V)
        except (RuntimeError, NotImplementedError) as exc:
            if not missing_double_backward(exc):
                raise
            self.release()
            if self.mode is not HVPMode.AUTO:
                raise UnsupportedModelError(
                    f"{arg('hvp')} {self.mode.value}: an operation of the model has no second "
                    f"derivative ({str(exc).splitlines()[0][:200]}); use {arg('hvp')} auto or "
                    "finite-difference (in float64).",
                    matrix="hessian",
                    option="hvp",
                ) from None
            self.mode = HVPMode.FINITE_DIFFERENCE
            self.info["hvp"] = "finite-difference"
            self.info["fallback_reason"] = str(exc).splitlines()[0][:200]
            self.notes.append(
                "an operation of the model has no double backward "
                f"({self.info['fallback_reason']}); Hessian products fell back to finite "
                "differences of gradients."
            )
            self._fd_note()
            return self._finite_difference(V)

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        if self.problem.scripted or self.mode in (HVPMode.DOUBLE_BACKWARD, HVPMode.AUTO):
            return self._double_backward(batch, V)
        k = V.shape[1]
        return torch.cat(
            [
                self._forward_over_reverse(batch, V[:, i : i + MAX_VMAP_COLUMNS])
                for i in range(0, k, MAX_VMAP_COLUMNS)
            ],
            dim=1,
        )

    # ------------------------------------------------------------------ exact products
    def _double_backward(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        p = self.problem
        with p.mode(), torch.enable_grad(), p.leaves() as leaves:
            graph = self._first_order(leaves, batch)
            return self._second_backward(graph, V, keep=False)

    def _first_order(self, leaves: dict[str, torch.Tensor], batch: Batch) -> _Graph:
        """The batch's gradient with its graph (the part of a product that ``V`` leaves alone)."""
        values = list(leaves.values())
        loss = self.problem.batch_loss(leaves, batch)
        if not loss.requires_grad:  # no selected parameter affects this batch
            return _Graph(values, [])
        grads = torch.autograd.grad(loss, values, create_graph=True, allow_unused=True)
        # parameters that do not affect the loss (unused heads) have no gradient: their rows
        # and columns of H are zero
        graph = _Graph(
            values, [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        )
        if not self._twice_checked and graph.live:
            _refuse_once_differentiable(graph)
            self._twice_checked = True
        return graph

    def _second_backward(
        self, graph: _Graph, V: torch.Tensor, *, keep: bool, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``H_b V`` from a batch's first-order graph; ``keep``: leave the graph usable.

        ``into``: add the product to it column by column and return it. Each column is
        written as it is made: a list of columns stacked at the end held the block twice
        (a k = 3 final check on GPT-2-small grew 6.8 GB above the Lanczos steps, 1.1x the
        printed plan).
        """
        p = self.problem
        k = V.shape[1]
        out = torch.zeros_like(V) if into is None else into
        if not graph.live:
            return out
        with torch.enable_grad():
            for j in range(k):
                vs = p.unflatten(V[:, j])
                gv = sum((g * vs[p.names[i]]).sum() for i, g in graph.live)
                hv = torch.autograd.grad(
                    gv, graph.values, retain_graph=keep or j + 1 < k, allow_unused=True
                )
                del vs, gv
                out[:, j] += p.flatten(zeros_for_none(hv, graph.values)).detach()
        return out

    # ------------------------------------------------------------------ kept graphs
    def _keeps_graphs(self) -> bool:
        p = self.problem
        return (
            self.mode in (HVPMode.DOUBLE_BACKWARD, HVPMode.AUTO)
            and not p.scripted
            and self.account.budget != 0
        )

    def _budget(self) -> float:
        """Bytes this operator may keep now: the account's budget less what views keep."""
        room = self.account.room()
        if room is not None:
            return room
        free = free_memory(self.problem.device)
        return 0.0 if free is None else GRAPH_CACHE_SHARE * free

    def _kept_matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The data term over kept graphs; the other batches are streamed (and kept, first)."""
        p = self.problem
        graphs = self._graphs
        if graphs is not None and not graphs.valid(p):
            self.release()
            graphs = None
        out = torch.zeros_like(V)
        if graphs is not None and graphs.complete:
            for graph in graphs.entries.values():
                self._second_backward(graph, V, keep=True, into=out)
            return p.reduce(out)
        building = graphs is None
        if building:
            graphs = _KeptGraphs(p, self.account, self._budget())
        with p.mode(), torch.enable_grad():
            for batch in p.batches():
                graph = graphs.entries.get(batch.index)
                if graph is None:
                    with p.leaves() as leaves:
                        if building:
                            graph, nbytes = _measured(self._first_order, leaves, batch)
                        else:  # a batch that did not fit when the graphs were kept
                            graph, nbytes = self._first_order(leaves, batch), 0
                    keep = building and graphs.add(batch.index, graph, nbytes)
                    self._second_backward(graph, V, keep=keep, into=out)
                else:
                    self._second_backward(graph, V, keep=True, into=out)
        if building:
            graphs.close()
            if graphs.entries:
                self._graphs = graphs
                self.info["kept_graphs"] = graphs.describe()
            else:  # nothing fitted: no stale description of graphs kept before
                self.info.pop("kept_graphs", None)
        return p.reduce(out)

    def graph_bytes(self, batch: Batch) -> int:
        """Bytes ``batch``'s first-order graph would take if kept (built once to measure)."""
        p = self.problem
        with p.mode(), torch.enable_grad(), p.leaves() as leaves:
            return _measured(self._first_order, leaves, batch)[1]

    def release(self) -> None:
        """Drop the kept graphs (their memory returns to the device)."""
        if self._graphs is not None:
            self._graphs.release()
            self._graphs = None

    def _forward_over_reverse(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        p = self.problem
        params = {n: t.detach() for n, t in p.params.items()}

        def loss(ps):
            return p.batch_loss(ps, batch)

        grad_fn = torch.func.grad(loss)

        def hvp(v_flat):
            tangents = p.unflatten(v_flat)
            return p.flatten(torch.func.jvp(grad_fn, (params,), (tangents,))[1])

        with p.mode():
            out = (
                torch.func.vmap(hvp, in_dims=1, out_dims=1)(V)
                if V.shape[1] > 1
                else hvp(V[:, 0]).unsqueeze(1)
            )
        return out

    # ------------------------------------------------------------------ differences
    def _gradient(self, w: torch.Tensor) -> torch.Tensor:
        """The data term's gradient at flat weights ``w`` (weight decay is added outside)."""
        p = self.problem
        _, g = p.loss_and_grad(w)
        if p.weight_decay:
            g = g - p.weight_decay * w
        return g

    def step(self, v: torch.Tensor) -> float:
        """The finite-difference step for direction ``v`` (see the class docstring)."""
        w = self.problem.param_vector()
        eps = torch.finfo(self.dtype).eps
        scale = max(1.0, float(w.abs().max()))
        norm = float(torch.linalg.vector_norm(v))
        return eps ** (1.0 / 3.0) * scale / max(norm, 1e-300)

    def _finite_difference(self, V: torch.Tensor) -> torch.Tensor:
        w = self.problem.param_vector()
        cols = []
        for j in range(V.shape[1]):
            v = V[:, j]
            if not bool((v != 0).any()):
                cols.append(torch.zeros_like(v))
                continue
            h = self.step(v)
            d1 = (self._gradient(w + h * v) - self._gradient(w - h * v)) / (2 * h)
            if "truncation_estimate" not in self.info:
                self._calibrate(w, v, h, d1)
            cols.append(d1)
        return torch.stack(cols, dim=1)

    def _calibrate(self, w: torch.Tensor, v: torch.Tensor, h: float, d1: torch.Tensor) -> None:
        """Estimate the relative truncation (Richardson) and round-off errors once."""
        d2 = (self._gradient(w + 2 * h * v) - self._gradient(w - 2 * h * v)) / (4 * h)
        scale = float(torch.linalg.vector_norm(d1)) or 1.0
        g = self._gradient(w)
        eps = torch.finfo(self.dtype).eps
        vnorm = float(torch.linalg.vector_norm(v))
        self.info.update(
            step=h * vnorm,
            truncation_estimate=float(torch.linalg.vector_norm(d2 - d1)) / 3.0 / scale,
            roundoff_estimate=eps * float(torch.linalg.vector_norm(g)) / (h * scale),
            relative_to="||H v|| of the first column",
            extra_gradients=3,
        )


# ---------------------------------------------------------------------- kept graphs
class _Graph:
    """A batch's parameter leaves and its gradients with their graph (``(index, grad)``)."""

    __slots__ = ("values", "live")

    def __init__(self, values: list[torch.Tensor], live: list[tuple[int, torch.Tensor]]):
        self.values = values
        self.live = live


def _refuse_once_differentiable(graph: _Graph) -> None:
    """Raise when the gradients pass through a function differentiable only once.

    :func:`~._base.once_differentiable_functions`: the product would silently lack its terms.

    Raises:
        NotImplementedError: naming the function, so ``auto`` falls back to finite differences.
    """
    once = once_differentiable_functions([g for _, g in graph.live])
    if once:
        raise NotImplementedError(
            f"the custom autograd Function {', '.join(once)} is differentiable only once "
            "(@once_differentiable), so it has no double backward"
        )


_SAVED: dict[type, list[str]] = {}
"""Per autograd node type, the attributes that hold its saved tensors."""


def _measured(build, *args) -> tuple[_Graph, int]:
    """``build(*args)`` and the bytes its graph holds: tensors saved for backward, gradients.

    The graph is walked from the gradients (the first backward's nodes, then the forward's),
    each node's saved tensors read back and each storage counted once; the parameters are
    not counted. About 1 ms a batch on tiny-gpt; ``saved_tensors_hooks`` measured the same
    bytes but made the first product 0.5 gradients slower.
    """
    graph = build(*args)
    own = {t.untyped_storage().data_ptr() for t in graph.values}
    storages: dict[int, int] = {}
    for node in autograd_nodes([g for _, g in graph.live]):
        names = _SAVED.get(type(node))
        if names is None:
            names = [n for n in dir(node) if n.startswith("_saved_") or n == "saved_tensors"]
            _SAVED[type(node)] = names
        for name in names:
            try:
                value = getattr(node, name)
            except (RuntimeError, AttributeError):  # freed, or not saved by this node
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    try:
                        store = t.untyped_storage()
                    except (RuntimeError, NotImplementedError):  # no storage (sparse...)
                        continue
                    storages[store.data_ptr()] = store.nbytes()
    nbytes = sum(n for ptr, n in storages.items() if ptr not in own)
    nbytes += sum(g.numel() * g.element_size() for _, g in graph.live)
    return graph, int(nbytes)


class _KeptGraphs:
    """First-order graphs of a prefix of the batches, kept between products.

    Their bytes count against the problem's :class:`GraphAccount` until released
    (explicitly or when the operator holding them is freed).
    """

    def __init__(self, problem: Problem, account: GraphAccount, budget: float) -> None:
        self.params = [(t, t._version) for t in problem.params.values()]
        self.budget = budget
        self.entries: dict[int, _Graph] = {}
        self.nbytes = 0
        self.batches = 0
        self.full = False  # a batch did not fit: later ones are not kept either
        self.complete = False
        self._held = [0]  # bytes counted against the account until freed
        self._hold = account.hold
        self._finalizer = weakref.finalize(self, _give_back, self._hold, self._held)

    def valid(self, problem: Problem) -> bool:
        """Whether the weights are those the graphs were built at."""
        now = list(problem.params.values())
        return len(now) == len(self.params) and all(
            t is old and t._version == version
            for t, (old, version) in zip(now, self.params, strict=True)
        )

    def add(self, index: int, graph: _Graph, nbytes: int) -> bool:
        """Keep ``graph`` if it fits in what is left of the budget (in batch order)."""
        self.batches += 1
        if self.full or self.nbytes + nbytes > self.budget:
            self.full = True
            return False
        self.entries[index] = graph
        self.nbytes += nbytes
        self._held[0] += nbytes
        self._hold(nbytes)
        return True

    def close(self) -> None:
        """The first pass is over: the graphs are complete when every batch was kept."""
        self.complete = not self.full and len(self.entries) == self.batches

    def describe(self) -> dict:
        """For the result document's ``hvp`` section."""
        return {
            "batches": len(self.entries),
            "of_batches": self.batches,
            "bytes": int(self.nbytes),
            "budget_bytes": int(self.budget) if self.budget != float("inf") else None,
        }

    def release(self) -> None:
        """Free the graphs and give their bytes back to the account."""
        self.entries.clear()
        self.complete = False
        self._finalizer()


def _give_back(hold, held: list[int]) -> None:
    hold(-held[0])
    held[0] = 0
