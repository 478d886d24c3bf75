"""Checks of weights, data and model before any product: finite values, valid ids, determinism.

Owns :meth:`DataChecks.check_data`, :meth:`DataChecks.check_finite`,
:meth:`DataChecks.check_deterministic` and :func:`check_output_finite` (which names the batch and
positions of a non-finite model output).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .._errors import DataError, DeterminismError, NonFiniteError
from ._batch import _tensors


class DataChecks:
    """The checks a problem runs on its weights, data and model."""

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
