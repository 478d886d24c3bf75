"""Data parallelism over ``torch.distributed``: products, losses and gradients summed over ranks.

Every rank holds the model, a share of the batches and the same Krylov vectors.

The same code runs on CPUs (backend ``gloo``) and GPUs (``nccl``). Under ``torchrun`` the
command line joins the process group from the environment (:func:`from_environment`); the
library takes a :class:`Group` (or an initialised ``torch.distributed`` process group) through
``Problem(..., group=...)``, ``curvscope.load(..., group=...)`` or ``cs.hessian(prob,
group=...)``. Batch ``i`` belongs to rank ``i mod world_size``; counting the loss terms reads
every batch on every rank, so the batch weights are global and identical everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import OptionError, arg

__all__ = ["Group", "as_group", "from_environment", "single"]


@dataclass(frozen=True)
class Group:
    """Who this process is among ``world_size`` data-parallel processes.

    Attributes:
        rank: this process's rank.
        world_size: number of processes.
        handle: the ``torch.distributed`` process group (``None``: the default group, or a
            single process).
    """

    rank: int = 0
    world_size: int = 1
    handle: Any = None

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, which writes documents, figures and messages."""
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        """Whether batch ``batch_index`` is this rank's."""
        return batch_index % self.world_size == self.rank

    @property
    def backend_needs_device(self) -> bool:
        """Whether collectives need tensors on the CUDA device (NCCL) rather than the host."""
        if not self.active:
            return False
        import torch.distributed as dist

        return str(dist.get_backend(self.handle)).lower() == "nccl"

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The sum (or maximum, ``op="max"``) over ranks, in place, returned.

        The identity for one process. A tensor on a device the backend cannot reduce on
        (a CUDA tensor under gloo, a host tensor under NCCL) travels there and back.
        """
        if not self.active:
            return tensor
        import torch.distributed as dist

        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        on_cuda = tensor.device.type == "cuda"
        if self.backend_needs_device != on_cuda:
            if self.backend_needs_device:
                moved = tensor.to(f"cuda:{torch.cuda.current_device()}")
            else:
                moved = tensor.cpu()
            dist.all_reduce(moved, op=reduce_op, group=self.handle)
            tensor.copy_(moved)
            return tensor
        dist.all_reduce(tensor, op=reduce_op, group=self.handle)
        return tensor

    def all_reduce_float(self, value: float, device: torch.device | str = "cpu") -> float:
        """The sum over ranks of a Python number."""
        if not self.active:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        return float(self.all_reduce(t)[0])

    def reduce(self, value: Any, op: str = "sum", device: torch.device | str = "cpu") -> Any:
        """``value`` reduced over ranks: a tensor (in place), a number, or nested lists of them.

        Lists, tuples and dicts of numbers go in one collective for all the numbers. Every
        rank must pass a value of the same structure (the same keys, lengths and tensor
        shapes).
        """
        if not self.active:
            return value
        if isinstance(value, torch.Tensor):
            return self.all_reduce(value, op)
        leaves: list[Any] = []
        _collect(value, leaves)
        numbers = [v for v in leaves if not isinstance(v, torch.Tensor)]
        if numbers:
            t = torch.tensor([float(v) for v in numbers], dtype=torch.float64, device=device)
            reduced = self.all_reduce(t, op).tolist()
        else:
            reduced = []
        for v in leaves:
            if isinstance(v, torch.Tensor):
                self.all_reduce(v, op)
        it = iter(reduced)
        return _rebuild(value, it)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.handle)


def _collect(value: Any, out: list[Any]) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _collect(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect(v, out)
    else:
        out.append(value)


def _rebuild(value: Any, numbers: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rebuild(v, numbers) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(v, numbers) for v in value)
    if isinstance(value, torch.Tensor):
        return value
    number = next(numbers)
    if isinstance(value, bool):
        return bool(number)
    if isinstance(value, int):
        return int(round(number))
    return number


def single() -> Group:
    """One process."""
    return Group()


def as_group(group: Any) -> Group:
    """A :class:`Group` from ``None``, a :class:`Group` or a ``torch.distributed`` group.

    Raises:
        OptionError: for a process group while ``torch.distributed`` is not initialised.
    """
    if group is None:
        return single()
    if isinstance(group, Group):
        return group
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise OptionError(
            f"{arg('group')} was given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first, or run under torchrun)."
        )
    return Group(dist.get_rank(group), dist.get_world_size(group), group)


def from_environment(device: str = "cpu") -> tuple[Group, str]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), once.

    Backend ``nccl`` for CUDA devices, ``gloo`` otherwise; each rank then uses its local
    CUDA device (``LOCAL_RANK``) when the device asked for is CUDA.

    Returns:
        The group and the device this rank runs on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return single(), device
    import torch.distributed as dist

    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), None), device
