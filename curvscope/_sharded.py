"""Sharded mode: the problem's parameters as FSDP2 shards (docs/sharded.md).

``Problem(..., shard=True)`` deep-copies the model and wraps the copy with
``torch.distributed.fsdp.fully_shard`` (each module owning parameters directly, then the
root) on a device mesh over the problem's process group. Every rank then holds dim-0 shards
of every parameter (uneven shards allowed: rows ``[r c, (r + 1) c)`` with
``c = ceil(rows / N)``), and :class:`Sharding` describes this rank's part of the flat vector:
the concatenation of the local shards of the selected parameters, in parameter order.

What FSDP2 (torch 2.13) supports decides what sharded mode computes: a forward and a first
backward through the wrapped module work (the gradients come back as shards, reduce-scattered),
but ``torch.autograd.grad(..., create_graph=True)`` over sharded parameters fails
("differentiated Tensor ... not used in the graph"), and ``torch.func`` cannot feed the
module other tensors. Hessian products are therefore finite differences of sharded
gradients (:class:`~curvscope.operators.ShardedHessianOperator`); matrices that need ``J v``
(GGN, Fisher, K-FAC...) are refused.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import nn

from ._errors import OptionError, arg

__all__ = ["Sharding", "refuse_unsharded", "sharded_model"]


def _own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _mesh(group: Any, device: torch.device):
    """A one-dimensional device mesh over the problem's ranks (a private one for one process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    kind = "cuda" if device.type == "cuda" else "cpu"
    if not dist.is_initialized():
        if group.active:
            raise OptionError(
                f"{arg('shard')} needs torch.distributed initialised for {group.world_size} "
                "processes (run under torchrun)."
            )
        # one process: a private group of one, so that FSDP has collectives to call
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if group.handle is None:
        if dist.get_world_size() != group.world_size:
            raise OptionError(
                f"{arg('shard')} with {group.world_size} process(es) needs the default process "
                f"group to have as many; it has {dist.get_world_size()}."
            )
        return init_device_mesh(kind, (group.world_size,))
    ranks = dist.get_process_group_ranks(group.handle)
    return DeviceMesh.from_group(group.handle, kind, mesh=torch.tensor(ranks))


def sharded_model(problem: Any) -> tuple[Any, dict[str, Any]]:
    """An FSDP2-sharded copy of ``problem``'s model and its selected parameters (DTensors).

    The caller's module is untouched (it is copied first); parameters that are not selected
    stop requiring gradients in the copy. The problem takes them, with a :class:`Sharding`
    describing the layout (:meth:`Problem.shard`).

    Raises:
        OptionError: for TorchScript models, train mode, and scalar parameters.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if problem.scripted:
        raise OptionError(f"{arg('shard')} cannot shard a TorchScript model; drop {arg('shard')}.")
    if problem.train_mode:
        raise OptionError(
            f"{arg('shard')} is not available with {arg('train_mode')} (untested under FSDP); "
            "drop one of them."
        )
    model = copy.deepcopy(problem.model)
    named = dict(model.named_parameters())
    scalars = [n for n in problem.names if named[n].dim() == 0]
    if scalars:
        raise OptionError(
            f"{arg('shard')} cannot shard the scalar parameter(s) {', '.join(scalars)}; leave "
            f"them out with {arg('params')}."
        )
    for n, p in named.items():
        p.requires_grad_(n in problem.params)
    mesh = _mesh(problem.group, problem.device)
    if problem.group.rank != 0:
        # FSDP2 warns when a wrapped module returns a view (most transformers do); the same
        # model gives every rank the same warning: rank 0 says it once for all of them
        warnings.filterwarnings(
            "ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
            category=UserWarning,
        )
    for module in model.modules():
        if module is not model and _own_params(module):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # sums over ranks, not means: each rank's loss carries its global batch weights
            module.set_gradient_divide_factor(1.0)
    sharded = dict(model.named_parameters())
    return model, {n: sharded[n] for n in problem.names}


class Sharding:
    """This rank's part of the flat parameter vector, and the sharded gradient.

    Attributes:
        rank, world_size: this process among the shards.
        rows: per selected parameter, the ``(start, stop)`` dim-0 rows held here.
        n_local: entries of the local vector.
        local_rows: positions of the local entries in the unsharded flat vector (``int64``,
            built when asked for: kept, it would take twice the memory of the shard).
    """

    def __init__(self, problem: Any, params: list[torch.Tensor]) -> None:
        self.problem = problem
        self.group = problem.group
        self.rank, self.world_size = self.group.rank, self.group.world_size
        self.tensors = params
        self.locals = [p.to_local() for p in params]
        self.rows: list[tuple[int, int]] = []
        self._spans: list[tuple[int, int]] = []  # [first, last) of the flat vector, per tensor
        for i, (p, loc) in enumerate(zip(params, self.locals, strict=True)):
            d0 = int(p.shape[0])
            c = math.ceil(d0 / self.world_size)
            start = min(self.rank * c, d0)
            stop = min(start + c, d0)
            if tuple(loc.shape) != (stop - start, *p.shape[1:]):
                raise RuntimeError(
                    f"FSDP sharded {problem.names[i]} as {tuple(loc.shape)} on rank {self.rank}, "
                    f"not rows {start}:{stop} of {tuple(p.shape)}: the layout is not dim-0 chunks."
                )
            self.rows.append((start, stop))
            row = p[0].numel() if d0 else 0
            base = problem.offsets[i]
            self._spans.append((base + start * row, base + stop * row))
        self.n_local = sum(b - a for a, b in self._spans)
        counts = len(problem.batch_sizes)
        # every rank makes the same number of forward/backward calls (FSDP's collectives)
        self.calls = math.ceil(counts / self.world_size)

    @property
    def local_rows(self) -> torch.Tensor:
        """Positions of this rank's entries in the unsharded flat vector (a new tensor)."""
        pieces = [torch.arange(a, b, dtype=torch.int64) for a, b in self._spans]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)

    # ------------------------------------------------------------------ vectors
    def vector(self) -> torch.Tensor:
        """A flat copy of this rank's weights."""
        return torch.cat([t.detach().reshape(-1) for t in self.locals]).clone()

    def assign(self, flat: torch.Tensor) -> None:
        """Set this rank's weights to the local vector ``flat`` (in place, no autograd)."""
        with torch.no_grad():
            off = 0
            for t in self.locals:
                k = t.numel()
                t.copy_(flat[off : off + k].reshape(t.shape))
                off += k

    def reduce_inner(self, t: torch.Tensor) -> torch.Tensor:
        """Partial inner products summed over the ranks (in place, returned)."""
        return self.group.all_reduce(t)

    def max_abs(self, flat: torch.Tensor) -> float:
        """``max |x|`` of a sharded vector over all ranks."""
        local = float(flat.abs().max()) if flat.numel() else 0.0
        if not self.group.active:
            return local
        t = torch.tensor([local], dtype=torch.float64)
        return float(self.group.all_reduce(t, op="max")[0])

    # ------------------------------------------------------------------ gradient
    def gradient(self) -> tuple[float, torch.Tensor]:
        """The data loss and this rank's shard of its gradient at the current weights.

        Every rank runs forward and backward through the FSDP module over its own batches
        (``Group.owns``), each batch's loss weighted as in the unsharded loss, then
        zero-weight passes on its first batch until all ranks made :attr:`calls` passes.
        The gradients are reduce-scattered and summed (divide factor 1).
        """
        p = self.problem
        for t in self.tensors:
            t.grad = None
        total = torch.zeros((), dtype=torch.float64)
        made = 0
        first = None
        with p.mode(), torch.enable_grad():
            for b in p.batches():
                value = p.batch_value(p.forward(p.params, b.inputs), b)
                value.backward()
                total += value.detach().to(torch.float64).cpu()
                first = b if first is None else first
                made += 1
            if made > self.calls:
                raise RuntimeError(f"rank {self.rank} holds {made} batches, not {self.calls}.")
            while made < self.calls:
                value = p.batch_value(p.forward(p.params, first.inputs), first)
                (value * 0.0).backward()
                made += 1
        grads = []
        for t, loc in zip(self.tensors, self.locals, strict=True):
            g = t.grad
            grads.append(torch.zeros_like(loc) if g is None else g.to_local().detach())
            t.grad = None
        loss = float(self.group.all_reduce(total.reshape(1))[0]) if self.group.active else float(
            total
        )
        return loss, torch.cat([g.reshape(-1) for g in grads])


def refuse_unsharded(problem: Any, what: str) -> None:
    """Refuse ``what`` (a matrix or an evaluation) on a sharded problem, in one sentence."""
    if getattr(problem, "sharding", None) is not None:
        raise OptionError(
            f"{what} is not available with {arg('shard')}: FSDP2 supports neither double "
            "backward nor forward mode, so sharded mode computes only Hessian products (by "
            f"finite differences of sharded gradients); drop {arg('shard')} for it."
        )
