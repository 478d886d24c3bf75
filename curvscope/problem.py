r"""The analysed problem: model, loss, a fixed ordered sample set and the selected parameters.

:class:`Problem` is the only place in curvscope that loops over data. Everything above it
(operators, linear algebra, diagnostics, solvers) asks it for losses, gradients and per-batch
evaluations at given parameter values and never touches the model or the data source itself.

The loss it describes is

.. math:: L(w) = c \sum_{t} \ell_t(f(x; w)) + \frac{\lambda}{2} \lVert w \rVert^2,

a sum over the loss *terms* ``t`` of the whole data (samples, or the tokens that are not
``ignore_index``, or output entries for ``mse``; :mod:`curvscope._losses`), with
:math:`c = 1/T` (``T`` terms in all) for ``reduction="mean"`` and :math:`c = 1` for ``"sum"``.
Batch ``b`` with :math:`T_b` terms enters with weight :math:`T_b / T` for mean reduction and
1 for sum, so unequal batches and padded sequences give the full-data loss exactly.

Batches may be ``(inputs, targets)`` with inputs a tensor, a tuple of tensors (positional
arguments) or a dict of tensors (keyword arguments, HuggingFace style), or a dict batch
whose ``labels`` entry is the target. Floating-point tensors move to the parameters' device
and dtype; integer tensors (token ids, masks, labels) move to the device and keep their
dtype. The data source is iterated once per pass and never held in memory.

This module puts :class:`Problem` together and owns its construction, its views (``select``,
``to``, ``distributed``, ``alone``), the analysis mode and evaluation (forward, loss, gradient,
outputs, accuracy). The parameter layout, the data loop, the checks and the shared counters
are mixins of the package-private :mod:`curvscope._problem`, imported by this module only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._distributed import as_group
from ._errors import OptionError, arg
from ._losses import CallableLoss, Loss, ModelLoss, get_loss
from ._problem import (
    Batch,
    Counters,
    DataChecks,
    DataLoop,
    InputRecord,
    Inputs,
    Parameters,
    Recorded,
    batch_seed,
    check_output_finite,  # noqa: F401 (re-exported: curvscope._load imports it from here)
    map_tensors,
)

__all__ = ["Batch", "InputRecord", "Inputs", "Problem", "batch_seed", "map_tensors"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _is_scripted(model: nn.Module) -> bool:
    return any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())


class Problem(Counters, Parameters, DataLoop, DataChecks, Recorded):
    r"""A model, a loss and a fixed sample set, seen as a function of the selected parameters.

    Args:
        model: the network. It is never modified: evaluation goes through
            ``torch.func.functional_call`` (TorchScript modules: through their own parameters,
            values swapped in and restored), and its train/eval flags are restored after
            every pass.
        loss: a loss name (``cross_entropy``, ``causal_lm``, ``mse``, ``bce_with_logits``,
            ``nll``, ``chen_nonconvex``, ``model``), a :class:`~curvscope._losses.Loss`, or a
            function ``fn(output, target)`` returning the batch loss as ``reduction`` says or
            ``(mean over its terms, number of terms)`` (as ``cs.load`` takes it).
        data: a re-iterable of batches (a list, a ``DataLoader``...), iterated once per pass,
            in order. It must give the same batches every time (see
            :meth:`check_deterministic`).
        reduction: ``"mean"`` or ``"sum"``, as the model was trained with.
        params: which parameters to analyse: ``None`` for all, a glob (``"fc1.*"``) or a list
            of globs matched against ``named_parameters()`` names, or a ``dict`` name -> tensor
            of the model's own parameters. The flat layout follows ``named_parameters()`` order.
        weight_decay: :math:`\lambda` of the added :math:`\frac{\lambda}{2}\lVert w\rVert^2`.
        train_mode: evaluate BatchNorm with batch statistics (without updating its running
            statistics); dropout stays off. Default: eval mode.
        forward_kwargs: fixed keyword arguments passed to every forward (e.g. ``sr=16000``).
        output: which output the loss takes when the model returns a tuple, a dict or a
            HuggingFace output (an index or a key; default: the tensor itself, or ``logits``).
        groups: named groups of parameters (name -> globs) usable as blocks.
        check_deterministic: compare two passes over the first batches at construction.
        group: data parallelism over ``torch.distributed``: a
            :class:`~curvscope._distributed.Group` or an initialised process group. Batch
            ``i`` is then evaluated by rank ``i mod world_size`` only and every loss, gradient
            and product is summed over the ranks (:meth:`reduce`), so each rank gets the
            full-data numbers. ``None``: one process.
        graph_cache: bytes that Hessian products may keep of each batch's forward and first
            backward graph between products, for this problem and its blocks, subsets and
            copies together (:class:`~curvscope.operators.HessianOperator`). A product over
            kept graphs runs only the second backward: about 2 gradients instead of 3.5 on
            a transformer. ``None``: half of what the device has free at the first product;
            ``0``: keep none (the data are streamed at every product). The budget the
            problem's kept-graph account starts with; the account, not the problem, holds
            the budget in force (the memory plan sets it) and the bytes kept.
        compile: ``torch.compile`` the forward and loss of first-order passes (:meth:`loss`,
            :meth:`loss_and_grad`: the solvers and finite-difference Hessian products). Only
            there: torch.compile (torch 2.13) refuses double backward ("does not currently
            support double backward"), so Hessian products by double backward and the
            torch.func products (GGN, forward-over-reverse) run the eager forward. The first
            pass compiles (seconds to a minute on a CPU); a batch of another size compiles
            once more. Ignored for TorchScript models. Measured in benchmarks/products.py.
        record: what the problem was loaded from (:class:`InputRecord`: the document's
            ``input`` section, the load's notes, the file read, the data source, the
            options to load other data alike), read back as ``input_info``, ``notes``,
            ``loaded``, ``data_source`` and ``load_options``. ``curvscope.load`` gives it
            with :meth:`recorded`; ``None`` for a problem built directly.
        shard: sharded mode (docs/sharded.md): the problem keeps an FSDP2-sharded copy of
            the model over ``group``'s ranks (``fully_shard``; one process: a group of one),
            and :func:`curvscope.hessian` gives a
            :class:`~curvscope.operators.ShardedHessianOperator` whose vectors are this
            rank's shards, so the Lanczos basis costs about ``1/N`` per rank. Only Hessian
            products (by finite differences of sharded gradients) and the loss are
            available; the rest is refused in one sentence.

    Attributes:
        family: the token this problem shares with every view of it (blocks, subsets, dtype
            and distributed copies); the Hessian keeps its kept-graph account by it
            (:func:`curvscope.operators.graph_account`: the budget in force, the bytes held,
            and the record of how products were taken, the document's ``hvp``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | Loss | Callable[..., Any],
        data: Iterable,
        *,
        reduction: str = "mean",
        params: None | str | list[str] | dict[str, torch.Tensor] = None,
        weight_decay: float = 0.0,
        train_mode: bool = False,
        forward_kwargs: Mapping[str, Any] | None = None,
        output: int | str | None = None,
        groups: Mapping[str, Sequence[str]] | None = None,
        check_deterministic: bool = False,
        group: Any = None,
        graph_cache: float | None = None,
        compile: bool = False,  # noqa: A002  (the shared option's name)
        record: InputRecord | None = None,
        shard: bool = False,
    ) -> None:
        if reduction not in ("mean", "sum"):
            raise OptionError(f"{arg('reduction')} {reduction!r} is not known; choose mean or sum.")
        if weight_decay < 0:
            raise OptionError(f"{arg('weight_decay')} must be non-negative, got {weight_decay}.")
        self.model = model
        if callable(loss) and not isinstance(loss, (str, Loss)):
            # a function of (output, target), as cs.load and --loss FILE.py:FN take it
            loss = CallableLoss(loss, name=getattr(loss, "__name__", "loss"), reduction=reduction)
        self.loss_fn = get_loss(loss)
        self.loss_name = self.loss_fn.name
        self.data = data
        self.reduction = reduction
        self.weight_decay = float(weight_decay)
        self.train_mode = bool(train_mode)
        self.forward_kwargs = dict(forward_kwargs or {})
        self.output = output
        self.scripted = _is_scripted(model)
        self.group = as_group(group)
        if self.scripted and self.train_mode:
            raise OptionError(
                f"{arg('train_mode')} is not available for TorchScript models: their BatchNorm "
                "modules cannot be switched to batch statistics without updating running ones."
            )
        self._set_params(self._select(params, model))
        self.groups = {k: list(v) for k, v in (groups or {}).items()}
        for name in self.groups:
            self.block_param_names(name)  # every group must select something
        self._start_counters()
        self.graph_cache = None if graph_cache is None else max(0.0, float(graph_cache))
        self.compile = bool(compile) and not self.scripted
        self._compiled: Callable[..., torch.Tensor] | None = None
        self.notes: list[str] = []
        self.record: InputRecord | None = None
        self._count()
        if check_deterministic:
            self.check_deterministic()
        self.sharding: Any = None
        if shard:
            self._shard_in_place()
        if record is not None:
            self._take_record(record)

    def _take_record(self, record: InputRecord) -> None:
        self.record = record
        if record.notes is not None:
            self.notes = list(record.notes)

    def recorded(self, record: InputRecord) -> Problem:
        """This problem (a view sharing its counters) carrying the input record ``record``.

        ``curvscope.load`` describes a problem only once it is built, checked and
        subsampled; it hands the description over here rather than setting attributes.
        The record's notes, when given, replace the view's notes.
        """
        new = self._copy()
        new._take_record(record)
        return new

    def _copy(self) -> Problem:
        new = object.__new__(Problem)
        new.__dict__.update(self.__dict__)
        new.notes = list(self.notes)
        return new

    def distributed(self, group: Any) -> Problem:
        """The same problem with its batches split over the ranks of ``group``.

        ``group``: a :class:`~curvscope._distributed.Group` or an initialised process group.
        One pass counts the batches' loss terms again, shared over the ranks.
        """
        self._refuse_sharded("Problem.distributed")
        new = self._copy()
        new.group = as_group(group)
        new._count()
        return new

    def shard(self) -> Problem:
        """The same problem in sharded mode (a copy; see ``shard`` of the class).

        Raises:
            OptionError: when the problem cannot be sharded (TorchScript, train mode, scalar
                parameters, no process group for several ranks).
        """
        if self.sharding is not None:
            return self
        new = self._copy()
        new._shard_in_place()
        return new

    def _shard_in_place(self) -> None:
        """Take an FSDP2-sharded copy of the model, its sharded parameters and their layout."""
        from ._sharded import Sharding, sharded_model

        self.model, self.params = sharded_model(self)
        self.sharding = Sharding(self, list(self.params.values()))

    def alone(self) -> Problem:
        """This problem in one process: every batch evaluated here, nothing summed over ranks.

        The batch weights stay the global ones, so the loss is the full-data loss.
        """
        if not self.group.active:
            return self
        self._refuse_sharded("Problem.alone")
        new = self._copy()
        new.group = as_group(None)
        return new

    def to(self, dtype: torch.dtype) -> Problem:
        """The same problem with the model cast to ``dtype`` (a copy; this one is untouched)."""
        if dtype == self.dtype:
            return self
        self._refuse_sharded("Problem.to (another dtype)")
        model = copy.deepcopy(self.model).to(dtype)
        new = self._copy()
        new.model = model
        new._set_params(self._select(list(self.names), model))
        new._compiled = None  # compiled for the other model
        new.scripted = _is_scripted(model)
        return new

    @contextlib.contextmanager
    def mode(self) -> Iterator[None]:
        """Put the model in the analysis mode and restore every module's flags afterwards.

        Eval mode by default. With ``train_mode`` BatchNorm modules use batch statistics with
        ``track_running_stats`` switched off for the pass, so running statistics are never
        updated; dropout stays off.
        """
        modules = list(self.model.modules())
        saved = [(m, m.training) for m in modules]
        saved_track = []
        try:
            self.model.eval()
            if self.train_mode:
                for m in modules:
                    if isinstance(m, _BN_TYPES):
                        saved_track.append((m, m.track_running_stats))
                        m.track_running_stats = False
                        m.training = True
            yield
        finally:
            for m, flag in saved_track:
                m.track_running_stats = flag
            for m, flag in saved:
                m.training = flag

    @property
    def batch_dependent(self) -> bool:
        """Whether the analysed function depends on how the samples are batched.

        True in train mode when the model has a BatchNorm module: each sample is normalised
        with the statistics of its batch, so the loss, its gradient and its curvature
        change with the batch size and the batch composition (which samples share a
        batch). In eval mode, and in train mode without BatchNorm (dropout stays off),
        batching only splits a sum and the numbers do not depend on it.
        """
        return self.train_mode and any(isinstance(m, _BN_TYPES) for m in self.model.modules())

    def mode_note(self) -> str | None:
        """The sentence a result document carries about train mode (``None`` in eval mode)."""
        if not self.train_mode:
            return None
        if not self.batch_dependent:
            return (
                "train mode: the model has no BatchNorm module, so batching does not change "
                "the numbers; dropout off."
            )
        sizes = sorted({s for s in self.batch_sizes if s})
        shown = f"{sizes[-1]}" if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}"
        return (
            "train mode: BatchNorm normalised each sample with the statistics of its batch "
            f"(batches of {shown} samples; running statistics untouched, dropout off), so "
            "every number depends on the batch composition and holds for this batching only: "
            "another batch size, subset or sample order is another function."
        )

    @property
    def precision(self):
        """What a forward of this problem computes in (:class:`~curvscope._precision.Precision`).

        Measured once, on the first batch's forward and loss, and kept: a float64 run whose
        model casts to float32 inside has float32's round-off everywhere.
        """
        cached = getattr(self, "_precision", None)
        # a copy in another dtype (Problem.to) carries the attribute: measure it anew
        if cached is not None and cached.dtype == self.dtype:
            return cached
        from ._precision import watch_precision

        # the first batch, read without counting a pass: this is no product of the analysis
        inputs, target = self.split(next(iter(self._raw())))
        terms = self.batch_terms[0] if self.batch_terms else 1
        batch = Batch(self._move(inputs), self._move_target(target), self.batch_weight(terms),
                      self._size(inputs, target), terms, index=0)

        def run() -> None:
            with torch.no_grad(), self.mode():
                self.batch_value(self.forward(self.params, batch.inputs), batch)

        self._precision = watch_precision(self.model, self.dtype, run)
        return self._precision

    @contextlib.contextmanager
    def _scripted_bound(self, params: dict[str, torch.Tensor]):
        """TorchScript only: swap ``params`` into the module's own tensors, restore after."""
        named = dict(self.model.named_parameters())
        saved = {}
        with torch.no_grad():
            for n, p in params.items():
                if named[n].data_ptr() != p.data_ptr():
                    saved[n] = named[n].detach().clone()
                    named[n].copy_(p)
        try:
            yield {n: named[n] for n in params}
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    named[n].copy_(v)

    @contextlib.contextmanager
    def leaves(self, params: dict[str, torch.Tensor] | None = None):
        """Parameter tensors to differentiate with respect to, at ``params`` (default: w).

        Ordinary modules: fresh leaves that require grad. TorchScript modules: the module's
        own parameters with ``params`` swapped in (restored on exit), since their forward
        cannot take other tensors.
        """
        params = self.params if params is None else params
        if self.scripted:
            with self._scripted_bound(params) as own:
                yield own
        else:
            yield {n: t.detach().requires_grad_(True) for n, t in params.items()}

    def select_output(self, out: Any) -> torch.Tensor:
        """The output the loss takes (see ``output``); the loss itself for ``loss="model"``.

        Raises:
            OptionError: when the model returns several outputs and none is chosen, or the
                chosen one does not exist.
        """
        if isinstance(self.loss_fn, ModelLoss):
            value = _field(out, "loss")
            if value is None:
                raise OptionError(
                    f"{arg('loss')} model needs a model that returns its loss (output.loss or "
                    f"a dict with 'loss'); this one returns a {type(out).__name__} without it."
                )
            return value
        if self.output is not None:
            chosen = _pick(out, self.output)
            if chosen is None:
                raise OptionError(
                    f"{arg('output')} {self.output!r} is not an output of the model "
                    f"({_describe_output(out)})."
                )
            out = chosen
        if isinstance(out, torch.Tensor):
            return out
        logits = _field(out, "logits")
        if logits is not None:
            return logits
        raise OptionError(
            f"the model returns {_describe_output(out)}; choose the output the loss takes with "
            f"{arg('output')} (an index or a key)."
        )

    def forward(self, params: dict[str, torch.Tensor], inputs: Inputs | torch.Tensor) -> Any:
        """The loss's output at parameter values ``params`` (selected names) for ``inputs``.

        Call it inside :meth:`mode`. Differentiable in ``params`` through ``torch.func`` for
        ordinary modules; TorchScript modules are evaluated with their own tensors swapped.
        """
        if isinstance(inputs, torch.Tensor):
            inputs = Inputs((inputs,), dict(self.forward_kwargs))
        if getattr(self, "sharding", None) is not None:
            # the FSDP module gathers its own shards: only the problem's weights can go in
            if params is not self.params:
                self._refuse_sharded("evaluation at other weights")
            return self.select_output(self.model(*inputs.args, **inputs.kwargs))
        if self.scripted:
            with self._scripted_bound(params):
                out = self.model(*inputs.args, **inputs.kwargs)
        else:
            out = torch.func.functional_call(
                self.model, params, inputs.args, inputs.kwargs, strict=False
            )
        return self.select_output(out)

    def batch_value(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """This batch's weighted share of the data loss, from its output."""
        if isinstance(self.loss_fn, ModelLoss):
            # the model's loss is the mean over the batch's terms (HuggingFace): the batch
            # enters with the weight of its terms, or as their sum
            return batch.weight * out if self.reduction == "mean" else batch.terms * out
        if batch.terms == 0 and self.reduction == "mean":
            return out.sum() * 0.0
        return batch.weight * self.loss_fn.value(out, batch.target, self.reduction)

    def batch_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Weighted data loss of one batch (its share of the total loss, without decay)."""
        return self.batch_value(self.forward(params, batch.inputs), batch)

    def first_order_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """:meth:`batch_loss` for passes differentiated once (compiled with ``compile``).

        The compiled graph has no double backward: never differentiate its value twice.
        """
        if not self.compile:
            return self.batch_loss(params, batch)
        if self._compiled is None:
            import torch._functorch.config as functorch_config

            # a compiled backward may reuse (donate) its buffers unless graphs are retained
            functorch_config.donated_buffer = False
            self._compiled = torch.compile(self._loss_of, dynamic=False)
        return self._compiled(params, batch.inputs, batch.target, batch.weight, batch.terms)

    def _loss_of(self, params, inputs, target, weight, terms) -> torch.Tensor:
        """:meth:`batch_loss` from a batch's fields (what ``compile`` compiles)."""
        batch = Batch(inputs, target, weight, 0, terms, index=0)
        return self.batch_value(self.forward(params, inputs), batch)

    def regulariser(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight-decay term lambda/2 ||w||^2 over the selected parameters."""
        total = sum((p * p).sum() for p in params.values())
        return 0.5 * self.weight_decay * total

    def _default(self, params):
        if params is None:
            return self.params
        if isinstance(params, torch.Tensor):
            return self.unflatten(params)
        return params

    def _refuse_sharded(self, what: str) -> None:
        """One sentence refusing ``what`` in sharded mode (no-op otherwise)."""
        if getattr(self, "sharding", None) is not None:
            from ._sharded import refuse_unsharded

            refuse_unsharded(self, what)

    def loss(self, params: None | torch.Tensor | dict[str, torch.Tensor] = None) -> torch.Tensor:
        """Total loss (data term plus weight decay) at ``params`` (flat or dict; default: w)."""
        if getattr(self, "sharding", None) is not None:
            if params is not None:
                self._refuse_sharded("the loss at other weights")
            loss, _ = self.sharding.gradient()
            w = self.sharding.vector()
            decay = 0.5 * self.weight_decay * self.reduce(torch.dot(w, w).reshape(1))[0]
            return torch.as_tensor(loss, dtype=self.dtype) + decay.to(self.dtype)
        params = self._default(params)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad(), self.mode():
            for b in self.batches():
                total = total + self.first_order_loss(params, b)
            total = self.reduce(total) + self.regulariser(params)
        return total

    def loss_and_grad(
        self, params: None | torch.Tensor | dict[str, torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss and its flat gradient at ``params`` (default: the model's weights)."""
        self._refuse_sharded("the full gradient (Problem.loss_and_grad)")
        params = self._default(params)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with self.mode(), torch.enable_grad(), self.leaves(params) as leaves:
            values = list(leaves.values())
            for b in self.batches():
                value = self.first_order_loss(leaves, b)
                if value.requires_grad:
                    gs = torch.autograd.grad(value, values, allow_unused=True)
                    grad += self.flatten(zeros_for_none(gs, values))
                total = total + value.detach()
            if self.group.active:
                both = self.reduce(torch.cat([total.reshape(1), grad]))
                total, grad = both[0], both[1:].clone()
            total = total + self.regulariser(params).detach()
            grad += self.weight_decay * self.flatten([p.detach() for p in params.values()])
        return total, grad

    def outputs(
        self, params: None | dict[str, torch.Tensor] = None
    ) -> Iterator[tuple[torch.Tensor, Batch]]:
        """Model outputs batch by batch (no gradient), with the batches they came from."""
        self._refuse_sharded("evaluating outputs batch by batch")
        params = self._default(params)
        with torch.no_grad(), self.mode():
            for b in self.batches():
                yield self.forward(params, b.inputs), b

    def accuracy(
        self, params: None | torch.Tensor | dict[str, torch.Tensor] = None
    ) -> float | None:
        """Fraction of correct predictions among the loss terms, or ``None`` for regression."""
        if not self.loss_fn.classification and self.loss_name != "bce_with_logits":
            return None
        correct = 0
        total = 0
        for out, b in self.outputs(self._default(params)):
            c, n = prediction_counts(self.loss_fn, out, b.target)
            correct += c
            total += n
        correct, total = self.reduce([correct, total])
        return correct / total if total else None


# --------------------------------------------------------------------------- helpers
def zeros_for_none(grads, leaves) -> list[torch.Tensor]:
    """Gradients with ``None`` (parameters that do not affect the value) replaced by zeros."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves, strict=True)]


def prediction_counts(loss: Loss, out: torch.Tensor, target: Any) -> tuple[int, int]:
    """``(correct, counted)`` predictions of one batch for a classification loss."""
    if loss.name == "bce_with_logits":
        pred = (out > 0).to(target.dtype).reshape(target.shape)
        if target.dim() > 1:
            return int((pred == target).all(dim=-1).sum()), int(target.shape[0])
        return int((pred == target).sum()), int(target.numel())
    rows, t, keep = loss.rows(out, target)
    hit = (rows.argmax(dim=-1) == t) & keep
    return int(hit.sum()), int(keep.sum())


def _field(out: Any, key: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(key)
    value = getattr(out, key, None)
    return value if isinstance(value, torch.Tensor) else None


def _pick(out: Any, key: int | str) -> Any:
    if isinstance(key, str) and key.lstrip("-").isdigit():
        key = int(key)
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        try:
            return out[key] if not isinstance(key, int) else list(out.values())[key]
        except (KeyError, IndexError, TypeError):
            return None
    if isinstance(out, (tuple, list)) and isinstance(key, int):
        return out[key] if -len(out) <= key < len(out) else None
    if isinstance(key, str):
        return getattr(out, key, None)
    return None


def _describe_output(out: Any) -> str:
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        return f"a {type(out).__name__} with keys {', '.join(map(str, out.keys()))}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} outputs"
    return f"a {type(out).__name__}"
