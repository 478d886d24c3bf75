"""The parts :class:`curvscope.problem.Problem` is composed of; imported by ``problem`` only.

- :mod:`._batch`: the batch types (:class:`Inputs`, :class:`Batch`) and tensor-tree helpers.
- :mod:`._counters`: the pass and work counters and the family token shared by every view.
- :mod:`._params`: parameter selection, the flat layout and blocks.
- :mod:`._data`: the data loop (splitting, counting, weighting, moving batches; ranks).
- :mod:`._checks`: checks of weights, data and model (finite values, ids, determinism).
- :mod:`._record`: the input record ``curvscope.load`` gives a problem (document ``input``).

Evaluation (mode, forward, loss, gradient, outputs) stays in :mod:`curvscope.problem`, where the
mixins are put together.
"""

from ._batch import Batch, Inputs, batch_seed, map_tensors
from ._checks import DataChecks, check_output_finite
from ._counters import Counters
from ._data import DataLoop
from ._params import Parameters
from ._record import InputRecord, Recorded

__all__ = [
    "Batch",
    "Counters",
    "DataChecks",
    "DataLoop",
    "InputRecord",
    "Inputs",
    "Parameters",
    "Recorded",
    "batch_seed",
    "check_output_finite",
    "map_tensors",
]
