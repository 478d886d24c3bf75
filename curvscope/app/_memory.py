r"""How much memory a command will take, estimated before its first product.

The estimate adds what the process already holds (the resident set on the CPU, the
allocated tensors on a CUDA device: torch, the model, the data loaded so far) to what the
work will add:

- **activations**: the tensors one forward pass saves for the backward pass on the largest
  batch, measured by running that forward once under ``saved_tensors_hooks`` (no product),
  times the passes a product keeps alive at once: 3 for a Hessian product (the forward, the
  first backward graph kept for the second, and the second backward), or where more the
  largest batch's measured first-order graph (every graph kept) or twice it (streamed;
  transformers: a GPT-2's graph is 4 forwards), 2 for the other curvature matrices (a jvp and
  a vjp through the same forward), 1.5 for gradients;
- **vectors**: the Lanczos basis (``basis_size`` vectors of ``P`` parameters), the Ritz
  vectors and the products with them (``2 k``), and a few work vectors; SLQ's bases of
  ``lanczos_steps`` vectors per probe for every probe of a block (all probes at once, or
  the block the plan shrinks them to) and :data:`SLQ_WORK` work vectors per probe;
  Hutch++'s sketch;
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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._device import available_memory, in_use
from .._errors import OptionError, arg
from .._options import parse_basis_device, parse_memory
from ..linalg import RESTART_BLOCK
from ..operators import GRAPH_CACHE_SHARE, HessianOperator, graph_account
from ..problem import Batch, Problem

__all__ = [
    "BasisChoice",
    "MemoryEstimate",
    "fit_memory",
    "min_basis",
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
SLQ_WORK = 5
"""Parameter-sized rows SLQ holds per probe of a block besides its basis (the current and
previous vectors, the product and its transposed copy, the projection's output)."""


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
    # the measurement is not one of the command's passes
    for i, batch in enumerate(local.batches(counted=False)):
        if i == largest:
            return int(measure(local, batch))
    return 0


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
    one = largest_graph_bytes(problem)
    share = problem.num_samples / problem.group.world_size
    return int(one * share / max(problem.batch_sizes))


def largest_graph_bytes(problem: Problem) -> int:
    """Bytes of the largest batch's first-order graph (its forward's saved tensors included).

    0 for TorchScript models and models without double backward (nothing is kept, and their
    products take other routes).
    """
    if problem.scripted:
        return 0
    try:
        return int(_on_largest_batch(
            problem, lambda local, b: HessianOperator(local, mode="double-backward").graph_bytes(b)
        ))
    except (RuntimeError, NotImplementedError):  # no double backward: nothing will be kept
        return 0


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory a command is expected to take on its device, by part (bytes)."""

    device: str
    parts: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    graph_budget: float | None = None
    """Bytes Hessian products may keep of first-order graphs (``None``: no Hessian)."""
    disk_bytes: float = 0.0
    """Bytes of a basis in a file (``--basis-device disk:DIR``), not in ``parts``."""
    host_bytes: float = 0.0
    """Bytes of a basis in host memory while the run is on a GPU, not in ``parts``."""

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



def estimate_memory(
    problem: Problem,
    *,
    matrices: Sequence[str] = ("hessian",),
    vectors: int = 0,
    basis: int = 0,
    basis_device: str | torch.device | None = None,
    slq_steps: int = 0,
    slq_probes: int = 1,
    kfac_layers: Sequence[tuple[int, int]] = (),
    limit: float | None = None,
    measured: tuple[int, float, float] | None = None,
    float64: bool = False,
    trace_probes: int = 0,
) -> MemoryEstimate:
    """The expected peak of a command on ``problem``'s device (see the module docstring).

    With Hessian products, the first-order graphs they keep (``kept graphs``): what all
    batches' graphs take, at most the budget of the problem's kept-graph account
    (:func:`~curvscope.operators.graph_account`). Without a budget
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
        slq_probes: SLQ probes run together (a block: each holds its basis).
        kfac_layers: ``(in, out)`` of each layer with Kronecker factors.
        limit: the memory the run may take (bytes), for the kept graphs' budget.
        measured: :func:`measure` of ``problem`` and ``matrices`` from an earlier call (the
            plan tries several bases without running the model again).
        trace_probes: Hutchinson's and Hutch++'s probes, after SLQ (:func:`trace_bytes`).
        float64: the work runs on a float64 copy of a lower-precision model (``check``'s
            derivative tests): the copy, and activations and vectors at 8 bytes a number.
    """
    dev = problem.device
    from ..operators import work_dtype

    # vectors and bases in the work dtype: float32 for a bfloat16 model
    vector_dtype = work_dtype(problem.dtype)
    item = torch.empty((), dtype=vector_dtype).element_size()
    widen = 1.0
    if float64 and problem.dtype != torch.float64:
        vector_dtype = torch.float64
        widen = 8.0 / item
        item = 8
    # sharded mode (docs/sharded.md): vectors are this rank's shards; the activations are
    # not measured (the measurement runs a forward outside FSDP, on one rank alone)
    sharding = getattr(problem, "sharding", None)
    P = problem.num_params if sharding is None else sharding.n_local
    acts, wanted, graph = measured if measured is not None else measure(problem, matrices)
    factors = [ACTIVATION_FACTOR.get(m, OTHER_FACTOR) for m in matrices]
    factor = max(factors, default=ACTIVATION_FACTOR["gradient"])
    acts, graph, wanted = acts * widen, graph * widen, wanted * widen
    parts = {"in use": float(in_use(dev)), "activations": factor * acts}
    notes = {"activations": f"batch {max(problem.batch_sizes)}: {factor:g} x {format_bytes(acts)}"}
    streamed_acts = factor * acts
    if 2 * graph > parts["activations"]:
        # a streamed Hessian product of one batch holds its first-order graph and the second
        # backward's temporaries, about as large again: transformers save far more for double
        # backward than 3 forward passes (a 2-layer GPT-2 streamed: peak 1.11x an estimate of
        # 3 x 150 MB forwards; its graph is 596 MB, and 2 graphs bring it within 1%)
        streamed_acts = 2.0 * graph
        parts["activations"] = streamed_acts
        notes["activations"] = (
            f"batch {max(problem.batch_sizes)}: 2 x its first-order graph {format_bytes(graph)}"
        )
    if sharding is not None:
        notes["activations"] = "not measured in sharded mode"
    disk_bytes, host_bytes = _basis_parts(
        parts, notes, basis, basis_device, dev, P, item, str(vector_dtype).replace("torch.", "")
    )
    if slq_steps or trace_probes:
        # SLQ's bases are freed before the traces draw their probes: the larger of the two
        slq = float(slq_probes * (slq_steps + SLQ_WORK) * P * item)
        traces = float(trace_bytes(trace_probes, item) * P)
        parts["SLQ basis"] = max(slq, traces)
        notes["SLQ basis"] = (
            f"{slq_probes} probe(s) x {slq_steps} steps" if slq >= traces
            else f"the traces' {trace_probes} probes, more than SLQ's bases"
        )
    parts["vectors"] = float((vectors + WORK_VECTORS) * P * item)
    if widen > 1.0:
        parts["float64 copy"] = float(P * item)
        notes["float64 copy"] = "the model's parameters"
    if kfac_layers:
        parts["Kronecker factors"] = float(sum(2 * (i * i + o * o) for i, o in kfac_layers) * item)
    budget = None
    asked = graph_account(problem).budget
    if wanted > 0 and asked != 0:
        budget = asked
        if budget is None:
            rest = sum(parts.values())
            budget = wanted if limit is None else GRAPH_CACHE_SHARE * max(0.0, limit - rest)
        parts["kept graphs"] = min(wanted, budget)
        notes["kept graphs"] = (
            "every batch's first-order graph"
            if wanted <= budget
            else f"{format_bytes(budget)} of {format_bytes(wanted)}; the other batches streamed"
        )
        if wanted <= budget and streamed_acts > factor * acts:
            # every graph kept: a product is the second backward through a kept graph, whose
            # temporaries are about one graph (ResNet-18 kept: 2 graphs put the estimate at
            # 1.31x the peak, 3 forwards at 1.15x)
            kept_acts = max(factor * acts, graph)
            parts["activations"] = kept_acts
            notes["activations"] = (
                f"batch {max(problem.batch_sizes)}: "
                + (f"its first-order graph {format_bytes(graph)}" if graph >= factor * acts
                   else f"{factor:g} x {format_bytes(acts)}")
            )
    return MemoryEstimate(str(dev), parts, notes, budget, disk_bytes, host_bytes)


def trace_bytes(m: int, item: int) -> int:
    """Bytes per parameter that the trace estimators hold at most with ``m`` probes each.

    Hutch++ (the larger): its ``k = m // 3`` sketch columns and ``g = m - 2k`` Gaussian
    ones in the operator's dtype, the sketch's products, and their float64 copy, ``Q`` and
    the QR's workspace (8 bytes each), and ``Q`` in the dtype: ``(3k + g) item + 24 k``.
    Hutchinson draws its ``m`` probes at once: a Gaussian draw in float64 then the dtype,
    ``(8 + item) m`` (Rademacher: an int8 draw, ``(1 + item) m``).
    """
    if m <= 0:
        return 0
    k = m // 3
    return max((3 * k + (m - 2 * k)) * item + 24 * k, (8 + item) * m)


def _basis_parts(
    parts: dict[str, float],
    notes: dict[str, str],
    basis: int,
    basis_device: str | torch.device | None,
    dev: torch.device,
    P: int,
    item: int,
    dtype: str,
) -> tuple[float, float]:
    """The Lanczos basis's part (and note) where it lives; returns ``(disk, host)`` bytes."""
    disk_bytes = host_bytes = 0.0
    place, disk = parse_basis_device(None if basis_device is None else str(basis_device))
    bdev = torch.device(place) if place is not None else dev
    if not basis:
        return disk_bytes, host_bytes
    bbytes = basis_bytes(basis, P, item)
    if disk is not None:
        disk_bytes = float((basis + 1) * P * item)
        notes["Lanczos basis"] = f"{format_bytes(disk_bytes)} on disk in {disk}"
        if basis < P:  # the restart's block of rows is formed in RAM
            parts["Lanczos basis"] = float(RESTART_BLOCK)
    elif bdev == dev:
        parts["Lanczos basis"] = bbytes
        notes["Lanczos basis"] = f"{basis} x {P} {dtype}"
    else:
        notes["Lanczos basis"] = f"{format_bytes(bbytes)} kept on {bdev}"
        host_bytes = bbytes
    return disk_bytes, host_bytes


def measure(problem: Problem, matrices: Sequence[str]) -> tuple[int, float, float]:
    """What the estimate runs the model for: activations, kept graphs wanted, largest graph.

    The last is the largest batch's first-order graph (Hessian products only). None of them
    in sharded mode: its forward runs under FSDP on every rank, and its products
    keep no graphs (finite differences of sharded gradients).
    """
    if getattr(problem, "sharding", None) is not None:
        return 0, 0.0, 0.0
    acts = activation_bytes(problem)
    wanted = graph = 0.0
    if "hessian" in matrices and not problem.scripted:
        graph = float(largest_graph_bytes(problem))
        if graph_account(problem).budget != 0:
            share = problem.num_samples / problem.group.world_size
            wanted = graph * share / max(problem.batch_sizes)
    return acts, wanted, graph


def basis_bytes(basis: int, P: int, item: int) -> float:
    """Bytes of a Lanczos basis of ``basis`` vectors, the restart's block included.

    ``basis + 1`` columns (the next vector) and, when it restarts (``basis < P``), the block
    of rows a restart forms its Ritz vectors in (:func:`~curvscope.linalg.restart_in_place`).
    """
    block = min(RESTART_BLOCK, P * basis * item) if basis < P else 0
    return float((basis + 1) * P * item + block)


MIN_EXTRA = 6
"""Vectors beside the ``k`` wanted ones that a shrunk basis keeps at least (see
:func:`min_basis`)."""


def min_basis(k: int, n: int) -> int:
    """The smallest basis the plan shrinks to: ``k + max(6, ceil(k / 2))``, at most ``n``.

    Measured (docs/basis-fit.md): with ``k + 3`` or ``k + 4`` vectors thick restart took up
    to 7x the products of an 80-vector basis (2 new directions a cycle); from ``k + 5`` up,
    at most 3-4.6x and mostly 1.0-1.5x.
    """
    return min(n, k + max(MIN_EXTRA, -(-k // 2)))


def products_factor(m: int, m0: int, k: int) -> float:
    """About how many times the products a basis of ``m`` takes against ``m0``, at worst.

    ``30 / (m - k)`` against the same for ``m0`` (each at least 1): the upper end of what
    top/bottom sets of two test spectra took (docs/basis-fit.md); well-separated ends lose
    nothing.
    """

    def worst(size: int) -> float:
        return max(1.0, 30.0 / max(1, size - k))

    return max(1.0, worst(m) / worst(m0))


@dataclass(frozen=True)
class BasisChoice:
    """What the plan chose for the Lanczos basis, for the command to pass to ``eigsh``."""

    size: int
    """Basis vectors (0: no Lanczos basis)."""
    device: str | None
    """``--basis-device`` to use (``None``: the parameters' device)."""
    line: str | None = None
    """What was chosen and what it costs, when it differs from the request (or is on disk)."""
    probe_block: int | None = None
    """SLQ probes to run together (``None``: all of them; :func:`fit_memory` shrinks it)."""


def memory_amount(n: float) -> str:
    """A ``--max-memory`` value at least ``n`` bytes, rounded up: ``31.06GB``, ``812MB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{math.ceil(n / size * 100) / 100:g}{unit}"
    return f"{math.ceil(n)}B"


ADVICE_MARGIN = 1.05
"""Advice leaves this much room: a re-plan measures the process again (a few MB differ)."""


def fit_memory(
    problem: Problem,
    *,
    matrices: Sequence[str] = ("hessian",),
    vectors: int = 0,
    basis: int = 0,
    k: int = 1,
    explicit: bool = False,
    movable: bool = True,
    basis_device: str | None = None,
    slq_steps: int = 0,
    slq_probes: int = 1,
    kfac_layers: Sequence[tuple[int, int]] = (),
    limit: float | None = None,
    float64: bool = False,
    trace_probes: int = 0,
    measured: tuple[int, float, float] | None = None,
) -> tuple[MemoryEstimate, BasisChoice]:
    """The estimate and the basis that fit ``limit``, or a refusal whose advice all fits.

    The requested basis (``basis`` vectors on ``basis_device``) when it fits. Else, when the
    size is the default (not ``explicit``) and the command passes the choice on
    (``movable``): the largest basis down to :func:`min_basis` that fits; else, on a GPU with
    no ``basis_device`` given, the basis in host memory (shrunk there if need be). A disk
    basis (``disk:DIR``) costs RAM for one block of rows only; its file must fit the folder's
    free space, and a default basis is shrunk to fit it. The disk is never chosen unasked
    (docs/basis-fit.md: which folder, and a RAM-backed ``/tmp`` gains nothing).

    SLQ (``slq_steps``): its ``slq_probes`` probes run as one block when that fits, else in
    the largest block that does (``probe_block``): the same result in the same products.

    Raises:
        OptionError: when nothing the plan may choose fits, in one sentence whose every
            advice was planned and fits (``advice``: ``[(option, value), ...]``).
    """
    if measured is None:
        measured = measure(problem, matrices)
    P = problem.num_params
    dev = problem.device
    from ..operators import work_dtype

    item = torch.empty((), dtype=work_dtype(problem.dtype)).element_size()
    place, disk = parse_basis_device(basis_device)
    free_disk, host_free = _room(dev, disk)

    def est(m: int, where: str | None, block: int = max(1, slq_probes)) -> MemoryEstimate:
        return estimate_memory(
            problem, matrices=matrices, vectors=vectors, basis=m, basis_device=where,
            slq_steps=slq_steps, slq_probes=block, kfac_layers=kfac_layers, limit=limit,
            measured=measured, float64=float64, trace_probes=trace_probes,
        )

    def fits(e: MemoryEstimate, margin: float = 1.0) -> bool:
        return (
            (limit is None or e.total * margin <= limit)
            and e.disk_bytes * margin <= free_disk
            and e.host_bytes * margin <= host_free
        )

    def largest(where: str | None, lo: int, hi: int, margin: float = 1.0) -> int:
        """The largest basis in ``[lo, hi]`` that fits (0: none)."""
        return _largest(lo, hi, lambda m: fits(est(m, where), margin))

    limit_text = f"{arg('max_memory')} {format_bytes(limit)}" if limit is not None else ""
    first = est(basis, basis_device)
    if slq_steps and slq_probes > 1 and not fits(first):
        # SLQ's bases shrink without changing its result: the largest block of probes that fits
        block = _largest(1, slq_probes - 1, lambda c: fits(est(basis, basis_device, c)))
        if block:
            return est(basis, basis_device, block), BasisChoice(
                basis, basis_device,
                f"SLQ: probes in blocks of {block} instead of all {slq_probes} at once to fit "
                f"{limit_text}: the same products, each shared by fewer probes",
                probe_block=block,
            )
        first = est(basis, basis_device, 1)  # refused below: advice with one probe's basis
    if fits(first):
        return first, BasisChoice(basis, basis_device, _disk_line(first, basis, disk, free_disk))
    lo = min(basis, min_basis(k, P))
    if basis and movable and not explicit:
        m = largest(basis_device, lo, basis - 1)
        if m:
            why = (
                f"the {format_bytes(free_disk)} free in {disk}"
                if first.disk_bytes > free_disk
                else limit_text
            )
            return est(m, basis_device), BasisChoice(
                m,
                basis_device,
                f"basis: {m} vectors instead of {basis} to fit {why}: "
                f"{_cost_text(products_factor(m, basis, k))}",
            )
        if dev.type == "cuda" and place is None:
            m = basis if fits(est(basis, "cpu")) else largest("cpu", lo, basis - 1)
            if m:
                e = est(m, "cpu")
                size = f"{m} vectors instead of {basis}, " if m < basis else ""
                return e, BasisChoice(
                    m,
                    "cpu",
                    f"basis: {size}in host memory ({format_bytes(e.host_bytes)}) instead of "
                    f"{dev} to fit {limit_text}: each Lanczos step copies vectors across the "
                    "bus and orthogonalises on the CPU",
                )
    _refuse(first, limit, _advice(
        first, limit, est=est, fits=fits, largest=largest, basis=basis, lo=lo,
        auto=movable and not explicit, movable=movable, where=basis_device, disk=disk,
        free_disk=free_disk, file_bytes=float((basis + 1) * P * item),
        cuda=dev.type == "cuda" and place is None, batch=max(problem.batch_sizes),
        graph_cache=graph_account(problem).budget,
    ))
    raise AssertionError("unreachable")  # pragma: no cover


def _room(dev: torch.device, disk: str | None) -> tuple[float, float]:
    """Free bytes in the disk basis's folder and, beside a GPU, in host memory (else inf)."""
    import shutil

    free_disk = float(shutil.disk_usage(disk).free) if disk is not None else math.inf
    host_free = math.inf
    if dev.type == "cuda":
        host = available_memory("cpu")
        host_free = math.inf if host is None else float(host - in_use("cpu"))
    return free_disk, host_free


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The largest ``m`` in ``[lo, hi]`` with ``ok(m)`` (0: none); ``ok`` falls as ``m`` grows."""
    if hi < lo or not ok(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _disk_line(estimate: MemoryEstimate, basis: int, disk: str | None, free: float) -> str | None:
    """The plan's line for a basis on disk (``None`` for one in memory)."""
    if disk is None or not basis:
        return None
    return (
        f"basis: {basis} vectors in a {format_bytes(estimate.disk_bytes)} file in {disk} "
        f"({format_bytes(free)} free): each Lanczos step reads it back from disk"
    )


def _cost_text(factor: float) -> str:
    """What a smaller basis costs, in words (``factor``: :func:`products_factor`)."""
    if factor < 1.1:
        return "about as many products (more restarts)"
    return f"up to about {factor:.2g}x the products (more restarts)"


def _advice(
    first: MemoryEstimate,
    limit: float | None,
    *,
    est: Callable[[int, str | None], MemoryEstimate],
    fits: Callable[..., bool],
    largest: Callable[..., int],
    basis: int,
    lo: int,
    auto: bool,
    movable: bool,
    where: str | None,
    disk: str | None,
    free_disk: float,
    file_bytes: float,
    cuda: bool,
    batch: int,
    graph_cache: float | None,
) -> list[tuple[str, str, str]]:
    """``(option, value, text)`` for each single change that fits (checked with margin)."""
    out: list[tuple[str, str, str]] = []
    held = first.parts.get("in use", 0.0)
    if limit is not None and held * ADVICE_MARGIN > limit:
        value = memory_amount(first.total * ADVICE_MARGIN)
        return [("max_memory", value, f"{arg('max_memory')} {value}")]
    if basis and movable:
        m = largest(where, min(basis, lo), basis - 1, ADVICE_MARGIN)
        if m:
            out.append(("basis_size", str(m), f"{arg('basis_size')} {m}"))
        if cuda and fits(est(basis, "cpu"), ADVICE_MARGIN):
            out.append(("basis_device", "cpu", f"{arg('basis_device')} cpu"))
        on_disk = first.parts.get("Lanczos basis", 0.0) if disk is None else 0.0
        if on_disk and (
            limit is None or (first.total - on_disk + RESTART_BLOCK) * ADVICE_MARGIN <= limit
        ):
            out.append((
                "basis_device", "disk:DIR",
                f"{arg('basis_device')} disk:DIR (a folder with {format_bytes(file_bytes)} free)",
            ))
    base = est(lo, where) if auto and basis else first
    acts = base.parts.get("activations", 0.0)
    if limit is not None and acts > 0 and batch > 1 and base.disk_bytes <= free_disk:
        room = limit / ADVICE_MARGIN - (base.total - acts)
        b = min(batch - 1, int(batch * room / acts)) if room > 0 else 0
        if b >= 1:
            out.append(("batch_size", str(b), f"{arg('batch_size')} {b}"))
    kept = base.parts.get("kept graphs", 0.0)
    if (
        limit is not None and kept > 0 and graph_cache is not None
        and (base.total - kept) * ADVICE_MARGIN <= limit and base.disk_bytes <= free_disk
    ):
        out.append(("hvp_cache", "off", f"{arg('hvp_cache')} off"))
    if limit is not None and first.disk_bytes <= free_disk and first.total > limit:
        value = memory_amount(first.total * ADVICE_MARGIN)
        out.append(("max_memory", value, f"{arg('max_memory')} {value}"))
    return out


def _refuse(
    estimate: MemoryEstimate, limit: float | None, advice: list[tuple[str, str, str]]
) -> None:
    """Raise the one-sentence refusal: what the run needs, against what, and what fits."""
    reasons = []
    held = estimate.parts.get("in use", 0.0)
    if limit is not None and held > limit:
        reasons.append(
            f"the process already holds {format_bytes(held)} (torch, the model and the data), "
            f"more than {arg('max_memory')} {format_bytes(limit)}"
        )
    elif limit is not None and estimate.total > limit:
        reasons.append(
            f"the run needs {estimate.describe()}, more than {arg('max_memory')} "
            f"{format_bytes(limit)}"
        )
    if estimate.disk_bytes and not reasons:
        reasons.append(f"the disk basis needs {format_bytes(estimate.disk_bytes)}, more than "
                       "its folder has free")
    if estimate.host_bytes and not reasons:
        reasons.append(f"the basis needs {format_bytes(estimate.host_bytes)} of host memory, "
                       "more than is free")
    texts = [t for _, _, t in advice]
    if not texts:
        fix = "nothing the plan can change fits; free memory or use a machine with more"
    elif len(texts) == 1:
        fix = f"it fits with {texts[0]}"
    else:
        fix = f"it fits with {', '.join(texts[:-1])} or {texts[-1]}"
    raise OptionError(
        f"{'; '.join(reasons) or 'the run does not fit'}; {fix}.",
        option="max_memory",
        advice=[(o, v) for o, v, _ in advice],
    )


def refuse_if_too_large(estimate: MemoryEstimate, limit: float | None) -> None:
    """Refuse an estimate over ``limit`` bytes, advising what fits by the estimate alone.

    For a plan whose basis may change, :func:`fit_memory` advises more (basis size and
    place). Here: the batch size that scales the activations into the limit, and the
    ``--max-memory`` that holds the estimate.

    Raises:
        OptionError: when the estimate is larger than the limit.
    """
    if limit is None or estimate.total <= limit:
        return

    def est(m: int, where: str | None) -> MemoryEstimate:
        return estimate

    def fits(e: MemoryEstimate, margin: float = 1.0) -> bool:
        return e.total * margin <= limit

    _refuse(estimate, limit, _advice(
        estimate, limit, est=est, fits=fits, largest=lambda *a: 0, basis=0, lo=0,
        auto=False, movable=False, where=None, disk=None, free_disk=math.inf, file_bytes=0.0,
        cuda=False,
        batch=10**9, graph_cache=None,
    ))
