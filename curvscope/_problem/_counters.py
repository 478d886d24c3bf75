"""What every view of a problem shares: data passes, work, the meter, the family token.

A view (a block, a subset, a dtype copy, a distributed copy) copies the problem's attributes,
so each counter is a one-element list that all views hold together, and :class:`Family` is
one object they all carry: the key under which layers above keep per-problem state (the
Hessian's kept-graph account, :func:`curvscope.operators.graph_account`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class Family:
    """The identity a problem shares with every view of it (hashable, weakly referable)."""

    __slots__ = ("__weakref__",)


class Counters:
    """Passes and work counted over a problem and every view of it; their family token."""

    def _start_counters(self) -> None:
        # one counter shared by every view of this problem (blocks, subsets, dtype copies),
        # so a document counts the passes its operators made on any of them
        self._passes = [0]
        # work for progress bars: one per pass, a k-column curvature product counts k
        self._work = [0]
        # one token for the problem and its views: the Hessian keeps its graph account by it
        self.family = Family()
        # the product meter installed by :meth:`metered` (one slot for every view)
        self._meter: list[Any] = [None]

    @property
    def data_passes(self) -> int:
        """Passes over the data so far, by this problem and every view of it."""
        return self._passes[0]

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
