r"""How much memory a command will take, estimated before its first product.

The estimate adds what the process already holds (the resident set on the CPU, the
allocated tensors on a CUDA device: torch, the model, the data loaded so far) to what the
work will add:

- **activations**: the tensors one forward pass saves for the backward pass on the largest
  batch, measured by running that forward once under ``saved_tensors_hooks`` (no product),
  times the passes a product keeps alive at once: 3 for a Hessian product (the forward, the
  first backward graph kept for the second, and the second backward), 2 for the other
  curvature matrices (a jvp and a vjp through the same forward), 1.5 for gradients;
- **vectors**: the Lanczos basis (``basis_size`` vectors of ``P`` parameters), the Ritz
  vectors and the products with them (``2 k``), and a few work vectors; SLQ's basis of
  ``lanczos_steps`` vectors per probe; Hutch++'s sketch;
- **Kronecker factors** for KFAC/EKFAC (``in^2 + out^2`` per layer and their eigenbases);
- **kept graphs**: with Hessian products, each batch's forward and first-backward graph kept
  between products (measured on the largest batch, scaled by samples), at most the budget:
  ``--hvp-cache`` or, by default, half of what the limit leaves beside the other parts;
- **parameter copies**: a float64 copy of the model for a float64 run is already counted
  in the process; a curvature product holds two gradients' worth of parameter-sized tensors.

Measured against peak RSS (benchmarks/memory.py): top-5 of a ResNet-18-shaped network
(11M parameters, 256 CIFAR-shaped samples) is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._device import available_memory, in_use
from .._errors import OptionError, arg
from .._options import parse_memory
from ..linalg import KEEP_FRACTION
from ..operators import GRAPH_CACHE_SHARE, HessianOperator
from ..problem import Batch, Problem

__all__ = [
    "MemoryEstimate",
    "refuse_if_too_large",
    "activation_bytes",
    "available_memory",
    "estimate_memory",
    "format_bytes",
    "in_use",
    "parse_memory",
]

ACTIVATION_FACTOR = {"hessian": 3.0, "gradient": 1.5}
"""Forward activations a product keeps alive at once, per matrix kind (module docstring)."""
OTHER_FACTOR = 2.0
WORK_VECTORS = 6
"""Parameter-sized tensors a product and the iteration hold besides the basis (gradient,
product, residual, next Lanczos vector, reorthogonalisation scratch)."""


def format_bytes(n: float) -> str:
    """``1.2 GB``, ``340 MB``, ``12 kB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _on_largest_batch(problem: Problem, measure: Callable[[Problem, Batch], int]) -> int:
    """``measure(problem, batch)`` on the largest batch, in this process, not counted as a pass."""
    largest = max(range(len(problem.batch_sizes)), key=problem.batch_sizes.__getitem__)
    local = problem.alone()
    try:
        for i, batch in enumerate(local.batches()):
            if i == largest:
                return int(measure(local, batch))
        return 0
    finally:  # the measurement is not one of the command's passes
        local.data_passes -= 1
        local.add_work(-1)


def activation_bytes(problem: Problem) -> int:
    """Bytes one forward pass saves for backward on the largest batch (measured once).

    Counts each saved tensor's storage once; parameters are not counted (they are held
    anyway). TorchScript models cannot be hooked: their output size times the layers stands
    in (a rough floor).
    """
    params = {n: t.detach().requires_grad_(True) for n, t in problem.params.items()}
    own = {t.untyped_storage().data_ptr() for t in params.values()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
            if s.data_ptr() not in own:
                seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a storage
            pass
        # detached: a saved output packed as itself would hold its own graph node, a cycle
        # through C++ that Python's collector cannot break (one batch's outputs leaked)
        return t.detach()

    def measure(local: Problem, batch: Batch) -> int:
        with local.mode(), torch.enable_grad():
            if problem.scripted:
                out = local.forward(problem.params, batch.inputs)
                return int(out.numel() * out.element_size() * 4)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                value = local.batch_loss(params, batch)
            del value
        return int(sum(seen.values()))

    return _on_largest_batch(problem, measure)


def kept_graph_bytes(problem: Problem) -> int:
    """Bytes Hessian products would keep of first-order graphs for this process's batches.

    The largest batch's graph is built once and measured (tensors saved for backward and
    its gradients); the other batches are scaled by their samples. 0 for TorchScript models
    (their graphs are not kept).
    """
    if problem.scripted:
        return 0
    try:
        one = _on_largest_batch(
            problem, lambda local, b: HessianOperator(local, mode="double-backward").graph_bytes(b)
        )
    except (RuntimeError, NotImplementedError):  # no double backward: nothing will be kept
        return 0
    share = problem.num_samples / problem.group.world_size
    return int(one * share / max(problem.batch_sizes))


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory a command is expected to take on its device, by part (bytes)."""

    device: str
    parts: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    graph_budget: float | None = None
    """Bytes Hessian products may keep of first-order graphs (``None``: no Hessian)."""

    @property
    def total(self) -> float:
        """All parts together."""
        return float(sum(self.parts.values()))

    @property
    def largest(self) -> str:
        """The largest part other than what the process already holds."""
        work = {k: v for k, v in self.parts.items() if k != "in use"}
        return max(work, key=work.__getitem__) if work else "in use"

    def describe(self) -> str:
        """``about 1.2 GB on cpu (in use 400 MB, activations 500 MB (batch 128), ...)``."""
        parts = ", ".join(
            f"{k} {format_bytes(v)}" + (f" ({self.notes[k]})" if k in self.notes else "")
            for k, v in self.parts.items()
            if v > 0
        )
        return f"about {format_bytes(self.total)} on {self.device} ({parts})"

    def to_dict(self) -> dict[str, Any]:
        """For the result document's ``memory`` section."""
        return {
            "device": self.device,
            "total_bytes": int(self.total),
            "parts_bytes": {k: int(v) for k, v in self.parts.items()},
        }


_LOWER = {
    "activations": arg("batch_size"),
    "Lanczos basis": f"{arg('basis_size')} or {arg('basis_device')} cpu",
    "SLQ basis": arg("num_steps"),
    "Kronecker factors": f"{arg('matrices')} (leave out kfac/ekfac) or {arg('params')}",
    "vectors": f"{arg('top')}/{arg('bottom')}",
    "in use": f"{arg('samples')} or {arg('params')}",
    "kept graphs": f"{arg('hvp_cache')} (off, or a smaller size)",
}


def estimate_memory(
    problem: Problem,
    *,
    matrices: Sequence[str] = ("hessian",),
    vectors: int = 0,
    basis: int = 0,
    basis_device: str | torch.device | None = None,
    slq_steps: int = 0,
    kfac_layers: Sequence[tuple[int, int]] = (),
    limit: float | None = None,
) -> MemoryEstimate:
    """The expected peak of a command on ``problem``'s device (see the module docstring).

    With Hessian products, the first-order graphs they keep (``kept graphs``): what all
    batches' graphs take, at most the problem's ``graph_cache`` budget. Without a budget
    (``None``), the budget is :data:`~curvscope.operators.GRAPH_CACHE_SHARE` of what
    ``limit`` leaves beside the rest of the run, returned as ``graph_budget`` for the
    caller to set.

    Args:
        problem: the loaded problem (its first batch is run forward once to measure).
        matrices: the curvature matrices the command multiplies with.
        vectors: parameter-sized vectors held besides the basis (Ritz vectors, products).
        basis: Lanczos basis vectors.
        basis_device: where the basis lives (default the parameters' device).
        slq_steps: SLQ Lanczos steps per probe (its basis).
        kfac_layers: ``(in, out)`` of each layer with Kronecker factors.
        limit: the memory the run may take (bytes), for the kept graphs' budget.
    """
    dev = problem.device
    item = torch.empty((), dtype=problem.dtype).element_size()
    # sharded mode (docs/sharded.md): vectors are this rank's shards; the activations are
    # not measured (the measurement runs a forward outside FSDP, on one rank alone)
    sharding = getattr(problem, "sharding", None)
    P = problem.num_params if sharding is None else sharding.n_local
    acts = activation_bytes(problem) if sharding is None else 0
    factors = [ACTIVATION_FACTOR.get(m, OTHER_FACTOR) for m in matrices]
    factor = max(factors, default=ACTIVATION_FACTOR["gradient"])
    parts = {"in use": float(in_use(dev)), "activations": factor * acts}
    notes = {"activations": f"batch {max(problem.batch_sizes)}: {factor:g} x {format_bytes(acts)}"}
    if sharding is not None:
        notes["activations"] = "not measured in sharded mode"
    basis_bytes = float(basis * P * item)
    bdev = torch.device(basis_device) if basis_device is not None else dev
    if basis:
        # a restart forms the kept Ritz vectors (KEEP_FRACTION of the buffer) while the old
        # basis is still alive: 1.65 bases at the peak (measured on ResNet-18: the basis alone
        # left the peak 26% above the estimate)
        keep = 1.0 + KEEP_FRACTION if basis < P else 1.0
        basis_bytes *= keep
        if bdev == dev:
            parts["Lanczos basis"] = basis_bytes
            notes["Lanczos basis"] = (
                f"{basis} x {P} {str(problem.dtype).replace('torch.', '')}"
                + (f", x{keep:g} at a restart" if keep > 1 else "")
            )
        else:
            notes["Lanczos basis"] = f"{format_bytes(basis_bytes)} kept on {bdev}"
    if slq_steps:
        parts["SLQ basis"] = float(slq_steps * P * item)
    parts["vectors"] = float((vectors + WORK_VECTORS) * P * item)
    if kfac_layers:
        parts["Kronecker factors"] = float(sum(2 * (i * i + o * o) for i, o in kfac_layers) * item)
    budget = None
    wanted = 0.0
    if ("hessian" in matrices and problem.graph_cache != 0 and not problem.scripted
            and sharding is None):
        wanted = float(kept_graph_bytes(problem))
    if wanted > 0:
        budget = problem.graph_cache
        if budget is None:
            rest = sum(parts.values())
            budget = wanted if limit is None else GRAPH_CACHE_SHARE * max(0.0, limit - rest)
        parts["kept graphs"] = min(wanted, budget)
        notes["kept graphs"] = (
            "every batch's first-order graph"
            if wanted <= budget
            else f"{format_bytes(budget)} of {format_bytes(wanted)}; the other batches streamed"
        )
    return MemoryEstimate(str(dev), parts, notes, budget)


def refuse_if_too_large(estimate: MemoryEstimate, limit: float | None) -> None:
    """Refuse a run whose estimate exceeds ``limit`` bytes, naming what to lower.

    Raises:
        OptionError: when the estimate is larger than the limit.
    """
    if limit is None or estimate.total <= limit:
        return
    held = estimate.parts.get("in use", 0.0)
    if held > limit:
        raise OptionError(
            f"the process already holds {format_bytes(held)} (torch, the model and the data), "
            f"more than {arg('max_memory')} {format_bytes(limit)}; raise {arg('max_memory')}."
        )
    part = estimate.largest
    lower = _LOWER.get(part, arg("batch_size"))
    if part == "Lanczos basis" and str(estimate.device).startswith("cpu"):
        # the basis already lives in host memory: moving it there is no advice
        lower = arg("basis_size")
    raise OptionError(
        f"the run needs {estimate.describe()}, more than {arg('max_memory')} "
        f"{format_bytes(limit)}; lower {lower} (the largest part: {part}) or raise "
        f"{arg('max_memory')}."
    )
