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
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ._distributed import as_group
from ._errors import DataError, DeterminismError, NonFiniteError, OptionError, arg
from ._losses import IGNORE_INDEX, CallableLoss, CausalLM, Loss, ModelLoss, get_loss
from ._sampling import as_generator, subset_indices

__all__ = ["Batch", "Inputs", "Problem", "batch_seed", "map_tensors"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict, keeping the structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index``'s random draws for a matrix seeded with ``seed``.

    Per-batch seeds make Monte-Carlo matrices the same whichever process evaluates which
    batch (data parallelism) and whatever batches come before.
    """
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


def _checked(inputs: Inputs, target: Any, raw: Any) -> tuple[Inputs, Any]:
    """A batch whose inputs hold a tensor and whose target is tensors (or none).

    Raises:
        DataError: naming what the data gave instead.
    """
    if not _tensors(inputs.args) and not _tensors(inputs.kwargs):
        raise DataError(
            f"a batch's inputs hold no tensor: the data gave {type(raw).__name__} inputs "
            "(convert them to torch tensors in the data source)."
        )
    if target is not None and not _tensors(target):
        raise DataError(
            f"a batch's targets are a {type(target).__name__}, not tensors (convert them to "
            "torch tensors in the data source)."
        )
    return inputs, target


def _tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensors(obj, lambda t: out.append(t) or t)
    return out


@dataclass(frozen=True)
class Inputs:
    """A batch's model inputs: positional ``args`` and keyword ``kwargs`` of ``forward``."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def map(self, fn) -> Inputs:
        """The same inputs with ``fn`` applied to every tensor."""
        return Inputs(map_tensors(self.args, fn), map_tensors(self.kwargs, fn))

    @property
    def tensor(self) -> torch.Tensor:
        """The only input, when the model takes one tensor.

        Raises:
            OptionError: when the inputs are not a single tensor.
        """
        if len(self.args) == 1 and not self.kwargs and isinstance(self.args[0], torch.Tensor):
            return self.args[0]
        raise OptionError(
            "this method needs a model that takes one input tensor; the batches give "
            f"{len(self.args)} positional and {len(self.kwargs)} keyword inputs."
        )


@dataclass(frozen=True)
class Batch:
    """One batch on the parameters' device, with its weight in the total loss.

    Attributes:
        inputs: what the model's forward takes.
        target: the loss's target (``None`` for a model that computes its own loss).
        weight: ``terms / total terms`` (mean reduction) or 1 (sum).
        size: samples in the batch (the leading dimension).
        terms: loss terms in the batch.
        index: the batch's position in a pass over the data (seeds per-batch random draws,
            so they do not depend on which process evaluates the batch).
    """

    inputs: Inputs
    target: Any
    weight: float
    size: int
    terms: int = 0
    index: int = 0

    @property
    def x(self) -> torch.Tensor:
        """The single input tensor (see :attr:`Inputs.tensor`)."""
        return self.inputs.tensor

    @property
    def y(self) -> Any:
        """The target."""
        return self.target

    def narrow(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop``: every tensor whose leading dimension is the batch's, cut.

        The weight and terms stay the whole batch's (an operator that sums the parts of a
        batch scales them as the batch); call only where samples do not interact.
        """

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[start:stop] if t.dim() and t.shape[0] == self.size else t

        return replace(
            self,
            inputs=self.inputs.map(cut),
            target=map_tensors(self.target, cut),
            size=min(stop, self.size) - start,
        )


def _is_scripted(model: nn.Module) -> bool:
    return any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())


class Problem:
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
            ``0``: keep none (the data are streamed at every product).

    Attributes:
        hvp_record: how Hessian products were taken (backend, fallback, finite-difference
            step and errors, kept graphs), shared by every view of the problem; result
            documents carry it as ``hvp``.
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
        # one counter shared by every view of this problem (blocks, subsets, dtype copies),
        # so a document counts the passes its operators made on any of them
        self._passes = [0]
        # work for progress bars: one per pass, a k-column curvature product counts k
        self._work = [0]
        # bytes held by kept Hessian graphs of every view, against one graph_cache budget
        self._kept_bytes = [0]
        # the product meter installed by :meth:`metered` (one slot for every view)
        self._meter: list[Any] = [None]
        self.graph_cache = None if graph_cache is None else max(0.0, float(graph_cache))
        self.hvp_record: dict[str, Any] = {}
        self.notes: list[str] = []
        self._count()
        if check_deterministic:
            self.check_deterministic()

    @property
    def data_passes(self) -> int:
        """Passes over the data so far, by this problem and every view of it."""
        return self._passes[0]

    @data_passes.setter
    def data_passes(self, value: int) -> None:
        self._passes[0] = int(value)

    @property
    def work_done(self) -> int:
        """Products so far, for progress reports.

        A pass over the data counts one, a product with k columns counts k (by this problem
        and every view of it).
        """
        return self._work[0]

    def add_work(self, amount: int) -> None:
        """Count ``amount`` more units of :attr:`work_done`."""
        self._work[0] += int(amount)

    @property
    def product_meter(self) -> Any:
        """The :class:`~curvscope._meter.ProductMeter` installed by :meth:`metered`, or None."""
        slot = self.__dict__.get("_meter")
        return None if slot is None else slot[0]

    @contextlib.contextmanager
    def metered(self, meter: Any) -> Iterator[Any]:
        """Record every curvature product of this problem and its views in ``meter``."""
        slot = self.__dict__.setdefault("_meter", [None])
        before, slot[0] = slot[0], meter
        try:
            yield meter
        finally:
            slot[0] = before

    @property
    def kept_graph_bytes(self) -> int:
        """Bytes Hessian operators keep of first-order graphs, on this problem and its views."""
        return self._kept_bytes[0]

    def hold_graph_bytes(self, amount: int) -> None:
        """Count ``amount`` more bytes of kept graphs (negative: given back)."""
        self._kept_bytes[0] += int(amount)

    # ----------------------------------------------------------------- parameters
    @staticmethod
    def _select(params, model: nn.Module) -> dict[str, torch.Tensor]:
        named = dict(model.named_parameters())
        if isinstance(params, dict):
            unknown = [n for n in params if n not in named]
            if unknown:
                raise OptionError(
                    f"{arg('params')}: {unknown} are not parameters of the model.",
                    option="params",
                )
            chosen = [n for n in named if n in params]
        elif params is None:
            chosen = list(named)
        else:
            globs = [params] if isinstance(params, str) else list(params)
            globs = [g.strip() for pat in globs for g in pat.split(",") if g.strip()]
            chosen = [n for n in named if any(fnmatch.fnmatchcase(n, g) for g in globs)]
            if not chosen:
                shown = ", ".join(list(named)[:20]) + (" ..." if len(named) > 20 else "")
                raise OptionError(
                    f"{arg('params')} {','.join(globs)!r} matches no parameter; the model has "
                    f"{shown}.",
                    option="params",
                )
        if not chosen:
            raise OptionError(f"{arg('params')} selects no parameter of the model.")
        return {n: named[n].detach() for n in chosen}

    def _set_params(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        offsets = [0]
        for n in self.numels:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        self.num_params = offsets[-1]
        first = next(iter(params.values()))
        self.dtype = first.dtype
        self.device = first.device

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
        new = self._copy()
        new.group = as_group(group)
        new._count()
        return new

    def alone(self) -> Problem:
        """This problem in one process: every batch evaluated here, nothing summed over ranks.

        The batch weights stay the global ones, so the loss is the full-data loss.
        """
        if not self.group.active:
            return self
        new = self._copy()
        new.group = as_group(None)
        return new

    def select(self, params: None | str | list[str]) -> Problem:
        """A problem over the same model, loss and data with another parameter selection.

        The new problem shares the data and the sample count; no pass over the data is made.
        """
        new = self._copy()
        new._set_params(self._select(params, self.model))
        return new

    def param_slices(self) -> dict[str, slice]:
        """Where each selected parameter lies in the flat vector."""
        return {n: slice(self.offsets[i], self.offsets[i + 1]) for i, n in enumerate(self.names)}

    def module_blocks(self) -> dict[str, list[str]]:
        """Selected parameter names grouped by the module that owns them (per-layer blocks).

        Module names are those of ``named_modules()`` (``transformer.h.0.attn``...); only
        modules that own a selected parameter directly appear, in ``named_parameters()`` order.
        """
        blocks: dict[str, list[str]] = {}
        for name in self.names:
            module = name.rpartition(".")[0]
            blocks.setdefault(module, []).append(name)
        return blocks

    def block_names(self) -> list[str]:
        """Every named block: modules, then parameters, then groups."""
        modules = list(self.module_blocks())
        return modules + [n for n in self.names if n not in modules] + list(self.groups)

    def block_param_names(self, block: str) -> list[str]:
        """Parameter names of a block: ``"all"``, a module, a parameter or a group name.

        Raises:
            OptionError: when no selected parameter belongs to ``block``, listing valid names.
        """
        if block == "all":
            return list(self.names)
        if block in self.params:
            return [block]
        modules = self.module_blocks()
        if block in modules:
            return modules[block]
        if block in getattr(self, "groups", {}):
            globs = self.groups[block]
            chosen = [n for n in self.names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
            if not chosen:
                raise OptionError(
                    f"group {block!r} ({', '.join(globs)}) matches no selected parameter.",
                    option="group",
                )
            return chosen
        valid = ["all", *self.block_names()]
        shown = ", ".join(valid[:30]) + (" ..." if len(valid) > 30 else "")
        raise OptionError(
            f"block {block!r} does not exist; valid blocks: {shown}.", option="blocks", block=block
        )

    def flatten(self, tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat vector (selected-parameter order)."""
        parts = tensors.values() if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in parts])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector ``[P]`` (or columns ``[P, k]`` -> ``[k, *shape]``) per parameter."""
        if vec.shape[0] != self.num_params:
            raise OptionError(
                f"a vector of length {vec.shape[0]} does not fit the {self.num_params} "
                "selected parameters."
            )
        out = {}
        for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=True)):
            piece = vec[self.offsets[i] : self.offsets[i + 1]]
            if vec.dim() == 1:
                out[name] = piece.reshape(shape)
            else:
                out[name] = piece.T.reshape(vec.shape[1], *shape)
        return out

    def param_vector(self) -> torch.Tensor:
        """A flat copy of the selected parameters' current values."""
        return self.flatten(self.params).clone()

    def params_at(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter dict with values from the flat vector ``flat``."""
        return self.unflatten(flat)

    # ----------------------------------------------------------------- modes
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

    # ----------------------------------------------------------------- data
    def split(self, item: Any) -> tuple[Inputs, Any]:
        """One raw batch as ``(inputs, target)``.

        ``(inputs, targets)`` pairs, dict batches (``labels`` is the target; kept among the
        inputs for a model that computes its own loss), and for ``causal_lm`` also bare inputs
        (the target is the inputs, padding positions of ``attention_mask`` ignored).

        Raises:
            DataError: for a batch of another structure.
        """
        extra = self.forward_kwargs
        own_loss = isinstance(self.loss_fn, ModelLoss)
        if isinstance(item, Mapping):
            kwargs = dict(item)
            target = kwargs.get("labels")
            if not own_loss:
                kwargs.pop("labels", None)
                self._decoder_inputs(kwargs, target)
            if isinstance(self.loss_fn, CausalLM) and target is None:
                # given labels are taken as they are (-100 marks what is no term), as
                # HuggingFace's own loss takes them; derived ones skip padding
                target = _lm_target(kwargs.get("input_ids"), kwargs.get("attention_mask"))
            if target is None and not own_loss:
                raise DataError(
                    f"a dict batch needs a 'labels' entry for the {self.loss_name} loss; it has "
                    f"{', '.join(map(str, item))}."
                )
            return _checked(Inputs((), {**kwargs, **extra}), target, item)
        if isinstance(item, torch.Tensor):
            if isinstance(self.loss_fn, CausalLM):
                return Inputs((item,), dict(extra)), _lm_target(item, None)
            raise DataError(
                "the data gave a bare tensor where a batch (inputs, targets) was expected."
            )
        if isinstance(item, (tuple, list)):
            if len(item) == 1 and isinstance(self.loss_fn, CausalLM):
                return self.split(item[0])
            if len(item) != 2:
                raise DataError(
                    f"a batch must be (inputs, targets) or a dict; the data gave a "
                    f"{type(item).__name__} of {len(item)} items."
                )
            x, y = item
            if isinstance(x, Mapping):
                inputs = Inputs((), {**dict(x), **extra})
            elif isinstance(x, (tuple, list)):
                inputs = Inputs(tuple(x), dict(extra))
            else:
                inputs = Inputs((x,), dict(extra))
            if isinstance(self.loss_fn, CausalLM) and y is None:
                y = _lm_target(x if isinstance(x, torch.Tensor) else None, None)
            return _checked(inputs, y, x)
        raise DataError(
            f"a batch must be (inputs, targets) or a dict of tensors; the data gave a "
            f"{type(item).__name__}."
        )

    def _decoder_inputs(self, kwargs: dict, labels: Any) -> None:
        """Decoder inputs an encoder-decoder model derives from ``labels``, which are not passed.

        HuggingFace seq2seq models (T5, BART...) build ``decoder_input_ids`` from the labels
        inside their forward; with the labels held back for curvscope's loss, they are built
        here by the model's own ``prepare_decoder_input_ids_from_labels``.
        """
        prepare = getattr(self.model, "prepare_decoder_input_ids_from_labels", None)
        if (
            prepare is None
            or not isinstance(labels, torch.Tensor)
            or "decoder_input_ids" in kwargs
            or "decoder_inputs_embeds" in kwargs
        ):
            return
        kwargs["decoder_input_ids"] = prepare(labels=labels)

    @staticmethod
    def _size(inputs: Inputs, target: Any) -> int:
        for t in [*_tensors(inputs.args), *_tensors(inputs.kwargs), *_tensors(target)]:
            if t.dim() > 0:
                return int(t.shape[0])
        return 1

    def _raw(self) -> Iterator[Any]:
        try:
            iterator = iter(self.data)
        except TypeError:
            raise DataError(
                f"the data ({type(self.data).__name__}) is not iterable; pass a list of "
                "batches, a DataLoader or another re-iterable source."
            ) from None
        yield from iterator

    def _count(self) -> None:
        sizes, terms = [], []
        need_out = self.loss_fn.terms_need_output
        for i, item in enumerate(self._raw()):
            if not self.group.owns(i):  # another rank counts it (summed below)
                sizes.append(0)
                terms.append(0)
                continue
            inputs, target = self.split(item)
            sizes.append(self._size(inputs, target))
            if need_out:
                with torch.no_grad(), self.mode():
                    out = self.forward(self.params, self._move(inputs))
                terms.append(self.loss_fn.terms(out, self._move_target(target)))
            else:
                terms.append(self.loss_fn.terms(None, target))
        if self.group.active:
            sizes, terms = self._share_counts(sizes, terms)
        if not sizes or sum(sizes) == 0:
            raise DataError("the data set is empty: it gave no batch with samples.")
        self.batch_sizes = sizes
        self.batch_terms = terms
        self.num_samples = sum(sizes)
        self.num_terms = sum(terms)
        if self.reduction == "mean" and self.num_terms == 0:
            raise DataError(
                f"the data hold no loss term: every target is the ignore index {IGNORE_INDEX}."
            )

    def _share_counts(self, sizes: list[int], terms: list[int]) -> tuple[list[int], list[int]]:
        """Every rank's batch sizes and loss terms, from the batches each rank counted."""
        g = self.group
        n = len(sizes)
        # a cpu tensor for gloo, the device's for nccl
        dev = self.device if g.backend_needs_device else "cpu"
        lengths = torch.zeros(g.world_size, dtype=torch.int64, device=dev)
        lengths[g.rank] = n
        g.all_reduce(lengths)
        if int(lengths.min()) != int(lengths.max()):
            raise DeterminismError(
                "the data source gives a different number of batches on different processes "
                f"({', '.join(str(int(v)) for v in lengths)}): every rank must see the same "
                "batches in the same order."
            )
        if n < g.world_size:
            raise DataError(
                f"the data give {n} batch(es), fewer than the {g.world_size} processes; lower "
                f"{arg('batch_size')} so that every process has a batch."
            )
        both = torch.tensor([sizes, terms], dtype=torch.int64, device=dev)
        g.all_reduce(both)
        return both[0].tolist(), both[1].tolist()

    def reduce(self, value: Any, op: str = "sum") -> Any:
        """``value`` summed (or maximised, ``op="max"``) over the data-parallel ranks.

        Tensors are reduced in place and returned; Python numbers, and lists, tuples and dicts
        of them and of tensors, come back as new objects. The identity for one process.
        """
        if not self.group.active:
            return value
        return self.group.reduce(value, op=op, device=self.device)

    def _move(self, obj: Any) -> Any:
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.device)
            return t.to(self.dtype) if t.is_floating_point() else t

        return obj.map(move) if isinstance(obj, Inputs) else map_tensors(obj, move)

    def _move_target(self, target: Any) -> Any:
        return self._move(target)

    def batch_weight(self, terms: int) -> float:
        """Weight of a batch with ``terms`` loss terms in the total loss (``T_b/T`` or 1)."""
        return terms / self.num_terms if self.reduction == "mean" else 1.0

    def batches(self) -> Iterator[Batch]:
        """One pass over the data: batches moved to the parameters' device."""
        self.data_passes += 1
        self._work[0] += 1
        for i, item in enumerate(self._raw()):
            if not self.group.owns(i):
                continue
            inputs, target = self.split(item)
            size = self._size(inputs, target)
            if i < len(self.batch_terms) and size == self.batch_sizes[i]:
                terms = self.batch_terms[i]
            else:  # the determinism check reports this; keep the pass correct meanwhile
                fn = self.loss_fn
                terms = size if fn.terms_need_output else fn.terms(None, target)
            yield Batch(
                self._move(inputs),
                self._move_target(target),
                self.batch_weight(terms),
                size,
                terms,
                index=i,
            )

    # ----------------------------------------------------------------- evaluation
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

    def loss(self, params: None | torch.Tensor | dict[str, torch.Tensor] = None) -> torch.Tensor:
        """Total loss (data term plus weight decay) at ``params`` (flat or dict; default: w)."""
        params = self._default(params)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad(), self.mode():
            for b in self.batches():
                total = total + self.batch_loss(params, b)
            total = self.reduce(total) + self.regulariser(params)
        return total

    def loss_and_grad(
        self, params: None | torch.Tensor | dict[str, torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss and its flat gradient at ``params`` (default: the model's weights)."""
        params = self._default(params)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with self.mode(), torch.enable_grad(), self.leaves(params) as leaves:
            values = list(leaves.values())
            for b in self.batches():
                value = self.batch_loss(leaves, b)
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

    # ----------------------------------------------------------------- checks
    def check_data(
        self,
        *,
        source: str | None = None,
        classes: int | None = None,
        vocabulary: int | None = None,
    ) -> None:
        """The one check of weights and data, in one pass: finite values and valid ids.

        Args:
            source: what the data are, for messages.
            classes: the model's number of outputs for a class-index loss: targets must lie
                in ``0..classes-1`` (or be the ignore index).
            vocabulary: the size of the model's embedding: integer inputs must lie below it.

        Raises:
            NonFiniteError: naming the parameter, or the data, that holds NaN/Inf.
            DataError: for class targets or token ids out of range.
        """
        for name, p in self.params.items():
            if not torch.isfinite(p).all():
                raise NonFiniteError(f"parameter {name} holds NaN or Inf values.", parameter=name)
        where = f" of {source}" if source else ""
        for i, b in enumerate(self.batches()):
            inputs = _tensors(b.inputs.args) + _tensors(b.inputs.kwargs)
            for kind, tensors in (("inputs", inputs), ("targets", _tensors(b.target))):
                for t in tensors:
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise NonFiniteError(
                            f"the {kind}{where} hold NaN or Inf values (batch {i}).", path=source
                        )
            if classes is not None and isinstance(b.target, torch.Tensor):
                t = b.target
                if t.is_floating_point():
                    raise DataError(
                        f"the {self.loss_name} loss needs integer class targets, but the "
                        f"targets{where} are real-valued."
                    )
                live = t[t != self.loss_fn.ignore_index]
                if live.numel() and (int(live.min()) < 0 or int(live.max()) >= classes):
                    raise DataError(
                        f"targets{where} range over {int(live.min())}..{int(live.max())} but "
                        f"the model has {classes} outputs (targets must lie in "
                        f"0..{classes - 1}, or be {self.loss_fn.ignore_index} to be ignored)."
                    )
            if vocabulary is not None:
                ids = [t for t in b.inputs.args if isinstance(t, torch.Tensor)]
                ids += [v for k, v in b.inputs.kwargs.items() if k == "input_ids"]
                for t in ids:
                    if t.is_floating_point() or t.dtype == torch.bool or not t.numel():
                        continue
                    hi = int(t.max())
                    if hi >= vocabulary or int(t.min()) < 0:
                        raise DataError(
                            f"token id {hi if hi >= vocabulary else int(t.min())} in the "
                            f"inputs{where} is past the model's vocabulary of {vocabulary} "
                            f"(ids must lie in 0..{vocabulary - 1})."
                        )

    def check_finite(self, *, source: str | None = None) -> None:
        """Finite weights and data (:meth:`check_data` without id checks)."""
        self.check_data(source=source)

    def check_deterministic(self, num_batches: int = 2) -> None:
        """Two passes must give the same matrix: compare batches, then loss and gradient.

        The first ``num_batches`` batches of two iterations are compared entry by entry; when
        they differ (a shuffling loader), two full passes must still give the same loss and
        gradient (batch weights make a pass independent of order), else the first difference
        is named. The model's output on the first batch, evaluated twice, catches dropout
        and stochastic layers; the batch sizes of a pass catch samplers that drop samples.

        Raises:
            DeterminismError: naming what differs (which batch and entry, or the model).
        """
        first = _take(self._raw(), num_batches)
        second = _take(self._raw(), num_batches)
        diff = None
        for i, (a, b) in enumerate(zip(first, second, strict=False)):
            d = _first_difference(a, b)
            if d is not None:
                diff = f"{d} of batch {i}"
                break
        sizes = [self._size(*self.split(item)) for item in self._raw()]
        if sizes != self.batch_sizes:
            raise DeterminismError(
                f"the data gave batches of sizes {sizes[:8]} after {self.batch_sizes[:8]}"
                + (f" and {diff} changed" if diff else "")
                + ": a sampler that drops or reorders samples (drop_last with shuffling, a "
                "random sampler) makes every product a different matrix; pass a fixed list of "
                "batches."
            )
        batch = next(self.batches())
        with torch.no_grad(), self.mode():
            o1 = self.forward(self.params, batch.inputs)
            o2 = self.forward(self.params, batch.inputs)
        check_output_finite(o1, batch.index)
        if not torch.equal(o1, o2):
            raise DeterminismError(
                "the model gave two different outputs for the same batch: it samples "
                "(dropout in its forward, stochastic layers); make its forward deterministic."
            )
        if diff is None:
            return
        l1, g1 = self.loss_and_grad()
        l2, g2 = self.loss_and_grad()
        rtol = 1000 * torch.finfo(self.dtype).eps
        scale = max(float(g1.abs().max()), 1e-30)
        if (
            abs(float(l1 - l2)) > rtol * max(abs(float(l1)), 1.0)
            or float((g1 - g2).abs().max()) > rtol * scale
        ):
            raise DeterminismError(
                f"the data differ between two passes ({diff} changed) and so do the loss and "
                "gradient: the source draws different samples each pass (drop_last with shuffling, "
                "a random sampler, "
                "random augmentation); pass a fixed, ordered source so every product sees the "
                "same matrix."
            )
        self.notes.append(
            f"the data source reorders its batches between passes ({diff} changed); the loss "
            "and gradient of two passes agree, so every product sees the same matrix up to "
            "round-off."
        )

    def subsample(self, n: int, seed: int | torch.Generator | None = 0) -> Problem:
        """The same problem on a seeded random subset of ``n`` samples (for repeats).

        Uses the one subsetting routine (:func:`curvscope._sampling.subset_indices`); the
        chosen samples are gathered in one streamed pass and re-batched with this problem's
        largest batch size.

        Raises:
            OptionError: when ``n`` is not between 1 and the number of samples.
        """
        idx = subset_indices(self.num_samples, n, as_generator(seed))
        wanted = set(idx.tolist())
        picked: list[Any] = []
        start = 0
        for item in self._raw():
            inputs, target = self.split(item)
            size = self._size(inputs, target)
            local = [i - start for i in range(start, start + size) if i in wanted]
            if local:
                rows = torch.tensor(local, dtype=torch.long)
                picked.append(_index_rows(item, rows, size))
            start += size
        merged = _concat(picked)
        step = max(self.batch_sizes)
        batches = [_slice_rows(merged, i, i + step) for i in range(0, int(n), step)]
        new = self._copy()
        new.data = batches
        new._count()
        return new

    def to(self, dtype: torch.dtype) -> Problem:
        """The same problem with the model cast to ``dtype`` (a copy; this one is untouched)."""
        if dtype == self.dtype:
            return self
        model = copy.deepcopy(self.model).to(dtype)
        new = self._copy()
        new.model = model
        new._set_params(self._select(list(self.names), model))
        new.scripted = _is_scripted(model)
        return new


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


def _lm_target(ids: Any, mask: Any) -> torch.Tensor | None:
    """Next-token targets for ``causal_lm``: the ids, with padding ignored on both sides.

    A position is no target when it is padding, or when the position that predicts it is
    (the first real token after left padding has nothing real before it).
    """
    if not isinstance(ids, torch.Tensor):
        return None
    return _mask_lm_targets(ids.clone(), mask, own=True)


def _mask_lm_targets(target: torch.Tensor, mask: Any, *, own: bool) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or target.dim() != 2 or mask.shape != target.shape:
        return target
    pad = mask == 0
    if own:
        target = target.masked_fill(pad, IGNORE_INDEX)
    shifted = torch.zeros_like(pad)
    shifted[:, 1:] = pad[:, :-1]
    return target.masked_fill(shifted, IGNORE_INDEX)


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


def check_output_finite(out: Any, index: int, what: str = "output") -> None:
    """Name the batch and the first positions where the model's output is NaN or Inf.

    Raises:
        NonFiniteError: when ``out`` holds a non-finite entry.
    """
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return
    bad = ~torch.isfinite(out)
    if not bool(bad.any()):
        return
    # positions along every dimension but the last (samples, tokens), first few
    kinds = " and ".join(
        k for k, m in (("NaN", torch.isnan(out)), ("Inf", torch.isinf(out))) if bool(m.any())
    )
    if out.numel() == 1:
        raise NonFiniteError(
            f"the model's {what} is {kinds} for batch {index}: rows whose attention masks "
            "every key give NaN in eager attention (pad on the right), or a label is out of "
            "range, or the model overflows."
        )
    rows = bad.reshape(*out.shape[:-1], -1).any(-1) if out.dim() > 1 else bad
    where = [tuple(int(i) for i in r) for r in rows.nonzero()[:4].tolist()]
    raise NonFiniteError(
        f"the model's {what} holds {kinds} for batch {index} at {int(rows.sum())} "
        f"position(s) (sample, token), first {', '.join(map(str, where))}: rows whose "
        "attention masks every key give NaN in eager attention (pad on the right), or the "
        "inputs there overflow."
    )


def _take(iterator: Iterator, n: int) -> list:
    out = []
    for item in iterator:
        out.append(item)
        if len(out) >= n:
            break
    return out


def _first_difference(a: Any, b: Any, where: str = "the batch") -> str | None:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return f"the shape of {where} ({tuple(a.shape)} then {tuple(b.shape)})"
        return None if torch.equal(a, b) else where
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in a:
            if k not in b:
                return f"entry {k!r}"
            d = _first_difference(a[k], b[k], f"entry {k!r}")
            if d:
                return d
        return None
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        names = ["inputs", "targets"] if len(a) == 2 and where == "the batch" else None
        for i, (u, v) in enumerate(zip(a, b, strict=False)):
            d = _first_difference(u, v, names[i] if names else f"item {i} of {where}")
            if d:
                return d
        return None
    return None if a == b else where


def _index_rows(obj: Any, rows: torch.Tensor, size: int) -> Any:
    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[rows] if t.dim() > 0 and t.shape[0] == size else t

    return map_tensors(obj, pick)


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return first


def _slice_rows(obj: Any, i: int, j: int) -> Any:
    return map_tensors(obj, lambda t: t[i:j] if t.dim() > 0 else t)
