"""The data loop: raw batches into :class:`Batch` objects, counted, weighted and moved.

Owns how a raw batch splits into inputs and target (dict batches, ``causal_lm`` targets,
encoder-decoder inputs), the count of samples and loss terms per batch (shared over the
ranks), the batch weights, the one pass over the data (:meth:`DataLoop.batches`), the sum
over data-parallel ranks (:meth:`DataLoop.reduce`) and subsets of the samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import torch

from .._errors import DataError, DeterminismError, arg
from .._losses import IGNORE_INDEX, CausalLM, ModelLoss
from .._sampling import as_generator, subset_indices
from ._batch import Batch, Inputs, _tensors, map_tensors

P = TypeVar("P", bound="DataLoop")


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


class DataLoop:
    """The passes over a problem's data and the batch bookkeeping they need."""

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

    def batches(self, *, counted: bool = True) -> Iterator[Batch]:
        """One pass over the data: batches moved to the parameters' device.

        ``counted=False``: a pass that is no part of the analysis (a memory measurement),
        left out of :attr:`data_passes` and :attr:`work_done`.
        """
        if counted:
            self._passes[0] += 1
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

    def subsample(self: P, n: int, seed: int | torch.Generator | None = 0) -> P:
        """The same problem on a seeded random subset of ``n`` samples (for repeats).

        Uses the one subsetting routine (:func:`curvscope._sampling.subset_indices`); the
        chosen samples are gathered in one streamed pass and re-batched with this problem's
        largest batch size.

        Raises:
            OptionError: when ``n`` is not between 1 and the number of samples.
        """
        self._refuse_sharded("sample subsets (Problem.subsample)")  # type: ignore[attr-defined]
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
